"""The column choice and products of load(..., sums="apart") for the Numba backend: apart_rows, the twin of
llama_ref.model.ops._apart_rows, apart_product, its products by kernels/sgemm.py, and float64_sums, the twin
of ops.linear_float64_sums (products of a few rows).

linear_apart (model/ops.py) sums the columns of x holding its largest entries by themselves: it needs those
columns, x with them zeroed, and x's values in them. NumPy writes |x| to a new array, reads it for the
maximum per column, copies x, then zeroes and gathers the columns; these kernels read x once, copying it and
taking the maximum of |x| per column on the way, then zero and gather the chosen columns in the copy.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from ._common import FAST, JIT, aligned, as_f32_rows, readonly
from .ggml_simd import HOST_IS_ZEN
from .linear import _prefetch_rows
from .sgemm import HAS_AVX512


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


def apart_product(rest: np.ndarray, x_apart: np.ndarray, cols: np.ndarray, w: np.ndarray) -> "np.ndarray | None":
    """ops.linear_apart's two products in the Numba backend's layout, out (N, R), by kernels/sgemm.py in one
    pass: rest @ w.T with x's columns cols left out while x is packed (rest has them zeroed already; zeroing
    them again changes nothing), each output fused multiply-add chains of sgemm.KB k's added in order, and
    x_apart @ w[:, cols].T summed by itself (fused pairs, then a tree) in registers and added to each tile
    before it is stored (tests/test_sgemm.py's twin).

    Through NumPy's BLAS this took a second pass over the (N, R) output for the apart terms, and the same
    one-thread BLAS call per block of w's rows at n threads (sessions 29-30); now no second pass, and the
    same bits at any thread count (sgemm's sums do not depend on how w's rows are shared out). None for
    other than float32 or other than sgemm.APART columns: ops.linear_apart's own path then (BLAS)."""
    from llama_ref.runtime import threads

    from .sgemm import APART, sgemm

    if not all(a.dtype == np.float32 for a in (rest, x_apart)) or len(cols) != APART:
        return None
    if not isinstance(w, np.ndarray):
        return _packed_apart(*(np.ascontiguousarray(a) for a in (rest, x_apart)), cols, w) if packed_apart(w) else None
    if w.dtype != np.float32:
        return None
    rest, x_apart, w = (np.ascontiguousarray(a) for a in (rest, x_apart, w))
    return sgemm(rest, w, np.ascontiguousarray(cols, dtype=np.int64), x_apart, threads=max(1, threads.count()))


def packed_apart(w, rows: int = 0) -> bool:
    """Whether apart_product takes this packed weight (a 16-bit or quantized format kernels/linear.py decodes)
    for `rows` rows of x: not a bf16 weight that linear's prefill multiplies on AMX tiles (exact products,
    float32 sums in the tiles' order, at 2-3x the speed of float32 products)."""
    from .linear import _kind, _on_tiles

    kind = _kind(w)
    return kind is not None and not (rows and _on_tiles(kind, rows, w.shape[1], w.shape[0]))


def _packed_apart(rest: np.ndarray, x_apart: np.ndarray, cols: np.ndarray, w) -> np.ndarray:
    """apart_product for a packed weight: w decoded a tile of rows at a time into each thread's buffer, as
    kernels/linear.py's prefill decodes it for BLAS, and each tile multiplied by sgemm on one thread with the
    apart columns; sgemm's bits do not depend on which rows a call gets, so they are those of sgemm on the
    whole decoded matrix, at any tile size and thread count. -> (N, R)."""
    from llama_ref.runtime import threads

    from .linear import decoded_tiles
    from .sgemm import sgemm

    n = max(1, threads.count())
    step, decoded = decoded_tiles(w, n)
    cols = np.ascontiguousarray(cols, dtype=np.int64)
    out = np.empty((rest.shape[0], w.shape[0]), np.float32)  # (N, R)

    def block(r0, r1):
        out[:, r0:r1] = sgemm(rest, decoded(r0, r1), cols, x_apart)

    threads.each_block(w.shape[0], step, block, n)
    return out


# LLVM's loop vectorizer takes 256-bit vectors on Intel's AVX-512 cores unless a function asks for wider ones.
# Float64 multiply-adds are half as many lanes as float32's, so _float64_sums asks: 512-bit vectors issue on two
# ports there, as many a cycle as 256-bit ones (sgemm._host_wide). AMD's Zen 4 splits each into two halves.
# (The CPU's name and features are part of Numba's cache key, so a cached kernel follows this choice; for that
# reason no environment variable overrides it, unlike sgemm's WIDE, which its kernels take at run time.)
WIDE_FLOAT64 = HAS_AVX512 and not HOST_IS_ZEN


@intrinsic
def _prefer_wide_vectors(typingctx):
    """Where WIDE_FLOAT64, give the function being compiled LLVM's "prefer-vector-width"="512" attribute, so that
    its loops are vectorized in 512-bit registers; nothing elsewhere. Called inside a prange loop, it marks the
    function Numba outlines for the loop's body. (llvmlite's attribute set checks names against its list of
    LLVM's enum attributes, which has no string attributes: this one is added to the set as LLVM writes it.)"""
    def codegen(context, builder, signature, args):
        if WIDE_FLOAT64:
            set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return types.void(), codegen


@njit(parallel=True, fastmath=FAST, **JIT)
def _float64_sums(x, w, out):
    """out (N, R) = x (N, K) float64 @ w (R, K) float32 .T, each sum in float64, rounded once to float32.

    As kernels/linear._mv_f32, 4 weight rows a pass over k, each w value widened once for 4 rows of x (16
    sums; 2 rows, 8 sums, for the last 1-3): w read from memory once whatever N is. Float64 multiply-adds run
    at half float32's rate, so at 8-15 rows the 4-row passes cut the time by ~20 % against 2-row ones (the
    default model's products, one thread, w in cache). In any order the sums stay within ~K float64 ulps of
    the exact ones, so they round to the same float32 as NumPy's but for a sum that falls that close to a
    halfway point. A weight with R % 4 != 0 repeats its last row in the last block, an odd N its last row in
    the last pass (the same values written twice).
    Each block first asks for the next block's 4 rows (prefetch hints, a cache line each) and its loops use
    512-bit vectors (_prefer_wide_vectors): the default model's products of 5-8 rows, 2 threads, w from
    memory, 1.57x -> 1.33x the time of kernels/linear's float32 product, about half of it from each (session 46);
    x's rows on cache lines (float64_sums) another 10-15 % at 8-15 rows."""
    N, K = x.shape
    R = w.shape[0]
    for c in prange((R + 3) // 4):
        _prefer_wide_vectors()
        r0 = 4 * c
        r1, r2, r3 = min(r0 + 1, R - 1), min(r0 + 2, R - 1), min(r0 + 3, R - 1)
        _prefetch_rows(w, min(r0 + 4, R), min(r0 + 7, R - 1), 0, K, 16)  # the next block's rows (16 float32: a line)
        n = 0
        while n + 4 <= N:
            a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = 0.0
            a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = 0.0
            for k in range(K):
                x0, x1, x2, x3 = x[n, k], x[n + 1, k], x[n + 2, k], x[n + 3, k]
                w0, w1 = np.float64(w[r0, k]), np.float64(w[r1, k])
                w2, w3 = np.float64(w[r2, k]), np.float64(w[r3, k])
                a00 += x0 * w0
                a01 += x1 * w0
                a02 += x2 * w0
                a03 += x3 * w0
                a10 += x0 * w1
                a11 += x1 * w1
                a12 += x2 * w1
                a13 += x3 * w1
                a20 += x0 * w2
                a21 += x1 * w2
                a22 += x2 * w2
                a23 += x3 * w2
                a30 += x0 * w3
                a31 += x1 * w3
                a32 += x2 * w3
                a33 += x3 * w3
            out[n, r0], out[n + 1, r0], out[n + 2, r0], out[n + 3, r0] = a00, a01, a02, a03
            out[n, r1], out[n + 1, r1], out[n + 2, r1], out[n + 3, r1] = a10, a11, a12, a13
            out[n, r2], out[n + 1, r2], out[n + 2, r2], out[n + 3, r2] = a20, a21, a22, a23
            out[n, r3], out[n + 1, r3], out[n + 2, r3], out[n + 3, r3] = a30, a31, a32, a33
            n += 4
        while n < N:
            m = min(n + 1, N - 1)
            a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = 0.0
            for k in range(K):
                x0, x1 = x[n, k], x[m, k]
                w0, w1 = np.float64(w[r0, k]), np.float64(w[r1, k])
                w2, w3 = np.float64(w[r2, k]), np.float64(w[r3, k])
                a00 += x0 * w0
                a01 += x1 * w0
                a10 += x0 * w1
                a11 += x1 * w1
                a20 += x0 * w2
                a21 += x1 * w2
                a30 += x0 * w3
                a31 += x1 * w3
            out[n, r0], out[m, r0], out[n, r1], out[m, r1] = a00, a01, a10, a11
            out[n, r2], out[m, r2], out[n, r3], out[m, r3] = a20, a21, a30, a31
            n += 2


def float64_sums(x: np.ndarray, w) -> np.ndarray:
    """ops.linear_float64_sums: x @ w.T (x (..., K) float32, w (R, K)), each output summed in float64 and
    rounded once, in one parallel pass over w's rows. Other than a float32 x and a float32 array w: the twin's."""
    from llama_ref.model import ops

    if x.dtype != np.float32 or not isinstance(w, np.ndarray) or w.dtype != np.float32 or w.ndim != 2:
        return ops.linear_float64_sums(x, w)
    rows = x.reshape(-1, x.shape[-1])
    x64 = aligned(rows.shape, np.float64)  # (N, K), each row's vectors within cache lines where K % 8 == 0
    x64[...] = rows  # exact
    out = np.empty((x64.shape[0], w.shape[0]), np.float32)  # (N, R)
    _float64_sums(x64, readonly(w), out)
    return out.reshape(*x.shape[:-1], w.shape[0])  # (..., out)
