"""The KV cache: keys and values of every layer for the positions a model has seen."""

from __future__ import annotations

from typing import Optional

import numpy as np

from .config import ModelArgs
from .ggml import F16Values
from ..errors import InputError


class KVCache:
    """Keys and values of every layer for the positions seen so far.

    Stored per layer as (B, capacity, KVH, HD). The capacity grows on demand up to max_seq_len, so a short
    conversation with a long-context model does not reserve memory for its whole window.

    fp16=True (arithmetic="ggml", KVCache.for_model): llama.cpp's F16 cache. Each position's keys and values
    are rounded to fp16 once, when stored, and kept head-major: k[layer] is a (B, capacity, KVH, HD) view of
    a (B, KVH, capacity, HD) float32 store of F16Values, so ggml's attention reads each head's rows as they
    lie, without rounding or transposing the whole cache at every call. Code that replaces k[layer] (a
    batch's rows dropped or stacked) may give any layout: update() lays it out head-major again.

    ids: for a batch of one, the token id at each position 0 .. len(ids)-1 whose keys and values every layer
    holds; generation compares a new prompt with it to prefill only what is new. None when unknown (a
    batch, or a key mask hid positions).
    """

    def __init__(self, args: ModelArgs, batch_size: int = 1, dtype=np.float32, capacity: int = 256,
                 fp16: bool = False):
        if fp16 and np.dtype(dtype) != np.float32:
            raise InputError(f"an fp16 cache holds its values as float32, got dtype {np.dtype(dtype)}")
        self.args, self.batch_size, self.dtype, self.fp16 = args, batch_size, np.dtype(dtype), fp16
        self.max_seq_len = args.max_seq_len
        self.capacity = 0
        self.length = 0  # positions 0 .. length-1 hold keys and values
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.ids: Optional[list[int]] = [] if batch_size == 1 else None
        self._grow(min(capacity, self.max_seq_len))

    @classmethod
    def for_model(cls, model, batch_size: int = 1, capacity: int = 256) -> "KVCache":
        """The cache `model` computes with: its dtype, and fp16 in arithmetic="ggml" (llama.cpp's F16 cache)."""
        ggml = getattr(model, "arithmetic", "exact") == "ggml" and np.dtype(model.dtype) == np.float32
        return cls(model.args, batch_size, model.dtype, capacity=capacity, fp16=ggml)

    def _new(self, batch_size: int, capacity: int) -> np.ndarray:
        """A zero layer: (B, cap, KVH, HD), a view of a head-major (B, KVH, cap, HD) F16Values store if fp16."""
        KVH, HD = self.args.kv_heads, self.args.head_dim
        if not self.fp16:
            return np.zeros((batch_size, capacity, KVH, HD), self.dtype)
        return np.zeros((batch_size, KVH, capacity, HD), np.float32).view(F16Values).transpose(0, 2, 1, 3)

    def _head_major(self, a: np.ndarray) -> bool:
        """Whether layer array a (B, cap, KVH, HD) is an F16Values view whose every head's rows are contiguous."""
        HD = a.shape[3]
        return isinstance(a, F16Values) and a.strides[3] == 4 and a.strides[1] == 4 * HD

    def _grow(self, capacity: int) -> None:
        old_k, old_v, n = self.k, self.v, self.capacity
        self.k = [self._new(self.batch_size, capacity) for _ in range(self.args.n_layers)]
        self.v = [self._new(self.batch_size, capacity) for _ in range(self.args.n_layers)]
        for new, old in zip(self.k + self.v, old_k + old_v):
            new[:, :n] = old
        self.capacity = capacity

    def reserve(self, length: int) -> None:
        """Make room for positions 0 .. length-1."""
        if length > self.max_seq_len:
            raise InputError(f"sequence of {length} tokens exceeds the context window of {self.max_seq_len}")
        if length > self.capacity:
            self._grow(min(self.max_seq_len, max(length, 2 * self.capacity)))

    def update(self, layer: int, start_pos: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v (B, T, KVH, HD) at start_pos.. and return all keys/values up to there: (B, S, KVH, HD)
        (fp16: rounded as they are stored; F16Values views of the head-major store, which each carries as
        .heads (B, KVH, capacity, HD) for kernels/ggml_ops.attention to read as it lies; views of them do not)."""
        end = start_pos + k.shape[1]
        self.length = end  # a rewind (start_pos < length) drops the later positions
        if not self.fp16:
            self.k[layer][:, start_pos:end] = k
            self.v[layer][:, start_pos:end] = v
            return self.k[layer][:, :end], self.v[layer][:, :end]
        out = []
        with np.errstate(over="ignore"):  # past 65504 fp16 is inf, as in ggml
            for store, x in ((self.k, k), (self.v, v)):
                if not self._head_major(store[layer]):  # replaced by a batch's rows: lay it out again
                    a = store[layer]
                    store[layer] = self._new(a.shape[0], a.shape[1])
                    store[layer][...] = a
                # rounded to fp16 once, here (fp16 -> float32 is exact): F16Values' __setitem__ without its cost
                store[layer].view(np.ndarray)[:, start_pos:end] = x.astype(np.float16)
                out.append(store[layer][:, :end])
                # the head-major store (B, KVH, capacity, HD) whose first `end` rows these are
                out[-1].heads = store[layer].transpose(0, 2, 1, 3).view(np.ndarray)
        return out[0], out[1]

    def forget_from(self, start_pos: int) -> None:
        """Before positions start_pos.. are overwritten: their ids are no longer known to be complete."""
        if self.ids is not None:
            del self.ids[start_pos:]

    def remember(self, start_pos: int, tokens: np.ndarray, masked: bool) -> None:
        """After every layer stored tokens (B, T) at start_pos..: record their ids (a batch of one)."""
        if self.ids is None or self.batch_size != 1 or masked or len(self.ids) != start_pos:
            self.ids = None
        else:
            self.ids.extend(int(t) for t in tokens[0])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)
