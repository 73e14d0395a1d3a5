"""The column choice of load(..., sums="apart") for the Numba backend: the twin of llama_ref.model.ops._apart_rows.

linear_apart (model/ops.py) sums the columns of x holding its largest entries by themselves: it needs those
columns, x with them zeroed, and x's values in them. NumPy writes |x| to a new array, reads it for the
maximum per column, copies x, then zeroes and gathers the columns; this kernel reads x once for the maximum
of |x| per column and once more to copy it, zeroing and gathering on the way, while the row is in cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ._common import JIT, as_f32_rows


@njit(**JIT)
def _largest_columns(rows, n, cols):
    """cols (n,) = the n columns of rows (N, K) with the largest max |entry|, ascending (ties: the lower ones)."""
    N, K = rows.shape
    top = np.zeros(K, np.float32)  # (K,) max |x| per column
    for i in range(N):
        row = rows[i]
        for k in range(K):  # np.maximum vectorizes (8 columns at a time); max() and a select stayed scalar
            top[k] = np.maximum(np.abs(row[k]), top[k])
    for k in range(K):  # a NaN column counts as the largest, as NumPy's argpartition sorts NaN last
        if np.isnan(top[k]):
            top[k] = np.inf
    cut = np.partition(top, K - n)[K - n]  # the n-th largest value
    j = 0
    for k in range(K):  # the columns above the cut, then those at it (ties) in order, up to n
        if top[k] > cut:
            cols[j] = k
            j += 1
    for k in range(K):
        if j == n:
            break
        if top[k] == cut:
            cols[j] = k
            j += 1
    cols.sort()


@njit(**JIT)
def _copy_apart(rows, cols, rest, x_apart):
    """rest (N, K) = rows with the columns cols zeroed; x_apart (N, n) = rows[:, cols]."""
    N, K = rows.shape
    for i in range(N):
        src, dst = rows[i], rest[i]
        for k in range(K):
            dst[k] = src[k]
        for j in range(cols.shape[0]):
            x_apart[i, j] = src[cols[j]]
            dst[cols[j]] = 0


def apart_rows(rows: np.ndarray, n: int) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
    """ops._apart_rows in two passes: (cols (n,) ascending, rest (N, K) with them zeroed, x_apart (N, n)).

    rows (N, K) float32, any layout (a C-contiguous copy otherwise). Columns of equal max |entry| at the cut
    go lowest first, where NumPy's argpartition picks any of them: then the products differ by float32
    rounding only."""
    rows = as_f32_rows(rows)
    cols = np.empty(n, np.int64)
    _largest_columns(rows, n, cols)
    rest = np.empty_like(rows)
    x_apart = np.empty((rows.shape[0], n), np.float32)
    _copy_apart(rows, cols, rest, x_apart)
    return cols, rest, x_apart

