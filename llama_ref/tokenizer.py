"""Tokenizers: one interface over every vocabulary a Llama model ships with.

The heavy lifting is done by the libraries that define each format (`tokenizers` for byte-level BPE,
`sentencepiece`, `tiktoken`); this module only builds them from the model's files and gives them one face:
encode(text, bos, eos, allow_special), decode(ids), an incremental decoder, and the bos/eos/stop ids.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence


class TokenizerError(ValueError):
    """A tokenizer file is damaged, or ids/text cannot be handled."""


class Tokenizer:
    """Base interface. Subclasses implement _encode(text, allow_special) and _decode_bytes(ids)."""

    bos_id: Optional[int] = None
    eos_id: Optional[int] = None
    stop_ids: frozenset = frozenset()
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
        """Text of `ids`; special tokens are rendered as their text."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary (0 .. {self.vocab_size - 1})")
        return self._decode_bytes(ids)

    def stream_decoder(self) -> "StreamDecoder":
        return StreamDecoder(self)

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        raise NotImplementedError

    def _decode_bytes(self, ids: Sequence[int]) -> bytes:
        raise NotImplementedError


class StreamDecoder:
    """Turns ids into text as they arrive, never emitting half of a UTF-8 character.

    Bytes that end in an incomplete character are held back until the next id completes it; text already
    emitted is never taken back, and the pieces joined equal decode() of all ids.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending = b""

    def push(self, token_id: int) -> str:
        self.pending += self.tokenizer.decode_bytes([token_id])
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
# "llama-bpe": Llama 3's pattern. "gpt-2"/"default": GPT-2's byte-level regex alone.
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
    raise TokenizerError(f"GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt-2, llama-bpe)")


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

    def _decode_bytes(self, ids: Sequence[int]) -> bytes:
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


def tokenizer_from_gguf(meta: dict, where: str = "GGUF") -> Tokenizer:
    """The tokenizer embedded in a GGUF file's metadata."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{where}: no embedded tokenizer (tokenizer.ggml.model/tokens missing)")
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
    raise TokenizerError(f"{where}: GGUF tokenizer model {kind!r} is not supported yet")


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    """Render a jinja chat template (from tokenizer_config.json or GGUF metadata) in a sandbox."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    # The same environment settings as transformers' apply_chat_template, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **extra)
    except TemplateError as e:
        raise TokenizerError(f"chat template failed: {e}") from None
