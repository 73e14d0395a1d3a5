"""Damaged or hostile PyTorch .pth and safetensors checkpoints: each fails with a WeightsError naming the file,
quickly and without allocating what the file claims (issue 12). Every bad file is built here from a small
valid checkpoint written by llama_ref.weights.writers, then patched byte by byte or rewritten raw.

The fuzz tests at the end mutate valid checkpoints at random and check what can honestly be promised: a
LlamaRefError or a model, never another exception, always in bounded time and memory; identical logits
where only bytes that cannot change a value were hit; an error where a checksum or a size check must fire.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import tempfile
import time
import tracemalloc
import zipfile
import zlib
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llama_ref
from llama_ref.weights import torch_zip, writers
from llama_ref.weights.common import WeightsError
from llama_ref.weights.hf import load_hf
from llama_ref.weights.meta import load_meta
from llama_ref.weights.safetensors_file import SafeTensor
from llama_ref.weights.torch_zip import TorchTensor, read_torch_file

from tiny import random_weights, tiny_args

DATA = Path(__file__).parent / "data" / "tiny_ckpt"
TOKENS = [1, 5, 9, 2]
MEMORY_BOUND = 64 * 2 ** 20  # bytes: the whole tiny model is ~60 KB, so anything near this is an allocation bomb


@contextlib.contextmanager
def cheap(cpu_seconds: float = 5.0, memory: int = 16 * 2 ** 20):
    """The block must allocate at most `memory` bytes at its peak (numpy reports its array allocations to
    tracemalloc) and stop within `cpu_seconds` of this process's CPU time: a guard against a refusal that
    walks what the file claims, counted in CPU time so that other work on a shared machine does not count."""
    tracemalloc.start()
    start = time.process_time()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    used = time.process_time() - start
    assert peak < memory, f"peak {peak} bytes allocated"
    assert used < cpu_seconds, f"took {used:.1f} s of CPU time"


def refused(fn, path: Path, match: "str | None" = None):
    """fn() raises a WeightsError that names the file `path` (and matches `match`), cheaply."""
    with cheap(), pytest.raises(WeightsError, match=match) as e:
        fn()
    assert path.name in str(e.value), str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny model written as a Meta (bf16 .pth) and an HF (bf16 safetensors) checkpoint."""
    root = tmp_path_factory.mktemp("valid")
    args = tiny_args(n_layers=2)
    weights = random_weights(args, seed=1)
    writers.write_meta(root / "meta", args, weights, "bf16")
    writers.write_hf(root / "hf", args, weights, "bf16")
    return root


def copy_of(ckpts: Path, kind: str, dst: Path) -> Path:
    shutil.copytree(ckpts / kind, dst)
    return dst


# ---- building bad files --------------------------------------------------------------------------------------

def split_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a safetensors file."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_raw_safetensors(path: Path, header_text: str, data: bytes) -> None:
    head = header_text.encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def pickle_of_one_tensor(storage_class: str, key: str, numel: int, shape, stride) -> bytes:
    """data.pkl of a state dict {"tok_embeddings.weight": tensor}, written opcode by opcode like torch."""
    pk = writers._PickleWriter()
    pk.empty_ordered_dict()
    pk.out += b"("
    pk.string("tok_embeddings.weight")
    pk.tensor(storage_class, key, numel, shape, stride)
    pk.out += b"u."
    return bytes(pk.out)


def write_raw_pth(path: Path, entries: dict, compression=zipfile.ZIP_STORED, compresslevel=None) -> None:
    """A zip of {entry name: bytes, or an iterable of byte chunks (streamed)}."""
    with zipfile.ZipFile(path, "w", compression=compression, compresslevel=compresslevel) as zf:
        for name, content in entries.items():
            with zf.open(name, "w", force_zip64=True) as f:
                for chunk in ([content] if isinstance(content, bytes) else content):
                    f.write(chunk)


def set_declared_size(path: Path, name: str, size: int) -> None:
    """Make the central directory claim that entry `name` inflates to `size` bytes (zipfile trusts the
    central directory; the local header is left as written)."""
    blob = bytearray(path.read_bytes())
    at = blob.find(b"PK\x01\x02")
    while at >= 0:
        name_len, extra_len, comment_len = struct.unpack("<HHH", blob[at + 28:at + 34])
        if blob[at + 46:at + 46 + name_len].decode() == name:
            blob[at + 24:at + 28] = struct.pack("<I", size)  # the uncompressed size (a small archive: no zip64)
            path.write_bytes(bytes(blob))
            return
        at = blob.find(b"PK\x01\x02", at + 46 + name_len + extra_len + comment_len)
    raise AssertionError(f"{name} not in the central directory")


# ---- PyTorch .pth --------------------------------------------------------------------------------------------

def test_broadcast_tensor_is_not_allocated(tmp_path):
    """A stride-0 tensor: 2 stored bytes claiming 2**40 elements. Refused when the pickle is read."""
    path = tmp_path / "consolidated.00.pth"
    write_raw_pth(path, {
        "c/data.pkl": pickle_of_one_tensor("BFloat16Storage", "0", 1, (2 ** 20, 2 ** 20), (0, 0)),
        "c/data/0": b"\0\0"})
    refused(lambda: read_torch_file(path), path, "more elements than its storage")
    # Within its storage's size a broadcast tensor is fine: 4 elements read from 4 stored ones.
    write_raw_pth(path, {
        "c/data.pkl": pickle_of_one_tensor("FloatStorage", "0", 4, (2, 2), (0, 1)),
        "c/data/0": np.arange(4, dtype="<f4").tobytes()})
    np.testing.assert_array_equal(read_torch_file(path)["tok_embeddings.weight"].read(), [[0, 1], [0, 1]])


@pytest.mark.parametrize("shape, stride, match", [
    ((2 ** 70,), (1,), "impossibly large size"),
    ((0, 2 ** 62), (2 ** 62, 1), "impossibly large size"),  # empty, yet numpy could not even describe it
    ((1, 4), (2 ** 70, 1), "impossibly large stride"),
    ((4,), (-1,), "negative"),
    ((2, 2), (2,), "malformed"),
    ((5,), (1,), "more elements than its storage"),
    ((2, 2), (3, 1), "runs past its storage"),
])
def test_malformed_tensor_geometry(tmp_path, shape, stride, match):
    path = tmp_path / "m.pth"
    write_raw_pth(path, {"c/data.pkl": pickle_of_one_tensor("FloatStorage", "0", 4, shape, stride),
                         "c/data/0": bytes(16)})
    refused(lambda: read_torch_file(path), path, match)


def test_pickle_bomb_declared_size(tmp_path):
    """A deflated data.pkl that inflates to 128 MiB (from a ~0.6 MB file) is refused by its declared size."""
    path = tmp_path / "consolidated.00.pth"
    zeros = bytes(2 ** 20)
    # compresslevel 1 deflates the 128 MiB in a third of the default's CPU time (0.3 s against 0.8 s here)
    write_raw_pth(path, {"c/data.pkl": (zeros for _ in range(128))}, compression=zipfile.ZIP_DEFLATED,
                  compresslevel=1)
    assert path.stat().st_size < 2 ** 20
    refused(lambda: read_torch_file(path), path, "data.pkl says it holds 134217728 bytes")


def test_pickle_bomb_lying_about_its_size(tmp_path, monkeypatch):
    """A bomb with its declared size forged small: what is really inflated is bounded, whatever the archive
    claims (here the bound is lowered to 1 MiB, the claim set just below it, and the entry inflates to 8 MiB)."""
    monkeypatch.setattr(torch_zip, "MAX_PICKLE_BYTES", 2 ** 20)
    path = tmp_path / "consolidated.00.pth"
    write_raw_pth(path, {"c/data.pkl": (bytes(2 ** 20) for _ in range(8))}, compression=zipfile.ZIP_DEFLATED)
    set_declared_size(path, "c/data.pkl", 2 ** 20 - 1)
    refused(lambda: read_torch_file(path), path)


@pytest.mark.parametrize("pickled, match", [
    # BINBYTES declaring 4 GB: CPython's unpickler would allocate the 4 GB before finding 1 byte there.
    (b"\x80\x02B\xff\xff\xff\xffx.", "damaged data.pkl"),
    # A memo index of 2**28: CPython's unpickler would grow its memo table to 2**29 entries (4 GB).
    (b"\x80\x02)r\xff\xff\xff\x0f.", "memo index"),
    # 1 MiB of EMPTY_LIST: each byte a 56-byte list (a 64 MiB pickle of them would be 3.5 GB).
    pytest.param(b"\x80\x02" + b"]" * (2 ** 20 + 1) + b".", "opcodes", marks=pytest.mark.slow),
], ids=["bytes-length", "memo-index", "many-objects"])
def test_pickle_allocation_bombs(tmp_path, pickled, match, monkeypatch):
    def never(*_):
        raise AssertionError("the pickle was unpickled before its opcodes were checked")

    monkeypatch.setattr(torch_zip._RestrictedUnpickler, "load", never)  # refused by the pre-scan alone
    path = tmp_path / "consolidated.00.pth"
    write_raw_pth(path, {"c/data.pkl": pickled})
    refused(lambda: read_torch_file(path), path, match)


def test_byteorder_bomb(tmp_path):
    path = tmp_path / "consolidated.00.pth"
    write_raw_pth(path, {"c/data.pkl": pickle_of_one_tensor("FloatStorage", "0", 1, (1,), (1,)),
                         "c/byteorder": bytes(2 ** 20), "c/data/0": bytes(4)},  # 1 MiB where 64 bytes are read
                  compression=zipfile.ZIP_DEFLATED)
    refused(lambda: read_torch_file(path), path, "byteorder says it holds")


def test_shapes_are_checked_before_any_tensor_is_read(ckpts, tmp_path, monkeypatch):
    """A tensor that contradicts the config is reported from the headers alone: reading is never reached."""
    def never(*_):
        raise AssertionError("a tensor was read before the shapes were checked")

    for cls in (TorchTensor, SafeTensor):
        monkeypatch.setattr(cls, "read", never)
        monkeypatch.setattr(cls, "view", never)
    for kind, load, config in (("meta", load_meta, "params.json"), ("hf", load_hf, "config.json")):
        d = copy_of(ckpts, kind, tmp_path / kind)
        params = json.loads((d / config).read_text())
        params["multiple_of" if kind == "meta" else "intermediate_size"] = 256  # the file's FFN is 96 wide
        (d / config).write_text(json.dumps(params))
        msg = refused(lambda: load(d), d, r"feed_forward.w1.weight has shape \(96, 32\)")
        assert "shard" not in msg


def test_missing_last_meta_shard_is_named(tmp_path):
    """With consolidated.01.pth of two gone, the numbering has no gap; the shapes tell (all halves)."""
    d = shutil.copytree(DATA / "llama31_bf16_mp2_meta", tmp_path / "mp")
    (d / "consolidated.01.pth").unlink()
    refused(lambda: load_meta(d), d, "a shard seems missing.*1/2 of the config's.*need 2")


def test_meta_shards_that_do_not_fit(tmp_path):
    """Two shards whose pieces of a matrix differ on the axis that is not split: refused before reading."""
    args = tiny_args(n_layers=1)
    w = random_weights(args)
    d = tmp_path / "mp"
    writers.write_meta(d, args, w, "f32")
    shutil.copy(d / "consolidated.00.pth", d / "consolidated.01.pth")
    w["layers.0.attention.wq.weight"] = w["layers.0.attention.wq.weight"][:, :16].copy()
    tensors = [(n, writers.raw_elements(w[n], "f32"), "f32") for n in writers.canonical_items(args, w)]
    writers.write_torch_file(d / "consolidated.01.pth", tensors)
    refused(lambda: load_meta(d), d, "shards of layers.0.attention.wq.weight do not fit together")


# ---- safetensors ---------------------------------------------------------------------------------------------

def hf_with(ckpts, tmp_path, edit) -> Path:
    """A copy of the HF checkpoint whose model.safetensors is rewritten as edit(header, data) -> (text, data)."""
    d = copy_of(ckpts, "hf", tmp_path / "hf")
    header, data = split_safetensors(d / "model.safetensors")
    text, data = edit(header, data)
    write_raw_safetensors(d / "model.safetensors", text, data)
    return d


def test_overlapping_tensors_refused(ckpts, tmp_path):
    """Two norms (same size) pointing at the same bytes: one stored vector read as two tensors."""
    def overlap(header, data):
        a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
        header[b]["data_offsets"] = header[a]["data_offsets"]
        return json.dumps(header), data
    d = hf_with(ckpts, tmp_path, overlap)
    refused(lambda: load_hf(d), d / "model.safetensors", "overlaps")


def test_duplicate_header_key_refused(ckpts, tmp_path):
    """JSON allows a key twice (the last wins); the safetensors library refuses it, and so do we."""
    def duplicate(header, data):
        name = "model.norm.weight"
        entry = json.dumps(header[name])
        text = json.dumps(header)
        return text[:-1] + f', "{name}": {entry}}}', data
    d = hf_with(ckpts, tmp_path, duplicate)
    refused(lambda: load_hf(d), d / "model.safetensors", "'model.norm.weight' appears twice")


@pytest.mark.parametrize("damage, match", [
    ("gap", "a gap"),
    ("trailing", "bytes after the last tensor that no tensor accounts for"),
    ("truncated", "truncated"),
    ("leading-space", "not a JSON object"),
    ("huge-shape", "impossibly large shape"),
    ("empty-huge-shape", "impossibly large shape"),
    ("float-shape", "malformed shape"),
    ("bool-offsets", "data_offsets"),
    ("long-number", "corrupt safetensors header"),
    ("deep-nesting", "corrupt safetensors header"),
    ("entry-not-object", "needs dtype, shape, data_offsets"),
    ("list-dtype", "has dtype"),
])
def test_damaged_safetensors_header(ckpts, tmp_path, damage, match):
    first = "model.embed_tokens.weight"  # the first tensor in the data

    def edit(header, data):
        e = header[first]
        if damage == "gap":  # every later tensor moved 8 bytes on: the first 8 bytes belong to nobody
            for name, entry in header.items():
                if name != "__metadata__":
                    entry["data_offsets"] = [o + 8 for o in entry["data_offsets"]]
            data = bytes(8) + data
        elif damage == "trailing":
            data += bytes(8)
        elif damage == "truncated":
            data = data[:-2]
        elif damage == "leading-space":
            return " " + json.dumps(header), data
        elif damage == "huge-shape":
            e["shape"] = [2 ** 40, 2 ** 40]
        elif damage == "empty-huge-shape":
            e["shape"], e["data_offsets"] = [0, 2 ** 62], [0, 0]
        elif damage == "float-shape":
            e["shape"] = [64.0, 32]
        elif damage == "bool-offsets":
            e["data_offsets"] = [False, e["data_offsets"][1]]
        elif damage == "long-number":
            return json.dumps(header).replace('"shape": [64', '"shape": [' + "9" * 5000, 1), data
        elif damage == "deep-nesting":
            return json.dumps(header)[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}", data
        elif damage == "entry-not-object":
            header[first] = [1, 2]
        elif damage == "list-dtype":
            e["dtype"] = ["BF16"]
        return json.dumps(header), data

    d = hf_with(ckpts, tmp_path, edit)
    refused(lambda: load_hf(d), d / "model.safetensors", match)


def test_index_cannot_point_outside_the_checkpoint(ckpts, tmp_path):
    """model.safetensors.index.json naming an absolute path, or a ../ path, is refused, even where the
    file it names exists and would load."""
    args = tiny_args(n_layers=2)
    d = tmp_path / "sharded"
    writers.write_hf(d, args, random_weights(args, seed=1), "bf16", max_shard_bytes=8 * 1024)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(d / shard, outside / shard)
    load_hf(d)  # as written, it loads
    for target in (str(outside / shard), f"../elsewhere/{shard}", f"./../elsewhere/{shard}"):
        bad = shutil.copytree(d, tmp_path / f"bad{len(list(tmp_path.iterdir()))}")
        weight_map = {k: (target if v == shard else v) for k, v in index["weight_map"].items()}
        (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        refused(lambda: load_hf(bad), bad / "model.safetensors.index.json", "points outside")
    # A weight_map whose values are not file names is an unreadable index, not a traceback.
    (bad / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": ["x"]}}))
    refused(lambda: load_hf(bad), bad / "model.safetensors.index.json", "unreadable index")


# ---- fuzzing ---------------------------------------------------------------------------------------------------

def original_logits(ckpts: Path, kind: str) -> np.ndarray:
    return llama_ref.load(ckpts / kind).forward(TOKENS)


def outcome(path: Path):
    """Load the (mutated) checkpoint: its logits, or the LlamaRefError it raised; any other exception
    propagates (a failure). Bounded in time by the hypothesis deadline and in memory here."""
    tracemalloc.start()
    try:
        with np.errstate(all="ignore"):  # damaged weights may overflow: legitimate, and not the question
            return llama_ref.load(path).forward(TOKENS)
    except llama_ref.LlamaRefError as e:
        return e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < MEMORY_BOUND, f"peak {peak} bytes allocated"


@st.composite
def mutations(draw, size: int, region: tuple[int, int], single_byte: bool):
    """(kind, position, value): a bit flip or byte overwrite in `region`, a run of random bytes
    (unless single_byte), or a truncation of the file to a shorter length."""
    kind = draw(st.sampled_from(["flip", "byte", "truncate"] + ([] if single_byte else ["run"])))
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1)), None
    at = draw(st.integers(*region))
    if kind == "flip":
        return kind, at, 1 << draw(st.integers(0, 7))
    if kind == "byte":
        return kind, at, draw(st.integers(0, 255))
    return kind, at, draw(st.binary(min_size=1, max_size=64))


def mutate(blob: bytes, mutation) -> bytes:
    kind, at, value = mutation
    out = bytearray(blob)
    if kind == "truncate":
        return bytes(out[:at])
    if kind == "flip":
        out[at] ^= value
    elif kind == "byte":
        out[at] = value
    else:
        out[at:at + len(value)] = value
        del out[len(blob):]
    return bytes(out)


FUZZ = settings(max_examples=500, deadline=timedelta(seconds=2),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def fuzz_once(ckpts: Path, kind: str, filename: str, mutation, fix=None):
    with tempfile.TemporaryDirectory() as tmp:
        d = shutil.copytree(ckpts / kind, Path(tmp) / kind)
        blob = mutate((d / filename).read_bytes(), mutation)
        (d / filename).write_bytes(fix(blob) if fix else blob)
        return outcome(d)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzz_safetensors(ckpts, data):
    """Single-byte damage to the header (its 8-byte length and JSON) gives an error or the very same
    logits: the exact-coverage and duplicate-key checks leave no one-byte change that reads other values.
    Damage to the tensor data gives any logits (NaN included: a weight can be any bit pattern) or an
    error, never a crash. Truncation always fails: the data must end exactly at the end of the file."""
    path = ckpts / "hf" / "model.safetensors"
    blob = path.read_bytes()
    header_end = 8 + int.from_bytes(blob[:8], "little")
    in_header = data.draw(st.booleans(), label="in header")
    region = (0, header_end - 1) if in_header else (header_end, len(blob) - 1)
    mutation = data.draw(mutations(len(blob), region, single_byte=in_header), label="mutation")
    got = fuzz_once(ckpts, "hf", "model.safetensors", mutation)
    if mutation[0] == "truncate":
        assert isinstance(got, WeightsError)
    elif in_header and not isinstance(got, llama_ref.LlamaRefError):
        np.testing.assert_array_equal(got, original_logits(ckpts, "hf"))
    if not isinstance(got, llama_ref.LlamaRefError):
        assert got.shape == (len(TOKENS), 64)


def pickle_span(blob: bytes) -> tuple[int, int, int, int]:
    """(data start, data end, local header offset, central directory record offset) of data.pkl, which the
    writer puts first in the archive (so its record is the first of the central directory too)."""
    zf = zipfile.ZipFile(io.BytesIO(blob))
    info = zf.infolist()[0]
    assert info.filename == "consolidated/data.pkl" and info.header_offset == 0
    name_len, extra_len = struct.unpack("<HH", blob[26:30])
    start = 30 + name_len + extra_len
    return start, start + info.compress_size, 0, zf.start_dir


def fix_pickle_crc(blob: bytes) -> bytes:
    """Rewrite data.pkl's CRC-32 (local header and central directory) to match its (mutated) bytes, so that
    the mutation reaches the unpickler instead of stopping at the zip's checksum."""
    start, end, local, central = pickle_span(blob)
    crc = struct.pack("<I", zlib.crc32(blob[start:end]))
    out = bytearray(blob)
    out[local + 14:local + 18] = crc
    out[central + 16:central + 20] = crc
    return bytes(out)


@pytest.mark.slow
@FUZZ
@given(data=st.data())
def test_fuzz_meta_pth(ckpts, data):
    """Damage anywhere in a Meta .pth gives an error or a model, never a crash, in bounded time and memory.
    Damage inside data.pkl is caught by the zip's CRC-32 (an error, always); with the CRC rewritten to match,
    the mutated pickle reaches the restricted unpickler and the shape checks: an error or a model (a changed
    stride or storage key can legitimately describe other values of the same shape)."""
    path = ckpts / "meta" / "consolidated.00.pth"
    blob = path.read_bytes()
    start, end, _, _ = pickle_span(blob)
    where = data.draw(st.sampled_from(["pickle", "pickle, CRC fixed", "anywhere"]), label="where")
    region = (start, end - 1) if where.startswith("pickle") else (0, len(blob) - 1)
    mutation = data.draw(mutations(len(blob), region, single_byte=False), label="mutation")
    if where == "pickle, CRC fixed" and mutation[0] == "truncate":
        where = "anywhere"
    got = fuzz_once(ckpts, "meta", "consolidated.00.pth", mutation,
                    fix=fix_pickle_crc if where == "pickle, CRC fixed" else None)
    changed = mutate(blob, mutation) != blob
    if mutation[0] == "truncate" or (where == "pickle" and changed):
        assert isinstance(got, WeightsError), got
    if not isinstance(got, llama_ref.LlamaRefError):
        assert got.shape == (len(TOKENS), 64)
