"""safetensors files read without any framework: a JSON header, then raw little-endian tensor bytes.

Layout: 8 bytes (u64 little-endian) header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data; offsets are relative to the end of the header. The header is checked against the file size
before any tensor is touched, so a damaged file fails with a message naming it.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import WeightsError, checked_shape, pread_into

# safetensors dtype -> (numpy dtype of the raw elements, dtype name); bf16 kept as uint16 bits.
SAFETENSORS_DTYPES = {
    "BF16": (np.dtype("<u2"), "bfloat16"),
    "F16": (np.dtype("<f2"), "float16"),
    "F32": (np.dtype("<f4"), "float32"),
}
DTYPE_TO_SAFETENSORS = {name: code for code, (_, name) in SAFETENSORS_DTYPES.items()}
# Every dtype a reference file of activations may hold (llama_ref.tools.verify reads those with this reader too).
REFERENCE_DTYPES = dict(SAFETENSORS_DTYPES, **{
    code: (np.dtype(t), np.dtype(t).name) for code, t in (
        ("F64", "<f8"), ("I64", "<i8"), ("I32", "<i4"), ("I16", "<i2"), ("I8", "i1"), ("U8", "u1"),
        ("BOOL", "?"))})
MAX_HEADER = 100_000_000  # the reference implementation's own limit (safetensors/src/tensor.rs)


@dataclass(frozen=True)
class SafeTensor:
    """One tensor of a safetensors file, not yet read."""
    path: Path
    name: str
    dtype: np.dtype
    dtype_name: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self) -> np.ndarray:
        """An owned copy (read with pread: no file pages stay mapped)."""
        out = np.empty(self.shape, dtype=self.dtype)
        pread_into(self.path, self.offset, out)
        return out

    def view(self) -> np.ndarray:
        """A read-only memory map of the tensor; costs no memory until its pages are used."""
        if self.numel == 0:
            return np.empty(self.shape, dtype=self.dtype)
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def _refuse_duplicates(pairs: list) -> dict:
    """json object_pairs_hook: a key given twice is refused (json would silently keep the last one), as the
    safetensors library does; otherwise two entries could name the same tensor and disagree."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise WeightsError(f"key {key!r} appears twice")
        obj[key] = value
    return obj


def read_safetensors_header(path: "str | Path", dtypes: dict = SAFETENSORS_DTYPES
                            ) -> tuple[dict[str, SafeTensor], dict]:
    """Every tensor of a safetensors file (lazy) and its __metadata__ dict; dtypes: the dtype codes accepted.

    Checked as the safetensors library checks (safetensors/src/tensor.rs, read_metadata and validate):
    the header is UTF-8 JSON starting with '{' and no key given twice; each tensor's offsets span exactly
    its shape x dtype; and the tensors, in offset order, sit end to end from the start of the data region
    to the end of the file, so none overlaps another and no byte is unaccounted for.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: truncated: no safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise WeightsError(f"{path}: corrupt safetensors header (says {n} bytes, file has {size})")
        raw = f.read(n)
    try:
        text = raw.decode("utf-8")
        if not text.startswith("{"):
            raise WeightsError("not a JSON object")
        header = json.loads(text, object_pairs_hook=_refuse_duplicates)
    except (ValueError, RecursionError) as e:
        # ValueError: not UTF-8, not JSON, a number of more digits than int() takes, or our own refusal
        # (WeightsError is one); RecursionError: JSON nested deeper than the parser goes.
        raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    entries = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise WeightsError(f"{path}: corrupt safetensors header entry {name!r} (needs dtype, shape, "
                               f"data_offsets)")
        code, offsets = entry["dtype"], entry["data_offsets"]
        if not isinstance(code, str) or code not in dtypes:
            raise WeightsError(f"{path}: tensor {name} has dtype {code}, which is not supported "
                               f"({', '.join(dtypes)})")
        dtype, dtype_name = dtypes[code]
        shape = checked_shape(entry["shape"], str(path), name)
        nbytes = math.prod(shape) * dtype.itemsize
        if (not isinstance(offsets, list) or len(offsets) != 2 or any(type(o) is not int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] or offsets[1] - offsets[0] != nbytes):
            raise WeightsError(f"{path}: corrupt safetensors header: tensor {name} of shape {shape} "
                               f"{code} needs {nbytes} bytes, data_offsets are {offsets}")
        begin, end = offsets
        entries.append((begin, end, name, SafeTensor(path, name, dtype, dtype_name, shape, 8 + n + begin)))
    # In offset order each tensor must start where the previous one ended, and the last end at the end of
    # the file: this refuses overlapping tensors (one byte read as two tensors) and gaps or trailing bytes.
    at = 0
    for begin, end, name, _ in sorted(entries, key=lambda e: e[:2]):
        if begin != at:
            raise WeightsError(f"{path}: corrupt safetensors header: tensor {name} starts at data byte {begin}, "
                               f"expected {at} ({'overlaps the previous tensor' if begin < at else 'a gap'})")
        at = end
    if 8 + n + at > size:
        raise WeightsError(f"{path}: truncated: the header describes {8 + n + at} bytes, the file has {size}")
    if 8 + n + at < size:
        raise WeightsError(f"{path}: corrupt safetensors file: {size - 8 - n - at} bytes after the last tensor "
                           f"that no tensor accounts for")
    return {name: t for _, _, name, t in entries}, metadata
