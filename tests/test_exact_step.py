"""kernels/exact_step.py: a dense layer of a one-token step in arithmetic="exact" in one compiled call (the Numba
backend's decode_layer) gives the forward pass's per-op lines' logits and cache, bit for bit, for every weight
format the decode kernels read (float32, F16, BF16, int8, the Q8 / Q4 families, Q6_K, and mixes), on one thread
and two, under the sums= copies of the backend; it declines (None) where it must, and the lines then give the
answer."""

from __future__ import annotations

import types

import numba
import numpy as np
import pytest

from llama_ref import kernels
from llama_ref.kernels import exact_step
from llama_ref.model import ops
from llama_ref.model.transformer import Transformer
from llama_ref.weights import packed
from test_ggml_kernels import TYPES as LEGACY
from test_ggml_kquants import TYPES as KQUANTS, random_kquant
from tiny import random_weights, tiny_args

MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w3",
            "feed_forward.w2")
# A Q4_K_M file's mix (wv and w2 in Q6_K); 16-bit formats that linears may not take together (wq F16, wk BF16;
# w1 BF16, w3 F16) beside float32 and int8; every block family in one layer.
Q4_K_M = ("q4_k", "q4_k", "q6_k", "q4_k", "q4_k", "q4_k", "q6_k")
FLOATS = ("f16", "bf16", "f16", "f32", "bf16", "f16", "int8")
BLOCKS = ("q4_k", "q8_0", "q5_1", "q4_0", "q5_k", "q4_1", "q6_k")
# Odd sizes for the formats without blocks: a row length no multiple of the SIMD width or of the 16-bit kernels'
# prefetch chunk, row counts no multiple of their 4-row passes or 16-row work items, 3 query heads to 1 KV head.
ODD = dict(dim=72, n_heads=3, n_kv_heads=1, hidden_dim=100, vocab_size=64)
SQUARE = dict(dim=256, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=64)  # K-quants: rows of 256 values


def convert(w: np.ndarray, fmt: str, seed: int):
    """A float32 matrix in format fmt (K-quants: random blocks, as the ggml tests make them)."""
    if fmt == "f32":
        return w
    if fmt == "f16":
        return packed.F16Weight(w.astype(np.float16).view(np.uint16), w.shape)
    if fmt == "bf16":
        return packed.BF16Weight((w.view(np.uint32) >> 16).astype(np.uint16), w.shape)
    if fmt == "int8":
        return packed.Int8Weight.quantize(w)
    if fmt in KQUANTS:
        return random_kquant(KQUANTS[fmt], *w.shape, seed)
    return LEGACY[fmt].quantize(w)


def model_in(formats, seed=0, shape=None, keep=(), dtype=np.float32):
    """A 2-layer model whose layers' 7 matrices are in formats (one for all, or one per matrix in MATRICES' order);
    layers in keep keep float32 ones. ODD shapes unless a format needs blocks of 32 or 256 values."""
    if isinstance(formats, str):
        formats = (formats,) * len(MATRICES)
    if shape is None:
        shape = ODD if set(formats) <= {"f32", "f16", "bf16", "int8"} else SQUARE
    args = tiny_args(**shape)
    weights = random_weights(args, seed)
    for i in range(args.n_layers):
        if i in keep:
            continue
        for j, (name, fmt) in enumerate(zip(MATRICES, formats)):
            key = f"layers.{i}.{name}.weight"
            weights[key] = convert(weights[key], fmt, seed + 10 * i + j)
    return Transformer(args, weights, backend="numba", dtype=dtype)


def decode(model, tokens, steps=4):
    """Logits of a prefill of tokens (B, T), then of `steps` one-token steps, then of a step that rewinds one
    position (a regenerated token), concatenated along positions; and the cache's keys and values."""
    B, T = tokens.shape
    out = [model.forward(tokens)]
    for s in range(steps):
        out.append(model.forward(np.full((B, 1), 7 + 3 * s), start_pos=T + s))
    out.append(model.forward(np.full((B, 1), 5), start_pos=T + steps - 1))
    n = model.cache.length
    return np.concatenate(out, axis=1), [a[:, :n].copy() for a in model.cache.k + model.cache.v]


STEPS = 5  # one-token steps in decode()


class Hook:
    """The forward pass's hook decode_layers by exact_step.decode_layer, counting the layers it computed and the
    ones it declined; off: always None."""

    def __init__(self, on=True):
        self.on, self.done, self.declined = on, 0, 0

    def __call__(self, model, i, *a):
        if not self.on:
            return None
        out = exact_step.decode_layer(model, i, *a)
        self.done += out is not None
        self.declined += out is None
        return None if out is None else (out, i + 1)


def same(a, b) -> bool:
    return a[0].dtype == b[0].dtype and np.array_equal(a[0], b[0]) and len(a[1]) == len(b[1]) \
        and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))


def lines_and_fused(model, tokens, monkeypatch, backend=kernels):
    """(the lines' answer, the fused layers' answer, the hook) for decode(model, tokens); backend: the module
    model.ops is, whose decode_layers the forward pass asks for."""
    monkeypatch.setattr(backend, "decode_layers", Hook(on=False))
    expected = decode(model, tokens)
    assert np.isfinite(expected[0]).all()
    hook = Hook()
    monkeypatch.setattr(backend, "decode_layers", hook)
    return expected, decode(model, tokens), hook


def check(model, tokens, monkeypatch, threads=(1, 2)):
    """At each thread count, every decode layer is fused and the logits and cache equal the lines'."""
    before = numba.get_num_threads()
    try:
        for n in threads:
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            expected, got, hook = lines_and_fused(model, tokens, monkeypatch)
            assert hook.done == STEPS * model.args.n_layers and hook.declined == 0  # every decode layer fused
            assert same(got, expected), n
    finally:
        numba.set_num_threads(before)


TOKENS = np.array([[3, 1, 4, 1, 5]])


def test_the_backend_exports_it():
    assert kernels.decode_layer is exact_step.decode_layer and "decode_layer" in kernels.__all__
    assert kernels.decode_layers is exact_step.decode_layers and "decode_layers" in kernels.__all__


@pytest.mark.parametrize("formats", ["f16", "bf16", "f32", "q4_1"])
def test_equals_the_lines(formats, monkeypatch):
    """The default model's main job (Q4_1) and the 16-bit and float32 matrices of the real shapes' decode."""
    check(model_in(formats), TOKENS, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("formats", ["int8", "q8_0", "q4_0", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", Q4_K_M, FLOATS,
                                     BLOCKS])
def test_every_format_equals_the_lines(formats, monkeypatch):
    check(model_in(formats, seed=1), TOKENS, monkeypatch)


def test_16_bit_matrices_on_the_block_shape(monkeypatch):
    """F16 on rows of 256 values (two prefetch chunks), every product one 16-bit call (qkv and w1 w3 together)."""
    model = model_in("f16", shape=SQUARE)
    plan = exact_step._plan(model, tuple(model.weights[n] for n in exact_step.layer_tensor_names(0)))
    assert plan[8] == 3  # both groups together, as kernels/linear.linears takes them
    check(model, TOKENS, monkeypatch, threads=(2,))


@pytest.mark.parametrize("sums", ["apart", "blocked"])
def test_under_the_sums_copies(sums, monkeypatch):
    """load()'s default backend for arithmetic="exact" is a sums= copy (model/ops.with_sums) holding decode_layers;
    a one-row product there is the backend's own, so the fused layer is its lines too."""
    model = model_in("bf16")
    model.ops = ops.with_sums(kernels, sums)
    expected, got, hook = lines_and_fused(model, TOKENS, monkeypatch, backend=model.ops)
    assert hook.done == STEPS * model.args.n_layers and hook.declined == 0
    assert same(got, expected)


def test_declines_what_it_cannot_promise(monkeypatch):
    """A float16 array matrix (converted per call by linear), a batch of 2, float64 activations and a backend whose
    products are not the kernels' go to the lines (None), and the answers are the lines'."""
    model = model_in("f16", keep=(0,))
    model.weights["layers.0.attention.wo.weight"] = model.weights["layers.0.attention.wo.weight"].astype(np.float16)
    expected, got, hook = lines_and_fused(model, TOKENS, monkeypatch)
    assert same(got, expected) and hook.done == STEPS and hook.declined == STEPS  # layer 0 declined, 1 fused

    batch = np.array([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]])
    expected, got, hook = lines_and_fused(model_in("q4_1"), batch, monkeypatch)
    assert same(got, expected) and hook.done == 0 and hook.declined == 2 * STEPS

    expected, got, hook = lines_and_fused(model_in("f16", dtype=np.float64), TOKENS, monkeypatch)
    assert same(got, expected) and hook.done == 0 and hook.declined == 2 * STEPS

    model = model_in("f32")
    other = types.ModuleType("other")  # the kernels with another product: the fused layer is not its lines
    other.__dict__.update({k: v for k, v in vars(kernels).items() if not k.startswith("__")})
    other.linear = lambda x, w: kernels.linear(x, w) + np.float32(0)
    model.ops = other
    expected, got, hook = lines_and_fused(model, TOKENS, monkeypatch, backend=other)
    assert same(got, expected) and hook.done == 0 and hook.declined == 2 * STEPS

    # A copy of the whole module, its name included, without linears (each product on its own: the lines take
    # wq, wk, wv one at a time): it declines rather than fail (tests/test_real_shapes.py builds one).
    model = model_in("f32")
    one_by_one = types.ModuleType("one_by_one")
    one_by_one.__dict__.update({k: v for k, v in vars(kernels).items() if k != "linears"})
    model.ops = one_by_one
    expected, got, hook = lines_and_fused(model, TOKENS, monkeypatch, backend=one_by_one)
    assert same(got, expected) and hook.done == 0 and hook.declined == 2 * STEPS


def test_a_replaced_weight_makes_a_new_plan(monkeypatch):
    """The plans are kept per model and layer; a matrix replaced in model.weights between steps is read."""
    model = model_in("q4_1")
    monkeypatch.setattr(kernels, "decode_layers", Hook())
    decode(model, TOKENS)
    fresh = model_in("q4_0", seed=2).weights["layers.1.feed_forward.w2.weight"]
    model.weights["layers.1.feed_forward.w2.weight"] = fresh
    expected, got, hook = lines_and_fused(model, TOKENS, monkeypatch)
    assert hook.done == STEPS * model.args.n_layers and same(got, expected)
    assert exact_step._PLANS[model][1][1][7][0][0] == exact_step.Q4  # the new w2's kernel
