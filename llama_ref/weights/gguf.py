"""GGUF files (llama.cpp's format), read with the `gguf` package.

llama.cpp's converter permutes the q/k rows of Hugging Face checkpoints back into Meta's interleaved-pair
order before writing GGUF, so GGUF tensors are already in our canonical layout: only names change.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..config import ConfigError, ModelArgs, from_gguf_metadata
from .common import WeightsError, check_weights, pread_into
from ..packed import from_gguf_tensor as packed_from_gguf_tensor

# GGUF tensor name -> canonical (Meta) name. "{i}" is the layer index.
GGUF_TO_META = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
}
META_TO_GGUF = {v: k for k, v in GGUF_TO_META.items()}


def gguf_name_to_meta(name: str) -> "str | None":
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        template = GGUF_TO_META.get(f"blk.{{i}}.{rest}")
        return template.format(i=idx) if template else None
    return GGUF_TO_META.get(name)


def open_gguf(path: "str | Path"):
    """A gguf.GGUFReader over the file, with damage reported as WeightsError naming the file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise WeightsError(f"{path}: not a GGUF file (magic {magic!r})")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises assorted errors on damage; none is useful unnamed
        raise WeightsError(f"{path}: damaged GGUF file ({type(e).__name__}: {e})") from None
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise WeightsError(f"{path}: truncated: tensor {t.name} runs past the end of the file")
    return reader


def gguf_metadata(reader) -> dict:
    """Metadata as plain Python values (lists stay lists; tokenizer arrays included)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise WeightsError(f"metadata key {key} cannot be read ({e})") from None
    return meta


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32, shaped (rows, cols) like the PyTorch weight it came from."""
    import gguf

    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise WeightsError(f"tensor {tensor.name}: GGUF type {tensor.tensor_type.name} is not supported") from None
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest axis first
    return np.asarray(data, dtype=np.float32).reshape(shape)


def _read_owned(path: Path, tensor):
    """The tensor with its data read (pread) into an owned array instead of viewed through the map."""
    data = np.empty(tensor.data.shape, tensor.data.dtype)
    pread_into(path, tensor.data_offset, data)
    data.flags.writeable = False
    return tensor._replace(data=data)


def load_gguf(path: "str | Path", progress: bool = False, packed: bool = False, mmap: bool = False):
    """Read a Llama GGUF file. Returns (args, weights, extras); extras holds metadata and rope divisors.

    packed: keep 16-bit and quantized matrices in their stored blocks (llama_ref.packed) instead of
    dequantizing them to float32 here.
    mmap: let tensors kept as stored (F32, and F16/BF16 when packed) stay views of the file's memory map;
    by default they are read into memory the process owns (see llama_ref.load).
    """
    path = Path(path)
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    try:
        args = from_gguf_metadata(meta, where=str(path), has_output_tensor="output.weight" in names)
    except ConfigError:
        raise
    weights: dict = {}
    freq_divisors = None
    tensors = reader.tensors
    if progress:
        from tqdm import tqdm
        tensors = tqdm(tensors, desc=f"loading {path.name}", unit="tensor", leave=False)
    for t in tensors:
        if t.name == "rope_freqs.weight":
            freq_divisors = dequantize(t).reshape(-1)  # (HD/2,) Llama 3.1 scaling, precomputed
            continue
        name = gguf_name_to_meta(t.name)
        if name is None:
            raise WeightsError(f"{path}: unexpected tensor {t.name} for a Llama model")
        if not mmap and t.tensor_type.name in ("F32", "F16", "BF16"):
            t = _read_owned(path, t)  # the kept array would otherwise be a view of the map
        kept = packed_from_gguf_tensor(t) if packed else None
        weights[name] = kept if kept is not None else dequantize(t)
    if args.tie_word_embeddings:
        weights["output.weight"] = weights.get("tok_embeddings.weight")
    if "tok_embeddings.weight" not in weights:
        raise WeightsError(f"{path}: tensor token_embd.weight is missing")
    check_weights(args, weights, str(path))
    if freq_divisors is not None and freq_divisors.shape != (args.head_dim // 2,):
        raise WeightsError(f"{path}: rope_freqs has {freq_divisors.size} values, expected {args.head_dim // 2}")
    return args, weights, {"metadata": meta, "freq_divisors": freq_divisors, "format": "gguf"}
