"""Llama 3, 3.1, 3.2: Meta's tiktoken-format `tokenizer.model`.

The file is plain text, one "<base64 bytes> <rank>" line per token. Meta's `llama/tokenizer.py` builds a
`tiktoken.Encoding` from it with the pattern and the 256 special tokens below; this does the same, so the ids
are tiktoken's own.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .tokenizer import LLAMA3_PATTERN, Tokenizer, TokenizerError

NUM_RESERVED_SPECIAL_TOKENS = 256

# Llama 3.1 and later (llama-models, models/llama3/tokenizer.py). Ids follow the base vocabulary: 128000 ...
SPECIAL_TOKENS_31 = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model waits for a tool's answer
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
]
SPECIAL_TOKENS_31 += [f"<|reserved_special_token_{2 + i}|>"
                      for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(SPECIAL_TOKENS_31))]

# Llama 3.0 (meta-llama/llama3, llama/tokenizer.py): the same ids for bos/eos/headers/eot, other names.
SPECIAL_TOKENS_30 = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(5, NUM_RESERVED_SPECIAL_TOKENS - 5)]

# Meta encodes long inputs in slices: tiktoken panics past ~400k characters, and runs of more than 25k
# whitespace or non-whitespace characters are cut (github.com/openai/tiktoken/issues/195).
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def load_tiktoken_ranks(path: "str | Path") -> dict:
    """{token bytes: rank} from a tiktoken-format file, with damage reported naming the file and line."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None
    ranks = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise TokenizerError(f"{path}: line {n} is not '<base64 token> <rank>' "
                                 f"(not a tiktoken tokenizer.model, or damaged)") from None
    if not ranks:
        raise TokenizerError(f"{path}: empty tokenizer file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise TokenizerError(f"{path}: token ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    return ranks


class Llama3Tokenizer(Tokenizer):
    """tiktoken BPE with Meta's pattern and the 256 Llama 3 special tokens."""

    def __init__(self, ranks: dict, version: str = "3.1", where: str = "tokenizer.model",
                 chat_template: Optional[str] = None):
        import tiktoken

        if version not in ("3.0", "3.1"):
            raise TokenizerError(f"Llama 3 special-token set {version!r} is unknown (3.0 or 3.1; 3.2 uses 3.1's)")
        names = SPECIAL_TOKENS_30 if version == "3.0" else SPECIAL_TOKENS_31
        n_base = len(ranks)
        self.special_tokens = {name: n_base + i for i, name in enumerate(names)}
        self.model = tiktoken.Encoding(name=Path(where).name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.where, self.version = where, version
        self.n_words = n_base + len(names)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens.get("<|eom_id|>")
        self.python_tag_id = self.special_tokens.get("<|python_tag|>")
        self.pad_id = self.special_tokens.get("<|finetune_right_pad_id|>")
        self.stop_ids = frozenset(i for i in (self.eos_id, self.eom_id, self.eot_id) if i is not None)
        self.special_ids = set(self.special_tokens.values())
        self.add_bos_default = True
        self.chat_template = chat_template
        self._id_to_name = {i: name for name, i in self.special_tokens.items()}

    @classmethod
    def from_file(cls, path: "str | Path", version: str = "3.1", **kw) -> "Llama3Tokenizer":
        return cls(load_tiktoken_ranks(path), version=version, where=str(path), **kw)

    @property
    def vocab_size(self) -> int:
        return self.n_words

    def id_to_piece(self, i: int) -> str:
        if i in self._id_to_name:
            return self._id_to_name[i]
        return self.model.decode_single_token_bytes(i).decode("utf-8", errors="backslashreplace")

    def _encode(self, text: str, allow_special: bool) -> list[int]:
        # Special-token text is ordinary text (disallowed_special=()) unless the caller allows it.
        allowed = "all" if allow_special else set()
        ids: list[int] = []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for part in _split_whitespaces_or_nonwhitespaces(text[i:i + TIKTOKEN_MAX_ENCODE_CHARS],
                                                             MAX_NO_WHITESPACES_CHARS):
                ids += self.model.encode(part, allowed_special=allowed, disallowed_special=())
        return ids

    def _decode_bytes(self, ids: Sequence[int], at_start: bool = True) -> bytes:
        return self.model.decode_bytes(list(ids))  # special tokens come out as their text, as in Meta's decode


def _split_whitespaces_or_nonwhitespaces(s: str, max_len: int) -> Iterator[str]:
    """Cut s so no piece holds more than max_len consecutive whitespace or non-whitespace characters."""
    run_len = 0
    run_is_space = s[0].isspace() if s else False
    start = 0
    for i in range(len(s)):
        is_space = s[i].isspace()
        if run_is_space ^ is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > max_len:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]
