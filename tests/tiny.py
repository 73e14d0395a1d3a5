"""Tiny random models for tests: random weights in Meta's layout, small ModelArgs, a Transformer from them."""

from __future__ import annotations

import mmap

import numpy as np

from llama_ref.model.config import ModelArgs
from llama_ref.model.transformer import Transformer
from llama_ref.weights.common import expected_shapes


def random_weights(args: ModelArgs, seed: int = 0, scale: float = 0.2) -> dict:
    """Random weights in Meta's layout; norms near 1 so activations stay in a realistic range."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith("norm.weight"):
            weights[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            weights[name] = (scale * rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    if args.tie_word_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return weights


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)
    base.update(overrides)
    return ModelArgs(**base)


def tiny_model(seed: int = 0, dtype=np.float32, backend="numpy", **overrides) -> Transformer:
    args = tiny_args(**overrides)
    return Transformer(args, random_weights(args, seed), dtype=dtype, backend=backend)


def file_backed(w) -> bool:
    """Whether a kept weight (an array, or a packed weight's storage) is a view of a memory-mapped file."""
    a = w if isinstance(w, np.ndarray) else getattr(w, "data", None)
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False
