"""llama_ref.tools.precision: the float32 error budget against float64, and float32's distance from float64 on the
default model next to Hugging Face transformers' (tests/data/float64_distance.json)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llama_ref
from llama_ref.model import ops
from llama_ref.tools.capture import activation_names
from llama_ref.tools.cli import main
from llama_ref.tools.precision import ADD, OPS, error_budget

from tiny import tiny_model

TOKENS = [3, 17, 42, 5, 9, 60, 1, 33, 12, 7, 50, 2]
DISTANCES = Path(__file__).parent / "data" / "float64_distance.json"
TINY_DISTANCES = Path(__file__).parent / "data" / "tiny_float64_distance.json"
EPS32 = float(np.finfo(np.float32).eps)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_budget_of_a_float32_pass_is_float32_rounding(backend):
    budget = error_budget(tiny_model(backend=backend, n_layers=3), tiny_model(dtype=np.float64, n_layers=3), TOKENS)
    assert [s.name for s in budget.steps] == activation_names(3)
    assert budget.step("embeddings").own == {"embedding": 0.0}  # a lookup: nothing to round
    ops_seen = {op for s in budget.steps for op in s.own}
    assert ops_seen == set(OPS) | {ADD}
    for s in budget.steps:
        # Each operation alone rounds like a few float32 operations, far from float16's 1e-3.
        assert all(0 <= rel < 64 * EPS32 for rel in s.own.values()), (s.name, s.own)
        assert 0 <= s.accumulated < 64 * EPS32, s.name
    assert 0 < budget.logits_max_abs < 1e-4 * budget.logits_scale
    assert set(budget.attribution) == set(OPS) - {"embedding"}
    assert all(0 <= err <= 4 * budget.logits_max_abs for err in budget.attribution.values())


def _float16_output(name: str) -> types.ModuleType:
    """llama_ref.model.ops with one operation's result rounded to float16: a port that loses precision there."""
    backend = types.ModuleType(f"lossy_{name}")
    for fn in OPS + ("rope_frequencies", "rope_tables"):
        setattr(backend, fn, getattr(ops, fn))
    op = getattr(ops, name)
    setattr(backend, name, lambda *a: op(*a).astype(np.float16).astype(np.float32))
    return backend


@pytest.mark.parametrize("lossy", ["rms_norm", "linear", "apply_rope", "attention", "swiglu"])
def test_budget_names_the_operation_that_loses_precision(lossy):
    model32, model64 = tiny_model(n_layers=3), tiny_model(dtype=np.float64, n_layers=3)
    clean = error_budget(model32, model64, TOKENS, attribute=False)
    model32.ops = _float16_output(lossy)
    budget = error_budget(model32, model64, TOKENS)
    table = budget.by_layer()
    for layer in range(3):
        worst = max((op for op in table if op != "accumulated"), key=lambda op: table[op][layer])
        assert worst == lossy
        assert table[lossy][layer] > 1e-4  # float16's rounding, 2^-11 relative at most
    assert max(budget.attribution, key=budget.attribution.get) == lossy
    assert budget.logits_max_abs > 10 * clean.logits_max_abs


def test_attention_rounds_the_same_whatever_the_layout_of_q():
    """q straight from a transposed matrix product (head axis strided) gives the float32 result bit for bit:
    the layout once changed how einsum summed q.k, and tripled the attention's rounding error."""
    rng = np.random.default_rng(0)
    B, T, H, KVH, HD = 1, 24, 6, 2, 64
    q = rng.standard_normal((B, T, H, HD), dtype=np.float32)
    k, v = rng.standard_normal((2, B, T, KVH, HD), dtype=np.float32)
    strided = np.asfortranarray(q.reshape(T, H * HD)).reshape(B, T, H, HD)
    assert not strided.flags.c_contiguous and np.array_equal(strided, q)
    assert np.array_equal(ops.attention(strided, k, v, 0), ops.attention(q, k, v, 0))


def _closer_than_one_chain(product, x, rng):
    """product(x, w) on x (24, K) given as (2, 12, K) and random w (200, K): float32, its error against float64
    under a quarter of one float32 chain's over all inputs, and within one float32 rounding of sum |x w|."""
    N, K, R = x.shape[0], x.shape[1], 200
    w = rng.standard_normal((R, K), dtype=np.float32) / np.float32(np.sqrt(K))
    exact = x.astype(np.float64) @ w.astype(np.float64).T  # (N, R)
    one_chain = np.add.accumulate(x[:, None, :] * w[None], axis=-1, dtype=np.float32)[..., -1]  # (N, R)
    ours = product(x.reshape(2, 12, K), w).reshape(N, R)
    assert ours.dtype == np.float32
    err = np.abs(ours - exact).max()
    assert err < 0.25 * np.abs(one_chain - exact).max()
    assert err < EPS32 * (np.abs(x).astype(np.float64) @ np.abs(w.astype(np.float64)).T).max()


@pytest.mark.parametrize("seed", range(3))
def test_blocked_sums_round_closer_than_one_chain(seed):
    """linear_blocked on activations with a few large columns (like a first token's massive activations):
    its float32 sums are far closer to float64 than one float32 chain over all inputs, and within one float32
    rounding of sum |x w| of it; a remainder of K past the last whole block is summed too."""
    rng = np.random.default_rng(seed)
    N, K = 24, 6 * ops.SUM_BLOCK + 40
    x = rng.standard_normal((N, K), dtype=np.float32)
    x[:, 5] *= 40
    x[0, 300] = 60
    _closer_than_one_chain(ops.linear_blocked, x, rng)


@pytest.mark.parametrize("seed", range(3))
def test_apart_sums_take_the_largest_terms_out_of_the_chains(seed):
    """linear_apart on activations with a few large columns: with those columns summed apart, what BLAS sums
    in its chains is of the other columns' scale, so the float32 result is far closer to float64 than one
    float32 chain over all inputs, and within one float32 rounding of sum |x w|."""
    rng = np.random.default_rng(seed)
    N, K = 24, 616
    x = rng.standard_normal((N, K), dtype=np.float32)
    x[:, 5] *= 40
    x[0, 300] = 60
    x[:, 600] *= -30
    _closer_than_one_chain(ops.linear_apart, x, rng)
    cols, rest = ops._apart(x, ops.APART)
    assert {5, 300, 600} <= set(cols.tolist()) and not rest[:, cols].any()
    assert np.array_equal(np.delete(rest, cols, axis=1), np.delete(x, cols, axis=1))


@pytest.mark.parametrize("seed", range(3))
def test_numba_apart_columns_are_numpys(seed):
    """kernels/sums.py's apart_rows, the Numba backend's choice of columns, is ops._apart_rows's: the same
    columns, zeroed rows and gathered values, for C- and Fortran-ordered rows; where columns tie at the cut
    (all-zero columns), it takes the lowest of them; a column holding a NaN counts as the largest."""
    from llama_ref.kernels.sums import apart_rows

    rng = np.random.default_rng(seed)
    for N, K in [(16, 4 * ops.APART), (40, 616), (200, 1536)]:
        x = rng.standard_normal((N, K), dtype=np.float32)
        x[:, 5] *= 40
        x[N // 2, K // 3] = -60
        want = ops._apart_rows(x, ops.APART)
        for rows in (x, np.asfortranarray(x)):
            got = apart_rows(rows, ops.APART)
            assert [a.dtype for a in got] == [np.int64, np.float32, np.float32]
            assert all(np.array_equal(a, b) for a, b in zip(got, want))
    x = np.zeros((16, 64), np.float32)
    x[:, [3, 40]] = rng.standard_normal((16, 2), dtype=np.float32)  # 2 non-zero columns, 62 tied at 0
    cols, rest, x_apart = apart_rows(x, ops.APART)
    zeros = [k for k in range(64) if k not in (3, 40)]
    assert cols.tolist() == sorted({3, 40} | set(zeros[:ops.APART - 2]))
    assert not rest.any() and np.array_equal(x_apart, x[:, cols])
    x[5, 20] = np.nan  # a NaN column counts as the largest, as in NumPy's argpartition
    cols, rest, x_apart = apart_rows(x, ops.APART)
    assert {3, 20, 40} <= set(cols.tolist()) and len(set(cols.tolist())) == ops.APART
    assert {3, 20, 40} <= set(ops._apart_rows(x, ops.APART)[0].tolist())


def _numba_apart_twin(x: np.ndarray, w: np.ndarray, rows=None) -> np.ndarray:
    """The Numba backend's sums="apart" product in NumPy (kernels/sgemm.py's sums, the twin of
    tests/test_sgemm.py): the columns ops._apart_rows chooses over all of x, then for each output (of x's
    `rows`, default all) fused multiply-add chains over blocks of sgemm.KB k's, with those columns as zeros,
    added in block order, plus the APART terms as fused pairs added as a tree. Bit for bit at any thread
    count."""
    from llama_ref.kernels.sgemm import KB
    from llama_ref.model.ggml import fma

    cols, rest, x_apart = ops._apart_rows(x.reshape(-1, x.shape[-1]), ops.APART)  # (8,), (N, K), (N, 8)
    if rows is not None:
        rest, x_apart = rest[rows], x_apart[rows]
    n, K = rest.shape
    total = np.zeros((n, w.shape[0]), np.float32)  # (n, R)
    for b0 in range(0, K, KB):
        acc = np.zeros_like(total)
        for k in range(b0, min(K, b0 + KB)):
            acc = fma(rest[:, k, None], w[None, :, k], acc)
        total = acc if b0 == 0 else total + acc
    xa, wa = x_apart[:, None, :], w[None, :, cols]  # (n, 1, 8), (1, R, 8)
    pairs = [fma(xa[..., j + 1], wa[..., j + 1], xa[..., j] * wa[..., j]) for j in range(0, ops.APART, 2)]
    return total + ((pairs[0] + pairs[1]) + (pairs[2] + pairs[3]))


@pytest.mark.parametrize("seed", range(3))
def test_numba_apart_terms_are_summed_by_themselves_added_last(seed, monkeypatch):
    """kernels/sums.apart_product, the Numba backend's sums="apart" product (kernels/sgemm.py): the bits of
    its NumPy twin at one and two threads (the same bits: each output's chain does not depend on how w's
    rows are shared out), within two float32 roundings of sum |x w| of ops.linear_apart (BLAS's chains), w's
    rows not a multiple of SIMD lanes; other than APART columns or float32: None (ops.linear_apart's path).
    Against ops.linear_apart (BLAS's chains: other orders of the same K + 1 roundings), the two results are
    each within gamma_(K+1) sum |x w| of the exact one: apart by at most twice that."""
    from llama_ref.kernels import sums as numba_sums
    from llama_ref.runtime import threads

    rng = np.random.default_rng(seed)
    for N, R, K in [(16, 8, 32), (40, 301, 616), (200, 1536, 576)]:
        x = rng.standard_normal((N, K), dtype=np.float32)
        x[:, 5] *= 40
        x[N // 2, K // 3] = -60
        w = rng.standard_normal((R, K), dtype=np.float32) / np.float32(np.sqrt(K))
        cols, rest, x_apart = numba_sums.apart_rows(x, ops.APART)
        monkeypatch.setattr(threads, "count", lambda: 1)
        one = numba_sums.apart_product(rest, x_apart, cols, w)
        rows = np.unique(np.r_[0, N // 2, N - 1, rng.choice(N, min(N, 6), replace=False)])  # the twin's rows
        assert one.flags.c_contiguous and np.array_equal(one[rows], _numba_apart_twin(x, w, rows))
        monkeypatch.setattr(threads, "count", lambda: 2)
        assert np.array_equal(numba_sums.apart_product(rest, x_apart, cols, w), one)
        u = EPS32 / 2  # float32's unit roundoff
        gamma = (K + 1) * u / (1 - (K + 1) * u)
        bound = 2 * gamma * (np.abs(x).astype(np.float64) @ np.abs(w.astype(np.float64)).T)  # (N, R)
        assert np.all(np.abs(one - ops.linear_apart(x, w, by_rows=True)) <= bound)
    x, w = rng.standard_normal((20, 64), dtype=np.float32), rng.standard_normal((33, 64), dtype=np.float32)
    cols, rest, x_apart = numba_sums.apart_rows(x, 5)
    assert numba_sums.apart_product(rest, x_apart, cols, w) is None  # 5 columns: BLAS's path
    cols, rest, x_apart = numba_sums.apart_rows(x, ops.APART)
    assert numba_sums.apart_product(rest.astype(np.float64), x_apart, cols, w) is None


@pytest.mark.parametrize("seed", range(3))
def test_apart_sums_blas_adds_the_largest_terms_onto_the_rest(seed, monkeypatch):
    """linear_apart's second product (the largest terms, added onto the first by sgemm with beta = 1) is made
    by NumPy's own OpenBLAS, found through ctypes, and gives the bits of the NumPy formula it replaces,
    `out += w[:, cols] @ rows[:, cols].T`; in the Numba backend's layout (by_rows) the output is
    C-contiguous, within two float32 roundings of sum |x w| of linear's layout; x transposed in memory (a
    transposed product's output) changes nothing; float64 and strided arrays take the NumPy formula."""
    import glob
    import os
    here = os.path.dirname(np.__file__)
    if glob.glob(os.path.join(here + ".libs", "*openblas*")) + glob.glob(os.path.join(here, ".dylibs", "*openblas*")):
        assert ops._sgemm() is not None  # NumPy's wheel: its OpenBLAS must be the one adding
    rng = np.random.default_rng(seed)
    N, K, R = 40, 616, 300
    x = rng.standard_normal((2, N // 2, K), dtype=np.float32)
    x[..., 5] *= 40
    x[0, 3, 300] = 60
    w = rng.standard_normal((R, K), dtype=np.float32) / np.float32(np.sqrt(K))
    xt = np.asfortranarray(x.reshape(N, K)).reshape(x.shape)  # the same values, transposed in memory
    got = {by_rows: ops.linear_apart(x, w, by_rows=by_rows) for by_rows in (False, True)}
    assert got[True].flags.c_contiguous and got[True].dtype == np.float32
    for by_rows in (False, True):
        assert np.array_equal(ops.linear_apart(xt, w, by_rows=by_rows), got[by_rows])
    monkeypatch.setattr(ops, "_SGEMM", [None])  # no BLAS to call: NumPy's formula
    for by_rows in (False, True):
        assert np.array_equal(ops.linear_apart(x, w, by_rows=by_rows), got[by_rows])
    bound = 2 * EPS32 * (np.abs(x).astype(np.float64) @ np.abs(w.astype(np.float64)).T)  # (2, N/2, R)
    assert np.all(np.abs(got[True].astype(np.float64) - got[False]) <= bound)
    monkeypatch.setattr(ops, "_SGEMM", [])  # found again
    a, b = w[:, ::2].copy(), x.reshape(N, K)[:, 1::2]  # (R, K/2) and a strided (N, K/2)
    out = rng.standard_normal((R, N), dtype=np.float32)
    assert np.array_equal(ops._add_product(a, b, out.copy()), out + a @ b.T)
    a, b = w[:, 64:128], x.reshape(N, K)[:, 64:128]  # slices of columns: BLAS reads them in place
    assert ops._blas_layout(a) == (False, K) and ops._blas_layout(b.T) == (True, K)
    assert np.array_equal(ops._add_product(a, b, out.copy()), out + a @ b.T)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    assert ops.linear_apart(x64, w64).dtype == np.float64
    assert np.allclose(ops.linear_apart(x64, w64), x64 @ w64.T, rtol=0, atol=1e-12)


def test_apart_rest_is_summed_in_chains_added_in_order():
    """linear_apart's product of x with its apart columns zeroed: chains of CHAIN k's from k = 0, each chain
    one product, their sums added in order (+0 first); the Numba backend's kernels/sgemm.py has the same
    chains (KB), and a K that is not a whole number of chains ends in a shorter one."""
    from llama_ref.kernels import sgemm

    assert sgemm.KB == ops.CHAIN
    rng = np.random.default_rng(0)
    for N, R, K in [(20, 33, 616), (17, 40, 64), (5, 9, 130)]:
        a, b = rng.standard_normal((R, K), dtype=np.float32), rng.standard_normal((N, K), dtype=np.float32)
        expected = np.zeros((R, N), np.float32)
        for k0 in range(0, K, ops.CHAIN):
            expected = expected + a[:, k0:k0 + ops.CHAIN] @ b[:, k0:k0 + ops.CHAIN].T
        assert np.array_equal(ops._product_in_chains(a, b), expected)
        assert np.array_equal(ops._product_in_chains(a, np.asfortranarray(b)), expected)


def _one_rounding_from_exact(got: np.ndarray, x: np.ndarray, w: np.ndarray) -> None:
    """Each output of got (N, R) float32 lies within one float32 rounding of the exact x @ w.T: math.fsum of the
    products (each exact in float64) is the exact sum rounded once to float64; a float64 sum in another order
    may be off it by K float64 ulps of sum |x w|, which can move a value lying that close to a halfway point."""
    import math

    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    exact = np.array([[math.fsum(x64[n] * w64[r]) for r in range(w.shape[0])] for n in range(x.shape[0])])
    spread = x.shape[1] * 2.0 ** -52 * (np.abs(x64) @ np.abs(w64).T)  # (N, R)
    half_ulp = np.spacing(np.abs(got)).astype(np.float64) / 2
    assert got.dtype == np.float32
    assert np.all(np.abs(got.astype(np.float64) - exact) <= half_ulp + spread)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 17), k=st.integers(1, 200), r=st.integers(1, 23), seed=st.integers(0, 2**32 - 1))
def test_float64_sums_round_once(n, k, r, seed):
    """ops.linear_float64_sums and its Numba twin (kernels/sums.float64_sums): every output within one float32
    rounding of the exact sum, whatever the shapes (R % 4 != 0, odd N, K = 1); x with a few entries 10^3 times
    the rest (massive activations); a (B, T, K) input keeps its shape; the twins agree bit for bit but where a
    sum lies within the float64 spread of a halfway point (not met on these seeds)."""
    from llama_ref.kernels.sums import float64_sums

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k), dtype=np.float32)
    x[:, rng.integers(0, k, 2)] *= 1000
    w = rng.standard_normal((r, k), dtype=np.float32)
    got = ops.linear_float64_sums(x, w)
    _one_rounding_from_exact(got, x, w)
    _one_rounding_from_exact(float64_sums(x, w), x, w)
    assert np.array_equal(float64_sums(x[None], w), got[None])  # (1, N, K) -> (1, N, R)
    assert np.array_equal(ops.linear_float64_sums(x[None], w), got[None])


def test_float64_sums_blocks_and_inputs(monkeypatch):
    """linear_float64_sums widens w a block of rows at a time (FLOAT64_BLOCK bytes): blocks of one row and of
    every row give the same bits; a packed weight is widened as linear widens it; the Numba twin takes strided
    and read-only inputs, and other dtypes or packed weights fall back to NumPy's."""
    from llama_ref.kernels.sums import float64_sums
    from llama_ref.weights.packed import Q8_0Weight

    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 96), dtype=np.float32)
    w = rng.standard_normal((37, 96), dtype=np.float32)
    want = ops.linear_float64_sums(x, w)
    for block in (8 * 96, 1 << 30):  # one row a block, all rows in one
        monkeypatch.setattr(ops, "FLOAT64_BLOCK", block)
        assert np.array_equal(ops.linear_float64_sums(x, w), want)
    assert np.array_equal(float64_sums(np.asfortranarray(x), w[:, :]), want)
    frozen = w.copy()
    frozen.flags.writeable = False
    assert np.array_equal(float64_sums(x, frozen), want)
    packed = Q8_0Weight.quantize(w)
    assert np.array_equal(ops.linear_float64_sums(x, packed), ops.linear_float64_sums(x, packed.to_float(np.float32)))
    assert np.array_equal(float64_sums(x, packed), ops.linear_float64_sums(x, packed))
    assert float64_sums(x.astype(np.float64), w).dtype == np.float64  # NumPy's, in x's dtype


def test_float64_sums_kernel_takes_the_vectors_it_asks_for():
    """kernels/sums._float64_sums asks LLVM for 512-bit vectors where WIDE_FLOAT64 (an Intel AVX-512 core):
    its float64 multiply-adds are then in zmm registers, elsewhere in 256-bit ones or narrower; and it
    prefetches the next rows of w."""
    import numba

    from llama_ref.kernels import sums
    from llama_ref.kernels._common import FAST

    # compiled afresh: Numba shows no code of a kernel loaded from its cache
    kernel = numba.njit(parallel=True, fastmath=FAST)(sums._float64_sums.py_func)
    kernel(np.ones((5, 64)), np.ones((9, 64), np.float32), np.empty((5, 9), np.float32))
    asm = "\n".join(kernel.inspect_asm().values())
    fmas = [line for line in asm.splitlines() if "vfmadd" in line and "pd" in line.split()[0]]
    assert fmas, "no vectorized float64 multiply-adds"
    assert any("zmm" in line for line in fmas) == sums.WIDE_FLOAT64
    assert "prefetch" in asm


def test_sums_keep_what_is_already_summed_in_short_chains(monkeypatch):
    """Products over fewer than two blocks stay linear's; the Numba backend keeps its own kernels for packed
    weights under 16 rows (from 16, "apart" decodes them a tile at a time), either backend its own product for a
    decode step (one position a sequence, a batch of them too:
    BLAS's sgemv, the Numba kernels' SIMD lanes); a few positions' products are summed in float64 (NumPy
    "apart": fewer than 16 rows, the Numba backend: fewer than its F32_BLAS_MIN_ROWS), and both sum longer
    float32 products alike."""
    from llama_ref import kernels
    from llama_ref.kernels.linear import F32_BLAS_MIN_ROWS
    from llama_ref.kernels.sums import float64_sums
    from llama_ref.weights.packed import Q8_0Weight

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 4 * ops.SUM_BLOCK), dtype=np.float32)
    x_short = rng.standard_normal((5, ops.SUM_BLOCK + 1), dtype=np.float32)
    w_short = rng.standard_normal((64, ops.SUM_BLOCK + 1), dtype=np.float32)
    assert np.array_equal(ops.linear_blocked(x_short, w_short), ops.linear(x_short, w_short))
    for product in (ops.linear_blocked, ops.linear_apart):
        assert product(np.zeros((0, w.shape[1]), np.float32), w).shape == (0, w.shape[0])
    few = rng.standard_normal((F32_BLAS_MIN_ROWS - 1, w.shape[1]), dtype=np.float32)
    many = rng.standard_normal((F32_BLAS_MIN_ROWS, w.shape[1]), dtype=np.float32)
    packed = Q8_0Weight.quantize(w)
    from llama_ref.runtime import threads
    two = ops.with_sums(kernels, "apart")
    monkeypatch.setattr(threads, "count", lambda: 2)  # kernels/sums.apart_product: blocks of w's rows, 2 threads
    at_two = two.linear(many, w)
    monkeypatch.setattr(threads, "count", lambda: 1)  # below: one thread
    bound = 2 * EPS32 * (np.abs(many).astype(np.float64) @ np.abs(w.astype(np.float64)).T)  # (N, R)
    assert at_two.flags.c_contiguous and np.array_equal(at_two, two.linear(many, w))  # sgemm: any thread count
    for sums, product in ops.SUMS.items():
        numba, numpy = ops.with_sums(kernels, sums), ops.with_sums(ops, sums)
        assert numba.attention is kernels.attention and numba.linear is not kernels.linear
        assert np.array_equal(numba.linear(few, w), float64_sums(few, w))  # 15 positions
        steps = few[:, None, :]  # (15, 1, K): a batch of decode steps
        assert np.array_equal(numba.linear(steps, w), kernels.linear(steps, w))
        if sums == "apart":  # ("blocked" sums NumPy's products from 2 rows)
            assert np.array_equal(numpy.linear(steps, w), ops.linear(steps, w))
        if sums == "apart":  # the Numba backend's own chains (kernels/sgemm.py), its apart terms added in registers
            assert np.array_equal(numba.linear(many, w), _numba_apart_twin(many, w))
            assert np.all(np.abs(numba.linear(many, w) - product(many, w, by_rows=True)) <= bound)
        else:
            assert np.array_equal(numba.linear(many, w), product(many, w))
        if sums == "apart":  # a packed weight decoded a tile at a time, each tile by sgemm: the whole's bits
            assert np.array_equal(numba.linear(many, packed), _numba_apart_twin(many, packed.to_float(np.float32)))
        else:
            assert np.array_equal(numba.linear(many, packed), kernels.linear(many, packed))
        assert np.array_equal(numba.linear(few, packed), kernels.linear(few, packed))  # under 16 rows: its own
        assert np.array_equal(numpy.linear(many, w), product(many, w))
        assert np.array_equal(numpy.linear(many, packed), product(many, packed))
        assert np.array_equal(numpy.linear(few[:1], w), ops.linear(few[:1], w))  # decode
        assert not np.array_equal(product(many, w), ops.linear(many, w))  # summed otherwise
    assert np.array_equal(ops.with_sums(ops, "blocked").linear(few, w), ops.linear_blocked(few, w))
    assert np.array_equal(ops.with_sums(ops, "apart").linear(few, w), ops.linear_float64_sums(few, w))
    with pytest.raises(llama_ref.LlamaRefError, match="sums must be 'apart', 'blocked' or 'blas'"):
        llama_ref.load("no-such-model", sums="kahan")
    for sums in ops.SUMS:
        with pytest.raises(llama_ref.LlamaRefError, match="arithmetic='exact' in one process"):
            llama_ref.load("no-such-model", sums=sums, arithmetic="ggml")


@pytest.mark.parametrize("threads_n", [1, 2])
def test_numba_apart_packed_weights_by_tiles(threads_n, monkeypatch):
    """The Numba backend's sums="apart" on packed weights (kernels/sums._packed_apart): w decoded a tile of rows at
    a time (tiles cut small here, so there are several, the last one short), each multiplied by sgemm with the apart
    columns: the bits of the whole decoded matrix's product, at one and two threads, for 16-bit and quantized
    formats; bf16 weights that linear multiplies on AMX tiles keep its own product (kernels/sums.packed_apart)."""
    import sys

    from llama_ref import kernels
    from llama_ref.runtime import threads
    from llama_ref.weights.packed import BF16Weight, F16Weight, Q4_0Weight, Q8_0Weight

    lin = sys.modules["llama_ref.kernels.linear"]  # the module (the package's `linear` is its function)
    monkeypatch.setattr(lin, "TILE_FLOATS", 20 * 256)  # 20 rows of 256 a 16-bit tile
    monkeypatch.setattr(lin, "TILE_ROWS", 24)
    monkeypatch.setattr(threads, "count", lambda: threads_n)
    rng = np.random.default_rng(threads_n)
    w = rng.standard_normal((70, 256), dtype=np.float32)
    x = rng.standard_normal((1, 19, 256), dtype=np.float32)
    x[..., 9] *= 40
    summed = ops.with_sums(kernels, "apart")
    for packed in (F16Weight(w.astype(np.float16).view(np.uint16), w.shape), Q8_0Weight.quantize(w),
                   Q4_0Weight.quantize(w)):
        want = _numba_apart_twin(x, packed.to_float(np.float32)).reshape(1, 19, 70)
        assert np.array_equal(summed.linear(x, packed), want), packed.format
        assert not np.array_equal(want, kernels.linear(x, packed))  # not the backend's own sums
    bf16 = BF16Weight((w.view(np.uint32) >> 16).astype(np.uint16), w.shape)
    if kernels.amx.available():  # tiles only where the CPU has them (the first one elsewhere kills the process)
        monkeypatch.setattr(lin, "_on_tiles", lambda kind, N, K, R: kind == "bf16")  # as where AMX takes it
        assert np.array_equal(summed.linear(x, bf16), kernels.linear(x, bf16))
    monkeypatch.setattr(lin, "_on_tiles", lambda kind, N, K, R: False)
    assert np.array_equal(summed.linear(x, bf16), _numba_apart_twin(x, bf16.to_float(np.float32)).reshape(1, 19, 70))


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_apart_linears_share_one_column_choice(backend, monkeypatch):
    """with_sums(backend, "apart").linears(x, *ws), the products that read the same x (wq, wk, wv; w1, w3):
    x's columns chosen once, each weight's product the bits of .linear(x, w) (the choice depends on x only);
    packed weights in the Numba backend, decode rows and float64 take the backend's own product as before,
    and "blocked" and a prompt of fewer than 16 positions (float64 sums) take them one by one."""
    from llama_ref import kernels
    from llama_ref.kernels import sums as numba_sums
    from llama_ref.weights.packed import Q8_0Weight

    own = kernels if backend == "numba" else ops
    rng = np.random.default_rng(1)
    K = 192  # whole Q8_0 blocks of 32
    x = rng.standard_normal((2, 20, K), dtype=np.float32)
    x[..., 7] *= 30
    x[1, 4, 150] = 80
    ws = [rng.standard_normal((R, K), dtype=np.float32) / np.float32(np.sqrt(K)) for R in (96, 32, 32)]
    calls = []  # the column choices made: NumPy's _apart, the Numba backend's _largest_columns
    module, name = (numba_sums, "_largest_columns") if backend == "numba" else (ops, "_apart")
    monkeypatch.setattr(module, name, lambda *a, f=getattr(module, name): calls.append(1) or f(*a))
    summed = ops.with_sums(own, "apart")
    one_by_one = [summed.linear(x, w) for w in ws]
    assert len(calls) == 3
    got = summed.linears(x, *ws)
    assert len(calls) == 4  # one choice for the three
    assert all(np.array_equal(a, b) and a.shape == b.shape for a, b in zip(got, one_by_one))
    assert not np.array_equal(got[0], own.linear(x, ws[0]))  # summed apart, not the backend's own
    packed = Q8_0Weight.quantize(ws[1])
    mixed = summed.linears(x, ws[0], packed, ws[2])
    assert all(np.array_equal(a, summed.linear(x, w)) for a, w in zip(mixed, (ws[0], packed, ws[2])))
    for few in (x[:1, :1], x[:, :1], x.astype(np.float64)):  # a decode row, a batch of two, float64
        assert all(np.array_equal(a, own.linear(few, w)) for a, w in zip(summed.linears(few, *ws), ws))
    few = x[:1, :15]  # a prompt of 15 positions: float64 sums, one weight at a time
    float64_sums = numba_sums.float64_sums if backend == "numba" else ops.linear_float64_sums
    assert all(np.array_equal(a, float64_sums(few, w)) for a, w in zip(summed.linears(few, *ws), ws))
    blocked = ops.with_sums(own, "blocked")
    assert all(np.array_equal(a, blocked.linear(x, w)) for a, w in zip(blocked.linears(x, *ws), ws))


def test_error_budget_needs_a_float32_and_a_float64_model():
    with pytest.raises(llama_ref.LlamaRefError, match="float32 model and a float64 model"):
        error_budget(tiny_model(dtype=np.float64), tiny_model(dtype=np.float64), TOKENS)


def test_cli_verify_against_float64(monkeypatch, capsys):
    monkeypatch.setattr("llama_ref.loading.load",
                        lambda name, backend="numpy", dtype=np.float32, **kw: tiny_model(dtype=dtype, backend=backend))
    assert main(["verify", "tiny", "--against", "float64", "--tokens", "3,17,42,5"]) == 0
    out = capsys.readouterr().out
    assert "float32 error budget (numpy backend, 4 tokens)" in out
    assert "largest: " in out and out.rstrip().splitlines()[-1].startswith("PASS")
    assert main(["verify", "tiny", "--against", "float64", "--tokens", "3,17", "--all", "--tolerance", "1e-12",
                 "--no-attribution"]) == 1
    out = capsys.readouterr().out
    assert "layers.1.attention.heads" in out and "FAIL: " in out and "only one kind" not in out
    assert main(["verify", "tiny", "--against", "float64", "--dtype", "float64", "--tokens", "3"]) == 2
    assert "leave --dtype at float32" in capsys.readouterr().err
    assert main(["verify", "tiny", "--reference", "ref.npz", "--tokens", "3"]) == 2
    assert "--prompt and --tokens go with --against" in capsys.readouterr().err


def test_cli_passes_sums_to_load(monkeypatch, capsys):
    seen = []

    def fake_load(name, backend="numpy", dtype=np.float32, sums="blas", **kw):
        seen.append((np.dtype(dtype).name, sums))
        return tiny_model(dtype=dtype, backend=backend)
    monkeypatch.setattr("llama_ref.loading.load", fake_load)
    assert main(["verify", "tiny", "--against", "float64", "--sums", "blocked", "--tokens", "3,17"]) == 0
    assert ("float32", "blocked") in seen  # the float32 model is the one measured with blocked sums

    def recording_load(name, backend="numpy", dtype=np.float32, sums="blas", **kw):
        seen.append((name, sums))
        raise llama_ref.LlamaRefError("stop after load")  # main reports it and returns 2
    monkeypatch.setattr("llama_ref.loading.load", recording_load)
    assert main(["generate", "-m", "tiny", "--sums", "blocked", "Hello", "-n", "1"]) == 2
    assert seen[-1] == ("tiny", "blocked")
    assert main(["generate", "-m", "tiny", "--sums", "apart", "Hello", "-n", "1"]) == 2
    assert seen[-1] == ("tiny", "apart")
    assert main(["generate", "-m", "tiny", "--sums", "blas", "Hello", "-n", "1"]) == 2
    assert seen[-1] == ("tiny", "blas")
    assert main(["generate", "-m", "tiny", "Hello", "-n", "1"]) == 2
    assert seen[-1] == ("tiny", None)  # load's own default: "apart" where it is implemented


# ---- the default model: llama_ref's float32 next to transformers' float32 ------------------------------

@pytest.fixture(scope="module")
def recorded():
    return json.loads(DISTANCES.read_text())


@pytest.fixture(scope="module")
def truth(default_model_path, recorded):
    """The float64 logits of every recorded prompt."""
    m64 = llama_ref.load(default_model_path, dtype=np.float64)
    return {name: m64.forward(ids) for name, ids in recorded["prompts"].items()}


def _distances(model, recorded, truth) -> dict:
    return {name: float(np.abs(model.forward(ids).astype(np.float64) - truth[name]).max())
            for name, ids in recorded["prompts"].items()}


@pytest.mark.slow  # a float64 and a float32 pass over 468 tokens: ~1 min on 2 cores
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_float32_as_close_to_float64_as_transformers(default_model_path, recorded, truth, backend):
    """On the six prompts of tests/data/float64_distance.json, llama_ref's float32 logits with BLAS's own sums
    (sums="blas") lie about as far from its float64 logits as transformers' float32 logits on the same weights
    (docs/verification.md, 2b).

    Both sum the matrix products in float32 inside BLAS, which makes nearly all of the error, and which prompt
    happens to round worse is chance (the last test shows the rest rounds better than transformers'). Measured
    means: NumPy 1.3x (AVX-512 machine) and 1.1x (AVX2 AMD EPYC), Numba 1.05x and 1.02x transformers' (its
    float32 on the AVX-512 machine: the recorded one, 12 % closer than on the AMD EPYC)."""
    ours = _distances(llama_ref.load(default_model_path, backend=backend, sums="blas"), recorded, truth)
    hf = _hf(recorded)
    print(f"\n{backend} float32 vs float64, max |dlogit| per prompt: "
          + " ".join(f"{ours[n]:.2e} (HF {hf[n]:.2e})" for n in hf))
    assert all(0 < d < 2e-4 for d in ours.values())
    assert np.mean(list(ours.values())) <= 1.5 * np.mean(list(hf.values()))


@pytest.mark.slow  # as above
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_apart_sums_closer_to_float64_than_transformers(default_model_path, recorded, truth, backend):
    """load(..., sums="apart"): float32 logits no further from float64 than transformers' float32 on the mean
    over the six prompts, and closer on at least half of them. Measured on the AVX2 AMD EPYC with the 8
    columns apart (ops.APART): means 0.91x (NumPy) and 0.89x (Numba) transformers' recorded ones, closer on
    4 of 6 (mean |dlogit|: 0.82x, 0.78x); Numba at two threads, its products by blocks of w's rows
    (kernels/sums.apart_product), 0.91x, closer on 4; with its own addition of the apart terms (a tree of
    fused pairs, kernels/sums._add_apart) 0.81x at two threads, closer on 5, and 0.87x at one; with 16
    columns 0.97x and 0.86x, closer on 4 and 5 (0.80x, 0.76x); before BLAS added the apart terms onto the
    rest's product (a second pass) 0.86x and 0.87x: the last bit of a sum decides which prompt rounds worse.
    Since session 31 the Numba backend's products are kernels/sgemm.py's (chains of 64 k's added in order,
    the apart terms added in registers): 0.66x, closer on 5; one chain over all of K instead put it at 1.27x
    (fails here), further than transformers' BLAS (chains of its K panel). The output head's product is summed
    apart too: left to the backend's own, 0.98x (NumPy, closer on 3) and 0.84x (Numba, closer on 5).
    On an AVX-512 AMD EPYC (OpenBLAS's SkylakeX kernels) NumPy's apart sums with BLAS's own chains were 1.25x
    (closer on 2: failed here), Numba's 0.62x (closer on 6); since session 34 NumPy sums the rest in the
    Numba backend's chains of 64 (ops.CHAIN) and rms_norm's squares in float64: 0.91x, closer on 4 (the two
    prompts of fewer than 16 tokens kept BLAS's product: 2.9x and 3.0x transformers' there). Since session 45
    a prompt's products of fewer than 16 rows are summed in float64 (ops.linear_float64_sums; Numba: 1.15x and
    0.91x with its own kernels' lanes before): those two at 0.39x and 0.79x (NumPy), 0.32x and 0.63x (Numba);
    closer on every prompt, means 0.46x and 0.55x (Intel Sapphire Rapids; the furthest 0.79x and 0.76x)."""
    ours = _distances(llama_ref.load(default_model_path, backend=backend, sums="apart"), recorded, truth)
    hf = _hf(recorded)
    print(f"\n{backend} apart sums vs float64: " + " ".join(f"{ours[n]:.2e} (HF {hf[n]:.2e})" for n in hf))
    assert all(0 < d < 2e-4 for d in ours.values())
    assert np.mean(list(ours.values())) <= 1.0 * np.mean(list(hf.values()))
    assert all(ours[n] < hf[n] for n in hf), [n for n in hf if ours[n] >= hf[n]]


@pytest.mark.slow  # as above
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_blocked_sums_closer_to_float64_than_transformers(default_model_path, recorded, truth, backend):
    """load(..., sums="blocked"): float32 logits closer to float64 than transformers' float32 on the mean over
    the six prompts and on at least four of them. Measured: means 0.68x (NumPy) and 0.70x (Numba)
    transformers' on the AVX-512 machine, 0.69x and 0.72x on the AMD EPYC, closer on 5 of 6 (NumPy not P0,
    Numba on the EPYC not P1; P0, 5 tokens, has a first token whose massive activations put every float32
    engine furthest there; float64 sums alone leave 2.8e-5 against transformers' 3.6e-5)."""
    ours = _distances(llama_ref.load(default_model_path, backend=backend, sums="blocked"), recorded, truth)
    hf = _hf(recorded)
    print(f"\n{backend} blocked sums vs float64: " + " ".join(f"{ours[n]:.2e} (HF {hf[n]:.2e})" for n in hf))
    assert all(0 < d < 2e-4 for d in ours.values())
    assert np.mean(list(ours.values())) <= 0.9 * np.mean(list(hf.values()))
    assert sum(ours[n] < hf[n] for n in hf) >= 4


@pytest.mark.slow
def test_float32_without_blas_sums_is_closer_than_transformers(default_model_path, recorded, truth):
    """Everything llama_ref computes itself, in float32, lies closer to float64 than transformers' float32 on
    every prompt: with only the matrix products' sums in float64 (inputs and outputs still float32), the
    logits' distance is a third of transformers' on average. What remains of the float32 error is BLAS's."""
    def linear(x, w):
        return (x.astype(np.float64) @ np.asarray(w, np.float64).T).astype(np.float32)

    backend = types.ModuleType("float64_sums")
    backend.__dict__.update({k: v for k, v in vars(ops).items() if not k.startswith("__")})
    backend.linear = linear
    base = llama_ref.load(default_model_path)
    model = llama_ref.Transformer(base.args, base.weights, backend=backend)
    hf = _hf(recorded)
    for name, ids in recorded["prompts"].items():
        logits = model.forward(ids)
        assert logits.dtype == np.float32
        assert 0 < np.abs(logits.astype(np.float64) - truth[name]).max() < hf[name], name


def _hf(recorded) -> dict:
    return {name: d["max_abs"] for name, d in recorded["engines"]["hf_float32"]["distance"].items()}


# ---- the tiny fixtures: llama_ref's float32 next to Meta's and transformers' float32 --------------------

@pytest.fixture(scope="module")
def tiny_recorded():
    return json.loads(TINY_DISTANCES.read_text())


@pytest.fixture(scope="module")
def tiny_truth(tiny_recorded):
    """The float64 logits of every recorded prompt on every tiny checkpoint."""
    root = Path(__file__).parents[1]
    out = {}
    for name, m in tiny_recorded["models"].items():
        m64 = llama_ref.load(root / m["checkpoint"], dtype=np.float64)
        out[name] = {p: m64.forward(ids) for p, ids in tiny_recorded["prompts"].items()}
    return out


@pytest.mark.slow  # four models' float64 and float32 passes over 8 prompts (325 tokens): ~6 s
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_tiny_fixtures_float32_as_close_to_float64_as_their_references(tiny_recorded, tiny_truth, backend):
    """On the tiny random checkpoints (Meta's llama31_bf16, llama2_fp16, llama32_tied, run by Meta's reference
    code; hf5_llama3, run by transformers 5), over the eight prompts of tests/data/tiny_float64_distance.json
    (5 to 128 tokens): llama_ref's float32 logits with load()'s default sums lie, on the mean over the prompts
    of max |dlogit|, no further from its float64 logits than the reference's float32 logits on the same weights
    (recorded on the AVX2 AMD EPYC; docs/verification.md, 2b). One prompt's maximum is one position's chance:
    per prompt any of them can be the closer. Measured there, as a multiple of the reference's mean: NumPy
    0.87x, 0.96x, 0.95x, 0.84x; Numba 0.96x, 0.93x, 0.88x, 0.73x (the Meta checkpoints' 16-bit matrices stay
    packed, so the Numba backend sums them in its own kernels' SIMD lanes at every length). NumPy with
    BLAS's own sums (sums="blas") is 1.04x and 1.07x on llama2_fp16 and llama32_tied: this test fails there.
    On the AVX-512 AMD EPYC (session 34): NumPy 0.77x, 0.85x, 0.81x, 0.78x; Numba 0.84x, 0.97x, 0.81x, 0.78x (its
    prompts of 9 tokens or more multiply the 16-bit matrices in OpenBLAS's SkylakeX sgemm, r80 on llama2_fp16
    at 1.37x). With the 16-bit decode kernels' first IR (session 34), which summed a row's last K % 64 values one
    by one (all 32 of dim 32), the 5-token prompt went from 0.55-0.75x to 1.07-1.21x and llama32_tied's mean to
    1.03x: it failed; the groups of 16 past the last whole 64 now go into the vector sums too."""
    root = Path(__file__).parents[1]
    for name, m in tiny_recorded["models"].items():
        model = llama_ref.load(root / m["checkpoint"], backend=backend)
        ours = {p: float(np.abs(model.forward(ids).astype(np.float64) - tiny_truth[name][p]).max())
                for p, ids in tiny_recorded["prompts"].items()}
        ref = {p: d["max_abs"] for p, d in m["distance"].items()}
        print(f"\n{backend} {name}: mean {np.mean(list(ours.values())):.2e} ({m['reference']} "
              f"{np.mean(list(ref.values())):.2e}); " + " ".join(f"{ours[p] / ref[p]:.2f}" for p in ref))
        assert all(0 < d < 1e-5 for d in ours.values()), name
        assert np.mean(list(ours.values())) <= 1.0 * np.mean(list(ref.values())), name


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_default_sums_are_apart_where_implemented(tmp_path, backend):
    """load()'s default sums: "apart" for arithmetic="exact" in one process (its float32 logits the closest to
    float64 at the speed of BLAS's own sums: docs/verification.md, 2b), the same bits as asking for it; asking for
    "blas" still gives BLAS's own sums, and a prompt of 20 tokens (16 rows or more) tells the two apart. A tiny
    GGUF (float32 matrices, so the Numba backend sums them too); the default model's distances: the slow tests
    above."""
    from test_cli import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    ids = np.arange(1, 21) * 3  # (20,)
    default = llama_ref.load(path, backend=backend).forward(ids)
    apart = llama_ref.load(path, backend=backend, sums="apart").forward(ids)
    blas = llama_ref.load(path, backend=backend, sums="blas").forward(ids)
    assert np.array_equal(default, apart)
    assert not np.array_equal(default, blas)
    np.testing.assert_allclose(default, blas, atol=1e-3)
    ggml = pytest.importorskip("gguf") and llama_ref.load(path, backend=backend, arithmetic="ggml")
    assert ggml.ops.__name__.endswith("ggml")  # "apart" is not implemented there: BLAS's sums, no error
