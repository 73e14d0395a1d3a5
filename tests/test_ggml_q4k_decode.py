"""Repacked Q4_K (rows % 8 == 0) in arithmetic="ggml": every product, decode included, reads the 8-row copy
(kernels/ggml_kquants.q4_kx8, llama.cpp's block_q4_Kx8 order) through the 8 x 1 tile (_q4x8_1), and the weight
keeps only that copy (weights.packed.Q4_KWeight.hold_x8).

Checked against the NumPy specification (llama_ref/model/ggml_kquants.py, on a separate weight object that still
holds the file's layout) bit for bit: single products on the calling thread and in parallel regions,
kernels/ggml_linears.py's work lists mixing repacked Q4_K with other formats, and a tiny model's logits through
the per-op lines and through decode_layers (kernels/ggml_step.py), portable integer code forced too. The copy
unpacks back to the file's bytes exactly, so everything else that reads the weight (embedding lookups,
to_float, exact mode's kernels) still gets the file's values.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

from llama_ref.model import ggml, ggml_kquants as gk
from llama_ref.model.transformer import Transformer
from llama_ref.weights.packed import Q4_KWeight, Q6_KWeight
from test_ggml_kernels import TYPES as LEGACY
from test_ggml_kquants import activations, extreme_kquant, random_kquant
from tiny import random_weights, tiny_args


def kernels():
    from llama_ref.kernels import ggml_kquants
    return ggml_kquants


def twin(w):
    """A second weight object from w's bytes: the specification's, which keeps the file's layout."""
    return type(w)(w.raw_blocks(), w.shape)


def weights_under_test(rows: int, cols: int, seed: int) -> list:
    return [random_kquant(Q4_KWeight, rows, cols, seed)] + [
        extreme_kquant(Q4_KWeight, rows, cols, fill, 0.01) for fill in (0xFF, 0x80, 0x00)]


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


# ---- the copy: made once, the only one kept, unpacked exactly ----------------------------------------------------

@pytest.mark.parametrize("rows, cols", [(8, 256), (16, 512), (40, 768)])
def test_unpack_q4_kx8_gives_back_qs_and_head(rows, cols):
    """unpack_q4_kx8 undoes repack_q4_k bit for bit, every row and any rows in any order (repeats too): random
    blocks, every byte 0xff, 0x00, and the 6-bit scales' top bits set alone (0xc0 in bytes 0..7)."""
    k = kernels()
    ws = weights_under_test(rows, cols, rows)
    raw = ws[0].raw_blocks().reshape(rows, cols // 256, 144)
    raw[:, :, 4:12] = 0xC0  # scales and mins 0..3 zero, 4..7 only their top bits
    ws.append(Q4_KWeight(raw.reshape(rows, -1), (rows, cols)))
    for w in ws:
        packed = k.repack_q4_k(w.qs, w.head)
        qs, head = k.unpack_q4_kx8(packed, np.arange(rows))
        assert np.array_equal(qs, w.qs) and np.array_equal(head, w.head)
        ids = np.array([rows - 1, 3, 3, 0, rows // 2])
        qs, head = k.unpack_q4_kx8(packed, ids)
        assert np.array_equal(qs, w.qs[ids]) and np.array_equal(head, w.head[ids])
        assert k.unpack_q4_kx8(packed, np.arange(0))[0].shape == (0, cols // 2)


def test_the_weight_keeps_only_the_copy():
    """After the ggml kernels' first product a Q4_K weight with rows % 8 == 0 holds only the repacked copy (its
    nbytes are the copy's); its file bytes, rows (an embedding's lookups), floats and exact mode's arrays are
    unchanged; reading qs / head brings the original layout back. Rows not in 8s keep their qs and head, and
    exact mode's float32 scales are made only when asked for."""
    k = kernels()
    w = random_kquant(Q4_KWeight, 24, 512, 1)
    spec = twin(w)
    assert w.nbytes == w.qs.nbytes + w.head.nbytes == 24 * 2 * 144  # no float32 scales until exact mode asks
    x = activations(1, 512, 3)
    assert same_bits(k.quantized_linear(x, w), gk.quantized_linear(x, spec))
    assert w._qs is None and w._head is None and w.x8 is k.q4_kx8(w)
    assert w.nbytes == w.x8.nbytes == 24 // 8 * 2 * k.Q4X8_BYTES
    ids = np.array([[5, 23], [0, 5]])
    assert np.array_equal(w.raw_blocks(ids.reshape(-1)), spec.raw_blocks(ids.reshape(-1)))
    assert same_bits(w.rows(ids), spec.rows(ids)) and same_bits(w.to_float(), spec.to_float())
    assert w._qs is None  # none of these kept the originals
    assert all(np.array_equal(a, b) for a, b in zip(w.kernel_args(), spec.kernel_args()))
    assert np.array_equal(w.qs, spec.qs) and np.array_equal(w.head, spec.head) and w._qs is not None

    odd = random_kquant(Q4_KWeight, 13, 256, 2)
    assert same_bits(k.quantized_linear(activations(1, 256, 4), odd), gk.quantized_linear(activations(1, 256, 4),
                                                                                           twin(odd)))
    assert odd.x8 is None and odd._qs is not None


# ---- products: one row (a decode), several, and ggml_linears' work lists -----------------------------------------

@pytest.mark.parametrize("simd", [0, 1, 2, 3])
def test_repacked_decode_equals_numpy(simd, monkeypatch):
    """One activation row by repacked Q4_K on the calling thread (_decode_q4_kx8) and in a parallel region
    (_dot_q4_kx8), on 1 thread and more: bit for bit the specification (the gemv's order), random blocks and the
    extremes (the largest int16 sums), weights of one group, of groups splitting unevenly over work items (simd 3
    on an AVX-512 VNNI CPU: two groups at a time, a last odd group alone)."""
    k = kernels()
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            for serial in (True, False):
                monkeypatch.setattr(k, "serial_product", lambda n, size, serial=serial: serial and n == 1)
                for rows, cols in ((8, 256), (24, 512), (40, 1536)):
                    for w in weights_under_test(rows, cols, rows + cols):
                        spec = twin(w)
                        for x in (activations(1, cols, rows), np.full((1, cols), -1.0, np.float32)):
                            assert same_bits(k.quantized_linear(x, w, simd=simd), gk.quantized_linear(x, spec)), \
                                (threads, serial, rows, cols)
    finally:
        numba.set_num_threads(before)


_ROWS_ONE_BY_ONE = []


def rows_one_by_one():
    """A compiled walk of kernels/ggml_kquants._q4r_11 (the gemv's order on qs / head, one row at a time)."""
    if not _ROWS_ONE_BY_ONE:
        from numba import njit

        k = kernels()

        @njit
        def run(qs, head, xq, xd, xbs, simd, out):
            nb, xst, xds, bss, ost, x0, xd0, bs0, o0 = k._act_addresses(xq, xd, xbs, out)
            ws, hs = np.int64(qs.shape[1]), np.int64(16 * nb)
            w0, h0 = np.int64(qs.ctypes.data), np.int64(head.ctypes.data)
            for r in range(qs.shape[0]):
                k._q4r_11(w0 + r * ws, ws, h0 + r * hs, x0, xst, xd0, bs0, xds, bss, nb, o0 + 4 * r, ost, simd)
        _ROWS_ONE_BY_ONE.append(run)
    return _ROWS_ONE_BY_ONE[0]


@pytest.mark.parametrize("simd", [0, 1, 2])
def test_8row_decode_tile_equals_the_one_row_tile(simd):
    """The 8 x 1 tile on the repacked copy (_q4x8_1, what decode runs) and the one-row tile on qs / head
    (_q4r_11, what it ran before) give the same bits, row for row."""
    k = kernels()
    for rows, cols in ((8, 256), (32, 1024)):
        for w in weights_under_test(rows, cols, 9):
            x = activations(1, cols, rows)
            xd, xq, xbs = k.quantize_q8_K(x)
            before, after = np.empty((1, rows), np.float32), np.empty((1, rows), np.float32)
            rows_one_by_one()(w.qs, w.head, xq, xd, xbs, simd, before)
            k._decode_q4_kx8(xq, xd, xbs, k.readonly(k.repack_q4_k(w.qs, w.head)), simd, after)
            assert same_bits(after, before), (rows, cols)


@pytest.mark.parametrize("simd", [0, 1, 2])
def test_linears_work_list_with_repacked_q4_k_equals_numpy(simd, monkeypatch):
    """kernels/ggml_linears.py's one call over several weights (a Q4_K_M layer's mix: repacked Q4_K, Q4_K with
    rows not in 8s, Q6_K, and a legacy format whose activations are Q8_0) gives each weight's specification,
    serial and in one parallel region, 1 thread and more."""
    from llama_ref.kernels import ggml_linears as gl

    cols = 512
    ws = [random_kquant(Q4_KWeight, 40, cols, 1), random_kquant(Q4_KWeight, 13, cols, 2),
          extreme_kquant(Q4_KWeight, 16, cols, 0xFF, 0.01), random_kquant(Q6_KWeight, 24, cols, 3),
          LEGACY["q8_0"].quantize(np.random.default_rng(4).standard_normal((8, cols)).astype(np.float32))]
    specs = [twin(w) for w in ws]
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            for serial in (True, False):
                monkeypatch.setattr(gl, "serial_product", lambda n, size, serial=serial: serial)
                for x in (activations(1, cols, 5), activations(1, cols, 6).reshape(1, 1, cols)):
                    got = gl.linears(x, *ws, use_simd=simd)
                    for g, w in zip(got, specs):
                        assert same_bits(g, ggml.linear(x, w)), (threads, serial, w.format, w.shape)
    finally:
        numba.set_num_threads(before)
    assert ws[0].x8 is not None and ws[0]._qs is None and ws[1].x8 is None  # the work list holds the copy


# ---- a model: the lines and decode_layers against the NumPy backend ----------------------------------------------

def q4_k_model(backend: str) -> Transformer:
    """A 2-layer model of dim 256 (head size 64, 4 query and 2 KV heads, FFN 512) with every matrix in Q4_K, rows in
    groups of 8, the embedding tied to the output head (its lookups then read the repacked copy)."""
    args = tiny_args(dim=256, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=64)
    weights = random_weights(args, 0)
    for j, name in enumerate(sorted(weights)):
        if weights[name].ndim == 2 and name != "output.weight":
            weights[name] = random_kquant(Q4_KWeight, *weights[name].shape, j)
    weights["output.weight"] = weights["tok_embeddings.weight"]
    return Transformer(args, weights, backend=ggml.backend_for(backend, weights, "tiny"))


def run(model, steps=4) -> np.ndarray:
    out = [model.forward(np.array([3, 1, 4, 1, 5]))]
    for s in range(steps):
        out.append(model.forward(np.array([7 + 3 * s]), start_pos=5 + s))
    return np.concatenate(out, axis=0)


@pytest.mark.parametrize("portable", [False, True])
def test_q4_k_model_decode_equals_numpy_backend(portable, monkeypatch):
    """A Q4_K model's prefill and decode logits through the Numba backend equal the NumPy backend's bit for bit,
    with decode_layers (one compiled call a step) and with the per-op lines, on 1 and 2 threads, the integer code
    portable or this CPU's; afterwards every Q4_K matrix, the tied embedding too, holds only its repacked copy."""
    from llama_ref.kernels import ggml as kernels_ggml

    expected = run(q4_k_model("numpy"))
    if portable:
        monkeypatch.setattr(kernels_ggml, "SIMD", 0)
        monkeypatch.setattr(kernels(), "SIMD", 0)
    fused, fused_layers = kernels_ggml.decode_layers, []

    def counted(model, i, *a):
        out = fused(model, i, *a)
        fused_layers.append(0 if out is None else out[1] - i)  # the layers this call computed
        return out
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            for layer in (counted, lambda *a: None):
                monkeypatch.setattr(kernels_ggml, "decode_layers", layer)
                fused_layers.clear()
                model = q4_k_model("numba")
                assert same_bits(run(model), expected), (threads, layer is counted)
                assert fused_layers == ([2] * 4 if layer is counted else [])  # a step's 2 layers in one call
                held = {id(w): w for w in model.weights.values() if isinstance(w, Q4_KWeight)}.values()
                assert len(held) == 15 and all(w._qs is None and w.nbytes == w.x8.nbytes for w in held)
    finally:
        numba.set_num_threads(before)
