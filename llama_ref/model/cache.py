"""The KV cache: keys and values of every layer for the positions a model has seen."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .config import ModelArgs
from ..errors import InputError


class KVCache:
    """Keys and values of every layer for the positions seen so far.

    Stored per layer as (B, capacity, KVH, HD): k[i], v[i], views of two arrays (L, B, capacity, KVH, HD) that a
    compiled step of several layers takes whole (`layers`). The capacity grows on demand up to max_seq_len, so a
    short conversation with a long-context model does not reserve memory for its whole window.

    values: None, or the function every key and value passes on its way in: arithmetic="ggml" gives
    llama.cpp's F16 cache its fp16 rounding here (model/ggml.cache_values), so the cache holds what llama.cpp's
    holds and a reader (kernels/ggml_step.py) can take it as it is.

    storage: the arrays' dtype, when it is not `dtype`. arithmetic="ggml" stores its fp16 values in float16
    (model/ggml.cache_storage), exactly, in half the memory, and a long context's attention reads half the bytes;
    `update` then returns float16 views, which every attention widens to float32 (the same values).

    ids: for a batch of one, the token id at each position 0 .. len(ids)-1 whose keys and values every layer
    holds; generation compares a new prompt with it to prefill only what is new. None when unknown (a
    batch, or a key mask hid positions).
    """

    def __init__(self, args: ModelArgs, batch_size: int = 1, dtype=np.float32, capacity: int = 256,
                 values: Optional[Callable[[np.ndarray], np.ndarray]] = None, storage=None):
        self.args, self.batch_size, self.dtype, self.values = args, batch_size, np.dtype(dtype), values
        self.storage = np.dtype(dtype if storage is None else storage)
        self.max_seq_len = args.max_seq_len
        self.capacity = 0
        self.length = 0  # positions 0 .. length-1 hold keys and values
        self.k: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.ids: Optional[list[int]] = [] if batch_size == 1 else None
        self._grow(min(capacity, self.max_seq_len))

    def _grow(self, capacity: int) -> None:
        shape = (self.args.n_layers, self.batch_size, capacity, self.args.kv_heads, self.args.head_dim)
        old_k, old_v, n = self.k, self.v, self.capacity
        self._blocks = np.zeros(shape, self.storage), np.zeros(shape, self.storage)  # (L, B, cap, KVH, HD) each
        self.k, self.v = list(self._blocks[0]), list(self._blocks[1])  # layer i: (B, cap, KVH, HD), a view
        self._views = tuple(self.k), tuple(self.v)
        for new, old in zip(self.k + self.v, old_k + old_v):
            new[:, :n] = old
        self.capacity = capacity

    def layers(self, start: int, end: int) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """Keys and values of layers start .. end-1 as two arrays (end - start, B, capacity, KVH, HD) whose rows are
        k[i], v[i]; None once the lists hold other arrays (generation's batch code replaces them) or the views
        their own memory (a deep copy of the cache copies each view apart)."""
        kb, vb = self._blocks
        for arrays, views, block in ((self.k, self._views[0], kb), (self.v, self._views[1], vb)):
            if not all(a is b and a.base is block for a, b in zip(arrays[start:end], views[start:end])):
                return None
        return kb[start:end], vb[start:end]

    def reserve(self, length: int) -> None:
        """Make room for positions 0 .. length-1."""
        if length > self.max_seq_len:
            raise InputError(f"sequence of {length} tokens exceeds the context window of {self.max_seq_len}")
        if length > self.capacity:
            self._grow(min(self.max_seq_len, max(length, 2 * self.capacity)))

    def store(self, layer: int, start_pos: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write k, v (B, T, KVH, HD) at positions start_pos.. of a layer (through `values` where given)."""
        end = start_pos + k.shape[1]
        if self.values is not None:
            k, v = self.values(k), self.values(v)
        self.k[layer][:, start_pos:end] = k
        self.v[layer][:, start_pos:end] = v

    def update(self, layer: int, start_pos: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Store k, v (B, T, KVH, HD) at start_pos.. and return all keys/values up to there: (B, S, KVH, HD)."""
        end = start_pos + k.shape[1]
        self.length = end  # a rewind (start_pos < length) drops the later positions
        self.store(layer, start_pos, k, v)
        return self.k[layer][:, :end], self.v[layer][:, :end]

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
