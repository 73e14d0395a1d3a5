"""Llama 4's architecture settings, read from Meta's params.json, Hugging Face's config.json or the llama4.*
keys of a GGUF file (with the values llama.cpp fixes in its code: weights/gguf_llama4.py).

A Llama 4 text model is a Llama decoder with four changes, each set by the model's own files:
  * mixture of experts: in every `moe_layers` layer the feed-forward is a router choosing top_k of n_experts
    SwiGLU experts per token, plus one shared expert every token passes through;
  * NoPE layers: the `nope_layers` attend without RoPE (and, with temperature tuning, with their queries
    scaled up by a slowly growing function of the position);
  * chunked attention: the RoPE layers attend only to keys of their own chunk of attention_chunk_size
    positions (positions 0..C-1, C..2C-1, ...);
  * QK norm: the RoPE layers' queries and keys are L2-normalised (RMSNorm without a weight) after RoPE.

The widths follow Meta's llama4 code: a dense layer's FFN uses the Llama formula (config.ffn_hidden_size);
an expert's (and the shared expert's) width starts from ffn_exp * dim, then 2/3, ffn_dim_multiplier, and,
with auto_scale_F, a division by capacity_factor + 1, rounded up to multiple_of. Hugging Face's config.json
states both widths outright (intermediate_size for experts, intermediate_size_mlp for dense layers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from .config import (ConfigError, ModelArgs, RopeScaling, _flag, _float_value, _hf_rope, _int_value,
                     _is_finite_number, _is_int, _refuse_unimplemented, ffn_hidden_size, naming_errors)


@dataclass(frozen=True)
class Llama4Args:
    """The Llama 4 part of ModelArgs (ModelArgs.llama4). Layer sets are tuples of layer indices."""

    n_experts: int
    top_k: int
    moe_layers: tuple  # layers whose feed-forward is the mixture of experts; the others are dense SwiGLU
    expert_hidden_dim: int  # width of each routed expert and of the shared expert
    nope_layers: tuple = ()  # layers without RoPE (and without chunking or QK norm)
    attention_chunk_size: Optional[int] = None  # None: every layer attends to the whole causal past
    use_qk_norm: bool = False
    attn_temperature_tuning: bool = False
    floor_scale: float = 8192.0
    attn_scale: float = 0.1

    def __post_init__(self):
        for name in ("n_experts", "top_k", "expert_hidden_dim"):
            value = getattr(self, name)
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"Llama 4 field {name} must be a positive integer, got {value!r}")
        if self.top_k > self.n_experts:
            raise ConfigError(f"Llama 4 top_k ({self.top_k}) exceeds the number of experts ({self.n_experts})")
        chunk = self.attention_chunk_size
        if chunk is not None and (not _is_int(chunk) or chunk <= 0):
            raise ConfigError(f"attention_chunk_size must be a positive integer, got {chunk!r}")
        for name in ("floor_scale", "attn_scale"):
            if not _is_finite_number(getattr(self, name)):
                raise ConfigError(f"Llama 4 field {name} must be a finite number, got {getattr(self, name)!r}")
        if not self.floor_scale > 0:
            raise ConfigError(f"floor_scale must be > 0, got {self.floor_scale}")
        for name in ("moe_layers", "nope_layers"):
            layers = getattr(self, name)
            if not isinstance(layers, tuple) or not all(_is_int(i) and i >= 0 for i in layers):
                raise ConfigError(f"Llama 4 field {name} must be a tuple of layer indices, got {layers!r}")

    def check_layers(self, n_layers: int) -> None:
        for name in ("moe_layers", "nope_layers"):
            bad = [i for i in getattr(self, name) if i >= n_layers]
            if bad:
                raise ConfigError(f"Llama 4 {name} names layer {bad[0]}, the model has {n_layers}")


# ---- parameter counts ---------------------------------------------------------------------------------------

def param_counts(args: ModelArgs) -> tuple[int, int]:
    """(total, active) parameters of a Llama 4 text model; active = those one token's forward pass reads
    (every expert it is routed to, top_k per MoE layer, and everything outside the routed experts)."""
    m = args.llama4
    d, hd = args.dim, args.head_dim
    attention = d * args.n_heads * hd * 2 + d * args.kv_heads * hd * 2  # wq, wo, wk, wv
    expert = 3 * d * m.expert_hidden_dim  # w1, w2, w3 of one expert (the shared expert has the same shape)
    total = active = 0
    for i in range(args.n_layers):
        total += attention + 2 * d  # and the two norms
        if i in m.moe_layers:
            total += d * m.n_experts + expert * (1 + m.n_experts)  # router, shared expert, routed experts
            active -= expert * (m.n_experts - m.top_k)  # the experts a token is not routed to
        else:
            total += 3 * d * args.ffn_hidden_dim
    total += args.vocab_size * d * (1 if args.tie_word_embeddings else 2) + d
    return total, total + active


def moe_shapes(args: ModelArgs, prefix: str) -> dict[str, tuple[int, ...]]:
    """The feed-forward tensors of one MoE layer in llama_ref's layout, names starting with `prefix` (Meta's
    names; each expert a matrix of its own, stored (out, in) like every other weight; the router
    (n_experts, D) like a Linear). weights.common.expected_shapes puts them in place of the dense w1/w2/w3."""
    m = args.llama4
    d, fe = args.dim, m.expert_hidden_dim
    shapes = {prefix + "router.weight": (m.n_experts, d)}
    for name in ("shared_expert", *(f"experts.{e}" for e in range(m.n_experts))):
        shapes.update({f"{prefix}{name}.w1.weight": (fe, d), f"{prefix}{name}.w2.weight": (d, fe),
                       f"{prefix}{name}.w3.weight": (fe, d)})
    return shapes


# ---- Meta's params.json -------------------------------------------------------------------------------------

# Keys of a params.json that only Llama 4 writes (llama-models llama4/args.py): their presence makes it one.
PARAMS_LLAMA4_KEYS = ("moe_args", "nope_layer_interval", "attention_chunk_size", "use_qk_norm",
                      "attn_temperature_tuning", "ffn_exp", "floor_scale", "attn_scale")
MOE_ARGS_KEYS = {"num_experts", "capacity_factor", "auto_scale_F", "top_k", "interleave_moe_layer_step"}
# Still refused in a Llama 4 params.json (a quantized checkpoint's tensors, LoRA adapters). vision_args is
# accepted: Llama 4 fuses images early, into the token embeddings, so the text path is the same without
# images; llama_ref runs text only and skips the vision tensors.
PARAMS_LLAMA4_REFUSED = {"quantization_args": (), "lora_args": ()}


def llama4_block(block, n_layers: int, where: str) -> Llama4Args:
    """The "llama4" object of a params.json written by llama_ref (ModelArgs.to_params_json)."""
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: llama4 must be a JSON object, got {json.dumps(block)}")
    fields = set(Llama4Args.__dataclass_fields__)
    unknown = sorted(set(block) - fields)
    if unknown:
        raise ConfigError(f"{where}: llama4.{unknown[0]} is not implemented by llama_ref")
    try:
        args = Llama4Args(**{k: tuple(v) if isinstance(v, list) else v for k, v in block.items()})
    except TypeError as e:
        raise ConfigError(f"{where}: llama4 block: {e}") from None
    args.check_layers(n_layers)
    return args


def refuse_writing(args: ModelArgs, what: str) -> None:
    """Writers of other formats' files know dense Llama only: a Llama 4 model would be written as another."""
    if args.llama4 is not None:
        from ..weights.common import WeightsError
        raise WeightsError(f"writing a Llama 4 model as {what} is not implemented by llama_ref")


# The per-layer tables (MoE and NoPE layers) are built from the config, before any tensor is seen: a damaged or
# hostile layer count must not make them unbounded. Far above any Llama (Llama 3.1 405B: 126 layers).
MAX_LAYERS = 4096


def _layer_count(n: int, key: str) -> int:
    if not 0 < n <= MAX_LAYERS:
        raise ConfigError(f"{key} is {n}: a Llama 4 model has 1 .. {MAX_LAYERS} layers")
    return n


def is_llama4_params(p: dict) -> bool:
    return any(p.get(key) not in (None, False) for key in PARAMS_LLAMA4_KEYS)


def moe_hidden_size(dim: int, ffn_exp: float, ffn_dim_multiplier: float, multiple_of: int,
                    capacity_factor: float, auto_scale: bool) -> int:
    """An expert's width as Meta's llama4 MoE derives it."""
    hidden = int(ffn_exp * dim)
    hidden = int(2 * hidden / 3)
    hidden = int(ffn_dim_multiplier * hidden)
    if auto_scale:  # keep the activated parameters those of a dense layer: routed + shared expert
        hidden = int(hidden / (capacity_factor + 1))
    return hidden + (-hidden % multiple_of)


def from_llama4_params(p: dict, where: str) -> ModelArgs:
    """A Llama 4 params.json (llama-models llama4/args.py keys and defaults)."""
    _refuse_unimplemented(p, PARAMS_LLAMA4_REFUSED, where)
    with naming_errors(where):
        dim, n_heads = _int_value(p["dim"], "dim", where), _int_value(p["n_heads"], "n_heads", where)
        n_layers = _layer_count(_int_value(p["n_layers"], "n_layers", where), "n_layers")
        if p.get("head_dim") is not None and _int_value(p["head_dim"], "head_dim", where) != dim // n_heads:
            # Meta's Attention uses dim // n_heads whatever head_dim says.
            raise ConfigError(f"{where}: head_dim {p['head_dim']} differs from dim // n_heads, which Meta's "
                              f"llama4 attention would use instead; refusing to guess")
        multiple_of = _int_value(p.get("multiple_of", 256), "multiple_of", where)
        multiplier = p.get("ffn_dim_multiplier")
        multiplier = None if multiplier is None else _float_value(multiplier, "ffn_dim_multiplier", where)
        moe = p.get("moe_args")
        if moe is None:
            raise ConfigError(f"{where}: a Llama 4 params.json without moe_args (a dense Llama 4) is not "
                              f"implemented by llama_ref")
        if not isinstance(moe, dict):
            raise ConfigError(f"{where}: moe_args must be a JSON object, got {json.dumps(moe)}")
        unknown = sorted(set(moe) - MOE_ARGS_KEYS)
        if unknown:
            raise ConfigError(f"{where}: moe_args.{unknown[0]} is not implemented by llama_ref")
        n_experts = _int_value(moe.get("num_experts", -1), "moe_args.num_experts", where)
        step = _int_value(moe.get("interleave_moe_layer_step", 1), "moe_args.interleave_moe_layer_step", where)
        if step <= 0:
            raise ConfigError(f"{where}: moe_args.interleave_moe_layer_step must be > 0, got {step}")
        if p.get("ffn_exp") is None or multiplier is None:
            raise ConfigError(f"{where}: moe_args needs ffn_exp and ffn_dim_multiplier (the experts' width)")
        auto_scale = _flag(moe, "auto_scale_F", where, default=True)
        expert_hidden = moe_hidden_size(dim, _float_value(p["ffn_exp"], "ffn_exp", where), multiplier,
                                        multiple_of, _float_value(moe.get("capacity_factor", 1.0),
                                                                  "moe_args.capacity_factor", where), auto_scale)
        interval = p.get("nope_layer_interval")
        interval = None if interval is None else _int_value(interval, "nope_layer_interval", where)
        if interval is not None and interval <= 0:
            raise ConfigError(f"{where}: nope_layer_interval must be > 0, got {interval}")
        chunk = p.get("attention_chunk_size")
        llama4 = Llama4Args(
            n_experts=n_experts, top_k=_int_value(moe.get("top_k", 1), "moe_args.top_k", where),
            moe_layers=tuple(i for i in range(n_layers) if (i + 1) % step == 0),
            expert_hidden_dim=expert_hidden,
            nope_layers=() if interval is None else tuple(i for i in range(n_layers) if (i + 1) % interval == 0),
            attention_chunk_size=None if chunk is None else _int_value(chunk, "attention_chunk_size", where),
            use_qk_norm=_flag(p, "use_qk_norm", where),
            attn_temperature_tuning=_flag(p, "attn_temperature_tuning", where),
            floor_scale=_float_value(p.get("floor_scale", 8192.0), "floor_scale", where),
            attn_scale=_float_value(p.get("attn_scale", 0.1), "attn_scale", where),
        )
        scaling = None
        if _flag(p, "use_scaled_rope", where):
            # Meta's llama4 apply_scaling: low_freq_factor 1 and an original context of 8192, fixed in the code;
            # the factor and high_freq_factor default to Scout's 16 and 1 (llama4/args.py), not Llama 3.1's.
            scaling = RopeScaling("llama3", _float_value(p.get("rope_scaling_factor", 16.0), "rope_scaling_factor",
                                                         where), 1.0,
                                  _float_value(p.get("rope_high_freq_factor", 1.0), "rope_high_freq_factor", where),
                                  8192)
        kv = p.get("n_kv_heads")
        args = ModelArgs(
            dim=dim, n_layers=n_layers, n_heads=n_heads,
            vocab_size=_int_value(p["vocab_size"], "vocab_size", where),
            n_kv_heads=None if kv is None else _int_value(kv, "n_kv_heads", where),
            multiple_of=multiple_of, ffn_dim_multiplier=multiplier,
            norm_eps=_float_value(p.get("norm_eps", 1e-5), "norm_eps", where),
            rope_theta=_float_value(p.get("rope_theta", 500000.0), "rope_theta", where),  # llama4/args.py default
            rope_scaling=scaling,
            max_seq_len=_int_value(p.get("max_seq_len", 2048), "max_seq_len", where),
            hidden_dim=ffn_hidden_size(dim, multiple_of, multiplier),
            llama4=llama4,
        )
        llama4.check_layers(n_layers)
        return args


# ---- Hugging Face's config.json -----------------------------------------------------------------------------

# Llama4TextConfig keys that would change the mathematics, with the values llama_ref implements.
HF_LLAMA4_PLAIN = {
    "hidden_act": ("silu",),
    "attention_bias": (False,),
    "quantization_config": (),
}
# transformers' Llama4TextConfig defaults, which a config.json that omits a key means.
HF_LLAMA4_DEFAULTS = {"num_experts_per_tok": 1, "num_local_experts": 16, "interleave_moe_layer_step": 1,
                      "use_qk_norm": True, "no_rope_layer_interval": 4, "attention_chunk_size": 8192,
                      "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
                      "rms_norm_eps": 1e-5, "max_position_embeddings": 4096 * 32, "intermediate_size_mlp": 16384}


def text_config(c: dict, where: str) -> dict:
    """The text part of a Llama 4 config.json: the file itself (llama4_text) or its text_config (llama4)."""
    if c.get("model_type") == "llama4":
        text = c.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError(f"{where}: a llama4 config.json without a text_config object")
        return text
    return c


def from_llama4_hf(c: dict, where: str) -> ModelArgs:
    """A transformers Llama4TextConfig (model_type llama4_text, or the text_config of a llama4 config)."""
    c = text_config(c, where)
    _refuse_unimplemented(c, HF_LLAMA4_PLAIN, where)
    c = {**HF_LLAMA4_DEFAULTS, **c}  # an absent key means transformers' default; an explicit null stays null
    with naming_errors(where):
        dim = _int_value(c["hidden_size"], "hidden_size", where)
        n_heads = _int_value(c["num_attention_heads"], "num_attention_heads", where)
        n_layers = _layer_count(_int_value(c["num_hidden_layers"], "num_hidden_layers", where), "num_hidden_layers")
        max_pos = _int_value(c["max_position_embeddings"], "max_position_embeddings", where)
        if c.get("rope_theta") is None and not (c.get("rope_parameters") or {}).get("rope_theta"):
            c["rope_theta"] = 500000.0  # Llama4TextConfig's default_theta
        theta, scaling = _hf_rope(c, where, max_pos)

        def layer_list(key):
            value = c.get(key)
            if not isinstance(value, list) or len(value) != n_layers:
                raise ConfigError(f"{where}: {key} must list one entry per layer ({n_layers}), got "
                                  f"{json.dumps(value)}")
            return value

        step = _int_value(c["interleave_moe_layer_step"], "interleave_moe_layer_step", where)
        if c.get("moe_layers") is not None:
            moe_layers = tuple(_int_value(i, "moe_layers", where) for i in c["moe_layers"])
        else:
            moe_layers = tuple(range(step - 1, n_layers, step))
        if c.get("no_rope_layers"):  # 1 = the layer uses RoPE, 0 = a NoPE layer (transformers' convention)
            flags = layer_list("no_rope_layers")
            if not all(_is_int(v) and v in (0, 1) for v in flags):
                raise ConfigError(f"{where}: no_rope_layers must hold 0 or 1 per layer, got {json.dumps(flags)}")
            uses_rope = [v == 1 for v in flags]
        else:
            interval = _int_value(c["no_rope_layer_interval"], "no_rope_layer_interval", where)
            uses_rope = [(i + 1) % interval != 0 for i in range(n_layers)]
        chunk = c.get("attention_chunk_size")
        chunk = None if chunk is None else _int_value(chunk, "attention_chunk_size", where)
        if c.get("layer_types") is not None:
            implied = ["chunked_attention" if rope and chunk is not None else "full_attention" for rope in uses_rope]
            if layer_list("layer_types") != implied:
                raise ConfigError(f"{where}: layer_types {json.dumps(c['layer_types'])} differ from the chunked "
                                  f"RoPE layers and full NoPE layers llama_ref implements")
        tuning = c["attn_temperature_tuning"]
        if _is_int(tuning):  # some Llama 4 config.json files write 4 here; transformers only tests truth
            tuning = bool(tuning)
        llama4 = Llama4Args(
            n_experts=_int_value(c["num_local_experts"], "num_local_experts", where),
            top_k=_int_value(c["num_experts_per_tok"], "num_experts_per_tok", where),
            moe_layers=moe_layers,
            expert_hidden_dim=_int_value(c["intermediate_size"], "intermediate_size", where),
            nope_layers=tuple(i for i, rope in enumerate(uses_rope) if not rope),
            attention_chunk_size=chunk,
            use_qk_norm=_flag(c, "use_qk_norm", where),
            attn_temperature_tuning=_flag({"t": tuning}, "t", where),
            floor_scale=_float_value(c["floor_scale"], "floor_scale", where),
            attn_scale=_float_value(c["attn_scale"], "attn_scale", where),
        )
        head_dim = c.get("head_dim")
        head_dim = None if head_dim is None else _int_value(head_dim, "head_dim", where)
        kv = c.get("num_key_value_heads")
        args = ModelArgs(
            dim=dim, n_layers=n_layers, n_heads=n_heads,
            vocab_size=_int_value(c["vocab_size"], "vocab_size", where),
            n_kv_heads=n_heads if kv is None else _int_value(kv, "num_key_value_heads", where),
            hidden_dim=_int_value(c["intermediate_size_mlp"], "intermediate_size_mlp", where),
            norm_eps=_float_value(c["rms_norm_eps"], "rms_norm_eps", where),
            rope_theta=theta, rope_scaling=scaling, max_seq_len=max_pos,
            tie_word_embeddings=_flag(c, "tie_word_embeddings", where),
            head_dim_override=head_dim if head_dim is not None and head_dim != dim // n_heads else None,
            llama4=llama4,
        )
        llama4.check_layers(n_layers)
        return args


# ---- llama.cpp's GGUF metadata (general.architecture llama4) ----------------------------------------------------
# Which value comes from the file and which from llama.cpp's code: the table in weights/gguf_llama4.py.

GGUF_ARCH = "llama4"
# What llama.cpp's llama4 architecture fixes in code (src/models/llama4.cpp, src/llama-hparams.h).
LLAMA_CPP_CHUNK = 8192
LLAMA_CPP_NOPE_STEP = 4  # hparams.n_no_rope_layer_step's default, never read from the file
LLAMA_CPP_SWA_PATTERN = 4  # load_swa_pattern(ml, 4): layers i % 4 < 3 chunked
LLAMA_CPP_FLOOR_SCALE = 8192.0
LLAMA_CPP_ATTN_SCALE = 0.1
LLAMA_CPP_NO_QK_NORM_EXPERTS = 128  # use_kq_norm = type != LLM_TYPE_17B_128E
LLAMA_CPP_MAX_LAYERS, LLAMA_CPP_MAX_EXPERTS = 512, 1024  # llama-hparams.h: llama.cpp refuses more
# llama4.* keys llama.cpp's llama4 ignores or fixes, with the values that mean what it computes.
GGUF_PLAIN = {
    "attention.clamp_kqv": (0.0,),
    "attention.causal": (True,),
    "logit_scale": (1.0,),
    "rope.scaling.attn_factor": (1.0,),
    "expert_weights_scale": (0.0, 1.0),
    "expert_weights_norm": (False,),
    "expert_gating_func": (2,),  # LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID
    "expert_shared_count": (1,),
    "expert_group_count": (0,),
    "expert_group_used_count": (0,),
    "attention.scale": (0.0,),
    "attention.q_lora_rank": (0,),
    "attention.kv_lora_rank": (0,),
    "nextn_predict_layers": (0,),
}


def _uniform(value, key: str, where: str, layers=None):
    """A key llama.cpp reads as a scalar or a per-layer array (get_key_or_arr): llama_ref needs one value
    (over `layers` when given, the layers the value applies to)."""
    if isinstance(value, list):
        values = value if layers is None else [value[i] for i in layers if i < len(value)]
        if len(set(values)) > 1:
            raise ConfigError(f"{where}: {key} differs between layers ({value}); llama_ref's Llama 4 has one value")
        if not values:
            return None
        value = values[0]
    return value


def from_llama4_gguf(meta: dict, where: str, has_output_tensor: bool) -> ModelArgs:
    """ModelArgs of a llama4 GGUF file: what the file stores, and the values llama.cpp's code fixes for the
    architecture (the table in weights/gguf_llama4.py says which is which)."""
    def key(name):
        return f"{GGUF_ARCH}.{name}"

    def get(name, read, default=KeyError):
        if key(name) not in meta:
            if default is KeyError:
                raise ConfigError(f"{where}: metadata key {key(name)} is missing")
            return default
        return read(meta[key(name)], key(name), where)

    def scalar(read):
        return lambda v, k, w: read(_uniform(v, k, w), k, w)

    for name, values in GGUF_PLAIN.items():
        value = meta.get(key(name))
        if value is not None and not any(value == v for v in values):
            raise ConfigError(f"{where}: {key(name)} = {value!r}: llama.cpp's llama4 architecture does not read "
                              f"this key (it uses {values[0]!r}); refusing to guess which the file means")
    n_layers = get("block_count", _int_value)
    if not 0 < n_layers <= LLAMA_CPP_MAX_LAYERS:  # before any loop over the layers
        raise ConfigError(f"{where}: {key('block_count')} is {n_layers}; llama.cpp accepts 1 .. {LLAMA_CPP_MAX_LAYERS}")
    dim = get("embedding_length", _int_value)
    n_heads = get("attention.head_count", scalar(_int_value))
    n_experts = get("expert_count", _int_value, 0)
    if n_experts <= 0:
        raise ConfigError(f"{where}: {key('expert_count')} is {n_experts}: llama.cpp's llama4 requires experts "
                          f"(a dense Llama 4 is not implemented by llama_ref)")
    if n_experts > LLAMA_CPP_MAX_EXPERTS:
        raise ConfigError(f"{where}: {key('expert_count')} is {n_experts}; llama.cpp accepts at most "
                          f"{LLAMA_CPP_MAX_EXPERTS}")
    step = get("interleave_moe_layer_step", _int_value)
    if step < 0:
        raise ConfigError(f"{where}: {key('interleave_moe_layer_step')} must be >= 0, got {step}")
    moe_layers = tuple(i for i in range(n_layers) if step > 0 and (i + 1) % step == 0)
    dense_layers = [i for i in range(n_layers) if i not in moe_layers]

    # The chunk, NoPE and temperature values are llama.cpp's code, not the file's.
    window = meta.get(key("attention.sliding_window"))
    if window is not None and window != LLAMA_CPP_CHUNK:
        what = ("0 switches llama.cpp's llama4 to no chunking and RoPE in every layer but the last (its "
                "MobileLLM variant), which is not a Llama 4 model" if window == 0 else
                f"llama.cpp's llama4 ignores it and chunks by {LLAMA_CPP_CHUNK}")
        raise ConfigError(f"{where}: {key('attention.sliding_window')} = {window!r}: {what}; refusing to guess "
                          f"which chunk size the file means")
    nope = tuple(i for i in range(n_layers) if (i + 1) % LLAMA_CPP_NOPE_STEP == 0)
    pattern = meta.get(key("attention.sliding_window_pattern"), LLAMA_CPP_SWA_PATTERN)
    if isinstance(pattern, list):
        chunked = [i for i in range(n_layers) if i < len(pattern) and pattern[i]]
    elif isinstance(pattern, int) and not isinstance(pattern, bool) and pattern >= 0:
        chunked = [i for i in range(n_layers) if pattern == 0 or i % pattern < pattern - 1]
    else:
        raise ConfigError(f"{where}: {key('attention.sliding_window_pattern')} = {pattern!r} is not a layer "
                          f"pattern")
    rope_layers = [i for i in range(n_layers) if i not in nope]
    if chunked != rope_layers:
        raise ConfigError(f"{where}: {key('attention.sliding_window_pattern')} = {pattern!r} chunks layers "
                          f"{chunked}, but llama.cpp's RoPE layers (every layer but each 4th) are {rope_layers}; "
                          f"llama_ref chunks exactly the RoPE layers, as Meta's Llama 4 does")
    base = get("rope.freq_base", _float_value, 10000.0)
    if get("rope.freq_base_swa", _float_value, base) != base:
        raise ConfigError(f"{where}: {key('rope.freq_base_swa')} differs from {key('rope.freq_base')}: "
                          f"Llama 4 uses one RoPE theta in every layer")

    scaling = None
    kind = meta.get(key("rope.scaling.type"), "none")
    factor = meta.get(key("rope.scaling.factor"), meta.get(key("rope.scale_linear")))
    if kind == "linear" and factor not in (None, 0, 0.0, 1, 1.0):
        scaling = RopeScaling("linear", _float_value(factor, key("rope.scaling.factor"), where))
    elif kind not in ("none", "linear"):
        raise ConfigError(f"{where}: {key('rope.scaling.type')} {kind!r} is not supported (none, linear; Llama 4's "
                          f"scaling comes as the rope_freqs tensor)")
    head_dim = get("attention.key_length", _int_value, dim // n_heads if n_heads > 0 else 0)
    if get("attention.value_length", _int_value, head_dim) != head_dim:
        raise ConfigError(f"{where}: {key('attention.value_length')} differs from {key('attention.key_length')}")
    if get("rope.dimension_count", _int_value, head_dim) != head_dim:
        raise ConfigError(f"{where}: {key('rope.dimension_count')} differs from the head size {head_dim}: llama.cpp's "
                          f"llama4 rotates whole heads")
    vocab = get("vocab_size", _int_value, None)
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            raise ConfigError(f"{where}: neither {key('vocab_size')} nor tokenizer.ggml.tokens is present")
        vocab = len(tokens)
    expert_width = get("expert_feed_forward_length", lambda v, k, w: _int_value(_uniform(v, k, w, moe_layers), k, w))
    shared = meta.get(key("expert_shared_feed_forward_length"))
    if shared is not None and shared != expert_width:
        raise ConfigError(f"{where}: {key('expert_shared_feed_forward_length')} = {shared!r}: llama.cpp's llama4 "
                          f"gives the shared expert the routed experts' width ({expert_width})")
    dense_width = meta.get(key("feed_forward_length"))
    # The dense layers' width (kept, as stated, even when every layer is an MoE layer and none uses it).
    dense_width = _uniform(dense_width, key("feed_forward_length"), where, dense_layers or None)
    try:
        llama4 = Llama4Args(
            n_experts=n_experts, top_k=get("expert_used_count", scalar(_int_value)), moe_layers=moe_layers,
            expert_hidden_dim=expert_width, nope_layers=nope, attention_chunk_size=LLAMA_CPP_CHUNK,
            use_qk_norm=n_experts != LLAMA_CPP_NO_QK_NORM_EXPERTS, attn_temperature_tuning=True,
            floor_scale=LLAMA_CPP_FLOOR_SCALE, attn_scale=LLAMA_CPP_ATTN_SCALE)
        return ModelArgs(
            dim=dim, n_layers=n_layers, n_heads=n_heads, vocab_size=vocab,
            n_kv_heads=get("attention.head_count_kv", scalar(_int_value), n_heads),
            hidden_dim=None if dense_width is None else _int_value(dense_width, key("feed_forward_length"), where),
            norm_eps=get("attention.layer_norm_rms_epsilon", _float_value),
            rope_theta=base, rope_scaling=scaling,
            max_seq_len=get("context_length", _int_value),
            tie_word_embeddings=not has_output_tensor,
            head_dim_override=head_dim if n_heads > 0 and head_dim != dim // n_heads else None,
            llama4=llama4,
        )
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None
