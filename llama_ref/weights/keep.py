"""How a tensor read from a checkpoint is kept in memory: in its stored precision, or as float32.

"stored" keeps bfloat16 and float16 as 16-bit packed weights (llama_ref.weights.packed BF16Weight / F16Weight)
and float32 as is; the model widens one matrix at a time when it multiplies. "float32" widens everything at load
time. Norm weights are tiny and read by rms_norm directly, so they are always float32.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .bf16 import bf16_bits_to_float32
from .common import WeightsError

KEEP_MODES = ("stored", "float32")


def check_keep(keep: str) -> str:
    if keep not in KEEP_MODES:
        raise WeightsError(f"weights must be one of {', '.join(KEEP_MODES)}, got {keep!r}")
    return keep


def to_float32(raw: np.ndarray, dtype_name: str) -> np.ndarray:
    """Raw elements (bf16 as uint16 bits) -> float32."""
    if dtype_name == "bfloat16":
        return bf16_bits_to_float32(raw)
    return raw.astype(np.float32, copy=False)


def finish(raw: np.ndarray, dtype_name: str, keep: str, name: str):
    """Wrap raw elements as the object the model keeps for tensor `name`."""
    if keep == "float32" or name.endswith("norm.weight"):
        return np.ascontiguousarray(to_float32(raw, dtype_name))
    from .packed import BF16Weight, F16Weight

    if dtype_name == "bfloat16":
        return BF16Weight(raw, raw.shape)
    if dtype_name == "float16":
        return F16Weight(raw.view(np.uint16), raw.shape)
    return raw


def keep_tensor(tensor, keep: str, name: str, transform: Optional[Callable] = None, mmap: bool = False):
    """One lazy tensor (TorchTensor / SafeTensor) -> the kept weight.

    The tensor is read once (pread, no map) into memory the process owns, and changed in place of that
    copy. With mmap and nothing to change (stored precision, no transform) it stays a read-only memory map
    of the file instead: loading costs no copy, but the model then reads its weights from the page cache,
    which made decode ~20% slower here (see llama_ref.load).
    """
    if mmap and transform is None and keep == "stored" and not name.endswith("norm.weight"):
        raw = tensor.view()
        if raw.flags.c_contiguous:
            return finish(raw, tensor.dtype_name, keep, name)
    raw = tensor.read()
    if transform is not None:
        raw = transform(raw)
    return finish(raw, tensor.dtype_name, keep, name)


def merge_raw(pieces: list[np.ndarray], axis: Optional[int], where: str, name: str) -> np.ndarray:
    """Join model-parallel pieces of one tensor along `axis`; None means replicated (all equal)."""
    if axis is None:
        for other in pieces[1:]:
            if other.shape != pieces[0].shape or not np.array_equal(other, pieces[0]):
                raise WeightsError(f"{where}: replicated tensor {name} differs between shards")
        return pieces[0]
    try:
        return np.concatenate(pieces, axis=axis)
    except ValueError as e:
        raise WeightsError(f"{where}: shards of {name} do not fit together ({e})") from None
