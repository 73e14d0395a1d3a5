"""Activation capture: every intermediate tensor of a forward pass, by a stable name.

    with capture(model) as acts:
        model.forward(tokens)
    acts["layers.3.attention.q"]  # (B, T, H, HD), the queries of layer 3 after RoPE

The forward pass calls `self._record(name, tensor)` at each step; with no capture active that is one
attribute test, so the normal path is not slowed. Names, in the order the forward pass produces them
(shapes for one sequence of T tokens; captured arrays keep the batch axis, (B, ...) in front):

    embeddings                       (T, D)       rows of tok_embeddings for the tokens
    layers.{i}.attention_norm        (T, D)       attention input, after RMSNorm
    layers.{i}.attention.q           (T, H, HD)   queries after RoPE (Meta's interleaved pairing)
    layers.{i}.attention.k           (T, KVH, HD) keys after RoPE (Meta's interleaved pairing)
    layers.{i}.attention.v           (T, KVH, HD) values
    layers.{i}.attention.heads       (T, H, HD)   softmax(q k^T / sqrt(HD)) v, before wo
    layers.{i}.attention.output      (T, D)       wo applied to the heads
    layers.{i}.attention_residual    (T, D)       residual stream after the attention block
    layers.{i}.ffn_norm              (T, D)       feed-forward input, after RMSNorm
    layers.{i}.feed_forward.gate     (T, F)       w1 x
    layers.{i}.feed_forward.up       (T, F)       w3 x
    layers.{i}.feed_forward.output   (T, D)       w2 (silu(gate) * up)
    layers.{i}.feed_forward.router_logits  (T, E)  Llama 4 MoE layers, in place of gate and up: router logits
    layers.{i}.feed_forward.experts  (T, K) int   the top_k experts each token is routed to (llama_ref.model.llama4)
    layers.{i}.residual              (T, D)       residual stream after layer i (the layer's output)
    norm                             (T, D)       final RMSNorm (last position only when last_only)
    logits                           (T, V)
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from typing import Iterable, Iterator, Optional

import numpy as np

from ..errors import InputError
from ..model.transformer import Transformer

LAYER_NAMES = ("attention_norm", "attention.q", "attention.k", "attention.v", "attention.heads",
               "attention.output", "attention_residual", "ffn_norm", "feed_forward.gate", "feed_forward.up",
               "feed_forward.output", "residual")


MOE_NAMES = ("feed_forward.router_logits", "feed_forward.experts")  # Llama 4's MoE layers, after ffn_norm


def activation_names(n_layers: int, moe_layers=()) -> list[str]:
    """Every capture name of a model with n_layers layers, in the order the forward pass makes them.

    moe_layers: the layers with a mixture of experts (Llama 4): router logits and experts instead of gate, up."""
    names = ["embeddings"]
    for i in range(n_layers):
        layer = [n for n in LAYER_NAMES if i not in moe_layers or n not in ("feed_forward.gate", "feed_forward.up")]
        if i in moe_layers:
            layer[layer.index("ffn_norm") + 1:layer.index("ffn_norm") + 1] = MOE_NAMES
        names += [f"layers.{i}.{name}" for name in layer]
    return names + ["norm", "logits"]


def layer_of(name: str) -> Optional[int]:
    """The layer index in a capture name ("layers.3.attention.q" -> 3); None outside the layers."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1])
    return None


class Capture(dict):
    """name -> array of the latest forward pass; only names matching `patterns` (fnmatch) when given."""

    def __init__(self, patterns: Optional[Iterable[str]] = None):
        super().__init__()
        self.patterns = None if patterns is None else tuple(patterns)

    def wants(self, name: str) -> bool:
        return self.patterns is None or any(fnmatch.fnmatchcase(name, p) for p in self.patterns)

    def record(self, name: str, x: np.ndarray) -> None:
        # A copy: a backend may reuse or update its buffers in place after handing them over.
        if self.wants(name):
            self[name] = np.array(x, copy=True)


@contextmanager
def capture(model: Transformer, names: Optional[Iterable[str]] = None) -> Iterator[Capture]:
    """Collect the tensors of every forward pass run inside the block (a later pass overwrites).

    names: fnmatch patterns, e.g. ["layers.*.residual", "logits"], to keep only some (saves memory).
    """
    acts = Capture(names)
    previous = model.capture
    model.capture = acts
    try:
        yield acts
    finally:
        model.capture = previous


def run_and_capture(model: Transformer, tokens, names: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
    """One forward pass over `tokens` (T,) from position 0; the activations without the batch axis.

    Uses a cache of its own, so the model's cache (a conversation in progress) is left alone.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise InputError(f"tokens must be one sequence of shape (T,), got shape {tokens.shape}")
    cache = model.new_cache(1, capacity=max(1, len(tokens)))
    with capture(model, names) as acts:
        model.forward(tokens, 0, cache=cache)
    return {name: a[0] for name, a in acts.items()}  # drop the batch axis: (T, ...)
