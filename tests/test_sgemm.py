"""kernels/sgemm.py, the Numba backend's float32 matrix product for sums="apart", against its NumPy twin here:
every output the sum of fused multiply-add chains over blocks of KB k's (llama_ref.model.ggml.fma rounds
exactly as vfmadd does), then the apart terms in fused pairs added as a tree, added last. Bit for bit, at any
shape (odd N, R, K, several blocks, K panels and row blocks), blocking and thread count, with the 256-bit tiles
(6 x 16) and, where the CPU has AVX-512F, the 512-bit ones (8 x 32)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_ref.model.ggml import fma

sgemm_mod = pytest.importorskip("llama_ref.kernels.sgemm")


def chain(x: np.ndarray, w: np.ndarray, cols=None, x_apart=None) -> np.ndarray:
    """The twin: out (N, R) = ((c0 + c1) + c2) + ..., c_b = fma(x[:, k1], w[:, k1], ... fma(x[:, k0], w[:, k0],
    +0)) over block b's k's k0 .. k1 (KB a block), x's columns cols as zeros; then + ((p01 + p23) + (p45 +
    p67)), p01 = fma(xa1, wa1, xa0 * wa0) of x_apart and w[:, cols]."""
    x = x.copy()
    if cols is not None:
        x[:, cols] = 0
    N, K = x.shape
    total = np.zeros((N, w.shape[0]), np.float32)  # (N, R)
    for b0 in range(0, K, sgemm_mod.KB):
        acc = np.zeros_like(total)
        for k in range(b0, min(K, b0 + sgemm_mod.KB)):
            acc = fma(x[:, k, None], w[None, :, k], acc)
        total = acc if b0 == 0 else total + acc
    if cols is None:
        return total
    xa, wa = x_apart[:, None, :], w[None, :, cols]  # (N, 1, 8), (1, R, 8)
    pairs = [fma(xa[..., j + 1], wa[..., j + 1], xa[..., j] * wa[..., j]) for j in range(0, 8, 2)]
    return total + ((pairs[0] + pairs[1]) + (pairs[2] + pairs[3]))


def operands(seed, N, K, R, big=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, K), dtype=np.float32)
    if big and K >= 3:  # a few columns 25x the rest, as a prefill's activations hold
        x[:, rng.choice(K, 3, replace=False)] *= 25
    w = rng.standard_normal((R, K), dtype=np.float32)
    return x, w


def apart_of(x, seed):
    cols = np.sort(np.random.default_rng(seed).choice(x.shape[1], 8, replace=False)).astype(np.int64)
    return cols, np.ascontiguousarray(x[:, cols])


# Blockings that cut these shapes into several K panels, x blocks and w blocks, with and without `part` (x blocks
# of 12 and 18 rows: not whole 8-row wide tiles, which the kernel rounds them to)
BLOCKINGS = [None, (16, 12, 32, 1, 4 << 20), (24, 6, 16, 0, 0), (8, 18, 48, 1, 1024)]
# The tiles this CPU runs: 256-bit everywhere, 512-bit with AVX-512F
WIDES = [False, True] if sgemm_mod.HAS_AVX512 else [False]


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 40), K=st.integers(1, 200), R=st.integers(1, 70), seed=st.integers(0, 2**16),
       blocking=st.sampled_from(BLOCKINGS), threads=st.sampled_from([1, 2, 3]), wide=st.sampled_from(WIDES))
def test_sgemm_is_one_fma_chain_per_output(N, K, R, seed, blocking, threads, wide):
    x, w = operands(seed, N, K, R)
    got = sgemm_mod.sgemm(x, w, threads=threads, blocking=blocking, wide=wide)
    np.testing.assert_array_equal(got, chain(x, w))


@settings(max_examples=40, deadline=None)
@given(N=st.integers(1, 40), K=st.integers(8, 200), R=st.integers(1, 70), seed=st.integers(0, 2**16),
       blocking=st.sampled_from(BLOCKINGS), threads=st.sampled_from([1, 2]), wide=st.sampled_from(WIDES))
def test_sgemm_apart_leaves_the_columns_out_and_adds_them_last(N, K, R, seed, blocking, threads, wide):
    x, w = operands(seed, N, K, R)
    cols, x_apart = apart_of(x, seed)
    got = sgemm_mod.sgemm(x, w, cols, x_apart, threads=threads, blocking=blocking, wide=wide)
    np.testing.assert_array_equal(got, chain(x, w, cols, x_apart))


@pytest.mark.parametrize("N,K,R", [(200, 576, 192), (37, 1536, 100), (13, 2048, 48), (7, 100, 20)])
def test_sgemm_bits_do_not_depend_on_blocking_or_threads(N, K, R):
    """The model's widths (several default panels; w's last rows not a whole tile): the same bits whatever
    the blocking and thread count, and the twin's on a sample of outputs."""
    x, w = operands(N + K + R, N, K, R)
    cols, x_apart = apart_of(x, 1)
    ref = sgemm_mod.sgemm(x, w, cols, x_apart)
    for blocking in BLOCKINGS[1:]:
        for threads in (1, 2):
            for wide in WIDES:
                np.testing.assert_array_equal(sgemm_mod.sgemm(x, w, cols, x_apart, threads, blocking, wide), ref)
    rows = np.arange(0, N, 7)
    np.testing.assert_array_equal(ref[rows], chain(x[rows], w, cols, x_apart[rows]))


def test_sgemm_twin_can_fail():
    """The twin is strict: a product summed in another order (NumPy's BLAS, one chain over K) differs in some
    last bits."""
    x, w = operands(3, 64, 576, 96)
    assert not np.array_equal(x @ w.T, chain(x, w))
    one = np.zeros((64, 96), np.float32)
    for k in range(576):
        one = fma(x[:, k, None], w[None, :, k], one)
    assert not np.array_equal(one, chain(x, w))


def test_sgemm_special_values():
    """NaN and inf travel as in the chain: an inf in w under a zeroed (apart) column of x gives NaN there
    (0 * inf), as NumPy's product over x with the column zeroed does."""
    x, w = operands(5, 9, 40, 20, big=False)
    w[3, 7] = np.inf
    x[2, 11] = np.nan
    cols, x_apart = apart_of(x, 2)
    with np.errstate(invalid="ignore"):
        want = chain(x, w, cols, x_apart)
    for wide in WIDES:
        got = sgemm_mod.sgemm(x, w, cols, x_apart, wide=wide)
        np.testing.assert_array_equal(got, want)
        assert np.isnan(got[2]).all()


def test_sgemm_wide_choice(monkeypatch):
    """The 512-bit tiles are taken by default on an AVX-512 CPU other than AMD's Zen (LLAMA_REF_SGEMM_WIDE=0 / 1
    overrides), never where AVX-512F is missing, and asking for them there is refused by name."""
    import llvmlite.binding as binding

    for forced, name, feats, want in [("", "sapphirerapids", "+avx512f,+avx2", (True, True)),
                                      ("", "znver4", "+avx512f,+avx2", (True, False)),
                                      ("0", "sapphirerapids", "+avx512f", (True, False)),
                                      ("1", "znver4", "+avx512f", (True, True)),
                                      ("1", "znver3", "+avx2,-avx512f", (False, False))]:
        monkeypatch.setenv("LLAMA_REF_SGEMM_WIDE", forced)
        monkeypatch.setattr(sgemm_mod, "HOST_IS_ZEN", name.startswith("znver"))  # ggml_simd's, from the CPU's name
        monkeypatch.setattr(binding, "get_host_cpu_features", lambda f=feats: type("F", (), {"flatten": lambda s: f})())
        assert sgemm_mod._host_wide() == want, (forced, name)
    monkeypatch.setattr(sgemm_mod, "HAS_AVX512", False)
    x, w = operands(1, 4, 16, 8)
    with pytest.raises(ValueError, match="AVX-512F"):
        sgemm_mod.sgemm(x, w, wide=True)
