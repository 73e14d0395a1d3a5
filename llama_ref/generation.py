"""Token generation on top of Transformer.forward: prefill the prompt, then decode one token at a time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np

from .model import InputError, Transformer


@dataclass
class Generation:
    text: str
    ids: list[int]
    finish_reason: str  # "stop" (a stop id or string), "length" (max_new_tokens or the context window)
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


def sample_next(logits: np.ndarray, temperature: float = 0.0, rng: Optional[np.random.Generator] = None) -> int:
    """Greedy at temperature 0, else a draw from softmax(logits / temperature)."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    return int((rng or np.random.default_rng()).choice(p.size, p=p))


def generate_ids(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: Optional[int] = None,
                 stop_ids: Optional[set] = None) -> Iterator[tuple[int, float]]:
    """Yield (token id, its log-probability) for each generated token."""
    prompt_ids = list(prompt_ids)
    if not prompt_ids:
        raise InputError("the prompt is empty: give at least one token")
    if len(prompt_ids) >= model.args.max_seq_len:
        raise InputError(f"the prompt has {len(prompt_ids)} tokens; the context window is {model.args.max_seq_len}")
    rng = np.random.default_rng(seed)
    stop_ids = set(stop_ids or ())
    logits = model.forward(prompt_ids, 0, last_only=True)[-1]  # (V,)
    pos = len(prompt_ids)
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, rng)
        z = logits.astype(np.float64)
        logprob = float(z[token] - z.max() - np.log(np.exp(z - z.max()).sum()))
        yield token, logprob
        if token in stop_ids or pos >= model.args.max_seq_len:
            return
        logits = model.forward([token], pos, last_only=True)[-1]
        pos += 1
