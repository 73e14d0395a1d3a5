"""arithmetic="bf16" (llama_ref/model/bf16.py): the activations of every matrix product rounded to bfloat16 as
gguf's BF16 quantizer rounds them, then exact mode's product; the Numba twin (kernels/linear.linear_bf16, one
AMX pass where the CPU has the tiles) within float32 rounding of the NumPy specification; load refuses what the
mode cannot compute."""

from __future__ import annotations

import importlib
import importlib.util
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import llama_ref
from llama_ref.errors import InputError
from llama_ref.model import bf16, ops
from llama_ref.model.transformer import Transformer
from llama_ref.weights import packed
from llama_ref.weights.gguf import load_gguf

amx = importlib.import_module("llama_ref.kernels.amx")
LINEAR = importlib.import_module("llama_ref.kernels.linear")
needs_amx = pytest.mark.skipif(not amx.available(), reason="this CPU (or OS, or LLAMA_REF_AMX=0) has no AMX-BF16")
DATA = Path(__file__).parent / "data" / "tiny_ckpt"
REF = np.load(DATA / "reference.npz")

ANY_FLOAT32 = hnp.arrays(np.float32, st.integers(1, 300),
                         elements=st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True))


def gguf_bf16(x: np.ndarray) -> np.ndarray:
    """x rounded by gguf's BF16 quantizer (a reference we did not write), as float32 bits."""
    half = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view(np.uint16)
    return half.astype(np.uint32) << 16


@given(x=ANY_FLOAT32)
@settings(max_examples=60, deadline=None)
def test_rounding_is_gguf_bf16(x):
    # Nearest, ties to even, overflow to inf, subnormals: bit for bit gguf's; a NaN the quiet NaN torch gives
    # (gguf keeps a NaN's sign); and the Numba twin's bits are the specification's.
    got = bf16.round_bf16(x).view(np.uint32)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], gguf_bf16(x)[~nan])
    assert np.all(got[nan] == 0x7FC00000)
    np.testing.assert_array_equal(LINEAR.round_bf16(x[None]).view(np.uint32)[0], got)


def test_rounding_by_hand():
    # 1 + 2**-8 is halfway between 1 and 1 + 2**-7: to even (1); 1 + 3 * 2**-8 halfway between 1 + 2**-7 and
    # 1 + 2**-6: to even (1 + 2**-6); just above halfway rounds up; bf16's largest finite value stays, above
    # its halfway to 2**128 it becomes inf; a NaN whose payload lies in the low half stays a NaN.
    x = np.array([1 + 2.0**-8, 1 + 3 * 2.0**-8, 1 + 2.0**-8 + 2.0**-20, -(1 + 2.0**-8 + 2.0**-20),
                  3.3895314e38, 3.4e38], np.float32)
    want = np.array([1, 1 + 2.0**-6, 1 + 2.0**-7, -(1 + 2.0**-7), 3.3895314e38, np.inf], np.float32)
    np.testing.assert_array_equal(bf16.round_bf16(x), want)
    nan = np.array([0x7F800001], np.uint32).view(np.float32)
    assert np.isnan(bf16.round_bf16(nan)).all() and np.isnan(LINEAR.round_bf16(nan[None])).all()


def bf16_weight(rows: int, cols: int, rng) -> packed.BF16Weight:
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return packed.BF16Weight((w.view(np.uint32) >> 16).astype(np.uint16), w.shape)


def bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """A few float32 ulps of sum_k |x_k w_k|: two float32 sums of the same exact products, in any order."""
    return 4 * x.shape[-1] * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T)


@pytest.mark.parametrize("n, k, rows", [(1, 64, 40), (3, 100, 33), (8, 32, 32), (9, 64, 33), (37, 224, 70),
                                        (100, 416, 300), (20, 2112, 64)])
def test_linear_twin(n, k, rows):
    # Decode rows (matrix-vector kernels), prefill rows on the tiles or through BLAS (K not a multiple of 32),
    # a remainder of weight rows, more than one panel of k's: within float32 rounding of the specification.
    rng = np.random.default_rng(n * 1000 + rows + k)
    w = bf16_weight(rows, k, rng)
    x = rng.standard_normal((1, n, k)).astype(np.float32)
    got, want = LINEAR.linear_bf16(x, w), bf16.linear(x, w)
    assert got.shape == want.shape == (1, n, rows)
    xr = bf16.round_bf16(x[0])
    assert np.all(np.abs(got - want)[0] <= bound(xr, w.to_float(np.float32)) + 1e-30)
    # ... and it is a product of the rounded rows, not of x: exact mode on x differs.
    assert not np.array_equal(want, ops.linear(x, w))


def test_linears_round_once_and_equal_linear():
    rng = np.random.default_rng(3)
    ws = [bf16_weight(r, 256, rng) for r in (64, 32, 96)]
    for n in (1, 20):  # a decode row (one parallel region) and a prefill
        x = rng.standard_normal((2, n, 256)).astype(np.float32)
        got = LINEAR.linears_bf16(x, *ws)
        for g, w, want in zip(got, ws, bf16.linears(x, *ws)):
            np.testing.assert_array_equal(g, LINEAR.linear_bf16(x, w))
            assert np.all(np.abs(g - want) <= bound(bf16.round_bf16(x), w.to_float(np.float32)) + 1e-30)


@needs_amx
@pytest.mark.parametrize("n, k, rows", [(8, 32, 32), (50, 448, 3 * 256 + 32), (33, 4160, 64)])
def test_one_pass_is_three_passes_of_rounded_rows(n, k, rows):
    # A bf16 value's mid and lo parts are zero, so the tiles' one pass gives the bits of exact mode's three on the
    # same rounded rows (K of 4160: panels of KC k's and a short last one).
    rng = np.random.default_rng(n + k)
    w = bf16_weight(rows, k, rng).data
    xr = bf16.round_bf16(rng.standard_normal((n, k)).astype(np.float32))
    one, d1 = amx.product(xr, amx.split_bf16x3(xr, 1), w)
    three, d3 = amx.product(xr, amx.split_bf16x3(xr, 3), w)
    assert d1 == d3 == rows - rows % 32
    np.testing.assert_array_equal(one[:, :d1], three[:, :d3])


def test_split_of_one_part_is_the_first_of_three():
    x = bf16.round_bf16(np.random.default_rng(4).standard_normal((40, 96)).astype(np.float32))
    one, three = amx.split_bf16x3(x, parts=1), amx.split_bf16x3(x, parts=3)
    assert one.shape == (1, *three.shape[1:])
    np.testing.assert_array_equal(one[0], three[0])
    assert not three[1:].any()  # a rounded row's mid and lo parts are zero
    with pytest.raises(ValueError, match="parts"):
        amx.split_bf16x3(x, parts=2)


# ---- the mode, loaded ----------------------------------------------------------------------------------------

def test_model_numba_near_numpy_and_gguf_equals_hf():
    # The fixture's bf16 model (Meta's tiny Llama 3.1) over a prompt (9 tokens: the tiles take wq, w1, w3 and the
    # output head) and decode steps. The backends sum in different float32 orders, and a sum that lands on the
    # other side of a bf16 rounding boundary moves the next product's input by a bf16 step (2**-8 of it): so
    # numba is held to 2e-3 of numpy here (on this CPU they agree to 1e-6), where a numba path that skipped the
    # rounding would be exact mode, 6e-3 away. The same weights from the GGUF BF16 file give the same logits on
    # each backend; and the mode really rounds (exact mode's logits differ, a little).
    tokens, decode = REF["tokens"], REF["decode_tokens"]
    models = {}
    for b in ("numpy", "numba"):
        models[b, "_hf"] = llama_ref.load(DATA / "llama31_bf16_hf", backend=b, arithmetic="bf16")
        assert models[b, "_hf"].arithmetic == "bf16"
        # The GGUF file carries no tokenizer, which load() wants: its tensors, kept packed, into the same backend.
        args, tensors, extras = load_gguf(DATA / "llama31_bf16.gguf", packed=True)
        models[b, ".gguf"] = Transformer(args, tensors, backend=bf16.backend_for(b, tensors, "gguf", args.n_layers),
                                         freq_divisors=extras["freq_divisors"])
    outs = {}
    for key, m in models.items():
        logits = [m.forward(tokens, 0)]
        for i, t in enumerate(decode):
            logits.append(m.forward([int(t)], len(tokens) + i))
        outs[key] = np.concatenate(logits)
    np.testing.assert_allclose(outs["numba", "_hf"], outs["numpy", "_hf"], atol=2e-3, rtol=0)
    np.testing.assert_array_equal(outs["numpy", ".gguf"], outs["numpy", "_hf"])
    np.testing.assert_array_equal(outs["numba", ".gguf"], outs["numba", "_hf"])
    exact = llama_ref.load(DATA / "llama31_bf16_hf").forward(tokens, 0)
    d = np.abs(exact - outs["numpy", "_hf"][: len(tokens)]).max()
    assert 4e-3 < d < 0.02 * np.abs(exact).max()


def test_refusals(tmp_path):
    with pytest.raises(InputError, match=r"feed_forward|attention|output.*f16"):
        llama_ref.load(DATA / "llama2_fp16_hf", arithmetic="bf16")  # fp16 weights
    with pytest.raises(InputError, match="q8_0"):
        llama_ref.load(DATA / "llama31_bf16_hf", arithmetic="bf16", quantize="q8_0")
    with pytest.raises(InputError, match="float32"):
        llama_ref.load(DATA / "llama31_bf16_hf", arithmetic="bf16", dtype=np.float64)
    with pytest.raises(InputError, match="packed"):
        llama_ref.load(DATA / "llama31_bf16_hf", arithmetic="bf16", weights="float32")
    args, tensors, _ = load_gguf(DATA / "llama31_bf16.gguf")  # dequantized to float32
    with pytest.raises(InputError, match=r"gguf: tensor layers\.0\.attention\.wq\.weight is float32"):
        bf16.backend_for("numba", tensors, "gguf", args.n_layers)
    with pytest.raises(InputError, match="sums"):
        llama_ref.load(DATA / "llama31_bf16_hf", arithmetic="bf16", sums="apart")
    with pytest.raises(InputError, match="one process"):
        llama_ref.load(DATA / "llama31_bf16_hf", arithmetic="bf16", parallel="mpi")
    with pytest.raises(ValueError, match="vision"):  # also arithmetic='ggml': vision loads only exact mode
        llama_ref.load(DATA / "vision_hf", arithmetic="bf16")
    with pytest.raises(InputError, match="not Llama 4"):
        llama_ref.load(DATA / "llama4_hf", arithmetic="bf16")
    with pytest.raises(ValueError, match="'exact', 'ggml' or 'bf16'"):
        llama_ref.load(DATA / "llama31_bf16_hf", arithmetic="fp8")


# ---- what the mode costs, on real weights (tests/fixtures/make_bf16_distance.py) -----------------------------

def _fixture_module(name: str):
    """A script of tests/fixtures as a module (its helpers are the ones that made the recorded numbers)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parent / "fixtures" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_closer_to_float64_than_transformers_bf16():
    # The default model's weights rounded to bf16, the six prompts of tests/data/float64_distance.json: bf16
    # mode (both backends) is nearer llama_ref's float64 logits of the same weights than transformers' bfloat16
    # model was (recorded), on every prompt, in max and in mean |dlogit|; exact mode is nearer still, by far.
    maker = _fixture_module("make_bf16_distance")
    bf16_weights, distance = maker.bf16_weights, maker.distance
    recorded = json.loads((Path(__file__).parent / "data" / "bf16_distance.json").read_text())["engines"]
    prompts = json.loads((Path(__file__).parent / "data" / "float64_distance.json").read_text())["prompts"]
    model = llama_ref.load(llama_ref.DEFAULT_MODEL)
    args, weights = model.args, bf16_weights(model)
    truth = Transformer(args, weights, dtype=np.float64)
    runs = {b: Transformer(args, weights, backend=bf16.backend_for(b, weights, "bf16 weights", args.n_layers))
            for b in ("numpy", "numba")}
    exact = Transformer(args, weights)
    for name, ids in prompts.items():
        want = truth.forward(ids)
        hf = recorded["hf_bf16"]["distance"][name]
        for backend, m in runs.items():
            got = distance(m.forward(ids), want)
            assert got["max_abs"] < hf["max_abs"] and got["mean_abs"] < hf["mean_abs"], (name, backend, got, hf)
        assert distance(exact.forward(ids), want)["max_abs"] < 1e-3
