"""SentencePiece tokenizers: Llama 1, Llama 2 and Code Llama.

Encoding is done by the `sentencepiece` library itself (BPE over pieces ranked by score, byte fallback,
the dummy-prefix space). A GGUF `llama` vocabulary (tokens, scores, token types) is turned back into the
SentencePiece model it came from, so GGUF files and `tokenizer.model` files share one code path.
Decoding walks the pieces here (rather than calling `sp.decode`) so a stream can be decoded byte by byte;
the rules are sentencepiece's, and tests check them against it.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Iterable, Optional, Sequence

from .tokenizer import Tokenizer, TokenizerError

# SentencePiece piece types (sentencepiece_model.proto, SentencePiece.Type); GGUF token_type uses the same
# numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁": how SentencePiece writes a space inside a piece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, as Meta's Llama 1/2 and Code Llama `Tokenizer` classes use it."""

    def __init__(self, model_proto: bytes, where: str = "tokenizer.model", chat_template: Optional[str] = None,
                 add_bos: bool = True, eot_ids: Iterable[int] = ()):
        import sentencepiece as spm

        self.where = where
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a terse message
            raise TokenizerError(f"{where}: not a valid SentencePiece model ({e})") from None
        n = self.sp.get_piece_size()
        if n == 0:
            raise TokenizerError(f"{where}: SentencePiece model has no pieces")
        self._pieces = [self.sp.id_to_piece(i) for i in range(n)]
        self._control = [self.sp.is_control(i) for i in range(n)]
        self._unknown = [self.sp.is_unknown(i) for i in range(n)]
        self._byte = [self.sp.is_byte(i) for i in range(n)]
        # Meta's Llama 2 tokenizer: bos/eos from the model; -1 means "none".
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.add_bos_default = add_bos
        self.chat_template = chat_template
        self.special_ids = {i for i in range(n) if self._control[i]}
        # Code Llama's infilling pieces (Meta's codellama/tokenizer.py looks them up the same way).
        self.prefix_id = self._piece_id(SPACE + "<PRE>")
        self.middle_id = self._piece_id(SPACE + "<MID>")
        self.suffix_id = self._piece_id(SPACE + "<SUF>")
        self.eot_id = self._piece_id(SPACE + "<EOT>")
        self.stop_ids = frozenset(i for i in [self.eos_id, self.eot_id, *eot_ids] if i is not None)
        self._unk_surface = " \u2047 "  # sentencepiece's default rendering of an unknown piece

    @classmethod
    def from_file(cls, path: "str | Path", **kw) -> "SentencePieceTokenizer":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None
        return cls(data, where=str(path), **kw)

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def _piece_id(self, piece: str) -> Optional[int]:
        i = self.sp.piece_to_id(piece)
        return i if self._pieces[i] == piece else None  # piece_to_id answers unk_id for unknown pieces

    def id_to_piece(self, i: int) -> str:
        return self._pieces[i]

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        if not allow_special:
            # Meta's Llama 2 code: sp_model.encode(s); "<s>" in the text is ordinary text.
            return self.sp.encode(text)
        # With special tokens allowed, control pieces written in the text become their ids and the text
        # between them is encoded on its own (as Hugging Face's Llama tokenizer does).
        ids: list[int] = []
        for part, special in _split_on(text, {self._pieces[i]: i for i in sorted(self.special_ids)}):
            ids += [special] if special is not None else self.sp.encode(part) if part else []
        return ids

    def encode_infilling(self, text: str) -> list[int]:
        """Ids of text with no dummy-prefix space (Meta's Code Llama: encode("☺" + s) minus the "☺")."""
        marker = self.sp.encode("\u263a")
        ids = self.sp.encode("\u263a" + text)
        if ids[:len(marker)] != marker:
            raise TokenizerError(f"{self.where}: cannot encode {text[:20]!r} without a leading space")
        return ids[len(marker):]

    def _decode_bytes(self, ids: Sequence[int], at_start: bool = True) -> bytes:
        # sentencepiece's rules: control pieces are invisible; byte pieces are raw bytes; "▁" is a space;
        # the first visible piece of a text loses one leading "▁" (the dummy prefix encode added).
        out = bytearray()
        first = at_start
        for i in ids:
            if self._control[i]:
                continue
            if self._byte[i]:
                out.append(int(self._pieces[i][3:5], 16))  # "<0xAB>"
            elif self._unknown[i]:
                out += self._unk_surface.encode("utf-8")
            else:
                piece = self._pieces[i]
                if first and piece.startswith(SPACE):
                    piece = piece[1:]
                out += piece.replace(SPACE, " ").encode("utf-8")
            first = False
        return bytes(out)


def _split_on(text: str, specials: dict) -> list:
    """[(text, None) | ("", id)]: text cut at every occurrence of a special token's text, longest first."""
    if not specials:
        return [(text, None)]
    import re

    pattern = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    parts, pos = [], 0
    for m in pattern.finditer(text):
        parts.append((text[pos:m.start()], None))
        parts.append(("", specials[m.group()]))
        pos = m.end()
    parts.append((text[pos:], None))
    return parts


# ---- GGUF `llama` vocabulary -> SentencePiece model ------------------------------------------------------

def model_proto_from_gguf(meta: dict, where: str = "GGUF") -> bytes:
    """Serialise a SentencePiece ModelProto from GGUF tokenizer metadata (tokens, scores, token types).

    The fields written are the ones the Llama models' own tokenizer.model sets: BPE, byte fallback, an
    identity normaliser (no NFKC), the dummy-prefix space, no collapsing of whitespace runs.
    """
    tokens = meta["tokenizer.ggml.tokens"]
    scores = meta.get("tokenizer.ggml.scores")
    types = meta.get("tokenizer.ggml.token_type")
    n = len(tokens)
    if scores is None or types is None:
        raise TokenizerError(f"{where}: llama tokenizer needs tokenizer.ggml.scores and tokenizer.ggml.token_type")
    if len(scores) != n or len(types) != n:
        raise TokenizerError(f"{where}: {n} tokens but {len(scores)} scores and {len(types)} token types")
    if sum(1 for t in types if t == UNKNOWN) != 1:
        raise TokenizerError(f"{where}: a SentencePiece vocabulary needs exactly one unknown token")

    def special(key):
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < n else None

    pieces = b"".join(_field_bytes(1, _field_bytes(1, t.encode("utf-8")) + _field_float(2, s)
                                  + _field_varint(3, ty if ty in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED,
                                                                  UNUSED, BYTE) else NORMAL))
                      for t, s, ty in zip(tokens, scores, types))
    trainer = _field_varint(3, 2)  # model_type = BPE
    trainer += _field_varint(4, n)  # vocab_size
    trainer += _field_varint(35, 1 if BYTE in types else 0)  # byte_fallback
    # bos/eos/pad pieces are looked up by name; unknown and absent ones are switched off with "".
    unk = tokens[types.index(UNKNOWN)]
    trainer += _field_varint(40, types.index(UNKNOWN))
    for field, key in ((46, "tokenizer.ggml.bos_token_id"), (47, "tokenizer.ggml.eos_token_id"),
                       (48, "tokenizer.ggml.padding_token_id")):
        name = special(key)
        trainer += _field_bytes(field, (name or "").encode("utf-8"))
    trainer += _field_bytes(45, unk.encode("utf-8"))
    add_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer = (_field_bytes(1, b"identity") + _field_varint(3, int(add_space)) + _field_varint(4, 0)
                  + _field_varint(5, 1))
    return pieces + _field_bytes(2, trainer) + _field_bytes(3, normalizer)


_ONE_BYTE = [bytes((v,)) for v in range(0x80)]  # the varints of 0 .. 127: most of a vocabulary's fields
_F32 = struct.Struct("<f").pack


def _varint(v: int) -> bytes:
    if 0 <= v < 0x80:
        return _ONE_BYTE[v]
    v &= (1 << 64) - 1  # negative int32 values are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _field_varint(field: int, v: int) -> bytes:
    return _varint(field << 3 | 0) + _varint(v)


def _field_float(field: int, v: float) -> bytes:
    return _varint(field << 3 | 5) + _F32(v)


def _field_bytes(field: int, data: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def tokenizer_from_gguf_llama(meta: dict, where: str = "GGUF") -> SentencePieceTokenizer:
    eot = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    return SentencePieceTokenizer(model_proto_from_gguf(meta, where), where=where,
                                  chat_template=meta.get("tokenizer.chat_template"),
                                  add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)), eot_ids=eot)
