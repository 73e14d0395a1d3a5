"""Text generation, chat and scoring on top of Transformer.forward.

Prefill the prompt, then decode one token at a time, each picked by llama_ref.generation.sampling. Several prompts can
run as one batch: they are left-padded to the same length, the padding is hidden from attention with a key
mask, and every prompt carries its own random generator, so each gives the tokens it would give alone.

The methods people call (`model.generate`, `model.stream`, `model.chat`, `model.logits`, `model.score`)
live in GenerationMixin, which Transformer inherits; this keeps the forward pass in model.py on its own.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional, Sequence, Union

import numpy as np

from ..errors import InputError
from ..model.cache import KVCache
from ..runtime.parallel import SINGLE
from .sampling import SamplingParams, log_prob, log_softmax, sample

if TYPE_CHECKING:
    from ..model.transformer import Transformer

Prompt = Union[str, Sequence[int]]


@dataclass
class Generation:
    """One prompt's continuation.

    ids / text: the generated tokens and their text. A stop id is not included; a stop string is cut from
    the text (the tokens that spelled it stay in ids). finish_reason: "stop" (a stop id or string was
    produced), "length" (max_new_tokens or the context window was reached) or "interrupted".
    logprobs[i]: log-probability of ids[i] under the model (log-softmax of its logits, before any
    sampling control). top_logprobs[i]: the most likely (id, logprob) pairs at that step, if asked for.
    """

    text: str
    ids: list[int]
    finish_reason: str
    prompt_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: Optional[list[list[tuple[int, float]]]] = None
    stop: Optional[Union[str, int]] = None  # the stop string or id that ended it
    prompt_seconds: float = 0.0  # time to the first token (prefill)
    decode_seconds: float = 0.0  # time for the tokens after the first
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused from the model's cache

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Score:
    """How well a model predicts a text: every token after the first is predicted from its prefix."""

    n_tokens: int  # tokens predicted
    nll: float  # their summed negative log-likelihood, in nats
    ids: list[int] = field(default_factory=list)

    @property
    def mean_nll(self) -> float:
        return self.nll / self.n_tokens

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.mean_nll))

    def to_dict(self) -> dict:
        return {"n_tokens": self.n_tokens, "nll": self.nll, "mean_nll": self.mean_nll,
                "perplexity": self.perplexity}


# ---- one prompt's state while it decodes ------------------------------------------------------------

class _Row:
    """The tokens, text and random generator of one prompt, and the decision when it ends."""

    def __init__(self, prompt_ids: list[int], *, params: SamplingParams, seed, max_new_tokens: int,
                 window: int, stop_ids: frozenset, stop_strings: list[str], top_logprobs: int, tokenizer):
        self.prompt_ids, self.params, self.max_new_tokens, self.window = prompt_ids, params, max_new_tokens, window
        self.stop_ids, self.stop_strings, self.top_n = stop_ids, stop_strings, top_logprobs
        self.rng = np.random.default_rng(seed)
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: Optional[list] = [] if top_logprobs else None
        self.decoder = tokenizer.stream_decoder() if tokenizer is not None else None
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out
        self.finish_reason: Optional[str] = None
        self.stop = None
        self.started = self.first_token_at = self.ended_at = None
        self.cached = 0  # prompt tokens not prefilled again: the model's cache held them
        self.parallel = SINGLE  # the model's ranks (llama_ref.runtime.parallel), set by the model that decodes the row
        self._check_room()

    @property
    def sequence(self) -> list[int]:
        return self.prompt_ids + self.ids

    def _check_room(self) -> str:
        """End the row with "length" when it has all its tokens or fills the window; returns final text."""
        # A sequence may fill the window; the token after position window-1 has nowhere to go.
        if len(self.ids) >= self.max_new_tokens or len(self.prompt_ids) + len(self.ids) >= self.window:
            return self.finish("length")
        return ""

    def step(self, logits: np.ndarray) -> str:
        """Pick the next token from this row's logits (V,); returns the text that became final."""
        if self.finish_reason is not None:
            return ""
        history = self.sequence if self.params.repetition_penalty != 1.0 else ()
        # Sampled once: under tensor parallelism (llama_ref.runtime.parallel) every rank holds the same logits, and
        # rank 0's token is the one every rank continues with. The identity in one process.
        token = self.parallel.bcast(sample(logits, self.params, self.rng, history))
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.stop_ids:
            self.stop = token
            return self.finish("stop")
        # The model's own log-probabilities, before temperature or filtering: what scoring needs.
        self.ids.append(token)
        if self.top is None:
            self.logprobs.append(log_prob(logits, token))  # log_softmax(logits)[token], without the whole row
        else:
            logp = log_softmax(logits)
            self.logprobs.append(float(logp[token]))
            best = np.argsort(-logp, kind="stable")[: self.top_n]
            self.top.append([(int(i), float(logp[i])) for i in best])
        if self.decoder is not None:
            self.text += self.decoder.push(token)
        piece = self._release()
        if self.finish_reason is None:
            piece += self._check_room()
        return piece

    def finish(self, reason: str) -> str:
        """End the row; returns the held-back text that is now final."""
        self.finish_reason = reason
        self.ended_at = time.perf_counter()
        return self._flush()

    def _flush(self) -> str:
        # Bytes still held by the decoder (an unfinished character) are final now, unless a stop string
        # already cut the text before them.
        if self.decoder is not None and not isinstance(self.stop, str):
            self.text += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool = False) -> str:
        """Text that can no longer change: cut at a stop string, else all but a possible stop's start."""
        if self.stop is None:
            # Text already handed out holds no stop string's start (it was held back), so search after it.
            found = [(at, s) for s in self.stop_strings if (at := self.text.find(s, self.emitted)) >= 0]
            if found:
                at, s = min(found)
                self.text, self.stop = self.text[:at], s
                if self.finish_reason is None:
                    self.finish_reason, self.ended_at = "stop", time.perf_counter()
                final = True
        safe = len(self.text) if final else len(self.text) - _held_back(self.text, self.stop_strings)
        safe = max(safe, self.emitted)
        piece, self.emitted = self.text[self.emitted:safe], safe
        return piece

    def result(self) -> Generation:
        end = self.ended_at or time.perf_counter()
        first = self.first_token_at or end
        return Generation(
            text=self.text if self.finish_reason is not None else self.text[: self.emitted],
            ids=list(self.ids), finish_reason=self.finish_reason or "interrupted",
            prompt_ids=list(self.prompt_ids), logprobs=list(self.logprobs), top_logprobs=self.top,
            stop=self.stop, prompt_seconds=first - (self.started or first), decode_seconds=end - first,
            cached_tokens=self.cached)


def _held_back(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    longest = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:n]):
                longest = n
                break
    return longest


# ---- the decoding loop --------------------------------------------------------------------------------

def _keep_rows(cache: KVCache, rows: list[int]) -> None:
    """Drop finished prompts from a batch cache, keeping rows `rows` in order."""
    cache.k = [a[rows] for a in cache.k]
    cache.v = [a[rows] for a in cache.v]
    cache.batch_size = len(rows)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _own_cache(model: "Transformer", seq: list[int]) -> tuple[KVCache, int]:
    """The model's own cache for a prompt of one row, and how many of its first tokens the cache already
    holds (their keys and values are reused; the rest is prefilled from there, rewinding what differs).

    A prefill that starts at position p computes what a full prefill computes, in another order: logits
    agree to float rounding (tests/test_properties.py: 1e-5 in float32, 1e-10 in float64), so greedy
    tokens are the same unless two logits tie within that rounding.
    """
    cache = model.cache
    if (cache is None or cache.ids is None or cache.batch_size != 1 or cache.dtype != model.dtype
            or cache.max_seq_len != model.args.max_seq_len
            or cache.values is not model.cache_values):
        cache = model.cache = model.new_cache(1)
    # At least the last prompt token is fed again: its logits pick the first new token.
    return cache, min(_common_prefix(cache.ids, seq), len(seq) - 1)


def _decode(model: "Transformer", rows: list[_Row]) -> Iterator[tuple[int, str]]:
    """Run every row to its end, yielding (row index, text that became final, maybe "") after each step.

    Rows are left-padded to the longest and decoded together; finished rows leave the batch. When the
    padded batch reaches the context window while a shorter row still has room, the rows left are
    prefilled again without the extra padding and carry on. One row alone runs in the model's own cache
    (unless another generation holds it): a prompt that starts with ids the cache holds from the previous
    call (a chat's earlier turns, a shared system prompt) prefills only the rest.
    """
    lock = getattr(model, "cache_lock", None)
    own = len(rows) == 1 and lock is not None and lock.acquire(blocking=False)
    try:
        yield from _decode_rows(model, rows, own)
    finally:
        if own:
            lock.release()


def _decode_rows(model: "Transformer", rows: list[_Row], own: bool) -> Iterator[tuple[int, str]]:
    window = model.args.max_seq_len
    index = {id(r): i for i, r in enumerate(rows)}
    active = [r for r in rows if r.finish_reason is None]
    for r in rows:
        r.started = time.perf_counter()
    if own and active:
        seq = active[0].sequence
        cache, reuse = _own_cache(model, seq)
        active[0].cached = reuse
        logits = model.forward(np.asarray([seq[reuse:]]), reuse, cache=cache, last_only=True)[:, -1]
        active = yield from _steps(model, index, active, cache, logits, None, len(seq), window)
    while active:
        # Prefill: each row's whole sequence so far, right-aligned; the mask hides the padding on the left.
        width = max(len(r.sequence) for r in active)
        tokens = np.zeros((len(active), width), dtype=np.int64)  # (B, T)
        mask = np.zeros((len(active), width), dtype=bool)  # (B, S)
        for b, r in enumerate(active):
            seq = r.sequence
            tokens[b, width - len(seq):] = seq
            mask[b, width - len(seq):] = True
        padded = not mask.all()
        cache = model.new_cache(len(active))
        logits = model.forward(tokens, 0, cache=cache, key_mask=mask if padded else None,
                               last_only=True)[:, -1]  # (B, V)
        active = yield from _steps(model, index, active, cache, logits, mask if padded else None, width, window)


def _steps(model, index, active, cache, logits, mask, pos, window):
    """Decode the prefilled rows `active` until they end or the window is full; returns the rows left."""
    while active:
        # Pick every row's next token; rows that end leave the batch.
        keep = []
        for b, r in enumerate(active):
            yield index[id(r)], r.step(logits[b])
            if r.finish_reason is None:
                keep.append(b)
        if len(keep) < len(active):
            active = [active[b] for b in keep]
            if not active:
                break
            _keep_rows(cache, keep)
            mask = mask[keep] if mask is not None else None
        if pos >= window:
            break  # the padded batch is full: re-prefill what is left, tighter
        # Decode: feed each row its newest token at the next shared position.
        if mask is not None:
            mask = np.concatenate([mask, np.ones((len(active), 1), dtype=bool)], axis=1)  # (B, S)
        newest = np.array([[r.ids[-1]] for r in active], dtype=np.int64)  # (B, 1)
        logits = model.forward(newest, pos, cache=cache, key_mask=mask, last_only=True)[:, -1]  # (B, V)
        pos += 1
    return active


# ---- inputs -----------------------------------------------------------------------------------------

def _is_batch(prompt) -> bool:
    """A list of prompts (strings or id lists), as opposed to one prompt (a string or one id list)."""
    if isinstance(prompt, str):
        return False
    if isinstance(prompt, np.ndarray):
        return prompt.ndim == 2
    items = list(prompt)
    return bool(items) and all(isinstance(p, (str, list, tuple, np.ndarray)) for p in items)


def encode_prompt(model: "Transformer", prompt: Prompt, *, add_bos: Optional[bool] = None,
                  allow_special: bool = False) -> list[int]:
    """Token ids of one prompt: a string goes through the model's tokenizer, ids are checked."""
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise InputError("this model has no tokenizer: pass token ids instead of text")
        ids = model.tokenizer.encode(prompt, bos=add_bos, allow_special=allow_special)
    else:
        arr = np.asarray(prompt)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise InputError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        ids = [int(i) for i in arr]
    if not ids:
        raise InputError("the prompt is empty: give at least one token")
    bad = [i for i in ids if not 0 <= i < model.args.vocab_size]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the vocabulary (0 .. {model.args.vocab_size - 1})")
    return ids


def fit_to_window(ids: list[int], window: int, max_new_tokens: int, truncate: bool) -> list[int]:
    """Refuse a prompt longer than the window, or with truncate=True keep its last tokens, leaving room
    for max_new_tokens (at least one prompt token is always kept)."""
    if truncate:
        keep = max(1, window - max_new_tokens)
        return ids[-keep:] if len(ids) > keep else ids
    if len(ids) > window:
        raise InputError(f"the prompt has {len(ids)} tokens but the context window is {window}; "
                         f"shorten it or ask for left truncation (truncate=True, --truncate)")
    return ids


def _stop_ids(model: "Transformer", stop_ids) -> frozenset:
    if stop_ids is None:
        return frozenset(model.tokenizer.stop_ids) if model.tokenizer is not None else frozenset()
    if isinstance(stop_ids, (int, np.integer)):
        stop_ids = [stop_ids]
    return frozenset(int(i) for i in stop_ids)


def _stop_strings(model: "Transformer", stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise InputError("stop must be a non-empty string or a list of non-empty strings")
    if stops and model.tokenizer is None:
        raise InputError("stop strings need a tokenizer; use stop_ids with a model that has none")
    return stops


def _integer(name: str, value, minimum: int) -> int:
    """An integer argument (an int, or a float with an integral value), at least `minimum`; bools are refused."""
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def _number(name: str, value) -> float:
    """A real-number argument; finiteness and range are SamplingParams' to check."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number, got {value!r}")
    return float(value)


# ---- chat formats -----------------------------------------------------------------------------------

def chat_prompt_ids(model: "Transformer", messages) -> list[int]:
    """Token ids of a conversation in the model's chat format, ending where the assistant's turn starts.

    llama_ref.text.chat picks the format: the model's own jinja template when it has one, else Meta's Llama 2
    or Llama 3 layout for its tokenizer. One string stands for one user message.
    """
    from ..text.chat import chat_tokens

    if model.tokenizer is None:
        raise InputError("this model has no tokenizer, so it has no chat format")
    return list(chat_tokens(model.tokenizer, _as_messages(messages), add_generation_prompt=True))


def _as_messages(messages) -> list:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    if not isinstance(messages, (list, tuple)):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} dicts, or one string")
    return list(messages)


# ---- the methods Transformer gains --------------------------------------------------------------------

class Stream:
    """Text pieces of a generation as they are produced; `.result` is the Generation once it ends
    (or is interrupted: finish_reason "interrupted" with the text produced so far)."""

    def __init__(self, model: "Transformer", row: _Row):
        self._model, self._row = model, row

    def __iter__(self) -> Iterator[str]:
        for _, piece in _decode(self._model, [self._row]):
            if piece:
                yield piece

    @property
    def result(self) -> Generation:
        return self._row.result()


class GenerationMixin:
    """generate / stream / chat / logits / score, for any model with forward, args and tokenizer."""

    def _rows(self, prompts: list[Prompt], *, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0,
              min_p=0.0, repetition_penalty=1.0, seed=None, stop=None, stop_ids=None, top_logprobs=0,
              truncate=False, add_bos=None, allow_special=False, prompt_ids=None) -> list[_Row]:
        # max_new_tokens may be huge (generation still ends at the context window); top_logprobs past the
        # vocabulary reports the whole vocabulary.
        max_new_tokens = _integer("max_new_tokens", max_new_tokens, 0)
        top_logprobs = _integer("top_logprobs", top_logprobs, 0)
        params = SamplingParams(_number("temperature", temperature), _integer("top_k", top_k, 0),
                                _number("top_p", top_p), _number("min_p", min_p),
                                _number("repetition_penalty", repetition_penalty))
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise InputError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        seeds = [None if s is None else _integer("seed", s, 0) for s in seeds]
        window = self.args.max_seq_len
        ids_list = prompt_ids or [encode_prompt(self, p, add_bos=add_bos, allow_special=allow_special)
                                  for p in prompts]
        common = dict(params=params, max_new_tokens=int(max_new_tokens), window=window,
                      stop_ids=_stop_ids(self, stop_ids), stop_strings=_stop_strings(self, stop),
                      top_logprobs=int(top_logprobs), tokenizer=self.tokenizer)
        rows = [_Row(fit_to_window(ids, window, int(max_new_tokens), truncate), seed=s, **common)
                for ids, s in zip(ids_list, seeds)]
        for row in rows:
            row.parallel = getattr(self, "parallel", SINGLE)
        return rows

    def generate(self, prompt, max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: "int | list | None" = None, stop: "str | list[str] | None" = None,
                 stop_ids: "int | list[int] | None" = None, top_logprobs: int = 0, truncate: bool = False,
                 add_bos: Optional[bool] = None, allow_special: bool = False, images=None):
        """Continue a prompt (text or token ids), or a list of prompts as one batch.

        Returns a Generation, or a list of them for a list of prompts. Greedy by default; temperature > 0
        samples, filtered by top_k / top_p / min_p, with repetition_penalty on tokens already seen.
        seed makes sampling reproducible (one seed for all prompts of a batch, or a list, one per prompt).
        stop: strings that end the text; stop_ids: token ids that end it (default: the tokenizer's EOS and
        end-of-turn ids; [] to run to max_new_tokens). top_logprobs: how many alternatives to report per
        token. A prompt longer than the context window is refused unless truncate=True (keep its end).
        One prompt runs in the model's own KV cache (model.cache, kept afterwards; reset() frees it): the ids
        it starts with that the cache holds from the last call are not prefilled again (cached_tokens).
        images: only a Llama 3.2 Vision model (llama_ref.vision.model.VisionModel) reads them.
        """
        if images:
            raise InputError(f"images: {self.source or 'this model'} is a text-only model; images need a "
                             f"Llama 3.2 Vision checkpoint")
        batch = _is_batch(prompt)
        prompts = list(prompt) if batch else [prompt]
        rows = self._rows(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                          top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                          stop=stop, stop_ids=stop_ids, top_logprobs=top_logprobs, truncate=truncate,
                          add_bos=add_bos, allow_special=allow_special)
        for _ in _decode(self, rows):
            pass
        results = [r.result() for r in rows]
        return results if batch else results[0]

    def stream(self, prompt: Prompt, max_new_tokens: int = 32, **kwargs) -> Stream:
        """Like generate for one prompt, but iterate over the result to get text pieces as they come:

            for piece in model.stream("Once upon a time", max_new_tokens=50): print(piece, end="")
        """
        if _is_batch(prompt):
            raise InputError("stream takes one prompt; use generate for a batch")
        row, = self._rows([prompt], max_new_tokens=max_new_tokens, **kwargs)
        return Stream(self, row)

    def chat(self, messages, max_new_tokens: int = 256, *, system: Optional[str] = None,
             stream: bool = False, **kwargs):
        """Answer a conversation ([{"role": "user", "content": ...}, ...] or one user message as a
        string) in the model's chat format. Returns a Generation, or a Stream when stream=True. The
        earlier turns (and the previous answer, as far as the conversation re-encodes it to the same ids)
        stay in the model's KV cache, so each turn prefills only what is new: see generate."""
        messages = _as_messages(messages)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        ids = chat_prompt_ids(self, messages)
        row, = self._rows([None], max_new_tokens=max_new_tokens, prompt_ids=[ids], **kwargs)
        if stream:
            return Stream(self, row)
        for _ in _decode(self, [row]):
            pass
        return row.result()

    def logits(self, ids, *, add_bos: Optional[bool] = None) -> np.ndarray:
        """Logits (T, V) at every position of a sequence (text or ids), in a cache of its own."""
        ids = encode_prompt(self, ids, add_bos=add_bos)
        if len(ids) > self.args.max_seq_len:
            raise InputError(f"{len(ids)} tokens exceed the context window of {self.args.max_seq_len}")
        return self.forward(np.asarray(ids), 0, cache=self.new_cache(1))

    def score(self, text, *, add_bos: Optional[bool] = None, stride: Optional[int] = None,
              progress: bool = False) -> Score:
        """Negative log-likelihood and perplexity of a text (or ids): every token after the first,
        predicted from what precedes it. Texts longer than the window are scored in overlapping windows
        that advance by `stride` tokens (default half the window), each token scored once. Each window is
        run through the model SCORE_CHUNK positions at a time (a chunked prefill over one cache: the
        attention scores of a long window never fill memory, and progress=True can show a bar that moves)."""
        ids = encode_prompt(self, text, add_bos=add_bos)
        if len(ids) < 2:
            raise InputError("scoring needs at least two tokens (the first one is never predicted)")
        window = self.args.max_seq_len
        # Each window after the first starts `stride` tokens on and must overlap the tokens already scored
        # by at least one (the context of its first new token): 1 <= stride <= window - 1. A stride of 0 or
        # less never advanced (the loop never ended); one of window or more scored tokens against the
        # wrong positions.
        if stride is None:
            stride = max(1, window // 2)
        else:
            stride = _integer("stride", stride, 1)
            if stride >= window:
                raise InputError(f"stride must be less than the context window ({window}), got {stride}")
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(ids) - 1, desc="scoring", unit="tok", leave=False)
        nll, scored, begin = 0.0, 1, 0  # tokens before `scored` have been predicted already
        while scored < len(ids):
            begin = max(0, min(begin, len(ids) - window))
            chunk = ids[begin:begin + window]
            cache = self.new_cache(1)
            for at in range(0, len(chunk), SCORE_CHUNK):
                piece = chunk[at:at + SCORE_CHUNK]
                logp = log_softmax(self.forward(np.asarray(piece), at, cache=cache))  # (t, V) float64
                # Position p of the window predicts token p+1; take the tokens not scored yet.
                targets = np.arange(max(scored - begin, at + 1), min(at + len(piece) + 1, len(chunk)))
                nll -= float(logp[targets - 1 - at, np.asarray(chunk)[targets]].sum())
                if bar is not None:
                    bar.update(len(targets))
            scored = begin + len(chunk)
            begin += stride
        if bar is not None:
            bar.close()
        return Score(n_tokens=len(ids) - 1, nll=nll, ids=ids)


SCORE_CHUNK = 512  # positions per forward call in score()


# ---- the plain token loop, for scripts that want (id, logprob) pairs ------------------------------------

def generate_ids(model: "Transformer", prompt_ids: Sequence[int], max_new_tokens: int = 32,
                 temperature: float = 0.0, seed: Optional[int] = None,
                 stop_ids: Optional[set] = None) -> Iterator[tuple[int, float]]:
    """Yield (token id, its log-probability) for each generated token, the stop id included."""
    stop_ids = set(stop_ids or ())
    row, = model._rows([prompt_ids], max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                       stop_ids=[])
    for _ in _decode(model, [row]):
        token, logprob = row.ids[-1], row.logprobs[-1]
        yield token, logprob
        if token in stop_ids:
            return
