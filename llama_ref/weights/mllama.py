"""Llama 3.2 Vision checkpoints (Meta's CrossAttentionTransformer, Hugging Face's Mllama) in the canonical layout.

Canonical names are Meta's state_dict names with the "text_model." prefix dropped, so that the text decoder's
tensors are exactly a dense Llama's (tok_embeddings.weight, layers.{i}.attention.wq.weight, ...) and the dense
forward runs them unchanged. The rest keeps Meta's names:
    learnable_embedding.weight                      (8, D): ids vocab_size.. (the first is <|image|>)
    cross_attention_layers.{k}.*                    the gated cross-attention blocks (k-th of the schedule)
    vision_model.vision_encoder.*                   the image encoder
    vision_model.vision_projection.{weight,bias}    encoder features -> text width

Meta's model-parallel shards split like its text layers (fairscale): column-parallel weights by rows, row-parallel
ones (wo, w2, the encoder MLP's c_proj) by columns, the vocabulary tables by rows, the rest replicated.

Hugging Face's layout differs besides names (convert_mllama_weights_to_hf.py): the self-attention wq/wk rows are
permuted for rotate-half RoPE (cross-attention has no RoPE: not permuted); one list of text layers holds both
kinds; the learnable embeddings are appended to embed_tokens; the patch embedding is a Conv2d weight
(W, 3, p, p); the tile and tile-position embeddings are precomputed per aspect-ratio id (Meta keeps one entry per
(row, column) tile slot, of which HF's rows are copies; slots no arrangement reaches are never read and are
zero after the conversion back).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..model.config import ModelArgs, _read_json
from ..vision.config import (LEARNABLE_EMBEDDINGS, VisionArgs, from_hf_config, from_params_json,
                             is_vision_params, supported_aspect_ratios)
from .common import WeightsError, check_layer_count, expected_shapes, permute_hf_to_meta
from .keep import check_keep, finish, merge_raw, to_float32

E = "vision_model.vision_encoder."

# Weights multiplied as matrices: kept in their stored precision (16-bit packed). Everything else (norms,
# biases, gates, embeddings added to activations) is small and kept as float32.
MATRIX_RE = re.compile(r"(attention\.w[qkvo]|feed_forward\.w[123]|attn\.w[qkvo]|mlp\.c_fc|mlp\.c_proj|"
                       r"conv1\._linear|vision_projection|^output|^tok_embeddings)\.weight$")


def is_mllama_directory(path: Path, kind: str) -> bool:
    """A Meta directory whose params.json names vision keys, or an HF one whose model_type is mllama."""
    try:
        if kind == "meta" and (path / "params.json").is_file():
            return is_vision_params(_read_json(path / "params.json"))
        if kind == "hf" and (path / "config.json").is_file():
            return _read_json(path / "config.json").get("model_type") == "mllama"
    except Exception:  # an unreadable config is reported by the loader that reads it
        return False
    return False


def vision_shapes(text: ModelArgs, vision: VisionArgs) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor of a vision model with the shape its config implies."""
    shapes = expected_shapes(text)
    d, hd, f = text.dim, text.head_dim, text.ffn_hidden_dim
    shapes["learnable_embedding.weight"] = (LEARNABLE_EMBEDDINGS, d)
    for k in range(len(vision.cross_layers)):
        p = f"cross_attention_layers.{k}."
        shapes.update({
            p + "attention.wq.weight": (text.n_heads * hd, d), p + "attention.wk.weight": (text.kv_heads * hd, d),
            p + "attention.wv.weight": (text.kv_heads * hd, d), p + "attention.wo.weight": (d, text.n_heads * hd),
            p + "attention.q_norm.weight": (hd,), p + "attention.k_norm.weight": (hd,),
            p + "attention_norm.weight": (d,), p + "ffn_norm.weight": (d,), p + "gate_attn": (1,),
            p + "gate_ffwd": (1,), p + "feed_forward.w1.weight": (f, d), p + "feed_forward.w2.weight": (d, f),
            p + "feed_forward.w3.weight": (f, d)})
    w, m, n, t = vision.width, vision.mlp_dim, vision.tokens_per_tile, vision.max_num_tiles
    shapes.update({
        E + "conv1._linear.weight": (w, 3 * vision.patch_size ** 2), E + "class_embedding": (w,),
        E + "positional_embedding": (n, w), E + "gated_positional_embedding": (t, t, n, w),
        E + "gated_positional_embedding_gate": (1,),
        E + "ln_pre.weight": (w,), E + "ln_pre.bias": (w,), E + "ln_post.weight": (w,), E + "ln_post.bias": (w,),
        "vision_model.vision_projection.weight": (d, vision.output_dim), "vision_model.vision_projection.bias": (d,)})
    for which in ("pre", "post"):
        shapes[f"{E}{which}_tile_pos_embed.embedding"] = (t, t, 1, w)
        shapes[f"{E}{which}_tile_pos_embed.gate"] = (1,)
    for stack, count in (("transformer", vision.layers), ("global_transformer", vision.global_layers)):
        for i in range(count):
            p = f"{E}{stack}.resblocks.{i}."
            for a in "qkvo":
                shapes[f"{p}attn.w{a}.weight"] = (w, w)
            shapes.update({p + "mlp.c_fc.weight": (m, w), p + "mlp.c_fc.bias": (m,), p + "mlp.c_proj.weight": (w, m),
                           p + "mlp.c_proj.bias": (w,), p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
                           p + "ln_2.weight": (w,), p + "ln_2.bias": (w,)})
            if stack == "global_transformer":
                shapes[p + "gate_attn"] = (1,)
                shapes[p + "gate_ffn"] = (1,)
    return shapes


def check_vision_weights(text: ModelArgs, vision: VisionArgs, lazy: dict, where: str) -> None:
    """Every expected tensor present with its shape, nothing left over: from the headers, before reading."""
    check_layer_count(text, lazy, where)
    crosses = {n.split(".")[1] for n in lazy if n.startswith("cross_attention_layers.")}
    if len(crosses) != len(vision.cross_layers):
        raise WeightsError(f"{where}: the config says {len(vision.cross_layers)} cross-attention layers, the "
                           f"checkpoint holds tensors of {len(crosses)}")
    for stack, count in (("transformer", vision.layers), ("global_transformer", vision.global_layers)):
        found = {n.split(".")[4] for n in lazy if n.startswith(f"{E}{stack}.resblocks.")}
        if len(found) != count:
            raise WeightsError(f"{where}: the config says {count} vision {stack} layers, the checkpoint holds "
                               f"tensors of {len(found)}")
    shapes = vision_shapes(text, vision)
    missing = [n for n in shapes if n not in lazy]
    if missing:
        raise WeightsError(f"{where}: tensor {missing[0]} is missing"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, shape in shapes.items():
        if tuple(lazy[name].shape) != shape:
            raise WeightsError(f"{where}: tensor {name} has shape {tuple(lazy[name].shape)}, the config implies "
                               f"{shape}")
    extra = sorted(set(lazy) - set(shapes))
    if extra:
        raise WeightsError(f"{where}: unexpected tensor {extra[0]} for this vision config")


def _keep(raw: np.ndarray, dtype_name: str, keep: str, name: str):
    if MATRIX_RE.search(name):
        return finish(raw, dtype_name, keep, name)
    return np.ascontiguousarray(to_float32(raw, dtype_name))


# ---- Meta ---------------------------------------------------------------------------------------------------

def meta_split_dim(name: str):
    """The axis Meta's fairscale layers split `name` along across model-parallel shards; None if replicated."""
    if name.endswith(("attention.wo.weight", "feed_forward.w2.weight", "attn.wo.weight", "mlp.c_proj.weight")):
        return 1  # RowParallelLinear: input columns
    if MATRIX_RE.search(name) or name.endswith(("mlp.c_fc.bias", "vision_projection.bias",
                                                "learnable_embedding.weight")):
        return 0  # ColumnParallelLinear (and its bias), VocabParallelEmbedding: output rows
    return None


def load_mllama_meta(directory: "str | Path", keep: str = "stored", progress: bool = False):
    """Read a Meta Llama 3.2 Vision directory (one or more consolidated.NN.pth). Returns (text, vision,
    weights, extras)."""
    from .meta import shard_paths
    from .torch_zip import read_torch_file

    directory = Path(directory)
    check_keep(keep)
    where = str(directory)
    text, vision = from_params_json(directory / "params.json")
    paths = shard_paths(directory)
    shards = [{_canonical_meta(n): t for n, t in read_torch_file(p).items() if n != "text_model.rope.freqs"}
              for p in paths]
    names = list(shards[0])
    for p, s in zip(paths[1:], shards[1:]):
        if set(s) != set(names):
            diff = sorted(set(s) ^ set(names))
            raise WeightsError(f"{p}: tensor {diff[0]} is in one shard but not the other")
    joined = {}
    for name in names:
        parts = [s[name] for s in shards]
        axis = meta_split_dim(name)
        shape = list(parts[0].shape)
        if axis is not None and axis < len(shape):
            shape[axis] = sum(t.shape[axis] for t in parts)
        joined[name] = type("Lazy", (), {"shape": tuple(shape)})()
    check_vision_weights(text, vision, joined, where)
    items = names
    if progress:
        from tqdm import tqdm
        items = tqdm(names, desc=f"loading {directory.name}", unit="tensor", leave=False)
    weights, dtypes = {}, set()
    for name in items:
        dtypes.add(shards[0][name].dtype_name)
        pieces = [s[name].read() for s in shards]
        raw = pieces[0] if len(shards) == 1 else merge_raw(pieces, meta_split_dim(name), where, name)
        weights[name] = _keep(raw, shards[0][name].dtype_name, keep, name)
        del pieces, raw
    return text, vision, weights, {"format": "meta", "dtype": "/".join(sorted(dtypes)), "shards": len(shards),
                                   "files": paths}


def _canonical_meta(name: str) -> str:
    return name[len("text_model."):] if name.startswith("text_model.") else name


# ---- Hugging Face ---------------------------------------------------------------------------------------------

def _hf_names(text: ModelArgs, vision: VisionArgs) -> dict[str, str]:
    """HF name -> canonical name for every tensor but the three that change form (embed_tokens and the
    precomputed tile embeddings)."""
    cross = {c + k: k for k, c in enumerate(vision.cross_layers)}  # HF layer index -> cross block k
    out = {"model.language_model.norm.weight": "norm.weight", "lm_head.weight": "output.weight"}
    n_flat = text.n_layers + len(vision.cross_layers)
    self_layers = [i for i in range(n_flat) if i not in cross]
    L = "model.language_model.layers."
    for i, flat in enumerate(self_layers):
        h, m = f"{L}{flat}.", f"layers.{i}."
        out.update({h + "input_layernorm.weight": m + "attention_norm.weight",
                    h + "post_attention_layernorm.weight": m + "ffn_norm.weight"})
        for a in "qkvo":
            out[f"{h}self_attn.{a}_proj.weight"] = f"{m}attention.w{a}.weight"
        for a, b in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            out[f"{h}mlp.{b}.weight"] = f"{m}feed_forward.{a}.weight"
    for flat, k in cross.items():
        h, m = f"{L}{flat}.", f"cross_attention_layers.{k}."
        out.update({h + "input_layernorm.weight": m + "attention_norm.weight",
                    h + "post_attention_layernorm.weight": m + "ffn_norm.weight",
                    h + "cross_attn.q_norm.weight": m + "attention.q_norm.weight",
                    h + "cross_attn.k_norm.weight": m + "attention.k_norm.weight",
                    h + "cross_attn_attn_gate": m + "gate_attn", h + "cross_attn_mlp_gate": m + "gate_ffwd"})
        for a in "qkvo":
            out[f"{h}cross_attn.{a}_proj.weight"] = f"{m}attention.w{a}.weight"
        for a, b in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            out[f"{h}mlp.{b}.weight"] = f"{m}feed_forward.{a}.weight"
    V = "model.vision_model."
    out.update({V + "patch_embedding.weight": E + "conv1._linear.weight", V + "class_embedding": E + "class_embedding",
                V + "gated_positional_embedding.embedding": E + "positional_embedding",
                V + "gated_positional_embedding.gate": E + "gated_positional_embedding_gate",
                "model.multi_modal_projector.weight": "vision_model.vision_projection.weight",
                "model.multi_modal_projector.bias": "vision_model.vision_projection.bias"})
    for which in ("pre", "post"):
        out[f"{V}{which}_tile_positional_embedding.gate"] = f"{E}{which}_tile_pos_embed.gate"
        for t in ("weight", "bias"):
            out[f"{V}layernorm_{which}.{t}"] = f"{E}ln_{which}.{t}"
    for stack, count in (("transformer", vision.layers), ("global_transformer", vision.global_layers)):
        for i in range(count):
            h, m = f"{V}{stack}.layers.{i}.", f"{E}{stack}.resblocks.{i}."
            for a in "qkvo":
                out[f"{h}self_attn.{a}_proj.weight"] = f"{m}attn.w{a}.weight"
            for t in ("weight", "bias"):
                out[f"{h}mlp.fc1.{t}"] = f"{m}mlp.c_fc.{t}"
                out[f"{h}mlp.fc2.{t}"] = f"{m}mlp.c_proj.{t}"
                out[f"{h}input_layernorm.{t}"] = f"{m}ln_1.{t}"
                out[f"{h}post_attention_layernorm.{t}"] = f"{m}ln_2.{t}"
            if stack == "global_transformer":
                out[h + "gate_attn"] = m + "gate_attn"
                out[h + "gate_ffn"] = m + "gate_ffn"
    return out


def unprecompute(table: np.ndarray, max_tiles: int, n_tokens: int, width: int) -> np.ndarray:
    """HF's per-aspect-ratio table (ids+1, T * n_tokens * W) back to Meta's per-slot (T, T, n_tokens, W).

    Row id = index of (h, w) in supported_aspect_ratios + 1 holds Meta's embed[:h, :w] in row-major order,
    then zeros; slot (r, c) is read from the arrangement (r+1, c+1), which contains it."""
    ratios = supported_aspect_ratios(max_tiles)
    if table.shape != (len(ratios) + 1, max_tiles * n_tokens * width):
        raise WeightsError(f"tile embedding of shape {table.shape}, expected "
                           f"{(len(ratios) + 1, max_tiles * n_tokens * width)}")
    rows = table.reshape(len(ratios) + 1, max_tiles, n_tokens, width)  # (ids, T, n_tokens, W)
    out = np.zeros((max_tiles, max_tiles, n_tokens, width), np.float32)  # (T, T, n_tokens, W)
    for r in range(max_tiles):
        for c in range(max_tiles):
            if (r + 1) * (c + 1) <= max_tiles:
                h, w = r + 1, c + 1
                out[r, c] = rows[ratios.index((h, w)) + 1, r * w + c]
    return out


def load_mllama_hf(directory: "str | Path", keep: str = "stored", progress: bool = False):
    """Read a Hugging Face Mllama directory (config.json + safetensors). Returns (text, vision, weights, extras)."""
    from .hf import hf_tensor_files, read_hf_tensors

    directory = Path(directory)
    check_keep(keep)
    where = str(directory)
    text, vision = from_hf_config(directory / "config.json")
    tensors = read_hf_tensors(directory)
    names = _hf_names(text, vision)
    V = "model.vision_model."
    special = {"model.language_model.embed_tokens.weight": "tok_embeddings.weight",
               V + "gated_positional_embedding.tile_embedding.weight": E + "gated_positional_embedding",
               V + "pre_tile_positional_embedding.embedding.weight": E + "pre_tile_pos_embed.embedding",
               V + "post_tile_positional_embedding.embedding.weight": E + "post_tile_pos_embed.embedding"}
    lazy = {}
    for hf_name in tensors:
        if hf_name not in names and hf_name not in special:
            raise WeightsError(f"{where}: unexpected tensor {hf_name} for an Mllama model")
    for hf_name, name in names.items():
        if hf_name not in tensors:
            raise WeightsError(f"{where}: tensor {hf_name} is missing")
        lazy[name] = tensors[hf_name]
    for hf_name in special:
        if hf_name not in tensors:
            raise WeightsError(f"{where}: tensor {hf_name} is missing")
    # Shapes of the tensors that change form, as they will be after the change, for the one shape check.
    fake = type("Lazy", (), {})
    d, w, t, n = text.dim, vision.width, vision.max_num_tiles, vision.tokens_per_tile
    embed = tensors["model.language_model.embed_tokens.weight"]
    if tuple(embed.shape) != (text.vocab_size + LEARNABLE_EMBEDDINGS, d):
        raise WeightsError(f"{where}: embed_tokens has shape {tuple(embed.shape)}, the config implies "
                           f"{(text.vocab_size + LEARNABLE_EMBEDDINGS, d)}")
    checked = dict(lazy)
    for name, shape in (("tok_embeddings.weight", (text.vocab_size, d)),
                        ("learnable_embedding.weight", (LEARNABLE_EMBEDDINGS, d)),
                        (E + "gated_positional_embedding", (t, t, n, w)),
                        (E + "pre_tile_pos_embed.embedding", (t, t, 1, w)),
                        (E + "post_tile_pos_embed.embedding", (t, t, 1, w))):
        checked[name] = fake()
        checked[name].shape = shape
    conv = lazy[E + "conv1._linear.weight"]
    if tuple(conv.shape) != (w, 3, vision.patch_size, vision.patch_size):
        raise WeightsError(f"{where}: patch_embedding has shape {tuple(conv.shape)}, the config implies "
                           f"{(w, 3, vision.patch_size, vision.patch_size)}")
    checked[E + "conv1._linear.weight"] = fake()
    checked[E + "conv1._linear.weight"].shape = (w, 3 * vision.patch_size ** 2)
    for gate in [n_ for n_ in checked if n_.endswith(("gate", "gate_attn", "gate_ffn", "gate_ffwd"))]:
        if tuple(lazy[gate].shape) == ():  # some writers store the gates as scalars
            checked[gate] = fake()
            checked[gate].shape = (1,)
    check_vision_weights(text, vision, checked, where)

    items = list(lazy.items())
    if progress:
        from tqdm import tqdm
        items = tqdm(items, desc=f"loading {directory.name}", unit="tensor", leave=False)
    weights, dtypes = {}, set()
    for name, tns in items:
        dtypes.add(tns.dtype_name)
        raw = tns.read()
        if name.startswith("layers.") and name.endswith(("attention.wq.weight", "attention.wk.weight")):
            raw = permute_hf_to_meta(raw, text.n_heads if name.endswith("wq.weight") else text.kv_heads)
        elif name == E + "conv1._linear.weight":
            raw = raw.reshape(w, -1)  # Conv2d (W, 3, p, p) -> the unfolded patch's (W, 3*p*p), same order
        elif name.endswith(("gate", "gate_attn", "gate_ffn", "gate_ffwd")):
            raw = raw.reshape(1)
        weights[name] = _keep(np.ascontiguousarray(raw), tns.dtype_name, keep, name)
        del raw
    table = embed.read()
    weights["tok_embeddings.weight"] = _keep(np.ascontiguousarray(table[: text.vocab_size]), embed.dtype_name, keep,
                                             "tok_embeddings.weight")
    weights["learnable_embedding.weight"] = to_float32(np.ascontiguousarray(table[text.vocab_size:]),
                                                       embed.dtype_name)
    del table
    for hf_name, name in list(special.items())[1:]:
        t_ = tensors[hf_name]
        n_tok = n if "gated_positional" in name else 1
        try:
            weights[name] = unprecompute(to_float32(t_.read(), t_.dtype_name), t, n_tok, w)
        except WeightsError as e:
            raise WeightsError(f"{where}: {hf_name}: {e}") from None
    return text, vision, weights, {"format": "hf", "dtype": "/".join(sorted(dtypes)),
                                   "files": hf_tensor_files(directory)}


def load_mllama(directory: "str | Path", kind: str, keep: str = "stored", progress: bool = False):
    return (load_mllama_meta if kind == "meta" else load_mllama_hf)(directory, keep=keep, progress=progress)


__all__ = ["is_mllama_directory", "load_mllama", "load_mllama_meta", "load_mllama_hf", "vision_shapes",
           "unprecompute"]
