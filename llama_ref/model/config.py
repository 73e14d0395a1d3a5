"""Model hyperparameters, keyed like Meta's params.json.

Every number the forward pass needs lives here and is read from the model's own files: Meta's
params.json, Hugging Face's config.json, or the metadata of a GGUF file. Nothing downstream hard-codes
a theta, an eps or a scaling factor.

Shape legend used in comments throughout llama_ref:
    T   tokens in the current chunk          S   cached positions + T (keys visible to the chunk)
    D   dim (model width)                     V   vocab_size
    H   n_heads                               KVH n_kv_heads
    HD  head_dim = dim // n_heads             F   ffn hidden size
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
import numbers
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

from ..errors import LlamaRefError


class ConfigError(LlamaRefError, ValueError):
    """A config file is missing, malformed or contradicts itself."""


@contextmanager
def naming_errors(where: str, missing: str = "missing required key", prefix: str = ""):
    """Inside, a missing key (KeyError) becomes a ConfigError naming `where` (the file), and a ConfigError that
    does not name it yet gets `where` put in front: every reader of a config file reports errors the same way."""
    try:
        yield
    except KeyError as e:
        raise ConfigError(f"{where}: {missing} {e}") from None
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if message.startswith(where) else f"{where}: {prefix}{message}") from None


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    kind "llama3" (Llama 3.1/3.2): wavelengths longer than original_max_position_embeddings/low_freq_factor
    are divided by `factor`, those shorter than .../high_freq_factor are kept, and the band between is
    interpolated smoothly. kind "linear": every frequency is divided by `factor` (position interpolation).
    """

    kind: str = "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 1.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.kind not in ("llama3", "linear"):
            raise ConfigError(f"rope scaling type {self.kind!r} is not supported (llama3, linear)")
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            if not _is_finite_number(getattr(self, name)):
                raise ConfigError(f"rope scaling {name} must be a finite number, got {getattr(self, name)!r}")
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        # Equal factors (Llama 4 Scout's params.json: 1 and 1) leave no band between the cut-offs.
        if self.kind == "llama3" and not self.high_freq_factor >= self.low_freq_factor:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")
        if self.kind == "llama3" and not self.low_freq_factor > 0:
            raise ConfigError(f"llama3 rope scaling needs low_freq_factor > 0, got {self.low_freq_factor}")
        if not _is_int(self.original_max_position_embeddings) or self.original_max_position_embeddings <= 0:
            raise ConfigError("rope scaling original_max_position_embeddings must be a positive integer, got "
                              f"{self.original_max_position_embeddings!r}")


@dataclass(frozen=True)
class ModelArgs:
    """Architecture of one Llama model. Field names follow Meta's params.json."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: Optional[int] = None  # None in Llama 1/2 params.json means n_heads (plain multi-head attention)
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # Llama 1/2 params.json omit it; their code uses 10000
    rope_scaling: Optional[RopeScaling] = None
    max_seq_len: int = 2048
    tie_word_embeddings: bool = False
    # Some formats state the FFN width outright (HF intermediate_size, GGUF feed_forward_length, a pruned
    # model's hidden_dim). When set it wins over the params.json formula; checked against it when both exist.
    hidden_dim: Optional[int] = None
    head_dim_override: Optional[int] = None
    # Llama 4 (experts, NoPE layers, chunked attention, QK norm): a llama4_config.Llama4Args, None for a dense Llama.
    llama4: Any = None

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "n_kv_heads", "hidden_dim",
                     "head_dim_override"):
            value = getattr(self, name)
            if value is None and name in ("n_kv_heads", "hidden_dim", "head_dim_override"):
                continue
            if not _is_int(value) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for RoPE")
        # inf or nan here would not fail: it would turn every logit into nan, or silently drop RoPE.
        if not _is_finite_number(self.norm_eps) or not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0 and finite, got {self.norm_eps!r}")
        if not _is_finite_number(self.rope_theta) or not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0 and finite, got {self.rope_theta!r}")
        if not _is_int(self.multiple_of) or self.multiple_of <= 0:
            raise ConfigError(f"multiple_of must be a positive integer, got {self.multiple_of!r}")
        m = self.ffn_dim_multiplier
        if m is not None and (not _is_finite_number(m) or not m > 0):
            raise ConfigError(f"ffn_dim_multiplier must be a positive number, got {m!r}")
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"tie_word_embeddings must be true or false, got {self.tie_word_embeddings!r}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling must be a RopeScaling, got {self.rope_scaling!r}")
        if self.llama4 is not None:
            from .llama4_config import Llama4Args
            if not isinstance(self.llama4, Llama4Args):
                raise ConfigError(f"llama4 must be a Llama4Args, got {self.llama4!r}")
            self.llama4.check_layers(self.n_layers)

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        return self.hidden_dim if self.hidden_dim is not None else ffn_hidden_size(
            self.dim, self.multiple_of, self.ffn_dim_multiplier)

    def param_count(self) -> int:
        """Number of parameters, counting a tied output matrix once."""
        if self.llama4 is not None:
            from .llama4_config import param_counts
            return param_counts(self)[0]
        d, hd, f = self.dim, self.head_dim, self.ffn_hidden_dim
        attention = d * self.n_heads * hd * 2 + d * self.kv_heads * hd * 2  # wq, wo, wk, wv
        feed_forward = 3 * d * f  # w1, w2, w3
        norms = 2 * d
        per_layer = attention + feed_forward + norms
        embeddings = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * per_layer + embeddings + d

    def to_params_json(self) -> dict[str, Any]:
        """A dict in Meta's params.json form (with the scaling written out, unlike Meta's files)."""
        out: dict[str, Any] = {
            "dim": self.dim, "n_layers": self.n_layers, "n_heads": self.n_heads,
            "n_kv_heads": self.kv_heads, "vocab_size": self.vocab_size, "multiple_of": self.multiple_of,
            "ffn_dim_multiplier": self.ffn_dim_multiplier, "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "max_seq_len": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if self.hidden_dim is not None:
            out["hidden_dim"] = self.hidden_dim
        if self.head_dim_override is not None:
            out["head_dim"] = self.head_dim_override
        if self.rope_scaling is not None:
            out["rope_scaling"] = asdict(self.rope_scaling)
        if self.llama4 is not None:  # llama_ref's own block (Meta's files derive these; see llama4_config)
            out["llama4"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.llama4).items()}
        return {k: v for k, v in out.items() if v is not None}

    def replace(self, **changes) -> "ModelArgs":
        return replace(self, **changes)


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """FFN width from Meta's FeedForward: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ---- values as the files write them --------------------------------------------------------------------------

def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _int_value(value, key: str, where: str) -> int:
    """An integer field. 4096 and 4096.0 are read as 4096; 4096.5, true, "4096" and inf are refused
    (int() would truncate or convert them into a different model without a word)."""
    if not _is_finite_number(value) or value != int(value):
        raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
    return int(value)


def _float_value(value, key: str, where: str) -> float:
    if not _is_finite_number(value):
        raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _refuse_unimplemented(config: dict, plain: dict, where: str) -> None:
    """Refuse keys whose value asks for mathematics llama_ref does not implement.

    plain: key -> the values that mean the plain Llama architecture; an absent or null key is plain too (an
    empty tuple: only absent or null is). A model that needs anything else would load, run, and compute
    something other than what it was trained for.
    """
    for key, values in plain.items():
        value = config.get(key)
        if value is not None and not any(value == v and type(value) is type(v) for v in values):
            llama = json.dumps(values[0]) if values else "none"
            raise ConfigError(f"{where}: {key} = {json.dumps(value)} is not implemented by llama_ref (a Llama "
                              f"model has {llama}); refusing to compute another model")


def _rope_scaling_from_dict(d, where: str, max_position_embeddings: Optional[int] = None
                            ) -> Optional[RopeScaling]:
    """RoPE scaling from a dict as transformers (rope_scaling, rope_parameters) or our params.json write it.

    The kind is read from "rope_type" (transformers >= 4.45), "type" (older) or "kind" (our params.json);
    a dict that names no kind but carries a factor is refused rather than guessed.
    """
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: rope scaling must be a JSON object, got {json.dumps(d)}")
    named = {k: d[k] for k in ("rope_type", "type", "kind") if k in d}
    if len(set(map(str, named.values()))) > 1:
        raise ConfigError(f"{where}: rope scaling names two kinds ({named})")
    kind = next(iter(named.values()), None)
    if kind is None:
        if any(k in d for k in ("factor", "low_freq_factor", "high_freq_factor")):
            raise ConfigError(f"{where}: rope scaling gives a factor but no rope_type")
        kind = "default"
    partial = d.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ConfigError(f"{where}: partial_rotary_factor = {json.dumps(partial)} is not implemented by "
                          f"llama_ref (Llama rotates every dimension of a head)")
    if kind == "default":
        if d.get("factor", 1.0) != 1.0:
            raise ConfigError(f"{where}: rope scaling of type 'default' with factor {d['factor']}")
        return None
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"{where}: rope scaling type {kind!r} is not supported (llama_ref implements "
                          f"default, linear and llama3, the kinds Llama checkpoints use)")
    with naming_errors(where, missing="rope scaling is missing", prefix="rope scaling: "):
        if kind == "linear":
            return RopeScaling("linear", _float_value(d["factor"], "rope scaling factor", where))
        factors = {k: _float_value(d[k], f"rope scaling {k}", where)
                   for k in ("factor", "low_freq_factor", "high_freq_factor")}
        # transformers 5 takes the pre-training length from max_position_embeddings when the dict omits it.
        original = d.get("original_max_position_embeddings", max_position_embeddings)
        if original is None:
            raise KeyError("original_max_position_embeddings")
        return RopeScaling("llama3", **factors, original_max_position_embeddings=_int_value(
            original, "rope scaling original_max_position_embeddings", where))


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        # json.load would keep the last one silently; which one the file's author meant is unknown.
        raise ValueError(f"key {repeated[0]!r} appears twice")
    return dict(pairs)


def _read_json(path: Path, error: type = ConfigError) -> dict:
    """The JSON object in `path`, or `error` naming the file. The one JSON reader of llama_ref's model files
    (params.json, config.json, tokenizer_config.json, ...): a key given twice is refused, not resolved."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f, object_pairs_hook=_no_duplicate_keys)
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object")
    return data


# ---- Meta's params.json ------------------------------------------------------------------------------------

# Keys of later Meta releases that make a model other than a dense Llama text decoder (llama-models'
# llama3/args.py and llama4/args.py), each with the values that mean "off".
PARAMS_PLAIN = {
    "moe_args": (),  # Llama 4: mixture of experts
    "nope_layer_interval": (),  # Llama 4: layers without RoPE
    "attention_chunk_size": (),  # Llama 4: chunked attention
    "use_qk_norm": (False,),
    "attn_temperature_tuning": (False,),
    "ffn_exp": (),
    "vision_args": (),  # Llama 4 / 3.2 Vision: an image encoder and cross-attention
    "vision_model": (),
    "vision_chunk_size": (-1,),
    "vision_num_cross_attention_layers": (-1,),
    "quantization_args": (),  # Meta's int4/fp8 checkpoints store other tensors than these
    "lora_args": (),
}


def from_params_json(source: "str | Path | dict", *, where: str = "params.json") -> ModelArgs:
    """Read Meta's params.json. Llama 1/2 files omit n_kv_heads and rope_theta (defaults n_heads, 10000)."""
    if not isinstance(source, dict):
        where = str(source)
        source = _read_json(Path(source))
    p = dict(source)
    if p.get("vocab_size", -1) == -1:
        # Llama 1/2 params.json carry vocab_size -1: the tokenizer decides it. Loaders fill it from tensors.
        raise ConfigError(f"{where}: vocab_size is -1; pass the tokenizer's vocabulary size")
    from .llama4_config import from_llama4_params, is_llama4_params, llama4_block
    if is_llama4_params(p):  # Llama 4 keys: experts, NoPE layers, chunked attention (llama4_config)
        return from_llama4_params(p, where)
    llama4 = p.pop("llama4", None)  # the Llama 4 block of a params.json llama_ref wrote (to_params_json)
    _refuse_unimplemented(p, PARAMS_PLAIN, where)
    scaling = _rope_scaling_from_dict(p.get("rope_scaling"), where)
    if scaling is None and _flag(p, "use_scaled_rope", where):
        # Meta's Llama 3.1 params.json say only use_scaled_rope: true. The numbers are those of Meta's
        # apply_scaling (the 3.1 release); 3.2's files give rope_scaling_factor (32) alongside.
        scaling = RopeScaling("llama3", _float_value(p.get("rope_scaling_factor", 8.0), "rope_scaling_factor", where),
                              1.0, _float_value(p.get("rope_high_freq_factor", 4.0), "rope_high_freq_factor", where),
                              8192)
    theta = p.get("rope_theta", p.get("rope_freq_base", 10000.0))

    def optional_int(key):
        return _int_value(p[key], key, where) if p.get(key) is not None else None

    with naming_errors(where):
        return ModelArgs(
            dim=_int_value(p["dim"], "dim", where), n_layers=_int_value(p["n_layers"], "n_layers", where),
            n_heads=_int_value(p["n_heads"], "n_heads", where),
            vocab_size=_int_value(p["vocab_size"], "vocab_size", where),
            n_kv_heads=optional_int("n_kv_heads"),
            multiple_of=_int_value(p.get("multiple_of", 256), "multiple_of", where),
            ffn_dim_multiplier=(_float_value(p["ffn_dim_multiplier"], "ffn_dim_multiplier", where)
                                if p.get("ffn_dim_multiplier") is not None else None),
            norm_eps=_float_value(p.get("norm_eps", 1e-5), "norm_eps", where),
            rope_theta=_float_value(theta, "rope_theta", where),
            rope_scaling=scaling,
            max_seq_len=_int_value(p.get("max_seq_len", 2048), "max_seq_len", where),
            tie_word_embeddings=_flag(p, "tie_word_embeddings", where),
            hidden_dim=optional_int("hidden_dim") or None,
            head_dim_override=optional_int("head_dim") or None,
            llama4=None if llama4 is None else llama4_block(llama4, _int_value(p["n_layers"], "n_layers", where),
                                                            where),
        )


def _flag(config: dict, key: str, where: str, default: bool = False) -> bool:
    value = config.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {key} must be true or false, got {json.dumps(value)}")
    return value


# ---- Hugging Face's config.json ----------------------------------------------------------------------------

# LlamaConfig fields (and fields of Llama-like configs) that change the computation away from Llama's, with
# the values that mean Llama. pretraining_tp is accepted: it only splits the same matrix products.
HF_PLAIN = {
    "hidden_act": ("silu", "swish"),
    "attention_bias": (False,),
    "mlp_bias": (False,),
    "sliding_window": (),
    "use_sliding_window": (False,),
    "partial_rotary_factor": (1.0, 1),
    "attn_logit_softcapping": (),
    "final_logit_softcapping": (),
    "layer_types": (),
    "no_rope_layers": (),
    "attention_chunk_size": (),
    "use_qk_norm": (False,),
    "quantization_config": (),
}


def _hf_rope(c: dict, where: str, max_position_embeddings: int) -> tuple[float, Optional[RopeScaling]]:
    """rope_theta and the scaling of a config.json as transformers 4.x writes it (rope_theta and
    rope_scaling at the top level) or 5.x (rope_parameters holding both)."""
    params, scaling = c.get("rope_parameters"), c.get("rope_scaling")
    for key, d in (("rope_parameters", params), ("rope_scaling", scaling)):
        if d is not None and not isinstance(d, dict):
            raise ConfigError(f"{where}: {key} must be a JSON object, got {json.dumps(d)}")
        if d and any(isinstance(v, dict) for v in d.values()):
            raise ConfigError(f"{where}: {key} differs per layer type, which a Llama model never does")
    rope = dict(params or {})
    for key, value in (scaling or {}).items():
        # transformers 5 reads rope_scaling in place of rope_parameters when a file has both: they must agree.
        if key in rope and rope[key] != value:
            raise ConfigError(f"{where}: rope_scaling and rope_parameters disagree on {key} "
                              f"({json.dumps(value)} vs {json.dumps(rope[key])})")
        rope[key] = value
    thetas = {json.dumps(v) for v in (rope.get("rope_theta"), c.get("rope_theta")) if v is not None}
    if len(thetas) > 1:
        raise ConfigError(f"{where}: rope_theta is given twice with different values ({', '.join(sorted(thetas))})")
    theta = rope.pop("rope_theta", c.get("rope_theta"))
    theta = 10000.0 if theta is None else _float_value(theta, "rope_theta", where)
    return theta, _rope_scaling_from_dict(rope or None, where, max_position_embeddings)


def from_hf_config(source: "str | Path | dict", *, where: str = "config.json") -> ModelArgs:
    """Read a Hugging Face LlamaForCausalLM config.json, as transformers 4.x or 5.x writes it."""
    if not isinstance(source, dict):
        where = str(source)
        source = _read_json(Path(source))
    c = source
    arch = c.get("model_type", "llama")
    if arch in ("llama4", "llama4_text"):
        from .llama4_config import from_llama4_hf
        return from_llama4_hf(c, where)
    if arch != "llama":
        raise ConfigError(f"{where}: model_type {arch!r} is not a Llama model")
    _refuse_unimplemented(c, HF_PLAIN, where)
    with naming_errors(where):
        dim = _int_value(c["hidden_size"], "hidden_size", where)
        n_heads = _int_value(c["num_attention_heads"], "num_attention_heads", where)
        max_pos = _int_value(c.get("max_position_embeddings", 2048), "max_position_embeddings", where)
        theta, scaling = _hf_rope(c, where, max_pos)
        head_dim = _int_value(c["head_dim"], "head_dim", where) if c.get("head_dim") is not None else None
        kv = c.get("num_key_value_heads")
        return ModelArgs(
            dim=dim, n_layers=_int_value(c["num_hidden_layers"], "num_hidden_layers", where), n_heads=n_heads,
            vocab_size=_int_value(c["vocab_size"], "vocab_size", where),
            n_kv_heads=n_heads if kv is None else _int_value(kv, "num_key_value_heads", where),
            hidden_dim=_int_value(c["intermediate_size"], "intermediate_size", where),
            norm_eps=_float_value(c.get("rms_norm_eps", 1e-6), "rms_norm_eps", where),
            rope_theta=theta,
            rope_scaling=scaling,
            max_seq_len=max_pos,
            tie_word_embeddings=_flag(c, "tie_word_embeddings", where),
            head_dim_override=head_dim if head_dim is not None and n_heads and head_dim != dim // n_heads else None,
        )


# ---- GGUF metadata -----------------------------------------------------------------------------------------

# llama.* keys of GGUF files that ask for mathematics other than Llama's (llama.cpp's llama-arch.cpp names),
# with the values that mean Llama. Mixtral is written with architecture "llama" and expert_count > 0.
GGUF_PLAIN = {
    "expert_count": (0,),
    "expert_used_count": (0,),
    "attention.sliding_window": (0,),
    "attention.clamp_kqv": (0.0,),
    "attention.causal": (True,),
    "logit_scale": (1.0,),
    "rope.scaling.attn_factor": (1.0,),
}
_MISSING = object()


def from_gguf_metadata(meta: dict, *, where: str = "GGUF", has_output_tensor: bool = True) -> ModelArgs:
    """Read the llama.* keys of a GGUF file's metadata (a plain dict of key -> value)."""
    arch = meta.get("general.architecture")
    if arch == "llama4":  # its chunk size, NoPE layers and temperatures are llama.cpp's code, not the file's
        from .llama4_config import from_llama4_gguf
        return from_llama4_gguf(meta, where, has_output_tensor)
    if arch != "llama":
        raise ConfigError(f"{where}: general.architecture is {arch!r}, expected 'llama'")

    def get(key, read, default=_MISSING):
        full = f"llama.{key}"
        if full not in meta:
            if default is _MISSING:
                raise ConfigError(f"{where}: metadata key {full} is missing")
            return default
        return read(meta[full], full, where)

    for key, values in GGUF_PLAIN.items():
        value = meta.get(f"llama.{key}")
        if value is not None and not any(value == v for v in values):
            raise ConfigError(f"{where}: llama.{key} = {value!r} is not implemented by llama_ref (a Llama model "
                              f"has {values[0]!r}); refusing to compute another model")
    n_heads = get("attention.head_count", _int_value)
    dim = get("embedding_length", _int_value)
    vocab = get("vocab_size", _int_value, None)
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            raise ConfigError(f"{where}: neither llama.vocab_size nor tokenizer.ggml.tokens is present")
        vocab = len(tokens)
    scaling = None
    kind = get("rope.scaling.type", lambda v, k, w: v, "none")
    if kind == "linear":
        scaling = RopeScaling("linear", get("rope.scaling.factor", _float_value))
    elif kind != "none":
        raise ConfigError(f"{where}: llama.rope.scaling.type {kind!r} is not supported (llama_ref implements "
                          f"none and linear; Llama 3.1's scaling comes as the rope_freqs tensor)")
    # llama.cpp writes Llama 3.1 scaling as a precomputed rope_freqs tensor; the GGUF loader turns that
    # tensor back into per-frequency divisors (see weights.gguf), so nothing is assumed here.
    head_dim = get("attention.key_length", _int_value, None)
    value_dim = get("attention.value_length", _int_value, head_dim)
    if value_dim != head_dim:
        raise ConfigError(f"{where}: llama.attention.value_length {value_dim} differs from key_length "
                          f"{head_dim}, which a Llama model never does")
    if n_heads > 0 and head_dim == dim // n_heads:
        head_dim = None
    rot = get("rope.dimension_count", _int_value, head_dim or (dim // n_heads if n_heads > 0 else 0))
    if rot != (head_dim or (dim // n_heads if n_heads > 0 else 0)):
        raise ConfigError(f"{where}: partial rotary dimension {rot} is not a Llama model")
    try:
        return ModelArgs(
            dim=dim, n_layers=get("block_count", _int_value), n_heads=n_heads, vocab_size=vocab,
            n_kv_heads=get("attention.head_count_kv", _int_value, n_heads),
            hidden_dim=get("feed_forward_length", _int_value),
            norm_eps=get("attention.layer_norm_rms_epsilon", _float_value),
            rope_theta=get("rope.freq_base", _float_value, 10000.0),
            rope_scaling=scaling,
            max_seq_len=get("context_length", _int_value),  # llama.cpp requires it too; no guessed window
            tie_word_embeddings=not has_output_tensor,
            head_dim_override=head_dim,
        )
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None


def read_config(path: "str | Path") -> ModelArgs:
    """Config from a model directory (params.json or config.json)."""
    path = Path(path)
    if (path / "params.json").exists():
        return from_params_json(path / "params.json")
    if (path / "config.json").exists():
        return from_hf_config(path / "config.json")
    raise ConfigError(f"{path}: no params.json or config.json found")
