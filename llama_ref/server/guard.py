"""Llama Guard as a shield: judge a conversation's last message, as Llama Stack's input/output shields do.

A guard is any object with `check(messages) -> llama_ref.text.chat.GuardVerdict`. LlamaGuard runs a loaded
model on Meta's Llama Guard 3 prompt (llama_ref.text.chat.llama_guard_tokens) and parses its verdict. A model
whose tokenizer has no Llama 3 special tokens gets the same classification request as one user message in
its own chat format. A reply that is not a verdict is reported as such (GuardError), never read as "safe".
"""

from __future__ import annotations

from ..text.chat import (LLAMA_GUARD_3_CATEGORIES, GuardVerdict, chat_tokens, llama_guard_text, llama_guard_tokens,
                    parse_llama_guard)
from ..errors import LlamaRefError
from ..errors import InputError

# Llama Guard 3's categories S1-S14 as the OpenAI moderation categories they fall under (None: no OpenAI
# category covers it; it is still reported under its Llama Guard name).
OPENAI_CATEGORIES = {
    "S1": ["violence"], "S2": ["illicit"], "S3": ["sexual"], "S4": ["sexual/minors", "sexual"],
    "S5": [], "S6": [], "S7": [], "S8": [], "S9": ["illicit/violent", "violence"], "S10": ["hate"],
    "S11": ["self-harm"], "S12": ["sexual"], "S13": [], "S14": ["illicit"],
}
OPENAI_NAMES = ["harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
                "violence/graphic"]


class GuardError(LlamaRefError):
    """The guard model answered something that is not a Llama Guard verdict."""


def category_name(code: str) -> str:
    """'S1' -> 'Violent Crimes'."""
    return LLAMA_GUARD_3_CATEGORIES[int(code[1:]) - 1].name.strip().rstrip(".")


class LlamaGuard:
    """A Llama Guard model as a shield. Not thread-safe: the server runs check() on its model thread."""

    def __init__(self, model, max_new_tokens: int = 10):
        if model.tokenizer is None:
            raise InputError("the guard model has no tokenizer")
        self.model, self.max_new_tokens = model, max_new_tokens

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        try:
            return llama_guard_tokens(self.model.tokenizer, messages)
        except InputError as e:
            if "not a Llama 3 tokenizer" not in str(e):
                raise
        request = llama_guard_text(messages).strip()
        return chat_tokens(self.model.tokenizer, [{"role": "user", "content": request}])

    def check(self, messages: list[dict]) -> GuardVerdict:
        messages = [{"role": m["role"], "content": m.get("content") or ""} for m in messages
                    if m.get("role") in ("user", "assistant")]
        g = self.model.generate(self.prompt_ids(messages), max_new_tokens=self.max_new_tokens)
        try:
            return parse_llama_guard(g.text)
        except InputError:
            raise GuardError(f"the guard model's reply is not a Llama Guard verdict: {g.text[:80]!r}") from None


def moderation_result(verdict: GuardVerdict) -> dict:
    """One entry of a /v1/moderations response's `results`."""
    flagged = {name for code in verdict.categories for name in OPENAI_CATEGORIES[code]}
    return {
        "flagged": not verdict.safe,
        "categories": {name: name in flagged for name in OPENAI_NAMES},
        "category_scores": {name: float(name in flagged) for name in OPENAI_NAMES},
        "category_applied_input_types": {name: ["text"] for name in OPENAI_NAMES if name in flagged},
        # Llama Guard's own answer, which the OpenAI categories only approximate.
        "llama_guard_categories": {code: category_name(code) for code in verdict.categories},
    }


def refusal_text(verdict: GuardVerdict, where: str) -> str:
    names = ", ".join(f"{c} ({category_name(c)})" for c in verdict.categories) or "unsafe"
    return f"I can't help with that: the {where} was refused by the safety guard, category {names}."
