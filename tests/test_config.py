"""Config: the FFN formula, the presets against published parameter counts, the three readers, bad files,
and that the forward pass takes theta / eps / scaling from the config rather than from constants."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from llama_ref.model import presets
from llama_ref.model.config import (ConfigError, ModelArgs, RopeScaling, ffn_hidden_size, from_gguf_metadata,
                              from_hf_config, from_params_json, read_config)
from llama_ref.model.transformer import Transformer

from tiny import random_weights, tiny_args

# ---- the FFN width formula ---------------------------------------------------------------------------------

# (dim, ffn_dim_multiplier, multiple_of) -> the official HF intermediate_size (llama-configs.md section 1).
OFFICIAL_FFN = [
    (4096, None, 256, 11008),  # Llama 1/2 7B, Code Llama 7B, Llama Guard 7B
    (5120, None, 256, 13824),  # Llama 1/2 13B, Code Llama 13B
    (6656, None, 256, 17920),  # Llama 1 33B
    (8192, None, 256, 22016),  # Llama 1 65B, Code Llama 34B
    (8192, 1.3, 4096, 28672),  # Llama 2 70B, Code Llama 70B, Llama 3/3.1/3.3 70B
    (4096, 1.3, 1024, 14336),  # Llama 3/3.1 8B, Llama Guard 3 8B
    (4096, 1.3, 256, 14336),  # Llama Guard 2 8B (its SKU params say multiple_of 256)
    (16384, 1.2, 4096, 53248),  # Llama 3.1 405B
    (2048, 1.5, 256, 8192),  # Llama 3.2 1B, Llama Guard 3 1B
    (3072, 1.0, 256, 8192),  # Llama 3.2 3B
]


@pytest.mark.parametrize("dim, multiplier, multiple_of, expected", OFFICIAL_FFN)
def test_ffn_formula_reproduces_official_intermediate_sizes(dim, multiplier, multiple_of, expected):
    assert ffn_hidden_size(dim, multiple_of, multiplier) == expected


def test_ffn_formula_exposes_the_wrong_sku_rows():
    # The llama-models SKU list's Llama 2 7B row (multiplier 1.3, multiple_of 256) and 70B-chat row
    # (multiple_of 256) cannot be right: they give widths that the real checkpoints do not have.
    assert ffn_hidden_size(4096, 256, 1.3) == 14336 != 11008
    assert ffn_hidden_size(8192, 256, 1.3) == 28416 != 28672


# The HF intermediate_size of each preset (llama-configs.md section 1, "FFN" column).
PRESET_FFN = {
    "llama-1-7b": 11008, "llama-1-13b": 13824, "llama-1-33b": 17920, "llama-1-65b": 22016,
    "llama-2-7b": 11008, "llama-2-13b": 13824, "llama-2-70b": 28672,
    "code-llama-7b": 11008, "code-llama-7b-python": 11008, "code-llama-13b": 13824,
    "code-llama-13b-python": 13824, "code-llama-34b": 22016, "code-llama-70b": 28672,
    "llama-3-8b": 14336, "llama-3-70b": 28672, "llama-3.1-8b": 14336, "llama-3.1-70b": 28672,
    "llama-3.1-405b": 53248, "llama-3.2-1b": 8192, "llama-3.2-3b": 8192, "llama-3.3-70b": 28672,
    "llama-guard-7b": 11008, "llama-guard-2-8b": 14336, "llama-guard-3-8b": 14336, "llama-guard-3-1b": 8192,
    "llama-guard-3-1b-int4": 6400,
    "llama-4-scout-17b-16e": 16384, "llama-4-maverick-17b-128e": 16384,  # dense layers (intermediate_size_mlp)
}


def test_every_preset_has_its_official_ffn_width():
    assert set(PRESET_FFN) == set(presets.names())
    for name, width in PRESET_FFN.items():
        assert presets.get(name).ffn_hidden_dim == width, name


def test_presets_derive_ffn_from_params_json_fields():
    # Only a model that states hidden_dim outright carries one; the rest go through the formula.
    stated = [n for n in presets.names() if presets.get(n).hidden_dim is not None]
    assert stated == ["llama-4-maverick-17b-128e", "llama-4-scout-17b-16e", "llama-guard-3-1b-int4"]


# ---- presets against published parameter counts --------------------------------------------------------

# Exact counts. Sources:
#  [HF]  the Hugging Face model API, field safetensors.total, of the official meta-llama repos (the number the
#        model pages show rounded as "Model size"), as recorded with their revisions in a public dataset
#        script: Llama-2-7b-hf 6738417664, Llama-2-13b-hf 13015866880, Llama-2-70b-hf 68976653312,
#        Llama-3.1-8B 8030261248, Llama-3.1-70B 70553706496, Llama-3.1-405B 405853388800; and in another
#        public table: Llama-3.2-1B-Instruct 1235814400, Llama-3.2-3B-Instruct 3212749824,
#        Llama-3.3-70B-Instruct 70553706496.
#  [TOG] together-python SDK, finetune.py model_param_count(): llama-2-7b 6738415616, llama-2-13b
#        13015864320, llama-2-70b 68976648192, CodeLlama-7b 6738546688, CodeLlama-13b 13016028160.
#        (It also lists CodeLlama-7b-Python as 6738546688, which implies vocab 32016; litgpt and the HF
#        config say 32000 for the Python variants, so that row is not used.)
#  [TAPI] Together's model list, num_parameters of Phind's CodeLlama-34B fine-tune (a fine-tune keeps the
#        CodeLlama-34B architecture): 33743970304. No count of Meta's own 34B repo was found.
#  [G1B] a public model registry entry for meta-llama/Llama-Guard-3-1B, revision acf7aafa (the snapshot
#        llama-configs.md reads): params=1498482688.
PUBLISHED_EXACT = {
    "llama-2-7b": 6738415616,  # TOG
    "llama-2-13b": 13015864320,  # TOG
    "llama-2-70b": 68976648192,  # TOG
    "code-llama-7b": 6738546688,  # TOG
    "code-llama-13b": 13016028160,  # TOG
    "code-llama-34b": 33743970304,  # TAPI
    "llama-3.1-8b": 8030261248,  # HF
    "llama-3.1-70b": 70553706496,  # HF
    "llama-3.1-405b": 405853388800,  # HF
    "llama-3.2-1b": 1235814400,  # HF
    "llama-3.2-3b": 3212749824,  # HF
    "llama-3.3-70b": 70553706496,  # HF
    "llama-guard-3-1b": 1498482688,  # G1B
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_EXACT))
def test_param_count_matches_published_exact_count(name):
    assert presets.get(name).param_count() == PUBLISHED_EXACT[name]


def test_llama2_hf_safetensors_totals_differ_only_by_saved_inv_freq_buffers():
    # [HF] totals of the Llama 2 repos are larger than the model by exactly one rotary inv_freq buffer
    # (head_dim/2 floats) per layer, which the early HF converter saved into the checkpoint.
    hf = {"llama-2-7b": 6738417664, "llama-2-13b": 13015866880, "llama-2-70b": 68976653312}
    for name, total in hf.items():
        a = presets.get(name)
        assert a.param_count() + a.n_layers * a.head_dim // 2 == total, name


# Rounded counts, in billions, with the digits the source gives. Meta cuts its figures (65,285,660,672 is
# "65.2B", 1,235,814,400 is "1.23B"); Hugging Face pages round them.
#  [L1]  "LLaMA: Open and Efficient Foundation Language Models", arXiv:2302.13971, Table 2 (params column):
#        6.7B, 13.0B, 32.5B, 65.2B.
#  [MC32] llama-models models/llama3_2/MODEL_CARD.md L9-14: 1B = 1.23B, 3B = 3.21B.
#  [HFP] the [HF] totals above as the Hugging Face model pages display them ("Model size", three significant
#        figures): Llama 3.1 8B 8.03B, Llama 3.2 1B 1.24B, Llama 2 7B 6.74B, Llama 3.1 70B 70.6B.
PUBLISHED_ROUNDED = [
    ("llama-1-7b", 6.7, "L1", math.floor), ("llama-1-13b", 13.0, "L1", math.floor),
    ("llama-1-33b", 32.5, "L1", math.floor), ("llama-1-65b", 65.2, "L1", math.floor),
    ("llama-3.2-1b", 1.23, "MC32", math.floor), ("llama-3.2-3b", 3.21, "MC32", math.floor),
    ("llama-3.1-8b", 8.03, "HFP", round), ("llama-3.2-1b", 1.24, "HFP", round), ("llama-2-7b", 6.74, "HFP", round),
    ("llama-3.1-70b", 70.6, "HFP", round),
]


@pytest.mark.parametrize("name, billions, source, cut", PUBLISHED_ROUNDED)
def test_param_count_matches_published_rounded_count(name, billions, source, cut):
    scale = 10 ** len(str(billions).split(".")[1])
    assert cut(presets.get(name).param_count() / 1e9 * scale) == round(billions * scale)


def test_models_without_a_published_count_share_their_base_architecture():
    # No exact published count was found for Llama 3 8B/70B, Code Llama 70B and Python variants, Llama Guard
    # 7B / 2 8B / 3 8B or Guard 3 1B INT4 (Meta gives only nominal sizes). What can be checked: each has the
    # architecture of the model it was built from, whose count is published above.
    same = {"llama-3-8b": "llama-3.1-8b", "llama-3-70b": "llama-3.1-70b", "llama-guard-2-8b": "llama-3.1-8b",
            "llama-guard-3-8b": "llama-3.1-8b", "llama-guard-7b": "llama-2-7b", "llama-1-7b": "llama-2-7b",
            "llama-1-13b": "llama-2-13b", "code-llama-7b-python": "llama-2-7b",
            "code-llama-13b-python": "llama-2-13b"}
    for name, base in same.items():
        assert presets.get(name).param_count() == presets.get(base).param_count(), name
    # Code Llama 70B = Llama 2 70B plus 16 rows in each of the untied embedding and output matrices.
    assert presets.get("code-llama-70b").param_count() == PUBLISHED_EXACT["llama-2-70b"] + 2 * 16 * 8192


def test_presets_keep_the_known_discrepancies_straight():
    # llama-configs.md "Discrepancies": each trap has a specific right answer.
    assert presets.get("llama-2-7b").kv_heads == 32 and presets.get("llama-2-7b").rope_theta == 10000.0
    assert presets.get("llama-3.2-1b").rope_scaling.factor == 32.0  # HF config, not Meta code's 8
    assert presets.get("llama-3.2-3b").rope_scaling.factor == 32.0
    guard = presets.get("llama-guard-3-1b")
    assert guard.rope_scaling.factor == 8.0 and not guard.tie_word_embeddings
    assert presets.get("llama-3.2-1b").tie_word_embeddings
    assert presets.get("llama-guard-2-8b").vocab_size == 128256  # not the SKU's 32000
    assert presets.get("code-llama-7b").rope_theta == 1e6 and presets.get("code-llama-7b").vocab_size == 32016
    assert presets.get("llama-1-7b").norm_eps == 1e-6 and presets.get("llama-1-65b").norm_eps == 1e-5
    assert presets.get("llama-3.2-1b").head_dim == 64 and presets.get("llama-3.2-3b").head_dim == 128


def test_presets_get_is_case_insensitive_and_unknown_names_are_clear():
    assert presets.get("Llama-3.1-8B") is presets.get("llama-3.1-8b")
    assert llama_ref.model.presets.get("llama-3.2-1b") is presets.PRESETS["llama-3.2-1b"]  # reachable from the package
    with pytest.raises(ConfigError, match=r"unknown preset 'llama-9-7b'.*llama-3\.1-8b"):
        presets.get("llama-9-7b")


# ---- readers ------------------------------------------------------------------------------------------

def _write(tmp_path: Path, name: str, content) -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def _same_architecture(a: ModelArgs, b: ModelArgs) -> None:
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "vocab_size", "head_dim", "ffn_hidden_dim",
                  "norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.param_count() == b.param_count()


def test_params_json_llama2_defaults(tmp_path):
    # A Llama 2 7B params.json names neither n_kv_heads nor rope_theta (vocab_size filled in: the released
    # file says -1, tested below).
    path = _write(tmp_path, "params.json", {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                                            "norm_eps": 1e-05, "vocab_size": 32000})
    args = from_params_json(path)
    assert args.n_kv_heads is None and args.kv_heads == 32
    assert args.rope_theta == 10000.0 and args.rope_scaling is None
    _same_architecture(args, presets.get("llama-2-7b"))
    assert read_config(tmp_path) == args


def test_params_json_vocab_minus_one_is_a_clear_error(tmp_path):
    path = _write(tmp_path, "params.json", {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32,
                                            "norm_eps": 1e-05, "vocab_size": -1})
    with pytest.raises(ConfigError, match="vocab_size is -1") as e:
        from_params_json(path)
    assert str(path) in str(e.value)


def test_params_json_llama3_verbatim():
    # Meta-Llama-3-8B/params.json as printed by naklecha/llama3-from-scratch (NAK).
    args = from_params_json({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                             "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05,
                             "rope_theta": 500000.0})
    _same_architecture(args, presets.get("llama-3-8b"))


def test_params_json_llama31_use_scaled_rope():
    # Llama 3.1 params.json say only use_scaled_rope: the numbers are those of Meta's apply_scaling.
    args = from_params_json({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                             "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05,
                             "rope_theta": 500000.0, "use_scaled_rope": True})
    assert args.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    _same_architecture(args, presets.get("llama-3.1-8b"))
    # Llama 3.2's llama-models args carry the factor explicitly.
    args = from_params_json({"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                             "multiple_of": 256, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-05,
                             "rope_theta": 500000.0, "use_scaled_rope": True, "rope_scaling_factor": 32,
                             "tie_word_embeddings": True})
    _same_architecture(args, presets.get("llama-3.2-1b"))


def test_params_json_hidden_dim_stated_directly():
    # The pruned Llama Guard 3 1B INT4 (SKU L801-818): hidden_dim given, theta spelled rope_freq_base.
    args = from_params_json({"dim": 2048, "n_layers": 12, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                             "hidden_dim": 6400, "norm_eps": 1e-05, "rope_freq_base": 500000.0,
                             "use_scaled_rope": True})
    assert args.ffn_hidden_dim == 6400 and args.rope_theta == 500000.0
    _same_architecture(args, presets.get("llama-guard-3-1b-int4"))


# Meta-Llama-3.1-8B config.json (HFCFG), the fields a Llama reader uses.
HF_LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "vocab_size": 128256,
    "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}


def test_hf_config_llama31(tmp_path):
    path = _write(tmp_path, "config.json", HF_LLAMA31_8B)
    args = from_hf_config(path)
    _same_architecture(args, presets.get("llama-3.1-8b"))
    assert args.max_seq_len == 131072
    assert read_config(tmp_path) == args


def test_hf_config_llama32_tied_with_head_dim():
    # Llama-3.2-1B config.json: head_dim stated (64 = 2048/32), factor 32, tied embeddings.
    cfg = dict(HF_LLAMA31_8B, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, head_dim=64,
               tie_word_embeddings=True, rope_scaling=dict(HF_LLAMA31_8B["rope_scaling"], factor=32.0))
    args = from_hf_config(cfg)
    _same_architecture(args, presets.get("llama-3.2-1b"))
    assert args.param_count() == PUBLISHED_EXACT["llama-3.2-1b"]


def test_hf_config_head_dim_other_than_dim_over_heads():
    # A stated head_dim that is not dim/n_heads decides the q/k/v widths.
    args = from_hf_config(dict(HF_LLAMA31_8B, hidden_size=2048, num_attention_heads=16, head_dim=256,
                               num_key_value_heads=4))
    assert args.head_dim == 256
    from llama_ref.weights.common import expected_shapes
    shapes = expected_shapes(args)
    assert shapes["layers.0.attention.wq.weight"] == (16 * 256, 2048)
    assert shapes["layers.0.attention.wk.weight"] == (4 * 256, 2048)
    assert shapes["layers.0.attention.wo.weight"] == (2048, 16 * 256)


def test_hf_config_linear_scaling_and_defaults():
    # Older configs spell the kind "type"; linear (position interpolation) divides every frequency.
    cfg = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
           "num_hidden_layers": 32, "vocab_size": 32000, "rms_norm_eps": 1e-05,
           "rope_scaling": {"type": "linear", "factor": 4.0}}
    args = from_hf_config(cfg)
    assert args.rope_scaling.kind == "linear" and args.rope_scaling.factor == 4.0
    assert args.kv_heads == 32 and args.rope_theta == 10000.0 and not args.tie_word_embeddings
    assert from_hf_config(dict(cfg, rope_scaling=None)).rope_scaling is None


def _smollm_like_metadata(**overrides) -> dict:
    meta = {
        "general.architecture": "llama", "llama.embedding_length": 576, "llama.block_count": 30,
        "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3, "llama.feed_forward_length": 1536,
        "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.freq_base": 100000.0,
        "llama.context_length": 8192, "llama.vocab_size": 49152,
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def test_gguf_metadata_reader():
    args = from_gguf_metadata(_smollm_like_metadata(), has_output_tensor=False)
    assert (args.dim, args.n_layers, args.n_heads, args.kv_heads, args.vocab_size) == (576, 30, 9, 3, 49152)
    assert args.ffn_hidden_dim == 1536 and args.head_dim == 64 and args.tie_word_embeddings
    assert args.rope_theta == 100000.0 and args.norm_eps == 1e-5 and args.max_seq_len == 8192
    # vocab from the token list when llama.vocab_size is absent; linear scaling from its two keys.
    args = from_gguf_metadata(_smollm_like_metadata(**{
        "llama.vocab_size": None, "tokenizer.ggml.tokens": ["a"] * 100, "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": 2.0}))
    assert args.vocab_size == 100 and args.rope_scaling == RopeScaling("linear", 2.0)
    assert not args.tie_word_embeddings
    # Llama 1/2 GGUFs may omit head_count_kv and freq_base: MHA and 10000.
    args = from_gguf_metadata(_smollm_like_metadata(**{"llama.attention.head_count_kv": None,
                                                       "llama.rope.freq_base": None}))
    assert args.kv_heads == 9 and args.rope_theta == 10000.0


def test_gguf_metadata_of_the_default_model(default_model_path):
    from llama_ref.weights.gguf import gguf_metadata, open_gguf

    args = from_gguf_metadata(gguf_metadata(open_gguf(default_model_path)), has_output_tensor=False)
    # SmolLM2-135M: 30 layers, dim 576, 9 heads, 3 KV heads, tied embeddings, vocab 49152.
    assert (args.n_layers, args.dim, args.n_heads, args.kv_heads, args.vocab_size) == (30, 576, 9, 3, 49152)
    assert args.tie_word_embeddings and args.ffn_hidden_dim == 1536


@pytest.mark.parametrize("change, message", [
    ({"general.architecture": "gpt2"}, "general.architecture is 'gpt2'"),
    ({"llama.block_count": None}, "llama.block_count is missing"),
    ({"llama.vocab_size": None}, "neither llama.vocab_size nor tokenizer.ggml.tokens"),
    ({"llama.rope.dimension_count": 32}, "partial rotary dimension 32"),
])
def test_gguf_metadata_errors_name_the_file(change, message):
    with pytest.raises(ConfigError, match=message) as e:
        from_gguf_metadata(_smollm_like_metadata(**change), where="model-x.gguf")
    assert "model-x.gguf" in str(e.value)


# ---- bad config files ---------------------------------------------------------------------------------

GOOD_PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 100}


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    (b"\xff\xfe\x00garbage", "not valid JSON"),
    (dict(GOOD_PARAMS, dim=None), "dim must be an integer"),
    ({k: v for k, v in GOOD_PARAMS.items() if k != "n_layers"}, "missing required key 'n_layers'"),
    (dict(GOOD_PARAMS, dim="wide"), "dim must be an integer"),
    (dict(GOOD_PARAMS, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(GOOD_PARAMS, dim=66), "not divisible by n_heads"),
    (dict(GOOD_PARAMS, n_layers=0), "n_layers must be a positive integer"),
    (dict(GOOD_PARAMS, norm_eps=-1), "norm_eps must be > 0"),
    (dict(GOOD_PARAMS, rope_theta=0), "rope_theta must be > 0"),
    (dict(GOOD_PARAMS, ffn_dim_multiplier="big"), "ffn_dim_multiplier"),
    (dict(GOOD_PARAMS, rope_scaling={"rope_type": "llama3"}), "missing 'factor'"),
    (dict(GOOD_PARAMS, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn' is not supported"),
])
def test_bad_params_json_names_the_file(tmp_path, content, message):
    path = tmp_path / "params.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _write(tmp_path, "params.json", content)
    with pytest.raises(ConfigError, match=message) as e:
        from_params_json(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "model_type 'mistral' is not a Llama model"),
    ({"hidden_size": None}, "hidden_size must be an integer"),
    ({"num_attention_heads": 0}, "n_heads must be a positive integer"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
     "high_freq_factor > low_freq_factor"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
])
def test_bad_hf_config_names_the_file(tmp_path, change, message):
    cfg = dict(HF_LLAMA31_8B, **change)
    path = _write(tmp_path, "config.json", cfg)
    with pytest.raises(ConfigError, match=message) as e:
        from_hf_config(path)
    assert str(path) in str(e.value)


def test_missing_config_files_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match="file not found") as e:
        from_params_json(tmp_path / "params.json")
    assert str(tmp_path / "params.json") in str(e.value)
    with pytest.raises(ConfigError, match="no params.json or config.json") as e:
        read_config(tmp_path)
    assert str(tmp_path) in str(e.value)


# ---- nothing downstream hard-codes a theta, an eps or a scaling ---------------------------------------------

@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("change", [
    {"rope_theta": 500000.0},
    {"norm_eps": 1e-2},
    {"rope_scaling": RopeScaling("linear", 4.0)},
    {"rope_scaling": RopeScaling("llama3", 8.0, 1.0, 4.0, original_max_position_embeddings=32)},
])
def test_forward_reads_theta_eps_and_scaling_from_the_config(change, backend):
    base = tiny_args(max_seq_len=128)
    weights = random_weights(base, seed=3, scale=1.0)
    tokens = np.arange(40) % base.vocab_size
    reference = Transformer(base, weights, backend=backend).forward(tokens, 0)
    changed = Transformer(base.replace(**change), weights, backend=backend).forward(tokens, 0)
    # Position 0 has no rotation at all: only eps may change it there; later positions must move.
    assert np.abs(changed[1:] - reference[1:]).max() > 1e-6


def test_llama3_scaling_parameters_each_matter():
    # Every number of the llama3 scaling reaches the frequencies: change any one and some frequency moves.
    from llama_ref.model.ops import rope_frequencies

    base = tiny_args(dim=256, n_heads=2, rope_theta=500000.0,
                     rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    freqs = rope_frequencies(base)
    for change in ({"factor": 32.0}, {"low_freq_factor": 2.0}, {"high_freq_factor": 8.0},
                   {"original_max_position_embeddings": 4096}):
        scaled = rope_frequencies(base.replace(rope_scaling=RopeScaling(**{
            **base.rope_scaling.__dict__, **change})))
        assert not np.allclose(scaled, freqs), change


MODEL_CONSTANTS = {10000, 500000, 1000000, 1e-5, 1e-6, 8192, 131072}


def test_model_code_has_no_model_constants():
    # The forward pass and its kernels take theta, eps, scaling and context sizes from the config only:
    # none of the official values appears as a literal number in their code (docstrings aside).
    root = Path(llama_ref.__file__).parent
    files = [root / "model" / f for f in ("transformer.py", "ops.py", "llama4.py")]
    files += sorted((root.parent / "kernels").glob("*.py"))
    try:
        import llama_ref.kernels as kernels
        files += sorted(Path(kernels.__file__).parent.glob("*.py"))
    except ImportError:
        pass
    found = []
    for path in dict.fromkeys(files):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
                    and not isinstance(node.value, bool) and node.value in MODEL_CONSTANTS:
                found.append(f"{path.name}:{node.lineno}: {node.value}")
    assert not found, found
