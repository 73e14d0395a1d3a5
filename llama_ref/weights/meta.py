"""Meta's checkpoint format: params.json plus consolidated.00.pth ... consolidated.NN.pth.

Big models were saved model-parallel: shard k holds the slice of every parallel layer that GPU k computed.
The split dimension follows Meta's fairscale layers:
    ColumnParallelLinear (wq, wk, wv, w1, w3, output): output rows split -> join on dim 0
    RowParallelLinear    (wo, w2):                     input columns split -> join on dim 1
    ParallelEmbedding    (Llama 1/2 tok_embeddings):   embedding dim split -> join on dim 1
    VocabParallelEmbedding (Llama 3 tok_embeddings):   vocabulary split    -> join on dim 0
    norms:                                              replicated on every shard
Which embedding a checkpoint used is read from the shard's shape (full width means vocab-split).
Tensor names are already canonical (Meta's own).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from ..model.config import ModelArgs, _read_json, from_params_json
from .common import WeightsError, check_weights, expected_shapes
from .keep import check_keep, finish, keep_tensor, merge_raw
from .torch_zip import read_torch_file

IGNORED = {"rope.freqs"}  # Llama 1/2 saved their RoPE table; it is recomputed from rope_theta
SHARD_RE = re.compile(r"consolidated\.(\d+)\.pth$")


def split_dim(name: str, shard_shape: tuple[int, ...], dim: int):
    """The dimension along which Meta's parallel layers split tensor `name`; None if replicated."""
    if name.endswith("norm.weight"):
        return None
    if name == "tok_embeddings.weight":
        # ParallelEmbedding (Llama 1/2) keeps whole rows of D/n columns; VocabParallelEmbedding (Llama 3)
        # keeps V/n whole rows of D columns.
        return 0 if shard_shape[1] == dim else 1
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1
    return 0


def shard_paths(directory: Path) -> list[Path]:
    """consolidated.00.pth .. consolidated.NN.pth, checked to be numbered without a gap."""
    found = {}
    for p in directory.iterdir():
        m = SHARD_RE.search(p.name)
        if m:
            found[int(m.group(1))] = p
    if not found:
        raise WeightsError(f"{directory}: no consolidated.NN.pth files")
    n = max(found) + 1
    missing = [i for i in range(n) if i not in found]
    if missing:
        raise WeightsError(f"{directory}: shard consolidated.{missing[0]:02d}.pth is missing "
                           f"(found {len(found)} of {n} shards)")
    return [found[i] for i in range(n)]


def read_meta_params(directory: Path, shards: list[dict]) -> ModelArgs:
    """params.json, with Llama 1/2's vocab_size -1 filled in from the output matrix."""
    params = _read_json(directory / "params.json")
    if params.get("vocab_size", -1) == -1:
        # Llama 1/2 left the vocabulary to the tokenizer; the output matrix (split on rows) knows it.
        head = "output.weight" if "output.weight" in shards[0] else "tok_embeddings.weight"
        if head not in shards[0] or len(shards[0][head].shape) != 2:
            raise WeightsError(f"{directory}: vocab_size is -1 and no 2-D output.weight to read it from")
        if head == "output.weight":
            params["vocab_size"] = sum(s[head].shape[0] for s in shards)
        else:
            params["vocab_size"] = shards[0][head].shape[0] * (
                len(shards) if shards[0][head].shape[1] == params.get("dim") else 1)
    return from_params_json(params, where=str(directory / "params.json"))


def joined_shapes(args: ModelArgs, shards: list[dict], names: list[str], where: str) -> dict:
    """name -> (shape once its shards are joined, split axis), from the headers alone: nothing is read."""
    out = {}
    for name in names:
        parts = [s[name] for s in shards]
        shape = parts[0].shape
        if any(t.dtype_name != parts[0].dtype_name for t in parts):
            raise WeightsError(f"{where}: tensor {name} has different dtypes in different shards")
        if name == "tok_embeddings.weight" and len(shape) != 2:
            raise WeightsError(f"{where}: tensor {name} has shape {shape}, expected a matrix")
        axis = split_dim(name, shape, args.dim)
        if axis is not None and axis >= len(shape):
            axis = None  # a wrong-dimensional tensor: check_weights names it with its shape
        joined = list(shape)
        if axis is not None:
            joined[axis] = sum(t.shape[axis] for t in parts)
        if any(len(t.shape) != len(shape) or any(n != m for i, (n, m) in enumerate(zip(t.shape, shape))
                                                 if i != axis) for t in parts):
            raise WeightsError(f"{where}: shards of {name} do not fit together "
                               f"(shapes {', '.join(str(t.shape) for t in parts)})")
        out[name] = (tuple(joined), axis)
    return out


def check_missing_shard(args: ModelArgs, joined: dict, n_shards: int, where: str) -> None:
    """A missing last shard (consolidated.01.pth of two, say) leaves no gap in the numbering; it shows as
    every split tensor of the layers being the same whole fraction 1/k of its config shape along its
    split axis. Said so, rather than reported as a shape mismatch. (One mismatching tensor, or different
    fractions, is a config that contradicts the file: check_weights reports that.)"""
    template = expected_shapes(args.replace(n_layers=1))  # one layer's shapes: any layer count is cheap
    fractions, example = set(), None
    for name, (shape, axis) in joined.items():
        m = re.match(r"layers\.(\d+)\.(.*)$", name)
        if axis is None or not m or int(m.group(1)) >= args.n_layers:
            continue
        want = template.get(f"layers.0.{m.group(2)}")
        if want is None or len(want) != len(shape):
            return
        rest_fits = all(n == w for i, (n, w) in enumerate(zip(shape, want)) if i != axis)
        if not rest_fits or shape[axis] == 0 or want[axis] % shape[axis]:
            return
        fractions.add(want[axis] // shape[axis])
        example = example or (name, shape, want)
    if len(fractions) == 1 and (k := fractions.pop()) > 1:
        name, shape, want = example
        raise WeightsError(f"{where}: a shard seems missing: tensor {name} has shape {shape}, 1/{k} of the "
                           f"config's {want}, and so has every split tensor; {n_shards} consolidated.NN.pth "
                           f"found, the config's shapes need {n_shards * k}")


def open_meta(directory: "str | Path") -> SimpleNamespace:
    """A Meta checkpoint's config and shard headers, every name and shape checked; no tensor is read.

    Returns a namespace: args, paths, shards (name -> TorchTensor per shard), names (the tensors to read:
    a tied output matrix is not among them), joined (name -> (joined shape, split axis)), where, dtypes.
    """
    directory = Path(directory)
    paths = shard_paths(directory)
    shards = [read_torch_file(p) for p in paths]
    args = read_meta_params(directory, shards)
    names = [n for n in shards[0] if n not in IGNORED]
    for p, s in zip(paths[1:], shards[1:]):
        if set(s) - IGNORED != set(names):
            diff = sorted((set(s) ^ set(shards[0])) - IGNORED)
            raise WeightsError(f"{p}: tensor {diff[0]} is in one shard but not the other")

    # Llama 3.2's small models save output.weight as the very same storage as tok_embeddings.weight.
    first = shards[0]
    tied = ("output.weight" in first and "tok_embeddings.weight" in first
            and first["output.weight"].storage == first["tok_embeddings.weight"].storage
            and first["output.weight"].storage_offset == first["tok_embeddings.weight"].storage_offset)
    if tied or ("output.weight" not in first and args.tie_word_embeddings):
        args = args.replace(tie_word_embeddings=True)
        names = [n for n in names if n != "output.weight"]

    where = str(directory)
    # Every name and shape is checked against the config from the headers alone, before any tensor is
    # read, so a damaged or hostile file costs nothing.
    joined = joined_shapes(args, shards, names, where)
    check_missing_shard(args, joined, len(shards), where)
    lazy = {name: SimpleNamespace(shape=shape) for name, (shape, _) in joined.items()}
    if args.tie_word_embeddings and "tok_embeddings.weight" in lazy:
        lazy["output.weight"] = lazy["tok_embeddings.weight"]
    check_weights(args, lazy, where)
    dtypes = {shards[0][n].dtype_name for n in names if not n.endswith("norm.weight")}
    return SimpleNamespace(args=args, paths=paths, shards=shards, names=names, joined=joined, where=where,
                           dtypes=dtypes)


def load_meta(directory: "str | Path", keep: str = "stored", progress: bool = False, mmap: bool = False):
    """Read a Meta checkpoint directory. Returns (args, weights, extras) like load_gguf."""
    directory = Path(directory)
    check_keep(keep)
    ckpt = open_meta(directory)
    args, paths, shards, names, joined, where = (ckpt.args, ckpt.paths, ckpt.shards, ckpt.names, ckpt.joined,
                                                 ckpt.where)
    first, dtypes = shards[0], ckpt.dtypes

    weights: dict = {}
    if progress:
        from tqdm import tqdm
        names = tqdm(names, desc=f"loading {directory.name}", unit="tensor", leave=False)
    for name in names:
        if len(shards) == 1:
            weights[name] = keep_tensor(first[name], keep, name, mmap=mmap)
            continue
        # Read each shard's piece (owned copies) and join them: one tensor's pieces in memory at a time.
        pieces = [s[name].read() for s in shards]
        weights[name] = finish(merge_raw(pieces, joined[name][1], where, name), first[name].dtype_name, keep, name)
        del pieces
    if args.tie_word_embeddings and "tok_embeddings.weight" in weights:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return args, weights, {"format": "meta", "dtype": "/".join(sorted(dtypes)), "shards": len(shards),
                           "files": paths}
