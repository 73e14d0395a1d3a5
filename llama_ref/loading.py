"""llama_ref.load: from a path or a short name to a ready model with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .fetch import MODELS, fetch
from .model import Transformer
from .weights.common import WeightsError


def load(path_or_name: "str | Path", *, backend: str = "numpy", dtype=np.float32,
         progress: bool = False) -> Transformer:
    """Load a Llama model from a GGUF file, a checkpoint directory, or a fetchable name.

    backend: "numpy" (the reference) or "numba" (the same computation, compiled).
    dtype: the computation dtype, float32 (default) or float64 (to measure rounding error).
    """
    source = str(path_or_name)
    path = Path(source).expanduser()
    if not path.exists():
        if source.lower() in MODELS:
            path = fetch(source, progress=progress)
        else:
            raise WeightsError(f"{source}: no such file or directory, and not a known model name "
                               f"({', '.join(sorted(MODELS))})")
    if path.is_file() and path.suffix == ".gguf" or path.is_file() and _is_gguf(path):
        from .tokenizer import tokenizer_from_gguf
        from .weights.gguf import load_gguf

        args, weights, extras = load_gguf(path, progress=progress)
        tokenizer = tokenizer_from_gguf(extras["metadata"], where=str(path))
    else:
        raise WeightsError(f"{path}: not a recognised checkpoint (expected a .gguf file)")
    if tokenizer.vocab_size > args.vocab_size:
        raise WeightsError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{args.vocab_size} embeddings")
    model = Transformer(args, weights, backend=backend, dtype=dtype, freq_divisors=extras.get("freq_divisors"))
    model.tokenizer = tokenizer
    model.source = path
    return model


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
