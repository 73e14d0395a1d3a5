"""Llama 4's tokenizer and chat format against Meta's own (tests/data/tokenizers/llama4-cases.json, written by
tests/fixtures/make_llama4_tokenizer_cases.py from llama-models' llama4 Tokenizer and ChatFormat). The official
tokenizer.model is fetched from PyPI (llama-models 0.3.0, sha256-pinned); without it these tests skip."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from llama_ref.text.chat import chat_tokens
from llama_ref.text.tokenizer import tokenizer_from_dir
from llama_ref.text.tokenizer_llama4 import Llama4Tokenizer, llama4_chat_tokens, parse_llama4_reply

CASES = json.loads((Path(__file__).parent / "data" / "tokenizers" / "llama4-cases.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tok(llama4_tokenizer):
    return llama4_tokenizer  # conftest's, loaded once per worker (test_llama4_server uses it too)


def test_the_file_is_recognised_as_llama4_and_its_special_tokens_are_metas(tok):
    assert isinstance(tok, Llama4Tokenizer) and tok.vocab_size == CASES["n_words"] == 202048
    for name, i in CASES["special_tokens"].items():
        assert tok.special_tokens[name] == i, name
    table = "\n".join(f"{name} {i}" for name, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]))
    assert hashlib.sha256(table.encode()).hexdigest() == CASES["special_table_sha256"]
    assert sorted(tok.stop_ids) == sorted(CASES["stop_tokens"])


def test_ids_equal_metas_on_the_corpus(tok):
    for case in CASES["cases"]:
        assert tok.encode(case["text"], bos=False) == case["ids"], case["text"]
        assert tok.encode(case["text"], bos=True, eos=True, allow_special=True) == case["ids_special"], case["text"]
        assert tok.decode(case["ids"]) == case["text"]


def test_special_token_text_in_user_input_stays_text(tok):
    ids = tok.encode("<|eot|>", bos=False)
    assert tok.eot_id not in ids and tok.decode(ids) == "<|eot|>"
    assert tok.encode("<|eot|>", bos=False, allow_special=True) == [tok.eot_id]


def test_chat_format_equals_metas_encode_dialog_prompt(tok):
    for dialog in CASES["dialogs"]:
        assert llama4_chat_tokens(tok, dialog["messages"]) == dialog["ids"], dialog["messages"]
        assert chat_tokens(tok, dialog["messages"]) == dialog["ids"]  # chosen by the tokenizer's family


def test_replies_parse_as_metas_decode_assistant_message():
    for reply in CASES["replies"]:
        got = parse_llama4_reply(reply["text"])
        assert (got["content"], got["stop_reason"]) == (reply["content"], reply["stop_reason"]), reply["text"]
        assert got["tool_calls"] == reply["tool_calls"], reply["text"]


@pytest.mark.slow  # a CLI subprocess or more: seconds on 2 cores
def test_a_llama4_params_json_directory_reads_its_tokenizer_as_llama4(tmp_path, llama4_path):
    """Scout's params.json sets use_scaled_rope, which marks Llama 3.1 for Llama 3 directories."""
    (tmp_path / "tokenizer.model").write_bytes(Path(llama4_path).read_bytes())
    params = json.loads((Path(__file__).parent / "data" / "tiny_ckpt" / "llama4_meta" / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert isinstance(tokenizer_from_dir(tmp_path), Llama4Tokenizer)


@pytest.mark.slow  # about 7 s: merges recovered from 200000 ranks
def test_exported_tokenizer_json_gives_metas_ids(tok, llama4_path, tmp_path):
    """The tokenizer.json `llama-ref convert --to hf` writes for it, run by the tokenizers library (as
    transformers runs it): Meta's ids on the corpus. Special-token text in the input is a special token there,
    as in every tokenizer.json, so those cases are compared with allow_special's ids."""
    from tokenizers import Tokenizer

    from llama_ref.weights.directory import directory_tokenizer
    from llama_ref.text.tokenizer_export import hf_files_from_tokenizer_model

    files = hf_files_from_tokenizer_model(Path(llama4_path), tok)
    tk = Tokenizer.from_str(files["tokenizer.json"])
    for case in CASES["cases"]:
        with_special = tk.encode(case["text"], add_special_tokens=True).ids + [tok.eos_id]
        assert with_special == case["ids_special"], case["text"]
        if not any(name in case["text"] for name in tok.special_tokens):
            assert tk.encode(case["text"], add_special_tokens=False).ids == case["ids"], case["text"]
    # A directory holding both files reads back as the Llama 4 tokenizer (the tokenizer.model it came from).
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "tokenizer.model").write_bytes(Path(llama4_path).read_bytes())
    assert isinstance(directory_tokenizer(tmp_path), Llama4Tokenizer)


def check_decode_inverts_encode(tok, text: str) -> None:
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text
    assert not set(ids) & tok.special_ids  # special-token text typed by a user never becomes a special token


# ~10 ms an example on 2 shared cores (1.9 s for 200): the fast tier draws 50, the full suite 200 more.
@settings(max_examples=50, deadline=None)
@given(st.text(max_size=200))
def test_decode_inverts_encode_and_special_text_stays_text(tok, text):
    check_decode_inverts_encode(tok, text)


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_decode_inverts_encode_and_special_text_stays_text_many(tok, text):
    check_decode_inverts_encode(tok, text)
