"""The column choice and products of load(..., sums="apart") for the Numba backend: apart_rows, the twin of
llama_ref.model.ops._apart_rows, and apart_product, its products by kernels/sgemm.py.

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

    if not all(a.dtype == np.float32 for a in (rest, x_apart, w)) or len(cols) != APART:
        return None
    rest, x_apart, w = (np.ascontiguousarray(a) for a in (rest, x_apart, w))
    return sgemm(rest, w, np.ascontiguousarray(cols, dtype=np.int64), x_apart, threads=max(1, threads.count()))
