"""`llama-ref convert` carries the tokenizer in the target format's own form (llama_ref.text.tokenizer_export).

--to hf: the tokenizer.json written is loaded by the `tokenizers` library itself and must give the source
tokenizer's ids on a varied corpus (special tokens, scripts, emoji, digits, whitespace runs, code), with and
without special-token text allowed, and decode back to the text. The reference is llama_ref's tokenizer of
the source, and where one exists the library that defines the format: tiktoken run with Meta's pattern
for Llama 3, sentencepiece for SentencePiece vocabularies. tokenizer_config.json and generation_config.json
must name the source's bos/eos/stop ids, BOS default and chat template. Sources: a GGUF with a byte-level
BPE vocabulary (the default model's, SmolLM2), a GGUF with a SentencePiece vocabulary (Llama 2's), Meta's
Llama 3 tiktoken tokenizer.model, a directory with a SentencePiece tokenizer.model.

--to meta: a GGUF SentencePiece vocabulary is written as tokenizer.model, which loads back through llama_ref
to the same ids; a byte-level GGUF vocabulary stays in the tokenizer_gguf.json sidecar.

The weights are tiny random ones (only the tokenizer is under test); a check that transformers'
AutoTokenizer loads the output runs when transformers is installed.
"""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import pytest

from llama_ref.text.chat import chat_tokens
from llama_ref.tools.convert import convert, write_checkpoint
from llama_ref.text.tokenizer import (Llama3Tokenizer, SentencePieceTokenizer, TokenizerError, tokenizer_from_dir,
                                 tokenizer_from_file, tokenizer_from_gguf)
from llama_ref.text.tokenizer_export import sentencepiece_spec, sentencepiece_tokenizer
from llama_ref.weights.directory import directory_tokenizer
from llama_ref.weights.gguf import gguf_metadata, open_gguf

from tiny import random_weights, tiny_args

DATA = Path(__file__).parent / "data" / "tokenizers"

pytestmark = pytest.mark.slow  # the shared fixture converts five tokenizers (~20 s on 2 cores)

# Meta's Llama 3 pre-tokenizer pattern, copied from llama-models (models/llama3/tokenizer.py) for the oracle.
META_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+")

FRAGMENTS = ["Hello", " world", "The capital of France is", "<|begin_of_text|>", "<|eot_id|>",
             "<|start_header_id|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<s>", "</s>", "<unk>",
             "[INST]", "<<SYS>>", "<0x41>", " ", "  ", "   ", "    ", "\n", "\n\n", "\t", "\r\n", "  \n  ", "\u3000",
             "0", "7", "12", "123", "12345678", "3.14159", "1,000,000", "2024-11-30", "def f(x):\n    return x ** 2\n",
             "{'a': [1, 2]}", "🦙", "👨‍👩‍👧", "🇫🇷", "é", "e\u0301", "中文字符", "日本語", "한국어", "العربية",
             "हिन्दी", "ไทย", "Ελληνικά", "Русский", "ℕ", "\u200b", "\ufeff", "'s", "'LL", "n't", "\x00", "☺",
             "—", "…", "ÀÉÎÕÜ", "naïve café", "x" * 40, "!!!???", "a\u00a0b"]


def corpus() -> list[str]:
    """Every fragment alone, and deterministic pairs and triples of them (specials next to text)."""
    n = len(FRAGMENTS)
    texts = list(FRAGMENTS) + [""]
    texts += [FRAGMENTS[i] + FRAGMENTS[(7 * i + 3) % n] for i in range(n)]
    texts += [FRAGMENTS[i] + FRAGMENTS[(5 * i + 1) % n] + FRAGMENTS[(11 * i + 2) % n] for i in range(n)]
    texts.append("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    texts.append("<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>")
    texts.append("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHello [/INST]</s><s>")
    return texts


CORPUS = corpus()


def _tokenizer_json(d: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(d / "tokenizer.json"))


def _encode(raw, text: str, allow_special: bool) -> list[int]:
    """The `tokenizers` library's ids, special-token text matched only when allowed (no BOS)."""
    raw.encode_special_tokens = not allow_special
    return raw.encode(text, add_special_tokens=False).ids


def _check_round_trip(d: Path, ref, *, byte_level: bool):
    """tokenizer.json in d gives ref's ids on the corpus, decodes back, and its configs match ref."""
    raw = _tokenizer_json(d)
    for text in CORPUS:
        for allow in (False, True):
            ids = _encode(raw, text, allow)
            assert ids == ref.encode(text, bos=False, allow_special=allow), (text, allow)
        # decode: byte-level BPE gives the text back exactly; SentencePiece as sentencepiece decodes
        ids = _encode(raw, text, False)
        if byte_level:
            assert raw.decode(ids, skip_special_tokens=False) == text
        elif "\x00" not in text:
            assert raw.decode(ids, skip_special_tokens=False) == ref.decode(ids)
    # BOS added by the post-processor exactly when the model adds it by default
    assert raw.encode("Hello world", add_special_tokens=True).ids == ref.encode("Hello world", allow_special=True)
    config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["add_bos_token"] == ref.add_bos_default
    assert raw.token_to_id(config["bos_token"]) == ref.bos_id
    assert raw.token_to_id(config["eos_token"]) == ref.eos_id
    assert config.get("chat_template") == ref.chat_template
    gen = json.loads((d / "generation_config.json").read_text())
    stops = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert set(stops) == set(ref.stop_ids)
    # llama_ref reads the written files back as the same tokenizer
    back = tokenizer_from_file(d / "tokenizer.json")
    assert (back.bos_id, back.eos_id, back.add_bos_default) == (ref.bos_id, ref.eos_id, ref.add_bos_default)
    assert back.stop_ids == ref.stop_ids and back.chat_template == ref.chat_template
    for text in CORPUS[::7]:
        assert back.encode(text, allow_special=True) == ref.encode(text, allow_special=True), text
    return raw


def _tiny_weights(vocab_size: int):
    args = tiny_args(dim=16, n_heads=2, n_kv_heads=1, n_layers=1, multiple_of=16, vocab_size=vocab_size,
                     tie_word_embeddings=True)
    return args, random_weights(args, seed=0)


def _gguf_with(tmp_path: Path, name: str, tokenizer_meta: dict) -> Path:
    args, weights = _tiny_weights(len(tokenizer_meta["tokenizer.ggml.tokens"]))
    return write_checkpoint(args, weights, tmp_path / name, "gguf-f32", tokenizer_meta=tokenizer_meta,
                            checksums=False)


# ---- sources --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_meta(default_model_path):
    """The tokenizer.* metadata of the default model's GGUF (gpt2 byte-level BPE, pre 'smollm')."""
    meta = gguf_metadata(open_gguf(default_model_path))
    return {k: v for k, v in meta.items() if k.startswith("tokenizer.")}


@pytest.fixture(scope="module")
def llama2_proto():
    return lzma.decompress((DATA / "llama2-tokenizer.model.xz").read_bytes())


@pytest.fixture(scope="module")
def llama2_sp(llama2_proto):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=llama2_proto)


@pytest.fixture(scope="module")
def llama2_gguf_meta(llama2_sp):
    """What llama.cpp's converter writes for Llama 2's SentencePiece model, with a chat template."""
    sp = llama2_sp
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
            "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)], "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": sp.bos_id(), "tokenizer.ggml.eos_token_id": sp.eos_id(),
            "tokenizer.ggml.unknown_token_id": sp.unk_id(), "tokenizer.ggml.add_bos_token": True,
            "tokenizer.chat_template": "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"}


@pytest.fixture(scope="module")
def converted(tmp_path_factory, smollm2_meta, llama2_gguf_meta, llama2_proto, llama3_path):
    """{label: (source tokenizer, output directory)} for every source, converted --to hf and --to meta."""
    tmp = tmp_path_factory.mktemp("convert-tokenizers")
    out = {}
    for label, meta in (("smollm2", smollm2_meta), ("llama2-gguf", llama2_gguf_meta)):
        src = _gguf_with(tmp, f"{label}.gguf", meta)
        ref = tokenizer_from_gguf(meta)
        for to in ("hf", "meta"):
            out[f"{label}/{to}"] = (ref, convert(src, tmp / f"{label}-{to}", to))
    # Meta Llama 3.1 directory with the official tiktoken tokenizer.model
    args, weights = _tiny_weights(128256)
    src = write_checkpoint(args, weights, tmp / "llama3-meta-src", "meta", checksums=False)
    params = json.loads((src / "params.json").read_text())
    (src / "params.json").write_text(json.dumps({**params, "use_scaled_rope": False}))  # 3.1's special names
    shutil.copyfile(llama3_path, src / "tokenizer.model")
    out["llama3/hf"] = (tokenizer_from_dir(src), convert(src, tmp / "llama3-hf", "hf"))
    out["llama3/meta"] = (tokenizer_from_dir(src), convert(src, tmp / "llama3-meta", "meta"))
    # a Hugging Face directory with only a SentencePiece tokenizer.model (as Llama 2 repositories have)
    args, weights = _tiny_weights(32000)
    src = write_checkpoint(args, weights, tmp / "llama2-hf-src", "hf", checksums=False)
    (src / "tokenizer.model").write_bytes(llama2_proto)
    out["llama2-dir/hf"] = (tokenizer_from_dir(src), convert(src, tmp / "llama2-dir-hf", "hf"))
    return out


# ---- --to hf -----------------------------------------------------------------------------------------------------

def test_byte_level_gguf_to_hf(converted, smollm2_meta):
    ref, d = converted["smollm2/hf"]
    raw = _check_round_trip(d, ref, byte_level=True)
    assert ref.chat_template and ref.add_bos_default is False
    # the special tokens are added tokens, matched whole
    for i, t in enumerate(smollm2_meta["tokenizer.ggml.token_type"]):
        if t == 3:
            assert _encode(raw, smollm2_meta["tokenizer.ggml.tokens"][i], True) == [i]
    assert json.loads(raw.to_str())["pre_tokenizer"]["type"] == "Sequence"  # smollm: digits, then byte-level
    assert (d / "tokenizer_gguf.json").is_file()  # kept: llama_ref and a later --to gguf read it


def test_sentencepiece_gguf_to_hf(converted, llama2_sp):
    ref, d = converted["llama2-gguf/hf"]
    raw = _check_round_trip(d, ref, byte_level=False)
    for text in CORPUS:  # sentencepiece itself: the same ids and the same decoded text
        ids = _encode(raw, text, False)
        assert ids == llama2_sp.encode(text), text
        if "\x00" not in text:
            assert raw.decode(ids) == llama2_sp.decode(ids), text
    # Hugging Face's published Llama 2 ids (transformers' tests): BOS included
    assert raw.encode("This is a test").ids == [1, 910, 338, 263, 1243]
    assert raw.encode("Hi   Hello").ids == [1, 6324, 259, 15043]


def test_tiktoken_to_hf(converted, llama3_path):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ref, d = converted["llama3/hf"]
    assert ref.version == "3.1"
    raw = _check_round_trip(d, ref, byte_level=True)
    ranks = load_tiktoken_bpe(str(llama3_path))
    enc = tiktoken.Encoding("llama3", pat_str=META_PAT, mergeable_ranks=ranks, special_tokens=ref.special_tokens)
    for text in CORPUS:
        assert _encode(raw, text, False) == enc.encode(text, disallowed_special=()), text
        assert _encode(raw, text, True) == enc.encode(text, allowed_special="all"), text
    assert raw.get_vocab_size() == 128256
    assert [raw.token_to_id(s) for s in ("<|begin_of_text|>", "<|eot_id|>", "<|reserved_special_token_245|>")] == [
        128000, 128009, 128255]
    # Meta's published vector (llama-models' tokenizer tests)
    assert raw.encode("This is a test sentence.").ids == [128000, 2028, 374, 264, 1296, 11914, 13]
    assert (d / "tokenizer.model").read_bytes() == Path(llama3_path).read_bytes()  # copied too
    # llama_ref itself keeps reading the tiktoken file it was built from (Meta's Llama 3 chat format)
    mine = directory_tokenizer(d)
    assert isinstance(mine, Llama3Tokenizer) and mine.version == "3.1"
    messages = [{"role": "user", "content": "Hi!"}]
    assert chat_tokens(mine, messages) == chat_tokens(ref, messages)


def test_sentencepiece_directory_to_hf(converted, llama2_sp):
    ref, d = converted["llama2-dir/hf"]
    raw = _check_round_trip(d, ref, byte_level=False)
    for text in CORPUS[::3]:
        assert _encode(raw, text, False) == llama2_sp.encode(text), text
    assert (d / "tokenizer.model").is_file()
    mine = directory_tokenizer(d)  # llama_ref reads the SentencePiece model it was built from
    assert isinstance(mine, SentencePieceTokenizer) and mine.encode("Hi  Hello") == ref.encode("Hi  Hello")


def test_hf_output_back_to_meta_keeps_llama3_names(converted, tmp_path):
    """HF -> Meta: the special-token names recorded with the tokenizer.json survive into params.json."""
    _, d = converted["llama3/hf"]
    back = convert(d, tmp_path / "meta", "meta")
    assert json.loads((back / "params.json").read_text())["use_scaled_rope"] is False
    tok = directory_tokenizer(back)
    assert tok.version == "3.1" and tok.special_tokens["<|eom_id|>"] == 128008
    (back / "tokenizer.json").unlink()  # Meta's own layout: tokenizer.model and params.json alone
    assert tokenizer_from_dir(back).version == "3.1"


def test_source_tokenizer_json_is_copied_unchanged(converted, tmp_path):
    _, src = converted["smollm2/hf"]
    dst = convert(src, tmp_path / "again", "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name


def test_hf_output_loads_with_transformers(converted):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed; the tokenizers-library checks above cover the files")
    for label in ("smollm2/hf", "llama2-gguf/hf", "llama3/hf", "llama2-dir/hf"):
        ref, d = converted[label]
        tok = transformers.AutoTokenizer.from_pretrained(str(d))
        for text in CORPUS:
            # transformers matches the unk_token "<unk>" in text as a special token (as Hugging Face's own
            # Llama 2 tokenizer does); llama_ref and sentencepiece match control pieces only.
            if "<unk>" not in text:
                assert tok(text)["input_ids"] == ref.encode(text, allow_special=True), (label, text)
            assert tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ref.encode(
                text, bos=False), (label, text)
        assert tok.chat_template == ref.chat_template
        assert (tok.bos_token_id, tok.eos_token_id) == (ref.bos_id, ref.eos_id)


def test_unconvertible_sentencepiece_warns_and_keeps_the_model(tmp_path):
    """A SentencePiece model BPE cannot reproduce (here NFKC normalisation) is refused by name; convert
    still writes the weights and copies tokenizer.model, with a warning."""
    import io

    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 3), model_writer=out, vocab_size=300,
                                   model_type="bpe", normalization_rule_name="nmt_nfkc", minloglevel=2,
                                   character_coverage=1.0)
    proto = out.getvalue()
    assert sentencepiece_spec(proto)["normalizer"] == "nmt_nfkc"
    with pytest.raises(TokenizerError, match="normaliser 'nmt_nfkc'"):
        sentencepiece_tokenizer(proto)
    args, weights = _tiny_weights(300)
    src = write_checkpoint(args, weights, tmp_path / "src", "meta", checksums=False)
    (src / "tokenizer.model").write_bytes(proto)
    with pytest.warns(UserWarning, match="not written in hf form.*nmt_nfkc"):
        dst = convert(src, tmp_path / "hf", "hf")
    assert (dst / "tokenizer.model").read_bytes() == proto and not (dst / "tokenizer.json").exists()


# ---- --to meta ---------------------------------------------------------------------------------------------------

def test_sentencepiece_gguf_to_meta_writes_tokenizer_model(converted, llama2_sp):
    ref, d = converted["llama2-gguf/meta"]
    back = tokenizer_from_file(d / "tokenizer.model")
    for text in CORPUS:
        assert back.encode(text, allow_special=True) == ref.encode(text, allow_special=True), text
        assert back.encode(text) == [llama2_sp.bos_id()] + llama2_sp.encode(text), text
    assert (back.bos_id, back.eos_id) == (ref.bos_id, ref.eos_id)


def test_tiktoken_to_meta_copies_tokenizer_model(converted, llama3_path):
    ref, d = converted["llama3/meta"]
    assert (d / "tokenizer.model").read_bytes() == Path(llama3_path).read_bytes()
    back = tokenizer_from_dir(d)
    assert back.version == ref.version  # params.json keeps saying which special-token names it has
    from llama_ref.weights.meta import load_meta

    assert load_meta(d)[0].rope_scaling is None  # ... without turning on RoPE scaling
    for text in CORPUS[::3]:
        assert back.encode(text, allow_special=True) == ref.encode(text, allow_special=True), text


def test_byte_level_gguf_to_meta_keeps_the_sidecar(converted):
    ref, d = converted["smollm2/meta"]
    assert not (d / "tokenizer.model").exists() and (d / "tokenizer_gguf.json").is_file()
    back = directory_tokenizer(d)  # what llama_ref.load reads
    for text in CORPUS[::3]:
        assert back.encode(text, allow_special=True) == ref.encode(text, allow_special=True), text
