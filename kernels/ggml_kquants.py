"""Numba twin of llama_ref.model.ggml_kquants: Q4_K, Q5_K and Q6_K weights by Q8_K activations, compiled.

The NumPy module is the specification; these kernels compute the same numbers bit for bit
(tests/test_ggml_kquants.py): the activations are quantized by the specification's quantize_row_q8_K (O(K)
per row), the integer sums are exact in int32 in any order, and the float steps are the specification's, in
its order, each fused multiply-add one rounding (llvm.fma.f32). No fast-math.

The weights are read as llama_ref.weights.packed keeps them, nothing copied: `qs` (Q4_K: Q4_1-style
sub-blocks of 16 bytes, value j in the low nibble of byte j and j + 16 in its high nibble; Q5_K: one byte per
value, 0..31; Q6_K: one int8 per value, q - 32) and `head` (the file's scale bytes of every super-block:
Q4_K/Q5_K d | dmin | 12 bytes of 6-bit scales and mins, Q6_K 16 int8 scales | d), decoded per row here.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llama_ref.model import ggml_kquants as spec

from ._common import JIT, readonly
from .ggml_simd import fma32
from .halfbits import f16_to_f32

ROWS = 16  # weight rows per parallel work item (a multiple of 8: the repacked Q4_K's groups)


@njit(inline="always", **JIT)
def _fma(a, b, c):
    """float32 a * b + c rounded once (llvm.fma.f32), as llama_ref.model.ggml.fma computes it."""
    return fma32(np.float32(a), np.float32(b), np.float32(c))


@njit(inline="always", **JIT)
def _f16(lo, hi):
    """Two little-endian bytes of an fp16 -> float32, exactly."""
    return f16_to_f32(np.uint16(np.uint16(lo) | (np.uint16(hi) << np.uint16(8))))


@njit(**JIT)
def _row_scales(head, r, sc, mn, dw, dminw):
    """Q4_K/Q5_K: decode row r's super-block headers (head (R, nb, 16)) into sc, mn (nb, 8) int32 (6-bit
    scales and mins, as weights.packed.kquant_scales) and dw, dminw (nb,) float32 (the fp16 d and dmin)."""
    for b in range(head.shape[1]):
        h = head[r, b]
        dw[b] = _f16(h[0], h[1])
        dminw[b] = _f16(h[2], h[3])
        for j in range(4):
            sc[b, j] = np.int32(h[4 + j]) & 63
            mn[b, j] = np.int32(h[8 + j]) & 63
            sc[b, 4 + j] = (np.int32(h[12 + j]) & 15) | ((np.int32(h[4 + j]) >> 6) << 4)
            mn[b, 4 + j] = (np.int32(h[12 + j]) >> 4) | ((np.int32(h[8 + j]) >> 6) << 4)


@njit(inline="always", **JIT)
def _quads(prod, quads):
    """quads[i] = the sum of products 4i .. 4i+3 (one lane's share of a sub-block); exact in int32."""
    for i in range(quads.shape[0]):
        quads[i] = (prod[4 * i] + prod[4 * i + 1]) + (prod[4 * i + 2] + prod[4 * i + 3])


@njit(parallel=True, **JIT)
def _dot_q45_k(xq, xd, xbs, qs, head, four_bit, out):
    """ggml_vec_dot_q4_K_q8_K (four_bit) and ggml_vec_dot_q5_K_q8_K: xq (N, K) int8, xd (N, nb) float32,
    xbs (N, nb, 16) int32 bsums; qs, head as packed. out (N, R).

    8 lanes per super-block, lane u = sum_j sc[j] * (products 4u .. 4u+3 of sub-block j), fma(d_x d_w, lane,
    acc[u]); the mins: Q4_K in 4 float lanes (pairs of sub-blocks), Q5_K in one float32 scalar."""
    N, K = xq.shape
    R = qs.shape[0]
    nb = K // 256
    for c in prange((R + ROWS - 1) // ROWS):
        prod = np.empty(K, np.int32)
        quads = np.empty(K // 4, np.int32)
        sc = np.empty((nb, 8), np.int32)
        mn = np.empty((nb, 8), np.int32)
        dw = np.empty(nb, np.float32)
        dminw = np.empty(nb, np.float32)
        acc = np.empty(8, np.float32)
        s = np.empty(8, np.int32)
        for r in range(c * ROWS, min(R, (c + 1) * ROWS)):
            _row_scales(head, r, sc, mn, dw, dminw)
            w = qs[r]
            for n in range(N):
                x = xq[n]
                if four_bit:  # 16 bytes per sub-block: value j low nibble, j + 16 high nibble
                    for i in range(K // 2):
                        v = (i // 16) * 32 + i % 16  # the value in byte i's low nibble
                        byte = np.int32(w[i])
                        prod[v] = (byte & 15) * np.int32(x[v])
                        prod[v + 16] = (byte >> 4) * np.int32(x[v + 16])
                else:
                    for k in range(K):
                        prod[k] = np.int32(w[k]) * np.int32(x[k])
                _quads(prod, quads)
                acc[:] = 0
                m0 = m1 = m2 = m3 = summs = np.float32(0)
                for b in range(nb):
                    d = xd[n, b] * dw[b]
                    dmin = -(xd[n, b] * dminw[b])
                    for u in range(8):
                        lane = np.int32(0)
                        for j in range(8):
                            lane += sc[b, j] * quads[b * 64 + j * 8 + u]
                        acc[u] = _fma(d, np.float32(lane), acc[u])
                    for j in range(8):
                        s[j] = mn[b, j] * (xbs[n, b, 2 * j] + xbs[n, b, 2 * j + 1])
                    if four_bit:
                        m0 = _fma(dmin, np.float32(s[0] + s[1]), m0)
                        m1 = _fma(dmin, np.float32(s[2] + s[3]), m1)
                        m2 = _fma(dmin, np.float32(s[4] + s[5]), m2)
                        m3 = _fma(dmin, np.float32(s[6] + s[7]), m3)
                    else:
                        summs = _fma(dmin, np.float32(s.sum()), summs)
                main = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
                out[n, r] = main + ((m0 + m2) + (m1 + m3)) if four_bit else main + summs


@njit(parallel=True, **JIT)
def _gemv_q4_k(xq, xd, xbs, qs, head, out):
    """ggml_gemv_q4_K_8x8_q8_K (rows in groups of 8): one integer per super-block for the values, one for
    the mins; acc = fma(iacc, d_w d_x, acc), acc_min likewise with dmin; out = acc - acc_min.

    The activations are regrouped once per call into the nibbles' order (xlo: values j, xhi: values j + 16
    of each sub-block) so that a weight row is one flat loop over its bytes."""
    N, K = xq.shape
    R = qs.shape[0]
    nb = K // 256
    half = K // 2
    xlo = np.empty((N, half), np.int32)
    xhi = np.empty((N, half), np.int32)
    for n in range(N):
        for i in range(half):
            v = (i // 16) * 32 + i % 16
            xlo[n, i] = xq[n, v]
            xhi[n, i] = xq[n, v + 16]
    for c in prange((R + ROWS - 1) // ROWS):
        prod = np.empty(half, np.int32)
        sc = np.empty((nb, 8), np.int32)
        mn = np.empty((nb, 8), np.int32)
        dw = np.empty(nb, np.float32)
        dminw = np.empty(nb, np.float32)
        for r in range(c * ROWS, min(R, (c + 1) * ROWS)):
            _row_scales(head, r, sc, mn, dw, dminw)
            w = qs[r]
            for n in range(N):
                for i in range(half):
                    byte = np.int32(w[i])
                    prod[i] = (byte & 15) * xlo[n, i] + (byte >> 4) * xhi[n, i]
                acc = np.float32(0)
                acc_min = np.float32(0)
                for b in range(nb):
                    iacc = np.int32(0)
                    imin = np.int32(0)
                    for j in range(8):
                        s = np.int32(0)
                        for t in range(16):
                            s += prod[b * 128 + j * 16 + t]
                        iacc += sc[b, j] * s
                        imin += mn[b, j] * (xbs[n, b, 2 * j] + xbs[n, b, 2 * j + 1])
                    acc = _fma(np.float32(iacc), dw[b] * xd[n, b], acc)
                    acc_min = _fma(np.float32(imin), dminw[b] * xd[n, b], acc_min)
                out[n, r] = acc - acc_min


@njit(parallel=True, **JIT)
def _dot_q6_k(xq, xd, xbs, qs, head, out):
    """ggml_vec_dot_q6_K_q8_K: qs (R, K) int8 bytes q - 32, head (R, nb, 18) 16 int8 scales | d fp16.

    Lane u of a super-block: sum_c sc[2c + (u >= 4)] * (products 32c + 4u .. 32c + 4u + 3 of the unsigned
    q = 0..63) - 32 (sc[2u] bsum[2u] + sc[2u+1] bsum[2u+1]); fma(d_x d_w, lane, acc[u]); hsum_float_8."""
    N, K = xq.shape
    R = qs.shape[0]
    nb = K // 256
    for c in prange((R + ROWS - 1) // ROWS):
        prod = np.empty(K, np.int32)
        quads = np.empty(K // 4, np.int32)
        sc = np.empty((nb, 16), np.int32)
        dw = np.empty(nb, np.float32)
        acc = np.empty(8, np.float32)
        for r in range(c * ROWS, min(R, (c + 1) * ROWS)):
            for b in range(nb):
                h = head[r, b]
                for j in range(16):
                    sc[b, j] = np.int32(np.int8(h[j]))
                dw[b] = _f16(h[16], h[17])
            w = qs[r].view(np.int8)
            for n in range(N):
                x = xq[n]
                for k in range(K):
                    prod[k] = (np.int32(w[k]) + 32) * np.int32(x[k])
                _quads(prod, quads)
                acc[:] = 0
                for b in range(nb):
                    d = xd[n, b] * dw[b]
                    for u in range(8):
                        half = 1 if u >= 4 else 0
                        lane = np.int32(0)
                        for j in range(8):
                            lane += sc[b, 2 * j + half] * quads[b * 64 + j * 8 + u]
                        lane -= 32 * (sc[b, 2 * u] * xbs[n, b, 2 * u] + sc[b, 2 * u + 1] * xbs[n, b, 2 * u + 1])
                        acc[u] = _fma(d, np.float32(lane), acc[u])
                out[n, r] = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))


def quantized_linear(x2: np.ndarray, w) -> np.ndarray:
    """x2 (N, K) float32 @ w.T in ggml's arithmetic for a Q4_K / Q5_K / Q6_K weight w (R, K). -> (N, R)."""
    N, R = x2.shape[0], w.shape[0]
    xd, xq, xbs = spec.quantize_row_q8_K(x2)  # (N, nb), (N, nb, 256), (N, nb, 16)
    xq = xq.reshape(N, -1)
    out = np.empty((N, R), np.float32)
    qs, head = readonly(w.qs), readonly(w.head)
    if w.format == "q6_k":
        _dot_q6_k(xq, xd, xbs, qs, head, out)
    elif w.format == "q4_k" and R % 8 == 0:  # repacked by llama.cpp (spec.dot_for)
        _gemv_q4_k(xq, xd, xbs, qs, head, out)
    else:
        _dot_q45_k(xq, xd, xbs, qs, head, w.format == "q4_k", out)
    return out
