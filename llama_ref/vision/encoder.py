"""The Llama 3.2 Vision image encoder: tiles of one image in, one feature vector per tile token out.

This file is the specification of Meta's VisionEncoder (llama-models llama3/multimodal/model.py) and
CrossAttentionTransformerVision; it reads top to bottom. Names of weights are Meta's, under
"vision_model.vision_encoder." (see llama_ref.weights.mllama). Shapes:
    S   tile slots (vision_max_num_chunks, 4): every slot goes through the encoder, empty ones included
    P   patches per tile (chunk_size / patch_size)^2, N = P + 1 tokens with the class token, N8 = N + pad
    W   encoder width (1280), D text width, F the encoder MLP's width (5120)
Matrix products and attention go through the model's backend (NumPy ops or Numba kernels) like the text model.

Details of Meta's code reproduced here (Hugging Face's Mllama computes the same):
  - Tokens are padded to a multiple of 8 with 8 - N % 8 zero tokens (8 when N is already a multiple: Meta's
    expand_num_tokens_to_mult8; HF would pad 0 there; for the released 1601 tokens both pad 7).
  - The attention mask hides a key from a query only when BOTH are padding (pad tokens, or any token of an
    empty tile slot): Meta builds it as the outer product of the padding indicator. Real tokens therefore
    attend to the padding and to the empty tiles, whose values are not zero (class token and positions).
  - The intermediate features are the INPUTS of the listed local layers, stacked on a last axis and
    flattened: feature w * n_intermediate + j is width w of intermediate layer j (interleaved, not
    concatenated layer after layer).
"""

from __future__ import annotations

import math

import numpy as np

E = "vision_model.vision_encoder."
_erf = np.vectorize(math.erf, otypes=[np.float64])


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis (torch's LayerNorm, biased var)."""
    mean = x.mean(axis=-1, keepdims=True)
    centred = x - mean
    var = np.mean(np.square(centred), axis=-1, keepdims=True)
    return centred / np.sqrt(var + x.dtype.type(eps)) * weight.astype(x.dtype) + bias.astype(x.dtype)


def gelu(x: np.ndarray) -> np.ndarray:
    """x * Phi(x) with the exact normal CDF (torch's nn.GELU default): in float64 with the C library's erf,
    rounded once to x's dtype. Numba twin: llama_ref.kernels.vision.gelu."""
    v = x.astype(np.float64)
    return (v * 0.5 * (1.0 + _erf(v / math.sqrt(2.0)))).astype(x.dtype)


QUERY_BLOCK = 64  # queries per call of the backend's attention in attend_all


def bidirectional_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, key_mask: "np.ndarray | None" = None):
    """Attention where every query sees every key but those key_mask hides: the reference's causal
    attention (ops.attention) applied as attend_all explains. Numba twin: llama_ref.kernels.vision.
    q (B, T, H, HD); k, v (B, S, KVH, HD); key_mask (B, S) bool or None. Returns (B, T, H, HD)."""
    from ..model import ops
    return attend_all(ops, q, k, v, key_mask)


def attend_all(k_ops, q: np.ndarray, k: np.ndarray, v: np.ndarray, key_mask: "np.ndarray | None" = None):
    """Attention where every query sees every key (but those key_mask marks False), through the backend's
    causal attention: after the S keys come n-1 hidden slots and a block of n queries sits at positions
    S-1 .. S+n-2, so query t may see keys 0 .. S-1+t, of which only the S real ones are visible. Blocks of
    QUERY_BLOCK queries keep the hidden slots (work the causal kernel does for nothing) few.

    q (B, T, H, HD); k, v (B, S, KVH, HD); key_mask (B, S) bool or None. Returns (B, T, H, HD)."""
    B, T = q.shape[:2]
    S = k.shape[1]
    if T == 0:
        return np.zeros(q.shape, q.dtype)
    n = min(T, QUERY_BLOCK)
    keys = np.concatenate([k, np.zeros((B, n - 1, *k.shape[2:]), k.dtype)], axis=1)  # (B, S+n-1, KVH, HD)
    values = np.concatenate([v, np.zeros((B, n - 1, *v.shape[2:]), v.dtype)], axis=1)  # (B, S+n-1, KVH, HD)
    visible = np.ones((B, S), bool) if key_mask is None else key_mask
    visible = np.concatenate([visible, np.zeros((B, n - 1), bool)], axis=1)  # (B, S+n-1)
    out = np.empty(q.shape, q.dtype)  # (B, T, H, HD)
    for t0 in range(0, T, n):
        t1 = min(T, t0 + n)
        end = S + (t1 - t0) - 1  # the causal contract: keys up to the last query's position
        out[:, t0:t1] = k_ops.attention(np.ascontiguousarray(q[:, t0:t1]), keys[:, :end], values[:, :end], S - 1,
                                        visible[:, :end])
    return out


def patch_features(tiles: np.ndarray, weight, patch: int, k_ops) -> np.ndarray:
    """The patch convolution as one matrix product: each patch's 3*p*p pixels times conv1's (W, 3*p*p).

    tiles (S, 3, C, C) -> (S, P, W); patches in row-major order, pixels ordered channel, row, column
    (torch's Unfold, which Meta's ColumnParallelConv2dPatch multiplies)."""
    S, ch, C, _ = tiles.shape
    g = C // patch
    x = tiles.reshape(S, ch, g, patch, g, patch)  # (S, 3, gy, p, gx, p)
    x = x.transpose(0, 2, 4, 1, 3, 5).reshape(S, g * g, ch * patch * patch)  # (S, P, 3*p*p)
    return k_ops.linear(np.ascontiguousarray(x), weight)  # (S, P, W)


def tile_position_embedding(table: np.ndarray, gate: np.ndarray, ar: tuple[int, int], slots: int,
                            dtype) -> np.ndarray:
    """Meta's TilePositionEmbedding: slot r*w+c of an (h, w) arrangement gets table[r, c]; empty slots get
    nothing. Scaled by tanh(gate). table (T, T, 1, W) -> (S, 1, W)."""
    h, w = ar
    out = np.zeros((slots, 1, table.shape[-1]), dtype)  # (S, 1, W)
    out[: h * w] = table[:h, :w].reshape(h * w, 1, -1)
    return out * np.tanh(gate.astype(dtype))


def encoder_layer(model, p: str, x: np.ndarray, real: np.ndarray, gated: bool) -> np.ndarray:
    """One pre-norm transformer layer of the encoder (Meta's ImageTransformerBlock); the global layers scale
    both residual branches by tanh of their gates.

    x (1, L, W) the tokens of all tile slots of one image; real (L,) False for padding tokens."""
    w, k_ops, eps = model.weights, model.ops, model.vision.layer_norm_eps
    heads = model.vision.heads
    _, L, W = x.shape
    hd = W // heads
    # Attention: LayerNorm, project, and let every token attend to every other but padding to padding.
    y = layer_norm(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"], eps)  # (1, L, W)
    q = k_ops.linear(y, w[p + "attn.wq.weight"]).reshape(1, L, heads, hd)  # (1, L, heads, hd)
    k = k_ops.linear(y, w[p + "attn.wk.weight"]).reshape(1, L, heads, hd)
    v = k_ops.linear(y, w[p + "attn.wv.weight"]).reshape(1, L, heads, hd)
    attend = model.vision_attention  # bidirectional_attention, or its Numba twin on the numba backend
    heads_out = np.empty_like(q)  # (1, L, heads, hd)
    heads_out[:, real] = attend(q[:, real], k, v)  # real tokens: every key
    heads_out[:, ~real] = attend(q[:, ~real], k, v, real[None])  # padding: only real keys
    out = k_ops.linear(heads_out.reshape(1, L, W), w[p + "attn.wo.weight"])  # (1, L, W)
    if gated:
        out = out * np.tanh(w[p + "gate_attn"].astype(x.dtype))
    x = x + out
    # MLP: LayerNorm, W -> F with GELU -> W, both with biases.
    y = layer_norm(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"], eps)
    act = model.vision_gelu  # this function, or its Numba twin on the numba backend
    hidden = act(k_ops.linear(y, w[p + "mlp.c_fc.weight"]) + w[p + "mlp.c_fc.bias"].astype(x.dtype))  # (1, L, F)
    out = k_ops.linear(hidden, w[p + "mlp.c_proj.weight"]) + w[p + "mlp.c_proj.bias"].astype(x.dtype)  # (1, L, W)
    if gated:
        out = out * np.tanh(w[p + "gate_ffn"].astype(x.dtype))
    return x + out


def encode_image(model, tiles: np.ndarray, ar: tuple[int, int], name: str = "vision.0.") -> np.ndarray:
    """Features of one image for the text model's cross-attention: (S, N, D).

    tiles (n, 3, C, C) float, the image's n = h*w tiles in row-major order (llama_ref.vision.preprocess);
    ar (h, w) their arrangement. Rows of the result for empty slots exist (Meta computes them) but the
    cross-attention masks never let text see them. Intermediates are captured as name + "patch_embeddings",
    "embeddings", "layers.{i}", "global_layers.{i}", "features", "projection" (with a leading axis of 1, like
    the text model's batch axis)."""
    v, w, k_ops, dtype = model.vision, model.weights, model.ops, model.dtype
    S, C = v.max_num_chunks, v.chunk_size
    h, wd = ar
    n = tiles.shape[0]
    def rec(step: str, x: np.ndarray) -> None:
        model._record(name + step, x[None])
    # Every tile slot up to the maximum goes through the encoder: empty slots are black (zero) tiles.
    slots = np.zeros((S, 3, C, C), dtype)  # (S, 3, C, C)
    slots[:n] = tiles
    # Patch embedding: a matrix product per patch.
    x = patch_features(slots, w[E + "conv1._linear.weight"], v.patch_size, k_ops)  # (S, P, W)
    rec("patch_embeddings", x)
    # Tile-position embedding before the class token (gated): where in the arrangement each tile sits.
    x = x + tile_position_embedding(w[E + "pre_tile_pos_embed.embedding"], w[E + "pre_tile_pos_embed.gate"],
                                    ar, S, dtype)  # (S, P, W)
    # Class token in front of every tile's patches.
    cls = np.broadcast_to(w[E + "class_embedding"].astype(dtype), (S, 1, x.shape[-1]))  # (S, 1, W)
    x = np.concatenate([cls, x], axis=1)  # (S, N, W)
    # Positional embeddings, gated: the per-patch table weighted by 1 - tanh(g) on every slot, and a table
    # per (tile row, tile column) weighted by tanh(g) on the image's own tiles.
    g = np.tanh(w[E + "gated_positional_embedding_gate"].astype(dtype))
    x = x + w[E + "positional_embedding"].astype(dtype) * (1 - g)  # (S, N, W)
    N = x.shape[1]
    x[: h * wd] += w[E + "gated_positional_embedding"][:h, :wd].reshape(h * wd, N, -1).astype(dtype) * g
    rec("embeddings", x)
    x = layer_norm(x, w[E + "ln_pre.weight"], w[E + "ln_pre.bias"], v.layer_norm_eps)  # (S, N, W)
    # Pad every tile's tokens to a multiple of 8 with zeros (Meta: 8 - N % 8 of them, never 0).
    npad = 8 - N % 8
    x = np.concatenate([x, np.zeros((S, npad, x.shape[-1]), dtype)], axis=1)  # (S, N8, W)
    N8 = N + npad
    real = np.zeros((S, N8), bool)  # (S, N8): the image's own tiles, without the padding tokens
    real[: h * wd, :N] = True
    real = real.reshape(-1)  # (S*N8,)
    # Local layers over all tokens of all slots together, keeping the inputs of the intermediate layers.
    x = x.reshape(1, S * N8, -1)  # (1, S*N8, W)
    kept = []
    for i in range(v.layers):
        if i in v.intermediate_layers:
            kept.append(x)
        x = encoder_layer(model, f"{E}transformer.resblocks.{i}.", x, real, gated=False)
        rec(f"layers.{i}", x)
    x = layer_norm(x, w[E + "ln_post.weight"], w[E + "ln_post.bias"], v.layer_norm_eps)  # (1, S*N8, W)
    # Tile-position embedding again (gated), padding tokens included, then the gated global layers.
    x = x.reshape(S, N8, -1) + tile_position_embedding(w[E + "post_tile_pos_embed.embedding"],
                                                        w[E + "post_tile_pos_embed.gate"], ar, S, dtype)
    x = x.reshape(1, S * N8, -1)  # (1, S*N8, W)
    for i in range(v.global_layers):
        x = encoder_layer(model, f"{E}global_transformer.resblocks.{i}.", x, real, gated=True)
        rec(f"global_layers.{i}", x)
    # Drop the padding tokens; append the intermediate features, interleaved (width-major, layer-minor).
    x = x.reshape(S, N8, -1)[:, :N]  # (S, N, W)
    inter = np.stack(kept, axis=-1).reshape(S, N8, -1)[:, :N]  # (S, N, W * n_intermediate)
    x = np.concatenate([x, inter], axis=-1)  # (S, N, W * (1 + n_intermediate))
    rec("features", x)
    # Project into the text model's width.
    out = k_ops.linear(np.ascontiguousarray(x), w["vision_model.vision_projection.weight"])  # (S, N, D)
    out = out + w["vision_model.vision_projection.bias"].astype(dtype)
    rec("projection", out)
    return out
