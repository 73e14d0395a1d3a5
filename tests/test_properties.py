"""Properties of the forward pass on random tiny configs (hypothesis), each checked against an independent
formulation written here: chunked and token-by-token decoding, plain multi-head attention, RoPE, RMSNorm,
Llama 3 frequency scaling, and the HF <-> Meta q/k row permutation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llama_ref.model import ops
from llama_ref.model.config import ModelArgs, RopeScaling
from llama_ref.model.cache import KVCache
from llama_ref.model.transformer import Transformer
from llama_ref.weights.common import permute_hf_to_meta, permute_meta_to_hf

from tiny import random_weights, tiny_args

FEW = settings(max_examples=25, deadline=None)
SOME = settings(max_examples=60, deadline=None)


@st.composite
def tiny_configs(draw, mha: "bool | None" = None):
    """A small random Llama: any head layout, tied or not, with or without RoPE scaling."""
    kv_heads = draw(st.integers(1, 3))
    groups = 1 if mha else draw(st.integers(1, 3))
    if mha is False and groups == 1:
        groups = 2
    n_heads = kv_heads * groups
    head_dim = draw(st.sampled_from([2, 4, 8]))
    scaling = draw(st.sampled_from([
        None, RopeScaling("linear", 2.0),
        RopeScaling("llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=16),
    ]))
    return tiny_args(
        dim=n_heads * head_dim, n_layers=draw(st.integers(1, 2)), n_heads=n_heads, n_kv_heads=kv_heads,
        vocab_size=draw(st.integers(8, 40)), multiple_of=8, max_seq_len=48,
        rope_theta=draw(st.sampled_from([100.0, 10000.0, 500000.0])), rope_scaling=scaling,
        norm_eps=draw(st.sampled_from([1e-6, 1e-5])), tie_word_embeddings=draw(st.booleans()))


# ---- prefill, chunked prefill and decode are the same computation ----------------------------------------------

# In float64 the three ways of feeding tokens must agree to 1e-10: they are the same arithmetic in another
# order. In float32 the bound is 1e-5 on weights of realistic scale; with weight scale 1.0 a 4-wide model
# can amplify float32 rounding past 1e-5 (seen: 2.3e-5 between paths, each within 4e-5 of float64), which
# says nothing about the algorithm, so the large-scale weights are checked in float64 only.
@FEW
@pytest.mark.parametrize("dtype, scale, atol", [(np.float64, 1.0, 1e-10), (np.float32, 0.2, 1e-5)])
@given(args=tiny_configs(), data=st.data())
def test_chunked_prefill_and_decode_match_one_full_forward(dtype, scale, atol, args, data):
    seed = data.draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    T = data.draw(st.integers(2, 24))
    tokens = rng.integers(0, args.vocab_size, T)
    model = Transformer(args, random_weights(args, seed, scale=scale), dtype=dtype)
    full = model.forward(tokens, 0)  # (T, V)

    # Chunked prefill at random cut points.
    cuts = sorted(set(data.draw(st.lists(st.integers(1, T - 1), max_size=4))))
    bounds = [0, *cuts, T]
    chunked = np.concatenate([model.forward(tokens[a:b], a) for a, b in zip(bounds, bounds[1:])])
    np.testing.assert_allclose(chunked, full, rtol=0, atol=atol)

    # One token at a time after a one-token prefill, through an explicit cache object.
    cache = KVCache(args, 1, dtype, capacity=1)  # starts small: growing must keep what is stored
    decoded = np.concatenate([model.forward(tokens[t:t + 1], t, cache=cache) for t in range(T)])
    np.testing.assert_allclose(decoded, full, rtol=0, atol=atol)


@FEW
@given(args=tiny_configs(), seed=st.integers(0, 2**16))
def test_rewinding_the_cache_recomputes_the_same_logits(args, seed):
    # Decoding over positions that were already cached replaces them: same tokens give the same logits.
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, args.vocab_size, 10)
    model = Transformer(args, random_weights(args, seed))
    full = model.forward(tokens, 0)
    model.forward(rng.integers(0, args.vocab_size, 4), 6)  # overwrite positions 6..9 with other tokens
    np.testing.assert_allclose(model.forward(tokens[6:], 6), full[6:], rtol=0, atol=1e-5)


@FEW
@given(args=tiny_configs(), seed=st.integers(0, 2**16))
def test_batch_rows_are_independent(args, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, args.vocab_size, (3, 7))
    model = Transformer(args, random_weights(args, seed))
    batched = model.forward(tokens, 0)  # (B, T, V)
    for b in range(3):
        np.testing.assert_allclose(batched[b], model.forward(tokens[b], 0), rtol=0, atol=1e-5)


# ---- an independent plain multi-head attention model ------------------------------------------------------

def reference_mha_forward(args: ModelArgs, w: dict, tokens: np.ndarray) -> np.ndarray:
    """Llama with plain multi-head attention, written per head and per position in float64.

    RoPE here rotates each pair (x[2i], x[2i+1]) as the complex number x[2i] + i x[2i+1] times e^(i pos f),
    as Meta's reference code does; attention is a loop over heads with an explicit causal mask.
    """
    H, HD = args.n_heads, args.head_dim
    f64 = {k: np.asarray(v, np.float64) for k, v in w.items()}
    freqs = ops.rope_frequencies(args)  # (HD/2,)

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + args.norm_eps) * g

    def rotate(x, pos):  # x (HD,) at position pos
        z = (x[0::2] + 1j * x[1::2]) * np.exp(1j * pos * freqs)
        return np.stack([z.real, z.imag], axis=-1).reshape(-1)

    T = len(tokens)
    h = f64["tok_embeddings.weight"][tokens]  # (T, D)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        x = norm(h, f64[p + "attention_norm.weight"])
        heads = []
        for head in range(H):
            rows = slice(head * HD, (head + 1) * HD)
            q = x @ f64[p + "attention.wq.weight"][rows].T  # (T, HD)
            k = x @ f64[p + "attention.wk.weight"][rows].T
            v = x @ f64[p + "attention.wv.weight"][rows].T
            q = np.stack([rotate(q[t], t) for t in range(T)])
            k = np.stack([rotate(k[t], t) for t in range(T)])
            scores = q @ k.T / math.sqrt(HD)  # (T, T)
            scores[np.triu_indices(T, 1)] = -np.inf
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            heads.append(probs / probs.sum(-1, keepdims=True) @ v)
        h = h + np.concatenate(heads, axis=-1) @ f64[p + "attention.wo.weight"].T
        x = norm(h, f64[p + "ffn_norm.weight"])
        gate, up = x @ f64[p + "feed_forward.w1.weight"].T, x @ f64[p + "feed_forward.w3.weight"].T
        h = h + (gate / (1 + np.exp(-gate)) * up) @ f64[p + "feed_forward.w2.weight"].T
    return norm(h, f64["norm.weight"]) @ f64["output.weight"].T


@FEW
@given(args=tiny_configs(mha=True), seed=st.integers(0, 2**16), T=st.integers(1, 12))
def test_n_kv_heads_equal_n_heads_is_plain_multi_head_attention(args, seed, T):
    assert args.kv_heads == args.n_heads
    tokens = np.random.default_rng(seed).integers(0, args.vocab_size, T)
    weights = random_weights(args, seed, scale=1.0)
    ours = Transformer(args, weights, dtype=np.float64).forward(tokens, 0)
    np.testing.assert_allclose(ours, reference_mha_forward(args, weights, tokens), rtol=0, atol=1e-10)


def reference_attention(q, k, v, start_pos):
    """Plain multi-head causal attention, one head at a time. q (T, H, HD); k, v (S, H, HD)."""
    T, H, HD = q.shape
    out = np.zeros_like(q)
    for head in range(H):
        for t in range(T):
            s = q[t, head] @ k[: start_pos + t + 1, head].T / math.sqrt(HD)  # keys up to its own position
            p = np.exp(s - s.max())
            out[t, head] = (p / p.sum()) @ v[: start_pos + t + 1, head]
    return out


@SOME
@given(kv=st.integers(1, 3), groups=st.integers(1, 4), hd=st.sampled_from([2, 4, 8]),
       T=st.integers(1, 6), start=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_grouped_query_attention_is_mha_with_shared_kv_heads(kv, groups, hd, T, start, seed):
    # Query head h reads KV head h // groups: GQA equals MHA over KV heads repeated `groups` times.
    rng = np.random.default_rng(seed)
    H, S = kv * groups, start + T
    q = rng.standard_normal((1, T, H, hd))
    k, v = rng.standard_normal((1, S, kv, hd)), rng.standard_normal((1, S, kv, hd))
    ours = ops.attention(q, k, v, start)[0]
    expected = reference_attention(q[0], np.repeat(k[0], groups, axis=1), np.repeat(v[0], groups, axis=1), start)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)


# ---- RoPE -----------------------------------------------------------------------------------------------

def _rotate(x: np.ndarray, pos: int, freqs: np.ndarray) -> np.ndarray:
    """ops.apply_rope on one head vector x (HD,) at one position."""
    cos, sin = ops.rope_tables(freqs, pos, 1, np.float64)
    return ops.apply_rope(x[None, None, None, :], cos, sin)[0, 0, 0]


rope_args = st.builds(
    lambda hd, theta, scaling: tiny_args(dim=hd * 2, n_heads=2, n_kv_heads=2, rope_theta=theta,
                                         rope_scaling=scaling),
    st.sampled_from([2, 8, 16, 64]), st.sampled_from([10000.0, 500000.0, 1e6]),
    st.sampled_from([None, RopeScaling("linear", 4.0), RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
                     RopeScaling("llama3", 32.0, 1.0, 4.0, 64)]))


@SOME
@given(args=rope_args, pos=st.integers(0, 100000), seed=st.integers(0, 2**16))
def test_rope_preserves_norms(args, pos, seed):
    x = np.random.default_rng(seed).standard_normal(args.head_dim)
    y = _rotate(x, pos, ops.rope_frequencies(args))
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x), rel=1e-12)
    # Each pair keeps its own length: RoPE only rotates within pairs.
    np.testing.assert_allclose(np.hypot(y[0::2], y[1::2]), np.hypot(x[0::2], x[1::2]), rtol=1e-12)


@SOME
@given(args=rope_args, m=st.integers(0, 5000), n=st.integers(0, 5000), shift=st.integers(0, 5000),
       seed=st.integers(0, 2**16))
def test_rope_scores_depend_only_on_relative_position(args, m, n, shift, seed):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal(args.head_dim), rng.standard_normal(args.head_dim)
    freqs = ops.rope_frequencies(args)
    before = _rotate(q, m, freqs) @ _rotate(k, n, freqs)
    after = _rotate(q, m + shift, freqs) @ _rotate(k, n + shift, freqs)
    assert after == pytest.approx(before, abs=1e-9 * (1 + abs(before)))
    # And the score is a function of m - n alone: rotating only one of the two by it gives the same.
    relative = _rotate(q, m - n, freqs) @ k if m >= n else q @ _rotate(k, n - m, freqs)
    assert relative == pytest.approx(before, abs=1e-9 * (1 + abs(before)))


def test_rope_position_zero_is_the_identity():
    args = tiny_args()
    x = np.random.default_rng(0).standard_normal(args.head_dim)
    np.testing.assert_array_equal(_rotate(x, 0, ops.rope_frequencies(args)), x)


# ---- RMSNorm -------------------------------------------------------------------------------------------

@SOME
@given(D=st.integers(1, 64), c=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_rmsnorm_is_scale_invariant(D, c, seed):
    rng = np.random.default_rng(seed)
    x, g = rng.standard_normal((3, D)) + 0.1, rng.standard_normal(D)
    # Exactly invariant when eps scales with c^2 ...
    np.testing.assert_allclose(ops.rms_norm(c * x, g, 1e-5 * c * c), ops.rms_norm(x, g, 1e-5), rtol=1e-10)
    # ... and otherwise off by at most the share of eps in the mean square: 1 - sqrt(ms / (ms + eps)).
    eps = 1e-8
    ms = (c * x * c * x).mean(-1, keepdims=True)  # (3, 1)
    np.testing.assert_allclose(ops.rms_norm(c * x, g, eps), ops.rms_norm(x, g, 0.0) * np.sqrt(ms / (ms + eps)),
                               rtol=1e-10)
    # A sign flip passes straight through; unit gain gives rows of root-mean-square sqrt(ms / (ms + eps)).
    np.testing.assert_array_equal(ops.rms_norm(-x, g, 1e-5), -ops.rms_norm(x, g, 1e-5))
    y = ops.rms_norm(c * x, np.ones(D), eps)
    np.testing.assert_allclose(np.sqrt((y * y).mean(-1, keepdims=True)), np.sqrt(ms / (ms + eps)), rtol=1e-12)


# ---- Llama 3 frequency scaling against the published formula ------------------------------------------------

def published_llama3_scaling(freqs, factor, low_freq_factor, high_freq_factor, old_context_len):
    """llama-configs.md section 2 (Meta's apply_scaling, with every number a parameter), one frequency at a
    time."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    new_freqs = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            new_freqs.append(freq)
        elif wavelen > low_freq_wavelen:
            new_freqs.append(freq / factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            new_freqs.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(new_freqs)


@SOME
@given(hd=st.sampled_from([4, 16, 64, 128]), theta=st.sampled_from([10000.0, 500000.0]),
       factor=st.floats(1.0, 64.0), low=st.floats(0.5, 2.0), high_over_low=st.floats(1.1, 8.0),
       orig=st.sampled_from([64, 1024, 8192]))
def test_llama3_scaling_matches_the_published_formula(hd, theta, factor, low, high_over_low, orig):
    scaling = RopeScaling("llama3", factor, low, low * high_over_low, orig)
    args = tiny_args(dim=2 * hd, n_heads=2, n_kv_heads=2, rope_theta=theta, rope_scaling=scaling)
    unscaled = ops.rope_frequencies(args.replace(rope_scaling=None))
    expected = published_llama3_scaling(unscaled, factor, low, low * high_over_low, orig)
    np.testing.assert_allclose(ops.rope_frequencies(args), expected, rtol=1e-13)


def test_llama31_8b_frequencies_keep_high_and_slow_low_frequencies():
    from llama_ref.model import presets

    args = presets.get("llama-3.1-8b")
    scaled, unscaled = ops.rope_frequencies(args), ops.rope_frequencies(args.replace(rope_scaling=None))
    wavelen = 2 * np.pi / unscaled
    high = wavelen < 8192 / 4  # shorter than 2048 positions: left exactly as trained
    low = wavelen > 8192 / 1  # longer than 8192 positions: divided by the factor
    assert high.sum() > 0 and low.sum() > 0 and (~high & ~low).sum() > 0
    np.testing.assert_array_equal(scaled[high], unscaled[high])
    np.testing.assert_allclose(scaled[low], unscaled[low] / 8.0, rtol=1e-15)
    # The band between is a blend: strictly between the two.
    mid = ~high & ~low
    assert np.all(scaled[mid] < unscaled[mid]) and np.all(scaled[mid] > unscaled[mid] / 8.0)
    np.testing.assert_allclose(scaled, published_llama3_scaling(unscaled, 8.0, 1.0, 4.0, 8192), rtol=1e-13)


@SOME
@given(hd=st.sampled_from([4, 16, 64]), factor=st.floats(1.0, 16.0))
def test_linear_scaling_divides_every_frequency(hd, factor):
    args = tiny_args(dim=2 * hd, n_heads=2, n_kv_heads=2, rope_scaling=RopeScaling("linear", factor))
    unscaled = ops.rope_frequencies(args.replace(rope_scaling=None))
    np.testing.assert_allclose(ops.rope_frequencies(args), unscaled / factor, rtol=1e-15)


# ---- HF <-> Meta q/k row order ----------------------------------------------------------------------------

def hf_rope(x: np.ndarray, pos: int, freqs: np.ndarray) -> np.ndarray:
    """HF's rotate_half RoPE on one head (HD,): pairs (x[i], x[i + HD/2]) share frequency i."""
    angles = pos * np.concatenate([freqs, freqs])  # (HD,)
    half = x.shape[-1] // 2
    rotate_half = np.concatenate([-x[half:], x[:half]])
    return x * np.cos(angles) + rotate_half * np.sin(angles)


@SOME
@given(n_heads=st.integers(1, 4), hd=st.sampled_from([2, 4, 8, 16]), cols=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_permutations_are_inverses(n_heads, hd, cols, seed):
    w = np.random.default_rng(seed).standard_normal((n_heads * hd, cols))
    np.testing.assert_array_equal(permute_meta_to_hf(permute_hf_to_meta(w, n_heads), n_heads), w)
    np.testing.assert_array_equal(permute_hf_to_meta(permute_meta_to_hf(w, n_heads), n_heads), w)
    # A true permutation of rows, and the identity on nothing: each head's rows stay in that head.
    meta = permute_hf_to_meta(np.arange(n_heads * hd), n_heads)
    assert sorted(meta) == list(range(n_heads * hd))
    assert all(set(meta[h * hd:(h + 1) * hd]) == set(range(h * hd, (h + 1) * hd)) for h in range(n_heads))


def test_permutation_matches_the_converters():
    # HF head rows [x0 x1 | y0 y1] become Meta's [x0 y0 x1 y1]; and the converters' own formula (HFCONV
    # permute: view(n, hd/2, 2, cols).transpose(1, 2)) maps Meta -> HF identically.
    np.testing.assert_array_equal(permute_hf_to_meta(np.arange(8), 2), [0, 2, 1, 3, 4, 6, 5, 7])
    w = np.arange(24 * 3).reshape(24, 3)
    converter = w.reshape(3, 24 // 3 // 2, 2, 3).transpose(0, 2, 1, 3).reshape(24, 3)
    np.testing.assert_array_equal(permute_meta_to_hf(w, 3), converter)


@SOME
@given(n_heads=st.integers(1, 3), hd=st.sampled_from([2, 4, 8, 16]), D=st.integers(2, 8),
       pos_q=st.integers(0, 300), pos_k=st.integers(0, 300), theta=st.sampled_from([10000.0, 500000.0]),
       seed=st.integers(0, 2**16), direction=st.sampled_from(["meta->hf", "hf->meta"]))
def test_permutation_maps_hf_rotate_half_rope_to_meta_pairwise_rope(n_heads, hd, D, pos_q, pos_k, theta, seed,
                                                                     direction):
    rng = np.random.default_rng(seed)
    freqs = ops.rope_frequencies(tiny_args(dim=2 * hd, n_heads=2, n_kv_heads=2, rope_theta=theta))
    x = rng.standard_normal(D)
    w = rng.standard_normal((n_heads * hd, D))
    # Start from weights in one convention and convert them to the other.
    if direction == "meta->hf":
        w_meta, w_hf = w, permute_meta_to_hf(w, n_heads)
    else:
        w_hf, w_meta = w, permute_hf_to_meta(w, n_heads)
    q_meta = (w_meta @ x).reshape(n_heads, hd)
    q_hf = (w_hf @ x).reshape(n_heads, hd)
    for h in range(n_heads):
        meta = _rotate(q_meta[h], pos_q, freqs)  # Meta's pairwise rotation on Meta-ordered rows
        hf = hf_rope(q_hf[h], pos_q, freqs)  # HF's rotate_half rotation on HF-ordered rows
        # The same rotated vector, in each convention's row order.
        np.testing.assert_allclose(permute_meta_to_hf(meta, 1), hf, rtol=0, atol=1e-12)
        np.testing.assert_allclose(permute_hf_to_meta(hf, 1), meta, rtol=0, atol=1e-12)
        # So attention scores agree between the two conventions.
        k = rng.standard_normal(hd)  # a key head in Meta order
        score_meta = meta @ _rotate(k, pos_k, freqs)
        score_hf = hf @ hf_rope(permute_meta_to_hf(k, 1), pos_k, freqs)
        assert score_hf == pytest.approx(score_meta, abs=1e-10)


def test_unpermuted_hf_weights_would_give_different_rope():
    # The permutation is not a no-op: Meta's RoPE on HF-ordered rows gives a different vector than HF's RoPE.
    freqs = ops.rope_frequencies(tiny_args(dim=16, n_heads=2, n_kv_heads=2))
    q = np.random.default_rng(1).standard_normal(8)
    assert not np.allclose(_rotate(q, 5, freqs), hf_rope(q, 5, freqs))
