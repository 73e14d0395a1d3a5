"""arithmetic="ggml": llama.cpp's quantized arithmetic (llama_ref/model/ggml.py) and its Numba twin.

Each routine is checked against gguf.quants (a quantizer we did not write) or a block computed by hand; the
Numba kernels against the NumPy specification bit for bit; and the whole model against llama.cpp's own
logits (tests/data/llamacpp_ggml_logits.npz, made once by tests/fixtures/make_llamacpp_logits.py with
llama.cpp built for AVX-512, and tests/data/llamacpp_ggml_logits_avx2.npz, the same with llama.cpp built for
AVX2 only: the two builds differ, and each is checked against the specification's order for its `isa` on
any CPU).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llama_ref
from llama_ref.errors import InputError, LlamaRefError
from llama_ref.model import ggml
from llama_ref.model.transformer import Transformer
from llama_ref.weights.packed import Q4_0Weight, Q4_1Weight, Q5_0Weight, Q5_1Weight, Q8_0Weight, quantize_weights

from tiny import random_weights, tiny_args

FIXTURE = Path(__file__).parent / "data" / "llamacpp_ggml_logits.npz"
FIXTURES = {"avx512": FIXTURE, "avx2": Path(__file__).parent / "data" / "llamacpp_ggml_logits_avx2.npz"}
TYPES = {"q8_0": Q8_0Weight, "q4_0": Q4_0Weight, "q4_1": Q4_1Weight, "q5_0": Q5_0Weight, "q5_1": Q5_1Weight}


def compiled():
    from llama_ref.kernels import ggml as kernels_ggml
    return kernels_ggml


def f32_arrays(rows, cols, scale=1.0):
    """Float32 matrices (rows, cols) from a drawn seed: normal values, some blocks zero, some with outliers,
    some values on the half-integer grid (ties of the 8-bit rounding). Drawing a seed rather than each value
    keeps hypothesis fast on these sizes."""
    def build(seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        kind = seed % 4
        if kind == 1:
            x[:, :32] = 0  # a zero block
        elif kind == 2:
            x[rng.integers(rows), rng.integers(cols)] *= 100  # an outlier: the other values round coarsely
        elif kind == 3:
            x = np.round(x * 4) / 2  # multiples of 0.5
        return (x * np.float32(scale)).astype(np.float32)
    return st.integers(0, 2**32 - 1).map(build)


# ---- activations ---------------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(data=st.data(), nb=st.integers(1, 4), scale=st.sampled_from([1e-6, 1e-3, 1.0, 300.0]))
def test_quantize_row_q8_0_ref_is_gguf_quantizer(data, nb, scale):
    import gguf

    x = data.draw(f32_arrays(2, 32 * nb, scale))
    d, q = ggml.quantize_row_q8_0_ref(x)
    raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).reshape(2, nb, 34)  # d fp16 | 32 x int8
    assert np.array_equal(d, raw[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32))
    assert np.array_equal(q, raw[:, :, 2:].view(np.int8))


def test_quantize_row_q8_0_x86_rounds_ties_to_even_by_127_over_amax():
    """Worked by hand: amax = 127 gives d = 1 and id = 1, so x is rounded as it stands."""
    x = np.zeros((1, 32), np.float32)
    x[0, :6] = [127, 2.5, 1.5, -0.5, -2.5, 0.49]
    d, q = ggml.quantize_row_q8_0(x)
    assert d[0, 0] == 1 and list(q[0, 0, :6]) == [127, 2, 2, 0, -2, 0]  # ties to even (_mm256_round_ps)
    d_ref, q_ref = ggml.quantize_row_q8_0_ref(x)
    assert d_ref[0, 0] == 1 and list(q_ref[0, 0, :6]) == [127, 3, 2, -1, -3, 0]  # roundf: ties away from 0
    # The scale is kept as fp16: amax = 1 gives d = 1/127 rounded to fp16, q = x * (127 / amax).
    x[0, :6] = [1, 0.5, -0.25, 0, 0, 0]
    d, q = ggml.quantize_row_q8_0(x)
    assert d[0, 0] == np.float32(np.float16(np.float32(1) / np.float32(127)))
    assert list(q[0, 0, :3]) == [127, 64, -32]  # 63.5 -> 64 (even), -31.75 -> -32


def test_quantize_row_q8_0_zero_block():
    d, q = ggml.quantize_row_q8_0(np.zeros((1, 64), np.float32))
    assert not d.any() and not q.any()


def test_quantize_row_q8_1_sum_uses_unrounded_scale():
    x = np.zeros((1, 32), np.float32)
    x[0, :3] = [1, 0.5, -0.25]
    d, q, s = ggml.quantize_row_q8_1(x)
    d0, q0 = ggml.quantize_row_q8_0(x)
    assert np.array_equal(d, d0) and np.array_equal(q, q0)
    assert s[0, 0] == np.float32(np.float16(np.float32(1) / np.float32(127) * np.float32(127 + 64 - 32)))


# ---- dot products --------------------------------------------------------------------------------------------

def test_block_dots_by_hand():
    wq = np.arange(32, dtype=np.int8).reshape(1, 1, 32) - np.int8(16)  # -16 .. 15
    xq = np.full((1, 1, 32), 3, np.int8)
    lanes = ggml.block_dots(wq, xq, 8)  # lane j: 3 * (4 (4j - 16) + 6)
    assert lanes.tolist() == [[[[3 * (16 * j - 64 + 6) for j in range(8)]]]]
    assert ggml.block_dots(wq, xq, 1)[0, 0, 0, 0] == 3 * (-16)


def test_vec_dot_q8_0_by_hand():
    """Two blocks with power-of-two scales: every float step is exact, so the result is d_w d_x sum(q q)."""
    wq = np.ones((1, 2, 32), np.int8)
    xq = np.ones((1, 2, 32), np.int8) * np.int8(2)
    wd = np.array([[0.5, 0.25]], np.float32)
    xd = np.array([[2.0, 4.0]], np.float32)
    assert ggml.ggml_vec_dot_q8_0_q8_0(wq, wd, xq, xd)[0, 0] == 0.5 * 2 * 64 + 0.25 * 4 * 64
    assert ggml.ggml_gemv_q4_0_8x8_q8_0(wq, wd, xq, xd)[0, 0] == 0.5 * 2 * 64 + 0.25 * 4 * 64


def test_vec_dot_lanes_sum_in_avx2_order():
    """hsum_float_8 adds lane i to lane i + 4 first: with 1e8 in lane 0 and 4, and 1 in lane 1, the float32
    result keeps the 1 only because the large lanes cancel before it is added."""
    sumi = np.zeros((1, 1, 1, 8), np.int32)
    scale = np.ones((1, 1, 1), np.float32)
    sumi[..., 0], sumi[..., 4], sumi[..., 1] = 2 ** 20, -(2 ** 20), 1
    scale[:] = 2.0 ** 10  # lanes 2^30, -2^30, 2^10
    assert ggml.vec_dot_lanes(sumi, scale)[0, 0] == 2.0 ** 10


def test_linear_matches_dequantized_product_closely():
    """ggml's product is the exact one up to the activations' 8-bit rounding: within a few % of sum |x w|."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 256)).astype(np.float32)
    for cls in TYPES.values():
        w = cls.quantize(rng.standard_normal((24, 256)).astype(np.float32))
        exact = x @ w.to_float().T
        bound = np.abs(x) @ np.abs(w.to_float()).T
        assert np.all(np.abs(ggml.linear(x, w) - exact) <= 0.02 * bound)


@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(data=st.data(), kind=st.sampled_from(sorted(TYPES)), n=st.integers(1, 3), rows=st.integers(1, 20),
       nb=st.integers(1, 3), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_numba_equals_numpy_bit_for_bit(data, kind, n, rows, nb, scale):
    w = TYPES[kind].quantize(data.draw(f32_arrays(rows, 32 * nb)))
    x = data.draw(f32_arrays(n, 32 * nb, scale))
    expected = ggml.linear(x, w)
    got = compiled().linear(x, w)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_numba_equals_numpy_fixed_shapes(kind):
    """The fast tier's copy of the hypothesis test below: two shapes, every type, an outlier in x."""
    rng = np.random.default_rng(5)
    for n, rows, k in ((1, 24, 64), (3, 7, 96)):
        w = TYPES[kind].quantize(rng.standard_normal((rows, k)).astype(np.float32))
        x = rng.standard_normal((n, k)).astype(np.float32)
        x[0, 3] = 40
        assert np.array_equal(compiled().linear(x, w).view(np.uint32), ggml.linear(x, w).view(np.uint32))


def test_numba_q4_0_both_paths_equal_numpy():
    """Q4_0 with rows in groups of 8 takes the repacked (one-lane) order, otherwise the 8-lane one."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    for rows in (16, 13):
        w = Q4_0Weight.quantize(rng.standard_normal((rows, 128)).astype(np.float32))
        assert np.array_equal(compiled().linear(x, w), ggml.linear(x, w))
    lanes8 = ggml.ggml_vec_dot_q4_0_q8_0(*ggml.weight_blocks(w, slice(None))[:2], *ggml.quantize_row_q8_0(x)[::-1])
    assert np.array_equal(ggml.linear(x, w), lanes8)


# ---- the other operations --------------------------------------------------------------------------------------

@pytest.mark.parametrize("isa", ggml.ISAS)
def test_ggml_v_expf_close_to_exp(isa):
    x = np.linspace(-87, 0, 20001, dtype=np.float32)
    e = ggml.ggml_v_expf(x, isa)
    assert np.all(np.abs(e / np.exp(x.astype(np.float64)) - 1) < 3e-7)
    assert ggml.ggml_v_expf(np.array([-np.inf, -200.0], np.float32), isa).tolist() == [0.0, 0.0]
    assert ggml.ggml_v_expf(np.array([np.inf, 100.0], np.float32), isa).tolist() == [np.inf, np.inf]
    nan = np.array([np.nan], np.float32)
    assert ggml.ggml_v_expf(nan, isa).view(np.uint32) == nan.view(np.uint32)  # the argument itself
    tiny = np.array([-90.0, -100.0, -103.0], np.float32)  # subnormal results (126 < |n|: AVX2's split scaling)
    assert np.allclose(ggml.ggml_v_expf(tiny, isa), np.exp(tiny.astype(np.float64)), rtol=1e-6, atol=2.0 ** -149)


def test_ggml_v_expf_avx2_and_avx512_differ_in_the_last_rounding():
    """The two builds' polynomials round differently (AVX-512 adds the 1 inside the last FMA, AVX2 in
    fma(k, j, k)): about a quarter of the values of a grid differ, by one ulp at most."""
    x = np.linspace(-87, 0, 20001, dtype=np.float32)
    a, b = ggml.ggml_v_expf(x, "avx2"), ggml.ggml_v_expf(x, "avx512")
    ulps = np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32))
    assert 0.1 < (ulps != 0).mean() < 0.5 and ulps.max() == 1


def test_vec_dot_f16_order():
    """AVX-512: element i goes to lane i % 16 of accumulator (i % 64) // 16: 2^24 in lane 0 absorbs a 1 added
    to the same lane, but not a 1 in another accumulator that meets it only after 2^24 - 2^24 cancel.
    AVX2: lane i % 8 of accumulator (i % 32) // 8: element 8 is another accumulator, element 32 the same one."""
    x = np.zeros(64, np.float32)
    x[0], x[32], x[16] = 2.0 ** 11, -(2.0 ** 11), 1  # AVX-512: accumulators 0, 2, 1
    y = np.zeros(64, np.float32)
    y[0], y[32], y[16] = 2.0 ** 13, 2.0 ** 13, 1
    assert ggml.ggml_vec_dot_f16(x, y, "avx512") == 1
    for one, expected in ((8, 1), (32, 0)):  # AVX2: 2^24 (accumulator 0), -2^24 (accumulator 2), the 1
        x = np.zeros(64, np.float32)
        y = np.zeros(64, np.float32)
        x[0], x[16], x[one] = 2.0 ** 11, -(2.0 ** 11), 1
        y[0], y[16], y[one] = 2.0 ** 13, 2.0 ** 13, 1
        assert ggml.ggml_vec_dot_f16(x, y, "avx2") == expected


def test_vec_dot_f16_lane_reduction():
    """GGML_F32x8_REDUCE (AVX2) ends by adding the 128-bit halves, then neighbours: (0 + 1) + (2 + 3), where
    _mm512_reduce_add_ps ends with (0 + 2) + (1 + 3). Lanes 0, 1, 2 = 2^24, 1, -2^24: the AVX2 sum rounds the
    1 away, the AVX-512 one keeps it."""
    x = np.zeros(64, np.float32)
    y = np.ones(64, np.float32)
    x[0], x[1], x[2] = 2.0 ** 12, 1, -(2.0 ** 12)
    y[0], y[2] = 2.0 ** 12, 2.0 ** 12
    assert ggml.ggml_vec_dot_f16(x, y, "avx2") == 0
    assert ggml.ggml_vec_dot_f16(x, y, "avx512") == 1


def test_isa_choice(monkeypatch):
    """The build mirrored by default is the host's (AVX-512 F and DQ, else AVX2); LLAMA_REF_GGML_ISA chooses."""
    from numpy._core._multiarray_umath import __cpu_features__ as features

    monkeypatch.delenv("LLAMA_REF_GGML_ISA", raising=False)
    assert ggml.host_isa() == ("avx512" if features["AVX512F"] and features["AVX512DQ"] else "avx2")
    for isa in ggml.ISAS:
        monkeypatch.setenv("LLAMA_REF_GGML_ISA", isa)
        assert ggml.host_isa() == isa
    monkeypatch.setenv("LLAMA_REF_GGML_ISA", "neon")
    with pytest.raises(InputError, match="LLAMA_REF_GGML_ISA"):
        ggml.host_isa()
    with pytest.raises(InputError, match="isa must be"):
        ggml.ggml_v_expf(np.zeros(8, np.float32), "sse")


@pytest.mark.parametrize("isa", ggml.ISAS)
def test_numba_ops_equal_numpy_for_both_isas(isa):
    """kernels/ggml_ops.py's expf, attention and SwiGLU in either build's order, bit for bit."""
    from llama_ref.kernels import ggml_ops

    rng = np.random.default_rng(14)
    x = np.concatenate([np.linspace(-200, 100, 60001, dtype=np.float32),
                        np.array([-np.inf, np.inf, np.nan, 0, -0.0, -87.34, -103.97, 88.38], np.float32)])
    assert np.array_equal(ggml_ops.expf(x, isa).view(np.uint32), ggml.ggml_v_expf(x, isa).view(np.uint32))
    for B, T, H, KVH, HD, S in ((1, 1, 9, 3, 64, 70), (1, 3, 9, 3, 64, 3), (2, 5, 4, 2, 80, 40)):
        q = rng.standard_normal((B, T, H, HD)).astype(np.float32) * 3
        k = rng.standard_normal((B, S, KVH, HD)).astype(np.float32) * 3
        v = rng.standard_normal((B, S, KVH, HD)).astype(np.float32)
        got, expected = ggml_ops.attention(q, k, v, S - T, isa=isa), ggml.attention(q, k, v, S - T, isa=isa)
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    for n in (2, 20):  # the serial and the parallel kernel
        g = rng.standard_normal((n, 256)).astype(np.float32) * 10
        u = rng.standard_normal((n, 256)).astype(np.float32)
        assert np.array_equal(ggml_ops.swiglu(g, u, isa).view(np.uint32), ggml.swiglu(g, u, isa).view(np.uint32))


@pytest.mark.parametrize("isa", ggml.ISAS)
def test_numba_attention_serial_and_parallel_kernels_agree(isa):
    """A decode's attention runs on one thread (ggml_ops.SERIAL_WORK: no parallel region for ~0.1 ms of work),
    a long one on all: both kernels give the specification's bits, and the dispatch picks each where meant. Both
    read keys and values as the cache holds them, fp16 bits (uint16), the keys also in transposed blocks
    (ggml_ops.key_blocks)."""
    from llama_ref.kernels import ggml_ops

    rng = np.random.default_rng(7)
    for B, T, H, KVH, HD, S in ((1, 1, 32, 8, 64, 97), (2, 19, 6, 2, 72, 40), (1, 3, 9, 3, 64, 5)):
        q = rng.standard_normal((B, T, H, HD)).astype(np.float32) * 3
        k = rng.standard_normal((B, S, KVH, HD)).astype(np.float32) * 3
        v = rng.standard_normal((B, S, KVH, HD)).astype(np.float32)
        expected = ggml.attention(q, k, v, S - T, isa=isa).view(np.uint32)
        kh, vh = (ggml.fp16(a).astype(np.float16).transpose(0, 2, 1, 3).copy().view(np.uint16) for a in (k, v))
        kt = ggml_ops.key_blocks(kh, isa == "avx512")  # the keys transposed in blocks (a prefill's scores)
        for kernel in (ggml_ops._attention, ggml_ops._attention_serial):
            out = np.full(q.shape, np.nan, np.float32)
            kernel(q, kh, vh, S - T, np.float32(1 / np.sqrt(HD)), isa == "avx512", out, kt)
            assert np.array_equal(out.view(np.uint32), expected), kernel
    assert 1 * 1 * 32 * 4096 * 64 >= ggml_ops.SERIAL_WORK > 1 * 1 * 32 * 256 * 64  # 1B decode: serial to 256 keys


@settings(max_examples=40, deadline=None)
@given(isa=st.sampled_from(ggml.ISAS), B=st.integers(1, 2), T=st.integers(1, 11), start=st.integers(0, 150),
       heads=st.sampled_from([(1, 1), (4, 2), (9, 3), (8, 2), (5, 5), (12, 2)]),
       HD=st.sampled_from([8, 24, 40, 64, 72, 80, 128]), scale=st.sampled_from([0.1, 3.0, 30.0]),
       seed=st.integers(0, 2**32 - 1))
def test_numba_attention_equals_numpy_hypothesis(isa, B, T, start, heads, HD, scale, seed):
    """kernels/ggml_vec.py's attention (through ggml_ops.attention) against the specification, bit for bit,
    in both builds' orders: key counts that are no multiple of 8, 32 or 64 (the last vector of 8 keys partly
    empty, the softmax's last vector partly masked), head sizes with leftovers past 4 x 8 or 4 x 16 lanes
    (float64 tails), 1, 2 and 3 query heads per KV head row loaded (G = 1 .. 6), and scores from mild to
    large (probabilities that round to 0 in fp16)."""
    from llama_ref.kernels import ggml_ops

    H, KVH = heads
    rng = np.random.default_rng(seed)
    q = (rng.standard_normal((B, T, H, HD)) * scale).astype(np.float32)
    k = (rng.standard_normal((B, start + T, KVH, HD)) * 2).astype(np.float32)
    v = rng.standard_normal((B, start + T, KVH, HD)).astype(np.float32)
    got, expected = ggml_ops.attention(q, k, v, start, isa=isa), ggml.attention(q, k, v, start, isa=isa)
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    # handed the cache's float16 arrays (a prefill: model/cache.py's storage), read as their bits: the same bits
    k16, v16 = (ggml.fp16(a).astype(np.float16) for a in (k, v))
    assert np.array_equal(ggml_ops.attention(q, k16, v16, start, isa=isa).view(np.uint32), expected.view(np.uint32))
    # the decode step's path (kernels/ggml_step.py): the last query's scores from the keys' rows, read where they lie
    # in the cache as fp16 bits (uint16, one key row to the next KVH * HD apart): the same bits
    from llama_ref.kernels import ggml_step

    S = start + T
    kc, vc = (ggml.fp16(a[:1]).astype(np.float16).view(np.uint16) for a in (k, v))  # (1, S, KVH, HD), the cache's
    out = np.full((1, 1, H, HD), np.nan, np.float32)
    for j in range(KVH):
        ggml_step._attend_head(kc, vc, S, q[:1, T - 1:T].copy(), S - 1, np.float32(1 / np.sqrt(HD)), isa == "avx512",
                               out, j)
    assert np.array_equal(out.view(np.uint32), expected[:1, T - 1:T].view(np.uint32))


@settings(max_examples=30, deadline=None)
@given(isa=st.sampled_from(ggml.ISAS), n=st.integers(1, 100), scale=st.sampled_from([1.0, 30.0, 120.0]),
       seed=st.integers(0, 2**32 - 1))
def test_numba_expf_equals_numpy_hypothesis(isa, n, scale, seed):
    """The vector ggml_v_expf on any length (whole vectors of 8 or 16 lanes and a padded last one), with the
    special values among the lanes: NaN, infinities, the subnormal range (AVX2's split scaling past |n| 126)
    and past 192."""
    from llama_ref.kernels import ggml_ops

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * scale).astype(np.float32)
    special = np.array([np.nan, -np.inf, np.inf, -0.0, -95.0, -103.5, -140.0, 88.8, -200.0], np.float32)
    x[rng.integers(0, n, size=min(n, 4))] = rng.choice(special, size=min(n, 4))
    assert np.array_equal(ggml_ops.expf(x, isa).view(np.uint32), ggml.ggml_v_expf(x, isa).view(np.uint32))


@settings(max_examples=30, deadline=None)
@given(isa=st.sampled_from(ggml.ISAS), N=st.integers(1, 6), S=st.integers(1, 150),
       scale=st.sampled_from([1.0, 10.0, 60.0]), seed=st.integers(0, 2**32 - 1))
def test_numba_soft_max_equals_numpy_hypothesis(isa, N, S, scale, seed):
    """The attention's softmax rows (kernels/ggml_vec.soft_max_row): the float64 sum of the vectors' sums
    in the build's order (hsum_float_8 or _mm512_reduce_add_ps) and the fp16 probabilities, bit for bit,
    on any row length and any number of visible (unmasked) values."""
    from llama_ref.kernels import ggml_ops

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((N, S)) * scale).astype(np.float32)
    visible = rng.integers(1, S + 1, size=N)
    probs, totals = ggml_ops.soft_max(x, visible, isa)
    P = -(-S // 64) * 64
    w = np.full((N, P), -np.inf, np.float32)
    w[:, :S] = np.where(np.arange(S)[None, :] < visible[:, None], x, np.float32(-np.inf))
    e, total = ggml.ggml_vec_soft_max_f32(w, w.max(axis=1, keepdims=True), isa)
    assert np.array_equal(totals.view(np.uint64), total[:, 0].view(np.uint64))
    expected = ggml.fp16(e * (1.0 / total).astype(np.float32))[:, :S]
    assert np.array_equal(probs.view(np.uint32), expected.view(np.uint32))


@settings(max_examples=20, deadline=None)
@given(isa=st.sampled_from(ggml.ISAS), N=st.sampled_from([1, 3, 17]), F=st.integers(1, 70),
       scale=st.sampled_from([1.0, 20.0, 100.0]), seed=st.integers(0, 2**32 - 1))
def test_numba_swiglu_equals_numpy_hypothesis(isa, N, F, scale, seed):
    """SwiGLU's rows in vectors of 8 and the last F % 8 values one by one, serial and parallel, bit for bit
    (gates far enough out for expf's subnormal and overflow branches)."""
    from llama_ref.kernels import ggml_ops

    rng = np.random.default_rng(seed)
    g = (rng.standard_normal((N, F)) * scale).astype(np.float32)
    u = rng.standard_normal((N, F)).astype(np.float32)
    assert np.array_equal(ggml_ops.swiglu(g, u, isa).view(np.uint32), ggml.swiglu(g, u, isa).view(np.uint32))


def test_numba_attention_can_fail():
    """The check above sees a one-ulp change: the other build's order gives other bits on the same inputs."""
    from llama_ref.kernels import ggml_ops

    rng = np.random.default_rng(5)
    q = rng.standard_normal((1, 8, 9, 64)).astype(np.float32) * 3
    k = rng.standard_normal((1, 140, 3, 64)).astype(np.float32) * 2
    v = rng.standard_normal((1, 140, 3, 64)).astype(np.float32)
    avx2, avx512 = (ggml_ops.attention(q, k, v, 132, isa=isa) for isa in ("avx2", "avx512"))
    assert not np.array_equal(avx2.view(np.uint32), avx512.view(np.uint32))
    assert np.array_equal(avx2.view(np.uint32), ggml.attention(q, k, v, 132, isa="avx2").view(np.uint32))


def test_rope_tables_follow_ggml_power_series():
    args = tiny_args()
    freqs = ggml.rope_frequencies(args)
    cos, sin = ggml.rope_tables(freqs, 7, 2, np.float32)
    ref_cos, ref_sin = llama_ref.model.ops.rope_tables(freqs, 7, 2, np.float32)
    assert cos.shape == ref_cos.shape and np.allclose(cos, ref_cos, atol=1e-5) and np.allclose(sin, ref_sin, atol=1e-5)


def test_simd_routines_equal_llamacpp_avx2():
    """llama.cpp's AVX2 build's ggml_vec_dot_f16, ggml_vec_soft_max_f32, ggml_vec_silu_f32 and
    ggml_vec_swiglu_f32, called one by one (tests/data/llamacpp_simd_ops_avx2.npz,
    tests/fixtures/make_llamacpp_simd_ops.py): the specification with isa="avx2" and its Numba twin equal them
    bit for bit, and the AVX-512 order does not (on every routine: the test can fail)."""
    from llama_ref.kernels import ggml_ops

    f = np.load(Path(__file__).parent / "data" / "llamacpp_simd_ops_avx2.npz")
    assert json.loads(str(f["meta"]))["isa"] == "avx2"

    def same(a, b):
        return np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))

    x, g = f["silu_x"], f["swiglu_g"]
    sm = f["soft_max_x"]
    for isa, equal in (("avx2", True), ("avx512", False)):
        for n in (64, 80, 200):
            got = ggml.ggml_vec_dot_f16(f[f"f16_x_{n}"].astype(np.float32), f[f"f16_y_{n}"].astype(np.float32), isa)
            assert same(got, f[f"f16_dot_{n}"]) == equal, (isa, n)
        e, total = ggml.ggml_vec_soft_max_f32(sm, sm.max(axis=1, keepdims=True), isa)
        assert same(e, f["soft_max_y"]) == equal and same(total[:, 0], f["soft_max_sum"]) == equal
        silu = x / (np.float32(1) + ggml.ggml_v_expf(-x, isa))
        assert same(silu, f["silu_y"]) == equal
        assert same(ggml.swiglu(x, g, isa), f["swiglu_y"]) == equal
        assert same(ggml_ops.swiglu(x[None], g[None], isa)[0], f["swiglu_y"]) == equal
        probs, totals = ggml_ops.soft_max(sm, np.full(len(sm), sm.shape[1]), isa)  # the attention's vectors
        assert same(totals, f["soft_max_sum"]) == equal
        expected = ggml.fp16(f["soft_max_y"] * (1.0 / f["soft_max_sum"]).astype(np.float32)[:, None])
        assert same(probs, expected) or not equal


# ---- the model ---------------------------------------------------------------------------------------------

def test_tiny_model_numba_equals_numpy_in_ggml_mode():
    args = tiny_args()
    weights = quantize_weights(random_weights(args, seed=3), "q8_0")
    a = Transformer(args, weights, backend=ggml.backend_for("numpy", weights, "tiny"))
    b = Transformer(args, weights, backend=ggml.backend_for("numba", weights, "tiny"))
    tokens = np.array([1, 5, 9, 2, 7])
    la = np.concatenate([a.forward(tokens[:3]), a.forward(tokens[3:], start_pos=3)])
    lb = np.concatenate([b.forward(tokens[:3]), b.forward(tokens[3:], start_pos=3)])
    assert np.array_equal(la, lb)
    exact = Transformer(args, weights).forward(tokens)
    assert not np.array_equal(la, exact) and np.allclose(la, exact, atol=0.1)


def test_load_refuses_what_ggml_mode_cannot_do(default_model_path):
    with pytest.raises(LlamaRefError, match="arithmetic must be"):
        llama_ref.load(default_model_path, arithmetic="fast")
    with pytest.raises(InputError, match="weights must be 'packed'"):
        llama_ref.load(default_model_path, arithmetic="ggml", weights="float32")
    with pytest.raises(InputError, match="float32"):
        llama_ref.load(default_model_path, arithmetic="ggml", dtype=np.float64)
    args = tiny_args()
    weights = quantize_weights(random_weights(args), "int8")
    with pytest.raises(InputError, match="is int8; arithmetic='ggml' implements"):
        ggml.backend_for("numpy", weights, "tiny")


@pytest.mark.slow
def test_load_in_ggml_mode(default_model_path):
    m = llama_ref.load(default_model_path, arithmetic="ggml", backend="numba")
    assert m.arithmetic == "ggml" and m.backend_name == "numba"
    assert Transformer.arithmetic == "exact"


# ---- against llama.cpp -----------------------------------------------------------------------------------------

def _fixture_script():
    spec = importlib.util.spec_from_file_location("make_llamacpp_logits",
                                                  Path(__file__).parent / "fixtures" / "make_llamacpp_logits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llamacpp():
    return np.load(FIXTURE)


@pytest.fixture(scope="module", params=ggml.ISAS)
def build(request):
    """(isa, fixture): each build's llama.cpp logits, with the order the specification mirrors for it."""
    return request.param, np.load(FIXTURES[request.param])


@pytest.fixture(scope="module")
def ggufs(default_model_path, tmp_path_factory):
    """The fixture's GGUFs, rebuilt with the fixture script's quantizer (the files are not committed)."""
    script = _fixture_script()
    work = tmp_path_factory.mktemp("ggml_ggufs")
    return {kind: script.quantized_gguf(Path(default_model_path), work / f"{kind}.gguf", kind)
            for kind in script.TYPES}


def test_fixture_meta(build):
    isa, fixture = build
    meta = json.loads(str(fixture["meta"]))
    assert meta["type_k"] == meta["type_v"] == "f16" and meta["one_token_per_call"] and meta["n_threads"] == 2
    assert ("AVX512 = 1" in meta["system_info"]) == (isa == "avx512") and "AVX2 = 1" in meta["system_info"]


def _decode(model, ids):
    """Logits of every position, one token per forward call (the path ggml mode mirrors)."""
    return np.concatenate([model.forward(ids[t:t + 1], start_pos=t) for t in range(len(ids))])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_logits_and_greedy_chains_equal_llamacpp(kind, ggufs, build, monkeypatch):
    """Bit for bit, for each build of llama.cpp (AVX-512, AVX2) with the specification in its order: the 64
    largest logits at every prompt position, every logit at the last position of prompt 0, the argmax
    everywhere, and 32 greedy tokens (Numba backend; it equals NumPy bit for bit). The fixtures hold every
    prompt's chain for every type; all of them matched when this was written."""
    isa, llamacpp = build
    monkeypatch.setattr(ggml, "ISA", isa)
    script = _fixture_script()
    assert script.sha256(ggufs[kind]) == str(llamacpp[f"{kind}_sha256"])
    model = llama_ref.load(ggufs[kind], arithmetic="ggml", backend="numba")
    for i in range(len(script.PROMPTS)):
        ids = llamacpp[f"prompt_ids_{i}"]
        logits = _decode(model, ids)
        top_ids = llamacpp[f"{kind}_p{i}_top_ids"]
        assert np.array_equal(np.take_along_axis(logits, top_ids, axis=1), llamacpp[f"{kind}_p{i}_top"])
        assert np.array_equal(logits.argmax(axis=1), llamacpp[f"{kind}_p{i}_argmax"])
        if i == 0:
            assert np.array_equal(logits[-1], llamacpp[f"{kind}_p0_last"])
        if kind != "q8_0" and i != 0:
            continue  # the suite's time: every chain is checked for Q8_0, the first prompt's for the others
        chain, pos, nxt = [], len(ids), int(logits[-1].argmax())
        for _ in range(script.GREEDY):
            chain.append(nxt)
            nxt = int(model.forward(np.array([nxt]), start_pos=pos)[-1].argmax())
            pos += 1
        assert chain == llamacpp[f"{kind}_p{i}_greedy"].tolist()


@pytest.mark.slow
def test_numpy_specification_equals_llamacpp(ggufs, build, monkeypatch):
    """The NumPy specification itself, on the shortest prompt, Q8_0 and Q4_0, for each build."""
    isa, llamacpp = build
    monkeypatch.setattr(ggml, "ISA", isa)
    for kind in ("q8_0", "q4_0"):
        model = llama_ref.load(ggufs[kind], arithmetic="ggml", backend="numpy")
        logits = _decode(model, llamacpp["prompt_ids_0"])
        assert np.array_equal(logits[-1], llamacpp[f"{kind}_p0_last"])


@pytest.mark.slow
def test_the_two_builds_differ(ggufs, monkeypatch):
    """The AVX-512 and the AVX2 build's logits are not the same numbers, and the specification in one
    build's order does not give the other's: a test of either fixture can fail. Q8_0, prompt 1 (18 tokens)."""
    avx512, avx2 = np.load(FIXTURES["avx512"]), np.load(FIXTURES["avx2"])
    assert not np.array_equal(avx512["q8_0_p1_top"], avx2["q8_0_p1_top"])
    ids = avx512["prompt_ids_1"]
    for isa, other in (("avx512", avx2), ("avx2", avx512)):
        monkeypatch.setattr(ggml, "ISA", isa)
        logits = _decode(llama_ref.load(ggufs["q8_0"], arithmetic="ggml", backend="numba"), ids)
        assert not np.array_equal(np.take_along_axis(logits, other["q8_0_p1_top_ids"], axis=1), other["q8_0_p1_top"])


@pytest.mark.slow
def test_cli_generates_llamacpp_greedy_chain(ggufs, llamacpp):
    """`llama-ref generate --arithmetic ggml` (a batch prefill, then decode) gives llama.cpp's greedy tokens
    (the AVX-512 build's, chosen by LLAMA_REF_GGML_ISA)."""
    import os
    import subprocess
    import sys

    prompt = _fixture_script().PROMPTS[0]
    done = subprocess.run([sys.executable, "-m", "llama_ref.tools.cli", "generate", "-m", str(ggufs["q8_0"]),
                           "--arithmetic", "ggml", "--backend", "numba", "--temp", "0", "--ignore-eos", "-n", "12",
                           "--json", "-q", prompt], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LLAMA_REF_GGML_ISA": "avx512"})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["prompt_ids"] == llamacpp["prompt_ids_0"].tolist()
    assert out["ids"] == llamacpp["q8_0_p0_greedy"][:12].tolist()


@pytest.mark.parametrize("kind", ["q5_0", "q5_1"])
def test_q5_weights_are_gguf_blocks(kind):
    """Q5_0 / Q5_1 kept one byte per value: dequantized as gguf.quants does, and the file's bytes rebuilt."""
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, kind.upper())
    x = np.random.default_rng(2).standard_normal((6, 96)).astype(np.float32) * 3
    raw = gguf.quants.quantize(x, qtype)
    w = TYPES[kind](raw, x.shape)
    assert np.array_equal(w.to_float(), gguf.quants.dequantize(raw, qtype))
    assert np.array_equal(w.raw_blocks(), raw)
    from llama_ref import kernels  # exact mode's Numba kernels read the same bytes (Q8_0's, Q5_K's kernels)
    x = np.random.default_rng(3).standard_normal((2, 96)).astype(np.float32)
    dense = w.to_float()
    assert np.allclose(kernels.linear(x, w), x @ dense.T, rtol=0, atol=1e-4)
    assert np.array_equal(kernels.embedding(np.array([4, 1]), w, np.float32), dense[[4, 1]])
    q, d, m = ggml.weight_blocks(w, slice(None))
    lo, hi = (-16, 15) if kind == "q5_0" else (0, 31)
    assert q.min() >= lo and q.max() <= hi and (m is None) == (kind == "q5_0")
