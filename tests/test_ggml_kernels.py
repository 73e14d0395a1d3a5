"""arithmetic="ggml" compiled: kernels/ggml.py, ggml_simd.py and ggml_ops.py against the NumPy specification
(llama_ref/model/ggml.py) bit for bit, and the specification's fused multiply-add against exact arithmetic.

The integer block sums run three ways (vpdpbusd where the CPU has VNNI, AVX2's vpmaddubsw + vpmaddwd, and
portable IR, forced with use_simd=0 / LLAMA_REF_GGML_PORTABLE=1); use_simd=2 asks for AVX2 even on a VNNI
CPU, so every path this CPU can run is checked on every format, with the extreme values that would overflow
AVX2's 16-bit pair sums if the sign trick or the offsets were wrong.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llama_ref.model import ggml
from llama_ref.weights.packed import Q4_0Weight, Q4_1Weight, Q5_0Weight, Q5_1Weight, Q8_0Weight, q5_bits_in_order

# use_simd: 0 portable, 1 the CPU's best (VNNI or AVX2), 2 AVX2, 3 the prefill tiles' 512-bit VNNI form
# (ggml_simd.HAS_VNNI512; elsewhere 3 runs as 1)
SIMDS = [0, 1, 2, 3]
TYPES = {"q8_0": Q8_0Weight, "q4_0": Q4_0Weight, "q4_1": Q4_1Weight, "q5_0": Q5_0Weight, "q5_1": Q5_1Weight}


def kernels():
    from llama_ref.kernels import ggml as kernels_ggml
    return kernels_ggml


def ops():
    from llama_ref.kernels import ggml_ops
    return ggml_ops


def same_bits(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---- the fused multiply-add ----------------------------------------------------------------------------------

def exact_fma(a, b, c) -> np.float32:
    """float32(a * b + c) rounded once to nearest, ties to even, from the exact rational value."""
    f = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    near = np.float32(float(f))  # within one float32 step of the answer
    cands = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
    return min(cands, key=lambda v: (abs(Fraction(float(v)) - f), int(np.float32(v).view(np.uint32)) & 1))


@functools.lru_cache(maxsize=None)
def _fma_kernel():
    from numba import njit

    from llama_ref.kernels.ggml_simd import fma32

    @njit
    def run(a, b, c):
        out = np.empty_like(a)
        for i in range(a.shape[0]):
            out[i] = fma32(a[i], b[i], c[i])
        return out
    return run


def compiled_fma(a, b, c):
    """llvm.fma.f32 elementwise: the CPU's vfmadd."""
    return _fma_kernel()(*(np.ascontiguousarray(v, np.float32) for v in (a, b, c)))


def tie_cases():
    """a * b + c just above or below a float32 tie, closer to it than float64 can tell: float64(a*b + c) lands
    on the tie and ties-to-even then picks the wrong neighbour. Built from (1 + m 2^-23)(1 - n 2^-23) =
    1 + (m - n) 2^-23 - mn 2^-46 with m - n = 1 and mn just off 2^23, scaled so the product is ~2^-24."""
    cases = []
    for m, n, c in ((2896, 2895, 1.0),  # product 1 + 4688 2^-46: just above the tie 1 + 2^-24
                    (2897, 2896, 1 + 2.0 ** -23)):  # product 1 - 1104 2^-46: just below 1 + 2^-23 + 2^-24
        for scale in (1.0, 2.0 ** -30, 2.0 ** 40):
            for sign in (1, -1):
                a = np.float32(sign * (1 + m * 2.0 ** -23) * 2.0 ** -24 * scale)
                b = np.float32(1 - n * 2.0 ** -23)
                cases.append((a, b, np.float32(sign * c * scale)))
    return cases


def test_fma_single_rounding_on_hand_made_ties():
    a, b, c = (np.array(v, np.float32) for v in zip(*tie_cases()))
    expected = np.array([exact_fma(*t) for t in zip(a, b, c)], np.float32)
    naive = (a.astype(np.float64) * b + c).astype(np.float32)  # two roundings
    assert not np.any(naive == expected)  # each case is one where rounding twice goes wrong
    assert same_bits(ggml.fma(a, b, c), expected)
    assert same_bits(compiled_fma(a, b, c), expected)


finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False, min_value=-2.0 ** 60, max_value=2.0 ** 60)


@settings(max_examples=150, deadline=None)
@given(a=finite32, b=finite32, c=finite32, near=st.booleans())
def test_fma_equals_exact_rounding(a, b, c, near):
    if near:  # c close to -a*b: cancellation, where the low bits of the product decide
        c = float(np.float32(-(np.float64(a) * b) * (1 + 2.0 ** -20)) + np.float32(c) * np.float32(2.0 ** -30))
    a, b, c = (np.array([v], np.float32) for v in (a, b, c))
    expected = exact_fma(a[0], b[0], c[0])
    assert ggml.fma(a, b, c)[0] == expected
    assert same_bits(compiled_fma(a, b, c), ggml.fma(a, b, c))


# ---- activations and the products ------------------------------------------------------------------------------

def f32_rows(rows, cols, scale=1.0):
    """Float32 (rows, cols) from a drawn seed: normal values, a zero block, an outlier, or half-integers
    (ties of the 8-bit rounding)."""
    def build(seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        kind = seed % 4
        if kind == 1:
            x[:, :32] = 0
        elif kind == 2:
            x[rng.integers(rows), rng.integers(cols)] *= 100
        elif kind == 3:
            x = np.round(x * 4) / 2
        return (x * np.float32(scale)).astype(np.float32)
    return st.integers(0, 2**32 - 1).map(build)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 5), nb=st.integers(1, 6), scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e4]))
def test_quantize_q8_equals_specification(data, n, nb, scale):
    x = data.draw(f32_rows(n, 32 * nb, scale))
    xq, xd, xs = kernels().quantize_q8(x)
    d1, q1, s1 = ggml.quantize_row_q8_1(x)
    d0, q0 = ggml.quantize_row_q8_0(x)
    assert np.array_equal(xq, q0.reshape(n, -1)) and np.array_equal(q0, q1)
    assert same_bits(xd, d0) and same_bits(xd, d1) and same_bits(xs, s1)


def test_quantize_q8_special_values_offsets_and_strides_equal_specification():
    """The vector blocks (ggml_simd.quantize_q8_0_blocks) on NaN, infinities, the largest floats and a subnormal
    as the specification computes them; repacked Q4_0's offsets (8 sum q a block) from the same pass; a row that is
    not C-ordered (copied first). Where x * 127 / amax is NaN (a NaN in the block, an infinity times 0) the int8
    value is C's undefined cast in NumPy too: there the kernel's is 0, the low byte of vcvttps2dq's 0x80000000."""
    import warnings

    from llama_ref.kernels import ggml_linears as gl
    x = np.random.default_rng(5).standard_normal((5, 96)).astype(np.float32)
    x[0, 3], x[1, 5], x[2, 40], x[3, :32], x[3, 40], x[4, 64:] = np.nan, np.inf, -np.inf, 3e38, 1e-45, 0
    with warnings.catch_warnings():  # the specification's products and casts of NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        d1, q1, s1 = ggml.quantize_row_q8_1(x)
        amax = np.abs(x.reshape(5, 3, 32)).max(axis=2)
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
        undefined = np.isnan(x.reshape(5, 3, 32) * inv[:, :, None]).reshape(5, -1)
    assert undefined.any() and not undefined.all()
    want = np.where(undefined, 0, q1.reshape(5, -1))
    fine = ~undefined.reshape(5, 3, 32).any(axis=2)  # blocks whose sums (s, the offsets) the specification defines
    for rows in (x, np.asfortranarray(x)):
        xq, xd, xs = kernels().quantize_q8(rows)
        assert np.array_equal(xq, want) and same_bits(xd, d1) and same_bits(xs[fine], s1[fine])
    for n in range(5):
        xq, xd, xs, off, *_ = gl._quantize(x[n:n + 1], True, False, True)
        assert np.array_equal(xq[0], want[n]) and same_bits(xd[0], d1[n])
        assert same_bits(xs[0][fine[n]], s1[n][fine[n]])
        assert np.array_equal(off[0][fine[n]], 8 * q1[n].astype(np.int32).sum(axis=1)[fine[n]])


@pytest.mark.parametrize("kind", sorted(TYPES))
@pytest.mark.parametrize("use_simd", SIMDS)
def test_linear_every_integer_path_equals_specification(kind, use_simd):
    """Rows in groups of 4 and 8 and not, one block and many, activation rows one, several, and in tiles of 4
    with a remainder."""
    rng = np.random.default_rng(11)
    for n, rows, k in ((1, 24, 64), (3, 7, 96), (2, 16, 576), (5, 13, 32), (1, 40, 1536), (9, 37, 160)):
        w = TYPES[kind].quantize(rng.standard_normal((rows, k)).astype(np.float32))
        x = rng.standard_normal((n, k)).astype(np.float32)
        x[0, 3] = 40
        assert same_bits(kernels().quantized_linear(x, w, use_simd), ggml.linear(x, w))


@pytest.mark.parametrize("kind", sorted(TYPES))
@pytest.mark.parametrize("use_simd", SIMDS)
def test_decode_one_thread_equals_specification(kind, use_simd, monkeypatch):
    """One activation row on one thread takes its own compiled path (quantize and every row in one call);
    on more threads the parallel one. Both equal the specification, rows in groups of 8 (repacked Q4_0) and
    not."""
    import numba

    rng = np.random.default_rng(12)
    before = numba.get_num_threads()
    try:
        from llama_ref.kernels import ggml_ops

        # On more threads, small products run on the calling thread too (ggml_ops.SERIAL_WEIGHTS): with the
        # limit at 0 every one takes the parallel path.
        for threads, limit in sorted({(1, ggml_ops.SERIAL_WEIGHTS), (before, ggml_ops.SERIAL_WEIGHTS), (before, 0)}):
            numba.set_num_threads(threads)
            monkeypatch.setattr(ggml_ops, "SERIAL_WEIGHTS", limit)
            for rows, k in ((24, 64), (7, 96), (40, 1536), (13, 32)):
                w = TYPES[kind].quantize(rng.standard_normal((rows, k)).astype(np.float32))
                x = rng.standard_normal((1, k)).astype(np.float32)
                assert same_bits(kernels().quantized_linear(x, w, use_simd), ggml.linear(x, w))
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("fmt", sorted(TYPES) + ["q4_k", "q5_k", "q6_k"])
def test_linear_one_row_equals_specification(fmt, monkeypatch):
    """linear() sends one row (a decode step's wo, w2, output head) to kernels/ggml_linears.py's one compiled
    call: x (1, 1, K), (1, K) and (K,) -> the caller's shape, the same bits as the specification on the first
    call (the weight's work list made) and the next, rows in groups of 8 and 16 and not, on the calling thread
    and in a parallel region (the limit 0), on one thread and the threads there are."""
    import numba

    from llama_ref.kernels import ggml_ops

    rng = np.random.default_rng(13)
    before = numba.get_num_threads()
    try:
        for threads, limit in sorted({(1, ggml_ops.SERIAL_WEIGHTS), (before, 1 << 62), (before, 0)}):
            numba.set_num_threads(threads)
            monkeypatch.setattr(ggml_ops, "SERIAL_WEIGHTS", limit)
            for rows in (24, 13, 48):
                w = _linears_weights((fmt,), (rows,), 512, seed=rows)[0]
                x = rng.standard_normal((1, 1, 512)).astype(np.float32)
                x[0, 0, 5] = 25
                for xs in (x, x[0], x[0, 0], x, x[0, 0]):
                    got = kernels().linear(xs, w)
                    assert got.shape == xs.shape[:-1] + (rows,) and same_bits(got, ggml.linear(xs, w)), \
                        (fmt, rows, threads, limit, xs.shape)
                # one row that is not float32 and contiguous, and a float32 weight: the general path's values
                wide = np.stack([x[0, 0], x[0, 0]], axis=1)[:, 0]  # (K,) strided
                f = rng.standard_normal((rows, 512)).astype(np.float32)
                for xs, wt in ((x.astype(np.float64), w), (wide, w), (x, f)):
                    assert same_bits(kernels().linear(xs, wt), ggml.linear(xs, wt)), (fmt, rows, xs.dtype)
    finally:
        numba.set_num_threads(before)


# ---- several products of one x (kernels/ggml_linears.py) -----------------------------------------------------

def _linears_weights(formats, rows, k, seed):
    """One matrix per format, rows each (Q4_K / Q5_K / Q6_K: random blocks, see test_ggml_kquants)."""
    from test_ggml_kquants import TYPES as KTYPES, random_kquant

    rng = np.random.default_rng(seed)
    ws = []
    for i, (fmt, r) in enumerate(zip(formats, rows)):
        if fmt in KTYPES:
            ws.append(random_kquant(KTYPES[fmt], r, k, seed + i))
        else:
            ws.append(TYPES[fmt].quantize(rng.standard_normal((r, k)).astype(np.float32)))
    return ws


def _check_linears(ws, x, monkeypatch, use_simd=None):
    """linears(x, *ws) equals the specification's product weight by weight, bit for bit and shape, with the
    serial path forced (the limit past all the work) and the parallel one (limit 0), on the threads there are
    and on one."""
    import numba

    from llama_ref.kernels import ggml_linears, ggml_ops

    before = numba.get_num_threads()
    expected = [ggml.linear(x, w) for w in ws]
    try:
        for threads, limit in sorted({(1, 1 << 62), (before, 1 << 62), (before, 0)}):
            numba.set_num_threads(threads)
            monkeypatch.setattr(ggml_ops, "SERIAL_WEIGHTS", limit)
            got = ggml_linears.linears(x, *ws, use_simd=use_simd)
            assert len(got) == len(ws)
            for g, e, w in zip(got, expected, ws):
                assert same_bits(g, e), (w.format, w.shape, threads, limit)
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("formats", [
    ("q8_0", "q8_0", "q8_0"),  # wq, wk, wv of a Q8_0 file
    ("q4_0", "q4_0"),  # repacked Q4_0 (rows in 8s) and not
    ("q4_1", "q5_1", "q5_0"),
    ("q4_k", "q4_k", "q6_k"),  # a Q4_K_M file's wq, wk, wv
    ("q5_k", "q6_k"),
    ("q4_k", "q5_0", "q6_k", "q8_0"),  # Q8_K and Q8_0 / Q8_1 activations in one call
    ("q4_0", "q4_k", "q5_1", "q5_k", "q4_1"),
])
@pytest.mark.parametrize("use_simd", [0, 1, 3])
def test_linears_equal_linear_weight_by_weight(formats, use_simd, monkeypatch):
    """Rows that fill ROWS-row tiles and not, in groups of 8 and not (repacked Q4_0 and Q4_K), x (1, 1, K) and
    (1, K)."""
    rows = [24, 13, 40, 16, 7][:len(formats)]
    ws = _linears_weights(formats, rows, 512, seed=len(formats))
    x = np.random.default_rng(5).standard_normal((1, 1, 512)).astype(np.float32)
    x[0, 0, 7] = 30
    _check_linears(ws, x, monkeypatch, use_simd)
    _check_linears(ws, x[0], monkeypatch, use_simd)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), formats=st.lists(st.sampled_from(sorted(TYPES) + ["q4_k", "q5_k", "q6_k"]), min_size=1,
                                        max_size=4),
       nsb=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_linears_equal_linear_hypothesis(data, formats, nsb, seed):
    """Any mix of formats and row counts (1 .. 41), columns 256 .. 768; x with a zero block, an outlier or
    rounding ties (f32_rows)."""
    rows = [data.draw(st.integers(1, 41)) for _ in formats]
    ws = _linears_weights(formats, rows, 256 * nsb, seed)
    x = data.draw(f32_rows(1, 256 * nsb))
    with pytest.MonkeyPatch.context() as monkeypatch:
        _check_linears(ws, x, monkeypatch)


def test_linears_falls_back_weight_by_weight(monkeypatch):
    """More than one row of x, or a float32 weight among them: linear weight by weight, the same values."""
    rng = np.random.default_rng(6)
    ws = _linears_weights(("q8_0", "q4_0"), (24, 16), 256, seed=6)
    x = rng.standard_normal((2, 3, 256)).astype(np.float32)
    for g, w in zip(kernels().linears(x, *ws), ws):
        assert same_bits(g, ggml.linear(x, w))
    f = rng.standard_normal((5, 256)).astype(np.float32)
    got = kernels().linears(x[:1, :1], ws[0], f)
    assert same_bits(got[0], ggml.linear(x[:1, :1], ws[0])) and same_bits(got[1], ggml.linear(x[:1, :1], f))


@pytest.mark.parametrize("formats", [("q8_0", "q8_0", "q8_0"), ("q4_0", "q4_1", "q5_0", "q5_1"),
                                     ("q5_0", "q6_k", "q8_0"), ("q4_k", "q4_k")])
@pytest.mark.parametrize("simd", [0, 1])
def test_linears_of_a_prefill_equal_linear(formats, simd, monkeypatch):
    """A prefill's rows (x (2, 3, K) and (17, K)): the legacy formats' products quantize x once for all of them
    (kernels/ggml._rows_linears), a mix with K-quants takes them one by one; either way each output is the
    specification's, bit for bit, on the portable and the best integer code."""
    monkeypatch.setattr(kernels(), "SIMD", simd)
    ws = _linears_weights(formats, [24, 13, 40, 16][:len(formats)], 512, seed=11)
    rng = np.random.default_rng(12)
    for x in (rng.standard_normal((2, 3, 512)).astype(np.float32), rng.standard_normal((17, 512)).astype(np.float32)):
        x.reshape(-1, 512)[1, 3] = 40  # an outlier block
        x.reshape(-1, 512)[0, 64:96] = 0  # a zero block
        got = kernels().linears(x, *ws)
        assert len(got) == len(ws)
        for g, w in zip(got, ws):
            assert g.shape == x.shape[:-1] + (w.shape[0],)
            assert same_bits(g, ggml.linear(x, w)), (w.format, x.shape)

def test_repacked_q4_0_scales():
    """Repacked Q4_0's scales: rows 8g .. 8g + 7 of block b side by side as fp16, exactly the float32 d; a
    scale that is no fp16 value is refused rather than rounded."""
    w = Q4_0Weight.quantize(np.random.default_rng(14).standard_normal((16, 96)).astype(np.float32))
    d16 = kernels()._repack_scales(w.d)
    assert d16.shape == w.d.shape and d16.dtype == np.uint16
    got = d16.view(np.float16).astype(np.float32).reshape(2, 3, 8)  # (groups, blocks, rows of the group)
    assert same_bits(got, w.d.reshape(2, 8, 3).transpose(0, 2, 1))
    with pytest.raises(ValueError):
        kernels()._repack_scales(w.d * np.float32(1 + 2**-20))


@pytest.mark.parametrize("kind", ["q4_1", "q5_1", "q5_0"])
def test_decode_layout_is_the_files_blocks(kind):
    """The products stream Q4_1 / Q5_1 / Q5_0 as the file stores them (kernels/ggml.py _weight_args): the fp16 pair
    d, m is a block's first 4 bytes (Q5_0: its fp16 d, 2 bytes), and Q5's 20 bytes of fifth bits and nibbles the
    rest, the very arrays the weight holds (no second copy; tests/test_ggml_q5_layout.py). Q4_1's scales that are
    no fp16 are refused, not rounded."""
    w = raw_blocks(kind, 13, 5, seed=21)
    raw = w.raw_blocks().reshape(13, 5, TYPES[kind].type_size)  # (rows, blocks, bytes) of the file
    k, qs, d, m = kernels()._weight_args(w)
    h = 2 if kind == "q5_0" else 4
    assert d is m and d.dtype == (np.uint16 if h == 2 else np.uint32) and d.shape == (13, 5)
    assert np.array_equal(d.view(np.uint8).reshape(13, 5, h), raw[:, :, :h])
    if kind in ("q5_1", "q5_0"):
        order = kernels().simd.Q5_BIT_ORDER  # of the fifth bits, as this host's tiles read them
        assert np.array_equal(qs.reshape(13, 5, 20), q5_bits_in_order(raw[:, :, h:], order))
        blocks, scales = w.file_form(order)
        assert qs is blocks and d is scales and w._exact is None
    else:
        assert np.array_equal(qs, w.qs)
        with pytest.raises(ValueError):
            kernels()._scale_pairs(w.d * np.float32(1 + 2**-20), w.m)


def raw_blocks(kind, rows, nb, seed, pattern="random", scale=(1e-3, 1.0)):
    """(rows, nb) blocks of `kind` as a GGUF stores them, the quant bytes drawn from every value (so Q8_0's
    -128, Q4's 0 and 15, Q5's 0 and 31 all occur) or set to one extreme ("min": every byte 0x00, Q8_0 0;
    "max": 0xff, Q8_0 -1, nibbles 15, Q5 31; "q8_edges": Q8_0 -128 and 127 alternating, the pairs AVX2 sums
    nearest to int16's limit), the fp16 fields (d, and m) drawn from `scale` with random signs."""
    cls = TYPES[kind]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, nb, cls.type_size), dtype=np.uint8)
    h = 2 * len(cls.fields)
    if pattern == "min":
        raw[:, :, h:] = 0
    elif pattern == "max":
        raw[:, :, h:] = 0xFF
    elif pattern == "q8_edges":
        raw[:, :, h:] = np.array([0x80, 0x7F] * 16, np.uint8) if kind == "q8_0" else 0xFF
    fields = rng.uniform(np.log(scale[0]), np.log(scale[1]), (rows, nb, len(cls.fields)))
    fields = (np.exp(fields) * rng.choice([-1, 1], fields.shape)).astype(np.float16)
    raw[:, :, :h] = fields.view(np.uint8).reshape(rows, nb, h)
    return cls(raw.reshape(rows, -1), (rows, 32 * nb))


def extreme_activations(n, k, seed, scale=1.0):
    """Rows whose every value has the block's largest magnitude, with random signs: every 8-bit activation is
    -127 or 127 (the largest products), and one row of zeros."""
    rng = np.random.default_rng(seed)
    x = (rng.choice([-1, 1], (n, k)) * np.float32(scale)).astype(np.float32)
    x[-1] = 0 if n > 1 else x[-1]
    return x


@pytest.mark.parametrize("kind", sorted(TYPES))
@pytest.mark.parametrize("use_simd", SIMDS)
def test_linear_extreme_values_equal_specification(kind, use_simd):
    """Blocks at the ends of each format's range by activations of magnitude 127: AVX2's pair sums
    (vpmaddubsw, saturating int16) come within 255 of their limit (Q8_0: 2 * 128 * 127 = 32512), and would
    be clipped by a wrong sign trick or offset; scales from fp16's subnormals to its largest."""
    xq = kernels().quantize_q8(extreme_activations(3, 96, 1))[0]
    assert set(np.unique(xq[:2])) == {-127, 127}  # the activations really are the extremes
    for pattern in ("min", "max", "q8_edges", "random"):
        for scale in ((6e-8, 1e-6), (1e-3, 1.0), (1e3, 65504.0)):
            w = raw_blocks(kind, 13, 3, seed=len(pattern), pattern=pattern, scale=scale)
            for n, xscale in ((1, 1.0), (3, 1e-5), (6, 1e3)):  # Q8_1 sums d sum(q) stay finite in fp16
                x = extreme_activations(n, 96, n, xscale)
                assert same_bits(kernels().quantized_linear(x, w, use_simd), ggml.linear(x, w))


@pytest.mark.parametrize("use_simd", SIMDS)
def test_repacked_q4_0_extreme_sums_equal_specification(use_simd):
    """Repacked Q4_0 (rows in groups of 8) on AVX2 adds a block's 16 int16 pair sums of nibble products per
    row before one vpmaddwd: nibbles 15 by activations all 127 (or all -127) take them to +-30480, 2287 short of
    int16's limit; a tile summing more before widening would wrap. Each activation row alone (the decode's
    tile) and all together (the prefill's)."""
    x = np.array([[1] * 96, [-1] * 96, [1, -1] * 48, [-1] * 32 + [1] * 64, [0] * 96], np.float32)
    for pattern in ("max", "min", "random"):
        for scale in ((6e-8, 1e-6), (1e-3, 1.0), (1e3, 65504.0)):
            w = raw_blocks("q4_0", 16, 3, seed=len(pattern), pattern=pattern, scale=scale)
            assert same_bits(kernels().quantized_linear(x, w, use_simd), ggml.linear(x, w))
            for row in x:
                assert same_bits(kernels().quantized_linear(row[None], w, use_simd), ggml.linear(row[None], w))


def test_q4_1_x8_form_by_hand(monkeypatch):
    """Q4_1Weight's "x8" form (the 8-row decode tiles', kernels/ggml_simd._define_x8), byte by byte from its
    definition: block b of rows 8g .. 8g + 7 the 128 bytes at (g nb + b) 128, byte 32j + 4r + k row r's nibble byte
    4j + k. One copy either way (nbytes the same); raw_blocks (whole, by rows) and the specification's rows read it
    without moving it; qs moves it back to rows, the file's bytes; the same in pieces of one group; rows not in
    groups of 8 refused by name."""
    from llama_ref.weights import packed

    w = raw_blocks("q4_1", 24, 3, seed=31)
    raw = w.raw_blocks().reshape(24, 3, 20)
    dense = w.to_float()
    rows_qs = np.array(w.qs)
    nbytes = w.nbytes
    held = w.x8_form().reshape(3, 3, 128)
    for g, b, r in np.ndindex(3, 3, 8):
        for j, k in np.ndindex(4, 4):
            assert held[g, b, 32 * j + 4 * r + k] == rows_qs[8 * g + r, 16 * b + 4 * j + k]
    assert w.nbytes == nbytes and w.x8_form() is w.x8_form()
    assert np.array_equal(w.raw_blocks().reshape(24, 3, 20), raw)
    assert np.array_equal(w.raw_blocks(np.array([17, 2, 3])).reshape(3, 3, 20), raw[[17, 2, 3]])
    assert same_bits(w.rows(np.array([[23, 0], [9, 9]])), dense[[[23, 0], [9, 9]]])
    assert w._x8 is not None  # still held so
    assert np.array_equal(w.qs, rows_qs) and w._x8 is None and w.nbytes == nbytes
    monkeypatch.setattr(packed, "BLOCKS_PER_PIECE", 1)
    assert np.array_equal(w.x8_form(), held.reshape(24, -1)) and np.array_equal(w.qs, rows_qs)
    with pytest.raises(ValueError, match="groups of 8"):
        raw_blocks("q4_1", 12, 3, seed=31).x8_form()


@pytest.mark.parametrize("use_simd", [0, 1, 2])
def test_q4_1_x8_products_and_rows_equal_specification(use_simd):
    """A Q4_1 weight of rows in groups of 8, held in the "x8" form where the host's tiles read it (kernels/ggml.py
    _held_group): decode (the 8-row tile) and prefill (rows unpacked from their groups), blocks at the ends of the range
    by activations of magnitude 127, and the compiled embedding, bit for bit the specification's (on a second weight
    of the same bytes), the weight still held in the "x8" form after all of them."""
    for pattern, rows, nb in (("random", 16, 5), ("max", 24, 3), ("min", 8, 2), ("random", 40, 18)):
        w = raw_blocks("q4_1", rows, nb, seed=rows, pattern=pattern)
        spec_w = TYPES["q4_1"](w.raw_blocks(), w.shape)
        assert (kernels()._weight_args(w)[0] == kernels().KIND["q4_1x8"]) == kernels().X8_HOST
        for n in (1, 2, 5):
            x = extreme_activations(n, 32 * nb, n) if pattern != "random" else \
                np.random.default_rng(n).standard_normal((n, 32 * nb)).astype(np.float32)
            assert same_bits(kernels().quantized_linear(x, w, use_simd), ggml.linear(x, spec_w)), (pattern, n)
        ids = np.array([[rows - 1, 0], [3, 8 % rows]])
        assert same_bits(kernels().embedding(ids, w, np.float32), ggml.embedding(ids, spec_w, np.float32))
        assert (w._x8 is not None) == (kernels().X8_HOST or (kernels().X16_HOST and rows % 16 == 0))  # or "x16"


@pytest.mark.parametrize("use_simd", [0, 1, 2])
def test_q4_1_x8_tile_on_any_host(monkeypatch, use_simd):
    """The 8-row tile of Q4_1's "x8" form (held so on AVX2 hosts without GFNI only) forced on this host, "x16" off:
    decode and prefill bit for bit the specification's (the tiles of both forms end in one shared epilogue)."""
    ggml_kernels = kernels()
    monkeypatch.setattr(ggml_kernels, "X8_HOST", True)
    monkeypatch.setattr(ggml_kernels, "X16_HOST", False)
    for pattern, rows, nb in (("random", 16, 5), ("max", 24, 3), ("random", 40, 18)):
        w = raw_blocks("q4_1", rows, nb, seed=rows + 1, pattern=pattern)
        spec_w = TYPES["q4_1"](w.raw_blocks(), w.shape)
        assert ggml_kernels._weight_args(w)[0] == ggml_kernels.KIND["q4_1x8"]
        for n in (1, 3):
            x = extreme_activations(n, 32 * nb, n) if pattern != "random" else \
                np.random.default_rng(n).standard_normal((n, 32 * nb)).astype(np.float32)
            assert same_bits(ggml_kernels.quantized_linear(x, w, use_simd), ggml.linear(x, spec_w)), (pattern, n)


def test_unpack_row_q4_1_x8_reads_the_groups():
    """ggml_simd.unpack_row's UNPACK_Q4_1X8 at kernels/ggml._row_start's addresses (the row's words in its group's
    blocks, its pair 8 pairs apart): the same bytes and scales as UNPACK_Q4_1 of the row itself."""
    from llama_ref.kernels import ggml_simd
    from llama_ref.weights.packed import q5_scales_in_order

    for pattern in ("random", "max"):
        w = raw_blocks("q4_1", 16, 9, seed=8, pattern=pattern)
        pairs = np.ascontiguousarray(kernels()._scale_pairs(w.d, w.m))
        want = unpacked_rows("q4_1", np.ascontiguousarray(w.qs), pairs, ggml_simd.UNPACK_Q4_1)
        got = unpacked_rows("q4_1x8", w.x8_form(), q5_scales_in_order(pairs, "x8", "file"), ggml_simd.UNPACK_Q4_1X8)
        assert np.array_equal(got[0], want[0]) and same_bits(got[1], want[1]) and same_bits(got[2], want[2])


def test_q4_1_x16_form_by_hand():
    """Q4_1Weight's "x16" form (x8_form(16): the 16-row decode tiles', kernels/ggml_simd._define_x16), byte by byte
    from its definition: block b of rows 16g .. 16g + 15 the 256 bytes at (g nb + b) 256, byte 64j + 4r + k row r's
    nibble byte 4j + k; from the "x8" form and back to rows, the file's bytes; rows not in groups of 16 refused."""
    w = raw_blocks("q4_1", 32, 3, seed=32)
    raw = w.raw_blocks().reshape(32, 3, 20)
    rows_qs = np.array(w.qs)
    w.x8_form()
    held = w.x8_form(16).reshape(2, 3, 256)
    for g, b, r in np.ndindex(2, 3, 16):
        for j, k in np.ndindex(4, 4):
            assert held[g, b, 64 * j + 4 * r + k] == rows_qs[16 * g + r, 16 * b + 4 * j + k]
    assert np.array_equal(w.raw_blocks().reshape(32, 3, 20), raw)
    assert np.array_equal(w.raw_blocks(np.array([31, 2, 17])).reshape(3, 3, 20), raw[[31, 2, 17]])
    assert np.array_equal(w.qs, rows_qs) and w._x8 is None
    with pytest.raises(ValueError, match="groups of 16"):
        raw_blocks("q4_1", 24, 3, seed=31).x8_form(16)


@pytest.mark.parametrize("fmt", ["q4_1", "q5_0", "q5_1", "q8_0", "q4_0"])
@pytest.mark.parametrize("use_simd", [0, 1, 2, 3])
def test_x16_products_and_rows_equal_specification(monkeypatch, use_simd, fmt):
    """A Q4_1, Q5_0, Q5_1, Q8_0 or Q4_0 weight of rows in groups of 16 in the "x16" form (kernels/ggml.py _held_group:
    AVX-512 VNNI hosts that run 512-bit vectors at full width; here on any host, every integer path): decode (the
    16-row tile), prefill (rows unpacked from their groups; Q4_0's 16-row tiles by 4 activation rows and by one, on
    the form itself), blocks at the ends of the range by activations of
    magnitude 127 (Q8_0 also -128 and 127 alternating), and the compiled embedding, bit for bit the specification's
    (on a second weight of the same bytes)."""
    ggml_kernels = kernels()
    monkeypatch.setattr(ggml_kernels, "X16_HOST", True)
    cases = (("random", 16, 5), ("max", 32, 3), ("min", 16, 2), ("random", 48, 18))
    for pattern, rows, nb in cases + ((("q8_edges", 16, 4),) if fmt == "q8_0" else ()):
        w = raw_blocks(fmt, rows, nb, seed=rows + nb, pattern=pattern)
        spec_w = TYPES[fmt](w.raw_blocks(), w.shape)
        assert ggml_kernels._weight_args(w)[0] == ggml_kernels.KIND[fmt + "x16"]
        for n in (1, 2, 5):
            x = extreme_activations(n, 32 * nb, n) if pattern != "random" else \
                np.random.default_rng(n).standard_normal((n, 32 * nb)).astype(np.float32)
            assert same_bits(ggml_kernels.quantized_linear(x, w, use_simd), ggml.linear(x, spec_w)), (pattern, n)
        ids = np.array([[rows - 1, 0], [3, 17 % rows]])
        assert same_bits(ggml_kernels.embedding(ids, w, np.float32), ggml.embedding(ids, spec_w, np.float32))
        assert (w._x8 is not None and w._group == 16) if fmt in ("q4_1", "q8_0", "q4_0") else w._order == "x16"
        assert np.array_equal(w.raw_blocks(), spec_w.raw_blocks())  # the file's bytes, moved back


def test_q8_0_x16_form_by_hand():
    """Q8_0Weight's "x16" form (x8_form(16): the 16-row decode tiles', kernels/ggml_simd._define_x16), byte by byte
    from its definition: block b of rows 16g .. 16g + 15 the 512 bytes at (g nb + b) 512, byte 64j + 4r + k row r's
    q of value 4j + k plus 128; one copy (nbytes the same); raw_blocks and the specification's rows read it without
    moving it; qs moves it back to rows, the file's bytes; rows not in groups of 16 refused; a Q8_0 weight is held
    so only on an X16_HOST, in groups of 16 (AVX2's int16 pairs would saturate on q + 128)."""
    w = raw_blocks("q8_0", 32, 3, seed=33)
    raw = w.raw_blocks().reshape(32, 3, 34)
    dense = w.to_float()
    q = np.array(w.qs).view(np.int8)
    nbytes = w.nbytes
    held = w.x8_form(16).reshape(2, 3, 512)
    for g, b, r in np.ndindex(2, 3, 16):
        for j, k in np.ndindex(8, 4):
            assert int(held[g, b, 64 * j + 4 * r + k]) == int(q[16 * g + r, 32 * b + 4 * j + k]) + 128
    assert w.nbytes == nbytes and w.x8_form(16) is w.x8_form(16)
    assert np.array_equal(w.raw_blocks().reshape(32, 3, 34), raw)
    assert np.array_equal(w.raw_blocks(np.array([31, 2, 17])).reshape(3, 3, 34), raw[[31, 2, 17]])
    assert same_bits(w.rows(np.array([[31, 0], [9, 9]])), dense[[[31, 0], [9, 9]]])
    assert np.array_equal(w.qs.view(np.int8), q) and w._x8 is None
    with pytest.raises(ValueError, match="groups of 16"):
        raw_blocks("q8_0", 24, 3, seed=31).x8_form(16)
    group = kernels()._held_group
    assert group(w) == (16 if kernels().X16_HOST else 0) and group(raw_blocks("q8_0", 24, 1, seed=1)) == 0


def test_q4_0_x16_form_by_hand():
    """Q4_0Weight's "x16" form (x8_form(16): kernels/ggml_simd._define_q4_0x16's), byte by byte from its definition,
    Q4_1's layout: block b of rows 16g .. 16g + 15 the 256 bytes at (g nb + b) 256, byte 64j + 4r + k row r's nibble
    byte 4j + k; the file's bytes read back without moving it, and moved back by qs; held so for ggml mode only on an
    X16_HOST with rows in groups of 16 (else repacked Q4_0's 8-row tiles, rows as they are)."""
    w = raw_blocks("q4_0", 32, 3, seed=34)
    raw = w.raw_blocks().reshape(32, 3, 18)
    rows_qs = np.array(w.qs)
    held = w.x8_form(16).reshape(2, 3, 256)
    for g, b, r in np.ndindex(2, 3, 16):
        for j, k in np.ndindex(4, 4):
            assert held[g, b, 64 * j + 4 * r + k] == rows_qs[16 * g + r, 16 * b + 4 * j + k]
    assert np.array_equal(w.raw_blocks().reshape(32, 3, 18), raw)
    assert np.array_equal(w.raw_blocks(np.array([30, 1])).reshape(2, 3, 18), raw[[30, 1]])
    assert np.array_equal(w.qs, rows_qs) and w._x8 is None
    ggml_kernels = kernels()
    want = "q4_0x16" if ggml_kernels.X16_HOST else "q4_0r"
    assert ggml_kernels._weight_args(raw_blocks("q4_0", 32, 1, seed=1))[0] == ggml_kernels.KIND[want]
    assert ggml_kernels._weight_args(raw_blocks("q4_0", 24, 1, seed=1))[0] == ggml_kernels.KIND["q4_0r"]


def test_unpack_row_q8_0_x16_reads_the_groups():
    """ggml_simd.unpack_row's UNPACK_Q8_0X16 at kernels/ggml._row_start's addresses (the row's 8 words of q + 128 in its
    group's 512-byte blocks, its fp16 d 16 apart): each row's int8 q and its d as float32, exactly."""
    from llama_ref.kernels import ggml_simd
    from llama_ref.weights.packed import q5_scales_in_order

    for pattern in ("random", "q8_edges", "max"):
        w = raw_blocks("q8_0", 32, 9, seed=10, pattern=pattern)
        q, d = np.array(w.qs), np.array(w.d)
        half = q5_scales_in_order(d.astype(np.float16).view(np.uint16), "x16", "file")
        got = unpacked_rows("q8_0x16", w.x8_form(16), half, ggml_simd.UNPACK_Q8_0X16)
        assert np.array_equal(got[0], q) and same_bits(got[1], d)


def test_unpack_row_q4_0_x16_reads_the_groups():
    """ggml_simd.unpack_row's UNPACK_Q4_0X16 (the compiled embedding's, kernels/ggml._unpacked_rows) at _row_start's
    addresses: each row's values as int8 q - 8 in value order (a block's low nibbles, then its high ones) and its d
    as float32, exactly."""
    from llama_ref.kernels import ggml_simd
    from llama_ref.weights.packed import q5_scales_in_order

    for pattern in ("random", "max", "min"):
        w = raw_blocks("q4_0", 32, 9, seed=11, pattern=pattern)
        qs, d = np.array(w.qs).reshape(32, 9, 16), np.array(w.d)
        values = np.concatenate([qs & 15, qs >> 4], axis=2).astype(np.int16) - 8  # (rows, nb, 32)
        half = q5_scales_in_order(d.astype(np.float16).view(np.uint16), "x16", "file")
        got = unpacked_rows("q4_0x16", w.x8_form(16), half, ggml_simd.UNPACK_Q4_0X16)
        assert np.array_equal(got[0].view(np.int8), values.reshape(32, -1)) and same_bits(got[1], d)


@pytest.mark.parametrize("fmt", ["q5_0", "q5_1"])
def test_unpack_row_q5_x16_reads_the_groups(fmt):
    """ggml_simd.unpack_row's UNPACK_Q5_0X16 / UNPACK_Q5_1X16 at kernels/ggml._row_start's addresses (the row's words
    in its group's 320-byte blocks, its fifth bits "shifted" 256 bytes on, its scales 16 apart): the same values and
    scales as the rows unpacked from the file's blocks; the form back to the file's bytes."""
    from llama_ref.kernels import ggml_simd
    from llama_ref.weights.packed import q5_bits_in_order, q5_scales_in_order

    form_rows, form_x16 = {"q5_0": (ggml_simd.UNPACK_Q5_0, ggml_simd.UNPACK_Q5_0X16),
                           "q5_1": (ggml_simd.UNPACK_Q5_1, ggml_simd.UNPACK_Q5_1X16)}[fmt]
    for pattern in ("random", "max", "min"):
        w = raw_blocks(fmt, 32, 7, seed=7, pattern=pattern)
        blocks, scales = w.file_form("file")
        blocks, scales = np.array(blocks), np.array(scales)
        want = unpacked_rows(fmt, q5_bits_in_order(blocks, ggml_simd.Q5_BIT_ORDER), scales, form_rows)
        got = unpacked_rows(fmt + "x16", q5_bits_in_order(blocks, "x16"), q5_scales_in_order(scales, "x16", "file"),
                            form_x16)
        assert np.array_equal(got[0], want[0]) and same_bits(got[1], want[1]) and same_bits(got[2], want[2])
        assert np.array_equal(q5_bits_in_order(q5_bits_in_order(blocks, "x16"), "file", "x16"), blocks)
        assert np.array_equal(q5_bits_in_order(q5_bits_in_order(blocks, "x8"), "x16", "x8"),
                              q5_bits_in_order(blocks, "x16"))


def test_unpack_row_q4_1_x16_reads_the_groups():
    """ggml_simd.unpack_row's UNPACK_Q4_1X16 at kernels/ggml._row_start's addresses (the row's words in its group's
    256-byte blocks, its pair 16 pairs apart): the same bytes and scales as UNPACK_Q4_1 of the row itself."""
    from llama_ref.kernels import ggml_simd
    from llama_ref.weights.packed import q5_scales_in_order

    for pattern in ("random", "max"):
        w = raw_blocks("q4_1", 32, 9, seed=9, pattern=pattern)
        pairs = np.ascontiguousarray(kernels()._scale_pairs(w.d, w.m))
        want = unpacked_rows("q4_1", np.ascontiguousarray(w.qs), pairs, ggml_simd.UNPACK_Q4_1)
        got = unpacked_rows("q4_1x16", w.x8_form(16), q5_scales_in_order(pairs, "x16", "file"),
                            ggml_simd.UNPACK_Q4_1X16)
        assert np.array_equal(got[0], want[0]) and same_bits(got[1], want[1]) and same_bits(got[2], want[2])


@functools.cache
def _unpack_rows_at():
    from numba import njit

    from llama_ref.kernels import ggml_simd
    from llama_ref.kernels.ggml import _row_start

    @njit
    def unpack(k, blocks, scales, form, qs, d, m):
        w, wd = blocks.ctypes.data, scales.ctypes.data
        ws, wds, nb = blocks.shape[1], scales.shape[1] * scales.itemsize, scales.shape[1]
        for r in range(blocks.shape[0]):
            src, sc = _row_start(k, w, ws, wd, wds, nb, r)
            ggml_simd.unpack_row(src, sc, nb, form, qs[r].ctypes.data, d[r].ctypes.data, m[r].ctypes.data)
    return unpack


def unpacked_rows(kind, blocks, scales, form):
    """ggml_simd.unpack_row of every row of a weight's arrays as kernels/ggml.py holds them for `kind` (a KIND name),
    at _row_start's addresses (a row of its own, or its words in its group of 8: the "x8" forms) -> (qs one byte per
    value, d, m float32)."""
    rows, nb = scales.shape
    out = (np.zeros((rows, nb * 32), np.uint8), np.zeros((rows, nb), np.float32), np.zeros((rows, nb), np.float32))
    _unpack_rows_at()(kernels().KIND[kind], blocks, scales, np.int64(form), *out)
    return out


def test_unpack_row_q4_1_is_one_byte_per_value():
    """ggml_simd.unpack_row's UNPACK_Q4_1 (a prefill's Q4_1, for Q5_1's byte tiles): a row of nibbles and fp16
    pairs (_scale_pairs) -> the values 0..15 one byte each, in value order (a block's low nibbles, then its high
    ones), and d, m as float32, exactly (fp16 subnormals to the largest, NaN and infinities in random bytes)."""
    from numba import njit

    from llama_ref.kernels import ggml_simd

    @njit
    def unpack(blocks, pairs, qs, d, m):
        for r in range(blocks.shape[0]):
            ggml_simd.unpack_row(blocks[r].ctypes.data, pairs[r].ctypes.data, pairs.shape[1],
                                 np.int64(ggml_simd.UNPACK_Q4_1), qs[r].ctypes.data, d[r].ctypes.data,
                                 m[r].ctypes.data)

    for pattern, scale in (("random", (6e-8, 65504.0)), ("min", (1e-3, 1.0)), ("max", (1e3, 65504.0))):
        w = raw_blocks("q4_1", 7, 9, seed=8, pattern=pattern, scale=scale)
        raw = np.ascontiguousarray(w.qs).reshape(7, 9, 16)
        want = np.concatenate([raw & 15, raw >> 4], axis=2).reshape(7, 9 * 32)
        pairs = np.ascontiguousarray(kernels()._scale_pairs(w.d, w.m))
        qs = np.zeros((7, 9 * 32), np.uint8)
        d, m = np.zeros((7, 9), np.float32), np.zeros((7, 9), np.float32)
        unpack(np.ascontiguousarray(w.qs), pairs, qs, d, m)
        assert np.array_equal(qs, want) and same_bits(d, w.d) and same_bits(m, w.m)


@pytest.mark.parametrize("kind", sorted(TYPES))
@pytest.mark.parametrize("nb", [8, 19])
def test_prefill_scale_table_equals_specification(kind, nb):
    """An AVX2 prefill tile of float32 scales takes each pair's d_w d_x from a table it makes before its loop, 8
    blocks a vmulps, then the rest one at a time: nb = 8 (vectors only) and 19 (two vectors and 3 alone); 13 rows
    (4-row tiles and single rows) by 6 activation rows (4 at a time and single ones); scales from fp16's subnormals
    to its largest, where d_w d_x underflows or overflows as the specification's does."""
    rng = np.random.default_rng(nb)
    for scale in ((6e-8, 1e-6), (1e-3, 1.0), (1e3, 65504.0)):
        w = raw_blocks(kind, 13, nb, seed=nb, scale=scale)
        x = (rng.standard_normal((6, 32 * nb)) * rng.uniform(1e-3, 1e3, (6, 1))).astype(np.float32)
        want = ggml.linear(x, w)
        for use_simd in SIMDS:
            assert same_bits(kernels().quantized_linear(x, w, use_simd), want), (scale, use_simd)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), kind=st.sampled_from(sorted(TYPES)), n=st.integers(1, 6), rows=st.integers(1, 20),
       nb=st.integers(1, 5), pattern=st.sampled_from(["random", "min", "max", "q8_edges"]),
       extreme=st.booleans(), use_simd=st.sampled_from(SIMDS))
def test_linear_raw_blocks_equal_specification_hypothesis(data, kind, n, rows, nb, pattern, extreme, use_simd):
    """Blocks of any bytes (not only what the quantizer writes), odd shapes, activations at the extremes or
    drawn as above."""
    w = raw_blocks(kind, rows, nb, data.draw(st.integers(0, 2**32 - 1)), pattern)
    x = (extreme_activations(n, 32 * nb, data.draw(st.integers(0, 2**32 - 1))) if extreme
         else data.draw(f32_rows(n, 32 * nb)))
    assert same_bits(kernels().quantized_linear(x, w, use_simd), ggml.linear(x, w))


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(data=st.data(), kind=st.sampled_from(sorted(TYPES)), n=st.integers(1, 6), rows=st.integers(1, 37),
       nb=st.integers(1, 9), scale=st.sampled_from([1e-3, 1.0, 50.0]), use_simd=st.sampled_from(SIMDS))
def test_linear_equals_specification_hypothesis(data, kind, n, rows, nb, scale, use_simd):
    w = TYPES[kind].quantize(data.draw(f32_rows(rows, 32 * nb)))
    x = data.draw(f32_rows(n, 32 * nb, scale))
    assert same_bits(kernels().quantized_linear(x, w, use_simd), ggml.linear(x, w))


def mnemonics(dispatcher) -> set:
    """The instruction mnemonics of a compiled function (only those: symbol names carry the test's own name,
    which may say vpdpbusd)."""
    asm = dispatcher.inspect_asm(dispatcher.signatures[0])
    return {line.split()[0] for line in asm.splitlines() if line.startswith("\t") and not line.startswith("\t.")}


def test_simd_path_is_vpdpbusd_where_the_cpu_has_it():
    """The integer part reaches the CPU's integer dot product: vpdpbusd in the VNNI branch (on a CPU that
    has it), and the portable branch without it."""
    from numba import njit, types

    from llama_ref.kernels import ggml_simd

    tile = kernels()._q8_RA

    @njit
    def dot(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd):
        tile(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    dot.compile((types.int64,) * 14)
    found = mnemonics(dot)
    assert ("vpdpbusd" in found) == ggml_simd.HAS_VNNI
    assert any(m.startswith("vfmadd") for m in found)  # the float part: true fused multiply-adds


@pytest.mark.parametrize("tile", ["_q8_RA", "_q8_R1", "_q4_0_R1", "_q4_0r_R1", "_q4_1_R1", "_q5_1_11", "_q5_0_11",
                                  "_q5_1_R1", "_q5_0_R1", "_q5_1x_RA", "_q5_1x8_R1", "_q5_0x8_R1", "_q4_1x8_R1"])
def test_avx2_path_is_vpmaddubsw(tile):
    """On an AVX2 CPU, use_simd=2 (and, without VNNI, the default 1) builds the tile's integers from
    vpmaddubsw + vpmaddwd, as llama.cpp does, and not from 32-bit multiplies (vpmulld, vpmovsxbd: the
    portable code on x86). The sign trick of the signed 8-bit weights is vpsignb."""
    from numba import njit, types

    from llama_ref.kernels import ggml_simd

    if not ggml_simd.HAS_AVX2:
        pytest.skip("the CPU has no AVX2")
    fn = getattr(kernels(), tile)
    for use in (1, 2):
        if use == 1 and ggml_simd.HAS_VNNI:
            continue

        @njit
        def dot(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost):
            fn(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use)  # a constant: one branch remains
        dot.compile((types.int64,) * 13)
        found = mnemonics(dot)
        assert {"vpmaddubsw", "vpmaddwd"} <= found and not found & {"vpmulld", "vpmovsxbd", "vpdpbusd"}, found
        assert ("vpsignb" in found) == tile.startswith(("_q8", "_q5_0"))


@pytest.mark.slow
def test_portable_environment_variable():
    code = "import llama_ref.kernels.ggml as k, llama_ref.kernels.ggml_kquants as kk; print(k.SIMD, kk.SIMD)"
    env = dict(os.environ, LLAMA_REF_GGML_PORTABLE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "0 0", out.stderr


# ---- the other operations -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", sorted(TYPES))
def test_embedding_equals_specification_and_unpacks_nothing(fmt):
    """The rows of a packed table as the specification gives them, and the table holds no more bytes afterwards
    (Q5_0 / Q5_1 keep their file's blocks: exact mode's compiled rows would unpack the whole table first)."""
    rng = np.random.default_rng(21)
    table = TYPES[fmt].quantize(rng.standard_normal((40, 96)).astype(np.float32))
    held = table.nbytes
    tokens = rng.integers(0, 40, (2, 5))
    assert same_bits(kernels().embedding(tokens, table, np.float32), ggml.embedding(tokens, table, np.float32))
    assert table.nbytes == held


def test_expf_equals_specification():
    x = np.concatenate([np.linspace(-120, 100, 40001, dtype=np.float32),
                        np.array([-np.inf, np.inf, np.nan, 0, -0.0, 88.7, 88.8, -103.9, -87.4], np.float32),
                        np.random.default_rng(0).standard_normal(5000).astype(np.float32) * 20])
    assert same_bits(ops().expf(x), ggml.ggml_v_expf(x))


attention_shapes = st.tuples(st.integers(1, 2), st.integers(1, 5),
                             st.sampled_from([(1, 1), (4, 2), (9, 3), (6, 6), (8, 2)]),
                             st.sampled_from([32, 64, 80, 128]), st.integers(0, 140), st.integers(0, 2**32 - 1))


def _attention_case(shape):
    B, T, (H, KVH), HD, start, seed = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, HD)).astype(np.float32) * 2
    k = rng.standard_normal((B, start + T, KVH, HD)).astype(np.float32) * 3
    v = rng.standard_normal((B, start + T, KVH, HD)).astype(np.float32)
    return q, k, v, start


@pytest.mark.parametrize("shape", [(1, 1, (9, 3), 64, 127, 0), (1, 1, (9, 3), 64, 0, 1), (2, 4, (4, 2), 80, 61, 2),
                                   (1, 3, (6, 6), 128, 64, 3),
                                   # 4 query heads a KV head (Llama 3.2 1B, 3.1 8B): a prefill's scores 4 heads a call
                                   (1, 21, (8, 2), 64, 40, 4), (2, 18, (8, 2), 128, 3, 5), (1, 2, (8, 2), 32, 70, 6)])
def test_attention_equals_specification(shape):
    q, k, v, start = _attention_case(shape)
    assert same_bits(ops().attention(q, k, v, start), ggml.attention(q, k, v, start))


@pytest.mark.parametrize("isa", ggml.ISAS)
def test_attention_parallel_odd_head_size_equals_specification(isa):
    """Enough work for the parallel region (prange over _balanced's order) and a head size that is an odd multiple
    of 8 (the value columns 16 at a time, then 8), in each build's order."""
    q, k, v, start = _attention_case((1, 70, (9, 3), 40, 90, 8))
    assert 70 * 9 * 160 * 40 >= ops().SERIAL_WORK
    assert same_bits(ops().attention(q, k, v, start, isa=isa), ggml.attention(q, k, v, start, isa=isa))


@pytest.mark.parametrize("blocks", [1, 2, 3, 7, 32, 33])
def test_attention_items_balanced(blocks):
    """_balanced is a permutation of the work items, and the prange indices of a KV head, two by two from its
    first, hold query blocks whose positions sum to the same (so each thread's contiguous run holds about the same
    keys)."""
    heads = 3
    order = [ops()._balanced(i, blocks) for i in range(heads * blocks)]
    assert sorted(order) == list(range(heads * blocks))
    for head in range(heads):
        for j in range(0, blocks - 1, 2):
            first, second = order[head * blocks + j], order[head * blocks + j + 1]
            assert first // blocks == second // blocks == head
            assert first % blocks + second % blocks == blocks - 1


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(shape=attention_shapes)
def test_attention_equals_specification_hypothesis(shape):
    q, k, v, start = _attention_case(shape)
    assert same_bits(ops().attention(q, k, v, start), ggml.attention(q, k, v, start))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 4), d=st.sampled_from([8, 64, 576, 1000]),
       scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e10]))
def test_rms_norm_and_swiglu_equal_specification(seed, n, d, scale):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1, n, d)) * scale).astype(np.float32)
    weight = rng.standard_normal(d).astype(np.float32)
    assert same_bits(ops().rms_norm(x, weight, 1e-5), ggml.rms_norm(x, weight, 1e-5))
    gate = (rng.standard_normal((n, d)) * 8).astype(np.float32)
    assert same_bits(ops().swiglu(gate, x[0]), ggml.swiglu(gate, x[0]))


@pytest.mark.parametrize("theta, head_dim, factors, window", [
    (10000.0, 64, False, 512), (500000.0, 128, True, 256),
    pytest.param(100000.0, 64, False, 8192, marks=pytest.mark.slow),
    pytest.param(500000.0, 128, True, 8192, marks=pytest.mark.slow)])
def test_rope_tables_every_position(theta, head_dim, factors, window):
    """Every position of a window (and a late stretch), plain and with Llama 3.1's frequency factors; then
    the rotation with those tables."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    if factors:
        freqs = freqs / np.linspace(1, 8, head_dim // 2)
    for start, length in ((0, window), (60000, 64)):
        cos, sin = ops().rope_tables(freqs, start, length, np.float32)
        ref_cos, ref_sin = ggml.rope_tables(freqs, start, length, np.float32)
        assert same_bits(cos, ref_cos) and same_bits(sin, ref_sin)
    x = np.random.default_rng(4).standard_normal((2, 5, 3, head_dim)).astype(np.float32)
    assert same_bits(ops().apply_rope(x, cos[:5], sin[:5]), ggml.apply_rope(x, cos[:5], sin[:5]))


def test_tiny_model_portable_path_equals_numpy(monkeypatch):
    from llama_ref.model.transformer import Transformer
    from llama_ref.weights.packed import quantize_weights
    from tiny import random_weights, tiny_args

    args = tiny_args()
    weights = quantize_weights(random_weights(args, seed=4), "q4_1")
    a = Transformer(args, weights, backend=ggml.backend_for("numpy", weights, "tiny"))
    monkeypatch.setattr(kernels(), "SIMD", 0)
    b = Transformer(args, weights, backend=ggml.backend_for("numba", weights, "tiny"))
    tokens = np.array([3, 1, 4, 1, 5, 9])
    la = np.concatenate([a.forward(tokens[:4]), a.forward(tokens[4:], start_pos=4)])
    lb = np.concatenate([b.forward(tokens[:4]), b.forward(tokens[4:], start_pos=4)])
    assert same_bits(la, lb)


def test_cache_values_round_as_the_specification():
    """The compiled fp16 rounding of a prefill's keys and values (kernels/ggml.cache_values, parallel past
    FP16_MIN_VALUES) gives the specification's values bit for bit: ties to even, subnormals, past 65504 inf,
    signed zeros, infinities; NaN stays NaN; below the limit and for float64 it is the specification's own."""
    from llama_ref.kernels import ggml as kg

    rng = np.random.default_rng(21)
    x = (rng.standard_normal((3, 700, 4, 16)) * np.float32(4.0) ** rng.integers(-12, 9, (3, 700, 4, 16)))
    x = x.astype(np.float32)
    flat = x.reshape(-1)
    ties = np.float16(rng.standard_normal(64)).astype(np.float32)  # fp16 values, then halfway to the next one
    flat[:64] = ties + np.spacing(np.float16(ties)).astype(np.float32) / 2
    flat[64:72] = [65504, 65519.99, 65520, -70000, np.inf, -np.inf, 0.0, -0.0]
    flat[72:80] = np.float32(2.0 ** -24) * np.array([0.5, 1.5, 2.5, 0.49, 3, -0.5, -1.5, 1], np.float32)
    flat[80] = np.nan
    assert x.size >= kg.FP16_MIN_VALUES
    got, want = kg.cache_values(x), ggml.cache_values(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    assert np.isnan(got.reshape(-1)[80])
    flat_got, flat_want = got.reshape(-1), want.reshape(-1)
    keep = ~np.isnan(flat_want)
    assert np.array_equal(flat_got[keep].view(np.uint32), flat_want[keep].view(np.uint32))
    small = x.reshape(-1)[:100].reshape(4, 25)
    assert same_bits(kg.cache_values(small), ggml.cache_values(small))
    assert kg.cache_values(x.astype(np.float64)).dtype == ggml.cache_values(x.astype(np.float64)).dtype
