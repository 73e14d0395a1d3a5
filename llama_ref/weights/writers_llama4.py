"""Writing a Llama 4 model (weights in llama_ref's layout) as Meta's, Hugging Face's or llama.cpp's files.

Each format gets the tensor layout its own loaders read (weights.llama4 and weights.gguf_llama4 read them
back):
  meta  the state dict of Meta's llama4 Transformer: feed_forward.router_DE (D, E), feed_forward.experts.w1 /
        w3 (E, D, FE) and w2 (E, FE, D) stacked and multiplied from the left, feed_forward.shared_expert.*;
        params.json in llama_ref's form (as for dense models: the Llama 4 settings as a "llama4" block, the
        widths stated, since Meta's own keys derive them from formulas not every model fits)
  hf    Llama4ForCausalLM: experts.gate_up_proj (E, D, 2 FE), experts.down_proj (E, FE, D), q/k rows unpermuted
        (transformers' Llama 4 rotates adjacent pairs, like Meta); config.json llama4_text with the NoPE and
        MoE layers listed
  gguf  llama.cpp's llama4 architecture, as its convert_hf_to_gguf.py writes it. llama.cpp fixes the chunk
        size, the NoPE layers, the temperature tuning and the QK norm in code (weights.gguf_llama4), so a model
        whose values differ cannot be written faithfully and is refused, naming the value.
"""

from __future__ import annotations

import numpy as np

from ..model.config import ModelArgs
from .common import WeightsError


def _is_moe(args: ModelArgs, i: int) -> bool:
    return i in args.llama4.moe_layers


def _experts(args, weights, prefix: str, which: str, out: str, raw_elements, transpose: bool) -> np.ndarray:
    """The n_experts matrices `which` of one layer stacked: (E, out, in), or (E, in, out) when transposed."""
    mats = [raw_elements(weights[f"{prefix}experts.{e}.{which}.weight"], out) for e in range(args.llama4.n_experts)]
    return np.ascontiguousarray(np.stack([m.T if transpose else m for m in mats]))


def meta_tensors(args: ModelArgs, weights: dict, out: str, raw_elements) -> list[tuple[str, np.ndarray]]:
    """(name, raw elements) of Meta's llama4 state dict, in its order."""
    from .common import expected_shapes

    items = []
    for name in expected_shapes(args):
        if ".experts." in name or ".router." in name:
            continue
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        items.append((name, raw_elements(weights[name], out)))
    for i in args.llama4.moe_layers:
        p = f"layers.{i}.feed_forward."
        items.append((p + "router_DE", np.ascontiguousarray(raw_elements(weights[p + "router.weight"], out).T)))
        for which in ("w1", "w2", "w3"):
            items.append((f"{p}experts.{which}", _experts(args, weights, p, which, out, raw_elements, True)))
    return items


def meta_shard_tensors(args: ModelArgs, weights: dict, out: str, raw_elements, shards: int) -> list[list]:
    """Meta's llama4 state dict cut into `shards` model-parallel shards, as its fairscale layers cut it
    (weights.llama4.split_axis: the axis load_llama4_meta joins shards along; each count must divide what it
    cuts, as fairscale requires). Returns, per shard, (name, raw elements) like meta_tensors."""
    from .llama4 import shard_args, split_axis

    local = shard_args(args, shards, f"--shards {shards}")  # refuses a count that does not divide
    plans = []
    for k in range(shards):
        sliced = {}
        for name in meta_names(args) + [n for n in weights if ".experts." in n]:
            raw = raw_elements(weights[name], out)
            axis = split_axis(name)
            if axis is not None:
                size = raw.shape[axis] // shards
                raw = np.ascontiguousarray(raw[(slice(None),) * axis + (slice(k * size, (k + 1) * size),)])
            sliced[name] = raw
        plans.append(meta_tensors(local, sliced, out, lambda raw, _out: raw))
    return plans


def hf_config(args: ModelArgs, out: str, rope: dict) -> dict:
    """config.json of a Llama4ForCausalLM. rope: the RoPE keys writers.hf_config writes for dense models."""
    m = args.llama4
    chunk = m.attention_chunk_size
    return {
        "architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": m.expert_hidden_dim, "intermediate_size_mlp": args.ffn_hidden_dim,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads, "head_dim": args.head_dim,
        "num_hidden_layers": args.n_layers, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": False,
        "num_local_experts": m.n_experts, "num_experts_per_tok": m.top_k, "moe_layers": list(m.moe_layers),
        "interleave_moe_layer_step": _moe_step(args) or 1,
        "no_rope_layers": [0 if i in m.nope_layers else 1 for i in range(args.n_layers)],
        "attention_chunk_size": chunk,
        "layer_types": ["chunked_attention" if i not in m.nope_layers and chunk is not None else "full_attention"
                        for i in range(args.n_layers)],
        "use_qk_norm": m.use_qk_norm, "attn_temperature_tuning": m.attn_temperature_tuning,
        "floor_scale": int(m.floor_scale) if float(m.floor_scale).is_integer() else m.floor_scale,
        "attn_scale": m.attn_scale,
        **rope,
    }


def hf_tensors(args: ModelArgs, weights: dict, out: str, raw_elements) -> list[tuple[str, np.ndarray]]:
    """(name, raw elements) of a Llama4ForCausalLM's safetensors."""
    from .llama4 import HF_LAYER, HF_TOP

    to_hf = {v: k for k, v in HF_LAYER.items()}
    top = {v: k for k, v in HF_TOP.items()}
    items = [(top["tok_embeddings.weight"], raw_elements(weights["tok_embeddings.weight"], out))]
    for i in range(args.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        names = ["attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
                 "attention_norm.weight", "ffn_norm.weight"]
        if _is_moe(args, i):
            names += ["feed_forward.router.weight"] + [f"feed_forward.shared_expert.{w}.weight"
                                                      for w in ("w1", "w2", "w3")]
        else:
            names += [f"feed_forward.{w}.weight" for w in ("w1", "w2", "w3")]
        items += [(h + to_hf[n], raw_elements(weights[p + n], out)) for n in names]
        if _is_moe(args, i):
            f = p + "feed_forward."
            gate = _experts(args, weights, f, "w1", out, raw_elements, True)  # (E, D, FE)
            up = _experts(args, weights, f, "w3", out, raw_elements, True)
            gate_up = np.ascontiguousarray(np.concatenate([gate, up], -1))
            items.append((h + "feed_forward.experts.gate_up_proj", gate_up))
            items.append((h + "feed_forward.experts.down_proj",
                          _experts(args, weights, f, "w2", out, raw_elements, True)))
    items.append((top["norm.weight"], raw_elements(weights["norm.weight"], out)))
    if not args.tie_word_embeddings:
        items.append((top["output.weight"], raw_elements(weights["output.weight"], out)))
    return items


def _moe_step(args: ModelArgs) -> "int | None":
    """The interleave step whose MoE layers ((i + 1) % step == 0) are the model's, or None."""
    m = args.llama4
    for step in range(1, args.n_layers + 1):
        if tuple(i for i in range(args.n_layers) if (i + 1) % step == 0) == tuple(m.moe_layers):
            return step
    return None


def check_gguf_expressible(args: ModelArgs) -> None:
    """Refuse a model llama.cpp's llama4 architecture would run as a different one (weights.gguf_llama4)."""
    from ..model import llama4_config as g

    m = args.llama4
    n = args.n_layers
    problems = []
    if m.attention_chunk_size != g.LLAMA_CPP_CHUNK:
        problems.append(f"attention_chunk_size {m.attention_chunk_size} (llama.cpp: {g.LLAMA_CPP_CHUNK})")
    nope = tuple(i for i in range(n) if (i + 1) % g.LLAMA_CPP_NOPE_STEP == 0)
    if tuple(m.nope_layers) != nope:
        problems.append(f"NoPE layers {list(m.nope_layers)} (llama.cpp: every 4th, {list(nope)})")
    if not m.attn_temperature_tuning:
        problems.append("no attention temperature tuning (llama.cpp: always on)")
    elif (m.floor_scale, m.attn_scale) != (g.LLAMA_CPP_FLOOR_SCALE, g.LLAMA_CPP_ATTN_SCALE):
        problems.append(f"floor_scale {m.floor_scale} and attn_scale {m.attn_scale} (llama.cpp: "
                        f"{g.LLAMA_CPP_FLOOR_SCALE:g} and {g.LLAMA_CPP_ATTN_SCALE})")
    if m.use_qk_norm != (m.n_experts != g.LLAMA_CPP_NO_QK_NORM_EXPERTS):
        problems.append(f"use_qk_norm {m.use_qk_norm} with {m.n_experts} experts (llama.cpp: QK norm exactly "
                        f"when there are not {g.LLAMA_CPP_NO_QK_NORM_EXPERTS} experts)")
    if _moe_step(args) is None:
        problems.append(f"MoE layers {list(m.moe_layers)} (llama.cpp: every k-th layer)")
    if problems:
        raise WeightsError("cannot write this Llama 4 model as a llama.cpp GGUF: llama.cpp's llama4 architecture "
                           "fixes these values in its code, and would compute a different model: "
                           + "; ".join(problems))


def add_gguf_hyperparameters(w, args: ModelArgs) -> None:
    """The llama4.* keys llama.cpp's convert_hf_to_gguf.py writes for a Llama 4 text model."""
    check_gguf_expressible(args)
    m = args.llama4
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_expert_count(m.n_experts)
    w.add_expert_used_count(m.top_k)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_interleave_moe_layer_step(_moe_step(args))
    w.add_expert_feed_forward_length(m.expert_hidden_dim)
    if args.rope_scaling is not None and args.rope_scaling.kind == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(args.rope_scaling.factor)


def gguf_tensors(args: ModelArgs, weights: dict, out: str, raw_elements) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, numpy array) in llama.cpp's llama4 names; norms and routers in float32."""
    from .gguf_llama4 import META_TO_GGUF

    def gname(name):
        if name.startswith("layers."):
            _, i, rest = name.split(".", 2)
            return META_TO_GGUF[f"layers.{{i}}.{rest}"].format(i=i)
        return META_TO_GGUF[name]

    items = []
    for name in meta_names(args):
        kind = "f32" if name.endswith(("norm.weight", "router.weight")) else out
        items.append((gname(name), raw_elements(weights[name], kind)))
    for i in args.llama4.moe_layers:
        p = f"layers.{i}.feed_forward."
        for which, g in (("w1", "ffn_gate_exps"), ("w2", "ffn_down_exps"), ("w3", "ffn_up_exps")):
            items.append((f"blk.{i}.{g}.weight", _experts(args, weights, p, which, out, raw_elements, False)))
    return items


def meta_names(args: ModelArgs) -> list[str]:
    """Canonical names of every tensor but the routed experts' (and a tied output)."""
    from .common import expected_shapes

    return [n for n in expected_shapes(args)
            if ".experts." not in n and not (n == "output.weight" and args.tie_word_embeddings)]
