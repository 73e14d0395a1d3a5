"""The Q5_K and Q6_K prefills on 16-bit integers (kernels/ggml_kquants16.py): the same bits as the NumPy
specification (llama_ref/model/ggml_kquants.py), their layouts by hand, and the dispatch that sends a prefill there."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llama_ref.model import ggml_kquants as gk
from llama_ref.weights.packed import Q5_KWeight, Q6_KWeight
from test_ggml_kquants import activations, extreme_kquant, random_kquant

k16 = pytest.importorskip("llama_ref.kernels.ggml_kquants16")
from llama_ref.kernels import ggml_kquants as kk  # noqa: E402

needs_vnni512 = pytest.mark.skipif(not k16.HAS_VNNI512, reason="no 512-bit VNNI (vpdpwssd) on this CPU")


KINDS = [Q5_KWeight, Q6_KWeight]


def product(w, x):
    """The path's product of x (N, K) float32 by the Q5_K or Q6_K weight w, through its own entry point."""
    xd, xq, xbs = kk.quantize_q8_K(x)
    return k16.quantized_linear(w.format == "q5_k", np.asarray(w.blocks), xq, xd, xbs)


def same_bits(got, expected) -> bool:
    return got.shape == expected.shape and np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.format)
def test_weight_layout_by_hand(cls):
    """A row pair's super-block: piece 2c + t2 holds the scaled value 32c + 4u + 2 t2 + s of row h at int16 16 h +
    2u + s (Q6_K: sc[2c + u // 4] q, Q5_K: sc[c] q); then Q6_K's -32 sc[j] of row h at int16 512 + 16 h + j, or
    Q5_K's mn[j] of row h at int16 512 + 8 h + j and its dmin_w at float32 264 + h (and both in lane h of the
    MINS records); then d_w of row h in float32 lanes 272 + 8 h .. 272 + 8 h + 7; a lone last row is paired with
    itself."""
    five = cls is Q5_KWeight
    w = random_kquant(cls, 3, 512, 11)
    wb = gk.weight_superblocks(w, slice(0, 3))  # q, sc (Q5_K: per 32 values; Q6_K: per 16), d (, mn, dmin)
    nb = 2
    blocks = np.ascontiguousarray(w.blocks)
    for a, b in ((0, 1), (2, 2)):
        buf, mins = np.zeros(nb * k16.W16_BYTES, np.uint8), np.zeros(nb * k16.MINS_BYTES, np.uint8)
        k16._w16_rows_py(five, blocks[a], blocks[b], buf, nb, mins)
        for i in range(nb):
            rec = buf[i * k16.W16_BYTES:(i + 1) * k16.W16_BYTES]
            i16, f32 = rec.view(np.int16), rec.view(np.float32)
            for h, row in enumerate((a, b)):
                q, sc = wb["q"][row, i].reshape(256).astype(np.int32), wb["sc"][row, i]
                for c in range(8):
                    for t2 in range(2):
                        for u in range(8):
                            for s in range(2):
                                v = 32 * c + 4 * u + 2 * t2 + s
                                scale = sc[c] if five else sc[2 * c + u // 4]
                                assert i16[32 * (2 * c + t2) + 16 * h + 2 * u + s] == scale * q[v]
                if five:  # and in lane h of the MINS record: (mn[2m], mn[2m + 1]) at int32 16 m + h, dmin_w at 64 + h
                    assert i16[512 + 8 * h:520 + 8 * h].tolist() == wb["mn"][row, i].tolist()
                    assert f32[264 + h] == wb["dmin"][row, i]
                    lanes = mins[i * k16.MINS_BYTES:(i + 1) * k16.MINS_BYTES]
                    for m in range(4):
                        assert lanes.view(np.int16)[2 * (16 * m + h):2 * (16 * m + h) + 2].tolist() == \
                            wb["mn"][row, i, 2 * m:2 * m + 2].tolist()
                    assert lanes.view(np.float32)[64 + h] == wb["dmin"][row, i]
                else:
                    assert i16[512 + 16 * h:528 + 16 * h].tolist() == (-32 * sc).tolist()
                assert f32[272 + 8 * h:280 + 8 * h].tolist() == [wb["d"][row, i]] * 8


def test_activation_sub_block_sums_by_hand():
    """Q5_K's mins read S[j] = bsum[2j] + bsum[2j + 1] from each activation row's record: int16 274 + j."""
    x = activations(3, 512, 4)
    xd, xq, xbs = kk.quantize_q8_K(x)
    out = np.zeros((3, 2 * k16.A16_BYTES // 2), np.int16)
    k16._acts16(xq, xd.view(np.uint32), xbs, out)
    for n in range(3):
        for i in range(2):
            assert out[n, 288 * i + 274:288 * i + 282].tolist() == (xbs[n, i, 0::2] + xbs[n, i, 1::2]).tolist()


@needs_vnni512
@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.format)
def test_equals_numpy_fixed_shapes(cls):
    """The fast tier's shapes: activation rows at, past and between multiples of the tile's ACTS16 (padded with zero
    rows), row pairs past the tile's PAIRS and a lone last row, rows over several work items of ROWS16,
    super-blocks in one segment of SEG16, several and a part one; random blocks and the extremes (the largest q
    by the largest scales and mins; Q6_K's by scales -128 and 127, and by -1)."""
    seg = 256 * k16.SEG16
    for n, rows, cols in ((16, 13, 256), (17, 32, seg), (23, 70, 2 * seg + 512), (20, 3, 256), (18, 1, seg + 256),
                             (19, 8, seg + 256)):
        for w in (random_kquant(cls, rows, cols, n), extreme_kquant(cls, rows, cols, 0x80, 0.01),
                  extreme_kquant(cls, rows, cols, 0xFF, 0.01)):
            signs = np.random.default_rng(n).choice([-1, 1], (n, cols)).astype(np.float32)
            for x in (activations(n, cols, rows + n), signs):
                assert same_bits(product(w, x), gk.quantized_linear(x, w)), (n, rows, cols)


@needs_vnni512
@pytest.mark.slow
@settings(max_examples=25, deadline=None)
@given(five=st.booleans(), n=st.integers(16, 41), rows=st.integers(1, 75), nb=st.integers(1, 11),
       wseed=st.integers(0, 2**16), xseed=st.integers(0, 2**16))
def test_equals_numpy_bit_for_bit(five, n, rows, nb, wseed, xseed):
    w = random_kquant(Q5_KWeight if five else Q6_KWeight, rows, 256 * nb, wseed)
    x = activations(n, 256 * nb, xseed)
    assert same_bits(product(w, x), gk.quantized_linear(x, w))


@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.format)
def test_dispatch(cls, monkeypatch):
    """quantized_linear sends a Q5_K or Q6_K prefill of at least MIN_ROWS rows here with simd 3 on a CPU with
    512-bit VNNI, and nothing else: fewer rows, another simd."""
    calls = []
    real = k16.quantized_linear
    monkeypatch.setattr(k16, "quantized_linear", lambda *a: calls.append(1) or real(*a))
    w = random_kquant(cls, 16, 512, 1)
    for n, simd, taken in ((k16.MIN_ROWS, 3, k16.HAS_VNNI512), (k16.MIN_ROWS - 1, 3, False), (k16.MIN_ROWS, 1, False),
                           (k16.MIN_ROWS, 0, False)):
        calls.clear()
        x = activations(n, 512, n)
        assert same_bits(kk.quantized_linear(x, w, simd=simd), gk.quantized_linear(x, w))
        assert bool(calls) == taken, (n, simd)
    assert not k16.usable(64, 2) and not k16.usable(1, 3)


@needs_vnni512
@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.format)
def test_whole_prompt_equals_llamacpp(cls, monkeypatch):
    """A prompt of 20 tokens in one forward call, whose Q5_K / Q6_K products take this path (simd 3, 20 >= MIN_ROWS),
    gives llama.cpp's logits bit for bit at every position: its token-at-a-time logits on the pure K-quant GGUFs
    (tests/data/llamacpp_kquant_logits.npz, llama.cpp's AVX-512 build), which ggml mode gives for a prompt in one
    call as well."""
    import llama_ref
    from llama_ref.kernels import ggml_simd
    from llama_ref.model import ggml
    import test_ggml_kquants as kq_tests

    if ggml_simd.simd_default() != 3:
        pytest.skip("this CPU's default integer code is not simd 3 (host_prefers_512)")
    calls = []
    real = k16.quantized_linear
    monkeypatch.setattr(k16, "quantized_linear", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(ggml, "ISA", "avx512")
    script = kq_tests._fixture_script()
    fixture = np.load(kq_tests.FIXTURES["avx512"])
    model = llama_ref.load(script.gguf_path(cls.format), arithmetic="ggml", backend="numba")
    ids = fixture["prompt_ids_1"]
    assert len(ids) >= k16.MIN_ROWS
    logits = model.forward(ids, start_pos=0)
    assert calls, "no product took the 16-bit path"
    assert np.array_equal(logits, fixture[f"{cls.format}_p1_logits"])


def _tile_loops(five: bool) -> list:
    """The loop bodies of the compiled 2 x 6 tile (PAIRS x ACTS16), from a function that calls only it."""
    from numba import njit, types
    from test_ggml_asm import block_loops

    tile = k16._tile5 if five else k16._tile6

    @njit
    def run(w, ws, x, xs, nb, acc, part, out, ost):
        tile(w, ws, x, xs, nb, acc, part, out, ost)
    run.compile((types.int64,) * 9)
    return block_loops(run.inspect_asm(run.signatures[0]))


@needs_vnni512
@pytest.mark.parametrize("five", [True, False], ids=["q5_k", "q6_k"])
def test_tile_machine_code(five):
    """The super-block loop of the 2 x 6 tile: one vpdpwssd per piece, pair and activation row (16 x 2 x 6 = 192;
    Q6_K's -32 one more each, 204), none split into vpmaddwd and vpaddd (LLVM's machine combiner did that to the
    Q5_K tile's chains of the intrinsic: 0.75x the speed; _dpwssd), and its 24 accumulators in registers: at most
    one vector stored and reloaded a super-block (the Q5_K tile spills one now; 2 x 8 tiles spilled dozens)."""
    from test_ggml_asm import stack_traffic

    loops = [body for body in _tile_loops(five) if any(ins.startswith("vpdpwssd") for ins in body)]
    assert len(loops) == 1, len(loops)
    names = [ins.split()[0] for ins in loops[0]]
    assert names.count("vpdpwssd") == (192 if five else 204), names.count("vpdpwssd")
    assert "vpmaddwd" not in names
    spills, _ = stack_traffic(loops[0])
    assert len(spills) <= 2, spills


def test_scratch_kept_up_to_its_limit(monkeypatch):
    """The activation records' buffer is kept between calls (64-byte aligned, grown when a call needs more), but
    not one larger than KEEP_BYTES: a long prompt's does not stay behind."""
    monkeypatch.setattr(k16, "_SCRATCH", __import__("threading").local())
    monkeypatch.setattr(k16, "KEEP_BYTES", 4096)
    a = k16._scratch("t", 1000)
    b = k16._scratch("t", 2000)  # grown
    c = k16._scratch("t", 1500)  # kept
    assert a.ctypes.data % 64 == 0 and b.ctypes.data % 64 == 0 and c.ctypes.data == b.ctypes.data
    big = k16._scratch("t", 8192)
    assert big.size == 8192 and k16._scratch("t", 100).ctypes.data == b.ctypes.data
