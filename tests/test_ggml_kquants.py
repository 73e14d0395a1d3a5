"""arithmetic="ggml" on K-quants: Q4_K / Q5_K / Q6_K by Q8_K (llama_ref/model/ggml_kquants.py) and its Numba
twin (kernels/ggml_kquants.py).

The Q8_K rounding and the weights' integers are checked by hand and against gguf.quants' dequantization; every
routine against llama.cpp's own, called one by one (tests/data/llamacpp_kquant_dots.npz,
tests/fixtures/make_llamacpp_kquant_dots.py); the Numba kernels against the NumPy specification bit for bit;
the whole model against llama.cpp's own logits on tiny GGUFs that llama.cpp's quantizer made
(tests/data/tiny_ckpt/kquant_*.gguf and tests/data/llamacpp_kquant_logits.npz,
tests/fixtures/make_llamacpp_kquant_logits.py), from its AVX-512 build and from its AVX2 build
(tests/data/llamacpp_kquant_logits_avx2.npz: the same GGUFs and routines, other logits; model/ggml.py's ISA).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llama_ref
from llama_ref.model import ggml, ggml_kquants as gk
from llama_ref.weights.packed import Q4_KWeight, Q5_KWeight, Q6_KWeight

TYPES = {"q4_k": Q4_KWeight, "q5_k": Q5_KWeight, "q6_k": Q6_KWeight}
# use_simd: 0 portable, 1 the CPU's best (VNNI or AVX2), 2 AVX2, 3 the Intel AVX-512 VNNI form
# (ggml_simd.host_prefers_512: repacked Q4_K's prefill tile in vpdpbusd chains; elsewhere 3 runs as 1)
SIMDS = [0, 1, 2, 3]
FIXTURE = Path(__file__).parent / "data" / "llamacpp_kquant_logits.npz"
FIXTURES = {"avx512": FIXTURE, "avx2": Path(__file__).parent / "data" / "llamacpp_kquant_logits_avx2.npz"}


def compiled():
    from llama_ref.kernels import ggml_kquants
    return ggml_kquants


def random_kquant(cls, rows: int, cols: int, seed: int):
    """A K-quant matrix of random blocks: every quant and 6/8-bit scale drawn from all its values, the fp16
    super-block scales from a sane range (random bits would give inf and NaN)."""
    rng = np.random.default_rng(seed)
    nb = cols // 256
    raw = rng.integers(0, 256, (rows, nb, cls.type_size), dtype=np.uint8)
    scales = rng.uniform(1e-4, 3e-2, (rows, nb, 2)).astype(np.float16).view(np.uint8)  # (rows, nb, 4)
    if cls is Q6_KWeight:
        raw[:, :, 208:210] = scales[:, :, :2]
    else:
        raw[:, :, 0:4] = scales
    return cls(raw.reshape(rows, -1), (rows, cols))


def activations(n: int, cols: int, seed: int) -> np.ndarray:
    """Normal rows, with a zero super-block, an outlier, or values on the half-integer grid by seed."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    kind = seed % 4
    if kind == 1:
        x[:, :256] = 0
    elif kind == 2:
        x[0, rng.integers(cols)] *= -100
    elif kind == 3:
        x = np.round(x * 4) / 2
    return x


# ---- Q8_K ------------------------------------------------------------------------------------------------------

def test_quantize_row_q8_K_by_hand():
    """The first value of largest magnitude sets iscale = -127 / max: max = -127 gives iscale = 1 (q = x,
    rounded half to even), max = +127 gives iscale = -1 (q = -x, and a later -127 becomes +127, kept by the
    min(127, .)); bsums are the sums of each 16 quants."""
    x = np.zeros((2, 256), np.float32)
    x[0, :7] = [-127, 2.5, 1.5, -0.5, -2.5, 0.49, 127]
    x[1, :7] = [127, 2.5, 1.5, -0.5, -2.5, 0.49, -127]
    d, q, bsums = gk.quantize_row_q8_K(x)
    assert d[:, 0].tolist() == [1, -1] and d.dtype == np.float32
    assert q[0, 0, :7].tolist() == [-127, 2, 2, 0, -2, 0, 127]  # ties to even: 2.5 -> 2, -2.5 -> -2
    assert q[1, 0, :7].tolist() == [-127, -2, -2, 0, 2, 0, 127]
    assert bsums[:, 0, 0].tolist() == [2, -2] and not bsums[:, 0, 1:].any()


def test_quantize_row_q8_K_scale_is_float32_and_signed():
    """d = 1 / (-127 / max) in float32 (not fp16, unlike Q8_0), negative when the largest value is positive."""
    x = np.zeros((2, 256), np.float32)
    x[0, 0], x[0, 1] = 0.3, -0.15
    d, q, _ = gk.quantize_row_q8_K(x)
    iscale = np.float32(-127) / np.float32(0.3)
    assert d[0, 0] == np.float32(1) / iscale and d[0, 0] < 0 and d[0, 0] != np.float16(d[0, 0])
    assert q[0, 0, 0] == -127 and q[0, 0, 1] == np.rint(np.float32(-0.15) * iscale)
    assert not d[1].any() and not q[1].any()  # a zero block: d = 0, q = 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nb=st.integers(1, 3))
def test_quantize_row_q8_K_round_trip(seed, nb):
    x = activations(2, 256 * nb, seed)
    d, q, bsums = gk.quantize_row_q8_K(x)
    blocks = x.reshape(2, nb, 256)
    err = np.abs(d[:, :, None] * q.astype(np.float32) - blocks)
    assert np.all(err <= np.abs(d)[:, :, None] * 0.5001 + 1e-30)
    assert np.array_equal(bsums, q.reshape(2, nb, 16, 16).sum(axis=3))
    assert q.min() >= -127 and q.max() <= 127


# ---- the weights' integers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(TYPES))
def test_weight_superblocks_rebuild_gguf_dequantization(kind):
    """The integers ggml mode reads give back gguf.quants' float values: d sc q - dmin mn (Q4_K, Q5_K),
    d sc (q - 32) (Q6_K), each step in float32 as ggml's dequantize_row_*."""
    import gguf

    w = random_kquant(TYPES[kind], 5, 512, seed=7)
    expected = gguf.quants.dequantize(w.raw_blocks(), getattr(gguf.GGMLQuantizationType, kind.upper()))
    wb = gk.weight_superblocks(w, slice(None))
    if kind == "q6_k":
        scale = (wb["d"][:, :, None] * wb["sc"].astype(np.float32))[:, :, :, None]  # (5, 2, 16, 1)
        q = wb["q"].reshape(5, 2, 16, 16).astype(np.float32) - 32
        got = scale * q
    else:
        scale = wb["d"][:, :, None] * wb["sc"].astype(np.float32)  # (5, 2, 8)
        minimum = wb["dmin"][:, :, None] * wb["mn"].astype(np.float32)
        got = scale[..., None] * wb["q"].astype(np.float32) - minimum[..., None]
        assert wb["q"].max() <= (15 if kind == "q4_k" else 31)
    assert np.array_equal(got.reshape(5, 512), expected.reshape(5, 512))


# ---- dot products ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,rows", [("q4_k", 16), ("q4_k", 13), ("q5_k", 16), ("q6_k", 13)])
def test_dot_products_close_to_dequantized_product(kind, rows):
    """ggml's product is the exact one up to the activations' 8-bit rounding."""
    w = random_kquant(TYPES[kind], rows, 512, seed=3)
    x = activations(3, 512, seed=4)
    dense = w.to_float()
    bound = np.abs(x) @ np.abs(dense).T
    assert np.all(np.abs(gk.quantized_linear(x, w) - x @ dense.T) <= 0.02 * bound)
    assert np.array_equal(ggml.linear(x, w), gk.quantized_linear(x, w))  # model/ggml.py's dispatch


def test_q4_K_paths():
    """llama.cpp repacks Q4_K matrices whose rows come in groups of 8; the two orders differ."""
    assert gk.dot_for(random_kquant(Q4_KWeight, 16, 256, 0)) is gk.ggml_gemv_q4_K_8x8_q8_K
    assert gk.dot_for(random_kquant(Q4_KWeight, 13, 256, 0)) is gk.ggml_vec_dot_q4_K_q8_K
    assert gk.dot_for(random_kquant(Q6_KWeight, 16, 256, 0)) is gk.ggml_vec_dot_q6_K_q8_K
    w = random_kquant(Q4_KWeight, 64, 1024, 1)
    x = activations(4, 1024, 2)
    wb = gk.weight_superblocks(w, slice(None))
    a = gk.ggml_gemv_q4_K_8x8_q8_K(wb, *gk.quantize_row_q8_K(x))
    b = gk.ggml_vec_dot_q4_K_q8_K(wb, *gk.quantize_row_q8_K(x))
    assert not np.array_equal(a, b) and np.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_q6_K_lanes_by_hand():
    """Scales that are powers of two make every float step exact: the result is d_w d_x sum(sc (q-32) x)."""
    raw = np.zeros((1, 210), np.uint8)
    raw[0, 0:128] = 0x21  # low nibbles 1, high nibbles 2
    raw[0, 128:192] = 0b10_01_00_11  # high bits 3, 0, 1, 2 for the four 32-value groups
    raw[0, 192:208] = np.arange(16, dtype=np.int8).view(np.uint8) - 8  # scales -8 .. 7
    raw[0, 208:210] = np.array([0.5], np.float16).view(np.uint8)
    w = Q6_KWeight(raw, (1, 256))
    x = np.zeros((1, 256), np.float32)
    x[0, :] = np.tile(np.arange(-4, 4, dtype=np.float32), 32) / 4
    x[0, 5] = -127 / 32  # the largest magnitude, negative: d_x = 1/32 exactly
    expected = (x.astype(np.float64) @ w.to_float().T.astype(np.float64))[0, 0]
    xd, xq, _ = gk.quantize_row_q8_K(x)
    assert xd[0, 0] == np.float32(1 / 32) and np.array_equal(xq[0, 0] / np.float32(32), x[0])
    assert gk.quantized_linear(x, w)[0, 0] == expected


# ---- each routine against llama.cpp's own, called through ctypes ----------------------------------------------

@pytest.fixture(scope="module")
def dots():
    """tests/data/llamacpp_kquant_dots.npz (tests/fixtures/make_llamacpp_kquant_dots.py): random blocks and
    activation rows with edge cases, and what llama.cpp's quantize_row_q8_K, ggml_vec_dot_q*_K_q8_K and
    ggml_gemv_q4_K_8x8_q8_K return for them on this x86 build."""
    return np.load(Path(__file__).parent / "data" / "llamacpp_kquant_dots.npz")


def test_quantize_row_q8_K_equals_llamacpp(dots):
    d, q, bsums = gk.quantize_row_q8_K(dots["x"])
    assert np.array_equal(d.view(np.uint32), dots["q8k_d"].view(np.uint32))
    assert np.array_equal(q, dots["q8k_qs"]) and np.array_equal(bsums, dots["q8k_bsums"])
    cd, cq, cbs = compiled().quantize_q8_K(dots["x"])  # the Numba twin
    assert np.array_equal(cd.view(np.uint32), d.view(np.uint32))
    assert np.array_equal(cq, q.reshape(cq.shape)) and np.array_equal(cbs, bsums)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), nb=st.integers(1, 3), n=st.integers(1, 3))
def test_quantize_q8_K_numba_equals_numpy(seed, nb, n):
    x = activations(n, 256 * nb, seed)
    d, q, bsums = gk.quantize_row_q8_K(x)
    cd, cq, cbs = compiled().quantize_q8_K(x)
    assert np.array_equal(cd.view(np.uint32), d.view(np.uint32))
    assert np.array_equal(cq, q.reshape(n, -1)) and np.array_equal(cbs, bsums)


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_dot_products_equal_llamacpp(kind, dots):
    """Every routine bit for bit, the specification and the Numba kernels (every integer code path)."""
    raw, x = dots[f"{kind}_raw"], dots["x"]
    w = TYPES[kind](raw, (raw.shape[0], x.shape[1]))
    wb = gk.weight_superblocks(w, slice(None))
    q8 = gk.quantize_row_q8_K(x)
    vec_dot = {"q4_k": gk.ggml_vec_dot_q4_K_q8_K, "q5_k": gk.ggml_vec_dot_q5_K_q8_K,
               "q6_k": gk.ggml_vec_dot_q6_K_q8_K}[kind]
    expected = dots[f"{kind}_vec_dot"]
    assert np.array_equal(vec_dot(wb, *q8).view(np.uint32), expected.view(np.uint32))
    if kind == "q4_k":  # the rows come in groups of 8: llama.cpp's model path is the repacked gemv
        assert np.array_equal(gk.ggml_gemv_q4_K_8x8_q8_K(wb, *q8), dots["q4_k_gemv"])
        expected = dots["q4_k_gemv"]
        w13 = TYPES[kind](raw[:13], (13, x.shape[1]))  # 13 rows: not repacked, the vec_dot order
        for simd in SIMDS:
            got = compiled().quantized_linear(x, w13, simd=simd)
            assert np.array_equal(got.view(np.uint32), dots["q4_k_vec_dot"][:, :13].view(np.uint32))
    for simd in SIMDS:
        assert np.array_equal(compiled().quantized_linear(x, w, simd=simd).view(np.uint32), expected.view(np.uint32))
    assert np.array_equal(gk.quantized_linear(x, w).view(np.uint32), expected.view(np.uint32))


def test_rope_tables_take_the_c_library_cosf():
    """llama.cpp's RoPE cache calls cosf / sinf; glibc's are not correctly rounded, and a table one ulp off
    changed llama.cpp's logits on the default model's Q4_K_M file (docs/verification.md, section 5b). The
    specification takes the C library's values, and so does the Numba twin."""
    import ctypes
    import ctypes.util

    from llama_ref.kernels import ggml_ops
    from tiny import tiny_args

    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.cosf.restype, libm.cosf.argtypes = ctypes.c_float, [ctypes.c_float]
    libm.sinf.restype, libm.sinf.argtypes = ctypes.c_float, [ctypes.c_float]
    freqs = ggml.rope_frequencies(tiny_args(dim=576, n_heads=9, n_kv_heads=3, rope_theta=100000.0))
    cos, sin = ggml.rope_tables(freqs, 0, 64, np.float32)
    theta_scale = np.float32(freqs[1] / freqs[0])
    for t in range(64):
        theta = np.float32(t)
        for i in range(freqs.shape[0]):
            assert cos[t, i] == np.float32(libm.cosf(float(theta))) and sin[t, i] == np.float32(libm.sinf(float(theta)))
            theta = np.float32(theta * theta_scale)
    ncos, nsin = ggml_ops.rope_tables(freqs, 0, 64, np.float32)
    assert np.array_equal(ncos, cos) and np.array_equal(nsin, sin)


# ---- Numba equals NumPy ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("simd", SIMDS)
@pytest.mark.parametrize("kind", sorted(TYPES))
def test_numba_equals_numpy_fixed_shapes(kind, simd):
    """The fast tier's copy of the hypothesis test: rows in groups of 8 and not, one and three rows of x;
    the portable integer code (simd=0), AVX2's (simd=2, where the CPU has it) and the best of this CPU
    (simd=1: vpdpbusd, else AVX2, else portable again)."""
    for n, rows, cols, seed in ((1, 24, 256, 1), (3, 13, 768, 2)):
        w = random_kquant(TYPES[kind], rows, cols, seed)
        x = activations(n, cols, seed + 10)
        got, expected = compiled().quantized_linear(x, w, simd=simd), gk.quantized_linear(x, w)
        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("simd", SIMDS)
@pytest.mark.parametrize("kind", sorted(TYPES))
def test_decode_one_thread_equals_numpy(kind, simd, monkeypatch):
    """One activation row on one thread takes Q6_K's serial decode (no parallel region, the weights asked for
    ahead); it and the parallel path equal the specification, on random blocks and the extremes (Q6_K's int8
    scales -128 and 127 by bsums of +-127 values)."""
    import numba

    rng = np.random.default_rng(7)
    before = numba.get_num_threads()
    try:
        from llama_ref.kernels import ggml_ops

        # On more threads, small products run on the calling thread too (ggml_ops.SERIAL_WEIGHTS): with the
        # limit at 0 every one takes the parallel path.
        for threads, limit in sorted({(1, ggml_ops.SERIAL_WEIGHTS), (before, ggml_ops.SERIAL_WEIGHTS), (before, 0)}):
            numba.set_num_threads(threads)
            monkeypatch.setattr(ggml_ops, "SERIAL_WEIGHTS", limit)
            for rows, cols in ((24, 256), (13, 768), (40, 1536)):
                ws = [random_kquant(TYPES[kind], rows, cols, rows)]
                ws += [extreme_kquant(TYPES[kind], rows, cols, fill, 0.01) for fill in (0xFF, 0x80, 0x00)]
                for w in ws:
                    for x in (activations(1, cols, cols), rng.choice([-1, 1], (1, cols)).astype(np.float32)):
                        got, expected = compiled().quantized_linear(x, w, simd=simd), gk.quantized_linear(x, w)
                        assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("simd", SIMDS)
@pytest.mark.parametrize("cls", [Q4_KWeight, Q5_KWeight, Q6_KWeight], ids=lambda c: c.format)
def test_kquant_prefill_tiles_equal_numpy(cls, simd):
    """The prefill tiles (one weight row by ACTS activation rows, kernels/ggml_kquants._define_q4_k_tile; Q5_K
    and Q6_K by a group of GROUP, _define_q5_k_gtile (two sub-blocks per vpmaddwd, the group's mins in one vector)
    and _define_q6_k_gtile, SEG super-blocks at a time) and the
    activation rows left over one by one: counts below, at and past ACTS and GROUP (and their multiples), rows
    of one segment, of a whole number of them and of a part one more, row counts that split unevenly over the
    parallel tiles (Q4_K: in groups of 8, the gemv's order, and not); random blocks and the extremes."""
    acts, group, seg = compiled().ACTS, compiled().GROUP, 256 * compiled().SEG
    for n, rows, cols in ((acts, 13, 256), (acts + 1, 16, 512), (2 * acts + 3, 37, 768), (acts - 1, 3, 1536),
                          (acts + 2, 24, 256), (group, 5, seg), (group + 1, 17, 2 * seg), (2 * group + 5, 9, seg + 512),
                          (group - 1, 4, seg + 256)):
        ws = [random_kquant(cls, rows, cols, n), extreme_kquant(cls, rows, cols, 0x80, 0.01)]
        for w in ws:
            x = activations(n, cols, rows + n)
            got, expected = compiled().quantized_linear(x, w, simd=simd), gk.quantized_linear(x, w)
            assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), (n, rows, cols)


def assert_woven(got: np.ndarray, values: np.ndarray):
    """256 bytes woven by 16-bit words (ggml_kquants._weave; group_acts' X1, X2; the unpacked rows' V1, V2) against
    the values in value order, (8 pieces j, 8 u, 4 values 4u + t): per pair p of pieces, 32 bytes whose dword u
    holds values 4u, 4u + 1 of piece 2p, then of 2p + 1, and 32 bytes with values 4u + 2, 4u + 3."""
    woven = got.reshape(4, 2, 8, 2, 2)  # (p, first / second 32 bytes, u, piece 2p / 2p + 1, 2 values)
    for p in range(4):
        for h in range(2):
            for j in range(2):
                assert np.array_equal(woven[p, h, :, j], values[2 * p + j, :, 2 * h:2 * h + 2])


def test_group_acts_layout_by_hand():
    """The grouped prefill tiles' records (group_acts; _define_q5_k_gtile, _define_q6_k_gtile): per group of GROUP
    rows and super-block, per row and pair p of 32-value pieces 32 bytes X1 (dword u: values 4u, 4u + 1 of piece
    2p, then of 2p + 1) and 32 bytes X2 (values 4u + 2, 4u + 3); each row's 16 bsums as int16 and its scale as
    float32; after them (pair_sums, 32-byte aligned) per pair p 32 bytes of (S[2p], S[2p + 1]) of each row
    (int16, row a at dword a, zeros past the last), S[j] = bsum[2j] + bsum[2j + 1]; the rows past the last
    whole group left out."""
    k = compiled()
    g, nb = k.GROUP, 2
    x = activations(2 * g + 3, 256 * nb, 9)
    xd, xq, xbs = k.quantize_q8_K(x)
    rec, spo = k.act_record(g), k.pair_sums(g)
    assert rec % 64 == 0 and spo % 32 == 0 and spo >= 292 * g and rec >= spo + 128
    got = k.group_acts(xq, xd, xbs)
    assert got.shape == (2, nb * rec) and got.dtype == np.int8
    for grp in range(2):
        for i in range(nb):
            r = got[grp, i * rec:(i + 1) * rec]
            sums = r[spo:spo + 128].view(np.int16).reshape(4, 8, 2)  # (pair p, row a, S[2p] / S[2p + 1])
            for a in range(g):
                n = grp * g + a
                v = xq[n, 256 * i:256 * i + 256].reshape(8, 8, 4)  # (sub-block j, u, value 4u + t)
                assert_woven(r[256 * a:256 * a + 256], v)
                assert np.array_equal(r[256 * g + 32 * a:256 * g + 32 * a + 32].view(np.int16), xbs[n, i])
                assert r[288 * g + 4 * a:288 * g + 4 * a + 4].view(np.float32)[0] == xd[n, i]
                assert np.array_equal(sums[:, a].reshape(8), xbs[n, i, 0::2] + xbs[n, i, 1::2])
            assert not sums[:, g:].any() and not r[292 * g:spo].any() and not r[spo + 128:].any()


def test_unpacked_q5_k_rows_by_hand():
    """Q5_K's rows as its prefill tile reads them (kernels/ggml_kquants.unpack_q5_k): per super-block, per pair p
    of sub-blocks 32 bytes V1 (dword u: values 4u, 4u + 1 of sub-block 2p, then of 2p + 1) and 32 bytes V2 (values
    4u + 2, 4u + 3), the weight's own integers (weight_superblocks); then sc[j] and mn[j] as int16, d and dmin
    as float32, zeros to the record's end. Random blocks and every byte 0xff."""
    k = compiled()
    rec = k.Q5U_BYTES
    for w in (random_kquant(Q5_KWeight, 5, 768, 11), extreme_kquant(Q5_KWeight, 2, 512, 0xFF, 65504.0)):
        R, nb = w.shape[0], w.shape[1] // 256
        got = k.unpacked_rows(w).reshape(R, nb, rec)
        wb = gk.weight_superblocks(w, slice(None))
        for r in range(R):
            for i in range(nb):
                blk, q = got[r, i], wb["q"][r, i].reshape(8, 8, 4)  # (sub-block j, u, value 4u + t)
                assert_woven(blk[:256], q)
                assert np.array_equal(blk[k.Q5U_SC:k.Q5U_SC + 16].view(np.int16), wb["sc"][r, i])
                assert np.array_equal(blk[k.Q5U_MN:k.Q5U_MN + 16].view(np.int16), wb["mn"][r, i])
                d, dmin = blk[k.Q5U_D:k.Q5U_D + 8].view(np.float32)
                assert d == wb["d"][r, i] and dmin == wb["dmin"][r, i]
                assert not blk[k.Q5U_D + 8:].any()


def test_unpacked_q6_k_rows_by_hand():
    """Q6_K's rows as its prefill tile reads them (kernels/ggml_kquants.unpack_q6_k): per super-block, per pair p
    of 32-value chunks 32 bytes V1 (dword u: values 4u, 4u + 1 of chunk 2p, then of 2p + 1) and 32 bytes V2
    (values 4u + 2, 4u + 3), the six-bit values 0..63 (weight_superblocks); per pair p the int16 scales of lane
    u's values, sc[4p + (u >= 4)] at word 2u and sc[4p + 2 + (u >= 4)] at 2u + 1; the 16 scales times 32 as
    int16; d as float32; zeros to the record's end. Random blocks and the extremes (extreme_kquant 0x80: values
    63, scales -128 and 127, times 32 -4096 and 4064)."""
    k = compiled()
    rec = k.Q6U_BYTES
    for w in (random_kquant(Q6_KWeight, 5, 768, 12), extreme_kquant(Q6_KWeight, 2, 512, 0x80, 65504.0)):
        R, nb = w.shape[0], w.shape[1] // 256
        got = k.unpacked_rows(w).reshape(R, nb, rec)
        wb = gk.weight_superblocks(w, slice(None))
        for r in range(R):
            for i in range(nb):
                blk, sc, q = got[r, i], wb["sc"][r, i], wb["q"][r, i].reshape(8, 8, 4)  # (chunk, u, value 4u + t)
                assert_woven(blk[:256], q)
                scales = blk[k.Q6U_SC:k.Q6U_SC + 128].view(np.int16).reshape(4, 8, 2)  # (p, u, chunk 2p / 2p + 1)
                for p in range(4):
                    for j in range(2):
                        for u in range(8):
                            assert scales[p, u, j] == sc[2 * (2 * p + j) + (u >= 4)]
                assert np.array_equal(blk[k.Q6U_SC32:k.Q6U_SC32 + 32].view(np.int16), 32 * sc)
                assert blk[k.Q6U_D:k.Q6U_D + 4].view(np.float32)[0] == wb["d"][r, i]
                assert not blk[k.Q6U_D + 4:].any()


def test_repack_q4_k_layout_by_hand():
    """repack_q4_k's bytes read back as the weight's own integers (weight_superblocks) and fp16 scales: quants of
    row r, sub-block j, value v at 256 (j // 2) + 32 (v // 4) + 4 r + v % 4, low nibble for even j; sc[r, j] at
    1024 + 16 j + 2 r (twice); mn[r, j] at 1152 + 16 (j // 2) + 2 r + j % 2; d, dmin of row r at 1216 + 2 r,
    1232 + 2 r."""
    k = compiled()
    w = random_kquant(Q4_KWeight, 16, 512, 3)
    packed = k.repack_q4_k(w.qs, w.head).reshape(2, 2, k.Q4X8_BYTES)  # (groups, super-blocks, bytes)
    wb = gk.weight_superblocks(w, slice(None))
    for g, i, r, j in ((0, 0, 0, 0), (1, 1, 7, 7), (0, 1, 3, 4), (1, 0, 5, 1)):
        row, blk = 8 * g + r, packed[g, i]
        for v in (0, 3, 17, 31):
            byte = blk[256 * (j // 2) + 32 * (v // 4) + 4 * r + v % 4]
            assert (byte >> 4 if j % 2 else byte & 15) == wb["q"][row, i, j, v]
        assert blk[1024 + 16 * j + 2 * r] == blk[1024 + 16 * j + 2 * r + 1] == wb["sc"][row, i, j]
        assert blk[1152 + 16 * (j // 2) + 2 * r + j % 2] == wb["mn"][row, i, j]
        assert blk[1216 + 2 * r:1218 + 2 * r].view("<f2")[0] == wb["d"][row, i]
        assert blk[1232 + 2 * r:1234 + 2 * r].view("<f2")[0] == wb["dmin"][row, i]


def test_repack_q4_k_compiled_equals_numpy():
    """The compiled repack the prefill reads (q4_kx8: _repack_q4_k) gives repack_q4_k's bytes: random blocks,
    every byte 0xff and every byte 0x00, groups split over threads."""
    k = compiled()
    for w in (random_kquant(Q4_KWeight, 64, 768, 5), extreme_kquant(Q4_KWeight, 16, 512, 0x80, 0.01),
              extreme_kquant(Q4_KWeight, 8, 256, 0x00, 0.01)):
        assert np.array_equal(k.q4_kx8(w), k.repack_q4_k(w.qs, w.head))


@pytest.mark.parametrize("simd", SIMDS)
def test_q4_k_8row_prefill_tile_equals_numpy(simd):
    """Repacked Q4_K's prefill (rows % 8 == 0, more than one activation row): tiles of 8 rows by ACTS8
    activation rows (kernels/ggml_kquants._define_q4_kx8_tile, llama.cpp's ggml_gemm_q4_K_8x8_q8_K) and the
    activation rows left over by tiles of 8 x 1, bit for bit the specification's gemv order; counts below, at
    and past ACTS8, groups of 8 that split unevenly over the parallel work items, random blocks and the
    extremes (the largest int16 sums: 15 x 127 everywhere)."""
    k = compiled()
    acts = k.ACTS8
    for n, rows, cols in ((2, 8, 256), (acts, 16, 512), (acts + 1, 24, 256), (2 * acts + 3, 40, 768),
                          (acts - 1, 8, 1536)):
        ws = [random_kquant(Q4_KWeight, rows, cols, n), extreme_kquant(Q4_KWeight, rows, cols, 0x80, 0.01),
              extreme_kquant(Q4_KWeight, rows, cols, 0x00, 0.01)]
        for w in ws:
            for x in (activations(n, cols, rows + n), np.full((n, cols), -1.0, np.float32)):
                got, expected = k.quantized_linear(x, w, simd=simd), gk.quantized_linear(x, w)
                assert np.array_equal(got.view(np.uint32), expected.view(np.uint32)), (n, rows, cols)
    assert len(k._Q4X8) >= 1  # the repacked copies are cached per weight ...
    w = random_kquant(Q4_KWeight, 8, 256, 0)
    assert k.q4_kx8(w) is k.q4_kx8(w)
    key = id(w)
    del w
    assert key not in k._Q4X8  # ... and go with it


def test_q56_K_keep_the_file_bytes():
    """Q5_K and Q6_K are kept at their true width (the file's 176 / 210 bytes per 256 values) until exact
    mode's kernels ask for one byte per value (kernel_args), which are then counted in nbytes."""
    import gguf

    w = random_kquant(Q6_KWeight, 5, 512, 3)
    assert w.blocks.shape == (5, 2 * 210) and w.nbytes == 5 * 2 * 210
    qs, d = w.kernel_args()
    assert qs.shape == (5, 512) and d.shape == (5, 32) and w.nbytes == 5 * 2 * 210 + qs.nbytes + d.nbytes
    expected = gguf.quants.dequantize(w.raw_blocks(), gguf.GGMLQuantizationType.Q6_K)
    assert np.array_equal((d.reshape(5, 32, 1) * qs.view(np.int8).reshape(5, 32, 16)).reshape(5, 512), expected)

    w = random_kquant(Q5_KWeight, 5, 512, 4)
    assert w.blocks.shape == (5, 2 * 176) and w.nbytes == 5 * 2 * 176
    assert np.array_equal(w.head, w.blocks.reshape(5, 2, 176)[:, :, :16])
    qs, d, m, has_min = w.kernel_args()
    assert qs.shape == (5, 512) and d.shape == m.shape == (5, 16) and has_min
    assert w.nbytes == 5 * 2 * 176 + qs.nbytes + d.nbytes + m.nbytes
    expected = gguf.quants.dequantize(w.raw_blocks(), gguf.GGMLQuantizationType.Q5_K)
    got = d.reshape(5, 16, 1) * qs.reshape(5, 16, 32).astype(np.float32) + m.reshape(5, 16, 1)
    assert np.array_equal(got.reshape(5, 512), expected)
    for cls in (Q5_KWeight, Q6_KWeight):  # copied: a GGUF tensor is a view of the file's memory map
        raw = random_kquant(cls, 2, 256, 5).raw_blocks()
        assert not np.shares_memory(cls(raw, (2, 256)).blocks, raw)


def extreme_kquant(cls, rows: int, cols: int, fill: int, d: float):
    """A K-quant matrix with every quant and scale byte `fill` (0xff: the largest values, Q4_K 15, Q5_K 31,
    Q6_K 63, 6-bit scales and mins 63, Q6_K's int8 scales -1; 0x00 the smallest; 0x80: 0xff, but Q6_K's
    scales alternate -128 and 127) and the fp16 d (and dmin) = d."""
    raw = np.full((rows, cols // 256, cls.type_size), 0xFF if fill == 0x80 else fill, np.uint8)
    dd = np.array([d, d], np.float16).view(np.uint8)
    if cls is Q6_KWeight:
        if fill == 0x80:
            raw[:, :, 192:208] = np.array([0x80, 0x7F] * 8, np.uint8)
        raw[:, :, 208:210] = dd[:2]
    else:
        raw[:, :, 0:4] = dd
    return cls(raw.reshape(rows, -1), (rows, cols))


@pytest.mark.parametrize("simd", SIMDS)
@pytest.mark.parametrize("kind", sorted(TYPES))
def test_numba_equals_numpy_extreme_values(kind, simd):
    """The largest quants by activations of magnitude 127, where AVX2's int16 pair sums (vpmaddubsw) come
    nearest their limit (Q6_K: 2 * 63 * 127 = 16002) and the scales multiply them in vpmaddwd (Q6_K's -128
    and 127); fp16 super-block scales from subnormal to the largest."""
    rng = np.random.default_rng(5)
    for fill in (0xFF, 0x80, 0x00):
        for d in (6e-8, 0.01, 65504.0):
            w = extreme_kquant(TYPES[kind], 16, 512, fill, d)
            x = rng.choice([-1, 1], (3, 512)).astype(np.float32) * np.float32(3.0)
            assert set(np.unique(compiled().quantize_q8_K(x)[1])) == {-127, 127}
            got, expected = compiled().quantized_linear(x, w, simd=simd), gk.quantized_linear(x, w)
            assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


def test_kquant_avx2_path_is_vpmaddubsw():
    """On an AVX2 CPU, simd=2 builds each sub-block from vpmaddubsw and vpmaddwd by the scales (as llama.cpp
    does), the file's bits unpacked by shifts, ands and ors (in the tiles; for the grouped tiles, once per work
    item: unpack_q5_k, unpack_q6_k), with no byte widening (vpmovsxbd) left. (On an
    AVX-512 VNNI host LLVM fuses vpmaddwd and the add after it into vpdpwssd; it never makes vpdpbusd of
    vpmaddubsw, whose int16 sums saturate.)"""
    from numba import njit, types

    from llama_ref.kernels import ggml_simd

    if not ggml_simd.HAS_AVX2:
        pytest.skip("the CPU has no AVX2")
    k = compiled()
    for tile, nargs in ((k._q4_1A, 12), (k._q4r_11, 12), (k._q5_1A, 11), (k._q5_11, 11), (k._q6_1A, 11),
                        (k._q6_11, 11), (k._q5_G, 7), (k._q6_G, 7)):
        if nargs == 7:
            @njit
            def run(w, x, nb, out, ost, acc, part):
                tile(w, x, nb, out, ost, acc, part, 2)
        elif nargs == 12:
            @njit
            def run(w, ws, h, x, xst, xd, bs, xds, bss, nb, out, ost):
                tile(w, ws, h, x, xst, xd, bs, xds, bss, nb, out, ost, 2)
        else:
            @njit
            def run(w, ws, x, xst, xd, bs, xds, bss, nb, out, ost):
                tile(w, ws, x, xst, xd, bs, xds, bss, nb, out, ost, 2)
        run.compile((types.int64,) * nargs)
        asm = run.inspect_asm(run.signatures[0])
        found = {line.split()[0] for line in asm.splitlines() if line.startswith("\t") and not line.startswith("\t.")}
        assert "vpmaddubsw" in found and found & {"vpmaddwd", "vpdpwssd"}, found
        # the bits unpacked by shifts (the grouped tiles' rows come unpacked: below); with GFNI (AVX-512 hosts)
        # LLVM shifts and masks bytes in one vgf2p8affineqb
        assert nargs == 7 or found & {"vpsrlw", "vpsrld", "vpsrlq", "vgf2p8affineqb"}, found
        assert not found & {"vpmovsxbd", "vpdpbusd"}, found  # (the 8 mins of Q4_K / Q5_K by vpmulld, once a block)
    for unpack in (k.unpack_q5_k, k.unpack_q6_k):  # the grouped tiles' rows, unpacked once per work item
        @njit
        def run(w, nb, out):
            unpack(w, nb, out)
        run.compile((types.int64,) * 3)
        asm = run.inspect_asm(run.signatures[0])
        found = {line.split()[0] for line in asm.splitlines() if line.startswith("\t") and not line.startswith("\t.")}
        assert found & {"vpsrlw", "vpsrld", "vpsrlq", "vgf2p8affineqb"}, found


@pytest.mark.slow
@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(sorted(TYPES)), n=st.integers(1, 9), rows=st.integers(1, 40), nb=st.integers(1, 3),
       wseed=st.integers(0, 2**32 - 1), xseed=st.integers(0, 2**32 - 1),
       scale=st.sampled_from([1e-3, 1.0, 50.0]), simd=st.sampled_from([0, 1, 2]))
def test_numba_equals_numpy_bit_for_bit(kind, n, rows, nb, wseed, xseed, scale, simd):
    w = random_kquant(TYPES[kind], rows, 256 * nb, wseed)
    x = activations(n, 256 * nb, xseed) * np.float32(scale)
    got, expected = compiled().quantized_linear(x, w, simd=simd), ggml.linear(x, w)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32), expected.view(np.uint32))


# ---- against llama.cpp ----------------------------------------------------------------------------------------

def _fixture_script():
    spec = importlib.util.spec_from_file_location(
        "make_llamacpp_kquant_logits", Path(__file__).parent / "fixtures" / "make_llamacpp_kquant_logits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=ggml.ISAS)
def llamacpp(request):
    """(isa, fixture): llama.cpp's logits from its AVX-512 and its AVX2 build, on the same GGUFs (llama.cpp's
    quantizer wrote the same bytes on both machines), each to be met by the specification in its order."""
    return request.param, np.load(FIXTURES[request.param])


def _decode(model, ids):
    """Logits of every position, one token per forward call (the path ggml mode mirrors)."""
    return np.concatenate([model.forward(ids[t:t + 1], start_pos=t) for t in range(len(ids))])


def test_fixture_files(llamacpp):
    isa, llamacpp = llamacpp
    script = _fixture_script()
    meta = json.loads(str(llamacpp["meta"]))
    assert meta["type_k"] == "f16" and meta["one_token_per_call"] and meta["n_threads"] == 2
    assert ("AVX512 = 1" in meta["system_info"]) == (isa == "avx512")
    for kind in script.TYPES:
        path = script.gguf_path(kind)
        assert script.sha256(path) == str(llamacpp[f"{kind}_sha256"])
        weights = llama_ref.load(path, arithmetic="ggml").weights
        assert {w.format for w in weights.values() if getattr(w, "ndim", 0) == 2} == {kind}  # "pure"


@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_logits_equal_llamacpp_first_prompt(kind, llamacpp, monkeypatch):
    """Fast tier: the 7-token prompt, every logit bit for bit (Numba backend), in the fixture's build's order;
    the other build's order does not give them."""
    isa, llamacpp = llamacpp
    script = _fixture_script()
    for order in ggml.ISAS:
        monkeypatch.setattr(ggml, "ISA", order)
        model = llama_ref.load(script.gguf_path(kind), arithmetic="ggml", backend="numba")
        logits = _decode(model, llamacpp["prompt_ids_0"])
        assert np.array_equal(logits, llamacpp[f"{kind}_p0_logits"]) == (order == isa)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("kind", ["q4_k", "q5_k", "q6_k"])
def test_logits_and_greedy_chains_equal_llamacpp(kind, backend, llamacpp, monkeypatch):
    """Bit for bit: every logit at every position of both prompts, and the 32-token greedy chains."""
    isa, llamacpp = llamacpp
    monkeypatch.setattr(ggml, "ISA", isa)
    script = _fixture_script()
    model = llama_ref.load(script.gguf_path(kind), arithmetic="ggml", backend=backend)
    for i in range(len(script.PROMPT_LENGTHS)):
        ids = llamacpp[f"prompt_ids_{i}"]
        logits = _decode(model, ids)
        assert np.array_equal(logits, llamacpp[f"{kind}_p{i}_logits"])
        chain, pos, nxt = [], len(ids), int(logits[-1].argmax())
        for _ in range(script.GREEDY):
            chain.append(nxt)
            nxt = int(model.forward(np.array([nxt]), start_pos=pos)[-1].argmax())
            pos += 1
        assert chain == llamacpp[f"{kind}_p{i}_greedy"].tolist()
