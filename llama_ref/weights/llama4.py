"""Llama 4 checkpoints, Meta's and Hugging Face's, read into llama_ref's layout (weights.common.expected_shapes).

Both formats store the experts of a layer as stacked 3-D tensors multiplied from the left (x @ W); llama_ref
keeps each expert as matrices of its own, stored (out, in) like every other weight, so the packed-weight and
kernel code for matrices applies to them unchanged and a token reads only its experts' bytes.

Meta (params.json + consolidated.00.pth), as its llama4 modules name them, or as the files name them before
the modules' load hooks rename them (both are accepted):
    attention.wq/wk/wv.weight, or attention.wqkv.weight      rows: queries, keys, values
    attention_norm.weight, or attention.wqkv.layer_norm_weight
    ffn_norm.weight, or feed_forward.norm.weight / feed_forward.mlp.layer_norm_weight
    feed_forward.w1/w2/w3.weight, or feed_forward.mlp.fc1_weight (w1 rows then w3 rows) / mlp.fc2_weight
    feed_forward.router_DE                         (D, E)
    feed_forward.experts.w1 / w3, or .moe_w_in_eD_F / .moe_w_swiglu_eD_F     (E, D, FE), or (E*D, FE)
    feed_forward.experts.w2, or .moe_w_out_eF_D                               (E, FE, D), or (E*FE, D)
    feed_forward.shared_expert.w1/w2/w3.weight, or feed_forward.w_in_shared_FD / w_swiglu_FD / w_out_shared_DF
Hugging Face (Llama4ForCausalLM, or the language_model of Llama4ForConditionalGeneration):
    feed_forward.router.weight (E, D); feed_forward.experts.gate_up_proj (E, D, 2 FE): gate columns then up;
    feed_forward.experts.down_proj (E, FE, D); feed_forward.shared_expert.{gate,up,down}_proj.weight.
    Queries and keys keep Meta's adjacent RoPE pairs (transformers' Llama 4 rotates complex pairs like Meta's),
    so no row is permuted, unlike a Llama checkpoint.
Vision tensors (Meta's vision_embeddings / vision_projection, HF's vision_model / multi_modal_projector) are
skipped: llama_ref runs the text model. Model-parallel Meta shards are joined along the axes Meta's fairscale
layers cut (split_axis).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..model.config import _read_json, from_hf_config, from_params_json
from ..errors import LlamaRefError
from .common import WeightsError, check_layer_count, expected_shapes
from .keep import check_keep, finish

VISION_PREFIXES = ("vision_embeddings.", "vision_projection.", "vision_model.", "multi_modal_projector.")
LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")


class _Plan:
    """Canonical name -> (source tensor name, expected source shape, function from the source's raw array)."""

    def __init__(self, where: str):
        self.where, self.items = where, {}

    def add(self, name: str, source: str, source_shape: tuple, fn=None) -> None:
        if name in self.items:
            raise WeightsError(f"{self.where}: tensor {name} is given twice (as {self.items[name][0]} and {source})")
        self.items[name] = (source, tuple(source_shape), fn)


def check_plan(plan: _Plan, tensors: dict, args) -> None:
    """Every canonical tensor planned, nothing else, and every source of the shape the config implies."""
    where = plan.where
    want = expected_shapes(args)
    missing = [n for n in want if n not in plan.items]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{where}: tensor {missing[0]} is missing{more}")
    extra = [n for n in plan.items if n not in want]
    if extra:
        raise WeightsError(f"{where}: unexpected tensor {plan.items[extra[0]][0]} for this Llama 4 config")
    for name, (source, shape, _) in plan.items.items():
        got = tuple(tensors[source].shape)
        if got != shape:
            raise WeightsError(f"{where}: tensor {source} has shape {got}, the config implies {shape}")


def _read_plan(plan: _Plan, tensors: dict, args, progress: bool, label: str) -> dict:
    """Check the plan (check_plan), then read. Returns canonical name -> (raw elements, stored dtype name)."""
    check_plan(plan, tensors, args)
    want = expected_shapes(args)
    # Read each source once (sorted by source, so a stacked expert tensor is in memory once at a time).
    order = sorted(plan.items.items(), key=lambda item: item[1][0])
    if progress:
        from tqdm import tqdm
        order = tqdm(order, desc=f"loading {label}", unit="tensor", leave=False)
    weights, current, raw = {}, None, None
    for name, (source, _, fn) in order:
        if source != current:
            current, raw = source, tensors[source].read()
        part = np.ascontiguousarray(raw if fn is None else fn(raw))
        if part.shape != want[name]:  # a bug in the plan, never the file's fault
            raise AssertionError(f"{name}: made {part.shape}, expected {want[name]}")
        weights[name] = (part, tensors[source].dtype_name)
    return weights


def _rows(start: int, stop: int):
    return lambda raw: raw[start:stop]


def _expert(e: int, rows: "slice | None" = None, cols: "slice | None" = None):
    """Expert e of a stacked (E, in, out) tensor as an (out, in) matrix; rows/cols select part of in/out."""
    return lambda raw: raw[e][rows or slice(None), cols or slice(None)].T


def split_axis(name: str) -> "int | None":
    """The axis along which Meta's model-parallel layers cut canonical tensor `name` (None: each rank holds it
    whole). Column-parallel (wq, wk, wv, w1, w3 of dense layers and experts, output, the vocabulary-parallel
    embedding) cut output rows; row-parallel (wo, w2) input columns; norms and the router are replicated."""
    if name.endswith(("norm.weight", "router.weight")):
        return None
    return 1 if name.endswith(("attention.wo.weight", "w2.weight")) else 0


def shard_args(args, n: int, where: str):
    """The config one of n model-parallel shards holds: heads, vocabulary and FFN widths divided by n."""
    from dataclasses import replace

    m = args.llama4
    for what, value in (("n_heads", args.n_heads), ("n_kv_heads", args.kv_heads), ("vocab_size", args.vocab_size),
                        ("the dense FFN width", args.ffn_hidden_dim), ("the expert width", m.expert_hidden_dim)):
        if value % n:
            raise WeightsError(f"{where}: {n} model-parallel shards do not divide {what} ({value})")
    return args.replace(n_heads=args.n_heads // n, n_kv_heads=args.kv_heads // n, vocab_size=args.vocab_size // n,
                        hidden_dim=args.ffn_hidden_dim // n, head_dim_override=args.head_dim,
                        llama4=replace(m, expert_hidden_dim=m.expert_hidden_dim // n))


def _meta_plan(args, tensors: dict, where: str) -> _Plan:
    """Where each canonical tensor comes from in one Meta shard whose config (its slice) is args."""
    m = args.llama4
    d, hd, E, FE = args.dim, args.head_dim, m.n_experts, m.expert_hidden_dim
    q_rows, kv_rows = args.n_heads * hd, args.kv_heads * hd
    want = expected_shapes(args)
    plan = _Plan(where)
    for source, t in tensors.items():
        match = LAYER_RE.match(source)
        if not match:
            plan.add(source, source, want.get(source, t.shape))  # tok_embeddings, norm, output
            continue
        p, rest = f"layers.{match.group(1)}.", match.group(2)
        if rest == "attention.wqkv.weight":
            plan.add(p + "attention.wq.weight", source, (q_rows + 2 * kv_rows, d), _rows(0, q_rows))
            plan.add(p + "attention.wk.weight", source, (q_rows + 2 * kv_rows, d), _rows(q_rows, q_rows + kv_rows))
            plan.add(p + "attention.wv.weight", source, (q_rows + 2 * kv_rows, d), _rows(q_rows + kv_rows, None))
        elif rest == "attention.wqkv.layer_norm_weight":
            plan.add(p + "attention_norm.weight", source, (d,))
        elif rest in ("feed_forward.norm.weight", "feed_forward.mlp.layer_norm_weight"):
            plan.add(p + "ffn_norm.weight", source, (d,))
        elif rest == "feed_forward.mlp.fc1_weight":
            f = args.ffn_hidden_dim
            plan.add(p + "feed_forward.w1.weight", source, (2 * f, d), _rows(0, f))
            plan.add(p + "feed_forward.w3.weight", source, (2 * f, d), _rows(f, None))
        elif rest == "feed_forward.mlp.fc2_weight":
            plan.add(p + "feed_forward.w2.weight", source, (d, args.ffn_hidden_dim))
        elif rest == "feed_forward.router_DE":
            plan.add(p + "feed_forward.router.weight", source, (d, E), lambda raw: raw.T)
        elif rest in ("feed_forward.w_in_shared_FD.weight", "feed_forward.w_swiglu_FD.weight",
                      "feed_forward.w_out_shared_DF.weight"):
            which = {"w_in_shared_FD": "w1", "w_swiglu_FD": "w3", "w_out_shared_DF": "w2"}[rest.split(".")[1]]
            plan.add(f"{p}feed_forward.shared_expert.{which}.weight", source, (d, FE) if which == "w2" else (FE, d))
        elif rest.startswith("feed_forward.experts."):
            which = {"w1": "w1", "w3": "w3", "w2": "w2", "moe_w_in_eD_F": "w1", "moe_w_swiglu_eD_F": "w3",
                     "moe_w_out_eF_D": "w2"}.get(rest.split(".")[2])
            if which is None:
                raise WeightsError(f"{where}: unexpected tensor {source} for a Llama 4 model")
            stacked = (E, FE, d) if which == "w2" else (E, d, FE)
            flat = rest.split(".")[2].startswith("moe_")  # the files' (E*in, out) form
            shape = (stacked[0] * stacked[1], stacked[2]) if flat else stacked
            for e in range(E):
                fn = _expert(e)
                if flat:
                    fn = (lambda e: lambda raw: raw.reshape(stacked)[e].T)(e)
                plan.add(f"{p}feed_forward.experts.{e}.{which}.weight", source, shape, fn)
        else:
            plan.add(source, source, want.get(source, t.shape))  # already canonical (attention.wq.weight, ...)
    if args.tie_word_embeddings and "output.weight" not in plan.items:
        plan.add("output.weight", "tok_embeddings.weight", (args.vocab_size, d))
    return plan


def load_llama4_meta(directory: Path, keep: str = "stored", progress: bool = False):
    """A Meta Llama 4 checkpoint directory, one file or model-parallel shards. Returns (args, weights, extras)
    like load_meta. Shards are read whole and joined (split_axis), one shard's pieces beside the others'."""
    from .keep import merge_raw
    from .meta import shard_paths
    from .torch_zip import read_torch_file

    directory = Path(directory)
    check_keep(keep)
    paths = shard_paths(directory)
    where = str(directory)
    args = from_params_json(_read_json(directory / "params.json"), where=str(directory / "params.json"))
    shards = [{n: t for n, t in read_torch_file(p).items()
               if n != "rope.freqs" and not n.startswith(VISION_PREFIXES) and not n.endswith("._extra_state")}
              for p in paths]
    for p, tensors in zip(paths, shards):
        check_layer_count(args, tensors, str(p))
    local = args if len(shards) == 1 else shard_args(args, len(shards), where)
    plans = [_meta_plan(local, tensors, str(p)) for p, tensors in zip(paths, shards)]  # all checked before reading
    pieces = [_read_plan(plan, tensors, local, progress, p.name) for p, plan, tensors in zip(paths, plans, shards)]
    weights = {}
    for name in pieces[0]:
        raw = merge_raw([piece[name][0] for piece in pieces], split_axis(name), where, name)
        weights[name] = finish(raw, pieces[0][name][1], keep, name)
    dtypes = {t.dtype_name for n, t in shards[0].items() if not n.endswith(("norm.weight", "norm_weight"))}
    return args, weights, {"format": "meta", "dtype": "/".join(sorted(dtypes)), "shards": len(shards),
                           "files": paths}


def open_llama4_meta(directory: Path):
    """(args, lazy tensors by source name, plan) of a single-file Meta Llama 4 checkpoint; nothing is read yet.
    (Model-parallel shards are joined by load_llama4_meta.)"""
    from .meta import shard_paths
    from .torch_zip import read_torch_file

    directory = Path(directory)
    paths = shard_paths(directory)
    if len(paths) != 1:
        raise WeightsError(f"{directory}: {len(paths)} model-parallel shards; open_llama4_meta reads one file")
    args = from_params_json(_read_json(directory / "params.json"), where=str(directory / "params.json"))
    tensors = {n: t for n, t in read_torch_file(paths[0]).items()
               if n != "rope.freqs" and not n.startswith(VISION_PREFIXES) and not n.endswith("._extra_state")}
    check_layer_count(args, tensors, str(paths[0]))
    return args, tensors, _meta_plan(args, tensors, str(paths[0]))


HF_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "feed_forward.router.weight": "feed_forward.router.weight",
    "feed_forward.gate_proj.weight": "feed_forward.w1.weight", "feed_forward.up_proj.weight": "feed_forward.w3.weight",
    "feed_forward.down_proj.weight": "feed_forward.w2.weight",
    "feed_forward.shared_expert.gate_proj.weight": "feed_forward.shared_expert.w1.weight",
    "feed_forward.shared_expert.up_proj.weight": "feed_forward.shared_expert.w3.weight",
    "feed_forward.shared_expert.down_proj.weight": "feed_forward.shared_expert.w2.weight",
}
HF_TOP = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
          "lm_head.weight": "output.weight"}


def load_llama4_hf(directory: Path, keep: str = "stored", progress: bool = False):
    """A Hugging Face Llama 4 checkpoint directory. Returns (args, weights, extras) like load_hf."""
    from .hf import hf_tensor_files

    directory = Path(directory)
    check_keep(keep)
    args, tensors, plan = open_llama4_hf(directory)
    weights = {name: finish(raw, dtype, keep, name)
               for name, (raw, dtype) in _read_plan(plan, tensors, args, progress, directory.name).items()}
    dtypes = {t.dtype_name for n, t in tensors.items() if not n.endswith("norm.weight")}
    return args, weights, {"format": "hf", "dtype": "/".join(sorted(dtypes)), "files": hf_tensor_files(directory)}


def open_llama4_hf(directory: Path):
    """(args, lazy tensors by source name, plan) of a Hugging Face Llama 4 directory; nothing is read yet."""
    from .hf import read_hf_tensors

    where = str(directory)
    args = from_hf_config(directory / "config.json")
    m = args.llama4
    d, E, FE = args.dim, m.n_experts, m.expert_hidden_dim
    tensors = {}
    for name, t in read_hf_tensors(directory).items():
        if name.startswith(VISION_PREFIXES):
            continue
        tensors[name[len("language_model."):] if name.startswith("language_model.") else name] = t
    check_layer_count(args, {n[len("model."):] for n in tensors if n.startswith("model.layers.")}, where)
    want = expected_shapes(args)
    plan = _Plan(where)
    for source, t in tensors.items():
        match = re.match(r"^model\.layers\.(\d+)\.(.+)$", source)
        if not match:
            if source not in HF_TOP:
                raise WeightsError(f"{where}: unexpected tensor {source} for a Llama 4 model")
            plan.add(HF_TOP[source], source, want.get(HF_TOP[source], t.shape))
            continue
        p, rest = f"layers.{match.group(1)}.", match.group(2)
        if rest == "feed_forward.experts.gate_up_proj":
            for e in range(E):
                plan.add(f"{p}feed_forward.experts.{e}.w1.weight", source, (E, d, 2 * FE),
                         _expert(e, None, slice(0, FE)))
                plan.add(f"{p}feed_forward.experts.{e}.w3.weight", source, (E, d, 2 * FE),
                         _expert(e, None, slice(FE, None)))
        elif rest == "feed_forward.experts.down_proj":
            for e in range(E):
                plan.add(f"{p}feed_forward.experts.{e}.w2.weight", source, (E, FE, d), _expert(e))
        elif rest in HF_LAYER:
            name = p + HF_LAYER[rest]
            plan.add(name, source, want.get(name, t.shape))
        else:
            raise WeightsError(f"{where}: unexpected tensor {source} for a Llama 4 model")
    if args.tie_word_embeddings:
        plan.items.pop("output.weight", None)  # like transformers: a stored lm_head is not used when tied
        plan.add("output.weight", "model.embed_tokens.weight", (args.vocab_size, d))
    elif "output.weight" not in plan.items:
        raise WeightsError(f"{where}: tensor lm_head.weight is missing (and config.json does not tie word "
                           f"embeddings)")
    return args, tensors, plan


def is_llama4_directory(path: Path, kind: str) -> bool:
    """Whether a Meta / HF checkpoint directory holds a Llama 4 model (by its config file alone)."""
    from ..model.llama4_config import is_llama4_params

    try:
        if kind == "meta" and (path / "params.json").is_file():
            params = _read_json(path / "params.json")  # Meta's keys, or the llama4 block llama_ref writes
            return is_llama4_params(params) or params.get("llama4") is not None
        if kind == "hf" and (path / "config.json").is_file():
            return _read_json(path / "config.json").get("model_type") in ("llama4", "llama4_text")
    except LlamaRefError:  # an unreadable config: the format's own loader reports it with its file name
        return False
    return False
