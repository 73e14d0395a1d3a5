"""Llama 4 text models: config, forward pass and loaders, against Meta's llama4 reference and transformers' Llama4.

tests/data/tiny_ckpt/llama4_{meta,hf} hold one tiny random model in both formats, and llama4_logits.npz the
logits Meta's code and transformers computed for it (tests/fixtures/make_llama4_checkpoint.py says how; neither
library is needed here). Every Llama 4 feature is on in it and changes its logits (test_each_feature_matters).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from llama_ref.tools.capture import run_and_capture
from llama_ref.model.config import ConfigError, from_hf_config, from_params_json
from llama_ref.model.llama4 import chunked_attention, route
from llama_ref.weights.common import WeightsError

DATA = Path(__file__).parent / "data" / "tiny_ckpt"
META, HF = DATA / "llama4_meta", DATA / "llama4_hf"
REF = np.load(DATA / "llama4_logits.npz")
TOKENS = REF["tokens"]
PROMPT = json.loads(str(REF["meta"]))["prompt"]
PIECES = [tuple(p) for p in json.loads(str(REF["meta"]))["pieces"]]
TOL = 1e-4


@pytest.fixture(scope="module", params=["meta", "hf"])
def model(request):
    return llama_ref.load(META if request.param == "meta" else HF)


def run_in_steps(model, meta_decode=False):
    """Prefill in PIECES, then decode one token at a time to the end of TOKENS."""
    model.llama4_meta_decode = meta_decode
    try:
        steps = PIECES + [(t, t + 1) for t in range(PIECES[-1][1], len(TOKENS))]
        return np.concatenate([model.forward(TOKENS[s:e], s) for s, e in steps])
    finally:
        model.llama4_meta_decode = False


# ---- config --------------------------------------------------------------------------------------------------

def test_meta_and_hf_configs_describe_the_same_model():
    meta = from_params_json(META / "params.json")
    hf = from_hf_config(HF / "config.json")
    assert meta.llama4 == hf.llama4
    assert meta.llama4.moe_layers == (1, 3) and meta.llama4.nope_layers == (2,)
    assert meta.llama4.expert_hidden_dim == 32  # Meta's formula: 2*32 -> 42 -> /2 = 21 -> multiple of 16
    assert meta.ffn_hidden_dim == hf.ffn_hidden_dim == 96  # dense layers: Llama's formula / intermediate_size_mlp
    assert meta.rope_scaling == hf.rope_scaling and meta.rope_scaling.factor == 16.0
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "head_dim", "vocab_size", "norm_eps", "rope_theta",
                  "max_seq_len"):
        assert getattr(meta, field) == getattr(hf, field), field


def test_llama4_params_json_defaults_follow_meta():
    """use_scaled_rope alone means Scout's factor 16 and high_freq_factor 1 (llama4/args.py), not 3.1's 8/4."""
    params = json.loads((META / "params.json").read_text())
    for key in ("rope_scaling_factor", "rope_high_freq_factor"):
        del params[key]
    scaling = from_params_json(params).rope_scaling
    assert (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor) == (16.0, 1.0, 1.0)


@pytest.mark.parametrize("change, message", [
    ({"quantization_args": {"scheme": "int4_weight_int8_dynamic_activation"}}, "quantization_args"),
    ({"lora_args": {"rank": 8, "scale": 1.0}}, "lora_args"),
    ({"moe_args": {"num_experts": 4, "router_jitter": 0.1}}, "moe_args.router_jitter is not implemented"),
    ({"moe_args": None}, "without moe_args"),
    ({"ffn_exp": None}, "needs ffn_exp"),
    ({"head_dim": 16}, "head_dim 16 differs"),
    ({"nope_layer_interval": 0}, "nope_layer_interval must be > 0"),
    ({"attention_chunk_size": 0}, "attention_chunk_size must be a positive integer"),
    ({"moe_args": {"num_experts": 2, "top_k": 3}}, "top_k .3. exceeds"),
    ({"n_layers": 2 ** 40}, "n_layers is 1099511627776: a Llama 4 model has 1 .. 4096 layers"),  # no 2^40 loop
])
def test_llama4_params_json_refusals(change, message):
    params = json.loads((META / "params.json").read_text())
    params.update(change)
    with pytest.raises(ConfigError, match=message):
        from_params_json(params)


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"layer_types": ["full_attention"] * 4}, "layer_types"),
    ({"no_rope_layers": [1, 1, 2, 1]}, "no_rope_layers must hold 0 or 1"),
    ({"no_rope_layers": [1, 0]}, "one entry per layer"),
    ({"moe_layers": [1, 7]}, "moe_layers names layer 7"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"num_hidden_layers": 2 ** 40, "no_rope_layers": None, "layer_types": None, "moe_layers": None},
     "num_hidden_layers is 1099511627776: a Llama 4 model has 1 .. 4096 layers"),  # no 2^40-entry tables
])
def test_llama4_config_json_refusals(change, message):
    config = json.loads((HF / "config.json").read_text())
    config.update(change)
    with pytest.raises(ConfigError, match=message):
        from_hf_config(config)


def test_config_json_omitted_keys_take_transformers_defaults():
    """A Llama4TextConfig without no_rope_layers means NoPE every 4th layer, chunk 8192, QK norm on."""
    config = json.loads((HF / "config.json").read_text())
    for key in ("no_rope_layers", "no_rope_layer_interval", "attention_chunk_size", "use_qk_norm", "layer_types",
                "attn_temperature_tuning", "floor_scale", "attn_scale"):
        del config[key]
    m = from_hf_config(config).llama4
    assert (m.nope_layers, m.attention_chunk_size, m.use_qk_norm) == ((3,), 8192, True)
    assert (m.attn_temperature_tuning, m.floor_scale, m.attn_scale) == (True, 8192.0, 0.1)


def test_multimodal_config_json_reads_its_text_config():
    text = json.loads((HF / "config.json").read_text())
    wrapped = {"model_type": "llama4", "text_config": text, "vision_config": {"hidden_size": 16}}
    assert from_hf_config(wrapped) == from_hf_config(text)


# ---- the forward pass against Meta's and transformers' logits ---------------------------------------------

def test_prompt_pass_matches_meta_and_transformers(model):
    logits = model.forward(TOKENS, 0)
    assert np.abs(logits - REF["meta_full"]).max() < TOL
    assert np.abs(logits - REF["hf_full"]).max() < TOL


def test_chunked_prefill_and_decode_match_the_prompt_pass(model):
    """Prefill pieces crossing chunk boundaries, then decode across one: the prompt pass's chunk rule.
    Meta's forward cannot prefill in pieces; transformers can, and agrees, as does Meta's full prompt pass."""
    logits = run_in_steps(model)
    assert np.abs(logits - REF["hf_steps"]).max() < TOL
    assert np.abs(logits - REF["meta_full"]).max() < TOL


def test_meta_decode_option_reproduces_metas_decode(model):
    """With llama4_meta_decode a one-token step attends to the whole cache in chunked layers, as Meta's decode
    does; the two rules disagree by whole logits once decoding passes a chunk boundary."""
    prefill = slice(0, PIECES[-1][1])
    assert PIECES[-1][1] == PROMPT
    logits = run_in_steps(model, meta_decode=True)
    assert np.abs(logits[prefill] - REF["meta_full"][prefill]).max() < TOL  # prefill follows the chunks
    assert np.abs(logits[PROMPT:] - REF["meta_decode"]).max() < TOL
    assert np.abs(REF["meta_decode"] - REF["meta_full"][PROMPT:]).max() > 1.0  # the disagreement is real


def test_expert_choices_match_meta_and_transformers(model):
    acts = run_and_capture(model, TOKENS, ["layers.*.feed_forward.experts", "layers.*.feed_forward.router_logits"])
    moe = model.args.llama4.moe_layers
    chosen = np.stack([acts[f"layers.{i}.feed_forward.experts"][:, 0] for i in moe])  # (n_moe, T)
    np.testing.assert_array_equal(chosen, REF["meta_experts"])
    np.testing.assert_array_equal(chosen, REF["hf_experts"])
    assert acts[f"layers.{moe[0]}.feed_forward.router_logits"].shape == (len(TOKENS), model.args.llama4.n_experts)
    assert len(np.unique(chosen)) > 1  # the routing is not trivially one expert


def test_meta_and_hf_files_give_identical_logits():
    meta, hf = llama_ref.load(META), llama_ref.load(HF)
    np.testing.assert_array_equal(meta.forward(TOKENS, 0), hf.forward(TOKENS, 0))


@pytest.mark.parametrize("backend, dtype", [("numba", np.float32), ("numpy", np.float64)])
def test_other_backends_and_float64(backend, dtype):
    model = llama_ref.load(HF, backend=backend, dtype=dtype)
    assert np.abs(model.forward(TOKENS, 0) - REF["meta_full"]).max() < TOL
    assert np.abs(run_in_steps(model) - REF["hf_steps"]).max() < TOL


@pytest.mark.parametrize("change", [
    {"attention_chunk_size": None}, {"nope_layers": ()}, {"use_qk_norm": False},
    {"attn_temperature_tuning": False}, {"top_k": 2},
])
def test_each_feature_matters(change):
    """Switching any one Llama 4 feature off moves the logits far beyond the tolerance: the reference logits
    test every one of them."""
    model = llama_ref.load(HF)
    model.args = model.args.replace(llama4=model.args.llama4.__class__(**{**model.args.llama4.__dict__, **change}))
    assert np.abs(model.forward(TOKENS, 0) - REF["meta_full"]).max() > 100 * TOL


def test_scaled_rope_matters():
    """Scout's scaling slows only the slowest frequencies, which turn little within 28 positions: ignoring it
    moves the logits by ~1e-3, still several times the tolerance."""
    from llama_ref.model import ops
    model = llama_ref.load(HF)
    model.freqs = ops.rope_frequencies(model.args.replace(rope_scaling=None))
    assert np.abs(model.forward(TOKENS, 0) - REF["meta_full"]).max() > 5 * TOL


# ---- pieces ----------------------------------------------------------------------------------------------

def test_route_takes_sigmoid_of_the_top_logits():
    logits = np.array([[0.5, 2.0, -1.0, 1.0], [-3.0, -2.0, -4.0, -5.0]], np.float32)
    chosen, weights = route(logits, 2)
    np.testing.assert_array_equal(chosen, [[1, 3], [1, 0]])
    np.testing.assert_allclose(weights, 1 / (1 + np.exp(-np.array([[2.0, 1.0], [-2.0, -3.0]]))), rtol=1e-6)


def test_chunked_attention_equals_a_chunk_mask():
    """Splitting the queries at chunk boundaries is attention under the mask Meta builds for a prompt."""
    from llama_ref.model import ops
    rng = np.random.default_rng(0)
    B, T, H, KVH, HD, C = 2, 11, 4, 2, 8, 3
    q = rng.standard_normal((B, T, H, HD))
    k, v = rng.standard_normal((2, B, 20, KVH, HD))
    for start in (0, 2, 7):
        keys, values = k[:, :start + T], v[:, :start + T]
        got = chunked_attention(ops, q, keys, values, start, None, C)
        pos = start + np.arange(T)
        visible = (np.arange(start + T)[None] <= pos[:, None]) & (np.arange(start + T)[None] // C == pos[:, None] // C)
        G = H // KVH
        scores = np.einsum("bthd,bshd->bhts", q, np.repeat(keys, G, axis=2)) / np.sqrt(HD)
        scores = np.where(visible, scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        want = np.einsum("bhts,bshd->bthd", probs, np.repeat(values, G, axis=2))
        np.testing.assert_allclose(got, want, atol=1e-12)


# ---- loaders -----------------------------------------------------------------------------------------------

def test_meta_files_with_their_stored_names_load_the_same(tmp_path):
    """Meta's files may hold the names its modules' load hooks rename (wqkv, moe_w_in_eD_F, router_DE, ...)."""
    from llama_ref.weights.torch_zip import read_torch_file
    from llama_ref.weights.writers import write_torch_file

    src = read_torch_file(META / "consolidated.00.pth")
    raw = {name: t.read() for name, t in src.items()}
    dtype = {"bfloat16": "bf16", "float32": "f32"}[next(iter(src.values())).dtype_name]
    renamed = {}
    for name, a in raw.items():
        p, _, rest = name.partition(".feed_forward.")
        if name.endswith("attention.wq.weight"):
            base = name[:-len("wq.weight")]
            renamed[base + "wqkv.weight"] = np.concatenate([a, raw[base + "wk.weight"], raw[base + "wv.weight"]])
        elif name.endswith(("attention.wk.weight", "attention.wv.weight")):
            continue
        elif name.endswith("attention_norm.weight"):
            renamed[name.replace("attention_norm.weight", "attention.wqkv.layer_norm_weight")] = a
        elif name.endswith("ffn_norm.weight"):
            renamed[name.replace("ffn_norm.weight", "feed_forward.norm.weight")] = a
        elif rest in ("experts.w1", "experts.w3", "experts.w2"):
            flat = {"experts.w1": "moe_w_in_eD_F", "experts.w3": "moe_w_swiglu_eD_F", "experts.w2": "moe_w_out_eF_D"}
            renamed[f"{p}.feed_forward.experts.{flat[rest]}"] = a.reshape(-1, a.shape[-1])
        elif rest.startswith("shared_expert."):
            stored = {"w1": "w_in_shared_FD", "w3": "w_swiglu_FD", "w2": "w_out_shared_DF"}[rest.split(".")[1]]
            renamed[f"{p}.feed_forward.{stored}.weight"] = a
        else:
            renamed[name] = a
    out = tmp_path / "stored_names"
    out.mkdir()
    (out / "params.json").write_text((META / "params.json").read_text())
    write_torch_file(out / "consolidated.00.pth", [(n, np.ascontiguousarray(a), dtype) for n, a in renamed.items()])
    np.testing.assert_array_equal(llama_ref.load(out).forward(TOKENS, 0), llama_ref.load(META).forward(TOKENS, 0))


def test_a_wrong_expert_shape_is_refused_naming_the_tensor(tmp_path):
    from llama_ref.weights.safetensors_file import read_safetensors_header
    from llama_ref.weights.writers import write_safetensors

    tensors = {n: t.read() for n, t in read_safetensors_header(HF / "model.safetensors")[0].items()}
    tensors["model.layers.1.feed_forward.experts.down_proj"] = tensors[
        "model.layers.1.feed_forward.experts.down_proj"][:3]
    out = tmp_path / "bad"
    out.mkdir()
    (out / "config.json").write_text((HF / "config.json").read_text())
    write_safetensors(out / "model.safetensors", [(n, np.ascontiguousarray(a), "bf16") for n, a in tensors.items()])
    with pytest.raises(WeightsError, match=r"experts.down_proj has shape \(3, 32, 32\)"):
        llama_ref.load(out)


def test_a_missing_expert_is_refused(tmp_path):
    from llama_ref.weights.safetensors_file import read_safetensors_header
    from llama_ref.weights.writers import write_safetensors

    tensors = {n: t.read() for n, t in read_safetensors_header(HF / "model.safetensors")[0].items()}
    del tensors["model.layers.3.feed_forward.router.weight"]
    out = tmp_path / "missing"
    out.mkdir()
    (out / "config.json").write_text((HF / "config.json").read_text())
    write_safetensors(out / "model.safetensors", [(n, np.ascontiguousarray(a), "bf16") for n, a in tensors.items()])
    with pytest.raises(WeightsError, match="layers.3.feed_forward.router.weight is missing"):
        llama_ref.load(out)


# ---- presets against the published sizes ---------------------------------------------------------------

def test_llama4_presets_match_published_parameter_counts():
    """Model cards: Scout 17B active / 109B total, Maverick 17B active / 400B total. The totals include the
    vision encoder (presets.LLAMA4_VISION_PARAMS, 0.87B), which llama_ref does not load; the text models
    alone are 107.77B and 400.71B. "400B" is rounded to two significant digits (the sum is 401.6B)."""
    from llama_ref.model import presets
    from llama_ref.model.llama4_config import param_counts

    scout, maverick = presets.get("llama-4-scout-17b-16e"), presets.get("llama-4-maverick-17b-128e")
    (scout_total, scout_active), (mav_total, mav_active) = param_counts(scout), param_counts(maverick)
    assert round(scout_active / 1e9) == round(mav_active / 1e9) == 17
    assert round((scout_total + presets.LLAMA4_VISION_PARAMS) / 1e9) == 109
    assert round((mav_total + presets.LLAMA4_VISION_PARAMS) / 1e10) * 10 == 400
    assert scout.param_count() == scout_total
    # The counts follow from the structure: 48 layers of 16 + 1 experts of 3 x 5120 x 8192 dominate Scout.
    expert = 3 * 5120 * 8192
    assert scout_total - scout_active == 48 * 15 * expert
    assert mav_total - mav_active == 24 * 127 * expert
    assert maverick.llama4.moe_layers == tuple(range(1, 48, 2)) and not maverick.llama4.use_qk_norm


def test_llama4_presets_run_at_a_reduced_size():
    """The presets' structure runs end to end: Scout's shape with 2 layers, narrow widths and few experts."""
    from llama_ref.model import presets
    from llama_ref.model.llama4_config import Llama4Args
    from llama_ref.weights.common import expected_shapes
    from llama_ref.model.transformer import Transformer

    base = presets.get("llama-4-scout-17b-16e")
    m = base.llama4
    small = base.replace(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=48,
                         max_seq_len=64, llama4=Llama4Args(**{**m.__dict__, "n_experts": 3, "expert_hidden_dim": 16,
                                                              "moe_layers": (0, 1, 2, 3), "nope_layers": (3,),
                                                              "attention_chunk_size": 4}))
    rng = np.random.default_rng(0)
    weights = {n: (1 + 0.1 * rng.standard_normal(s) if n.endswith("norm.weight") else
                   rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
               for n, s in expected_shapes(small).items()}
    model = Transformer(small, weights)
    full = model.forward(np.arange(10) % 50, 0)
    stepped = np.concatenate([model.forward(np.arange(10)[t:t + 1] % 50, t) for t in range(10)])
    assert np.isfinite(full).all() and np.abs(full - stepped).max() < TOL


def test_dense_writers_refuse_llama4_instead_of_writing_a_dense_model():
    """(Llama 4 is written by weights.writers_llama4: tests/test_llama4_convert.py.)"""
    from llama_ref.model import presets
    from llama_ref.weights.writers import canonical_items, hf_config

    with pytest.raises(WeightsError, match="writing a Llama 4 model as a config.json is not implemented"):
        hf_config(presets.get("llama-4-scout-17b-16e"), "bf16")
    model = llama_ref.load(HF)
    with pytest.raises(WeightsError, match="writing a Llama 4 model as a checkpoint is not implemented"):
        canonical_items(model.args, model.weights)


def test_params_json_written_by_llama_ref_round_trips_llama4():
    from llama_ref.model import presets
    for name in ("llama-4-scout-17b-16e", "llama-4-maverick-17b-128e"):
        args = presets.get(name)
        assert from_params_json(json.loads(json.dumps(args.to_params_json()))) == args.replace(
            n_kv_heads=args.kv_heads)
    with pytest.raises(ConfigError, match="llama4.experts is not implemented"):
        from_params_json(dict(presets.get("llama-4-scout-17b-16e").to_params_json(), llama4={"experts": 3}))


# ---- capture, verify, batches --------------------------------------------------------------------------

def test_capture_names_of_a_llama4_model_follow_activation_names():
    from llama_ref.tools.capture import activation_names
    model = llama_ref.load(HF)
    acts = run_and_capture(model, TOKENS[:6])
    assert list(acts) == activation_names(4, moe_layers=model.args.llama4.moe_layers)
    assert acts["layers.1.feed_forward.experts"].dtype.kind == "i"


def test_verify_localises_a_routing_difference():
    """A router that sends some tokens elsewhere: verify's first divergence is that layer's router logits."""
    from llama_ref.tools.verify import compare

    model = llama_ref.load(HF, weights="float32")
    reference = {"tokens": TOKENS, **run_and_capture(model, TOKENS)}
    router = model.weights["layers.3.feed_forward.router.weight"]
    model.weights["layers.3.feed_forward.router.weight"] = router[::-1].copy()  # experts renumbered
    report = compare(run_and_capture(model, TOKENS), reference)
    assert report.first_divergence.name == "layers.3.feed_forward.router_logits"
    experts = next(t for t in report.tensors if t.name == "layers.3.feed_forward.experts")
    assert experts.max_abs > 0


def test_batches_of_equal_length_match_single_rows():
    model = llama_ref.load(HF)
    rows = np.stack([TOKENS[:12], TOKENS[4:16]])
    batch = model.forward(rows, 0)
    for b in range(2):
        assert np.abs(batch[b] - model.forward(rows[b], 0)).max() < TOL


def test_left_padded_batches_match_single_rows_across_chunk_boundaries():
    """Prompts of 13 and 20 tokens in one batch (the first padded by 7), then 8 decode steps: each row's chunks
    (of 8) and NoPE temperatures count from its own first token, as in a batch of one (measured 2.5e-6)."""
    from llama_ref.model.cache import KVCache

    model = llama_ref.load(HF)
    a, b = TOKENS[:13], TOKENS[3:23]
    rows = np.stack([np.concatenate([np.zeros(7, np.int64), a]), b])
    mask = np.stack([np.arange(20) >= 7, np.ones(20, bool)])
    cache, alone = KVCache(model.args, 2, np.float32), [KVCache(model.args, 1, np.float32) for _ in range(2)]
    batch = model.forward(rows, 0, cache=cache, key_mask=mask)
    assert np.abs(batch[0, 7:] - model.forward(a[None], 0, cache=alone[0])[0]).max() < 1e-5
    assert np.abs(batch[1] - model.forward(b[None], 0, cache=alone[1])[0]).max() < 1e-5
    for step, token in enumerate(TOKENS[:8]):  # row 0 crosses position 16, row 1 position 24
        mask = np.concatenate([mask, np.ones((2, 1), bool)], axis=1)
        both = model.forward(np.full((2, 1), token), 20 + step, cache=cache, key_mask=mask)
        for r, start in ((0, 13), (1, 20)):
            single = model.forward(np.full((1, 1), token), start + step, cache=alone[r])
            assert np.abs(both[r] - single[0]).max() < 1e-5, (step, r)
    # generate pads on the left and gives each prompt its own greedy continuation.
    together = model.generate([list(a), list(b)], max_new_tokens=6, temperature=0)
    assert [g.ids for g in together] == [model.generate(list(p), max_new_tokens=6, temperature=0).ids for p in (a, b)]


def test_padding_other_than_on_the_left_is_refused():
    from llama_ref.errors import InputError
    model = llama_ref.load(HF)
    with pytest.raises(InputError, match="padded on the left only"):
        model.forward(np.stack([TOKENS[:6], TOKENS[:6]]), 0, key_mask=np.array([[True] * 5 + [False], [True] * 6]))


def test_a_multimodal_hf_checkpoint_loads_its_language_model(tmp_path):
    """Llama4ForConditionalGeneration files: text_config, language_model.* tensors; vision tensors skipped."""
    from llama_ref.weights.safetensors_file import read_safetensors_header
    from llama_ref.weights.writers import write_safetensors

    tensors = [("language_model." + n, np.ascontiguousarray(t.read()), "bf16")
               for n, t in read_safetensors_header(HF / "model.safetensors")[0].items()]
    tensors.append(("vision_model.patch_embedding.linear.weight", np.zeros((8, 4), np.uint16), "bf16"))
    out = tmp_path / "multimodal"
    out.mkdir()
    text = json.loads((HF / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text,
                                                 "vision_config": {"hidden_size": 8}}))
    write_safetensors(out / "model.safetensors", tensors)
    np.testing.assert_array_equal(llama_ref.load(out).forward(TOKENS, 0), llama_ref.load(HF).forward(TOKENS, 0))


class _Spy:
    """A weight that records whether anything read it (ops.linear asks it for its floats)."""

    def __init__(self, name, w, log):
        self.name, self.w, self.log, self.shape, self.ndim = name, w, log, w.shape, 2

    def to_float(self, dtype):
        self.log.add(self.name)
        return self.w.astype(dtype)


def test_a_decode_step_reads_only_the_chosen_experts():
    """Decode cost follows the active parameters: an expert no token chose is never read."""
    model = llama_ref.load(HF, weights="float32")
    read = set()
    for name in [n for n in model.weights if ".experts." in n]:
        model.weights[name] = _Spy(name, model.weights[name], read)
    model.forward(TOKENS[:PROMPT], 0)
    read.clear()
    from llama_ref.tools.capture import capture
    with capture(model, ["layers.*.feed_forward.experts"]) as acts:
        model.forward(TOKENS[PROMPT:PROMPT + 1], PROMPT)
    chosen = {f"layers.{i}.feed_forward.experts.{int(e)}.{w}.weight"
              for i in model.args.llama4.moe_layers for e in acts[f"layers.{i}.feed_forward.experts"].ravel()
              for w in ("w1", "w2", "w3")}
    assert read == chosen and len(read) == 3 * len(model.args.llama4.moe_layers)  # top-1: one expert a layer


def test_info_describes_the_experts():
    from llama_ref.tools.info import describe
    text = describe(META)
    assert "4 experts of width 32 (top-1, plus a shared one) in 2 of 4 layers; NoPE layers [2]" in text
    assert "active parameters 51,744" in text  # 70,176 less the 3 experts a token skips in 2 layers: 6 x 3072
    assert 70176 - 51744 == 2 * 3 * 3 * 32 * 32


def _cut_meta_shards(out: Path, n: int) -> None:
    """llama4_meta cut into n consolidated.NN.pth as Meta's model-parallel code cuts it: each tensor along the
    axis its modules split at that world size (llama4_mp2_layout.json, read from Meta's model at world size 2
    and checked there to reproduce the 1-rank logits), rank r holding the r-th contiguous block."""
    from llama_ref.weights.torch_zip import read_torch_file
    from llama_ref.weights.writers import write_torch_file

    layout = json.loads((DATA / "llama4_mp2_layout.json").read_text())
    src = read_torch_file(META / "consolidated.00.pth")
    out.mkdir()
    (out / "params.json").write_text((META / "params.json").read_text())
    for r in range(n):
        tensors = []
        for name, t in src.items():
            raw, axis = t.read(), layout[name]
            if axis is not None:
                size = raw.shape[axis] // n
                raw = np.take(raw, np.arange(r * size, (r + 1) * size), axis=axis)
            tensors.append((name, np.ascontiguousarray(raw), "bf16"))
        write_torch_file(out / f"consolidated.{r:02d}.pth", tensors)


def test_model_parallel_meta_shards_join_to_the_same_model(tmp_path):
    _cut_meta_shards(tmp_path / "mp2", 2)
    model = llama_ref.load(tmp_path / "mp2")
    np.testing.assert_array_equal(model.forward(TOKENS, 0), llama_ref.load(META).forward(TOKENS, 0))
    assert np.abs(model.forward(TOKENS, 0) - REF["meta_full"]).max() < TOL


def test_shards_that_cannot_divide_the_heads_are_refused(tmp_path):
    out = tmp_path / "mp3"
    out.mkdir()
    (out / "params.json").write_text((META / "params.json").read_text())
    for r in range(3):
        (out / f"consolidated.{r:02d}.pth").write_bytes((META / "consolidated.00.pth").read_bytes())
    with pytest.raises(WeightsError, match="3 model-parallel shards do not divide n_heads"):
        llama_ref.load(out)


def test_llama4_gguf_metadata_is_read_as_llama4():
    """(tests/test_llama4_gguf.py reads whole files.) A key llama.cpp requires is required here too."""
    from llama_ref.model.config import from_gguf_metadata
    with pytest.raises(ConfigError, match="metadata key llama4.embedding_length is missing"):
        from_gguf_metadata({"general.architecture": "llama4", "llama4.block_count": 48})


# The text_config of Llama-4-Scout-17B-16E's config.json as published copies quote it (presets.py sources).
SCOUT_TEXT_CONFIG = {
    "attention_bias": False, "attention_chunk_size": 8192, "attention_dropout": 0.0, "attn_scale": 0.1,
    "attn_temperature_tuning": 4, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
    "floor_scale": 8192, "for_llm_compressor": False, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
    "initializer_range": 0.02, "interleave_moe_layer_step": 1, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "max_position_embeddings": 262144, "model_type": "llama4_text",
    "moe_layers": list(range(48)), "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(48)],
    "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
    "num_local_experts": 16, "output_router_logits": False, "pad_token_id": 200018, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "torch_dtype": "bfloat16",
    "use_cache": True, "use_qk_norm": True, "vocab_size": 202048,
}


def test_scouts_config_json_reads_as_the_preset_but_for_its_rope_scaling():
    """The HF file says llama3 scaling factor 8 / high_freq_factor 4 where Meta's code uses 16 / 1 for Scout
    (presets.py follows Meta); everything else agrees."""
    from llama_ref.model import presets
    wrapped = {"model_type": "llama4", "text_config": SCOUT_TEXT_CONFIG, "vision_config": {}}
    args = from_hf_config(wrapped)
    preset = presets.get("llama-4-scout-17b-16e")
    assert args.replace(rope_scaling=preset.rope_scaling) == preset.replace(n_kv_heads=8)
    assert (args.rope_scaling.factor, args.rope_scaling.high_freq_factor) == (8.0, 4.0)


def test_config_json_null_chunk_size_means_no_chunking():
    config = json.loads((HF / "config.json").read_text())
    config.update(attention_chunk_size=None, layer_types=None, moe_layers=None)
    m = from_hf_config(config).llama4
    assert m.attention_chunk_size is None and m.moe_layers == (1, 3)


@pytest.mark.parametrize("quantize", ["int8", "q4_0"])
def test_quantized_experts_run_the_same_on_both_backends(quantize):
    """Experts are matrices like any other: quantized, the Numba kernels read their blocks as NumPy does."""
    from llama_ref.weights.packed import PackedWeight
    numpy_model = llama_ref.load(HF, quantize=quantize)
    numba_model = llama_ref.load(HF, quantize=quantize, backend="numba")
    assert isinstance(numpy_model.weights["layers.1.feed_forward.experts.0.w1.weight"], PackedWeight)
    a, b = numpy_model.forward(TOKENS, 0), numba_model.forward(TOKENS, 0)
    assert np.abs(a - b).max() < TOL


def test_model_args_check_the_llama4_layers_against_n_layers():
    args = from_hf_config(HF / "config.json")
    with pytest.raises(ConfigError, match="moe_layers names layer 3, the model has 2"):
        args.replace(n_layers=2)
    with pytest.raises(ConfigError, match="llama4 must be a Llama4Args"):
        args.replace(llama4={"n_experts": 4})
