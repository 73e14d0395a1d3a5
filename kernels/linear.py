"""Matrix products with weights in every stored format, and the embedding lookup.

Decode (a few rows of x) reads each weight once, in its stored format, converted to float32 in registers;
rows of the weight are split over the cores. float32 and 16-bit weights are then bound by memory bandwidth
(16-bit ones widen in registers: kernels.halfbits), 4- and 8-bit ones by the conversions. Prefill (many
rows of x) is bound by arithmetic: float32 weights go straight to NumPy's BLAS, and packed weights are
decoded a tile of rows at a time into a reused float32 buffer that BLAS then multiplies, so the full matrix
never exists in float32. Every thread of the policy (llama_ref.runtime.threads.each_thread) takes tiles in
turn, decodes one on its own core and multiplies it with a one-thread BLAS call: one pool, no hand-off
between Numba's threads and OpenBLAS's. 16-bit tiles hold TILE_FLOATS values, quantized ones TILE_ROWS rows.
Where the CPU has AMX-BF16, a bf16 weight's prefill runs on the tiles instead (kernels/amx.py: the activations cut
into three exact bf16 parts, every product exact, sums in float32), Numba's threads sharing its blocks of rows in
one parallel region (no BLAS call there, so no pool to hand work to under the GIL).
arithmetic="bf16" (model/bf16.py) rounds the activations to bf16 first (linear_bf16, linears_bf16): the same
kernels on the rounded rows, and on the tiles one part, one pass.

Every product is summed in float32 in a different order than BLAS (fast-math "reassoc"; the 16-bit decode
kernels in an order of their own, fixed on every CPU: kernels/halfbits.py): results agree with ops.linear to a
few float32 ulps of sum |x w|, which tests/test_kernels.py checks.

Block layouts are described in llama_ref/weights/packed.py.
"""

from __future__ import annotations

import threading

import numpy as np
from numba import njit, prange

from llama_ref.model import ops
from llama_ref.runtime import threads
from . import amx
from ._common import FAST, JIT, as_f32_rows, readonly
from .ggml_simd import HOST_IS_ZEN
from .halfbits import (LANES, bf16_row_dot, bf16_row_dots4, bf16_to_f32, f16_row_dot, f16_row_dots4, f16_to_f32,
                       prefetch)

BLAS_MIN_ROWS = 8     # rows of x from which a packed weight's product goes to BLAS (decode stays here)
# ... and a float32 weight's: _mv_f32 beat OpenBLAS's sgemm up to ~32 rows (one thread, the default model's
# layers: 60 against 115 ms for 8 rows, 106 against 146 ms for 16, even at 32, slower at 48), and
# it equals attention's BLAS_MIN_QUERIES, so a decode step of up to 15 rows never calls BLAS at all and
# never meets OpenBLAS's spinning threads (see attention.py).
F32_BLAS_MIN_ROWS = 16
TILE_ROWS = 256       # weight rows decoded per BLAS call in prefill: 256 x 4K floats stay in L2
# ... and for 16-bit weights, values per tile: 16 MiB of float32 (one buffer per thread). Tiles of 256 rows
# made BLAS repack x for every 256 weight rows; at the 1B shape (512 x 2048 @ 2048 x 8192, 2 threads) 4
# Mi-value tiles took 190 against 256 ms (float32 BLAS on the whole matrix: 133 ms). A weight smaller than
# threads x TILE_FLOATS is cut into one tile per thread, so that every thread has one.
TILE_FLOATS = 1 << 22
ROWS = 16             # weight rows per parallel work item of the matrix-vector kernels


# ---- matrix-vector products on stored formats (decode): out (N, R) = x (N, K) @ w.T ------------------------

@njit(parallel=True, fastmath=FAST, **JIT)
def _mv_f32(x, w, out):
    """w (R, K) float32.

    Register-blocked for a batch of decode rows: each pass over k reads 4 weight rows and 2 rows of x and
    keeps 8 sums, 6 loads for 8 multiply-adds where one sum at a time needs 2 loads for each; a weight row
    is read from memory once whatever N is. On the default model (one thread, CPU time) 8 rows of x took
    81 ms a step against 124 ms with one sum at a time, 1 row 44 against 48 ms. Rows of x left over (N
    odd) take 4 sums. The last block of a weight with R % 4 != 0 repeats its last row, which writes the
    same value twice.
    """
    N, K = x.shape
    R = w.shape[0]
    for c in prange((R + 3) // 4):
        r0 = 4 * c
        r1, r2, r3 = min(r0 + 1, R - 1), min(r0 + 2, R - 1), min(r0 + 3, R - 1)
        n = 0
        while n + 2 <= N:
            a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = np.float32(0)
            for k in range(K):
                x0, x1 = x[n, k], x[n + 1, k]
                w0, w1, w2, w3 = w[r0, k], w[r1, k], w[r2, k], w[r3, k]
                a00 += x0 * w0
                a01 += x1 * w0
                a10 += x0 * w1
                a11 += x1 * w1
                a20 += x0 * w2
                a21 += x1 * w2
                a30 += x0 * w3
                a31 += x1 * w3
            out[n, r0], out[n + 1, r0], out[n, r1], out[n + 1, r1] = a00, a01, a10, a11
            out[n, r2], out[n + 1, r2], out[n, r3], out[n + 1, r3] = a20, a21, a30, a31
            n += 2
        if n < N:
            a0 = a1 = a2 = a3 = np.float32(0)
            for k in range(K):
                xk = x[n, k]
                a0 += xk * w[r0, k]
                a1 += xk * w[r1, k]
                a2 += xk * w[r2, k]
                a3 += xk * w[r3, k]
            out[n, r0], out[n, r1], out[n, r2], out[n, r3] = a0, a1, a2, a3


@njit(parallel=True, fastmath=FAST, **JIT)
def _mv_int8(x, q, scale, out):
    """q (R, K) int8, scale (R,) float32: w[r] = scale[r] * q[r]."""
    N, K = x.shape
    for r in prange(q.shape[0]):
        for n in range(N):
            acc = np.float32(0)
            for k in range(K):
                acc += x[n, k] * np.float32(q[r, k])
            out[n, r] = acc * scale[r]


# The quantized decode kernels: one core keeps too few reads in flight to reach its memory bandwidth when it
# reads one row after the other (Intel's hardware prefetcher stops at each 4 KiB page, a 1B-shape row of 2048
# values). So each pass reads 4 weight rows at once (4 streams, 4 sums; x read once for the 4) and, every
# PREFETCH values of a row, asks for the same columns of the next 4 rows (kernels.halfbits.prefetch). Measured
# on a 2-core Xeon (8192 x 2048 bf16 matrices, 512 MiB cycled, 1 thread, best of rounds on a loaded machine):
# one row at a time 5.7, 4 rows 7.5, 4 rows + prefetch 7.4-8.4 GB/s; 2 threads 6.6 / 9.0 / 10.7. (The 16-bit
# kernels did the same until session 34: see _mv_f16.)
# Chunks are slices, indexed from 0, so that Numba emits no negative-index code and the loop stays SIMD.
# A last block of fewer than 4 rows repeats row R - 1, writing the same value again.
PREFETCH = 128  # values of each row summed between two rounds of prefetch hints (4 cache lines of bf16)


@njit(inline="always", **JIT)
def _prefetch_rows(a, first, last, k0, k1, line):
    """Prefetch hints for columns k0 .. k1 - 1 of rows first .. last of a, one per cache line (`line` values)."""
    for p in range(first, last + 1):
        for k in range(k0, k1, line):
            prefetch(a, p, k)


# Each 16-bit kernel takes up to three weights that read the same x (linears: wq, wk, wv; w1, w3) and runs
# over the rows of all of them in one parallel region: one fork and one join of the threads instead of one
# per weight, and the rows shared out over the threads as a whole. A single weight (linear) is the same
# kernel with two empty ones (_NO_W, 0 rows), so a row's sum is the same code, hence the same bits, whether
# it was computed alone or together.

@njit(inline="always", **JIT)
def _chunks(w):
    """The work items of one weight slot: its rows in chunks of ROWS."""
    return (w.shape[0] + ROWS - 1) // ROWS


@njit(inline="always", **JIT)
def _slot(item, ca, cb, wa, wb, wc, oa, ob, oc):
    """Work item -> (weight, its output, chunk c of ROWS rows of that weight), ca and cb the first two slots'."""
    if item < ca:
        return wa, oa, item
    if item < ca + cb:
        return wb, ob, item - ca
    return wc, oc, item - ca - cb


# The 16-bit decode kernels' rows of x (float32) at most this wide go one weight row at a time, wider ones 4 rows
# at once; both sum a row in the same order (kernels/halfbits.py), so the choice changes the speed, not the bits.
# One row at a time, a thread's rows are one sequential stream; 4 at once, x is read once for the 4 and the
# next 4 rows are prefetched. Which is faster depends on the CPU's hardware prefetchers:
# - AMD Zen 4 (AVX-512 EPYC, session 34, 2 threads, matrices cycled over 512 MiB, the two kernels alternated in
#   one process, medians, GB/s of weights): one row at a time followed the stream best while x stayed in L1,
#   K = 2048: 30 against 25 (8192 rows), 25 against 18 (2048 rows); K = 3072: 27 against 23; but K = 4096: 18-20
#   against 22; K = 8192: 17 against 29; K = 14336: 16 against 23 (x no longer in L1 beside the weights).
# - Intel (Sapphire Rapids-class Xeon, session 38, the same method, bf16, 1B-shape matrices): 4 rows with the
#   next 4 prefetched won at every width. K = 2048 (8192 rows): 20 against 13 GB/s; K = 8192: 21 against 20
#   (4 rows unprefetched: 18-20); K = 576 (1536 rows): 16 against 13; K = 1536 (576 rows): 19 against 13. Its
#   prefetcher stops at each 4 KiB page, and a 1B-shape row is one page: one stream keeps too few reads in
#   flight, and 4 streams plus the hints keep more.
ONE_ROW_MAX_K = 3072 if HOST_IS_ZEN else 0


@njit(inline="always", **JIT)
def _row_tail(x, n, w, r, k0, acc, bf16):
    """acc + x[n, k] w[r, k] for k = k0 .. K - 1, one after another: what the row dots leave (K % LANES)."""
    for k in range(k0, x.shape[1]):
        acc += x[n, k] * (bf16_to_f32(w[r, k]) if bf16 else f16_to_f32(w[r, k]))
    return acc


@njit(inline="always", **JIT)
def _mv16(x, wa, wb, wc, oa, ob, oc, bf16):
    """_mv_f16 / _mv_bf16 (bf16: which widening, a compile-time constant)."""
    N, K = x.shape
    side_by_side = x.strides[1] == 4  # x's values contiguous: else every value through _row_tail
    x0, xs = np.int64(x.ctypes.data), np.int64(x.strides[0])  # byte address and row stride
    ca, cb, cc = _chunks(wa), _chunks(wb), _chunks(wc)
    for item in prange(ca + cb + cc):
        w, out, c = _slot(item, ca, cb, wa, wb, wc, oa, ob, oc)
        w0, ws = np.int64(w.ctypes.data), np.int64(w.strides[0])
        vector = side_by_side and w.strides[1] == 2
        sums = np.empty(4, np.float32)
        sa = np.int64(sums.ctypes.data)
        r, r1 = np.int64(c * ROWS), np.int64(min(w.shape[0], (c + 1) * ROWS))
        ng = K // LANES if vector else 0  # groups of LANES values the row dots take; the rest: _row_tail
        if ng and K > ONE_ROW_MAX_K:
            while r + 4 <= r1:
                for n in range(N):
                    if bf16:
                        bf16_row_dots4(x0 + n * xs, w0 + r * ws, ws, ng, sa)
                    else:
                        f16_row_dots4(x0 + n * xs, w0 + r * ws, ws, ng, sa)
                    for j in range(4):
                        out[n, r + j] = _row_tail(x, n, w, r + j, ng * LANES, sums[j], bf16)
                r += 4
        while r < r1:  # one row at a time (or the rows a 4-row pass left)
            for n in range(N):
                if bf16:
                    bf16_row_dot(x0 + n * xs, w0 + r * ws, ws, ng, sa)
                else:
                    f16_row_dot(x0 + n * xs, w0 + r * ws, ws, ng, sa)
                out[n, r] = _row_tail(x, n, w, r, ng * LANES, sums[0], bf16)
            r += 1


@njit(parallel=True, **JIT)
def _mv_bf16(x, wa, wb, wc, oa, ob, oc):
    """w* (R*, K) uint16 bfloat16 bits, widened in registers (a shift); o* (N, R*) = x (N, K) @ w*.T. _mv_f16 with
    the other widening."""
    _mv16(x, wa, wb, wc, oa, ob, oc, True)


@njit(parallel=True, **JIT)
def _mv_f16(x, wa, wb, wc, oa, ob, oc):
    """w* (R*, K) uint16 IEEE half bits, widened in registers (vcvtph2ps); o* (N, R*) = x (N, K) @ w*.T.

    Each row's dot product is kernels.halfbits' LLVM vector IR (16-lane vectors, fused multiply-add chains, its
    order fixed whatever the CPU), 4 rows at once with the next 4 prefetched, or on AMD Zen one row at a time
    for rows up to ONE_ROW_MAX_K values (the same bits either way); the last K % LANES values of a row are
    added after it, one at a time. Until session 34 each pass read 4 rows at once with 128-value chunks and
    asked for the next 4 rows' (the quantized kernels still do, see PREFETCH), in a loop LLVM vectorized itself:
    with AVX-512's 16-lane vectors it reduced 16 vectors every 128 values. On an AVX-512 AMD EPYC (Zen 4), 8192 x
    2048 matrices cycled over 512 MiB, medians of rounds: 14 GB/s on one thread and 24 on two, where the IR's
    rows read 25 and 37 (30 against 19 GB/s a thread in L2); llama.cpp's F16 decode of the 1B shape streams 31
    GB/s there. Prefetching measured no faster there; on an Intel Xeon it is what 4 rows at once gain by
    (ONE_ROW_MAX_K)."""
    _mv16(x, wa, wb, wc, oa, ob, oc, False)


_NO_W = readonly(np.empty((0, 0), np.uint16))  # an empty weight slot of the 16-bit kernels ...
_NO_OUT = np.empty((0, 0), np.float32)  # ... and its empty output


def _mv_bf16_one(x, w, out):
    _mv_bf16(x, w, _NO_W, _NO_W, out, _NO_OUT, _NO_OUT)


def _mv_f16_one(x, w, out):
    _mv_f16(x, w, _NO_W, _NO_W, out, _NO_OUT, _NO_OUT)


SIXTEEN = {"f16": _mv_f16, "bf16": _mv_bf16}  # the formats that linears computes together


@njit(parallel=True, fastmath=FAST, **JIT)
def _mv_q8(x, qs, d, m, has_min, out):
    """Q8_0 and Q5_K: qs (R, K) one byte per value (int8 quants as uint8 bytes, reinterpreted in registers),
    d and m (R, K/32) float32 block scales and offsets: w[r, k] = d[r, k//32] * qs[r, k] (+ m[r, k//32]
    for Q5_K, has_min).

    One flat loop over the row (the block's scale gathered from the row's scales) lets LLVM use full-width
    SIMD; a loop per block of 32 would be unrolled and vectorized the wrong way. Offsets, when there are
    any, multiply the sum of x over each block. 4 rows a pass with prefetch, as the 16-bit kernels: one
    thread, 4096 x 2048 Q8_0 matrices cycled over 320 MiB, 6.6 -> 9.3 GB/s of quants (Q5_K 6.4 -> 8.7); in
    cache (one 8 MiB matrix again and again) ~15% slower, which a model's weights never are.
    """
    N, K = x.shape
    R, nb = qs.shape[0], d.shape[1]
    for c in prange((R + ROWS - 1) // ROWS):
        for r0 in range(c * ROWS, min(R, (c + 1) * ROWS), 4):  # 4 rows a pass, as _mv_bf16
            r1, r2, r3 = min(r0 + 1, R - 1), min(r0 + 2, R - 1), min(r0 + 3, R - 1)
            next0, next3 = min(r0 + 4, R - 1), min(r0 + 7, R - 1)
            for n in range(N):
                a0 = a1 = a2 = a3 = np.float32(0)
                for k0 in range(0, K, PREFETCH):
                    k1 = min(K, k0 + PREFETCH)
                    if n == 0:
                        _prefetch_rows(qs, next0, next3, k0, k1, 64)  # 64 values: one cache line
                    b0, b1 = k0 >> 5, (k1 + 31) >> 5  # the blocks of this chunk (k0 is a multiple of 32)
                    xs, q0, q1, q2, q3 = x[n, k0:k1], qs[r0, k0:k1], qs[r1, k0:k1], qs[r2, k0:k1], qs[r3, k0:k1]
                    d0, d1, d2, d3 = d[r0, b0:b1], d[r1, b0:b1], d[r2, b0:b1], d[r3, b0:b1]
                    for k in range(k1 - k0):
                        xk = xs[k]
                        a0 += xk * np.float32(np.int8(q0[k])) * d0[k >> 5]
                        a1 += xk * np.float32(np.int8(q1[k])) * d1[k >> 5]
                        a2 += xk * np.float32(np.int8(q2[k])) * d2[k >> 5]
                        a3 += xk * np.float32(np.int8(q3[k])) * d3[k >> 5]
                out[n, r0], out[n, r1], out[n, r2], out[n, r3] = a0, a1, a2, a3
    if has_min:
        # In a pass of their own: a branch in the loop above made Q8_0's code ~10% slower.
        xsum = np.zeros((N, nb), np.float32)  # (N, K/32) sum of x over each block
        for n in range(N):
            for k in range(K):
                xsum[n, k >> 5] += x[n, k]
        for r in prange(R):
            for n in range(N):
                acc = np.float32(0)
                for b in range(nb):
                    acc += m[r, b] * xsum[n, b]
                out[n, r] += acc


@njit(parallel=True, fastmath=FAST, **JIT)
def _mv_q6_k(x, qs, d, out):
    """Q6_K: qs (R, K) int8 values (q - 32) as uint8 bytes, d (R, K/16) float32 scales of 16-value
    sub-blocks: w[r, k] = d[r, k//16] * qs[r, k].

    _mv_q8 with the block size as an argument instead of this near copy measured ~7x slower: a shift LLVM
    cannot see at compile time turns the scale lookup into a gather. 4 rows a pass with prefetch, as _mv_q8:
    6.2 -> 8.4 GB/s (one thread, 4096 x 2048 matrices cycled over 320 MiB).
    """
    N, K = x.shape
    R = qs.shape[0]
    for c in prange((R + ROWS - 1) // ROWS):
        for r0 in range(c * ROWS, min(R, (c + 1) * ROWS), 4):  # 4 rows a pass, as _mv_q8
            r1, r2, r3 = min(r0 + 1, R - 1), min(r0 + 2, R - 1), min(r0 + 3, R - 1)
            next0, next3 = min(r0 + 4, R - 1), min(r0 + 7, R - 1)
            for n in range(N):
                a0 = a1 = a2 = a3 = np.float32(0)
                for k0 in range(0, K, PREFETCH):
                    k1 = min(K, k0 + PREFETCH)
                    if n == 0:
                        _prefetch_rows(qs, next0, next3, k0, k1, 64)
                    b0, b1 = k0 >> 4, (k1 + 15) >> 4
                    xs, q0, q1, q2, q3 = x[n, k0:k1], qs[r0, k0:k1], qs[r1, k0:k1], qs[r2, k0:k1], qs[r3, k0:k1]
                    d0, d1, d2, d3 = d[r0, b0:b1], d[r1, b0:b1], d[r2, b0:b1], d[r3, b0:b1]
                    for k in range(k1 - k0):
                        xk = xs[k]
                        a0 += xk * np.float32(np.int8(q0[k])) * d0[k >> 4]
                        a1 += xk * np.float32(np.int8(q1[k])) * d1[k >> 4]
                        a2 += xk * np.float32(np.int8(q2[k])) * d2[k >> 4]
                        a3 += xk * np.float32(np.int8(q3[k])) * d3[k >> 4]
                out[n, r0], out[n, r1], out[n, r2], out[n, r3] = a0, a1, a2, a3


@njit(parallel=True, fastmath=FAST, **JIT)
def _mv_q4(x, qs, d, m, has_min, out):
    """Q4_1 (has_min) and Q4_0: qs (R, K/2) bytes, d and m (R, K/32) float32 block scales and offsets.

    Byte i of a row holds the values of block i // 16 at j = i % 16 (low nibble) and j + 16 (high nibble).
    Q4_1: w = d q + m; Q4_0: w = d (q - 8) = d q + m with m = -8 d. So
        sum_k x_k w_k = sum_i (xlo_i lo_i + xhi_i hi_i) d[i // 16]  +  sum_b m_b (sum of x over block b),
    where xlo / xhi are x regrouped once per call into the order of the low / high nibbles. 4 rows a pass with
    prefetch, as _mv_q8, gained only ~4% (4.8 -> 5.0 GB/s, one thread, out of cache): splitting the
    nibbles, not memory, bounds this kernel.
    """
    N, K = x.shape
    R, nb, half = qs.shape[0], d.shape[1], K // 2
    xr = np.empty((3, N, half), np.float32)  # one allocation per call: the three views below
    xlo = xr[0]  # (N, K/2) x at the positions of the low nibbles
    xhi = xr[1]  # (N, K/2) ... of the high nibbles
    xsum = xr[2]  # (N, K/2) its first nb columns: sum of x over each block
    for n in range(N):
        for b in range(nb):
            s = np.float32(0)
            for j in range(16):
                xlo[n, b * 16 + j] = x[n, b * 32 + j]
                xhi[n, b * 16 + j] = x[n, b * 32 + 16 + j]
                s += x[n, b * 32 + j] + x[n, b * 32 + 16 + j]
            xsum[n, b] = s
    for c in prange((R + ROWS - 1) // ROWS):
        for r0 in range(c * ROWS, min(R, (c + 1) * ROWS), 4):  # 4 rows a pass, as _mv_bf16
            r1, r2, r3 = min(r0 + 1, R - 1), min(r0 + 2, R - 1), min(r0 + 3, R - 1)
            next0, next3 = min(r0 + 4, R - 1), min(r0 + 7, R - 1)
            for n in range(N):
                a0 = a1 = a2 = a3 = np.float32(0)
                for i0 in range(0, half, PREFETCH):
                    i1 = min(half, i0 + PREFETCH)
                    if n == 0:
                        _prefetch_rows(qs, next0, next3, i0, i1, 64)  # 64 bytes: one cache line
                    b0, b1 = i0 >> 4, (i1 + 15) >> 4  # the blocks of this chunk (i0 is a multiple of 16)
                    xl, xh = xlo[n, i0:i1], xhi[n, i0:i1]
                    q0, q1, q2, q3 = qs[r0, i0:i1], qs[r1, i0:i1], qs[r2, i0:i1], qs[r3, i0:i1]
                    d0, d1, d2, d3 = d[r0, b0:b1], d[r1, b0:b1], d[r2, b0:b1], d[r3, b0:b1]
                    for i in range(i1 - i0):
                        xli, xhi_ = xl[i], xh[i]
                        # Nibbles split in float32 (exact below 256): integer ops would widen to int64 lanes.
                        v = np.float32(q0[i])
                        hi = np.floor(v * np.float32(0.0625))
                        a0 += (xli * (v - np.float32(16) * hi) + xhi_ * hi) * d0[i >> 4]
                        v = np.float32(q1[i])
                        hi = np.floor(v * np.float32(0.0625))
                        a1 += (xli * (v - np.float32(16) * hi) + xhi_ * hi) * d1[i >> 4]
                        v = np.float32(q2[i])
                        hi = np.floor(v * np.float32(0.0625))
                        a2 += (xli * (v - np.float32(16) * hi) + xhi_ * hi) * d2[i >> 4]
                        v = np.float32(q3[i])
                        hi = np.floor(v * np.float32(0.0625))
                        a3 += (xli * (v - np.float32(16) * hi) + xhi_ * hi) * d3[i >> 4]
                out[n, r0], out[n, r1], out[n, r2], out[n, r3] = a0, a1, a2, a3
        # The offsets in a loop of their own: inside the loop above they made LLVM's code slower.
        for r in range(c * ROWS, min(R, (c + 1) * ROWS)):
            for n in range(N):
                acc = np.float32(0)
                for b in range(nb):
                    acc += (m[r, b] if has_min else np.float32(-8) * d[r, b]) * xsum[n, b]
                out[n, r] += acc


# ---- decoding rows of a packed weight to float32 (prefill tiles and embedding lookups) --------------------
# No fast-math here: each value is computed exactly as llama_ref.weights.packed (and gguf.quants) computes it.

@njit(**JIT)
def _rows_q8(qs, d, m, has_min, ids, out):
    """out (len(ids), K) = rows ids of a Q8_0 (or, with has_min, Q5_K) matrix; qs holds int8 as uint8. Also a Q5_0 /
    Q5_1 row unpacked to one byte per value (kernels/ggml._unpacked_rows)."""
    for i in range(ids.shape[0]):
        r = ids[i]
        for k in range(out.shape[1]):
            if has_min:
                out[i, k] = np.float32(np.int8(qs[r, k])) * d[r, k >> 5] + m[r, k >> 5]
            else:
                out[i, k] = np.float32(np.int8(qs[r, k])) * d[r, k >> 5]


@njit(**JIT)
def _rows_q6_k(qs, d, ids, out):
    for i in range(ids.shape[0]):
        r = ids[i]
        for k in range(out.shape[1]):
            out[i, k] = np.float32(np.int8(qs[r, k])) * d[r, k >> 4]


@njit(**JIT)
def _rows_q4(qs, d, m, has_min, ids, out):
    for i in range(ids.shape[0]):
        r = ids[i]
        for b in range(out.shape[1] // 32):
            scale, low = d[r, b], m[r, b]
            for j in range(16):
                byte = qs[r, b * 16 + j]
                if has_min:
                    out[i, b * 32 + j] = scale * np.float32(byte & 15) + low
                    out[i, b * 32 + 16 + j] = scale * np.float32(byte >> 4) + low
                else:
                    out[i, b * 32 + j] = scale * np.float32(np.int32(byte & 15) - 8)
                    out[i, b * 32 + 16 + j] = scale * np.float32(np.int32(byte >> 4) - 8)


# The row decoders below index one row at a time through 1-D views (src = w[r], dst = out[i]): LLVM then
# vectorizes the inner loop (vcvtph2ps / vpslld on 8 values); indexed as w[ids[i], k] it stayed scalar, 7-18x
# slower (one thread, 256 rows of 8192: f16 4.3 -> 0.23 ms, bf16 1.7 -> 0.25 ms). The same values either way.

@njit(**JIT)
def _rows_int8(q, scale, ids, out):
    for i in range(ids.shape[0]):
        src, dst, s = q[ids[i]], out[i], scale[ids[i]]
        for k in range(dst.shape[0]):
            dst[k] = np.float32(src[k]) * s


@njit(**JIT)
def _rows_f16(w, ids, out):
    for i in range(ids.shape[0]):  # one core: each thread of each_thread decodes its own tiles
        src, dst = w[ids[i]], out[i]
        for k in range(dst.shape[0]):
            dst[k] = f16_to_f32(src[k])


@njit(**JIT)
def _rows_bf16(w, ids, out):
    for i in range(ids.shape[0]):
        src, dst = w[ids[i]], out[i]
        for k in range(dst.shape[0]):
            dst[k] = bf16_to_f32(src[k])


@njit(**JIT)
def _rows_f32(w, ids, out):
    for i in range(ids.shape[0]):
        src, dst = w[ids[i]], out[i]
        for k in range(dst.shape[0]):
            dst[k] = src[k]


# ---- dispatch on the stored format -------------------------------------------------------------------------
# format -> (matrix-vector kernel, row decoder); both take the weight's `kernel_args()` (weights/packed.py).
# Q4_K is regrouped at load and runs the Q4_1 kernels; Q5_0 and Q5_1 are kept one byte per value; Q5_K and
# Q6_K keep the file's bytes for arithmetic="ggml" and hand these kernels a one-byte-per-value copy, made on
# first use (kernel_args()).

KINDS = {
    "q8_0": (_mv_q8, _rows_q8),
    "q4_0": (_mv_q4, _rows_q4),
    "q4_1": (_mv_q4, _rows_q4),
    "q5_0": (_mv_q8, _rows_q8),  # one byte per value at load (weights/packed.py), as Q8_0 ...
    "q5_1": (_mv_q8, _rows_q8),  # ... and with offsets, as Q5_K
    "q4_k": (_mv_q4, _rows_q4),
    "q5_k": (_mv_q8, _rows_q8),
    "q6_k": (_mv_q6_k, _rows_q6_k),
    "int8": (_mv_int8, _rows_int8),
    "f16": (_mv_f16_one, _rows_f16),
    "bf16": (_mv_bf16_one, _rows_bf16),
}


def _kind(w) -> "str | None":
    """The stored format of a packed weight (llama_ref.weights.packed) that the kernels read directly, or None."""
    fmt = getattr(w, "format", None)
    return fmt if fmt in KINDS else None


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T for a weight stored (out, in). x (..., in) -> (..., out). Same contract as ops.linear."""
    if x.dtype != np.float32:
        return ops.linear(x, w)
    # (N, K): a plain reshape (a view) when x is contiguous, which costs less per decode call.
    x2 = x.reshape(-1, x.shape[-1]) if x.flags.c_contiguous else as_f32_rows(x)
    return _product(x2, w, 3).reshape(*x.shape[:-1], w.shape[0])


def _product(x2: np.ndarray, w, parts: int) -> np.ndarray:
    """linear's x2 (N, K) @ w.T -> (N, R); parts: 3 for any float32 x2, 1 when x2 holds bf16 values (then a bf16
    weight's product on AMX tiles takes one pass: amx.split_bf16x3)."""
    (N, K), R = x2.shape, w.shape[0]
    kind = None if isinstance(w, np.ndarray) else _kind(w)
    if kind is None and not isinstance(w, np.ndarray):
        w = w.to_float(np.float32)  # a format without a kernel: one matrix at a time, like the reference
    n = threads.count()
    if kind is None:
        w = readonly(np.asarray(w, dtype=np.float32))  # (R, K)
        if N >= F32_BLAS_MIN_ROWS and n == 1:
            return x2 @ w.T  # (N, R) BLAS; the reference's w @ rows.T, transposed
        out = np.empty((N, R), np.float32)
        if N >= F32_BLAS_MIN_ROWS:
            _by_row_blocks(x2, out, -(-R // n), lambda r0, r1: w[r0:r1])  # one block of w's rows per thread
        else:
            _mv_f32(x2, w, out)
        return out
    matvec = KINDS[kind][0]
    arrays = w.kernel_args()
    if _on_tiles(kind, N, K, R):
        return _bf16_tiles(x2, amx.split_bf16x3(x2, parts), arrays[0])
    out = np.empty((N, R), np.float32)  # (N, R)
    if N < BLAS_MIN_ROWS:
        matvec(x2, *arrays, out)
        return out
    _by_row_blocks(x2, out, *decoded_tiles(w, n))
    return out


def decoded_tiles(w, n: int) -> tuple:
    """(step, decoded) for a prefill on a packed weight w (R, K) of a format in KINDS at n threads: tiles of
    `step` rows, decoded(r0, r1) -> rows r0 .. r1 - 1 of w in float32 (r1 - r0, K), in the calling thread's
    reused buffer (valid until its next call). 16-bit tiles are cut smaller when the weight has fewer than
    one per thread; quantized ones are the same whatever the thread count."""
    (R, K), kind = w.shape, _kind(w)
    _, rows = KINDS[kind]
    arrays = w.kernel_args()
    step = min(R, max(1, TILE_FLOATS // K), -(-R // n)) if kind in ("bf16", "f16") else min(R, TILE_ROWS)

    def decoded(r0, r1):
        tile = _tile(step, K)[: r1 - r0]  # (r1 - r0, K) this thread's buffer
        rows(*arrays, np.arange(r0, r1), tile)
        return tile

    return step, decoded


def linears(x: np.ndarray, *ws) -> tuple:
    """tuple(linear(x, w) for w in ws), the same values bit for bit: the projections that read the same x
    (wq, wk, wv; w1, w3; model/transformer.linears). A decode step (fewer than BLAS_MIN_ROWS rows of x) on
    two or three 16-bit weights of one format runs their rows in one parallel region (_mv_bf16, _mv_f16);
    anything else takes them one by one."""
    if x.dtype != np.float32:
        return tuple(linear(x, w) for w in ws)
    x2 = x.reshape(-1, x.shape[-1]) if x.flags.c_contiguous else as_f32_rows(x)  # (N, K)
    return tuple(out.reshape(*x.shape[:-1], out.shape[1]) for out in _products(x2, ws, 3))


def _products(x2: np.ndarray, ws: tuple, parts: int) -> list:
    """linears' products of x2 (N, K) by each w -> [(N, R) for each w]; parts as _product's. Two or three 16-bit
    weights of one format share a split of x2 (AMX tiles) or a parallel region (decode); others go one by one."""
    kinds = {None if isinstance(w, np.ndarray) else _kind(w) for w in ws}
    kind = kinds.pop() if len(kinds) == 1 else None
    if kind not in SIXTEEN or not 2 <= len(ws) <= 3:
        return [_product(x2, w, parts) for w in ws]
    (N, K) = x2.shape
    if all(w.shape[1] == K and _on_tiles(kind, N, K, w.shape[0]) for w in ws):
        xp = amx.split_bf16x3(x2, parts)  # once for the weights that read the same x
        return [_bf16_tiles(x2, xp, w.kernel_args()[0]) for w in ws]
    if x2.shape[0] >= BLAS_MIN_ROWS or any(w.shape[1] != x2.shape[1] for w in ws):
        return [_product(x2, w, parts) for w in ws]  # (a weight of another width: whatever linear does with it)
    outs = [np.empty((x2.shape[0], w.shape[0]), np.float32) for w in ws]  # (N, R) each
    arrays = [w.kernel_args()[0] for w in ws]
    pad = 3 - len(ws)
    SIXTEEN[kind](x2, *arrays, *[_NO_W] * pad, *outs, *[_NO_OUT] * pad)
    return outs


# ---- arithmetic="bf16": the same products of the activations rounded to bfloat16 (model/bf16.py) --------------

@njit(parallel=True, **JIT)
def _round_bf16(bits, out):
    """out = the bits (N, K) uint32 of float32 values rounded to bfloat16: model/bf16.round_bf16's (nearest, ties
    to even; a NaN, whose magnitude's bits exceed inf's, becomes the quiet NaN 0x7FC00000)."""
    N, K = bits.shape
    keep, one, sixteen, nan = np.uint32(0xFFFF0000), np.uint32(1), np.uint32(16), np.uint32(0x7FC00000)
    for n in prange(N):
        for k in range(K):
            b = bits[n, k]
            r = (b + np.uint32(0x7FFF) + ((b >> sixteen) & one)) & keep
            out[n, k] = nan if b & np.uint32(0x7FFFFFFF) > np.uint32(0x7F800000) else r


def round_bf16(x2: np.ndarray) -> np.ndarray:
    """x2 (N, K) float32 -> a new (N, K) array of its values rounded to bfloat16 (model/bf16.round_bf16)."""
    out = np.empty(x2.shape, np.float32)
    _round_bf16(np.ascontiguousarray(x2, dtype=np.float32).view(np.uint32), out.view(np.uint32))
    return out


def linear_bf16(x: np.ndarray, w) -> np.ndarray:
    """model/bf16.linear's twin: x (..., K) float32 rounded to bfloat16, then linear's product of the rounded
    rows -> (..., R). On AMX tiles that is one pass (a bf16 value's mid and lo parts are zero), not three."""
    xr = round_bf16(as_f32_rows(x))  # (N, K)
    return _product(xr, w, 1).reshape(*x.shape[:-1], w.shape[0])


def linears_bf16(x: np.ndarray, *ws) -> tuple:
    """model/bf16.linears' twin: linear_bf16(x, w) for each w, x rounded once (and on AMX tiles cut once)."""
    xr = round_bf16(as_f32_rows(x))  # (N, K)
    return tuple(out.reshape(*x.shape[:-1], out.shape[1]) for out in _products(xr, ws, 1))


def _on_tiles(kind: "str | None", N: int, K: int, R: int) -> bool:
    """Whether N rows of x times a weight (R, K) of this format run on AMX tiles (a bf16 prefill where
    kernels/amx.py can take it)."""
    return kind == "bf16" and N >= BLAS_MIN_ROWS and amx.usable(K, R)


def _bf16_tiles(x2: np.ndarray, parts: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x2 (N, K) @ w.T for bf16 bits w (R, K) on AMX tiles (kernels/amx.py; parts = amx.split_bf16x3(x2)), Numba's
    threads (the policy's count) sharing its blocks of rows; the last R % 32 rows, if any, as a decoded tile
    through BLAS. -> (N, R) float32."""
    out, done = amx.product(x2, parts, w)
    if done < w.shape[0]:
        tail = np.empty((w.shape[0] - done, w.shape[1]), np.float32)
        _rows_bf16(w, np.arange(done, w.shape[0]), tail)
        out[:, done:] = x2 @ tail.T  # (N, R % 32)
    return out


def _by_row_blocks(x2: np.ndarray, out: np.ndarray, step: int, weight_rows) -> None:
    """out (N, R) = x2 (N, K) @ w.T, `step` rows of w at a time: weight_rows(r0, r1) gives rows r0 .. r1 - 1
    in float32 (r1 - r0, K), and BLAS, limited to one thread, multiplies them. The blocks are shared by
    the threads of runtime.threads.each_block, each taking the next one not yet taken. Every product is
    then one single-thread BLAS call on the same block whatever the thread count, so where the blocks are
    the same the result is too, bit for bit."""
    def block(r0, r1):
        out[:, r0:r1] = x2 @ weight_rows(r0, r1).T  # (N, r1 - r0)

    threads.each_block(out.shape[1], step, block, threads.count())


_scratch = threading.local()  # each thread's tile buffer, kept between calls (the pool's threads are too)


def _tile(rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) float32 buffer for prefill tiles, reused across calls: a fresh 16 MiB array per call
    is zeroed page by page by the kernel."""
    need = rows * cols
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < need:
        buf = _scratch.buf = np.empty(need, np.float32)
    return buf[:need].reshape(rows, cols)


def embedding(tokens: np.ndarray, table, dtype) -> np.ndarray:
    """Rows of the embedding table for each token id. tokens (...,) -> (..., D). Same contract as ops."""
    if np.dtype(dtype) != np.float32:
        return ops.embedding(tokens, table, dtype)
    tokens = np.asarray(tokens)
    ids = np.ascontiguousarray(tokens.reshape(-1), dtype=np.int64)  # (N,)
    D = table.shape[1]
    out = np.empty((ids.shape[0], D), np.float32)  # (N, D)
    kind = None if isinstance(table, np.ndarray) else _kind(table)
    if kind is not None:
        _, rows = KINDS[kind]
        rows(*table.kernel_args(), ids, out)
    elif isinstance(table, np.ndarray) and table.dtype == np.float32:
        _rows_f32(readonly(table), ids, out)
    else:
        return ops.embedding(tokens, table, dtype)
    return out.reshape(*tokens.shape, D)
