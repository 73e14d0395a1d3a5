"""The vision encoder's GELU, in Numba. Its NumPy twin is llama_ref.vision.encoder.gelu (same signature).

NumPy has no erf, so the reference calls the C library's erf once per element from Python: for the 11B
encoder that is 33M calls per layer, seconds each. This loop calls the same erf (Numba's math.erf is libm's)
in float64 on all cores, so it computes the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from llama_ref.vision import encoder

from ._common import JIT

PARALLEL_MIN = 1 << 15  # elements from which the loop runs on all cores


def _gelu(x, out):
    """x, out (N,) float32: x * Phi(x) with the exact normal CDF, in float64, rounded once."""
    for i in prange(x.shape[0]):
        v = np.float64(x[i])
        out[i] = np.float32(v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))))


_gelu_serial = njit(**JIT)(_gelu)
_gelu_parallel = njit(parallel=True, **JIT)(_gelu)


def gelu(x: np.ndarray) -> np.ndarray:
    """Same contract as llama_ref.vision.encoder.gelu."""
    if x.dtype != np.float32:
        return encoder.gelu(x)
    flat = np.ascontiguousarray(x).reshape(-1)  # (N,)
    out = np.empty_like(flat)
    (_gelu_parallel if flat.size >= PARALLEL_MIN else _gelu_serial)(flat, out)
    return out.reshape(x.shape)
