"""Choosing the next token from logits: the controls people know from transformers and llama.cpp.

The steps run in transformers' order: repetition penalty, temperature, top-k, top-p, min-p, then one draw.
Every step works on float64 copies of the logits, and the draw is an inverse-CDF lookup of one uniform
number from a NumPy Generator, so the same seed picks the same token whatever backend computed the logits
(up to the logits themselves differing by more than the gap to a bucket edge, which is vanishingly rare).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. The defaults are greedy decoding with no filtering.

    temperature: 0 picks the most likely token (greedy); > 0 divides the logits before the softmax (one too
        small to divide by, see scale_by_temperature, is greedy too). All values must be finite.
    top_k: keep only the k most likely tokens (0 = off).
    top_p: keep the smallest set of most likely tokens whose probability adds up to at least top_p (1 = off).
    min_p: keep tokens at least min_p times as likely as the most likely one (0 = off).
    repetition_penalty: CTRL's penalty on tokens already in the context, > 1 discourages them (1 = off).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise InputError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):  # NaN passes no comparison and inf breaks the arithmetic below
                raise InputError(f"{name} must be a finite number, got {value!r}")
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_k", isinstance(self.top_k, (int, np.integer)) and not isinstance(self.top_k, bool)
             and self.top_k >= 0, "must be an integer >= 0"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise InputError(f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: np.ndarray, previous_ids: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL's penalty as transformers applies it: a seen token's logit is divided by `penalty` when
    positive and multiplied by it when negative, so it always moves down for penalty > 1. (V,) float64."""
    logits = np.array(logits, dtype=np.float64)
    if penalty == 1.0:
        return logits
    seen = np.unique(np.fromiter(previous_ids, dtype=np.int64))
    if seen.size:
        picked = logits[seen]
        logits[seen] = np.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def softmax(z: np.ndarray) -> np.ndarray:
    """exp(z) normalised, shifted by the maximum so nothing overflows. (V,) float64; -inf gives 0."""
    return _softmax_in_place(np.array(z, dtype=np.float64))


def _softmax_in_place(p: np.ndarray) -> np.ndarray:
    """softmax(p), written over p (float64): the sampler's own arrays. A sampled token's passes over V each made a
    fresh 393 KB array at V = 49152, and the pages of fresh arrays fault in anew (~0.1-0.2 ms each here)."""
    p -= p.max()
    np.exp(p, out=p)
    p /= p.sum()
    return p


def log_softmax(z: np.ndarray) -> np.ndarray:
    """log(softmax(z)) computed stably in float64, over the last axis."""
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def log_prob(z: np.ndarray, token: int) -> float:
    """log_softmax(z)[token] for one row z (V,): the same float64, without making the whole row of them (one
    copy, shifted and exponentiated in place)."""
    shifted = np.array(z, dtype=np.float64)
    shifted -= shifted.max(axis=-1, keepdims=True)
    at = shifted[token]
    np.exp(shifted, out=shifted)
    return float(at - np.log(shifted.sum(axis=-1, keepdims=True))[0])


def allowed_tokens(probs: np.ndarray, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> np.ndarray:
    """The tokens that survive top-k, then top-p, then min-p, as a boolean mask (V,).

    probs: the softmax after temperature. Ties are broken by token id (the lower id ranks first), so the
    set is a pure function of probs. The most likely token always survives.

    Only the ids at the ranks a filter keeps are sorted: none without top-k and top-p; else those of the first
    top_k ranks, or of the ranks top-p keeps, from the tokens at least as likely as the last of them (a sort of all
    V by probability and id took 4.4 ms a token at V = 49152, two decode steps of the default model, and 11-12.6
    ms at 128256). Top-p's renormalising sum still adds the probabilities of every rank in rank order, as it always
    has (their values, sorted alone: 0.5 ms at V = 49152), so that a seed keeps drawing the same tokens.
    """
    V = probs.size
    k = top_k if 0 < top_k < V else V
    if k == V and top_p >= 1.0:  # nothing ranked: every token survives top-k and top-p
        keep = np.ones(V, dtype=bool)
        best = int(np.argmax(probs))  # the first of the most likely: rank 0
    else:
        order = _best_ranks(probs, k) if k < V else None  # the first k ranks' ids, most likely first; ties by id
        keep_ranked = np.ones(k, dtype=bool)
        # top-p (nucleus) over the survivors of top-k, renormalised: keep a rank while the mass before it is < top_p.
        if top_p < 1.0:
            # every rank's probability, past k zero (sorted values: equal values are the same in either order)
            dtype = np.result_type(probs.dtype, 0.0)
            if order is None:
                ranked = np.sort(probs.astype(dtype, copy=False))[::-1]
            else:
                ranked = np.zeros(V, dtype)
                ranked[:k] = probs[order]
            total = ranked.sum()  # over all V, in rank order: its rounding as it always was
            ranked = ranked[:_ranks_to_weigh(ranked, total, k, top_p)] / total
            mass_before = np.cumsum(ranked)
            mass_before -= ranked
            keep_ranked = mass_before < top_p
            keep_ranked = keep_ranked[:np.flatnonzero(keep_ranked)[-1] + 1]  # up to the last rank kept (rank 0 is)
        if order is None:
            order = _best_ranks(probs, keep_ranked.size)
        keep = np.zeros(V, dtype=bool)
        keep[order[:keep_ranked.size]] = keep_ranked
        best = int(order[0])
    # min-p: a token must be at least min_p times as likely as the best one (a ratio, so no renormalising).
    if min_p > 0:
        keep &= probs >= min_p * probs[best]
    keep[best] = True
    return keep


def _ranks_to_weigh(ranked: np.ndarray, total: float, k: int, top_p: float) -> int:
    """How many of the first k ranks top-p must weigh (ranked: their probabilities, most likely first; total: the
    sum that normalises them): a prefix that ends past every rank top-p could keep. A cumulative sum runs in
    sequence (~0.15 ms over V = 49152, where top-p keeps a few dozen ranks), so the prefix grows 16-fold from 64
    ranks until its mass reaches top_p + 1e-9: the mass before any later rank is at least that mass, and the
    normalised sums the filter compares differ from these by rounding (~n 2**-53), far below 1e-9."""
    n = min(k, 64)
    while n < k and np.cumsum(ranked[:n])[-1] < (top_p + 1e-9) * total:
        n = min(k, 16 * n)
    return n


def _best_ranks(probs: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k most likely tokens, most likely first, equal probabilities by id (lower first): the first
    k of the whole ranking. Below V, only the tokens at least as likely as the k-th best are sorted (every other
    one ranks after all of them)."""
    V = probs.size
    if k >= V:
        return np.lexsort((np.arange(V), -probs))
    threshold = np.partition(probs, V - k)[V - k]  # the k-th largest probability
    candidates = np.flatnonzero(probs >= threshold)  # k of them, or more where several equal the threshold
    return candidates[np.lexsort((candidates, -probs[candidates]))][:k]


def next_token_distribution(logits: np.ndarray, params: SamplingParams,
                            previous_ids: Iterable[int] = ()) -> np.ndarray:
    """The probabilities the sampler draws from: (V,) float64, zero outside the allowed set, sum 1.

    At temperature 0 this is a one-hot on the greedy token.
    """
    choice = _greedy_or_probs(logits, params, previous_ids)
    if isinstance(choice, int):
        p = np.zeros(np.size(logits))
        p[choice] = 1.0
        return p
    return choice


def _greedy_or_probs(logits: np.ndarray, params: SamplingParams, previous_ids: Iterable[int]) -> "int | np.ndarray":
    """The steps sample() and next_token_distribution() share: the greedy token (temperature 0, or one too small to
    divide by), or the probabilities to draw from (V,) float64, zero outside the allowed set, sum 1."""
    if params.greedy and params.repetition_penalty == 1.0:  # the logits' own argmax (widening keeps the order)
        return int(np.argmax(_no_nan(np.asarray(logits))))
    z = _no_nan(apply_repetition_penalty(logits, previous_ids, params.repetition_penalty))  # (V,) float64, a copy
    best = int(np.argmax(z))
    scaled = None if params.greedy else _scale_in_place(z, params.temperature)  # (over z: the sampler's own copy)
    if scaled is None:
        return best
    probs = _softmax_in_place(scaled)
    probs *= allowed_tokens(probs, params.top_k, params.top_p, params.min_p)  # zero outside the allowed set
    probs /= probs.sum()
    return probs


def _no_nan(z: np.ndarray) -> np.ndarray:
    """z, or a clear error where a logit is NaN: no token can be ranked against it (np.argmax took the NaN, a
    draw picked garbage, the filters failed deep inside)."""
    nan = np.isnan(z)
    if nan.any():
        nan = np.flatnonzero(nan)
        raise InputError(f"the logits hold NaN ({nan.size} of {z.size}, the first at token {int(nan[0])}): nothing "
                         f"to choose a token from; the model's forward pass overflowed or its weights hold NaN")
    return z


def scale_by_temperature(z: np.ndarray, temperature: float) -> Optional[np.ndarray]:
    """z / temperature, shifted so its maximum is 0 (which softmax ignores); None when the temperature is
    too small to divide by.

    The shift comes first: (z - max) / T is finite or -inf for every T > 0, where z / T overflows to inf
    for a tiny T (1e-308 with logits near 2) and inf - inf made the probabilities NaN. "Too small" is then
    exact, not a chosen threshold: the division overflows float64 (|z_i - max| / T > 1.8e308 for some
    finite logit), i.e. T is below that logit's gap to the best times 2**-1024. Every token but the best
    ones then has probability exp(-inf) = 0, which is greedy decoding in all but tie-breaking and the
    random number drawn, so such a temperature is greedy decoding: the argmax, no random number used.
    """
    # In float64, as every step here: float32 logits divided by 1e-300 (0 in float32) made 0 / 0 = NaN, not None.
    return _scale_in_place(np.array(z, dtype=np.float64), temperature)


def _scale_in_place(shifted: np.ndarray, temperature: float) -> Optional[np.ndarray]:
    """scale_by_temperature, written over its argument (the sampler's own copy)."""
    shifted -= shifted.max()
    with np.errstate(over="ignore"):
        finite = np.isfinite(shifted)
        scaled = np.divide(shifted, temperature, out=shifted)
    if (np.isinf(scaled) & finite).any():
        return None
    return scaled


def draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One token from probs by inverse CDF: the first id whose cumulative probability exceeds u.

    Exactly one uniform number is used per token, so a sequence of draws depends only on the seed and the
    probabilities. Zero-probability ids can never be picked (their bucket is empty).

    The cumulative sum runs over the live ids only (adding a zero changes no sum, and the first id whose sum
    exceeds u is always a live one): the same buckets, where a sum over all V took ~0.15 ms at V = 49152.
    """
    live = probs != 0  # (a boolean array: np.flatnonzero of the floats took 0.35 ms at V = 128256, of this 0.02)
    live = np.flatnonzero(live) if np.count_nonzero(live) < probs.size else None  # None: every id
    cumulative = np.cumsum(probs[live] if live is not None else probs)  # (live,)
    u = rng.random() * cumulative[-1]
    # past the end: u rounded onto the very top edge, the last live id
    index = min(int(np.searchsorted(cumulative, u, side="right")), cumulative.size - 1)
    return int(live[index]) if live is not None else index


def sample(logits: np.ndarray, params: SamplingParams, rng: Optional[np.random.Generator] = None,
           previous_ids: Iterable[int] = ()) -> int:
    """The next token: greedy at temperature 0, or at one too small to divide by (scale_by_temperature),
    with no random number used; else one draw."""
    choice = _greedy_or_probs(logits, params, previous_ids)
    if isinstance(choice, int):
        return choice
    return draw(choice, rng if rng is not None else np.random.default_rng())
