"""safetensors files read without any framework: a JSON header, then raw little-endian tensor bytes.

Layout: 8 bytes (u64 little-endian) header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data; offsets are relative to the end of the header. The header is checked against the file size
before any tensor is touched, so a damaged file fails with a message naming it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import WeightsError, pread_into

# safetensors dtype -> (numpy dtype of the raw elements, dtype name); bf16 kept as uint16 bits.
SAFETENSORS_DTYPES = {
    "BF16": (np.dtype("<u2"), "bfloat16"),
    "F16": (np.dtype("<f2"), "float16"),
    "F32": (np.dtype("<f4"), "float32"),
}
DTYPE_TO_SAFETENSORS = {name: code for code, (_, name) in SAFETENSORS_DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own limit


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
        return int(np.prod(self.shape, dtype=np.int64))

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


def read_safetensors_header(path: "str | Path") -> tuple[dict[str, SafeTensor], dict]:
    """Every tensor of a safetensors file (lazy) and its __metadata__ dict."""
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
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start, data_size = 8 + n, size - 8 - n
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
            begin, end = int(begin), int(end)
        except (TypeError, KeyError, ValueError) as e:
            raise WeightsError(f"{path}: corrupt safetensors header entry {name!r} ({e})") from None
        if code not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor {name} has dtype {code}, which is not supported "
                               f"({', '.join(SAFETENSORS_DTYPES)})")
        dtype, dtype_name = SAFETENSORS_DTYPES[code]
        if any(s < 0 for s in shape):
            raise WeightsError(f"{path}: tensor {name} has a negative dimension {shape}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise WeightsError(f"{path}: corrupt safetensors header: tensor {name} of shape {shape} "
                               f"{code} needs {nbytes} bytes, offsets give {end - begin}")
        if end > data_size:
            raise WeightsError(f"{path}: truncated: tensor {name} runs past the end of the file")
        tensors[name] = SafeTensor(path, name, dtype, dtype_name, shape, data_start + begin)
    return tensors, metadata
