"""Each Numba kernel equals its NumPy twin in llama_ref.model.ops; packed weights decode exactly as gguf does.

Shapes are drawn by hypothesis, including odd sizes, sizes that are not a multiple of a block or of the
SIMD width, GQA ratios 1/2/4/8 and queries at the very end of the cache. Kernels compile once (cached on
disk), whatever the shapes: every call passes the same array types.
"""

from __future__ import annotations

import importlib

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_ref import kernels
from llama_ref.model import ops
from llama_ref.weights import packed
from llama_ref.model.config import ModelArgs
from llama_ref.runtime import threads

FEW = settings(max_examples=12, deadline=None)

BLOCK_TYPES = [packed.Q8_0Weight, packed.Q4_0Weight, packed.Q4_1Weight, packed.Q4_KWeight,
               packed.Q5_KWeight, packed.Q6_KWeight]


def dot_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A float32 rounding bound for x @ w.T: a few ulps of sum_k |x_k w_k|, whatever the summation order."""
    k = x.shape[-1]
    return 4 * k * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T)


def random_packed(fmt: str, rows: int, cols: int, rng) -> packed.PackedWeight:
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if fmt == "f16":
        return packed.F16Weight(w.astype(np.float16).view(np.uint16), w.shape)
    if fmt == "bf16":
        return packed.BF16Weight((w.view(np.uint32) >> 16).astype(np.uint16), w.shape)
    if fmt in KQUANTS:
        # gguf.quants cannot quantize to K-quants: random quants and sub-block scales under finite,
        # realistic super-block scales (d, and dmin for Q4_K/Q5_K).
        cls, fp16_at = KQUANTS[fmt]
        blocks = rng.integers(0, 256, (rows, cols // 256, cls.type_size), dtype=np.uint8)
        for at in fp16_at:
            scale = rng.uniform(0.001, 0.02, (rows, cols // 256)).astype(np.float16)
            blocks[:, :, at:at + 2] = scale[..., None].view(np.uint8)
        return cls(blocks.reshape(rows, -1), (rows, cols))
    return packed.QUANTIZERS[fmt].quantize(w)


KQUANTS = {"q4_k": (packed.Q4_KWeight, [0, 2]), "q5_k": (packed.Q5_KWeight, [0, 2]),
           "q6_k": (packed.Q6_KWeight, [208])}


# ---- packed formats decode exactly as gguf.quants -------------------------------------------------------

@pytest.mark.parametrize("cls", BLOCK_TYPES, ids=lambda c: c.format)
@given(rows=st.integers(1, 5), blocks=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
@FEW
def test_block_dequantization_matches_gguf(cls, rows, blocks, seed):
    # Random bytes cover every bit pattern of the scales and quants (NaN and inf scales included).
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, blocks * cls.type_size), dtype=np.uint8)
    w = cls(raw, (rows, blocks * cls.block_size))
    with np.errstate(invalid="ignore", over="ignore"):
        expected = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, cls.ggml_type))
        np.testing.assert_array_equal(w.to_float(np.float32), expected)
        ids = rng.integers(0, rows, (2, 3))
        np.testing.assert_array_equal(w.rows(ids, np.float32), expected[ids])
    # Formats regrouped at load for the kernels still give back the file's bytes, bit for bit.
    np.testing.assert_array_equal(w.raw_blocks(), raw)
    np.testing.assert_array_equal(w.raw_blocks(ids[0]), raw[ids[0]])


@given(rows=st.integers(1, 6), cols=st.integers(1, 40), seed=st.integers(0, 2**32 - 1))
@FEW
def test_16bit_dequantization_matches_gguf(rows, cols, seed):
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2**16, (rows, cols), dtype=np.uint16)
    with np.errstate(invalid="ignore", over="ignore"):
        np.testing.assert_array_equal(packed.F16Weight(bits, (rows, cols)).to_float(),
                                      gguf.quants.dequantize(bits.view(np.uint8), gguf.GGMLQuantizationType.F16))
        np.testing.assert_array_equal(packed.BF16Weight(bits, (rows, cols)).to_float(),
                                      gguf.quants.dequantize(bits.view(np.uint8), gguf.GGMLQuantizationType.BF16))


@pytest.mark.parametrize("fmt", ["q8_0", "q4_0", "q4_1"])
def test_quantize_matches_gguf_bytes(fmt):
    # Quantizing at load must give the very blocks llama.cpp's own quantizer writes.
    w = np.random.default_rng(1).standard_normal((7, 96)).astype(np.float32)
    ours = packed.QUANTIZERS[fmt].quantize(w)
    theirs = gguf.quants.quantize(w, getattr(gguf.GGMLQuantizationType, fmt.upper()))
    np.testing.assert_array_equal(ours.raw_blocks(), theirs)


def test_int8_quantization_error_is_half_a_step():
    w = np.random.default_rng(2).standard_normal((9, 50)).astype(np.float32)
    q = packed.Int8Weight.quantize(w)
    step = np.abs(w).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(q.to_float() - w) <= 0.5 * step * (1 + 1e-5))
    assert np.all(np.abs(q.data) <= 127)


def test_bad_block_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of the block size"):
        packed.Q8_0Weight(np.zeros((2, 34), np.uint8), (2, 33))


# ---- kernels equal their NumPy twins --------------------------------------------------------------------

@given(n=st.integers(1, 9), d=st.integers(1, 130), seed=st.integers(0, 2**32 - 1))
@FEW
def test_rms_norm(n, d, seed):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal((1, n, d))).astype(np.float32)
    w = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    np.testing.assert_allclose(kernels.rms_norm(x, w, 1e-5), ops.rms_norm(x, w, 1e-5), rtol=2e-6, atol=1e-6)


def test_rms_norm_parallel_and_float64():
    # Large chunks take the parallel variant; float64 goes to the NumPy twin unchanged.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 300, 150)).astype(np.float32)
    w = rng.standard_normal(150).astype(np.float32)
    np.testing.assert_allclose(kernels.rms_norm(x, w, 1e-6), ops.rms_norm(x, w, 1e-6), rtol=2e-6, atol=1e-6)
    x64 = x.astype(np.float64)
    np.testing.assert_array_equal(kernels.rms_norm(x64, w, 1e-6), ops.rms_norm(x64, w, 1e-6))


FORMATS = ["f32", "f16", "bf16", "int8", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"]


@pytest.mark.parametrize("fmt", FORMATS)
@given(n=st.sampled_from([1, 2, 3, 8, 13, 16, 21]), rows=st.integers(1, 70), blocks=st.integers(1, 5),
       extra=st.integers(0, 31), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=8, deadline=None)
def test_linear(fmt, n, rows, blocks, extra, seed):
    # n < 8 runs the matrix-vector kernels on the stored format, n >= 8 the tiled BLAS path; float32 weights
    # stay in their kernel (pairs of x rows and an odd one left, blocks of 4 weight rows) up to n = 15.
    rng = np.random.default_rng(seed)
    block = {"q8_0": 32, "q4_0": 32, "q4_1": 32, "q4_k": 256, "q5_k": 256, "q6_k": 256}.get(fmt, 1)
    cols = blocks * 32 + extra if block == 1 else blocks * block  # odd widths where the format allows them
    x = rng.standard_normal((1, n, cols)).astype(np.float32)
    w = rng.standard_normal((rows, cols)).astype(np.float32) if fmt == "f32" else random_packed(fmt, rows, cols, rng)
    got, want = kernels.linear(x, w), ops.linear(x, w)
    assert got.shape == want.shape == (1, n, rows)
    dense = w if fmt == "f32" else w.to_float(np.float32)
    assert np.all(np.abs(got - want)[0] <= dot_bound(x[0], dense) + 1e-30)


def test_linear_f32_every_decode_batch_size():
    # A batch of decode rows (B, 1, K), as the server feeds it: every B up to the BLAS switch and past it,
    # with weights whose rows fill the kernel's blocks of 4 partly (1, 3, 6) or not (8).
    rng = np.random.default_rng(6)
    for rows in (1, 3, 6, 8):
        w = rng.standard_normal((rows, 45)).astype(np.float32)
        for b in range(1, 18):
            x = rng.standard_normal((b, 1, 45)).astype(np.float32)
            got, want = kernels.linear(x, w), ops.linear(x, w)
            assert got.shape == want.shape == (b, 1, rows)
            assert np.all(np.abs(got - want)[:, 0] <= dot_bound(x[:, 0], w) + 1e-30), (rows, b)


def test_linear_float64_uses_the_reference():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 64))
    w = random_packed("q8_0", 5, 64, rng)
    np.testing.assert_array_equal(kernels.linear(x, w), ops.linear(x, w))


LINEAR = importlib.import_module("llama_ref.kernels.linear")  # the module: kernels.linear is the function


@pytest.mark.parametrize("fmt", ["f16", "bf16"])
@given(n=st.sampled_from([1, 2, 7]), rows=st.lists(st.integers(1, 70), min_size=2, max_size=3),
       cols=st.integers(1, 300), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=12, deadline=None)
def test_linears_16bit_one_region_is_linear_bit_for_bit(fmt, n, rows, cols, seed):
    # wq/wk/wv (or w1/w3) in one parallel region: the rows of every weight, each weight's last block of 4
    # rows partly filled or not, give exactly what linear gives them one at a time.
    rng = np.random.default_rng(seed)
    ws = [random_packed(fmt, r, cols, rng) for r in rows]
    x = rng.standard_normal((1, n, cols)).astype(np.float32)
    calls = []
    together = LINEAR.SIXTEEN[fmt]
    with pytest.MonkeyPatch.context() as mp:  # hypothesis runs many examples per function-scoped fixture
        mp.setitem(LINEAR.SIXTEEN, fmt, lambda *a: calls.append(1) or together(*a))
        got = kernels.linears(x, *ws)
    assert calls == [1]  # one kernel call for all the weights
    assert len(got) == len(ws)
    for g, w in zip(got, ws):
        assert g.shape == (1, n, w.shape[0])
        np.testing.assert_array_equal(g, kernels.linear(x, w))


def test_linears_falls_back_to_linear_one_by_one(monkeypatch):
    # float32 weights, mixed formats, prefill-sized x (BLAS), one or four weights and float64 x: linear
    # per weight, the same values.
    rng = np.random.default_rng(8)
    monkeypatch.setattr(LINEAR, "SIXTEEN", {})  # the one-region path would now fail: it must not be taken
    f32 = [rng.standard_normal((r, 96)).astype(np.float32) for r in (5, 3)]
    f16 = [random_packed("f16", r, 96, rng) for r in (6, 7, 9, 2)]
    cases = [(1, f32), (1, [f16[0], random_packed("bf16", 6, 96, rng)]), (1, f16), (1, f16[:1]), (9, f16[:3])]
    for n, ws in cases:
        x = rng.standard_normal((n, 96)).astype(np.float32)
        got = kernels.linears(x, *ws)
        assert len(got) == len(ws)
        for g, w in zip(got, ws):
            np.testing.assert_array_equal(g, kernels.linear(x, w))
    x64 = rng.standard_normal((1, 96))
    for g, w in zip(kernels.linears(x64, *f16[:3]), f16[:3]):
        np.testing.assert_array_equal(g, ops.linear(x64, w))


@pytest.mark.parametrize("fmt", FORMATS)
def test_embedding_is_exact(fmt):
    rng = np.random.default_rng(5)
    cols = 256 if fmt in KQUANTS else 64
    table = rng.standard_normal((40, cols)).astype(np.float32)
    if fmt != "f32":
        table = random_packed(fmt, 40, cols, rng)
    tokens = rng.integers(0, 40, (2, 7))
    got = kernels.embedding(tokens, table, np.float32)
    assert got.shape == (2, 7, cols)
    np.testing.assert_array_equal(got, ops.embedding(tokens, table, np.float32))


@given(b=st.integers(1, 2), t=st.integers(1, 7), heads=st.integers(1, 3), hd=st.sampled_from([2, 6, 16, 64]),
       start=st.integers(0, 40), seed=st.integers(0, 2**32 - 1))
@FEW
def test_apply_rope_is_exact(b, t, heads, hd, start, seed):
    rng = np.random.default_rng(seed)
    args = ModelArgs(dim=heads * hd, n_layers=1, n_heads=heads, vocab_size=8, rope_theta=500000.0)
    cos, sin = ops.rope_tables(ops.rope_frequencies(args), start, t, np.float32)
    x = rng.standard_normal((b, t, heads, hd)).astype(np.float32)
    np.testing.assert_array_equal(kernels.apply_rope(x, cos, sin), ops.apply_rope(x, cos, sin))


@given(shape=st.tuples(st.integers(1, 3), st.integers(1, 300)), seed=st.integers(0, 2**32 - 1))
@FEW
def test_swiglu(shape, seed):
    rng = np.random.default_rng(seed)
    gate = (10 * rng.standard_normal(shape)).astype(np.float32)
    gate.flat[0] = -200.0  # exp overflows: silu must still be -0, not NaN
    up = rng.standard_normal(shape).astype(np.float32)
    got = kernels.swiglu(gate, up)
    np.testing.assert_allclose(got, ops.swiglu(gate, up), rtol=3e-6, atol=1e-30)
    assert not np.isnan(got).any()


def test_swiglu_prefill_sized():
    rng = np.random.default_rng(6)
    gate, up = rng.standard_normal((2, 40000)).astype(np.float32), rng.standard_normal((2, 40000)).astype(np.float32)
    np.testing.assert_allclose(kernels.swiglu(gate, up), ops.swiglu(gate, up), rtol=3e-6, atol=1e-30)


def test_swiglu_shared_by_threads_is_the_one_loop(monkeypatch):
    # A prefill's gate, cut into pieces for the pool's threads (with a last partial piece): the same bits as the
    # one serial loop, every element computed alone.
    EL = importlib.import_module("llama_ref.kernels.elementwise")
    rng = np.random.default_rng(8)
    shape = (3, EL.SWIGLU_STEP - 7)
    gate, up = (8 * rng.standard_normal(shape)).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    one = np.empty(gate.size, np.float32)
    EL._swiglu(gate.reshape(-1), up.reshape(-1), one)
    monkeypatch.setattr(threads, "count", lambda: 2)
    shared, each_block = [], threads.each_block
    monkeypatch.setattr(threads, "each_block", lambda *a: shared.append(a[:2]) or each_block(*a))
    got = kernels.swiglu(gate, up)
    assert shared == [(gate.size, EL.SWIGLU_STEP)]
    np.testing.assert_array_equal(got.reshape(-1), one)


def ulps_apart(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """How many float32 values lie between a and b (both finite and >= 0: their bit patterns are ordered)."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_expf_within_3_ulps_of_numpy_over_the_float32_range():
    from llama_ref.kernels.expf import X_MAX, X_MIN, expf_array

    rng = np.random.default_rng(7)
    x = np.concatenate([rng.uniform(-110, 95, 2_000_000), rng.uniform(-1, 1, 500_000),
                        np.linspace(X_MIN - 1, X_MIN + 30, 100_000),  # where results become subnormal
                        np.linspace(X_MAX - 1, X_MAX + 1, 10_000)]).astype(np.float32)
    got = np.empty_like(x)
    expf_array(x, got)
    with np.errstate(over="ignore", under="ignore"):
        want = np.exp(x)
    assert np.array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    # 3 ulps: NumPy's own exp is within 1 ulp of exact and this one within 2 (Cephes' polynomial).
    assert ulps_apart(got[finite], want[finite]).max() <= 3
    assert (got[want == 0] == 0).all() and (got[want > 0] > 0).all()


def test_expf_special_values():
    from llama_ref.kernels.expf import expf_array

    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 89.0, -104.0, -1e30, 1e30, 1e-30], np.float32)
    got = np.empty_like(x)
    expf_array(x, got)
    with np.errstate(over="ignore", under="ignore"):
        np.testing.assert_array_equal(got, np.exp(x))


@given(b=st.integers(1, 2), t=st.integers(1, 6), kv_heads=st.integers(1, 3), group=st.sampled_from([1, 2, 4, 8]),
       hd=st.sampled_from([4, 10, 64]), start=st.integers(0, 150), masked=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
@FEW
def test_attention(b, t, kv_heads, group, hd, start, masked, seed):
    # start up to 150 crosses several key tiles of 64; S = start + t keys, the last query sees all of them.
    rng = np.random.default_rng(seed)
    s = start + t
    q = rng.standard_normal((b, t, kv_heads * group, hd)).astype(np.float32)
    k = (2 * rng.standard_normal((b, s, kv_heads, hd))).astype(np.float32)
    v = rng.standard_normal((b, s, kv_heads, hd)).astype(np.float32)
    mask = None
    if masked:
        mask = rng.random((b, s)) > 0.4
        mask[:, 0] = True  # every query sees at least one key (a fully masked row is NaN in both)
    got = kernels.attention(q, k, v, start, mask)
    want = ops.attention(q, k, v, start, mask)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


@given(t=st.integers(16, 40), group=st.sampled_from([1, 2, 4, 8]), start=st.integers(0, 70),
       masked=st.booleans(), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=8, deadline=None)
def test_attention_prefill_chunks(t, group, start, masked, seed):
    # 16 queries or more take the BLAS path: the same contract, padding rows included.
    rng = np.random.default_rng(seed)
    s = start + t
    q = rng.standard_normal((2, t, 2 * group, 8)).astype(np.float32)
    k = rng.standard_normal((2, s, 2, 8)).astype(np.float32)
    v = rng.standard_normal((2, s, 2, 8)).astype(np.float32)
    mask = None
    if masked:
        mask = np.ones((2, s), bool)
        mask[1, : start + 3] = False  # left padding: the first queries of row 1 see no key at all
    np.testing.assert_allclose(kernels.attention(q, k, v, start, mask), ops.attention(q, k, v, start, mask),
                               rtol=1e-5, atol=2e-6)


def test_attention_at_the_end_of_the_cache_reads_only_visible_keys():
    # Keys past the query's position must not matter: poison them and compare with the reference.
    rng = np.random.default_rng(7)
    q = rng.standard_normal((1, 3, 8, 16)).astype(np.float32)
    k = rng.standard_normal((1, 200, 2, 16)).astype(np.float32)
    v = rng.standard_normal((1, 200, 2, 16)).astype(np.float32)
    start = 197  # queries at positions 197, 198, 199: the last slots of a 200-position cache
    want = ops.attention(q, k, v, start)
    k2, v2 = k.copy(), v.copy()
    k2[:, 198:], v2[:, 198:] = 1e30, np.nan  # invisible to the first query; visible to the later ones
    got = kernels.attention(q, k, v, start)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    first = kernels.attention(q[:, :1], k2, v2, start)  # the first query must read keys 0 .. 197 only
    np.testing.assert_allclose(first, want[:, :1], rtol=1e-5, atol=2e-6)


def test_fully_masked_query_gives_zeros_like_the_reference():
    # A left-padding query sees no key; the padding's values must not leak NaN into it.
    q = np.ones((1, 1, 2, 4), np.float32)
    k = np.ones((1, 3, 1, 4), np.float32)
    v = np.full((1, 3, 1, 4), np.nan, np.float32)
    mask = np.zeros((1, 3), bool)
    want = ops.attention(q, k, np.zeros_like(v), 2, mask)
    np.testing.assert_array_equal(kernels.attention(q, k, v, 2, mask), want)
    assert not np.isnan(want).any()


def test_no_python_function_is_compiled_twice():
    """Numba's on-disk cache keys a kernel by its Python function and signature, not by its flags: one function
    compiled as a serial and a parallel twin shares one cache entry, and whichever compiled first is loaded for
    both. Every dispatcher of every kernel module must wrap a function of its own."""
    from pathlib import Path

    from numba.core.registry import CPUDispatcher

    seen: dict = {}
    for path in sorted(Path(kernels.__file__).parent.glob("*.py")):
        module = importlib.import_module(f"llama_ref.kernels.{path.stem}")
        for name, value in vars(module).items():
            if isinstance(value, CPUDispatcher) and value.__module__ == module.__name__:
                first = seen.setdefault(id(value.py_func), (module.__name__, name, value))
                assert first[2] is value, (f"{module.__name__}.{name} and {first[0]}.{first[1]} compile the same "
                                           f"Python function {value.py_func.__qualname__}")


def test_a_cache_of_other_sources_is_dropped(tmp_path):
    """kernels/_common.drop_stale_cache: Numba checks a cached kernel against its own file only, so a cache made
    before any source changed (a kernel inlined from another file, a constant of the specification) goes whole."""
    from llama_ref.kernels._common import drop_stale_cache

    cache, src = tmp_path / "cache", tmp_path / "src"
    src.mkdir()
    sources = [src / "a.py", src / "b.py"]
    for path in sources:
        path.write_text("x = 1\n")

    def compiled():  # what Numba would have written meanwhile
        cache.mkdir(exist_ok=True)
        for name in ("k-1.py311.nbi", "k-1.py311.1.nbc"):
            (cache / name).write_bytes(b"old")
        return sorted(p.name for p in cache.glob("*.nb?"))

    compiled()
    assert drop_stale_cache(cache, sources)  # no record of its sources: unknown, dropped
    assert not list(cache.glob("*.nb?"))
    kept = compiled()
    assert not drop_stale_cache(cache, sources)  # the same sources: kept
    assert sorted(p.name for p in cache.glob("*.nb?")) == kept
    sources[1].write_text("x = 2\n")  # one source edited, the other's kernels inline it
    assert drop_stale_cache(cache, sources)
    assert not list(cache.glob("*.nb?"))
    compiled()
    sources[1].unlink()  # a source gone counts as a change too
    assert drop_stale_cache(cache, sources) and not list(cache.glob("*.nb?"))


def test_address_is_the_arrays_data_pointer():
    """kernels/_common.address, which the work items take their activations by (kernels/ggml_linears.py): the same
    number as .ctypes.data, for whole arrays, views that start inside another and empty ones, every dtype."""
    from numba import njit

    from llama_ref.kernels._common import address

    @njit
    def of(a):
        return address(a)

    base = np.arange(48, dtype=np.float32).reshape(6, 8)
    for a in (base, base[2:], base[1, 3:], np.empty((0, 5), np.int32), np.zeros(7, np.int8),
              np.zeros((2, 3), np.uint16)[1:]):
        assert of(a) == a.ctypes.data, a.shape
