"""Llama 4's tokenizer and chat format (Meta's llama-models, llama4/tokenizer.py and llama4/chat_format.py).

The tokenizer is tiktoken BPE like Llama 3's, with 200000 ranks (Meta's tokenizer.model, fetchable as
"llama4-tokenizer"), the o200k-style pattern below, and 2048 special tokens from id 200000: the named ones
of BASIC + LLAMA4 below in Meta's order, then <|reserved_special_token_0..903|>: 202048 ids, the models'
vocab_size.

A chat is <|begin_of_text|>, then each message as <|header_start|>role<|header_end|>\\n\\n, its content (an
assistant's tool calls written after it as Llama 3 writes them), and <|eot|>; or <|eom|> after a tool result
(role "tool", written "ipython") and after an assistant message that calls a tool or stops for one. The
prompt ends with the assistant header. Images are not supported (text only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .chat import InputError, _check_messages, _json_call, encode_tool_call
from .tokenizer import Tokenizer
from .tokenizer_tiktoken import Llama3Tokenizer, load_tiktoken_ranks

# The pre-tokenizer pattern of Meta's llama4 Tokenizer (O200K_PATTERN).
LLAMA4_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_RESERVED_SPECIAL_TOKENS = 2048
N_BASE_TOKENS = 200000

BASIC = ["<|begin_of_text|>", "<|end_of_text|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"]
TEXT_POST_TRAIN = (["<|header_start|>", "<|header_end|>", "<|eom|>", "<|eot|>", "<|step|>"]
                   + [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(6)]
                   + ["<|python_start|>", "<|python_end|>", "<|finetune_right_pad|>"]
                   + [f"<|text_post_train_reserved_special_token_{i}|>" for i in range(8, 69)])
VISION = (["<|image_start|>", "<|image_end|>", "<|vision_reserved_special_token_0|>",
           "<|vision_reserved_special_token_1|>", "<|tile_x_separator|>", "<|tile_y_separator|>"]
          + [f"<|vision_reserved_special_token_{i}|>" for i in range(2, 6)]
          + ["<|image|>", "<|vision_reserved_special_token_6|>", "<|patch|>"]
          + [f"<|vision_reserved_special_token_{i}|>" for i in range(7, 1048)])
REASONING = ([f"<|reasoning_reserved_special_token_{i}|>" for i in range(8)]
             + ["<|reasoning_thinking_start|>", "<|reasoning_thinking_end|>"])
NAMED = BASIC + TEXT_POST_TRAIN + VISION + REASONING
SPECIAL_TOKENS = NAMED + [f"<|reserved_special_token_{i}|>" for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(NAMED))]


class Llama4Tokenizer(Llama3Tokenizer):
    """tiktoken BPE with Llama 4's pattern and special tokens; encoding and decoding as Llama 3's."""

    def __init__(self, ranks: dict, where: str = "tokenizer.model", chat_template: Optional[str] = None):
        import tiktoken

        n_base = len(ranks)
        self.special_tokens = {name: n_base + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=Path(where).name, pat_str=LLAMA4_PATTERN, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.where, self.version = where, "4"
        self.n_words = n_base + len(SPECIAL_TOKENS)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot|>"]
        self.eom_id = self.special_tokens["<|eom|>"]
        self.python_tag_id = self.special_tokens["<|python_start|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad|>"]
        self.stop_ids = frozenset((self.eos_id, self.eom_id, self.eot_id))
        self.special_ids = set(self.special_tokens.values())
        self.add_bos_default = True
        self.chat_template = chat_template
        self._id_to_name = {i: name for name, i in self.special_tokens.items()}

    @classmethod
    def from_file(cls, path: "str | Path", **kw) -> "Llama4Tokenizer":
        return cls(load_tiktoken_ranks(path), where=str(path), **kw)


def is_llama4_ranks(ranks: dict) -> bool:
    """Meta's Llama 4 tokenizer.model has 200000 ranks (Llama 3's: 128000)."""
    return len(ranks) == N_BASE_TOKENS


# ---- chat format -------------------------------------------------------------------------------------------

def _special(tokenizer: Tokenizer, name: str) -> int:
    ids = getattr(tokenizer, "special_tokens", None)
    if ids is None or name not in ids:
        raise InputError(f"the tokenizer has no {name} token: not a Llama 4 tokenizer")
    return ids[name]


def llama4_header_tokens(tokenizer: Tokenizer, role: str) -> list[int]:
    """<|header_start|>{role}<|header_end|>\\n\\n; the "tool" role is written "ipython"."""
    return ([_special(tokenizer, "<|header_start|>")]
            + tokenizer.encode("ipython" if role == "tool" else role, bos=False)
            + [_special(tokenizer, "<|header_end|>")] + tokenizer.encode("\n\n", bos=False))


def llama4_message_tokens(tokenizer: Tokenizer, message: dict, tool_prompt_format: str = "json") -> list[int]:
    """One message: header, content (a user message's RAG `context` after a blank line), tool calls, end."""
    role = message["role"]
    if role not in ("system", "user", "assistant", "ipython", "tool"):
        raise InputError(f"Llama 4 roles are system, user, assistant, tool (ipython); got {role!r}")
    ids = llama4_header_tokens(tokenizer, role)
    ids += tokenizer.encode(message.get("content") or "", bos=False)
    if role == "user" and message.get("context") is not None:
        ids += tokenizer.encode("\n\n", bos=False) + tokenizer.encode(message["context"], bos=False)
    calls = message.get("tool_calls") or [] if role == "assistant" else []
    for call in calls:
        ids += tokenizer.encode(encode_tool_call(call, tool_prompt_format), bos=False)
    # <|eom|>: the model waits for a tool (an assistant that calls one or stops for one, a tool's result).
    eom = role in ("tool", "ipython") or (role == "assistant" and (
        bool(calls) or message.get("stop_reason") == "end_of_message"))
    ids.append(_special(tokenizer, "<|eom|>" if eom else "<|eot|>"))
    return ids


def llama4_chat_tokens(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                       tool_prompt_format: str = "json") -> list[int]:
    """<|begin_of_text|>, each message, then the assistant header the model completes (encode_dialog_prompt)."""
    _check_messages(messages)
    ids = [_special(tokenizer, "<|begin_of_text|>")]
    for m in messages:
        ids += llama4_message_tokens(tokenizer, m, tool_prompt_format)
    if add_generation_prompt:
        ids += llama4_header_tokens(tokenizer, "assistant")
    return ids


BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")


def parse_llama4_reply(text: str) -> dict:
    """An assistant message from the model's output text, as Meta's decode_assistant_message_from_content
    reads it: header, <|python_start|> .. <|python_end|> and the end token stripped; tool calls recognised."""
    from .chat import BUILTIN_CALL, CUSTOM_CALL

    content = text.strip(" ").removeprefix("<|header_start|>assistant<|header_end|>\n\n")
    ipython = content.startswith("<|python_start|>")
    if ipython:
        content = content.removeprefix("<|python_start|>").replace("<|python_end|>", "")
    stop_reason = "out_of_tokens"
    if content.endswith("<|eot|>"):
        content, stop_reason = content[:-len("<|eot|>")], "end_of_turn"
    elif content.endswith("<|eom|>"):
        content, stop_reason = content[:-len("<|eom|>")], "end_of_message"
    call = None
    custom, builtin = CUSTOM_CALL.search(content), BUILTIN_CALL.search(content)
    if custom:
        try:
            call = {"tool_name": custom.group("function_name"),
                    "arguments": json.loads(custom.group("args").replace("'", '"'))}
        except ValueError:
            call = None
    elif _json_call(content) is not None:
        call = _json_call(content)
    elif _python_list_call(content) is not None:
        call = _python_list_call(content)
    if call is not None and call["tool_name"] in BUILTIN_TOOLS and call["arguments"]:
        # A built-in tool called in the custom format: Meta keeps its first argument as the query.
        call = {"tool_name": call["tool_name"], "arguments": {"query": next(iter(call["arguments"].values()))}}
    elif call is None and builtin:
        call = {"tool_name": builtin.group("tool_name"), "arguments": {"query": builtin.group("query")}}
    elif call is None and ipython:
        call = {"tool_name": "code_interpreter", "arguments": {"code": content}}
    if call is not None:
        return {"role": "assistant", "content": "", "stop_reason": stop_reason, "tool_calls": [call]}
    return {"role": "assistant", "content": content, "stop_reason": stop_reason, "tool_calls": []}


def _python_list_call(content: str) -> "dict | None":
    """The first call of a pythonic tool-call list, `[name(key=value, ...), ...]` (Llama 4's documented
    format; Meta's ToolUtils.is_valid_python_list / parse_python_list_for_function_calls): every element a call
    of a plain name with keyword arguments only, each value a Python literal. None for anything else."""
    import ast

    try:
        tree = ast.parse(content)
        if (len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr)
                or not isinstance(tree.body[0].value, ast.List)):
            return None
        calls = tree.body[0].value.elts
        if not calls or not all(isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and not c.args
                                and all(k.arg is not None for k in c.keywords) for c in calls):
            return None
        first = calls[0]
        return {"tool_name": first.func.id, "arguments": {k.arg: ast.literal_eval(k.value) for k in first.keywords}}
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):  # not a literal, or not Python
        return None
