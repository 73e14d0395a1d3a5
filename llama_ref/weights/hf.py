"""Hugging Face's format: config.json plus model.safetensors, or shards listed in model.safetensors.index.json.

Two things differ from Meta's layout besides names:
  - HF's converter (convert_llama_weights_to_hf.py) reorders the rows of wq and wk so that RoPE rotates
    the two halves of each head instead of adjacent pairs; permute_hf_to_meta undoes it, per head, with
    n_heads for q and n_kv_heads for k.
  - tie_word_embeddings models have no lm_head.weight: the output matrix is the embedding table.
Tensors are memory-mapped; only q/k (which must be reordered) and anything widened to float32 are copied.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path, PurePosixPath

from ..model.config import ModelArgs, from_hf_config
from .common import WeightsError, check_weights, permute_hf_to_meta
from .keep import check_keep, keep_tensor
from .safetensors_file import read_safetensors_header
from .torch_zip import read_torch_file

HF_TO_META = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "layers.{i}.attention_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "layers.{i}.attention.wq.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "layers.{i}.attention.wk.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "layers.{i}.attention.wv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "layers.{i}.attention.wo.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "layers.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "layers.{i}.feed_forward.w1.weight",
    "model.layers.{i}.mlp.down_proj.weight": "layers.{i}.feed_forward.w2.weight",
    "model.layers.{i}.mlp.up_proj.weight": "layers.{i}.feed_forward.w3.weight",
}
META_TO_HF = {v: k for k, v in HF_TO_META.items()}
IGNORED_RE = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # old HF saves
LAYER_RE = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")


def hf_name_to_meta(name: str) -> "str | None":
    m = LAYER_RE.match(name)
    if m:
        template = HF_TO_META.get(f"{m.group(1)}{{i}}{m.group(3)}")
        return template.format(i=m.group(2)) if template else None
    return HF_TO_META.get(name)


def meta_name_to_hf(name: str) -> str:
    m = re.match(r"^layers\.(\d+)\.(.*)$", name)
    if m:
        return META_TO_HF[f"layers.{{i}}.{m.group(2)}"].format(i=m.group(1))
    return META_TO_HF[name]


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
        return weight_map
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # ValueError: not UTF-8 / JSON
        raise WeightsError(f"{path}: unreadable index ({type(e).__name__}: {e})") from None


def hf_tensor_files(directory: Path) -> list[Path]:
    """The weight files of an HF checkpoint: from the index when sharded, else the single file."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (directory / index_name).exists():
            files = sorted(set(_read_index(directory / index_name).values()))
            for f in files:
                # A shard is a file of this directory: refuse absolute paths and "..", which would read any
                # file on the machine. Checked on the name, not with resolve(): Hugging Face's cache keeps
                # shards as symlinks into a blobs/ folder outside the snapshot directory.
                if PurePosixPath(f).is_absolute() or ".." in PurePosixPath(f).parts:
                    raise WeightsError(f"{directory / index_name}: shard path {f!r} points outside "
                                       f"{directory}")
                if not (directory / f).is_file():
                    raise WeightsError(f"{directory / f}: shard listed in {index_name} is missing")
            return [directory / f for f in files]
        if (directory / single).is_file():
            return [directory / single]
    raise WeightsError(f"{directory}: no model.safetensors (or index) and no pytorch_model.bin")


def read_hf_tensors(directory: Path) -> dict:
    """Every tensor of the checkpoint (lazy), by HF name."""
    tensors: dict = {}
    for f in hf_tensor_files(directory):
        found = read_safetensors_header(f)[0] if f.suffix == ".safetensors" else read_torch_file(f)
        for name, t in found.items():
            if name in tensors:
                raise WeightsError(f"{f}: tensor {name} appears in two shards")
            tensors[name] = t
    return tensors


def open_hf(directory: Path):
    """(args, lazy) of an HF checkpoint: its config and every tensor (not yet read) under Meta's names,
    checked against the config from the headers alone; a tied output matrix is the embedding's tensor."""
    args: ModelArgs = from_hf_config(directory / "config.json")
    tensors = read_hf_tensors(directory)
    where = str(directory)
    if "lm_head.weight" not in tensors and args.tie_word_embeddings is False:
        raise WeightsError(f"{where}: tensor lm_head.weight is missing (and config.json does not tie "
                           f"word embeddings)")
    # Every name and shape is checked against the config from the headers alone, before any tensor is
    # read, so a damaged or hostile file costs nothing (HF's q/k row reordering keeps the shape).
    lazy = {}
    for hf_name, t in tensors.items():
        if IGNORED_RE.search(hf_name):
            continue
        name = hf_name_to_meta(hf_name)
        if name is None:
            raise WeightsError(f"{where}: unexpected tensor {hf_name} for a Llama model")
        lazy[name] = t
    if args.tie_word_embeddings and "tok_embeddings.weight" in lazy:
        # Like HF's own tying: a stored lm_head.weight (some tied checkpoints keep a copy) is not used.
        lazy["output.weight"] = lazy["tok_embeddings.weight"]
    check_weights(args, lazy, where)
    return args, lazy


def load_hf(directory: "str | Path", keep: str = "stored", progress: bool = False, mmap: bool = False):
    """Read a Hugging Face Llama checkpoint directory. Returns (args, weights, extras)."""
    directory = Path(directory)
    check_keep(keep)
    args, lazy = open_hf(directory)
    items = [(n, t) for n, t in lazy.items() if not (args.tie_word_embeddings and n == "output.weight")]
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc=f"loading {directory.name}", unit="tensor", leave=False)
    weights: dict = {}
    dtypes = set()
    for name, t in items:
        transform = None
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            heads = args.n_heads if name.endswith("wq.weight") else args.kv_heads
            transform = partial(permute_hf_to_meta, n_heads=heads)
        if not name.endswith("norm.weight"):
            dtypes.add(t.dtype_name)
        weights[name] = keep_tensor(t, keep, name, transform, mmap=mmap)
    if args.tie_word_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return args, weights, {"format": "hf", "dtype": "/".join(sorted(dtypes)), "files": hf_tensor_files(directory)}
