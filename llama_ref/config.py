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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from .errors import LlamaRefError


class ConfigError(LlamaRefError, ValueError):
    """A config file is missing, malformed or contradicts itself."""


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
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


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

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            raise ConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim_override is None and self.dim % self.n_heads:
            raise ConfigError(f"dim ({self.dim}) is not divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if not self.norm_eps > 0:
            raise ConfigError(f"norm_eps must be > 0, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not isinstance(self.multiple_of, int) or self.multiple_of <= 0:
            raise ConfigError(f"multiple_of must be a positive integer, got {self.multiple_of!r}")
        m = self.ffn_dim_multiplier
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not m > 0):
            raise ConfigError(f"ffn_dim_multiplier must be a positive number, got {m!r}")

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
        return {k: v for k, v in out.items() if v is not None}

    def replace(self, **changes) -> "ModelArgs":
        return replace(self, **changes)


def ffn_hidden_size(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float]) -> int:
    """FFN width from Meta's FeedForward: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


# ---- readers ---------------------------------------------------------------------------------------------

def _rope_scaling_from_dict(d: Optional[dict], where: str) -> Optional[RopeScaling]:
    if not d:
        return None
    kind = d.get("rope_type", d.get("type", "llama3"))
    if kind == "default":
        return None
    try:
        return RopeScaling(
            kind=kind,
            factor=float(d["factor"]),
            low_freq_factor=float(d.get("low_freq_factor", 1.0)),
            high_freq_factor=float(d.get("high_freq_factor", 4.0 if kind == "llama3" else 1.0)),
            original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
        )
    except KeyError as e:
        raise ConfigError(f"{where}: rope scaling is missing {e}") from None
    except (TypeError, ValueError) as e:  # ConfigError from RopeScaling included: say which file
        raise ConfigError(f"{where}: rope scaling: {e}") from None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def from_params_json(source: "str | Path | dict", *, where: str = "params.json") -> ModelArgs:
    """Read Meta's params.json. Llama 1/2 files omit n_kv_heads and rope_theta (defaults n_heads, 10000)."""
    if not isinstance(source, dict):
        where = str(source)
        source = _read_json(Path(source))
    p = dict(source)
    if p.get("vocab_size", -1) == -1:
        # Llama 1/2 params.json carry vocab_size -1: the tokenizer decides it. Loaders fill it from tensors.
        raise ConfigError(f"{where}: vocab_size is -1; pass the tokenizer's vocabulary size")
    scaling = _rope_scaling_from_dict(p.get("rope_scaling"), where)
    if scaling is None and p.get("use_scaled_rope"):
        # Meta's Llama 3.1 params.json say only use_scaled_rope: true. The numbers are those of Meta's
        # apply_scaling (the 3.1 release); 3.2's files give rope_scaling_factor (32) alongside.
        scaling = RopeScaling("llama3", float(p.get("rope_scaling_factor", 8.0)), 1.0,
                              float(p.get("rope_high_freq_factor", 4.0)), 8192)
    try:
        return ModelArgs(
            dim=int(p["dim"]), n_layers=int(p["n_layers"]), n_heads=int(p["n_heads"]),
            vocab_size=int(p["vocab_size"]),
            n_kv_heads=int(p["n_kv_heads"]) if p.get("n_kv_heads") is not None else None,
            multiple_of=int(p.get("multiple_of", 256)),
            ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
            norm_eps=float(p.get("norm_eps", 1e-5)),
            rope_theta=float(p.get("rope_theta", p.get("rope_freq_base", 10000.0))),
            rope_scaling=scaling,
            max_seq_len=int(p.get("max_seq_len", 2048)),
            tie_word_embeddings=bool(p.get("tie_word_embeddings", False)),
            hidden_dim=int(p["hidden_dim"]) if p.get("hidden_dim") else None,
            head_dim_override=int(p["head_dim"]) if p.get("head_dim") else None,
        )
    except KeyError as e:
        raise ConfigError(f"{where}: missing required key {e}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise ConfigError(f"{where}: {e}") from None
        raise ConfigError(f"{where}: bad value ({e})") from None


def from_hf_config(source: "str | Path | dict", *, where: str = "config.json") -> ModelArgs:
    """Read a Hugging Face LlamaForCausalLM config.json."""
    if not isinstance(source, dict):
        where = str(source)
        source = _read_json(Path(source))
    c = source
    arch = c.get("model_type", "llama")
    if arch != "llama":
        raise ConfigError(f"{where}: model_type {arch!r} is not a Llama model")
    scaling = _rope_scaling_from_dict(c.get("rope_scaling"), where)
    try:
        dim, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        head_dim = c.get("head_dim")
        return ModelArgs(
            dim=dim, n_layers=int(c["num_hidden_layers"]), n_heads=n_heads,
            vocab_size=int(c["vocab_size"]),
            n_kv_heads=int(c.get("num_key_value_heads") or n_heads),
            hidden_dim=int(c["intermediate_size"]),
            norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(c.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=int(c.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            head_dim_override=int(head_dim) if head_dim and int(head_dim) != dim // n_heads else None,
        )
    except KeyError as e:
        raise ConfigError(f"{where}: missing required key {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: bad value ({e})") from None


def from_gguf_metadata(meta: dict, *, where: str = "GGUF", has_output_tensor: bool = True) -> ModelArgs:
    """Read the llama.* keys of a GGUF file's metadata (a plain dict of key -> value)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{where}: general.architecture is {arch!r}, expected 'llama'")

    def get(key, default=None, required=True):
        full = f"llama.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise ConfigError(f"{where}: metadata key {full} is missing")
        return default

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    vocab = meta.get("llama.vocab_size")
    if vocab is None:
        tokens = meta.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ConfigError(f"{where}: neither llama.vocab_size nor tokenizer.ggml.tokens is present")
        vocab = len(tokens)
    scaling = None
    kind = get("rope.scaling.type", "none", required=False)
    if kind == "linear":
        scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    # llama.cpp writes Llama 3.1 scaling as a precomputed rope_freqs tensor; the GGUF loader turns that
    # tensor back into per-frequency divisors (see weights.gguf), so nothing is assumed here.
    rot = get("rope.dimension_count", dim // n_heads, required=False)
    if int(rot) != dim // n_heads:
        raise ConfigError(f"{where}: partial rotary dimension {rot} is not a Llama model")
    return ModelArgs(
        dim=dim, n_layers=int(get("block_count")), n_heads=n_heads, vocab_size=int(vocab),
        n_kv_heads=int(get("attention.head_count_kv", n_heads, required=False)),
        hidden_dim=int(get("feed_forward_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0, required=False)),
        rope_scaling=scaling,
        max_seq_len=int(get("context_length", 2048, required=False)),
        tie_word_embeddings=not has_output_tensor,
    )


def read_config(path: "str | Path") -> ModelArgs:
    """Config from a model directory (params.json or config.json)."""
    path = Path(path)
    if (path / "params.json").exists():
        return from_params_json(path / "params.json")
    if (path / "config.json").exists():
        return from_hf_config(path / "config.json")
    raise ConfigError(f"{path}: no params.json or config.json found")
