"""Float64 mode of the NumPy backend: it really computes in float64 end to end, and measures float32's error."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import llama_ref
from llama_ref.model import ops
from llama_ref.tools.capture import activation_names, run_and_capture
from llama_ref.tools.verify import logits_diff

from tiny import tiny_args, tiny_model

TOKENS = [3, 17, 42, 5, 9, 60, 1]


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 3), st.integers(1, 5), st.sampled_from([(4, 2), (4, 4), (2, 1)]), st.integers(0, 2**31))
def test_every_operation_returns_float64_for_float64_input(B, T, heads, seed):
    """float32 weights must not pull a float64 computation down to float32 anywhere."""
    H, KVH = heads
    HD, D = 8, 16
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D))  # float64
    w32 = rng.standard_normal((D, D)).astype(np.float32)
    assert ops.rms_norm(x, np.ones(D, np.float32), 1e-5).dtype == np.float64
    assert ops.linear(x, w32).dtype == np.float64
    assert ops.embedding(np.array([[0, 1]]), w32, np.float64).dtype == np.float64
    cos, sin = ops.rope_tables(ops.rope_frequencies(tiny_args(dim=H * HD, n_heads=H, n_kv_heads=KVH)), 0, T,
                               np.float64)
    assert cos.dtype == sin.dtype == np.float64
    q = ops.apply_rope(rng.standard_normal((B, T, H, HD)), cos, sin)
    k, v = rng.standard_normal((2, B, T, KVH, HD))
    assert q.dtype == np.float64
    assert ops.attention(q, k, v, 0).dtype == np.float64
    assert ops.swiglu(x, x).dtype == np.float64


def test_tiny_model_float64_end_to_end():
    m64 = tiny_model(dtype=np.float64, n_layers=3)
    acts = run_and_capture(m64, TOKENS)
    assert list(acts) == activation_names(3)
    assert {a.dtype for a in acts.values()} == {np.dtype(np.float64)}
    m64.forward(TOKENS)
    assert all(k.dtype == np.float64 for k in m64.cache.k + m64.cache.v)
    # The float32 model on the same weights agrees to float32 rounding, not exactly.
    logits32 = tiny_model(dtype=np.float32, n_layers=3).forward(TOKENS)
    logits64 = m64.forward(TOKENS)
    assert logits32.dtype == np.float32
    diff = np.abs(logits32 - logits64).max()
    assert 0 < diff < 1e-5 * np.abs(logits64).max()


def test_float64_differs_from_float32_only_by_rounding():
    """Not a float32 computation widened at the end: float64 keeps digits float32 cannot hold."""
    m64 = tiny_model(dtype=np.float64)
    logits = m64.forward(TOKENS)
    assert np.any(logits != logits.astype(np.float32).astype(np.float64))


@pytest.mark.slow
def test_default_model_float64_vs_float32_under_1e_3(default_model_path, default_model):
    """The measured rounding error of float32 on the default model (docs/verification.md reports it)."""
    m64 = llama_ref.load(default_model_path, dtype=np.float64)
    tokens = default_model.tokenizer.encode("The capital of France is")
    acts = run_and_capture(m64, tokens, ["layers.*.residual", "logits"])
    assert {a.dtype for a in acts.values()} == {np.dtype(np.float64)}
    logits32 = run_and_capture(default_model, tokens, ["logits"])["logits"]
    assert logits32.dtype == np.float32
    diff = np.abs(logits32.astype(np.float64) - acts["logits"])
    print(f"\nfloat32 vs float64 logits, {len(tokens)} tokens: max abs {diff.max():.3g}, "
          f"mean abs {diff.mean():.3g}, max |logit| {np.abs(acts['logits']).max():.3g}")
    assert 0 < diff.max() < 1e-3
    lg = logits_diff(logits32, acts["logits"])
    assert lg.top1_agree.all() and lg.kl.max() < 1e-6
