"""RMSNorm, RoPE and SwiGLU: one pass over their input each, in float32.

RMSNorm and RoPE are compiled twice from one source: serial for the few rows of a decode step (starting
threads would cost more than the work) and parallel over rows for prefill chunks. Each twin is a function of its
own that inlines the shared body: Numba's on-disk cache keys a kernel by its Python function and signature, not
by parallel=True, so one function compiled both ways shared one cache entry, and whichever was compiled first
was loaded for both (the serial twin could start a parallel region).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llama_ref.model import ops
from llama_ref.runtime import threads

from ._common import JIT, as_f32_rows, readonly
from .expf import expf

PARALLEL_MIN = 1 << 15  # elements from which a kernel runs on all cores
SWIGLU_STEP = 1 << 18  # elements a work item of a prefill's SwiGLU (runtime.threads' pool, as the products)


@njit(fastmath={"reassoc"}, **JIT)
def _sum_of_squares(x, n):
    """sum of x[n]^2 in float64, as exact as NumPy's pairwise float32 sum whatever the order; "reassoc"
    (this function only) lets LLVM split it over SIMD lanes instead of one add after another."""
    ss = 0.0
    for d in range(x.shape[1]):
        ss += np.float64(x[n, d]) * np.float64(x[n, d])
    return ss


@njit(inline="always", **JIT)
def _rms_norm(x, weight, eps, out):
    """x, out (N, D); weight (D,) float32. out = x / sqrt(mean(x^2) + eps) * weight, row by row."""
    N, D = x.shape
    for n in prange(N):
        ms = np.float32(_sum_of_squares(x, n) / D)
        r = np.sqrt(ms + eps)  # float32, the same rounding as the reference
        for d in range(D):
            out[n, d] = (x[n, d] / r) * weight[d]


@njit(inline="always", **JIT)
def _rope(x, cos, sin, out):
    """x, out (B, T, n, HD); cos, sin (T, HD/2). Rotates each adjacent pair (x[2i], x[2i+1])."""
    B, T, NH, HD = x.shape
    for bt in prange(B * T):
        b, t = bt // T, bt % T
        for h in range(NH):
            for i in range(HD // 2):
                e, o = x[b, t, h, 2 * i], x[b, t, h, 2 * i + 1]
                c, s = cos[t, i], sin[t, i]
                out[b, t, h, 2 * i] = e * c - o * s
                out[b, t, h, 2 * i + 1] = e * s + o * c


@njit(**JIT)
def _swiglu(gate, up, out):
    """gate, up, out (N,) flat float32. out = gate / (1 + exp(-gate)) * up.

    One serial loop, vectorized whole (expf is arithmetic only), 0.7-1.4 ns an element: a decode step's
    gate takes microseconds. A prefill's (512 x 8192: 6-7 ms) is cut into SWIGLU_STEP pieces shared by the
    pool's threads (swiglu): 4.4 ms on two (a Numba parallel region had measured slower, its threads
    fighting the pool's).
    """
    for i in range(gate.shape[0]):
        g = gate[i]
        out[i] = g / (np.float32(1) + expf(-g)) * up[i]  # exp(-g) = inf for g << 0 gives -0, as NumPy


@njit(**JIT)
def _rms_norm_serial(x, weight, eps, out):
    _rms_norm(x, weight, eps, out)  # prange is range here


@njit(parallel=True, **JIT)
def _rms_norm_parallel(x, weight, eps, out):
    _rms_norm(x, weight, eps, out)


@njit(**JIT)
def _rope_serial(x, cos, sin, out):
    _rope(x, cos, sin, out)


@njit(parallel=True, **JIT)
def _rope_parallel(x, cos, sin, out):
    _rope(x, cos, sin, out)


def rms_norm(x: np.ndarray, weight, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis. x (..., D), weight (D,)."""
    if x.dtype != np.float32:
        return ops.rms_norm(x, weight, eps)
    x2 = as_f32_rows(x)  # (N, D)
    w = readonly(np.asarray(weight, dtype=np.float32))
    out = np.empty_like(x2)
    kernel = _rms_norm_parallel if x2.size >= PARALLEL_MIN else _rms_norm_serial
    kernel(x2, w, np.float32(eps), out)
    return out.reshape(x.shape)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each adjacent pair of every head by its angle. x (B, T, n, HD); cos, sin (T, HD/2)."""
    if x.dtype != np.float32 or cos.dtype != np.float32:
        return ops.apply_rope(x, cos, sin)
    x = np.ascontiguousarray(x)
    out = np.empty_like(x)
    kernel = _rope_parallel if x.size >= PARALLEL_MIN else _rope_serial
    kernel(x, np.ascontiguousarray(cos), np.ascontiguousarray(sin), out)
    return out


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, the gated activation of Llama's feed-forward. Shapes (..., F)."""
    if gate.dtype != np.float32 or up.dtype != np.float32:
        return ops.swiglu(gate, up)
    g = np.ascontiguousarray(gate).reshape(-1)  # (N*F,)
    u = np.ascontiguousarray(up).reshape(-1)  # (N*F,)
    out = np.empty_like(g)
    if g.size >= 2 * SWIGLU_STEP:
        threads.each_block(g.size, SWIGLU_STEP, lambda i0, i1: _swiglu(g[i0:i1], u[i0:i1], out[i0:i1]),
                           threads.count())
    else:
        _swiglu(g, u, out)
    return out.reshape(gate.shape)
