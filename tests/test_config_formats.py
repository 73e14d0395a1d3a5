"""Configs as today's tools write them and as earlier ones did: every preset round-trips through
transformers 4.x and 5.x config.json, Meta's params.json and GGUF metadata; a checkpoint saved by
transformers 5 gives transformers' logits; keys that would change the mathematics are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from llama_ref.model import presets
from llama_ref.model.config import ConfigError, ModelArgs, from_gguf_metadata, from_hf_config, from_params_json
from llama_ref.model.ops import rope_frequencies
from llama_ref.weights.writers import add_hyperparameters, hf_config, llama3_rope_divisors

DATA = Path(__file__).parent / "data" / "tiny_ckpt"
PRESETS = list(presets.PRESETS)
DENSE_PRESETS = [n for n in PRESETS if presets.get(n).llama4 is None]  # writers of HF / GGUF refuse Llama 4


def _architecture(args: ModelArgs, divisors=None) -> dict:
    """What decides the computation, whichever way a format spells it (hidden_dim or multiple_of, ...)."""
    return {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "vocab_size": args.vocab_size, "ffn": args.ffn_hidden_dim,
            "norm_eps": args.norm_eps, "max_seq_len": args.max_seq_len, "tied": args.tie_word_embeddings,
            "freqs": rope_frequencies(args, divisors).tolist()}


@pytest.mark.parametrize("name", DENSE_PRESETS)
@pytest.mark.parametrize("transformers", ["4", "5", "4+5"])
def test_preset_round_trips_through_hf_config(tmp_path, name, transformers):
    args = presets.get(name)
    config = hf_config(args, "bf16", transformers=transformers)
    assert ("rope_parameters" in config) == ("5" in transformers)
    assert ("rope_theta" in config) == ("4" in transformers)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    back = from_hf_config(path)
    assert back.rope_theta == args.rope_theta and back.rope_scaling == args.rope_scaling
    assert _architecture(back) == _architecture(args)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_params_json(tmp_path, name):
    args = presets.get(name)
    path = tmp_path / "params.json"
    path.write_text(json.dumps(args.to_params_json()))
    back = from_params_json(path)
    # params.json written by llama_ref names n_kv_heads even where Llama 1/2's own files left it out.
    assert back == args.replace(n_kv_heads=args.kv_heads)


@pytest.mark.parametrize("name", DENSE_PRESETS)
def test_preset_round_trips_through_gguf_metadata(tmp_path, name):
    import gguf

    from llama_ref.weights.gguf import gguf_metadata, open_gguf

    args = presets.get(name)
    path = tmp_path / "model.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    add_hyperparameters(w, args)
    w.add_vocab_size(args.vocab_size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = from_gguf_metadata(gguf_metadata(open_gguf(path)), has_output_tensor=not args.tie_word_embeddings)
    # Llama 3.1's scaling travels as the rope_freqs tensor (as llama.cpp writes it), not as metadata.
    divisors = llama3_rope_divisors(args)
    assert back.rope_scaling == (args.rope_scaling if divisors is None else None)
    got, want = _architecture(back, divisors), _architecture(args)
    np.testing.assert_allclose(got.pop("freqs"), want.pop("freqs"), rtol=1e-6)  # divisors are float32
    # GGUF stores eps as a float32, so 1e-6 comes back as the float32 nearest to it.
    assert np.float32(got.pop("norm_eps")) == np.float32(want.pop("norm_eps"))
    assert got == want


# ---- transformers 5 ---------------------------------------------------------------------------------------

def test_rope_parameters_of_transformers_5_are_read():
    v4 = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
          "num_hidden_layers": 2, "vocab_size": 96, "rope_theta": 500000.0, "max_position_embeddings": 131072,
          "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = dict(v4["rope_scaling"], rope_theta=500000.0)
    assert from_hf_config(v5) == from_hf_config(v4)
    assert from_hf_config(v5).rope_theta == 500000.0 and from_hf_config(v5).rope_scaling.factor == 32.0
    # transformers 5 fills a missing pre-training length with max_position_embeddings.
    no_original = dict(v5, rope_parameters={k: v for k, v in v5["rope_parameters"].items()
                                            if k != "original_max_position_embeddings"})
    assert from_hf_config(no_original).rope_scaling.original_max_position_embeddings == 131072
    # No scaling: rope_type default.
    plain = dict(v5, rope_parameters={"rope_type": "default", "rope_theta": 123456.0})
    assert from_hf_config(plain).rope_theta == 123456.0 and from_hf_config(plain).rope_scaling is None


@pytest.mark.parametrize("change, message", [
    ({"rope_theta": 10000.0}, "rope_theta is given twice with different values"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}},
     "rope_scaling and rope_parameters disagree on factor"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                          "original_max_position_embeddings": 8}},
     "rope scaling type 'yarn' is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 2.0}}, "'longrope' is not supported"),
    ({"rope_parameters": {"factor": 8.0, "rope_theta": 1e4}}, "gives a factor but no rope_type"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "differs per layer type"),
    ({"rope_parameters": "llama3"}, "rope_parameters must be a JSON object"),
    ({"rope_scaling": [8.0]}, "rope_scaling must be a JSON object"),
])
def test_contradictory_or_unimplemented_rope_is_refused(tmp_path, change, message):
    base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
            "num_hidden_layers": 2, "vocab_size": 96, "max_position_embeddings": 131072,
            "rope_parameters": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                "rope_theta": 500000.0}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(base, **change)))
    with pytest.raises(ConfigError, match=message) as e:
        from_hf_config(path)
    assert str(path) in str(e.value)


def _hf5_logits():
    ref = np.load(DATA / "hf5_llama3_logits.npz")
    return ref["tokens"], ref["logits"]


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_checkpoint_saved_by_transformers_5_gives_its_logits(backend):
    # The checkpoint and logits come from transformers 5.24 (tests/fixtures/make_hf5_checkpoint.py).
    tokens, want = _hf5_logits()
    model = llama_ref.load(DATA / "hf5_llama3", backend=backend)
    assert model.args.rope_theta == 50000.0 and model.args.rope_scaling.kind == "llama3"
    got = model.forward(tokens, 0)
    assert np.abs(got - want).max() < 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_ignoring_rope_parameters_would_be_far_off(tmp_path):
    # What llama_ref computed before it read rope_parameters (theta 10000, no scaling): the fixture is
    # sensitive to the RoPE configuration, so the test above can fail.
    tokens, want = _hf5_logits()
    d = shutil.copytree(DATA / "hf5_llama3", tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    del config["rope_parameters"]
    (d / "config.json").write_text(json.dumps(config))
    got = llama_ref.load(d).forward(tokens, 0)
    assert np.abs(got - want).max() > 1e-2


# ---- keys that change the mathematics --------------------------------------------------------------------

HF_BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_attention_heads": 4,
           "num_hidden_layers": 2, "vocab_size": 96}


@pytest.mark.parametrize("change", [
    {"attention_bias": True}, {"mlp_bias": True}, {"hidden_act": "gelu"}, {"sliding_window": 4096},
    {"use_sliding_window": True}, {"partial_rotary_factor": 0.5}, {"final_logit_softcapping": 30.0},
    {"attn_logit_softcapping": 50.0}, {"quantization_config": {"quant_method": "gptq"}},
    {"layer_types": ["full_attention", "sliding_attention"]}, {"no_rope_layers": [1, 0]},
    {"attention_chunk_size": 8192}, {"use_qk_norm": True},
])
def test_hf_keys_that_change_the_mathematics_are_refused(change):
    key = next(iter(change))
    with pytest.raises(ConfigError, match=f"config.json: {key} = .* is not implemented by llama_ref"):
        from_hf_config(dict(HF_BASE, **change))


@pytest.mark.parametrize("change", [
    {"attention_bias": False}, {"mlp_bias": False}, {"hidden_act": "silu"}, {"sliding_window": None},
    {"pretraining_tp": 4}, {"partial_rotary_factor": 1.0}, {"attention_dropout": 0.1},
])
def test_hf_keys_with_llama_values_are_accepted(change):
    assert from_hf_config(dict(HF_BASE, **change)).dim == 64


PARAMS_BASE = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 100}


@pytest.mark.parametrize("change", [
    {"vision_chunk_size": 560}, {"vision_num_cross_attention_layers": 8},
    {"quantization_args": {"scheme": "int4_weight_int8_dynamic_activation"}}, {"lora_args": {"rank": 8}},
])
def test_params_json_keys_of_other_architectures_are_refused(change):
    key = next(iter(change))
    with pytest.raises(ConfigError, match=f"{key} = .* is not implemented"):
        from_params_json(dict(PARAMS_BASE, **change))


@pytest.mark.parametrize("change, message", [
    ({"moe_args": {"num_experts": 16}}, "moe_args needs ffn_exp"), ({"nope_layer_interval": 4}, "without moe_args"),
    ({"attention_chunk_size": 8192}, "without moe_args"), ({"use_qk_norm": True}, "without moe_args"),
])
def test_params_json_with_llama4_keys_is_read_as_llama4(change, message):
    """Llama 4's keys make a params.json a Llama 4 one (tests/test_llama4.py): incomplete ones are refused."""
    with pytest.raises(ConfigError, match=message):
        from_params_json(dict(PARAMS_BASE, **change))


GGUF_BASE = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.block_count": 2,
             "llama.attention.head_count": 4, "llama.feed_forward_length": 160,
             "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 96, "llama.context_length": 256}


@pytest.mark.parametrize("change, message", [
    ({"llama.expert_count": 8}, "llama.expert_count = 8 is not implemented"),
    ({"llama.attention.sliding_window": 4096}, "llama.attention.sliding_window"),
    ({"llama.rope.scaling.type": "yarn"}, "llama.rope.scaling.type 'yarn' is not supported"),
    ({"llama.rope.scaling.attn_factor": 0.5}, "attn_factor"),
    ({"llama.attention.value_length": 8, "llama.attention.key_length": 16}, "value_length 8 differs"),
    ({"llama.block_count": [2, 2]}, "llama.block_count must be an integer"),
    ({"llama.rope.freq_base": float("inf")}, "llama.rope.freq_base must be a finite number"),
    ({"llama.attention.layer_norm_rms_epsilon": float("nan")}, "layer_norm_rms_epsilon must be a finite"),
    ({"llama.embedding_length": 64.5}, "llama.embedding_length must be an integer"),
    ({"llama.attention.head_count": 0}, "n_heads must be a positive integer"),
    ({"llama.context_length": None}, "metadata key llama.context_length is missing"),
])
def test_gguf_metadata_that_is_not_llama_is_refused(change, message):
    meta = {k: v for k, v in dict(GGUF_BASE, **change).items() if v is not None}
    with pytest.raises(ConfigError, match=message) as e:
        from_gguf_metadata(meta, where="m.gguf")
    assert str(e.value).startswith("m.gguf: ")


def test_gguf_head_width_from_key_length():
    args = from_gguf_metadata(dict(GGUF_BASE, **{"llama.attention.key_length": 32,
                                                 "llama.attention.value_length": 32}))
    assert args.head_dim == 32 and args.head_dim_override == 32


# ---- values that would be silently wrong -----------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"norm_eps": float("inf")}, "norm_eps must be .*finite"),
    ({"norm_eps": float("nan")}, "norm_eps must be .*finite"),
    ({"rope_theta": float("inf")}, "rope_theta must be .*finite"),
    ({"dim": 64.5}, "dim must be an integer"),
    ({"n_heads": 4.2}, "n_heads must be an integer"),
    ({"n_layers": True}, "n_layers must be an integer"),
    ({"n_heads": 0}, "n_heads must be a positive integer"),
    ({"n_kv_heads": 0}, "n_kv_heads must be a positive integer"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be true or false"),
    ({"use_scaled_rope": "true"}, "use_scaled_rope must be true or false"),
    ({"rope_scaling": {"kind": "llama3", "factor": float("inf"), "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}, "factor must be a finite"),
    ({"rope_scaling": {"kind": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192.5}},
     "original_max_position_embeddings must be an integer"),
    ({"rope_scaling": "llama3"}, "rope scaling must be a JSON object"),
])
def test_values_that_would_compute_garbage_are_refused(change, message):
    with pytest.raises(ConfigError, match=message) as e:
        from_params_json(dict(PARAMS_BASE, **change))
    assert str(e.value).startswith("params.json: ")


def test_integral_floats_are_integers():
    # Some tools write 4096.0 for an integer field: the same number, accepted.
    assert from_params_json(dict(PARAMS_BASE, dim=64.0)).dim == 64


def test_duplicate_json_keys_are_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model_type": "llama", "hidden_size": 64, "hidden_size": 128, "intermediate_size": 160,'
                    ' "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 96}')
    with pytest.raises(ConfigError, match="'hidden_size' appears twice") as e:
        from_hf_config(path)
    assert str(path) in str(e.value)


def test_huge_layer_count_is_refused_before_looping(tmp_path):
    # 4e9 layers: naming every expected tensor would take hours; the count is checked against the file.
    d = shutil.copytree(DATA / "hf5_llama3", tmp_path / "m")
    config = json.loads((d / "config.json").read_text())
    config["num_hidden_layers"] = 4_000_000_000
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(llama_ref.WeightsError, match="the config says 4000000000 layers, the checkpoint holds "
                                                      "tensors of 2"):
        llama_ref.load(d)
    # `info` reads headers only, and says that they contradict the config.
    from llama_ref.tools.info import describe
    assert "warning:     the tensors hold 98,624 parameters" in describe(d)
    assert "warning" not in describe(DATA / "hf5_llama3")
