"""The Numba backend computes what the NumPy reference computes, on the real default model and tiny ones.

Quantizing at load costs accuracy; the bounds below were measured on the default model (SmolLM2-135M,
whose GGUF is Q4_1 with a Q8_0 embedding, dequantized to float32 as the baseline) over the prompt of
`PROMPT`, and are asserted with a margin so that a broken kernel or quantizer fails them:

    format  bits/weight  max |logit - float32|  mean |logit - float32|  top-1 agreement  (measured)
    int8    8 (per row)  1.33                   0.20                    12/13 positions
    q8_0    8.5          1.10                   0.24                    13/13
    q4_0    4.5          15.6                   2.83                    3/13
q4_0 is far worse than q8_0 on this small model: its per-matrix relative error is ~9 % against ~0.6 %.
"""

from __future__ import annotations

import numpy as np
import pytest

import llama_ref
from llama_ref.model.transformer import Transformer
from llama_ref.weights.packed import quantize_weights
from llama_ref.weights.common import WeightsError
from llama_ref.weights.gguf import open_gguf

from tiny import random_weights, tiny_args

PROMPT = "The capital of France is Paris, and the capital of Germany is"
TOLERANCE = 1e-4  # numba vs numpy logits at float32, absolute (logits of this model reach ~30)


def twin(model: Transformer, weights=None, backend="numba") -> Transformer:
    """The same model (shared weights unless given) on another backend."""
    other = Transformer(model.args, model.weights if weights is None else weights, backend=backend,
                        dtype=model.dtype)
    other.freqs = model.freqs
    return other


def greedy(model: Transformer, ids: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy continuation, one token per forward call after the prefill; returns tokens and all logits."""
    logits = [model.forward(ids)[-1]]
    out = [int(logits[-1].argmax())]
    for i in range(steps - 1):
        logits.append(model.forward([out[-1]], len(ids) + i)[-1])
        out.append(int(logits[-1].argmax()))
    return out, logits


@pytest.fixture(scope="module")
def prompt_ids(default_model):
    return default_model.tokenizer.encode(PROMPT)


@pytest.fixture(scope="module")
def reference_run(default_model, prompt_ids):
    """Prefill logits and a 6-token greedy continuation of the NumPy reference, float32 weights."""
    model = twin(default_model, backend="numpy")  # its own cache: the shared fixture keeps none
    prefill = model.forward(prompt_ids)
    tokens, logits = greedy(model, prompt_ids, 6)
    return prefill, tokens, logits


def test_numba_matches_numpy_on_the_default_model(default_model, prompt_ids, reference_run):
    prefill, tokens, logits = reference_run
    fast = twin(default_model)
    assert fast.backend_name == "numba"
    np.testing.assert_allclose(fast.forward(prompt_ids), prefill, rtol=0, atol=TOLERANCE)
    got_tokens, got_logits = greedy(fast, prompt_ids, 6)
    assert got_tokens == tokens
    np.testing.assert_allclose(np.stack(got_logits), np.stack(logits), rtol=0, atol=TOLERANCE)


@pytest.mark.slow
def test_packed_gguf_weights_on_both_backends(default_model_path, prompt_ids, reference_run):
    prefill, tokens, _ = reference_run
    model = llama_ref.load(default_model_path, weights="packed", backend="numba")
    w = model.weights["layers.0.attention.wq.weight"]
    assert w.format == "q4_1" and model.weights["tok_embeddings.weight"].format == "q8_0"
    assert w.nbytes == 576 * 576 // 32 * 24  # 16 bytes of nibbles + float32 d and m per block, no float copy
    stored = next(t for t in open_gguf(default_model_path).tensors if t.name == "blk.0.attn_q.weight")
    np.testing.assert_array_equal(w.raw_blocks(), np.asarray(stored.data))  # the file's bytes, bit for bit
    np.testing.assert_allclose(model.forward(prompt_ids), prefill, rtol=0, atol=TOLERANCE)
    assert greedy(model, prompt_ids, 6)[0] == tokens
    # The NumPy reference decodes the same blocks to exactly the floats of the float32 load.
    np.testing.assert_array_equal(twin(model, backend="numpy").forward(prompt_ids), prefill)


# (format, max |logit diff|, mean |logit diff|, minimum top-1 agreement) bounds: the measured values in the
# module docstring with a margin of about 1.5x.
QUANTIZED = [("int8", 2.0, 0.3, 11), ("q8_0", 1.7, 0.37, 12), ("q4_0", 24.0, 4.3, 2)]


@pytest.mark.parametrize("fmt, max_diff, mean_diff, agree", QUANTIZED, ids=[q[0] for q in QUANTIZED])
def test_quantized_formats_stay_within_their_measured_error(default_model, prompt_ids, reference_run,
                                                           fmt, max_diff, mean_diff, agree):
    prefill = reference_run[0]
    model = twin(default_model, quantize_weights(default_model.weights, fmt))
    assert model.weights["layers.0.feed_forward.w1.weight"].format == fmt
    logits = model.forward(prompt_ids)
    diff = np.abs(logits - prefill)
    assert diff.max() <= max_diff and diff.mean() <= mean_diff
    assert int((logits.argmax(-1) == prefill.argmax(-1)).sum()) >= agree
    # Not a no-op: quantization moves the logits.
    assert diff.max() > 1e-3


def test_load_rejects_bad_weight_options(default_model_path):
    with pytest.raises(WeightsError, match="weights must be"):
        llama_ref.load(default_model_path, weights="float8")
    with pytest.raises(WeightsError, match="quantize must be one of"):
        llama_ref.load(default_model_path, quantize="q3_k")


# ---- tiny random models: batches, padding, float64, the end of the context window -------------------------

@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_tiny_model_batched_with_padding(kv_heads):
    args = tiny_args(n_heads=4, n_kv_heads=kv_heads)
    weights = random_weights(args, seed=kv_heads)
    ref, fast = Transformer(args, weights), Transformer(args, weights, backend="numba")
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, (2, 9))
    mask = np.ones((2, 9), bool)
    mask[1, :3] = False  # the second row is left-padded by three tokens
    want = ref.forward(tokens, key_mask=mask)
    got = fast.forward(tokens, key_mask=mask)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert not np.isnan(got).any()


def test_tiny_model_decodes_to_the_end_of_the_context_window():
    args = tiny_args(max_seq_len=40)
    weights = random_weights(args, seed=9)
    ref, fast = Transformer(args, weights), Transformer(args, weights, backend="numba")
    tokens = np.random.default_rng(1).integers(0, args.vocab_size, 40)
    np.testing.assert_allclose(fast.forward(tokens[:30]), ref.forward(tokens[:30]), rtol=0, atol=1e-5)
    for pos in range(30, 40):  # one token at a time, the last one in the final slot of the window
        np.testing.assert_allclose(fast.forward(tokens[pos:pos + 1], pos), ref.forward(tokens[pos:pos + 1], pos),
                                   rtol=0, atol=1e-5)


def test_tiny_model_float64_on_numba_is_the_reference():
    args = tiny_args()
    weights = random_weights(args, seed=3)
    tokens = np.arange(12) % args.vocab_size
    ref = Transformer(args, weights, dtype=np.float64)
    fast = Transformer(args, weights, dtype=np.float64, backend="numba")
    np.testing.assert_array_equal(fast.forward(tokens), ref.forward(tokens))
