"""The column choice of load(..., sums="apart") for the Numba backend: the twin of llama_ref.model.ops._apart_rows.

linear_apart (model/ops.py) sums the columns of x holding its largest entries by themselves: it needs those
columns, x with them zeroed, and x's values in them. NumPy writes |x| to a new array, reads it for the
maximum per column, copies x, then zeroes and gathers the columns; this kernel reads x once for the maximum
of |x| per column and once more to copy it, zeroing and gathering on the way, while the row is in cache.
"""

from __future__ import annotations

import threading

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



def apart_product(rest: np.ndarray, x_apart: np.ndarray, cols: np.ndarray, w: np.ndarray) -> "np.ndarray | None":
    """ops.linear_apart's two products in the Numba backend's layout, out (N, R) = rest @ w.T, then
    x_apart @ w[:, cols].T added onto it by sgemm (beta = 1), on n threads: blocks of w's rows shared out by
    runtime.threads.each_thread with BLAS at one thread, as the backend's own products run (kernels/linear.py
    _by_row_blocks). NumPy's OpenBLAS on its own 2 threads, between the kernels' OpenMP regions, made a 2-thread
    prefill 4-8x slower (benchmarks/results/float32_sums_amd_epyc_s29.txt). None where NumPy's sgemm is not
    found, the arrays are not C-contiguous float32, or one thread is in force: the caller then takes
    ops.linear_apart's own path (one thread: the same BLAS call)."""
    import ctypes

    from llama_ref.model import ops
    from llama_ref.runtime import threads

    n = threads.count()
    if n <= 1:
        return None
    sgemm = ops.cblas_sgemm()
    arrays = (rest, x_apart, w)
    if sgemm is None or not all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays):
        return None
    (N, K), R, m = rest.shape, w.shape[0], x_apart.shape[1]
    out = np.empty((N, R), np.float32)  # (N, R)
    step = -(-R // n)  # one block of w's rows per thread
    starts = iter(range(0, R, step))
    lock = threading.Lock()
    f32 = ctypes.sizeof(ctypes.c_float)

    def work():
        while True:
            with lock:
                r0 = next(starts, None)
            if r0 is None:
                return
            r1 = min(R, r0 + step)
            c = out.ctypes.data + r0 * f32  # out[:, r0:r1]: rows R apart
            sgemm(101, 111, 112, N, r1 - r0, K, 1.0, rest.ctypes.data, K, w.ctypes.data + r0 * K * f32, K,
                  0.0, c, R)
            # (r1 - r0, m), gathered after the product read w's rows; C-contiguous (a fancy index can give F)
            w_apart = np.ascontiguousarray(w[r0:r1, cols])
            sgemm(101, 111, 112, N, r1 - r0, m, 1.0, x_apart.ctypes.data, m, w_apart.ctypes.data, m, 1.0, c, R)

    threads.each_thread(work, n)
    return out
