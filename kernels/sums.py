"""The column choice of load(..., sums="apart") for the Numba backend: the twin of llama_ref.model.ops._apart_rows.

linear_apart (model/ops.py) sums the columns of x holding its largest entries by themselves: it needs those
columns, x with them zeroed, and x's values in them. NumPy writes |x| to a new array, reads it for the
maximum per column, copies x, then zeroes and gathers the columns; these kernels read x once, copying it and
taking the maximum of |x| per column on the way, then zero and gather the chosen columns in the copy.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._common import JIT, as_f32_rows


@njit(**JIT)
def _copy_max(rows, rest, top):
    """rest (N, K) = rows; top (K,) = max |entry| per column of rows, in the same pass (the row is in registers)."""
    N, K = rows.shape
    for k in range(K):
        top[k] = 0
    for i in range(N):
        src, dst = rows[i], rest[i]
        for k in range(K):  # np.maximum vectorizes (8 columns at a time); max() and a select stayed scalar
            v = src[k]
            dst[k] = v
            top[k] = np.maximum(np.abs(v), top[k])


@njit(**JIT)
def _largest_columns(top, n, cols):
    """cols (n,) = the n columns with the largest top (K,), ascending; ties go to the lower columns, and a NaN
    counts as the largest, as NumPy's argpartition sorts NaN last. One pass holding the n best so far (no
    partition of all K): a later column enters only if larger than the weakest held, which is the lowest
    value and, of equal ones, the highest column."""
    K = top.shape[0]
    vals = np.empty(n, np.float32)
    held = 0
    weakest = 0  # index into cols/vals of the weakest held, once n are held
    for k in range(K):
        v = top[k]
        if np.isnan(v):
            v = np.inf
        if held < n:
            cols[held] = k
            vals[held] = v
            held += 1
        elif v > vals[weakest]:
            cols[weakest] = k
            vals[weakest] = v
        else:
            continue
        if held == n:  # the weakest again: lowest value, of equal values the highest column
            weakest = 0
            for j in range(1, n):
                if vals[j] < vals[weakest] or (vals[j] == vals[weakest] and cols[j] > cols[weakest]):
                    weakest = j
    cols.sort()


@njit(**JIT)
def _zero_apart(rest, cols, x_apart):
    """x_apart (N, n) = rest[:, cols], then rest[:, cols] = 0: n entries a row of the copy just written."""
    N = rest.shape[0]
    for i in range(N):
        row = rest[i]
        for j in range(cols.shape[0]):
            x_apart[i, j] = row[cols[j]]
            row[cols[j]] = 0


def apart_rows(rows: np.ndarray, n: int) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
    """ops._apart_rows in one pass over rows: (cols (n,) ascending, rest (N, K) with them zeroed, x_apart (N, n)).

    rows (N, K) float32, any layout (a C-contiguous copy otherwise). The copy and the maximum of |x| per column
    in one pass, the choice from the K maxima, then the n columns zeroed and gathered in the copy. Columns
    of equal max |entry| at the cut go lowest first, where NumPy's argpartition picks any of them: then the
    products differ by float32 rounding only."""
    rows = as_f32_rows(rows)
    N, K = rows.shape
    rest = np.empty_like(rows)
    top = np.empty(K, np.float32)
    _copy_max(rows, rest, top)
    cols = np.empty(n, np.int64)
    _largest_columns(top, n, cols)
    x_apart = np.empty((N, n), np.float32)
    _zero_apart(rest, cols, x_apart)
    return cols, rest, x_apart


@njit(fastmath={"contract"}, **JIT)
def _add_apart(x_apart, w, cols, out, r0, r1):
    """out[:, r0:r1] += x_apart @ w[r0:r1, cols].T for x_apart (N, m), w (R, K), cols (m,), out (N, R).

    The m terms of each output summed by themselves, then added to out, as ops.linear_apart adds its apart
    terms last; for m = 8 (ops.APART) in four fused multiply-add pairs, a product rounded and the other added
    to it in one rounding, then the pairs added as a tree ((p01 + p23) + (p45 + p67)); any other m in one
    fused multiply-add chain in cols' order. The tree, not one chain: on the six prompts of
    tests/data/float64_distance.json the one chain (with or without fused multiply-adds) put the logits
    further from float64 than OpenBLAS's rank-8 sgemm (ops._add_product) did, the tree as close (mean max
    |dlogit| 4.51e-5 against 4.53e-5, one chain 4.72e-5 / 5.17e-5; benchmarks/results/float32_sums_*_s30.txt).
    BLAS packs both operands and loads and stores each output tile per call; here w's m columns are gathered
    once per block (column by column: one stride for the prefetcher) and each output is loaded and stored
    once, its m terms in registers."""
    N, m = x_apart.shape
    B = r1 - r0
    wt = np.empty((m, B), np.float32)  # (m, B): w's columns cols, rows r0:r1, contiguous for the loop over r
    for j in range(m):
        c = cols[j]
        for r in range(B):
            wt[j, r] = w[r0 + r, c]
    if m == 8:  # unrolled, so LLVM keeps the 8 terms in registers across r's SIMD lanes
        w0, w1, w2, w3, w4, w5, w6, w7 = wt[0], wt[1], wt[2], wt[3], wt[4], wt[5], wt[6], wt[7]
        for n in range(N):
            xn = x_apart[n]
            x0, x1, x2, x3, x4, x5, x6, x7 = xn[0], xn[1], xn[2], xn[3], xn[4], xn[5], xn[6], xn[7]
            o = out[n, r0:r1]
            for r in range(B):
                p01 = x0 * w0[r] + x1 * w1[r]  # one product rounded, the other fused into the add
                p23 = x2 * w2[r] + x3 * w3[r]
                p45 = x4 * w4[r] + x5 * w5[r]
                p67 = x6 * w6[r] + x7 * w7[r]
                o[r] = o[r] + ((p01 + p23) + (p45 + p67))
        return
    acc = np.empty(B, np.float32)  # (B,) any other m: one chain, a term at a time over the block
    for n in range(N):
        xn = x_apart[n]
        for r in range(B):
            acc[r] = xn[0] * wt[0, r]
        for j in range(1, m):
            for r in range(B):
                acc[r] = xn[j] * wt[j, r] + acc[r]
        o = out[n, r0:r1]
        for r in range(B):
            o[r] = o[r] + acc[r]


def apart_product(rest: np.ndarray, x_apart: np.ndarray, cols: np.ndarray, w: np.ndarray) -> "np.ndarray | None":
    """ops.linear_apart's two products in the Numba backend's layout: out (N, R) = rest @ w.T by sgemm, then
    x_apart @ w[:, cols].T added onto it by _add_apart, its terms summed by themselves, then added.

    One thread: NumPy's `rest @ w.T`, as ops.linear_apart's. n threads: blocks of w's rows shared out by
    runtime.threads.each_block with BLAS at one thread, as the backend's own products run (kernels/linear.py
    _by_row_blocks); NumPy's OpenBLAS on its own 2 threads, between the kernels' OpenMP regions, made a 2-thread
    prefill 4-8x slower (benchmarks/results/float32_sums_amd_epyc_s29.txt). A block's terms are added while
    its output is in cache. None where NumPy's sgemm is not found or the arrays are not C-contiguous float32:
    the caller then takes ops.linear_apart's own path (BLAS adds the apart terms)."""
    import ctypes

    from llama_ref.model import ops
    from llama_ref.runtime import threads

    n = max(1, threads.count())
    sgemm = ops.cblas_sgemm()
    arrays = (rest, x_apart, w)
    if sgemm is None or not all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays):
        return None
    (N, K), R = rest.shape, w.shape[0]
    if n == 1:  # NumPy's own call, as ops.linear_apart makes it (the ctypes call measured no faster)
        out = rest @ w.T  # (N, R)
        _add_apart(x_apart, w, cols, out, 0, R)
        return out
    out = np.empty((N, R), np.float32)  # (N, R)
    f32 = ctypes.sizeof(ctypes.c_float)

    def block(r0, r1):
        c = out.ctypes.data + r0 * f32  # out[:, r0:r1]: rows R apart
        sgemm(101, 111, 112, N, r1 - r0, K, 1.0, rest.ctypes.data, K, w.ctypes.data + r0 * K * f32, K,
              0.0, c, R)
        _add_apart(x_apart, w, cols, out, r0, r1)  # w's rows r0:r1 just read, out's block just written

    threads.each_block(R, -(-R // n), block, n)  # one block of w's rows per thread
    return out
