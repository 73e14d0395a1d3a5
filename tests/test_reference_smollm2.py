"""The default model against Hugging Face transformers (float32, eager attention) on the same GGUF.

The fixtures were written once by tests/fixtures/make_smollm2_reference.py in a separate environment with
torch and transformers; this file only reads them. Tolerance: max |logit difference| <= 1e-3 everywhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
ATOL = 1e-3
PROMPTS = ["p0", "p1", "p2", "p3", "p4"]


@pytest.fixture(scope="module")
def ref():
    with np.load(DATA / "smollm2_reference.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def our_logits(default_model, ref):
    """Our logits for every fixture prompt, from one full forward each."""
    return {p: default_model.forward(ref[f"{p}_ids"], 0) for p in PROMPTS}


def test_fixture_is_for_this_model(ref, default_model_path):
    from llama_ref.weights.fetch import MODELS, DEFAULT_MODEL

    meta = json.loads(str(ref["meta"]))
    assert meta["gguf_sha256"] == MODELS[DEFAULT_MODEL].sha256
    assert meta["dtype"] == "float32"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_token_ids_as_hf(default_model, ref, prompt):
    text = json.loads(str(ref["prompt_texts"]))[int(prompt[1])]
    # P4 is a rendered chat template: its special tokens are meant as special tokens.
    ids = default_model.tokenizer.encode(text, allow_special=prompt == "p4")
    assert ids == ref[f"{prompt}_ids"].tolist()


@pytest.mark.parametrize("prompt", ["p0", "p1"])
def test_full_logits_match_hf(our_logits, ref, prompt):
    ours, theirs = our_logits[prompt], ref[f"{prompt}_logits"]
    assert ours.shape == theirs.shape
    assert np.max(np.abs(ours - theirs)) <= ATOL


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logit_columns_match_hf(our_logits, ref, prompt):
    positions, cols = ref[f"{prompt}_cols_pos"], ref["cols"]
    ours = our_logits[prompt][positions][:, cols]
    assert np.max(np.abs(ours - ref[f"{prompt}_logits_cols"])) <= ATOL


@pytest.mark.parametrize("prompt", PROMPTS)
def test_top64_and_argmax_match_hf(our_logits, ref, prompt):
    ours = our_logits[prompt]
    assert np.array_equal(ours.argmax(-1), ref[f"{prompt}_argmax"])
    # HF's top-64 logits, looked up in ours by id: equal within tolerance at every position.
    looked_up = np.take_along_axis(ours, ref[f"{prompt}_top_ids"], axis=-1)
    assert np.max(np.abs(looked_up - ref[f"{prompt}_top_logits"])) <= ATOL


@pytest.mark.parametrize("prompt", ["p0", "p4"])
def test_greedy_continuation_matches_hf(default_model, ref, prompt):
    """32 greedy tokens through the KV cache (prefill, then one-token decode) equal HF's argmax chain."""
    from llama_ref.generation.generate import generate_ids

    expected = ref[f"{prompt}_greedy32_ids"].tolist()
    got = [t for t, _ in generate_ids(default_model, ref[f"{prompt}_ids"].tolist(), 32, stop_ids=set())]
    assert got == expected


def measured_differences(our_logits, ref) -> dict:
    """Max |difference| per prompt over every stored logit (reported in the README)."""
    out = {}
    for p in PROMPTS:
        ours = our_logits[p]
        diffs = [np.abs(ours[ref[f"{p}_cols_pos"]][:, ref["cols"]] - ref[f"{p}_logits_cols"]).max(),
                 np.abs(np.take_along_axis(ours, ref[f"{p}_top_ids"], -1) - ref[f"{p}_top_logits"]).max()]
        if f"{p}_logits" in ref:
            diffs.append(np.abs(ours - ref[f"{p}_logits"]).max())
        out[p] = float(max(diffs))
    return out


def test_tokenizer_matches_hf_on_corpus(default_model):
    """198 varied strings (scripts, emoji, whitespace, digits, code, special-token look-alikes).

    HF's GGUF loader builds plain GPT-2 pre-tokenization; SmolLM2's own tokenizer.json (and llama.cpp's
    "smollm" pre-type) first splits every numeric character. The two agree except where a space precedes
    a non-ASCII numeral; there we follow the model's own tokenizer, whose ids the fixture also records.
    """
    tok = default_model.tokenizer
    cases = json.loads((DATA / "smollm2_tokenizer_cases.json").read_text(encoding="utf-8"))
    for case in cases:
        ids = tok.encode(case["text"], allow_special=True)
        assert ids == case["ids_digits_split_pretok"], case["text"]
        if ids != case["ids"]:
            assert re.search(r"\s[^\x00-\x7f]", case["text"]) and any(
                ch.isnumeric() and not ch.isascii() for ch in case["text"]), case["text"]
        assert tok.decode(ids) == case["text"]
