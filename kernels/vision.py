"""The vision encoder's GELU and unmasked attention, in Numba and BLAS. Their NumPy twins are
llama_ref.vision.encoder.gelu and bidirectional_attention (same signatures).

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
from .expf import exp_shifted

PARALLEL_MIN = 1 << 15  # elements from which the loop runs on all cores


@njit(inline="always", **JIT)
def _gelu(x, out):
    """x, out (N,) float32: x * Phi(x) with the exact normal CDF, in float64, rounded once."""
    for i in prange(x.shape[0]):
        v = np.float64(x[i])
        out[i] = np.float32(v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))))


# Two functions, not _gelu compiled twice: Numba's on-disk cache keys a kernel by function and signature, not by
# parallel=True, so the two compilations would share one cache entry (kernels/elementwise.py).
@njit(**JIT)
def _gelu_serial(x, out):
    _gelu(x, out)  # prange is range here


@njit(parallel=True, **JIT)
def _gelu_parallel(x, out):
    _gelu(x, out)


def gelu(x: np.ndarray) -> np.ndarray:
    """Same contract as llama_ref.vision.encoder.gelu."""
    if x.dtype != np.float32:
        return encoder.gelu(x)
    flat = np.ascontiguousarray(x).reshape(-1)  # (N,)
    out = np.empty_like(flat)
    (_gelu_parallel if flat.size >= PARALLEL_MIN else _gelu_serial)(flat, out)
    return out.reshape(x.shape)


# ---- attention without a causal mask (the encoder's 4 x 1608 tokens see each other) ------------------------
QUERY_BLOCK = 512  # queries per BLAS product: the causal kernel's 64 left its matrix products memory-bound
SCORES_BUDGET = 1 << 24  # ... and fewer when H x block x S scores would exceed 16M floats (64 MiB)


@njit(parallel=True, **JIT)
def _softmax_rows(scores, root):
    """Each row of scores (R, S), in place: softmax of scores / root, shifted by the row maximum; a row
    whose keys are all hidden (-inf) becomes zeros, as in the reference."""
    R, S = scores.shape
    for r in prange(R):
        top = np.float32(-np.inf)
        for s in range(S):
            scores[r, s] /= root
            top = max(top, scores[r, s])
        if top == -np.inf:
            for s in range(S):
                scores[r, s] = 0
            continue
        exp_shifted(scores[r], S, top)
        total = np.float32(0)
        for s in range(S):
            total += scores[r, s]
        for s in range(S):
            scores[r, s] /= total


def bidirectional_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray,
                            key_mask: "np.ndarray | None" = None) -> np.ndarray:
    """Same contract as llama_ref.vision.encoder.bidirectional_attention: every query sees every key that
    key_mask does not hide. Each KV head's keys are made contiguous once; blocks of queries then go through
    two BLAS products with a softmax between."""
    if q.dtype != np.float32 or k.dtype != np.float32 or v.dtype != np.float32:
        return encoder.bidirectional_attention(q, k, v, key_mask)
    B, T, H, HD = q.shape
    S, KVH = k.shape[1], k.shape[2]
    G = H // KVH
    root = np.float32(np.sqrt(HD))
    block = max(1, min(QUERY_BLOCK, SCORES_BUDGET // (H * S)))
    out = np.empty(q.shape, np.float32)  # (B, T, H, HD)
    for b in range(B):
        keys = np.ascontiguousarray(k[b].transpose(1, 2, 0))  # (KVH, HD, S)
        values = np.ascontiguousarray(v[b].transpose(1, 0, 2))  # (KVH, S, HD)
        hidden = None if key_mask is None or key_mask[b].all() else ~key_mask[b]
        for t0 in range(0, T, block):
            n = min(T, t0 + block) - t0
            rows = np.ascontiguousarray(q[b, t0:t0 + n].transpose(1, 0, 2)).reshape(KVH, G * n, HD)
            scores = np.matmul(rows, keys)  # (KVH, G*n, S)
            if hidden is not None:
                scores[..., hidden] = -np.inf
            _softmax_rows(scores.reshape(KVH * G * n, S), root)
            heads = np.matmul(scores, values)  # (KVH, G*n, HD)
            out[b, t0:t0 + n] = heads.reshape(H, n, HD).transpose(1, 0, 2)  # (n, H, HD)
    return out
