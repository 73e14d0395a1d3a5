"""Configuration of Llama 3.2 Vision (Meta's "CrossAttentionTransformer", Hugging Face's Mllama).

A vision model is a Llama 3.1 text decoder (ModelArgs) plus VisionArgs: the image encoder and the
cross-attention layers placed before some of the text layers.

Meta's params.json names three vision keys (vision_chunk_size, vision_max_num_chunks,
vision_num_cross_attention_layers); the encoder's sizes are constants of Meta's code
(llama3/multimodal/model.py, CrossAttentionTransformerVision: width 1280, 32 layers, 16 heads, 8 global
layers, intermediate layers 3,7,15,23,30, patch 14, 4 tiles). A params.json may carry them in a
"vision_encoder" block (llama_ref's own key; tiny test checkpoints use it); absent, Meta's constants hold.
Hugging Face's config.json (model_type "mllama") states every size in text_config and vision_config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..model.config import ConfigError, ModelArgs, _int_value, _read_json, _refuse_unimplemented
from ..model.config import from_hf_config as text_from_hf_config
from ..model.config import from_params_json as text_from_params_json

# Meta's constants for the released encoder (CrossAttentionTransformerVision and VisionEncoder's defaults).
META_ENCODER = {"width": 1280, "layers": 32, "heads": 16, "global_layers": 8,
                "intermediate_layers": [3, 7, 15, 23, 30], "patch_size": 14, "max_num_tiles": 4,
                "mlp_ratio": 4.0}
META_VISION_KEYS = ("vision_chunk_size", "vision_max_num_chunks", "vision_num_cross_attention_layers",
                    "vision_encoder")
LEARNABLE_EMBEDDINGS = 8  # Meta's learnable_embedding rows: ids vocab_size .. vocab_size+7 (the image token first)


def fusion_schedule(n_layers: int, n_cross: int) -> tuple[int, ...]:
    """The text layers that get a cross-attention block in front of them (Meta's _init_fusion_schedule):
    spread evenly, counted back from the last layer. 11B: 32 layers, 8 blocks -> 3, 7, ..., 31."""
    k = math.ceil(n_layers / n_cross)
    return tuple(list(range(n_layers))[::-1][::k][:n_cross][::-1])


def supported_aspect_ratios(max_tiles: int) -> list[tuple[int, int]]:
    """Every (rows, columns) tile arrangement with at most max_tiles tiles, in the order Hugging Face numbers
    them (aspect_ratio_id = index + 1; 0 means no image): (1,1), (1,2), ..., (1,n), (2,1), ..."""
    return [(h, w) for h in range(1, max_tiles + 1) for w in range(1, max_tiles + 1) if h * w <= max_tiles]


@dataclass(frozen=True)
class VisionArgs:
    """The image encoder and the cross-attention layers of a Llama 3.2 Vision model."""

    chunk_size: int  # tile side in pixels (vision_chunk_size): 560 for the released models
    max_num_chunks: int  # tiles per image at most (vision_max_num_chunks)
    cross_layers: tuple[int, ...]  # text layers with a cross-attention block in front (fusion schedule)
    width: int = 1280
    layers: int = 32
    heads: int = 16
    global_layers: int = 8
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    patch_size: int = 14
    max_num_tiles: int = 4  # tile slots of the encoder and its embeddings (Meta: 4, whatever max_num_chunks)
    mlp_dim: int = 5120  # hidden width of the encoder's GELU MLP (4 x width)
    layer_norm_eps: float = 1e-5  # nn.LayerNorm's default, in Meta's code and HF's config
    image_token_id: int = field(default=-1)  # the id the model sees for <|image|>: vocab_size (Meta: 128256)

    def __post_init__(self):
        for name in ("chunk_size", "max_num_chunks", "width", "layers", "heads", "global_layers", "patch_size",
                     "max_num_tiles", "mlp_dim"):
            value = getattr(self, name)
            if type(value) is not int or value <= 0:
                raise ConfigError(f"vision config field {name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ConfigError(f"vision width {self.width} is not divisible by its {self.heads} heads")
        if self.chunk_size % self.patch_size:
            raise ConfigError(f"vision tile size {self.chunk_size} is not a multiple of the patch size "
                              f"{self.patch_size}")
        if self.max_num_chunks > self.max_num_tiles:
            raise ConfigError(f"vision_max_num_chunks {self.max_num_chunks} exceeds the encoder's "
                              f"{self.max_num_tiles} tile slots")
        if not self.intermediate_layers or any(type(i) is not int or not 0 <= i < self.layers
                                               for i in self.intermediate_layers):
            raise ConfigError(f"vision intermediate layers {list(self.intermediate_layers)} must be layer "
                              f"indices 0 .. {self.layers - 1}")
        if not self.cross_layers or list(self.cross_layers) != sorted(set(self.cross_layers)):
            raise ConfigError(f"cross-attention layers {list(self.cross_layers)} must be increasing")

    @property
    def patches(self) -> int:
        """Patches per tile side (chunk_size / patch_size)."""
        return self.chunk_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Patches of a tile plus its class token: 1601 for 560-pixel tiles."""
        return self.patches ** 2 + 1

    @property
    def output_dim(self) -> int:
        """Width of the encoder's output: the last layer's features and every intermediate layer's."""
        return (len(self.intermediate_layers) + 1) * self.width

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _encoder_block(block: Any, where: str) -> dict:
    """params.json's "vision_encoder" block (llama_ref's key), checked; Meta's constants where absent."""
    if block is None:
        return dict(META_ENCODER)
    if not isinstance(block, dict):
        raise ConfigError(f"{where}: vision_encoder must be a JSON object")
    unknown = sorted(set(block) - set(META_ENCODER))
    if unknown:
        raise ConfigError(f"{where}: vision_encoder.{unknown[0]} is not a key llama_ref knows; refusing to guess "
                          f"what it changes")
    out = dict(META_ENCODER, **block)
    if not isinstance(out["intermediate_layers"], list):
        raise ConfigError(f"{where}: vision_encoder.intermediate_layers must be a list of layer indices")
    return out


def from_params_json(source: "str | Path | dict", *, where: str = "params.json") -> tuple[ModelArgs, VisionArgs]:
    """Meta's params.json of a vision model: the text decoder's ModelArgs and the VisionArgs."""
    if not isinstance(source, dict):
        where = str(source)
        source = _read_json(Path(source))
    p = dict(source)
    if "vision_model" in p:
        raise ConfigError(f"{where}: vision_model (Meta's training-time adapter block) is not implemented; "
                          f"give vision_num_cross_attention_layers")
    vision = {k: p.pop(k) for k in META_VISION_KEYS if k in p}
    text = text_from_params_json(p, where=where)
    try:
        chunk = _int_value(vision["vision_chunk_size"], "vision_chunk_size", where)
        n_cross = _int_value(vision["vision_num_cross_attention_layers"], "vision_num_cross_attention_layers", where)
    except KeyError as e:
        raise ConfigError(f"{where}: a vision model needs {e}") from None
    if n_cross <= 0 or n_cross > text.n_layers:
        raise ConfigError(f"{where}: vision_num_cross_attention_layers = {n_cross} must be 1 .. n_layers")
    enc = _encoder_block(vision.get("vision_encoder"), where)
    try:
        return text, VisionArgs(
            chunk_size=chunk,
            max_num_chunks=_int_value(vision.get("vision_max_num_chunks", 4), "vision_max_num_chunks", where),
            cross_layers=fusion_schedule(text.n_layers, n_cross),
            width=enc["width"], layers=enc["layers"], heads=enc["heads"], global_layers=enc["global_layers"],
            intermediate_layers=tuple(enc["intermediate_layers"]), patch_size=enc["patch_size"],
            max_num_tiles=enc["max_num_tiles"], mlp_dim=int(enc["mlp_ratio"] * enc["width"]),
            image_token_id=text.vocab_size)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def is_vision_params(p: dict) -> bool:
    return any(k in p for k in ("vision_chunk_size", "vision_num_cross_attention_layers")) and \
        p.get("vision_chunk_size", -1) not in (-1, None)


# Mllama config.json keys (text_config / vision_config) that change the mathematics, with the values that
# mean the released architecture.
HF_TEXT_PLAIN = {"hidden_act": ("silu",), "dropout": (0, 0.0)}
HF_VISION_PLAIN = {"hidden_act": ("gelu",), "num_channels": (3,)}


def from_hf_config(source: "str | Path | dict", *, where: str = "config.json") -> tuple[ModelArgs, VisionArgs]:
    """Hugging Face's MllamaConfig: text_config (layers counted with the cross-attention ones) and
    vision_config."""
    if not isinstance(source, dict):
        where = str(source)
        source = _read_json(Path(source))
    c = source
    if c.get("model_type") != "mllama":
        raise ConfigError(f"{where}: model_type {c.get('model_type')!r} is not mllama")
    t, v = c.get("text_config"), c.get("vision_config")
    if not isinstance(t, dict) or not isinstance(v, dict):
        raise ConfigError(f"{where}: an mllama config needs text_config and vision_config objects")
    _refuse_unimplemented(t, HF_TEXT_PLAIN, where + " text_config")
    _refuse_unimplemented(v, HF_VISION_PLAIN, where + " vision_config")
    try:
        total = _int_value(t["num_hidden_layers"], "num_hidden_layers", where)
        flat = t["cross_attention_layers"]
        if not isinstance(flat, list) or not flat or any(type(i) is not int for i in flat):
            raise ConfigError(f"{where}: text_config.cross_attention_layers must be a list of layer indices")
        # HF's one list of layers holds the cross-attention blocks among the text layers: block k sits at
        # flat index (text layer it precedes) + k.
        cross = tuple(i - k for k, i in enumerate(flat))
        n_text = total - len(flat)
        if list(cross) != sorted(set(cross)) or cross[0] < 0 or cross[-1] >= n_text:
            raise ConfigError(f"{where}: text_config.cross_attention_layers {flat} do not interleave with "
                              f"{n_text} text layers")
        text_dict = {k: val for k, val in t.items() if k not in ("cross_attention_layers", "model_type", "dropout")}
        text_dict.update(model_type="llama", num_hidden_layers=n_text)
        text = text_from_hf_config(text_dict, where=where + " text_config")
        width = _int_value(v["hidden_size"], "hidden_size", where)
        inter = v.get("intermediate_layers_indices", META_ENCODER["intermediate_layers"])
        if not isinstance(inter, list):
            raise ConfigError(f"{where}: vision_config.intermediate_layers_indices must be a list")
        max_tiles = _int_value(v.get("max_num_tiles", 4), "max_num_tiles", where)
        ratios = v.get("supported_aspect_ratios")
        if ratios is not None and [tuple(r) for r in ratios] != supported_aspect_ratios(max_tiles):
            raise ConfigError(f"{where}: vision_config.supported_aspect_ratios {ratios} differ from every tile "
                              f"arrangement up to {max_tiles} tiles, the only order llama_ref reads")
        out_dim = v.get("vision_output_dim")
        if out_dim is not None and out_dim != (len(inter) + 1) * width:
            raise ConfigError(f"{where}: vision_config.vision_output_dim {out_dim} is not (intermediate layers "
                              f"+ 1) x hidden_size = {(len(inter) + 1) * width}")
        image_token = c.get("image_token_index", c.get("image_token_id", text.vocab_size))
        if image_token != text.vocab_size:
            raise ConfigError(f"{where}: image_token_index {image_token} is not vocab_size {text.vocab_size}, "
                              f"the first of the learnable embeddings")
        vision = VisionArgs(
            chunk_size=_int_value(v.get("image_size", 448), "image_size", where), max_num_chunks=max_tiles,
            cross_layers=cross, width=width,
            layers=_int_value(v.get("num_hidden_layers", 32), "num_hidden_layers", where),
            heads=_int_value(v.get("attention_heads", v.get("num_attention_heads", 16)), "attention_heads", where),
            global_layers=_int_value(v.get("num_global_layers", 8), "num_global_layers", where),
            intermediate_layers=tuple(inter), patch_size=_int_value(v.get("patch_size", 14), "patch_size", where),
            max_num_tiles=max_tiles, mlp_dim=_int_value(v.get("intermediate_size", 4 * width), "intermediate_size",
                                                        where),
            layer_norm_eps=float(v.get("norm_eps", 1e-5)), image_token_id=text.vocab_size)
    except KeyError as e:
        raise ConfigError(f"{where}: missing required key {e}") from None
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if message.startswith(where) else f"{where}: {message}") from None
    return text, vision


def param_count(text: ModelArgs, vision: VisionArgs) -> int:
    """Parameters of the whole model: text decoder, its cross-attention blocks, image encoder, projection."""
    d, hd, f = text.dim, text.head_dim, text.ffn_hidden_dim
    attention = d * text.n_heads * hd * 2 + d * text.kv_heads * hd * 2
    cross_block = attention + 3 * d * f + 2 * d + 2 * hd + 2  # + q/k norms and the two gates
    total = text.param_count() + LEARNABLE_EMBEDDINGS * d + len(vision.cross_layers) * cross_block
    w, m, n = vision.width, vision.mlp_dim, vision.tokens_per_tile
    layer = 4 * w * w + 2 * w * m + m + w + 4 * w  # q k v o, MLP with biases, two LayerNorms
    t = vision.max_num_tiles
    total += (vision.layers + vision.global_layers) * layer + 2 * vision.global_layers
    total += 3 * vision.patch_size ** 2 * w + w + n * w + t * t * n * w + 1  # patches, class, positions, gate
    total += 2 * (t * t * w + 1) + 4 * w  # pre/post tile embeddings with gates, ln_pre, ln_post
    total += vision.output_dim * d + d  # projection to the text width
    return total


def to_params_json(text: ModelArgs, vision: VisionArgs) -> dict:
    """Meta's params.json for the pair, with the encoder block only where it differs from Meta's constants."""
    p = text.to_params_json()
    p.update(vision_chunk_size=vision.chunk_size, vision_max_num_chunks=vision.max_num_chunks,
             vision_num_cross_attention_layers=len(vision.cross_layers))
    enc = {"width": vision.width, "layers": vision.layers, "heads": vision.heads,
           "global_layers": vision.global_layers, "intermediate_layers": list(vision.intermediate_layers),
           "patch_size": vision.patch_size, "max_num_tiles": vision.max_num_tiles,
           "mlp_ratio": vision.mlp_dim / vision.width}
    if enc != META_ENCODER:
        p["vision_encoder"] = enc
    return json.loads(json.dumps(p))


# ---- presets -----------------------------------------------------------------------------------------------
# params.json arch_args of llama-models 0.3.0's sku_list.py (llama3_2_base_models, llama3_2_instruct_models,
# safety_models); the encoder is Meta's constants (META_ENCODER). max_seq_len is the 131072 positions of the
# released HF configs (max_position_embeddings; Meta's params.json leave it to its 2048 default).
# Tile size: the SKU list gives the 11B *base* model 448 and every other Vision model 560; Hugging Face's
# configs of the Instruct models say image_size 560 (vision_config), and their preprocessor 560 too.
_VISION_TEXT_11B = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                    "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-5, "rope_theta": 500000.0,
                    "use_scaled_rope": True, "max_seq_len": 131072, "vision_max_num_chunks": 4}
_VISION_TEXT_90B = dict(_VISION_TEXT_11B, dim=8192, n_layers=80, n_heads=64, multiple_of=4096)
PRESETS = {
    # name: (params.json, source)
    "llama-3.2-11b-vision": (dict(_VISION_TEXT_11B, vision_chunk_size=448, vision_num_cross_attention_layers=8),
                             "sku_list.py L366-383 (Llama3.2-11B-Vision)"),
    "llama-3.2-11b-vision-instruct": (dict(_VISION_TEXT_11B, vision_chunk_size=560,
                                           vision_num_cross_attention_layers=8),
                                      "sku_list.py L725-742 (Llama3.2-11B-Vision-Instruct)"),
    "llama-3.2-90b-vision": (dict(_VISION_TEXT_90B, vision_chunk_size=560, vision_num_cross_attention_layers=20),
                             "sku_list.py L387-404 (Llama3.2-90B-Vision)"),
    "llama-3.2-90b-vision-instruct": (dict(_VISION_TEXT_90B, vision_chunk_size=560,
                                           vision_num_cross_attention_layers=20),
                                      "sku_list.py L746-763 (Llama3.2-90B-Vision-Instruct)"),
    "llama-guard-3-11b-vision": (dict(_VISION_TEXT_11B, vision_chunk_size=560, vision_num_cross_attention_layers=8),
                                 "sku_list.py L803-820 (Llama-Guard-3-11B-Vision)"),
}
# Parameter counts the model cards publish (Meta's layout: one tile-embedding entry per tile slot).
PUBLISHED_PARAMS = {"llama-3.2-11b-vision": 10.6e9, "llama-3.2-90b-vision": 88.6e9}


def preset(name: str) -> tuple[ModelArgs, VisionArgs]:
    """The (ModelArgs, VisionArgs) of a released Llama 3.2 Vision model by name (see PRESETS)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown vision preset {name!r} (known: {', '.join(PRESETS)})")
    return from_params_json(PRESETS[name][0], where=f"preset {name}")
