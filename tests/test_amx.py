"""bf16 weights on AMX tiles (kernels/amx.py): the activation split is exact everywhere; the products, where this
CPU has AMX-BF16, agree with ops.linear to float32 rounding, whatever the shape's edges and the thread count."""

from __future__ import annotations

import contextlib
import importlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from llama_ref import kernels
from llama_ref.model import ops
from llama_ref.weights import packed

amx = importlib.import_module("llama_ref.kernels.amx")
LINEAR = importlib.import_module("llama_ref.kernels.linear")
needs_amx = pytest.mark.skipif(not amx.available(), reason="this CPU (or OS, or LLAMA_REF_AMX=0) has no AMX-BF16")


@contextlib.contextmanager
def numba_threads(n: int):
    """Numba's thread count n (at most what it started with) inside the block, the count before it after."""
    import numba

    before = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(before)


def bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """As tests/test_kernels.py's dot_bound: a few float32 ulps of sum_k |x_k w_k|, whatever the order."""
    return 4 * x.shape[-1] * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T)


def bf16_weight(rows: int, cols: int, rng) -> packed.BF16Weight:
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return packed.BF16Weight((w.view(np.uint32) >> 16).astype(np.uint16), w.shape)


def parts_as_rows(xp: np.ndarray, n: int) -> np.ndarray:
    """(3, NB, K/32, 16, 32) uint16 tiles -> (3, n, K) float32 values."""
    f = (xp.astype(np.uint32) << 16).view(np.float32)
    return f.transpose(0, 1, 3, 2, 4).reshape(3, xp.shape[1] * 16, -1)[:, :n]


@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 40), st.sampled_from([32, 64, 96])),
                    elements=st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)))
@settings(max_examples=40, deadline=None)
def test_split_is_exact(x):
    # hi + mid + lo == x exactly for any finite float32 from 2**-103 up (and zeros), each part a bfloat16 (by
    # construction: 16 bits), hi and mid the truncations the module describes; below 2**-103 what is lost lies
    # under 2**-126; the padding tokens are zero.
    xp = amx.split_bf16x3(x)
    assert xp.shape == (3, -(-x.shape[0] // 32) * 2, x.shape[1] // 32, 16, 32) and xp.ctypes.data % 64 == 0
    hi, mid, lo = parts_as_rows(xp, x.shape[0]).astype(np.float64)
    exact = (np.abs(x) >= 2.0 ** -103) | (x == 0)
    np.testing.assert_array_equal((hi + mid + lo)[exact], x.astype(np.float64)[exact])
    assert np.all(np.abs(hi + mid + lo - x)[~exact] < 2.0 ** -126)
    np.testing.assert_array_equal(hi, ((x.view(np.uint32) >> 16) << 16).view(np.float32))
    assert np.all(np.abs(mid) <= np.abs(x) * 2.0 ** -7) and np.all(np.abs(lo) <= np.abs(x) * 2.0 ** -15)
    assert not parts_as_rows(xp, xp.shape[1] * 16)[:, x.shape[0]:].any()


def test_split_on_threads_is_the_same():
    # The token blocks shared out to one thread or two: the same tiles.
    x = np.random.default_rng(2).standard_normal((150, 96)).astype(np.float32)
    with numba_threads(1):
        one = amx.split_bf16x3(x)
    with numba_threads(2):
        np.testing.assert_array_equal(amx.split_bf16x3(x), one)


def test_off_by_environment(monkeypatch):
    monkeypatch.setenv("LLAMA_REF_AMX", "0")
    assert not amx.available() and not amx.usable(64, 64)


def test_unusable_shapes():
    assert not amx.usable(48, 64)  # K not in whole tiles of 32
    assert not amx.usable(64, 31)  # fewer than 32 weight rows


@needs_amx
@pytest.mark.parametrize("n, k, rows", [(8, 32, 32), (9, 64, 33), (37, 224, 70), (100, 416, 300), (33, 192, 64)])
def test_linear_on_tiles(n, k, rows, monkeypatch):
    # Token rows that fill the 32-row tiles partly, K of one tile or several, weight rows with a
    # remainder of R % 32 (BLAS) and more than one block of ROWS: within float32 rounding of ops.linear.
    rng = np.random.default_rng(n * 1000 + rows)
    w = bf16_weight(rows, k, rng)
    x = rng.standard_normal((1, n, k)).astype(np.float32)
    calls = []
    product = amx.product
    monkeypatch.setattr(amx, "product", lambda *a: calls.append(1) or product(*a))
    got, want = kernels.linear(x, w), ops.linear(x, w)
    assert calls == [1] and got.shape == want.shape == (1, n, rows)
    assert np.all(np.abs(got - want)[0] <= bound(x[0], w.to_float(np.float32)) + 1e-30)


@needs_amx
def test_linears_share_one_split_and_equal_linear(monkeypatch):
    rng = np.random.default_rng(3)
    ws = [bf16_weight(r, 256, rng) for r in (64, 32, 96)]
    x = rng.standard_normal((2, 20, 256)).astype(np.float32)
    splits = []
    split = amx.split_bf16x3
    monkeypatch.setattr(amx, "split_bf16x3", lambda *a: splits.append(1) or split(*a))
    got = kernels.linears(x, *ws)
    assert splits == [1]
    for g, w in zip(got, ws):
        np.testing.assert_array_equal(g, kernels.linear(x, w))


@needs_amx
def test_same_bits_whatever_the_threads():
    # Every output's sum runs k by k in order: 1 or 2 threads, the same bits.
    rng = np.random.default_rng(5)
    w = bf16_weight(3 * amx.ROWS + 32, 448, rng).data
    x = rng.standard_normal((50, 448)).astype(np.float32)
    xp = amx.split_bf16x3(x)
    with numba_threads(1):
        one, _ = amx.product(x, xp, w)
    with numba_threads(2):
        two, _ = amx.product(x, xp, w)
        # items of 32 rows (as on many threads: rows_per_item) shared by the 2 threads: the same bits again
        small, _ = amx.product(x, xp, w, workers=64)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(one, small)


@needs_amx
def test_products_on_two_python_threads_at_once():
    # Two Python threads' products at once (two models on two threads) run as two teams of Numba's threads whose
    # ids both start at 0: each Python thread has its own B panels (amx._panels), so each gets its own bits.
    import numba
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(13)
    jobs = []
    for rows, k in ((2 * amx.ROWS, 1024), (3 * amx.ROWS, 512)):
        w = bf16_weight(rows, k, rng).data
        x = rng.standard_normal((64, k)).astype(np.float32)
        xp = amx.split_bf16x3(x)
        jobs.append((x, xp, w, amx.product(x, xp, w)[0].copy()))
    if numba.threading_layer() not in ("omp", "tbb"):  # workqueue: no parallel regions from two threads at once
        pytest.skip(f"Numba's {numba.threading_layer()} threading layer runs one parallel region at a time")

    def run(job):
        x, xp, w, want = job
        with numba_threads(2):
            return all(np.array_equal(amx.product(x, xp, w)[0], want) for _ in range(20))

    with ThreadPoolExecutor(2) as pool:
        assert all(pool.map(run, jobs * 2))


def test_rows_per_item():
    """ROWS rows an item while every thread gets two; fewer, in whole pairs of tiles (32 rows), where not."""
    assert amx.rows_per_item(2048, 2) == amx.ROWS
    assert amx.rows_per_item(2048, 16) == 64
    assert amx.rows_per_item(512, 16) == amx.rows_per_item(32, 1) == 32
    assert amx.rows_per_item(8192, 16) == 256
    assert amx.rows_per_item(2048, 6) == 160
    for rows in range(32, 4096, 32):
        for workers in (1, 2, 3, 5, 8, 16, 64):
            step = amx.rows_per_item(rows, workers)
            assert step % 32 == 0 and 32 <= step <= amx.ROWS
            assert step == 32 or -(-rows // step) >= 2 * workers or step == amx.ROWS


@needs_amx
def test_float32_accuracy_as_sgemm():
    # Against float64: the tiles' error is of the float32 path's size (every product exact, sums in float32).
    rng = np.random.default_rng(7)
    w = bf16_weight(256, 1024, rng)
    x = rng.standard_normal((64, 1024)).astype(np.float32)
    wf = w.to_float(np.float32)
    truth = x.astype(np.float64) @ wf.astype(np.float64).T
    got = LINEAR._bf16_tiles(x, amx.split_bf16x3(x), w.data)
    sgemm = x @ wf.T
    rms = lambda a: float(np.sqrt(np.mean((a - truth) ** 2)))  # noqa: E731
    assert rms(got) <= 2 * rms(sgemm)


def test_product_refused_without_tiles(monkeypatch):
    # Called directly where the tiles are not lent (here: switched off), product refuses in Python rather than
    # reaching a tile instruction, which would end the process.
    monkeypatch.setenv("LLAMA_REF_AMX", "0")
    x = np.ones((32, 32), np.float32)
    with pytest.raises(RuntimeError, match="AMX"):
        amx.product(x, amx.split_bf16x3(x), np.zeros((32, 32), np.uint16))


@needs_amx
@pytest.mark.parametrize("parts", [3, 1])
def test_same_bits_whatever_the_panel(parts):
    # A C tile stored after a panel and loaded back for the next is exact: panels of 64, 192 or KC k's (one K of
    # 2112 in 33, 11 or 2 panels, the last one short) give the same bits; so do the tiles' one pass on rounded
    # rows (parts=1).
    rng = np.random.default_rng(11)
    K, rows = 2112, 64
    w = bf16_weight(rows, K, rng).data
    x = rng.standard_normal((40, K)).astype(np.float32)
    if parts == 1:
        x = ((x.view(np.uint32) >> 16) << 16).view(np.float32)  # bf16 values: mid and lo are zero
    xp = amx.split_bf16x3(x, parts=parts)
    outs = []
    for kc in (64, 192, amx.KC):
        out = amx.aligned((xp.shape[1] * 16, rows), np.float32)
        panel = amx.aligned((amx.ROWS // 32, kc // 32, 2, 16, 32), np.uint16)
        amx._rows(xp, w, 0, rows, out, amx._CONFIG, panel)
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[2])
    np.testing.assert_array_equal(outs[1], outs[2])
    got, _ = amx.product(x, xp, w)
    np.testing.assert_array_equal(got, outs[2][:40])
