"""The scheduling loop: one worker thread owns the model and decodes every live request as one batch.

The forward pass is not thread-safe, so nothing but this thread calls it (guard checks are queued to it
too, see Batcher.call). Each request contributes one row (one "slot") per choice. The batch shares one KV
cache and one position counter `pos`; rows are right-aligned so that they all end at pos - 1, and the
positions to the left of a row's first token are padding that a key mask hides (as in llama_ref.generation.generate).
Because RoPE makes attention depend only on relative positions, a row's answer does not depend on where it
sits: greedy answers in a batch equal the answers alone (up to float32 rounding of the same sums).

Each step of the loop:
  1. every slot picks its next token from its logits; finished or cancelled slots leave the batch;
  2. the remaining slots' newest tokens are fed at position pos, one batched forward call;
  3. waiting requests join: prompts of at most pos tokens are prefilled together (one forward call) so
     that each ends at position pos-1, and their cache rows are stacked onto the batch's; a longer prompt
     (or a batch that reached the context window) makes the whole batch be prefilled afresh,
     right-aligned to the longest sequence.

A batch that never empties would carry ever more padding on the left: past COMPACT_AFTER positions of it
(and more than its longest row), its rows are prefilled again, tight (see _feed).

Prefix reuse: when a slot ends, the keys and values of the tokens it fed are kept (the last few
conversations). A request that starts with one of those token sequences (a chat that extends an earlier
turn) starts from the kept cache and only prefills its new tokens: in an empty batch at the positions the
prefix had, in a running batch at the positions it joins at (its keys rotated on, see _resume).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from ..model import ops
from ..errors import LlamaRefError
from ..generation.generate import _keep_rows, _Row
from ..model.cache import KVCache
from .metrics import Metrics


COMPACT_AFTER = 256  # positions of padding a batch may carry before it is prefilled again, tight


class QueueFull(LlamaRefError):
    """More requests are waiting than the server queues; the client should retry later."""


@dataclass
class Job:
    """One request: its rows (one per choice) and a callback that receives events from the worker.

    emit(index, piece, row, done) is called on the worker thread after every token of row `index`
    (piece: the text that became final, maybe ""), and once more with done=True when the row ends.
    """

    rows: list[_Row]
    emit: Callable[[int, str, _Row, bool], None]
    cancelled: bool = False
    arrived: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        """Stop generating (the client went away); the worker drops the rows at its next step."""
        self.cancelled = True


@dataclass
class _Slot:
    job: Job
    index: int  # the choice this row answers
    row: _Row
    fed: list[int] = field(default_factory=list)  # tokens whose keys and values are in the cache


@dataclass
class _Prefix:
    """A finished conversation's cache row: the tokens fed, at positions offset .. offset+len-1."""

    tokens: list[int]
    offset: int
    k: list[np.ndarray]  # per layer (1, len, KVH, HD)
    v: list[np.ndarray]


class Batcher:
    """Continuous batching over model.forward, on a thread of its own. submit() a Job, close() at the end."""

    def __init__(self, model, *, max_batch: int = 8, max_queue: int = 64, metrics: Optional[Metrics] = None,
                 keep_prefixes: int = 4):
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.metrics = metrics or Metrics()
        self.keep_prefixes = keep_prefixes
        self._waiting: collections.deque[Job] = collections.deque()
        self._calls: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        # Batch state, touched only by the worker thread.
        self._slots: list[_Slot] = []
        self._cache: Optional[KVCache] = None
        self._mask: Optional[np.ndarray] = None  # (B, pos) bool: False where a row has padding
        self._logits: Optional[np.ndarray] = None  # (B, V): each slot's next-token logits
        self._pos = 0
        self._prefixes: list[_Prefix] = []
        self._thread = threading.Thread(target=self._run, name="llama-ref-batcher", daemon=True)
        self._thread.start()

    # ---- called from the HTTP side ---------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._wake:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting (the queue holds "
                                f"{self.max_queue}); retry later")
            self._waiting.append(job)
            self.metrics.queue_length = len(self._waiting)
            self._wake.notify()

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run fn() on the worker thread between two steps (for anything else that runs a model)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._wake:
            self._calls.append((fn, future))
            self._wake.notify()
        return future

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout=30)

    # ---- the worker ----------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._closed or self._waiting or self._calls or self._slots):
                    self._wake.wait()
                if self._closed:
                    break
                calls, self._calls = list(self._calls), collections.deque()
            for fn, future in calls:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # handed to the caller, who turns it into an answer
                        future.set_exception(e)
            try:
                self._step()
            except Exception as e:  # a bug must not leave clients waiting forever: fail the live rows
                self._fail_all(e)
        self._fail_all(QueueFull("the server shut down"))

    def _step(self) -> None:
        if self._slots:
            self._sample()
        if self._slots:
            self._feed()
        self._admit()

    def _sample(self) -> None:
        """Every slot picks its next token; finished and cancelled slots leave the batch."""
        keep = []
        for b, slot in enumerate(self._slots):
            if slot.job.cancelled:
                slot.row.finish("interrupted")
                self.metrics.cancelled_rows += 1
            else:
                piece = slot.row.step(self._logits[b])
                slot.job.emit(slot.index, piece, slot.row, False)
                if slot.row.finish_reason is None:
                    keep.append(b)
                    continue
            self.metrics.completion_tokens += len(slot.row.ids)
            self._remember(b, slot)
            slot.job.emit(slot.index, "", slot.row, True)
        if len(keep) < len(self._slots):
            self._slots = [self._slots[b] for b in keep]
            if not self._slots:
                self._cache = self._mask = self._logits = None
                self._pos = 0
                self.metrics.active_rows = 0
                return
            _keep_rows(self._cache, keep)
            self._mask, self._logits = self._mask[keep], self._logits[keep]
        self.metrics.active_rows = len(self._slots)

    def _feed(self) -> None:
        """One batched decode step: each slot's newest token at position pos."""
        longest = max(len(s.row.sequence) for s in self._slots)
        if self._pos >= self.model.args.max_seq_len or self._pos - longest >= max(COMPACT_AFTER, longest):
            # Rows that join and leave make the batch's left padding grow with every step; the keys
            # there are masked but still cost memory and attention time. When the batch reached the
            # window, or the padding outgrew both COMPACT_AFTER and the longest row, prefill the rows
            # again right-aligned to the longest (their keys can't just be moved: RoPE rotated them
            # by their positions). This also bounds the cache at about 2x the longest row.
            self._prefill_all(self._slots)
            self.metrics.compactions += 1
            return
        started = time.perf_counter()
        newest = np.array([[s.row.ids[-1]] for s in self._slots], dtype=np.int64)  # (B, 1)
        self._mask = np.concatenate([self._mask, np.ones((len(self._slots), 1), dtype=bool)], axis=1)
        self._logits = self._forward(newest, self._pos, self._cache, self._mask)
        for s in self._slots:
            s.fed.append(s.row.ids[-1])
        self._pos += 1
        self.metrics.record_step(len(self._slots), time.perf_counter() - started)

    def _admit(self) -> None:
        """Let waiting requests join while the batch has room for all of a request's rows."""
        joining: list[_Slot] = []
        with self._wake:
            while self._waiting and len(self._slots) + len(joining) + len(self._waiting[0].rows) <= self.max_batch:
                job = self._waiting.popleft()
                if job.cancelled:
                    self.metrics.cancelled_rows += len(job.rows)
                else:
                    joining += [_Slot(job, i, row) for i, row in enumerate(job.rows)]
            self.metrics.queue_length = len(self._waiting)
            if (not self._slots and not joining and self._waiting
                    and len(self._waiting[0].rows) > self.max_batch):  # can never fit: n > max_batch
                job = self._waiting.popleft()
                joining = [_Slot(job, i, row) for i, row in enumerate(job.rows)]
        for slot in joining:
            slot.row.started = time.perf_counter()
            self.metrics.prompt_tokens += len(slot.row.prompt_ids)
        done = [s for s in joining if s.row.finish_reason is not None]  # e.g. max_tokens 0
        for s in done:
            s.job.emit(s.index, "", s.row, True)
        joining = [s for s in joining if s.row.finish_reason is None]
        if not joining:
            return
        if not self._slots and len(joining) == 1 and self._resume(joining[0]):
            return
        if self._slots:  # joining a running batch: a slot that continues a kept conversation starts from it
            fresh = []
            for s in joining:
                fits = len(s.row.sequence) <= self._pos
                if not (fits and self._resume(s, self._pos - len(s.row.sequence))):
                    fresh.append(s)
            joining = fresh
            if not joining:
                self.metrics.active_rows = len(self._slots)
                return
        longest = max(len(s.row.sequence) for s in joining)
        if not self._slots or longest > self._pos:
            self._prefill_all(self._slots + joining)
        else:
            self._join(joining)
        self.metrics.active_rows = len(self._slots)

    # ---- building the batch's cache ----------------------------------------------------------------------
    def _forward(self, tokens: np.ndarray, start: int, cache: KVCache, mask: np.ndarray) -> np.ndarray:
        padded = not mask.all()
        return self.model.forward(tokens, start, cache=cache, key_mask=mask if padded else None,
                                  last_only=True)[:, -1]  # (B, V)

    def _prefill_all(self, slots: list[_Slot]) -> None:
        """A fresh batch: every slot's whole sequence, right-aligned, in one forward call."""
        width = max(len(s.row.sequence) for s in slots)
        tokens = np.zeros((len(slots), width), dtype=np.int64)  # (B, T)
        mask = np.zeros((len(slots), width), dtype=bool)  # (B, S)
        for b, s in enumerate(slots):
            seq = s.row.sequence
            tokens[b, width - len(seq):] = seq
            mask[b, width - len(seq):] = True
            s.fed = list(seq)
        self._cache = self.model.new_cache(len(slots))
        self._logits = self._forward(tokens, 0, self._cache, mask)
        self._slots, self._mask, self._pos = list(slots), mask, width

    def _join(self, slots: list[_Slot]) -> None:
        """Prefill the joining slots together, right-aligned to end at pos - 1 like the batch's rows, and
        stack their cache rows onto the batch's."""
        pos, width = self._pos, max(len(s.row.sequence) for s in slots)
        start = pos - width  # the chunk covers positions start .. pos-1; earlier ones are padding
        cache = self.model.new_cache(len(slots), capacity=self._cache.capacity)
        cache.length = start
        tokens = np.zeros((len(slots), width), dtype=np.int64)  # (k, T)
        mask = np.zeros((len(slots), pos), dtype=bool)  # (k, S)
        for b, s in enumerate(slots):
            seq = s.row.sequence
            tokens[b, width - len(seq):] = seq
            mask[b, pos - len(seq):] = True
            s.fed = list(seq)
        logits = self._forward(tokens, start, cache, mask)
        self._stack(cache, mask, logits, slots)

    def _stack(self, cache: KVCache, mask: np.ndarray, logits: np.ndarray, slots: list[_Slot]) -> None:
        batch = self._cache
        for c in (batch, cache):  # the same capacity, so the rows stack
            if c.capacity < max(batch.capacity, cache.capacity):
                c._grow(max(batch.capacity, cache.capacity))
        batch.k = [np.concatenate([a, b]) for a, b in zip(batch.k, cache.k)]
        batch.v = [np.concatenate([a, b]) for a, b in zip(batch.v, cache.v)]
        batch.batch_size += len(slots)
        batch.ids = None  # a batch's cache records no token ids (see KVCache.ids)
        self._mask = np.concatenate([self._mask, mask])
        self._logits = np.concatenate([self._logits, logits])
        self._slots += slots

    def _resume(self, slot: _Slot, start: Optional[int] = None) -> bool:
        """Prefill a slot from a kept prefix of its prompt, so that its sequence begins at position `start`
        (None: where the prefix was, in an empty batch), and add it to the batch. False when none matches.

        The kept keys were rotated (RoPE) for the positions they had; placed elsewhere, they are rotated
        on by the difference, which is exact in arithmetic (rotations add) and differs from recomputing
        them by float32 rounding. Llama 4's NoPE layers' keys were never rotated and stay as they are."""
        seq = slot.row.sequence
        best, shared = None, 0
        for p in self._prefixes:
            n = _common_prefix(p.tokens, seq)
            if n > shared:
                best, shared = p, n
        shared = min(shared, len(seq) - 1)  # at least one token must be computed, for its logits
        if best is None or shared < 1:
            return False
        start = best.offset if start is None else start
        end = start + len(seq)  # the slot's sequence ends at position end - 1
        if start < 0 or end > self.model.args.max_seq_len:
            return False
        capacity = max(end, self._cache.capacity if self._cache is not None else 0)
        cache = self.model.new_cache(1, capacity=capacity)
        shift = start - best.offset
        cos, sin = ops.rope_tables(self.model.freqs, shift, 1, self.model.dtype)  # (1, HD/2): one angle
        llama4 = self.model.args.llama4
        unrotated = set(llama4.nope_layers) if llama4 is not None else set()  # Llama 4's NoPE layers' keys
        for layer in range(self.model.args.n_layers):
            keys = best.k[layer][:, :shared].astype(cache.dtype, copy=False)  # rotated in the model's dtype, not fp16
            rotate = shift and layer not in unrotated
            cache.store(layer, start, ops.apply_rope(keys, cos, sin) if rotate else keys, best.v[layer][:, :shared])
        cache.length = start + shared
        mask = np.zeros((1, end), dtype=bool)
        mask[0, start:] = True
        logits = self._forward(np.array([seq[shared:]], dtype=np.int64), start + shared, cache, mask)
        slot.fed = list(seq)
        self.metrics.reused_prompt_tokens += shared
        if self._slots:
            self._stack(cache, mask, logits, [slot])
        else:
            self._cache, self._logits, self._slots, self._mask, self._pos = cache, logits, [slot], mask, end
        return True

    def _remember(self, b: int, slot: _Slot) -> None:
        """Keep a finished slot's cache row, so that a conversation extending it can start from it."""
        if self.keep_prefixes <= 0 or not slot.fed:
            return
        offset = self._pos - len(slot.fed)
        end = offset + len(slot.fed)
        self._prefixes.append(_Prefix(list(slot.fed), offset,
                                      [a[b:b + 1, offset:end].copy() for a in self._cache.k],
                                      [a[b:b + 1, offset:end].copy() for a in self._cache.v]))
        self._prefixes = self._prefixes[-self.keep_prefixes:]

    def _fail_all(self, error: BaseException) -> None:
        for slot in self._slots:
            if slot.row.finish_reason is None:
                slot.row.finish("interrupted")
            slot.row.error = error
            slot.job.emit(slot.index, "", slot.row, True)
        self._slots, self._cache = [], None
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for job in waiting:
            for i, row in enumerate(job.rows):
                row.finish("interrupted")
                row.error = error
                job.emit(i, "", row, True)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
