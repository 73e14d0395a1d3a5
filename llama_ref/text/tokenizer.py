"""Tokenizers: one interface over every vocabulary a Llama model ships with.

The heavy lifting is done by the libraries that define each format (`tokenizers` for byte-level BPE,
`sentencepiece`, `tiktoken`); this module only builds them from the model's files and gives them one face:
encode(text, bos, eos, allow_special), decode(ids), an incremental decoder, and the bos/eos/stop ids.

Here: the interface, GGUF `gpt2` byte-level BPE, Hugging Face tokenizer.json, and finding a checkpoint's
tokenizer (tokenizer_from_dir / tokenizer_from_file / tokenizer_from_gguf). SentencePiece (Llama 1/2, Code
Llama, GGUF `llama`) is in tokenizer_sp.py, Meta's Llama 3 tiktoken tokenizer in tokenizer_tiktoken.py; both
classes are importable from here too. Chat formats are in chat.py.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Iterable, Optional, Sequence

from ..errors import LlamaRefError


class TokenizerError(LlamaRefError, ValueError):
    """A tokenizer file is damaged, or ids/text cannot be handled."""


class Tokenizer:
    """Base interface. Subclasses implement vocab_size, id_to_piece(i), _encode(text, allow_special) and
    _decode_bytes(ids, at_start)."""

    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    stop_ids: frozenset = frozenset()
    special_ids: "set[int] | frozenset" = frozenset()  # control tokens: matched whole, shown as text
    chat_template: Optional[str] = None
    add_bos_default: bool = True

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str, bos: Optional[bool] = None, eos: bool = False,
               allow_special: bool = False) -> list[int]:
        """Ids for `text`. Special-token text (e.g. "<|im_start|>") is ordinary text unless allow_special.

        bos=None follows the model's own convention (some models, like SmolLM2, add no BOS).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")  # lone surrogates (how Python passes on undecodable bytes) are not text
        except UnicodeEncodeError as e:
            raise TokenizerError(f"text is not valid Unicode ({e.reason} at character {e.start})") from None
        ids = self._encode(text, allow_special)
        if bos if bos is not None else self.add_bos_default:
            if self.bos_id is None:
                raise TokenizerError("this tokenizer has no BOS token")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id is None:
                raise TokenizerError("this tokenizer has no EOS token")
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens are rendered as their text (SentencePiece control tokens such as
        <s> are invisible, as sentencepiece and Meta's Llama 2 decode them)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int], at_start: bool = True) -> bytes:
        """Bytes of `ids`. at_start=False: the ids continue a text after a non-special token (SentencePiece
        drops the dummy-prefix space only from the first piece of a text)."""
        ids = self._check_ids(ids)
        return self._decode_bytes(ids, at_start)

    def _check_ids(self, ids: Iterable[int]) -> list[int]:
        try:
            ids = [operator.index(i) for i in ids]
        except TypeError:
            raise TokenizerError("token ids must be integers") from None
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary (0 .. {self.vocab_size - 1})")
        return ids

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry for id i, as the tokenizer file writes it."""
        raise NotImplementedError

    def pieces(self, ids: Iterable[int]) -> list[str]:
        return [self.id_to_piece(i) for i in self._check_ids(ids)]

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        raise NotImplementedError

    def _decode_bytes(self, ids: Sequence[int], at_start: bool = True) -> bytes:
        raise NotImplementedError


class StreamDecoder:
    """Turns ids into text as they arrive, never emitting half of a UTF-8 character.

    Bytes that end in an incomplete character are held back until the next id completes it; text already
    emitted is never taken back, and the pieces joined equal decode() of all ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending = b""
        self.at_start = True  # only special tokens so far? (SentencePiece's leading-space rule needs it)

    def push(self, token_id: int) -> str:
        self.pending += self.tokenizer.decode_bytes([token_id], at_start=self.at_start)
        self.at_start = self.at_start and token_id in self.tokenizer.special_ids
        cut = _complete_prefix_length(self.pending)
        text, self.pending = self.pending[:cut].decode("utf-8", errors="replace"), self.pending[cut:]
        return text

    def flush(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text


def _complete_prefix_length(data: bytes) -> int:
    """Length of the longest prefix of data that does not end inside a UTF-8 character."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if byte >= 0xC0:  # lead byte: how long should its character be?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return n if back >= need else n - back
        return n  # ASCII: complete
    return n  # only continuation bytes (invalid UTF-8): nothing to wait for


# ---- byte-level BPE from GGUF metadata (GPT-2 style, e.g. SmolLM2) ------------------------------------

# tokenizer.ggml.pre -> how text is split before BPE, as the model's original tokenizer.json does it.
# "smollm": digits one by one, then GPT-2's byte-level regex (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM).
# "llama-bpe": Llama 3's pattern. "llama4": Llama 4's. "gpt-2"/"default": GPT-2's byte-level regex alone.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers as pt

    if pre == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
    if pre in ("gpt-2", "gpt2", "default"):
        return pt.ByteLevel(add_prefix_space=False)
    if pre in ("llama-bpe", "llama3"):
        return pt.Sequence([pt.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "llama4":  # llama.cpp's Llama 4 GGUF files: Meta's llama4 pattern (tokenizer_llama4)
        from .tokenizer_llama4 import LLAMA4_PATTERN
        return pt.Sequence([pt.Split(Regex(LLAMA4_PATTERN), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt-2, llama-bpe, llama4)")


class ByteLevelBPETokenizer(Tokenizer):
    """GPT-2 byte-level BPE built with the `tokenizers` library from a vocabulary and merges."""

    def __init__(self, tokens: list[str], merges: list[str], token_types: Optional[list[int]] = None,
                 pre: str = "gpt-2", bos_id=None, eos_id=None, add_bos: bool = False,
                 chat_template: Optional[str] = None, eot_ids: Iterable[int] = ()):
        from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models

        self._tokens = list(tokens)
        vocab = {tok: i for i, tok in enumerate(self._tokens)}
        if len(vocab) != len(self._tokens):
            raise TokenizerError("GGUF vocabulary has duplicate tokens")
        try:
            pairs = [tuple(m.split(" ", 1)) for m in merges]
            bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False)
        except Exception as e:
            raise TokenizerError(f"GGUF merges are malformed ({e})") from None
        tk = HFTokenizer(bpe)
        tk.pre_tokenizer = _pre_tokenizer(pre)
        tk.decoder = decoders.ByteLevel()
        # Control tokens (type 3) and user-defined ones (type 4) are matched whole, never split by BPE.
        types = token_types or [1] * len(self._tokens)
        self.special_ids = {i for i, t in enumerate(types) if t in (3, 4)}
        tk.add_special_tokens([AddedToken(self._tokens[i], special=True, normalized=False)
                               for i in sorted(self.special_ids)])
        self._tk = tk
        self.bos_id, self.eos_id, self.add_bos_default = bos_id, eos_id, add_bos
        self.chat_template = chat_template
        self.stop_ids = frozenset(i for i in [eos_id, *eot_ids] if i is not None)
        self._byte_decoder = _gpt2_byte_decoder()

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        self._tk.encode_special_tokens = not allow_special
        return self._tk.encode(text, add_special_tokens=False).ids

    def _decode_bytes(self, ids: Sequence[int], at_start: bool = True) -> bytes:
        out = bytearray()
        for i in ids:
            piece = self._tokens[i]
            if i in self.special_ids:
                out += piece.encode("utf-8")
            else:
                out += bytes(self._byte_decoder[ch] for ch in piece)
        return bytes(out)

    def id_to_piece(self, i: int) -> str:
        return self._tokens[i]


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2 maps each byte to a printable character; this is the inverse map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _check_gguf_vocabulary(meta: dict, where: str) -> None:
    """The vocabulary arrays are lists of the right kind, and the per-token ones as long as the token list:
    a damaged file otherwise fails deep inside a tokenizer build, or silently drops token types."""
    def is_list_of(key, kinds):
        value = meta.get(key)
        return value is None or (isinstance(value, list)
                                 and all(isinstance(v, kinds) and not isinstance(v, bool) for v in value))

    for key, kinds, what in (("tokenizer.ggml.tokens", str, "strings"), ("tokenizer.ggml.merges", str, "strings"),
                             ("tokenizer.ggml.token_type", int, "integers"),
                             ("tokenizer.ggml.scores", (int, float), "numbers")):
        if not is_list_of(key, kinds):
            raise TokenizerError(f"{where}: {key} must be an array of {what}")
    n = len(meta["tokenizer.ggml.tokens"])
    for key, what in (("tokenizer.ggml.token_type", "token types"), ("tokenizer.ggml.scores", "scores")):
        if key in meta and len(meta[key]) != n:
            raise TokenizerError(f"{where}: {n} tokens but {len(meta[key])} {what} ({key})")
    for key in sorted(k for k in meta if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")):
        value = meta[key]
        # An id past the vocabulary would stop generation never (eos) or fail in the model (bos).
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < n:
            raise TokenizerError(f"{where}: {key} = {value!r} is not a token id of this vocabulary (0 .. {n - 1})")


def tokenizer_from_gguf(meta: dict, where: str = "GGUF") -> Tokenizer:
    """The tokenizer embedded in a GGUF file's metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{where}: no embedded tokenizer (tokenizer.ggml.model/tokens missing)")
    _check_gguf_vocabulary(meta, where)
    if kind == "gpt2":
        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError(f"{where}: gpt2 tokenizer without tokenizer.ggml.merges")
        eot = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        try:
            return ByteLevelBPETokenizer(
                tokens, merges, meta.get("tokenizer.ggml.token_type"),
                pre=meta.get("tokenizer.ggml.pre", "gpt-2"),
                bos_id=meta.get("tokenizer.ggml.bos_token_id"), eos_id=meta.get("tokenizer.ggml.eos_token_id"),
                add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                chat_template=meta.get("tokenizer.chat_template"), eot_ids=eot)
        except TokenizerError as e:
            raise TokenizerError(f"{where}: {e}") from None
    if kind == "llama":
        from .tokenizer_sp import tokenizer_from_gguf_llama

        return tokenizer_from_gguf_llama(meta, where)
    raise TokenizerError(f"{where}: GGUF tokenizer model {kind!r} is not supported (llama, gpt2)")


# ---- Hugging Face tokenizer.json --------------------------------------------------------------------------

class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, run by the `tokenizers` library; BOS/EOS and the chat template come
    from `tokenizer_config.json`, extra stop ids from `generation_config.json`."""

    def __init__(self, path: "str | Path", config: Optional[dict] = None, generation_config: Optional[dict] = None):
        from tokenizers import Tokenizer as RustTokenizer

        self.where = str(path)
        try:
            self._tk = RustTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception with serde's message
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
        config = config or {}
        self.bos_id = self._token_id(config.get("bos_token"))
        self.eos_id = self._token_id(config.get("eos_token"))
        # Whether BOS is added by default: tokenizer_config.json says so, else the post-processor shows it.
        if "add_bos_token" in config:
            self.add_bos_default = bool(config["add_bos_token"]) and self.bos_id is not None
        else:
            probe = self._tk.encode("", add_special_tokens=True).ids
            self.add_bos_default = self.bos_id is not None and probe[:1] == [self.bos_id]
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template
        self.special_ids = {i for i, t in self._tk.get_added_tokens_decoder().items() if t.special}
        stops = [self.eos_id]
        eos_cfg = (generation_config or {}).get("eos_token_id")
        stops += eos_cfg if isinstance(eos_cfg, list) else [eos_cfg]
        stops += [self._tk.token_to_id(t) for t in ("<|eot_id|>", "<|eom_id|>", "<|im_end|>")]
        self.stop_ids = frozenset(int(i) for i in stops if i is not None)

    def _token_id(self, token) -> Optional[int]:
        if isinstance(token, dict):  # {"content": "<s>", "lstrip": false, ...}
            token = token.get("content")
        if token is None:
            return None
        i = self._tk.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{self.where}: special token {token!r} is not in the vocabulary")
        return i

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tk.id_to_token(i)

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        # encode_special_tokens=True makes tokenizers treat special-token text as ordinary text.
        self._tk.encode_special_tokens = not allow_special
        return self._tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode(self._check_ids(ids), skip_special_tokens=False)

    def _decode_bytes(self, ids: Sequence[int], at_start: bool = True) -> bytes:
        return self._tk.decode(list(ids), skip_special_tokens=False).encode("utf-8")

    def stream_decoder(self) -> "TextStreamDecoder":
        # tokenizer.json decoders work on text, not bytes; stream by re-decoding a short window instead.
        return TextStreamDecoder(self)


class TextStreamDecoder:
    """Streaming for tokenizers that only decode to text: re-decode the ids since the last safe point and
    emit what is new, holding back while the text ends in U+FFFD (an incomplete byte sequence)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # decoding starts here, so leading-space rules see the same context twice
        self.read_offset = 0  # text of ids[prefix_offset:read_offset] has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""

    def flush(self) -> str:
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        text = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix):]


# ---- finding the tokenizer of a checkpoint -----------------------------------------------------------------

def _read_json(path: Path) -> dict:
    from ..model.config import _read_json as read_json  # the one JSON reader, here raising TokenizerError
    return read_json(path, TokenizerError)


def is_tiktoken_file(path: "str | Path") -> bool:
    """Meta's Llama 3 tokenizer.model is text ("<base64> <rank>" lines); SentencePiece's is a protobuf."""
    with open(path, "rb") as f:
        head = f.read(256)
    first = head.split(b"\n", 1)[0]
    parts = first.split(b" ")
    return len(parts) == 2 and parts[1].strip().isdigit() and all(
        c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=" for c in parts[0])


def tokenizer_from_file(path: "str | Path", llama3_version: Optional[str] = None) -> Tokenizer:
    """A tokenizer.model (SentencePiece or tiktoken), a tokenizer.json, or a GGUF file's embedded vocab."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: file not found")
    if path.suffix == ".json":
        parent = path.parent
        config = _read_json(parent / "tokenizer_config.json") if (parent / "tokenizer_config.json").is_file() else {}
        gen = (_read_json(parent / "generation_config.json")
               if (parent / "generation_config.json").is_file() else {})
        return HFTokenizer(path, config, gen)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from ..weights.gguf import gguf_metadata, open_gguf

        return tokenizer_from_gguf(gguf_metadata(open_gguf(path)), where=str(path))
    if is_tiktoken_file(path):
        from .tokenizer_llama4 import Llama4Tokenizer, is_llama4_ranks
        from .tokenizer_tiktoken import Llama3Tokenizer, load_tiktoken_ranks

        ranks = load_tiktoken_ranks(path)
        if llama3_version == "4" or (llama3_version is None and is_llama4_ranks(ranks)):  # Llama 4's 200000
            return Llama4Tokenizer(ranks, where=str(path))
        return Llama3Tokenizer(ranks, version=llama3_version or "3.1", where=str(path))
    from .tokenizer_sp import SentencePieceTokenizer

    return SentencePieceTokenizer.from_file(path)


def tokenizer_from_dir(path: "str | Path") -> Tokenizer:
    """The tokenizer of a checkpoint directory: tokenizer.json (+ tokenizer_config.json) if present, else
    tokenizer.model (SentencePiece for Llama 1/2/Code Llama, tiktoken for Llama 3.x)."""
    path = Path(path)
    if (path / "tokenizer.json").is_file():
        return tokenizer_from_file(path / "tokenizer.json")
    model = path / "tokenizer.model"
    if not model.is_file():
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model")
    version = None
    if (path / "params.json").is_file():
        # Llama 3.0's params.json has no use_scaled_rope; 3.1 and later set it. The special-token names
        # (not ids) of 3.0 differ from 3.1's.
        from ..model.llama4_config import is_llama4_params

        params = _read_json(path / "params.json")
        version = "4" if is_llama4_params(params) else "3.1" if "use_scaled_rope" in params else "3.0"
    return tokenizer_from_file(model, llama3_version=version)


def check_vocab_size(tokenizer: Tokenizer, n_embeddings: int, where: str) -> None:
    """A tokenizer with more ids than the model has embeddings would index past the table."""
    if tokenizer.vocab_size > n_embeddings:
        raise TokenizerError(f"{where}: tokenizer has {tokenizer.vocab_size} tokens but the model config "
                             f"has vocab_size {n_embeddings}")


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    """Render a jinja chat template (from tokenizer_config.json or GGUF metadata) in a sandbox bounded in
    time and in the size of what it builds (llama_ref.text.template)."""
    from jinja2.exceptions import TemplateError

    from .template import TemplateStopped, render_template

    try:
        return render_template(template, dict(messages=messages, add_generation_prompt=add_generation_prompt,
                                              **extra))
    except TemplateStopped as e:
        raise TokenizerError(f"chat template stopped: {e}") from None
    except RecursionError:
        raise TokenizerError("chat template stopped: it recursed too deeply") from None
    except MemoryError:
        raise TokenizerError("chat template stopped: it ran out of memory") from None
    except (TemplateError, TypeError, ValueError, LookupError, AttributeError, ArithmeticError) as e:
        # a template bug or messages the template does not expect: one line naming the template's complaint
        raise TokenizerError(f"chat template failed: {type(e).__name__}: {e}") from None


def __getattr__(name):
    # The SentencePiece and tiktoken classes live in their own modules (which import this one); they are
    # re-exported here lazily so `from llama_ref.text.tokenizer import SentencePieceTokenizer` works.
    if name in ("SentencePieceTokenizer", "model_proto_from_gguf"):
        from . import tokenizer_sp

        return getattr(tokenizer_sp, name)
    if name in ("Llama3Tokenizer", "load_tiktoken_ranks"):
        from . import tokenizer_tiktoken

        return getattr(tokenizer_tiktoken, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def tokenizer_from_path(path_or_name: "str | Path", progress: bool = False) -> Tokenizer:
    """The tokenizer of a checkpoint directory, a tokenizer/GGUF file, or a fetchable name (fetched on
    first use, with a progress bar on stderr if progress)."""
    from ..weights.fetch import MODELS, fetch

    path = Path(path_or_name).expanduser()
    if not path.exists():
        if str(path_or_name).lower() in MODELS:
            path = fetch(str(path_or_name), progress=progress)
        else:
            raise TokenizerError(f"{path_or_name}: no such file or directory, and not a known name "
                                 f"({', '.join(sorted(MODELS))})")
    return tokenizer_from_dir(path) if path.is_dir() else tokenizer_from_file(path)
