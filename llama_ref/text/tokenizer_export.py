"""Tokenizer files for converted checkpoints: what `llama-ref convert` writes beside the weights.

Hugging Face (`--to hf`): a `tokenizer.json` in the `tokenizers` library's format (model, normalizer,
pre-tokenizer, decoder, post-processor, the special tokens as added tokens), a `tokenizer_config.json`
(tokenizer_class PreTrainedTokenizerFast, bos/eos/unk/pad tokens, add_bos_token, the chat template when the
source has one) and a `generation_config.json` with the stop ids. Built from:

- a GGUF `gpt2` vocabulary (byte-level BPE: tokens and merges as stored; the pre-tokenizer named by
  tokenizer.ggml.pre, as llama_ref's own GGUF tokenizer runs it);
- a SentencePiece BPE model, from a `tokenizer.model` or a GGUF `llama` vocabulary (which llama_ref turns
  back into the SentencePiece model it came from): BPE whose merges are ranked by the score of the merged
  piece, byte fallback, and SentencePiece's space handling ("▁" for spaces, the dummy-prefix space), as
  transformers builds a Llama tokenizer from a GGUF file. Only what BPE can express is converted: a unigram
  model, a normaliser other than identity, or collapsed whitespace runs are refused by name;
- Meta's Llama 3 tiktoken `tokenizer.model`: the ranks become a byte-level BPE vocabulary (id = rank) and
  merges (a pair of lower-ranked parts, ranked as the token they make), split by Llama 3's regex, with the
  256 special tokens. (Meta's code also cuts runs over 25,000 characters before tiktoken; tokenizer.json
  cannot express that cut.)

Meta (`--to meta`): a `tokenizer.model`. A GGUF `llama` vocabulary is written as the SentencePiece model
it describes; Meta and HF directories' tokenizer.model files are copied by convert itself. A GGUF `gpt2`
vocabulary has no tokenizer.model form: it stays in the tokenizer_gguf.json sidecar.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from .tokenizer import Tokenizer, TokenizerError, _gpt2_byte_decoder, _pre_tokenizer

TOKENIZER_JSON = "tokenizer.json"
# tokenizer_config.json key naming the tokenizer.model a tokenizer.json was built from (and its Llama 3
# special-token names): llama_ref keeps reading that file itself, with Meta's chat formats and Code Llama
# infilling, while transformers reads tokenizer.json. Other tools ignore the key.
SOURCE_KEY = "llama_ref_tokenizer_source"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
SPACE = "\u2581"


# ---- byte-level BPE: GGUF gpt2 vocabularies and Llama 3's tiktoken ranks ----------------------------------

def _post_processor(bos: Optional[tuple[str, int]]):
    """Adds BOS when the model wants it (what tokenizer.json's encode(add_special_tokens=True) does)."""
    from tokenizers import processors

    if bos is None:
        return None
    name, i = bos
    return processors.TemplateProcessing(single=f"{name}:0 $A:0", pair=f"{name}:0 $A:0 {name}:1 $B:1",
                                         special_tokens=[(name, i)])


def byte_level_tokenizer(tokens: list[str], merges: Iterable, special_ids: Iterable[int], pre: str,
                         bos_id: Optional[int] = None, add_bos: bool = False, ignore_merges: bool = False):
    """A `tokenizers.Tokenizer` for a byte-level BPE vocabulary (tokens written in GPT-2's byte alphabet).
    merges: "a b" strings or (a, b) pairs, best first."""
    from tokenizers import AddedToken, Tokenizer as RustTokenizer, decoders, models, processors

    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise TokenizerError("the vocabulary has duplicate tokens")
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    try:
        tk = RustTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, ignore_merges=ignore_merges))
    except Exception as e:  # tokenizers raises a bare Exception naming the bad merge
        raise TokenizerError(f"the merges are malformed ({e})") from None
    tk.pre_tokenizer = _pre_tokenizer(pre)
    tk.decoder = decoders.ByteLevel()
    post = _post_processor((tokens[bos_id], bos_id) if add_bos and bos_id is not None else None)
    tk.post_processor = post if post is not None else processors.ByteLevel(trim_offsets=False)
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special_ids)])
    return tk


def _byte_to_unicode() -> dict[int, str]:
    return {b: ch for ch, b in _gpt2_byte_decoder().items()}


def tiktoken_tokenizer(ranks: dict, special_tokens: dict, bos_id: Optional[int] = None, add_bos: bool = True,
                       pre: str = "llama-bpe"):
    """Meta's Llama 3 (or, pre "llama4", Llama 4) tiktoken ranks as byte-level BPE (what transformers'
    TikTokenConverter and llama.cpp's converter write): token i is the bytes of rank i; a merge (a, b) exists
    where a + b is a token and both parts rank below it, and merges are ordered by the rank of what they make.
    Split by the model's regex first; whole words in the vocabulary are taken as they are (ignore_merges), as
    tiktoken does."""
    b2u = _byte_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(b2u[x] for x in b)

    n = len(ranks)
    tokens = [""] * n
    for tok, r in ranks.items():
        tokens[r] = spell(tok)
    merges = []
    for tok, r in ranks.items():
        for k in range(1, len(tok)):
            left, right = ranks.get(tok[:k]), ranks.get(tok[k:])
            if left is not None and right is not None and left < r and right < r:
                merges.append((r, left, right))
    merges.sort()
    names = sorted(special_tokens, key=special_tokens.get)
    if [special_tokens[s] for s in names] != list(range(n, n + len(names))):
        raise TokenizerError(f"special token ids must follow the {n} ranks without gaps")
    tokens += names
    return byte_level_tokenizer(tokens, [(tokens[a], tokens[b]) for _, a, b in merges], range(n, len(tokens)),
                                pre, bos_id=bos_id, add_bos=add_bos, ignore_merges=True)


# ---- SentencePiece BPE --------------------------------------------------------------------------------------

def _proto_fields(data: bytes) -> dict[int, list]:
    """Top-level fields of a protobuf message: {field number: [value, ...]} (varints as int, length-
    delimited as bytes, fixed32/64 as bytes). Just enough to read a SentencePiece model's specs."""
    fields: dict[int, list] = {}
    pos = 0

    def varint():
        nonlocal pos
        shift = value = 0
        while True:
            if pos >= len(data):
                raise TokenizerError("truncated SentencePiece model")
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            size = varint()
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise TokenizerError(f"not a SentencePiece model (protobuf wire type {wire})")
        fields.setdefault(number, []).append(value)
    return fields


def sentencepiece_spec(proto: bytes) -> dict:
    """The settings of a SentencePiece model that decide whether BPE in tokenizer.json can reproduce it
    (sentencepiece_model.proto; absent fields take the proto's defaults)."""
    top = _proto_fields(proto)
    trainer = _proto_fields(top.get(2, [b""])[-1])
    norm = _proto_fields(top.get(3, [b""])[-1])
    return {
        "model_type": trainer.get(3, [1])[-1],  # 1 unigram (default), 2 BPE, 3 word, 4 char
        "byte_fallback": bool(trainer.get(35, [0])[-1]),
        "treat_whitespace_as_suffix": bool(trainer.get(24, [0])[-1]),
        "normalizer": norm.get(1, [b"nmt_nfkc"])[-1].decode("utf-8", "replace"),
        "add_dummy_prefix": bool(norm.get(3, [1])[-1]),
        "remove_extra_whitespaces": bool(norm.get(4, [1])[-1]),
        "escape_whitespaces": bool(norm.get(5, [1])[-1]),
    }


def sentencepiece_tokenizer(proto: bytes, add_bos: bool = True, where: str = "tokenizer.model"):
    """A SentencePiece BPE model as a `tokenizers.Tokenizer`: the pieces at their ids, merges ranked by the
    merged piece's score (best first; for one piece split several ways, by the parts' ids), byte fallback,
    spaces written as "▁" with the dummy prefix added by the normaliser (so each stretch of text between
    special tokens gets one, as sentencepiece run on each stretch does) and stripped by the decoder."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer as RustTokenizer, decoders, models, normalizers

    spec = sentencepiece_spec(proto)
    problems = []
    if spec["model_type"] != 2:
        problems.append(f"model type {spec['model_type']} (only BPE, 2, can be written as tokenizer.json BPE)")
    if spec["normalizer"] != "identity":
        problems.append(f"normaliser {spec['normalizer']!r} (only 'identity')")
    if spec["remove_extra_whitespaces"]:
        problems.append("remove_extra_whitespaces")
    if spec["treat_whitespace_as_suffix"] or not spec["escape_whitespaces"]:
        problems.append("unusual whitespace handling")
    if problems:
        raise TokenizerError(f"{where}: cannot be written as tokenizer.json: {'; '.join(problems)}")
    try:
        sp = spm.SentencePieceProcessor(model_proto=proto)
    except Exception as e:
        raise TokenizerError(f"{where}: not a valid SentencePiece model ({e})") from None
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    vocab = {p: i for i, p in enumerate(pieces)}
    mergeable = [not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i)) for i in range(n)]
    merges = []
    for i, piece in enumerate(pieces):
        if not mergeable[i]:
            continue
        for k in range(1, len(piece)):
            left, right = vocab.get(piece[:k]), vocab.get(piece[k:])
            if left is not None and right is not None and mergeable[left] and mergeable[right]:
                merges.append((-sp.get_score(i), left, right))
    merges.sort()
    unk = next((pieces[i] for i in range(n) if sp.is_unknown(i)), None)
    tk = RustTokenizer(models.BPE(vocab=vocab, merges=[(pieces[a], pieces[b]) for _, a, b in merges],
                                  unk_token=unk, fuse_unk=True, byte_fallback=spec["byte_fallback"]))
    steps = [normalizers.Prepend(SPACE)] if spec["add_dummy_prefix"] else []
    tk.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", SPACE)])
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["add_dummy_prefix"]:
        dec.append(decoders.Strip(" ", 1, 0))
    tk.decoder = decoders.Sequence(dec)
    bos = sp.bos_id()
    post = _post_processor((pieces[bos], bos) if add_bos and bos >= 0 else None)
    if post is not None:
        tk.post_processor = post
    # Control pieces (<s>, </s>, Code Llama's infilling markers) are matched whole when special-token text
    # is allowed, as llama_ref's SentencePiece tokenizer matches them; <unk> is not a control piece.
    tk.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                           for i in range(n) if sp.is_control(i)])
    return tk


# ---- configs ---------------------------------------------------------------------------------------------------

def tokenizer_config(tokens: list[str], bos_id=None, eos_id=None, unk_id=None, pad_id=None, add_bos=False,
                     chat_template: Optional[str] = None, max_len: Optional[int] = None,
                     base: Optional[dict] = None) -> dict:
    """tokenizer_config.json for the tokenizer.json written beside it; `base` (a source's own config)
    keeps its other keys."""
    config = dict(base or {})
    for key in ("tokenizer_file", "vocab_file", "auto_map"):  # files and classes of the source, not ours
        config.pop(key, None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key, i in (("bos_token", bos_id), ("eos_token", eos_id), ("unk_token", unk_id), ("pad_token", pad_id)):
        if i is not None:
            config[key] = tokens[i]
    config["add_bos_token"] = bool(add_bos)
    config.setdefault("add_eos_token", False)
    config.setdefault("clean_up_tokenization_spaces", False)
    if max_len is not None:
        config.setdefault("model_max_length", int(max_len))
    if chat_template:
        config["chat_template"] = chat_template
    return config


def generation_config(bos_id=None, stop_ids: Iterable[int] = (), pad_id=None) -> dict:
    stops = sorted(set(stop_ids))
    config = {}
    if bos_id is not None:
        config["bos_token_id"] = bos_id
    if stops:
        config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    if pad_id is not None:
        config["pad_token_id"] = pad_id
    return config


# ---- per source -------------------------------------------------------------------------------------------------

def _files(tk, config: dict, gen: dict) -> dict[str, str]:
    return {TOKENIZER_JSON: tk.to_str(pretty=True),
            TOKENIZER_CONFIG: json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            GENERATION_CONFIG: json.dumps(gen, indent=2) + "\n"}


def hf_files_from_gguf(meta: dict, max_len: Optional[int] = None, where: str = "GGUF") -> dict[str, str]:
    """{file name: text} of a Hugging Face tokenizer for GGUF tokenizer metadata (tokenizer.* keys)."""
    from .tokenizer import _check_gguf_vocabulary

    kind, tokens = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{where}: no embedded tokenizer (tokenizer.ggml.model/tokens missing)")
    _check_gguf_vocabulary(meta, where)
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
    stops = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
    template = meta.get("tokenizer.chat_template")
    if kind == "gpt2":
        if meta.get("tokenizer.ggml.merges") is None:
            raise TokenizerError(f"{where}: gpt2 tokenizer without tokenizer.ggml.merges")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        pre = meta.get("tokenizer.ggml.pre", "gpt-2")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        try:
            tk = byte_level_tokenizer(tokens, meta["tokenizer.ggml.merges"],
                                      [i for i, t in enumerate(types) if t in (3, 4)], pre, ids["bos"], add_bos,
                                      ignore_merges=pre in ("llama-bpe", "llama3"))  # as llama.cpp runs them
        except TokenizerError as e:
            raise TokenizerError(f"{where}: {e}") from None
    elif kind == "llama":
        from .tokenizer_sp import model_proto_from_gguf

        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        tk = sentencepiece_tokenizer(model_proto_from_gguf(meta, where), add_bos=add_bos, where=where)
    else:
        raise TokenizerError(f"{where}: GGUF tokenizer model {kind!r} is not supported (llama, gpt2)")
    config = tokenizer_config(tokens, ids["bos"], ids["eos"], ids["unknown"], ids["padding"], add_bos, template,
                              max_len)
    return _files(tk, config, generation_config(ids["bos"], stops, ids["padding"]))


def hf_files_from_tokenizer_model(path: Path, tok: Tokenizer, max_len: Optional[int] = None,
                                  base_config: Optional[dict] = None) -> dict[str, str]:
    """{file name: text} of a Hugging Face tokenizer for a tokenizer.model (tiktoken or SentencePiece);
    `tok` is llama_ref's tokenizer of the same file (its special ids and Llama 3 version)."""
    from .tokenizer_sp import SentencePieceTokenizer
    from .tokenizer_tiktoken import Llama3Tokenizer, load_tiktoken_ranks

    from .tokenizer_llama4 import Llama4Tokenizer

    template = (base_config or {}).get("chat_template") or tok.chat_template
    if isinstance(tok, Llama3Tokenizer):  # Llama 4's too (a Llama3Tokenizer with its own pattern and names)
        llama4 = isinstance(tok, Llama4Tokenizer)
        tk = tiktoken_tokenizer(load_tiktoken_ranks(path), tok.special_tokens, tok.bos_id, add_bos=True,
                                pre="llama4" if llama4 else "llama-bpe")
        tokens = [tk.id_to_token(i) for i in range(tok.vocab_size)]
        config = tokenizer_config(tokens, tok.bos_id, tok.eos_id, None, None, True, template, max_len, base_config)
        config[SOURCE_KEY] = {"file": "tokenizer.model", "llama3_version": "4" if llama4 else tok.version}
        return _files(tk, config, generation_config(tok.bos_id, tok.stop_ids))
    if isinstance(tok, SentencePieceTokenizer):
        tk = sentencepiece_tokenizer(Path(path).read_bytes(), add_bos=True, where=str(path))
        tokens = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
        unk = tok.sp.unk_id() if tok.sp.unk_id() >= 0 else None
        config = tokenizer_config(tokens, tok.bos_id, tok.eos_id, unk, tok.pad_id, True, template, max_len,
                                  base_config)
        config[SOURCE_KEY] = {"file": "tokenizer.model"}
        return _files(tk, config, generation_config(tok.bos_id, tok.stop_ids, tok.pad_id))
    raise TokenizerError(f"{path}: cannot write a tokenizer.json for a {type(tok).__name__}")


def gguf_metadata_from_tokenizer_model(path: Path, tok: Tokenizer) -> dict:
    """The tokenizer.* keys of a GGUF file for a Llama 3 or Llama 4 tiktoken tokenizer.model (`tok`: llama_ref's
    tokenizer of that file), as llama.cpp's converter writes them: model "gpt2", the byte-level tokens and
    merges of tiktoken_tokenizer, special tokens as control tokens (type 3), pre "llama-bpe" (Llama 3) or
    "llama4" (llama.cpp's names for the two patterns), BOS added. Anything else is a TokenizerError."""
    from .tokenizer_llama4 import Llama4Tokenizer
    from .tokenizer_tiktoken import Llama3Tokenizer, load_tiktoken_ranks

    if not isinstance(tok, Llama3Tokenizer):
        raise TokenizerError(f"{path}: only a Llama 3 or Llama 4 tiktoken tokenizer.model is written into a GGUF "
                             f"file here, not a {type(tok).__name__}")
    pre = "llama4" if isinstance(tok, Llama4Tokenizer) else "llama-bpe"
    ranks = load_tiktoken_ranks(path)
    tk = tiktoken_tokenizer(ranks, tok.special_tokens, tok.bos_id, add_bos=True, pre=pre)
    model = json.loads(tk.to_str())["model"]
    tokens = [tk.id_to_token(i) for i in range(tok.vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [3 if i >= len(ranks) else 1 for i in range(len(tokens))],
            "tokenizer.ggml.merges": merges, "tokenizer.ggml.bos_token_id": tok.bos_id,
            "tokenizer.ggml.eos_token_id": tok.eos_id, "tokenizer.ggml.eot_token_id": tok.eot_id,
            "tokenizer.ggml.add_bos_token": True}
    if tok.eom_id is not None:
        meta["tokenizer.ggml.eom_token_id"] = tok.eom_id
    return meta


def hf_tokenizer_files(gguf_meta: Optional[dict] = None, src_dir: Optional[Path] = None,
                       max_len: Optional[int] = None) -> dict[str, str]:
    """The Hugging Face tokenizer files a converted checkpoint should carry, beyond what is copied from a
    source directory: none when the source has a tokenizer.json (copied as it is); else built from the GGUF
    tokenizer metadata (a GGUF file, or a directory's tokenizer_gguf.json), or from the directory's
    tokenizer.model. Files the source directory has (tokenizer_config.json, generation_config.json) are
    not replaced: only tokenizer.json is added, and the source's config has its tokenizer_class adjusted."""
    from .tokenizer import _read_json, tokenizer_from_dir

    if src_dir is not None and (src_dir / TOKENIZER_JSON).is_file():
        return {}
    if gguf_meta:
        where = str(src_dir / "tokenizer_gguf.json") if src_dir is not None else "GGUF"
        files = hf_files_from_gguf(gguf_meta, max_len, where)
    elif src_dir is not None and (src_dir / "tokenizer.model").is_file():
        base = _read_json(src_dir / TOKENIZER_CONFIG) if (src_dir / TOKENIZER_CONFIG).is_file() else None
        files = hf_files_from_tokenizer_model(src_dir / "tokenizer.model", tokenizer_from_dir(src_dir), max_len,
                                              base)
    else:
        return {}
    if src_dir is not None and (src_dir / GENERATION_CONFIG).is_file():
        del files[GENERATION_CONFIG]  # the source's own (sampling defaults included) is copied
    return files


def source_tokenizer_model(path: Path) -> Optional[dict]:
    """{"file": "tokenizer.model", "llama3_version": ...} when directory `path` holds a tokenizer.json that
    convert built from the tokenizer.model beside it (the SOURCE_KEY of its tokenizer_config.json); None
    otherwise (a tokenizer.json of any other origin is the directory's tokenizer)."""
    from .tokenizer import _read_json

    if not ((path / TOKENIZER_CONFIG).is_file() and (path / "tokenizer.model").is_file()):
        return None
    source = _read_json(path / TOKENIZER_CONFIG).get(SOURCE_KEY)
    if not isinstance(source, dict) or source.get("file") != "tokenizer.model":
        return None
    if source.get("llama3_version") not in (None, "3.0", "3.1", "4"):
        raise TokenizerError(f"{path / TOKENIZER_CONFIG}: {SOURCE_KEY}.llama3_version must be 3.0, 3.1 or 4")
    return source


def meta_tokenizer_files(gguf_meta: Optional[dict] = None, src_dir: Optional[Path] = None) -> dict[str, bytes]:
    """{file name: bytes} a Meta directory should carry beyond what is copied: tokenizer.model for a GGUF
    `llama` (SentencePiece) vocabulary. A source directory's tokenizer.model is copied by convert; a GGUF
    `gpt2` vocabulary has no tokenizer.model form (it stays in tokenizer_gguf.json)."""
    if src_dir is not None and (src_dir / "tokenizer.model").is_file():
        return {}
    if gguf_meta and gguf_meta.get("tokenizer.ggml.model") == "llama":
        from .tokenizer_sp import model_proto_from_gguf

        where = str(src_dir / "tokenizer_gguf.json") if src_dir is not None else "GGUF"
        return {"tokenizer.model": model_proto_from_gguf(gguf_meta, where)}
    return {}


__all__ = ["hf_tokenizer_files", "meta_tokenizer_files", "byte_level_tokenizer", "sentencepiece_tokenizer",
           "tiktoken_tokenizer", "sentencepiece_spec"]
