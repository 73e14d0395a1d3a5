"""Numba twin of llama_ref.model.ggml: the integer block dot products of arithmetic="ggml", compiled.

The NumPy module is the specification; this one computes the same numbers bit for bit (tests/
test_ggml_arithmetic.py): the activations are quantized by the specification's own quantize_row_q8_0 /
q8_1 (O(K) per row, against O(R K) for the product), and the kernels below take the integer sums of each
block, exact in int32 whatever order LLVM adds them in, then scale and add them in ggml's float order with
the same float64 operations as the NumPy fma(). No fast-math: LLVM may not reorder or fuse float operations.

Only linear() is compiled; the other functions of the backend are the specification's (one token's
attention, norms and RoPE cost little beside the matrix products).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llama_ref.model import ggml as spec
from llama_ref.model.ggml import (apply_rope, attention, embedding, rms_norm, rope_frequencies,  # noqa: F401
                                  rope_tables, swiglu)

from ._common import JIT, readonly

ROWS = 16  # weight rows per parallel work item


@njit(inline="always", **JIT)
def _fma(a, b, c):
    """float32 a * b + c rounded once, as llama_ref.model.ggml.fma computes it (through float64)."""
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


@njit(inline="always", **JIT)
def _hsum8(acc):
    """hsum_float_8: (lane i + lane i+4), then (0 + 2) + (1 + 3)."""
    r0 = acc[0] + acc[4]
    r1 = acc[1] + acc[5]
    r2 = acc[2] + acc[6]
    r3 = acc[3] + acc[7]
    return (r0 + r2) + (r1 + r3)


@njit(inline="always", **JIT)
def _lanes_f32(lanes, scale, nb):
    """The float part of an 8-lane dot product: lanes (nb * 8,) int32 partial sums, scale (nb,) float32;
    acc[l] = fma(scale[b], lanes[8b + l], acc[l]) block after block, then hsum_float_8. Eight scalars
    (not an array) keep the accumulators in registers."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = np.float32(0)
    for b in range(nb):
        sc = scale[b]
        i = 8 * b
        a0 = _fma(sc, np.float32(lanes[i]), a0)
        a1 = _fma(sc, np.float32(lanes[i + 1]), a1)
        a2 = _fma(sc, np.float32(lanes[i + 2]), a2)
        a3 = _fma(sc, np.float32(lanes[i + 3]), a3)
        a4 = _fma(sc, np.float32(lanes[i + 4]), a4)
        a5 = _fma(sc, np.float32(lanes[i + 5]), a5)
        a6 = _fma(sc, np.float32(lanes[i + 6]), a6)
        a7 = _fma(sc, np.float32(lanes[i + 7]), a7)
    return ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7))


@njit(parallel=True, **JIT)
def _dot_q8_0(xq, xd, qs, d, out):
    """ggml_vec_dot_q8_0_q8_0: xq (N, K) int8, xd (N, nb) float32; qs (R, K) uint8 holding int8 quants,
    d (R, nb) float32. out (N, R): 8 lanes of 4 products per block, fma into each lane, hsum_float_8.

    The products of a row go through a small int32 buffer first (one loop over K that LLVM vectorizes),
    then each lane's four are added: integer sums, exact in any order."""
    N, K = xq.shape
    R, nb = d.shape
    for c in prange((R + ROWS - 1) // ROWS):
        prod = np.empty(K, np.int32)
        lanes = np.empty(K // 4, np.int32)
        scale = np.empty(nb, np.float32)
        for r in range(c * ROWS, min(R, (c + 1) * ROWS)):
            w = qs[r].view(np.int8)
            for n in range(N):
                x = xq[n]
                for k in range(K):
                    prod[k] = np.int32(w[k]) * np.int32(x[k])
                for i in range(K // 4):
                    lanes[i] = (prod[4 * i] + prod[4 * i + 1]) + (prod[4 * i + 2] + prod[4 * i + 3])
                for b in range(nb):
                    scale[b] = d[r, b] * xd[n, b]  # float32 product
                out[n, r] = _lanes_f32(lanes, scale, nb)


@njit(parallel=True, **JIT)
def _dot_q5_1(xq, xd, xs, qs, d, m, out):
    """ggml_vec_dot_q5_1_q8_1: qs (R, K) one byte per value q (0..31), d, m (R, nb); xs (N, nb) the Q8_1
    sums. The 8 lanes of _dot_q8_0, plus sum_b fma(m_w, s_x) kept apart and added last."""
    N, K = xq.shape
    R, nb = d.shape
    for c in prange((R + ROWS - 1) // ROWS):
        prod = np.empty(K, np.int32)
        lanes = np.empty(K // 4, np.int32)
        scale = np.empty(nb, np.float32)
        for r in range(c * ROWS, min(R, (c + 1) * ROWS)):
            w = qs[r]
            for n in range(N):
                x = xq[n]
                for k in range(K):
                    prod[k] = np.int32(w[k]) * np.int32(x[k])
                for i in range(K // 4):
                    lanes[i] = (prod[4 * i] + prod[4 * i + 1]) + (prod[4 * i + 2] + prod[4 * i + 3])
                summs = np.float32(0)
                for b in range(nb):
                    scale[b] = d[r, b] * xd[n, b]
                    summs = _fma(m[r, b], xs[n, b], summs)
                out[n, r] = _lanes_f32(lanes, scale, nb) + summs


@njit(parallel=True, **JIT)
def _dot_q4_0(xq, xd, qs, d, out):
    """ggml_gemv_q4_0_8x8_q8_0: qs (R, K/2) bytes, block b's value j in the low nibble of byte 16b + j and
    value j + 16 in its high nibble, minus 8. One integer per block, fma(d_w d_x, sumi, acc).

    sumi = sum_j lo_j x_j + hi_j x_(j+16) - 8 sum(x): the activations are regrouped once per call into the
    nibbles' order (xlo, xhi), so the loop over a weight row's bytes is one flat, vectorizable loop."""
    N, K = xq.shape
    R, nb = d.shape
    half = K // 2
    xlo = np.empty((N, half), np.int32)
    xhi = np.empty((N, half), np.int32)
    xsum = np.zeros((N, nb), np.int32)
    for n in range(N):
        for b in range(nb):
            for j in range(16):
                lo, hi = np.int32(xq[n, b * 32 + j]), np.int32(xq[n, b * 32 + 16 + j])
                xlo[n, b * 16 + j], xhi[n, b * 16 + j] = lo, hi
                xsum[n, b] += lo + hi
    for c in prange((R + ROWS - 1) // ROWS):
        prod = np.empty(half, np.int32)
        for r in range(c * ROWS, min(R, (c + 1) * ROWS)):
            w = qs[r]
            for n in range(N):
                for i in range(half):
                    byte = np.int32(w[i])
                    prod[i] = (byte & 15) * xlo[n, i] + (byte >> 4) * xhi[n, i]
                acc = np.float32(0)
                for b in range(nb):
                    s = np.int32(-8) * xsum[n, b]
                    for j in range(16):
                        s += prod[b * 16 + j]
                    acc = _fma(d[r, b] * xd[n, b], np.float32(s), acc)
                out[n, r] = acc


@njit(parallel=True, **JIT)
def _dot_q4_lanes(xq, xd, xs, qs, d, m, has_min, out):
    """ggml_vec_dot_q4_1_q8_1 (has_min: + sum_b m_w s_x, summed apart and added last) and
    ggml_vec_dot_q4_0_q8_0 (values - 8): 8 lanes of 4 products per block, as _dot_q8_0."""
    N, K = xq.shape
    R, nb = d.shape
    off = np.int32(0) if has_min else np.int32(8)
    for c in prange((R + ROWS - 1) // ROWS):
        acc = np.empty(8, np.float32)
        for r in range(c * ROWS, min(R, (c + 1) * ROWS)):
            for n in range(N):
                acc[:] = 0
                summs = np.float32(0)
                for b in range(nb):
                    scale = d[r, b] * xd[n, b]
                    if has_min:
                        summs = _fma(m[r, b], xs[n, b], summs)
                    for lane in range(8):
                        s = np.int32(0)
                        for t in range(4):
                            j = lane * 4 + t  # value j of the block: low nibble of byte j, or high of j - 16
                            byte = np.int32(qs[r, b * 16 + (j & 15)])
                            v = (byte & 15) if j < 16 else (byte >> 4)
                            s += (v - off) * np.int32(xq[n, b * 32 + j])
                        acc[lane] = _fma(scale, np.float32(s), acc[lane])
                out[n, r] = _hsum8(acc) + summs


def quantized_linear(x2: np.ndarray, w) -> np.ndarray:
    """x2 (N, K) float32 @ w.T in ggml's arithmetic, for a Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 weight. -> (N, R)."""
    if w.format in ("q4_k", "q5_k", "q6_k"):  # Q8_K activations and 256-value super-blocks: their own module
        from . import ggml_kquants
        return ggml_kquants.quantized_linear(x2, w)
    N, R = x2.shape[0], w.shape[0]
    out = np.empty((N, R), np.float32)
    if w.format in ("q4_1", "q5_1"):
        xd, xq, xs = spec.quantize_row_q8_1(x2)
        if w.format == "q5_1":
            _dot_q5_1(xq.reshape(N, -1), xd, xs, readonly(w.qs), readonly(w.d), readonly(w.m), out)
        else:
            _dot_q4_lanes(xq.reshape(N, -1), xd, xs, readonly(w.qs), readonly(w.d), readonly(w.m), True, out)
        return out
    xd, xq = spec.quantize_row_q8_0(x2)  # (N, nb), (N, nb, 32)
    xq = xq.reshape(N, -1)  # (N, K)
    if w.format in ("q8_0", "q5_0"):  # Q5_0 is kept as int8 values q - 16: the Q8_0 kernel
        _dot_q8_0(xq, xd, readonly(w.qs), readonly(w.d), out)
    elif R % 8 == 0:  # llama.cpp repacks Q4_0 matrices whose rows come in groups of 8
        _dot_q4_0(xq, xd, readonly(w.qs), readonly(w.d), out)
    else:
        _dot_q4_lanes(xq, xd, xd, readonly(w.qs), readonly(w.d), readonly(w.d), False, out)
    return out


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T in ggml's arithmetic: llama_ref.model.ggml.linear with the quantized products compiled."""
    if not spec.supported(w):
        return spec.linear(x, w)
    rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)  # (N, in)
    return quantized_linear(rows, w).reshape(*x.shape[:-1], w.shape[0])


__all__ = spec.__all__
