"""Activation capture: stable names in forward order, the documented shapes, and no effect on the output."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llama_ref.model import ops
from llama_ref.tools.capture import LAYER_NAMES, activation_names, capture, layer_of, run_and_capture
from llama_ref.errors import InputError

from tiny import tiny_model

TOKENS = [3, 17, 42, 5, 9, 60]


def test_names_are_stable_and_in_forward_order():
    model = tiny_model(n_layers=3)
    with capture(model) as acts:
        model.forward(TOKENS)
    assert list(acts) == activation_names(3)
    assert activation_names(1) == ["embeddings"] + [f"layers.0.{n}" for n in LAYER_NAMES] + ["norm", "logits"]


def test_shapes_follow_the_documented_table():
    model = tiny_model()
    a = model.args
    T, D, H, KVH, HD, F, V = len(TOKENS), a.dim, a.n_heads, a.kv_heads, a.head_dim, a.ffn_hidden_dim, a.vocab_size
    acts = run_and_capture(model, TOKENS)
    expected = {"embeddings": (T, D), "norm": (T, D), "logits": (T, V)}
    for i in range(a.n_layers):
        p = f"layers.{i}."
        expected.update({p + "attention_norm": (T, D), p + "attention.q": (T, H, HD), p + "attention.k": (T, KVH, HD),
                         p + "attention.v": (T, KVH, HD), p + "attention.heads": (T, H, HD),
                         p + "attention.output": (T, D), p + "attention_residual": (T, D), p + "ffn_norm": (T, D),
                         p + "feed_forward.gate": (T, F), p + "feed_forward.up": (T, F),
                         p + "feed_forward.output": (T, D), p + "residual": (T, D)})
    assert {name: acts[name].shape for name in acts} == expected


def test_captured_tensors_are_the_steps_of_the_forward_pass():
    """Recompute each step from the captured inputs and the weights: every name holds what it says."""
    model = tiny_model(n_layers=2)
    w, a = model.weights, model.args
    acts = run_and_capture(model, TOKENS)
    np.testing.assert_array_equal(acts["embeddings"], w["tok_embeddings.weight"][TOKENS])
    cos, sin = ops.rope_tables(model.freqs, 0, len(TOKENS), np.float32)
    residual = acts["embeddings"]
    for i in range(a.n_layers):
        p = f"layers.{i}."
        x = ops.rms_norm(residual, w[p + "attention_norm.weight"], a.norm_eps)
        np.testing.assert_allclose(acts[p + "attention_norm"], x, rtol=1e-6, atol=1e-7)
        q = (x @ w[p + "attention.wq.weight"].T).reshape(len(TOKENS), a.n_heads, a.head_dim)
        np.testing.assert_allclose(acts[p + "attention.q"], ops.apply_rope(q[None], cos, sin)[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(acts[p + "attention.output"],
                                   acts[p + "attention.heads"].reshape(len(TOKENS), -1)
                                   @ w[p + "attention.wo.weight"].T,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(acts[p + "attention_residual"], residual + acts[p + "attention.output"], rtol=1e-6)
        np.testing.assert_allclose(acts[p + "feed_forward.gate"],
                                   acts[p + "ffn_norm"] @ w[p + "feed_forward.w1.weight"].T,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(acts[p + "feed_forward.up"],
                                   acts[p + "ffn_norm"] @ w[p + "feed_forward.w3.weight"].T,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(acts[p + "residual"],
                                   acts[p + "attention_residual"] + acts[p + "feed_forward.output"], rtol=1e-6)
        residual = acts[p + "residual"]
    np.testing.assert_allclose(acts["logits"], acts["norm"] @ w["output.weight"].T, rtol=1e-5, atol=1e-6)


def test_capture_does_not_change_the_output_and_switches_off_after():
    model = tiny_model()
    plain = model.forward(TOKENS)
    with capture(model) as acts:
        captured = model.forward(TOKENS)
    assert model.capture is None
    np.testing.assert_array_equal(plain, captured)
    np.testing.assert_array_equal(acts["logits"][0], plain)
    # Off again: a later pass records nothing.
    model.forward(TOKENS[:2])
    assert acts["logits"].shape[1] == len(TOKENS)


def test_capture_is_switched_off_even_when_the_forward_pass_fails():
    model = tiny_model()
    with pytest.raises(InputError):
        with capture(model):
            model.forward([model.args.vocab_size])  # out of the vocabulary
    assert model.capture is None


def test_patterns_keep_only_matching_names():
    model = tiny_model(n_layers=3)
    acts = run_and_capture(model, TOKENS, ["layers.*.residual", "logits"])
    assert list(acts) == ["layers.0.residual", "layers.1.residual", "layers.2.residual", "logits"]


def test_captured_arrays_are_copies():
    model = tiny_model()
    with capture(model) as acts:
        logits = model.forward(TOKENS)
    logits[:] = 0
    assert np.any(acts["logits"] != 0)


def test_run_and_capture_leaves_the_model_cache_alone():
    model = tiny_model()
    model.forward(TOKENS[:3])
    cache = model.cache
    k_before = cache.k[0][:, :3].copy()
    run_and_capture(model, [1, 2, 3, 4])
    assert model.cache is cache
    np.testing.assert_array_equal(cache.k[0][:, :3], k_before)
    with pytest.raises(InputError, match="one sequence"):
        run_and_capture(model, [[1, 2]])


def test_decode_step_and_batch_are_captured_with_their_shapes():
    model = tiny_model()
    model.forward(TOKENS)
    with capture(model) as acts:
        model.forward([7], len(TOKENS))
    assert acts["layers.1.attention.q"].shape == (1, 1, model.args.n_heads, model.args.head_dim)
    with capture(model) as acts:
        model.forward(np.array([TOKENS, TOKENS[::-1]]))
    assert acts["layers.0.feed_forward.gate"].shape == (2, len(TOKENS), model.args.ffn_hidden_dim)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 500), st.sampled_from(LAYER_NAMES))
def test_layer_of_reads_the_layer_index(i, suffix):
    assert layer_of(f"layers.{i}.{suffix}") == i
    assert layer_of("logits") is None and layer_of("embeddings") is None
