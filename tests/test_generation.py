"""model.generate / stream / chat / logits / score, checked against step-by-step recomputation.

Tiny random models do the heavy checking; the real default model gets two short checks (a greedy chain
and its chat format against the transformers fixture).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tiny import tiny_model
from llama_ref.model import ops
from llama_ref.generation.generate import chat_prompt_ids
from llama_ref.errors import InputError
from llama_ref.generation.sampling import log_softmax

DATA = Path(__file__).parent / "data"
PROMPTS = [[1, 2, 3], [5], [7, 8, 9, 10, 11, 12, 13], [40, 41]]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1)


def argmax_chain(model, ids, n):
    """n greedy tokens, each from a fresh full forward over everything so far (no cache reuse)."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(np.argmax(model.logits(ids)[-1])))
    return ids[-n:]


def test_greedy_is_the_argmax_chain_of_logits(model):
    for prompt in PROMPTS:
        g = model.generate(prompt, max_new_tokens=12, stop_ids=[])
        assert g.ids == argmax_chain(model, prompt, 12)
        assert g.finish_reason == "length" and g.prompt_ids == prompt


def test_greedy_real_model_is_the_argmax_chain(default_model):
    prompt = default_model.tokenizer.encode("The capital of France is")
    g = default_model.generate(prompt, max_new_tokens=3, stop_ids=[])
    assert g.ids == argmax_chain(default_model, prompt, 3)
    assert g.text == default_model.tokenizer.decode(g.ids)


def test_logprobs_are_the_models_log_softmax(model):
    prompt = [3, 1, 4, 1, 5]
    g = model.generate(prompt, max_new_tokens=6, temperature=1.0, top_k=5, seed=0, stop_ids=[], top_logprobs=4)
    for i, (token, lp, top) in enumerate(zip(g.ids, g.logprobs, g.top_logprobs)):
        logp = log_softmax(model.logits(prompt + g.ids[:i])[-1])
        assert lp == pytest.approx(logp[token], abs=1e-5)
        assert [t for t, _ in top] == list(np.argsort(-logp, kind="stable")[:4])
        assert [v for _, v in top] == pytest.approx(np.sort(logp)[::-1][:4], abs=1e-5)


def test_temperature_zero_reduces_every_sampler_to_greedy(model):
    greedy = model.generate(PROMPTS[0], max_new_tokens=10, stop_ids=[]).ids
    for kw in (dict(top_k=3), dict(top_p=0.5), dict(min_p=0.2), dict(top_k=2, top_p=0.3, min_p=0.1)):
        assert model.generate(PROMPTS[0], max_new_tokens=10, stop_ids=[], temperature=0.0, seed=5, **kw).ids == greedy


def test_same_seed_same_text_other_seed_other_text(model):
    kw = dict(max_new_tokens=20, temperature=1.5, stop_ids=[])
    a = model.generate(PROMPTS[2], seed=11, **kw).ids
    assert model.generate(PROMPTS[2], seed=11, **kw).ids == a
    assert model.generate(PROMPTS[2], seed=12, **kw).ids != a


def test_same_seed_same_tokens_across_dtypes_and_backends():
    # The draw uses float64 probabilities and one uniform number per token, so computations that differ
    # only in rounding (float32 vs float64, numpy vs numba) pick the same tokens.
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=2024, stop_ids=[])
    reference = tiny_model(seed=3).generate(PROMPTS[0], **kw).ids
    assert tiny_model(seed=3, dtype=np.float64).generate(PROMPTS[0], **kw).ids == reference
    numba_model = tiny_model(seed=3, backend="numba")
    assert numba_model.generate(PROMPTS[0], **kw).ids == reference
    # Batched on numba too: left padding leaves queries that see no key at all, which must give zeros
    # (as ops.attention does), not NaN.
    batch = numba_model.generate(PROMPTS, **kw)
    assert [g.ids for g in batch] == [g.ids for g in tiny_model(seed=3).generate(PROMPTS, **kw)]


@pytest.mark.parametrize("kw", [
    dict(),
    dict(temperature=0.9, top_k=20, seed=7),
    dict(temperature=1.2, top_p=0.8, min_p=0.02, repetition_penalty=1.3, seed=[1, 2, 3, 4]),
])
def test_batched_equals_each_prompt_alone(model, kw):
    # Different lengths (left padding), and stop ids that end some prompts early (rows leave the batch).
    stop_ids = [0, 9, 17]
    batch = model.generate(PROMPTS, max_new_tokens=15, stop_ids=stop_ids, top_logprobs=2, **kw)
    seeds = kw.pop("seed", None)
    for i, prompt in enumerate(PROMPTS):
        seed = seeds[i] if isinstance(seeds, list) else seeds
        alone = model.generate(prompt, max_new_tokens=15, stop_ids=stop_ids, top_logprobs=2, seed=seed, **kw)
        assert batch[i].ids == alone.ids
        assert batch[i].finish_reason == alone.finish_reason and batch[i].stop == alone.stop
        assert batch[i].logprobs == pytest.approx(alone.logprobs, abs=1e-5)


def test_batched_rows_near_the_window_get_their_full_room():
    model = tiny_model(seed=2, max_seq_len=24)
    prompts = [list(range(1, 21)), [3, 4]]  # the long one fills the window after 4 tokens
    batch = model.generate(prompts, max_new_tokens=10, stop_ids=[])
    assert [len(g.ids) for g in batch] == [4, 10]
    assert [g.finish_reason for g in batch] == ["length", "length"]
    assert batch[1].ids == model.generate(prompts[1], max_new_tokens=10, stop_ids=[]).ids


def test_padded_attention_is_finite_and_unpadded_path_unchanged():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 4, 8)).astype(np.float32)  # (B, T, H, HD)
    k = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)  # (B, S, KVH, HD)
    v = rng.standard_normal((2, 5, 2, 8)).astype(np.float32)
    mask = np.ones((2, 5), dtype=bool)
    assert np.array_equal(ops.attention(q, k, v, 0, mask), ops.attention(q, k, v, 0))
    mask[1, :3] = False  # row 1 is left-padded by 3: its first 3 queries see no key at all
    out = ops.attention(q, k, v, 0, mask)
    assert np.all(np.isfinite(out)) and np.all(out[1, :3] == 0)
    # The real queries of row 1 equal attention over row 1's real keys alone.
    alone = ops.attention(q[1:, 3:], k[1:, 3:], v[1:, 3:], 0)
    assert np.allclose(out[1, 3:], alone[0], atol=1e-6)


def test_stop_ids_and_stop_strings(tiny_gguf_model):
    m = tiny_gguf_model
    full = m.generate("the", max_new_tokens=16, stop_ids=[])
    # A stop id: generation ends before it, the id is not in the output.
    cut = m.generate("the", max_new_tokens=16, stop_ids=[full.ids[5]])
    first = full.ids.index(full.ids[5])
    assert cut.ids == full.ids[:first] and cut.finish_reason == "stop" and cut.stop == full.ids[5]
    # A stop string: the text ends where it starts, and streaming never shows any of it.
    stop = full.text[6:9]
    at = full.text.find(stop)
    g = m.generate("the", max_new_tokens=16, stop_ids=[], stop=["zzzz-never", stop])
    assert g.text == full.text[:at] and g.finish_reason == "stop" and g.stop == stop
    stream = m.stream("the", max_new_tokens=16, stop_ids=[], stop=stop)
    assert "".join(stream) == g.text and stream.result.text == g.text


def test_stream_pieces_join_to_the_text(tiny_gguf_model):
    stream = tiny_gguf_model.stream("he", max_new_tokens=20, temperature=1.0, seed=4, stop_ids=[])
    pieces = list(stream)
    g = tiny_gguf_model.generate("he", max_new_tokens=20, temperature=1.0, seed=4, stop_ids=[])
    assert "".join(pieces) == g.text == tiny_gguf_model.tokenizer.decode(g.ids)
    assert stream.result.ids == g.ids


def test_context_window(model):
    window = model.args.max_seq_len  # 64
    too_long = list(range(1, 60)) * 2
    with pytest.raises(InputError, match="context window"):
        model.generate(too_long, max_new_tokens=4)
    g = model.generate(too_long, max_new_tokens=4, truncate=True, stop_ids=[])
    assert g.prompt_ids == too_long[-(window - 4):] and len(g.ids) == 4
    # Generation stops at the window with finish_reason "length".
    g = model.generate(list(range(1, 61)), max_new_tokens=50, stop_ids=[])
    assert len(g.ids) == window - 60 and g.finish_reason == "length"
    full = model.generate([i % 60 + 1 for i in range(64)], max_new_tokens=5)
    assert full.ids == [] and full.finish_reason == "length"


def test_bad_prompts(model):
    with pytest.raises(InputError, match="empty"):
        model.generate([], max_new_tokens=2)
    with pytest.raises(InputError, match="outside the vocabulary"):
        model.generate([1, 999], max_new_tokens=2)
    with pytest.raises(InputError, match="tokenizer"):
        model.generate("text needs a tokenizer", max_new_tokens=2)
    with pytest.raises(InputError, match="seeds"):
        model.generate(PROMPTS, seed=[1, 2])


def test_chat_uses_the_models_template(tiny_gguf_model):
    m = tiny_gguf_model
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "and?"}]
    ids = chat_prompt_ids(m, messages)
    assert m.tokenizer.decode(ids) == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
                                       "<|im_start|>user\nand?<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == 1  # <|im_start|> is one special token, not its characters
    g = m.chat(messages, max_new_tokens=8)
    assert g.prompt_ids == ids and g.ids == m.generate(ids, max_new_tokens=8).ids


def test_chat_format_of_the_default_model_matches_transformers(default_model):
    ref = np.load(DATA / "smollm2_reference.npz")
    import json

    prompts = json.loads(str(ref["prompt_texts"]))
    assert prompts[4] == str(ref["chat_rendered"])
    ids = chat_prompt_ids(default_model, [{"role": "user", "content": "What is the capital of France?"}])
    assert ids == ref["p4_ids"].tolist()


def test_score_is_the_sum_of_token_nlls(model):
    ids = [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]
    logp = log_softmax(model.logits(ids))
    s = model.score(ids)
    assert s.n_tokens == 9
    assert s.nll == pytest.approx(-sum(logp[t - 1, ids[t]] for t in range(1, 10)), rel=1e-12)
    assert s.perplexity == pytest.approx(np.exp(s.nll / 9), rel=1e-12)


def test_score_past_the_window_uses_sliding_windows():
    model = tiny_model(seed=4, max_seq_len=16)
    ids = [int(i) for i in np.random.default_rng(0).integers(0, 64, 40)]
    s = model.score(ids, stride=1)
    # stride 1: every token is predicted from the window - 1 tokens before it (or all, near the start).
    expected = 0.0
    for t in range(1, 40):
        context = ids[max(0, t - 15):t + 1]
        expected -= log_softmax(model.logits(context))[-2, ids[t]]
    assert s.n_tokens == 39 and s.nll == pytest.approx(expected, rel=1e-9)
    assert model.score(ids).n_tokens == 39  # the default stride scores each token once as well


@pytest.fixture(scope="module")
def tiny_gguf_model(tmp_path_factory):
    from test_cli import write_tiny_gguf

    import llama_ref

    return llama_ref.load(write_tiny_gguf(tmp_path_factory.mktemp("gen") / "tiny.gguf"))
