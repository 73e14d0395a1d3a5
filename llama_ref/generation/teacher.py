"""Teacher outputs for distillation: each position's top-k log-probabilities over a set of prompts.

The file is compact and append-only, so an interrupted export resumes where it stopped:

    header   MAGIC (16 bytes) | uint32 length | JSON (settings: model, top_k, dtype, digest of the prompts)
    record   uint32 n | body (n bytes) | uint32 crc32(body)
    body     uint32 prompt index | uint32 T | int32 ids[T] | int32 top_ids[T, k] | float top_logprobs[T, k]

All integers little-endian. Row t of a record is the distribution of the token after position t (the last
row predicts the continuation of the prompt), top ids ordered from most to least likely. A record is
written in one piece and checked by its CRC on reading, so a record cut short by an interruption is
recognised and dropped on resume; every complete record is kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

import numpy as np

from ..errors import LlamaRefError
from ..errors import InputError
from .sampling import log_softmax
from ..text.textfile import read_text

if TYPE_CHECKING:
    from ..model.transformer import Transformer

MAGIC = b"LLAMA_REF_TEACH1"
DTYPES = {"float16": np.float16, "float32": np.float32}


class TeacherFileError(LlamaRefError, ValueError):
    """A teacher file is damaged, or was made with other settings than those asked for."""


@dataclass
class TeacherRecord:
    index: int  # which prompt of the input
    ids: np.ndarray  # (T,) int32
    top_ids: np.ndarray  # (T, k) int32
    top_logprobs: np.ndarray  # (T, k) float16 or float32


# ---- input ------------------------------------------------------------------------------------------

def check_teacher_input(path: "str | Path") -> list[str]:
    """Prompts of a text file (one per non-empty line) or a .jsonl file (a string, or an object with a
    "text" or "prompt" field, per line). Errors name the file and line."""
    path = Path(path)
    lines = read_text(path, "prompts").splitlines()
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if isinstance(item, dict):
                item = item.get("text", item.get("prompt"))
            if not isinstance(item, str) or not item:
                raise InputError(f"{path}:{number}: expected a string or an object with a 'text' field")
            line = item
        prompts.append(line)
    if not prompts:
        raise InputError(f"{path}: no prompts in the file")
    return prompts


# ---- writing ----------------------------------------------------------------------------------------

def _digest(prompts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False).encode("utf-8")).hexdigest()


def _encode_header(settings: dict) -> bytes:
    text = json.dumps(settings, sort_keys=True).encode("utf-8")
    return MAGIC + struct.pack("<I", len(text)) + text


def _encode_record(index: int, ids: np.ndarray, top_ids: np.ndarray, top_logprobs: np.ndarray) -> bytes:
    body = (struct.pack("<II", index, len(ids)) + ids.astype("<i4").tobytes()
            + top_ids.astype("<i4").tobytes() + top_logprobs.astype(top_logprobs.dtype.newbyteorder("<")).tobytes())
    return struct.pack("<I", len(body)) + body + struct.pack("<I", zlib.crc32(body))


def top_logprobs_of(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely ids at each position and their log-probabilities: (T, k) each, best first
    (equal values by id)."""
    logp = log_softmax(logits)  # (T, V) float64
    part = np.argpartition(-logp, k - 1, axis=-1)[:, :k]  # (T, k) the k best, unordered
    vals = np.take_along_axis(logp, part, axis=-1)  # (T, k)
    order = np.lexsort((part, -vals), axis=-1)  # by value descending, then id
    ids = np.take_along_axis(part, order, axis=-1)
    return ids, np.take_along_axis(vals, order, axis=-1)


def export_teacher(model: "Transformer", prompts: Sequence[str], out: "str | Path", *, top_k: int = 20,
                   dtype: str = "float16", truncate: bool = False, resume: bool = True,
                   progress: bool = False) -> dict:
    """Write each prompt's per-position top-k log-probabilities to `out`.

    resume: keep the complete records of an earlier run with the same model, prompts and settings and do
    only the rest (a record cut short at the end is discarded). truncate: keep the start of a prompt
    longer than the context window instead of refusing it. Returns a summary dict.
    """
    out = Path(out)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= model.args.vocab_size:
        raise InputError(f"top_k must be between 1 and the vocabulary size {model.args.vocab_size}, got {top_k}")
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if model.tokenizer is None:
        raise InputError("teacher export needs a model with a tokenizer")
    # Tokenize and check every prompt before a byte is written, so bad input leaves no file behind.
    window = model.args.max_seq_len
    encoded = []
    for i, text in enumerate(prompts):
        ids = model.tokenizer.encode(text)
        if not ids:
            raise InputError(f"prompt {i} has no tokens")
        if len(ids) > window:
            if not truncate:
                raise InputError(f"prompt {i} has {len(ids)} tokens but the context window is {window} "
                                 f"(ask for truncation to keep its start)")
            ids = ids[:window]
        encoded.append(ids)
    settings = {"format": "llama_ref teacher", "version": 1, "model": str(model.source or ""),
                "vocab_size": model.args.vocab_size, "top_k": int(top_k), "dtype": dtype,
                "prompts": len(prompts), "prompts_sha256": _digest(prompts), "truncate": bool(truncate)}

    # Across MPI ranks (llama_ref.runtime.parallel) world rank 0 alone reads and writes the file; the prompts are
    # shared out between the ranks' model copies, and their records come back to it in order.
    world = getattr(model, "world", None)
    writer = world is None or world.rank == 0
    done = _prepare_output(out, settings, resume) if writer else 0
    if world is not None:
        done = world.bcast(done)  # a count, or the error rank 0 met, raised on every rank
    if isinstance(done, Exception):
        raise done

    def compute(i):
        return top_logprobs_of(model.logits(np.asarray(encoded[i], dtype=np.int64)), int(top_k))

    from ..runtime.parallel import map_in_order

    results = map_in_order(model, range(done, len(encoded)), compute)
    if progress and writer:
        from tqdm import tqdm
        results = tqdm(results, desc=f"teacher {out.name}", unit="prompt", initial=done, total=len(encoded))
    tokens = 0
    with open(out, "ab") if writer else open(os.devnull, "wb") as f:
        for i, (top_ids, top_lp) in results:
            ids = np.asarray(encoded[i], dtype=np.int64)
            f.write(_encode_record(i, ids, top_ids, top_lp.astype(DTYPES[dtype])))
            f.flush()  # each record reaches the file whole before the next one starts
            tokens += len(ids)
    return {"output": str(out), "records": len(encoded), "skipped": done, "tokens": tokens}


def _prepare_output(out: Path, settings: dict, resume: bool) -> "int | TeacherFileError":
    """Open `out` for appending: the number of complete records kept, after writing the header to a new
    file; a TeacherFileError (returned, for the caller to raise on every rank) when it cannot resume."""
    done = 0
    if resume and out.exists():
        try:
            header, records, good_end = _scan(out)
        except TeacherFileError as e:
            return e
        if header is None:
            good_end = 0  # not even a whole header: nothing worth keeping
        elif header != settings:
            differ = sorted(k for k in settings if header.get(k) != settings[k])
            return TeacherFileError(f"{out}: made with other settings ({', '.join(differ)} differ); "
                                    f"use another output file or restart it")
        done = len(records)
        with open(out, "r+b") as f:
            f.truncate(good_end)  # drop a record cut short
    if not (resume and out.exists() and out.stat().st_size > 0):
        out.write_bytes(_encode_header(settings))
    return done


# ---- reading ----------------------------------------------------------------------------------------

def _scan(path: Path) -> tuple[Optional[dict], list[TeacherRecord], int]:
    """Header, complete records, and the byte offset where the complete part ends."""
    data = path.read_bytes()
    if len(data) < len(MAGIC) + 4:
        return None, [], 0
    if data[:len(MAGIC)] != MAGIC:
        raise TeacherFileError(f"{path}: not a llama_ref teacher file")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    if len(data) < start + n:
        return None, [], 0
    try:
        header = json.loads(data[start:start + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise TeacherFileError(f"{path}: damaged header (not UTF-8 JSON)") from None
    _check_header(header, path)
    k, dtype = header["top_k"], np.dtype(DTYPES[header["dtype"]]).newbyteorder("<")
    records, pos = [], start + n
    while pos + 4 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos)
        end = pos + 4 + size + 4
        if end > len(data):
            break  # cut short
        body = data[pos + 4:pos + 4 + size]
        if struct.unpack_from("<I", data, end - 4)[0] != zlib.crc32(body) or size < 8:
            break  # damaged: everything from here on is dropped
        index, T = struct.unpack_from("<II", body)
        if size != 8 + 4 * T + 4 * T * k + dtype.itemsize * T * k:
            break
        at = 8
        ids = np.frombuffer(body, "<i4", T, at)
        at += 4 * T
        top_ids = np.frombuffer(body, "<i4", T * k, at).reshape(T, k)
        at += 4 * T * k
        top_lp = np.frombuffer(body, dtype, T * k, at).reshape(T, k)
        records.append(TeacherRecord(index, ids, top_ids, top_lp))
        pos = end
    return header, records, pos


def _check_header(header, path: Path) -> None:
    """The fields the records are read by: top_k (an integer >= 1) and dtype (float16 or float32)."""
    if not isinstance(header, dict):
        raise TeacherFileError(f"{path}: damaged header (a JSON {type(header).__name__}, not an object)")
    k = header.get("top_k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TeacherFileError(f"{path}: damaged header (top_k {k!r} is not an integer >= 1)")
    if header.get("dtype") not in DTYPES:
        raise TeacherFileError(f"{path}: damaged header (dtype {header.get('dtype')!r} is not one of "
                               f"{', '.join(DTYPES)})")


def read_teacher(path: "str | Path") -> tuple[dict, list[TeacherRecord]]:
    """The settings and the complete records of a teacher file."""
    path = Path(path)
    if not path.is_file():
        raise TeacherFileError(f"{path}: no such teacher file")
    header, records, _ = _scan(path)
    if header is None:
        raise TeacherFileError(f"{path}: the header is incomplete")
    return header, records


def iter_teacher(path: "str | Path") -> Iterator[TeacherRecord]:
    yield from read_teacher(path)[1]
