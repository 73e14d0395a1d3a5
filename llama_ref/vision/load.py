"""Loading a Llama 3.2 Vision checkpoint (Meta's params.json + consolidated.NN.pth, or Hugging Face's Mllama
config.json + safetensors) as a VisionModel; llama_ref.load calls this when the directory is one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..weights.common import WeightsError
from ..weights.directory import detect_format, directory_tokenizer
from ..weights.mllama import is_mllama_directory, load_mllama
from .model import VisionModel


def is_vision_checkpoint(path: Path) -> bool:
    """A directory holding a Llama 3.2 Vision checkpoint in either format."""
    return path.is_dir() and is_mllama_directory(path, detect_format(path))


def load_vision(path: "str | Path", *, backend: str = "numpy", dtype=np.float32, progress: bool = False,
                weights: "str | None" = None, quantize: "str | None" = None, mmap: bool = False,
                max_seq_len: "int | None" = None, parallel: "str | None" = None) -> VisionModel:
    """A VisionModel with the directory's tokenizer (if any). Options llama_ref.load offers for text models
    that the vision path does not implement are refused, not ignored."""
    path = Path(path)
    for name, value in (("quantize", quantize), ("parallel", parallel), ("mmap", mmap or None)):
        if value is not None:
            raise WeightsError(f"{path}: {name} is not implemented for Llama 3.2 Vision checkpoints")
    keep = "float32" if weights == "float32" else "stored"
    text, vision, tensors, extras = load_mllama(path, detect_format(path), keep=keep, progress=progress)
    if max_seq_len is not None:
        if max_seq_len > text.max_seq_len:
            raise WeightsError(f"{path}: a context of {max_seq_len} tokens is longer than the model's "
                               f"{text.max_seq_len}")
        text = text.replace(max_seq_len=max_seq_len)
    model = VisionModel(text, vision, tensors, backend=backend, dtype=dtype)
    model.tokenizer = directory_tokenizer(path)
    model.source = path
    model.format = extras
    return model
