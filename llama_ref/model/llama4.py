"""One Llama 4 decoder layer: the dense Llama block of model.py with Llama 4's four changes.

    attention   RoPE layers: RoPE, then L2 QK norm (use_qk_norm), then attention within their chunk of
                attention_chunk_size positions. NoPE layers: no RoPE and no QK norm, queries scaled by the
                temperature of their position (attn_temperature_tuning), attention over the whole past.
    feed-forward  MoE layers: a shared SwiGLU expert for every token, plus the top_k routed experts, whose
                input is scaled by the sigmoid of its router logit. Other layers: the dense SwiGLU.

Weights use model.py's names; an MoE layer's are (weights.common.expected_shapes):
    layers.{i}.feed_forward.router.weight               (E, D)    router logits = x @ router.T
    layers.{i}.feed_forward.shared_expert.w{1,2,3}.weight         the shared expert's SwiGLU
    layers.{i}.feed_forward.experts.{e}.w{1,2,3}.weight           expert e's SwiGLU, (out, in) like any Linear

Chunked attention and decoding. Meta's reference masks a prompt by chunks, but gives a single decoded token
no mask at all: in a chunked layer it then attends to the whole cache, unlike the same position in a prompt
(and unlike transformers). llama_ref follows the prompt's rule everywhere, so a token's logits do not depend
on whether it was decoded or prefilled; `model.llama4_meta_decode = True` reproduces Meta's decode instead
(one-token calls see the whole cache in chunked layers).

Shapes: the legend of config.py, plus E experts, K = top_k, N = B*T tokens, FE the expert width.
"""

from __future__ import annotations

import numpy as np

from . import ops


def layer(model, i: int, h: np.ndarray, start_pos: int, cache, key_mask, cos: np.ndarray,
          sin: np.ndarray) -> np.ndarray:
    """Layer i of a Llama 4 model on the residual stream h (B, T, D). Returns the new residual stream."""
    args, op, w = model.args, model.ops, model.weights
    m = args.llama4
    B, T, _ = h.shape
    H, KVH, HD = args.n_heads, args.kv_heads, args.head_dim
    p = f"layers.{i}."
    use_rope = i not in m.nope_layers
    # Left padding: row b's tokens sit pad[b] cache slots later than in a batch of one. RoPE sees only relative
    # positions, but the chunks and temperatures are counted from each row's own first token.
    pad = left_padding(key_mask, start_pos + T)  # (B,); (1,) of zeros without a mask

    # Attention block, pre-norm: normalise, project to queries, keys and values.
    x = op.rms_norm(h, w[p + "attention_norm.weight"], args.norm_eps)  # (B, T, D)
    model._record(p + "attention_norm", x)
    q = op.linear(x, w[p + "attention.wq.weight"]).reshape(B, T, H, HD)  # (B, T, H, HD)
    k = op.linear(x, w[p + "attention.wk.weight"]).reshape(B, T, KVH, HD)  # (B, T, KVH, HD)
    v = op.linear(x, w[p + "attention.wv.weight"]).reshape(B, T, KVH, HD)  # (B, T, KVH, HD)
    if use_rope:
        # RoPE layers rotate queries and keys by position, then (QK norm) scale each head to unit RMS.
        q = op.apply_rope(q, cos, sin)
        k = op.apply_rope(k, cos, sin)
        if m.use_qk_norm:
            q = l2_norm(q, args.norm_eps)
            k = l2_norm(k, args.norm_eps)
    elif m.attn_temperature_tuning:
        # NoPE layers sharpen attention far into a long context: 1 up to position floor_scale - 2, then
        # growing with the log of the number of floor_scale blocks passed.
        temperature = np.stack([attention_temperature(start_pos - n, T, m.floor_scale, m.attn_scale, q.dtype)
                                for n in pad])  # (B or 1, T)
        q = q * temperature[:, :, None, None]
    model._record(p + "attention.q", q)
    model._record(p + "attention.k", k)
    model._record(p + "attention.v", v)
    keys, values = cache.update(i, start_pos, k, v)  # (B, S, KVH, HD) each
    if use_rope and m.attention_chunk_size is not None:
        meta_decode = T == 1 and getattr(model, "llama4_meta_decode", False)
        chunk = None if meta_decode else m.attention_chunk_size
        if not pad.any():
            attn = chunked_attention(op, q, keys, values, start_pos, key_mask, chunk)  # (B, T, H, HD)
        else:  # each row's chunks start at its own first token
            attn = np.concatenate([chunked_attention(op, q[b:b + 1], keys[b:b + 1], values[b:b + 1], start_pos,
                                                     key_mask[b:b + 1], chunk, int(pad[b])) for b in range(B)])
    else:
        attn = op.attention(q, keys, values, start_pos, key_mask)  # (B, T, H, HD)
    model._record(p + "attention.heads", attn)
    out = op.linear(attn.reshape(B, T, H * HD), w[p + "attention.wo.weight"])  # (B, T, D)
    out = model.parallel.all_reduce(out)  # tensor parallel: add every rank's heads
    model._record(p + "attention.output", out)
    h = h + out
    model._record(p + "attention_residual", h)

    # Feed-forward block, pre-norm: the mixture of experts, or a dense SwiGLU.
    x = op.rms_norm(h, w[p + "ffn_norm.weight"], args.norm_eps)  # (B, T, D)
    model._record(p + "ffn_norm", x)
    if i in m.moe_layers:
        out = mixture_of_experts(model, p + "feed_forward.", x)  # (B, T, D)
    else:
        gate = op.linear(x, w[p + "feed_forward.w1.weight"])  # (B, T, F)
        up = op.linear(x, w[p + "feed_forward.w3.weight"])  # (B, T, F)
        model._record(p + "feed_forward.gate", gate)
        model._record(p + "feed_forward.up", up)
        out = op.linear(op.swiglu(gate, up), w[p + "feed_forward.w2.weight"])  # (B, T, D)
    out = model.parallel.all_reduce(out)  # tensor parallel: add the ranks' terms (experts cut by hidden width)
    model._record(p + "feed_forward.output", out)
    h = h + out
    model._record(p + "residual", h)
    return h


def l2_norm(x: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) over the last axis: RMSNorm without a weight. x (..., HD)."""
    return ops.rms_norm(x, np.ones(x.shape[-1], x.dtype), eps)


def left_padding(key_mask, S: int) -> np.ndarray:
    """(B,) the padding slots before each row's first token: key_mask (B, S) must be False then True for
    good (left padding); None means no padding. Any other mask is refused: its positions would be guesses."""
    from ..errors import InputError

    if key_mask is None:
        return np.zeros(1, np.int64)
    mask = np.asarray(key_mask, bool)[:, :S]  # (B, S)
    pad = np.argmax(mask, axis=1)  # the first True of each row (0 when a row is all padding)
    if not np.array_equal(mask, np.arange(mask.shape[1])[None, :] >= pad[:, None]) or not mask[:, -1].all():
        raise InputError("Llama 4 runs batches padded on the left only (a key_mask of False then True per row): "
                         "its chunks and temperatures are counted from each row's first token")
    return pad


def attention_temperature(start_pos: int, T: int, floor_scale: float, attn_scale: float, dtype) -> np.ndarray:
    """The query scale of positions start_pos .. start_pos+T-1 in NoPE layers: (T,). Negative positions
    (left padding, which no query reads) get 1."""
    positions = np.maximum(np.arange(start_pos, start_pos + T, dtype=np.float64), 0)  # (T,)
    return (np.log(np.floor((positions + 1) / floor_scale) + 1) * attn_scale + 1).astype(dtype)


def chunked_attention(op, q, keys, values, start_pos: int, key_mask, chunk: "int | None",
                      offset: int = 0) -> np.ndarray:
    """Causal attention in which each query sees only the keys of its own chunk of `chunk` positions.

    Within one chunk that is ordinary causal attention over the keys from the chunk's first position, so
    the queries are split where they cross a chunk boundary and each part runs the backend's attention on
    its chunk's keys. chunk None: ordinary causal attention. q (B, T, H, HD), keys/values (B, S, KVH, HD).
    offset: the slots of left padding before the first token; chunks count from there (the padding slots
    form one chunk of their own, which key_mask hides).
    """
    if chunk is None:
        return op.attention(q, keys, values, start_pos, key_mask)
    T = q.shape[1]
    parts = []
    t = 0
    while t < T:
        pos = start_pos + t
        if pos < offset:  # padding queries (they see no key): up to the first token
            end = min(T, offset - start_pos)
            parts.append(op.attention(q[:, t:end], keys[:, :start_pos + end], values[:, :start_pos + end], pos,
                                      None if key_mask is None else key_mask[:, :start_pos + end]))
            t = end
            continue
        first = pos - (pos - offset) % chunk  # the chunk's first slot
        end = min(T, first + chunk - start_pos)  # queries t .. end-1 share this chunk
        mask = None if key_mask is None else key_mask[:, first:start_pos + end]
        parts.append(op.attention(q[:, t:end], keys[:, first:start_pos + end], values[:, first:start_pos + end],
                                     pos - first, mask))  # (B, end - t, H, HD)
        t = end
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def swiglu_ffn(op, w: dict, prefix: str, x: np.ndarray) -> np.ndarray:
    """w2(silu(w1 x) * w3 x) with the weights under prefix (w1.weight, w2.weight, w3.weight). x (..., D)."""
    gate = op.linear(x, w[prefix + "w1.weight"])  # (..., F)
    up = op.linear(x, w[prefix + "w3.weight"])  # (..., F)
    return op.linear(op.swiglu(gate, up), w[prefix + "w2.weight"])  # (..., D)


def route(router_logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The experts each token goes to and their weights, as Meta's router chooses them.

    router_logits (N, E). Returns chosen (N, K) expert ids, highest logit first, and weights (N, K): the
    sigmoid of each chosen logit (not a softmax: each expert's weight is independent of the others).
    """
    chosen = np.argsort(-router_logits, axis=-1, kind="stable")[:, :top_k]  # (N, K)
    chosen_logits = np.take_along_axis(router_logits, chosen, axis=-1)  # (N, K)
    with np.errstate(over="ignore"):  # exp overflows to inf for very negative logits: weight 0 exactly
        weights = 1 / (1 + np.exp(-chosen_logits))
    return chosen, weights.astype(router_logits.dtype)


def mixture_of_experts(model, prefix: str, x: np.ndarray) -> np.ndarray:
    """The shared expert plus the top_k routed experts of each token. x (B, T, D) -> (B, T, D).

    Only the experts some token chose are computed, each on its own tokens: the same sum as Meta's, where
    every expert runs on every token and an expert not chosen gets an input of zeros, and so adds zero.
    """
    m, op, w = model.args.llama4, model.ops, model.weights
    B, T, D = x.shape
    tokens = x.reshape(B * T, D)  # (N, D)
    router_logits = op.linear(tokens, w[prefix + "router.weight"])  # (N, E)
    chosen, weights = route(router_logits, m.top_k)  # (N, K) each
    name = prefix[:-len("feed_forward.")]
    model._record(name + "feed_forward.router_logits", router_logits.reshape(B, T, -1))
    model._record(name + "feed_forward.experts", chosen.reshape(B, T, -1))

    # Every token passes through the shared expert.
    out = swiglu_ffn(op, w, prefix + "shared_expert.", tokens)  # (N, D)
    # Each routed expert takes its tokens scaled by their router weights, and adds its output to theirs.
    for e in np.unique(chosen):
        rows, slot = np.nonzero(chosen == e)  # tokens routed to expert e (each at most once)
        expert_in = tokens[rows] * weights[rows, slot][:, None]  # (n_e, D)
        out[rows] += swiglu_ffn(op, w, f"{prefix}experts.{e}.", expert_in)  # (n_e, D)
    return out.reshape(B, T, D)
