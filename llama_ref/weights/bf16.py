"""bfloat16 <-> float32 bit conversions (NumPy has no bfloat16 type).

A bfloat16 number is the top 16 bits of a float32, so the raw bits live in a uint16 array and widening is a
shift: float32 bits = bf16 bits << 16, exact. Narrowing rounds to nearest even like torch does. The kept
16-bit weight objects themselves are llama_ref.weights.packed.BF16Weight / F16Weight.
"""

from __future__ import annotations

import numpy as np


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bits (any shape) -> float32 array of the same shape, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even (as torch's .to(torch.bfloat16) does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    # Add 0x7FFF plus the lowest kept bit, then truncate: round half to even on the dropped 16 bits.
    rounded = (u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16
    # NaN must stay NaN (rounding could carry a NaN's payload into the exponent and make it inf).
    nan = np.isnan(x)
    out = rounded.astype(np.uint16)
    if nan.any():
        out[nan] = 0x7FC0
    return out
