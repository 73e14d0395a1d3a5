"""Architectures of every official Meta Llama text model, as ModelArgs keyed by a short name.

Values are those of the models' own params.json / config.json, as collected with their sources in
shared/reference/llama-configs.md (source keys in the comments below are that file's: SKU = llama-models
sku_list.py arch_args, i.e. params.json; HFCFG = Hugging Face config.json; L1MC / L2REF / CLREF / L3REF =
Meta's model cards and reference code; HFCONV = transformers' convert_llama_weights_to_hf.py; LIT = litgpt).

The FFN width is never written here: it follows from multiple_of and ffn_dim_multiplier through Meta's
formula (config.ffn_hidden_size), exactly as Meta's FeedForward derives it. Only a model whose params.json
states `hidden_dim` outright (the pruned Llama Guard 3 1B INT4) carries one.

Known traps, each checked against its source:
  * the llama-models SKU list gives Llama 2 7B/13B n_kv_heads 8, multiplier 1.3 and theta 500000: wrong
    (llama-models issue #246); the HF configs and the Llama 2 model card say MHA, theta 10000.
  * Llama 3.2 uses RoPE factor 32 (HF config.json, HFCONV); Meta's reference apply_scaling hard-codes 8
    (llama-models issues #166, #241: "It should be 32 as documented in the config.json").
  * Llama Guard 3 1B uses factor 8 and untied embeddings, unlike the Llama 3.2 1B it derives from.
  * Llama Guard 2's SKU entry says vocab 32000; every HF config says 128256.

Usage: `llama_ref.model.presets.get("llama-3.1-8b")` -> ModelArgs; `llama_ref.model.presets.names()` lists them.
"""

from __future__ import annotations

from .config import ConfigError, ModelArgs, RopeScaling
from .llama4_config import Llama4Args

# Vocabulary sizes (llama-configs.md section 3).
SENTENCEPIECE_VOCAB = 32000  # Llama 1, Llama 2, Llama Guard 1, Code Llama 34B and Python variants
CODE_LLAMA_VOCAB = 32016  # Code Llama 7B/13B/70B: 16 extra infilling/special pieces
TIKTOKEN_VOCAB = 128256  # Llama 3.x and Guard 2/3: 128000 BPE ranks + 256 special tokens
LLAMA4_VOCAB = 202048  # Llama 4: HF config.json vocab_size (Meta's tokenizer: 200000 ranks + 1135 special)


def _llama3_scaling(factor: float) -> RopeScaling:
    # Llama 3.1 / 3.2 frequency scaling: low 1, high 4, original context 8192 in every official config
    # (HFCFG rope_scaling; HFCONV); only the factor differs between model lines.
    return RopeScaling("llama3", factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192)


PRESETS: dict[str, ModelArgs] = {
    # ---- Llama 1 (Feb 2023). L1MC model card table (dim / heads / layers); norm_eps and FFN from
    # tinygrad MODEL_PARAMS (TG L66-79) and huggyllama HF configs. Context 2048 (HFCONV "1": 2048).
    # params.json omits n_kv_heads and rope_theta: MHA and theta 10000.
    "llama-1-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=SENTENCEPIECE_VOCAB,
                            multiple_of=256, norm_eps=1e-6, max_seq_len=2048),
    "llama-1-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=SENTENCEPIECE_VOCAB,
                             multiple_of=256, norm_eps=1e-6, max_seq_len=2048),
    # "30B" in the HF repo names (huggyllama/llama-30b); 32.5B parameters, published as 33B.
    "llama-1-33b": ModelArgs(dim=6656, n_layers=60, n_heads=52, vocab_size=SENTENCEPIECE_VOCAB,
                             multiple_of=256, norm_eps=1e-6, max_seq_len=2048),
    # 65B alone uses norm_eps 1e-5 (TG L79; HFCFG huggyllama/llama-65b rms_norm_eps 1e-05).
    "llama-1-65b": ModelArgs(dim=8192, n_layers=80, n_heads=64, vocab_size=SENTENCEPIECE_VOCAB,
                             multiple_of=256, norm_eps=1e-5, max_seq_len=2048),

    # ---- Llama 2 (Jul 2023). HFCFG Llama-2-{7b,13b,70b}-hf; L2REF MODEL_CARD (GQA only for 70B);
    # SKU base 70B entry (1.3 / 4096). Context 4096. NOT the SKU list's 7B/13B rows (see module doc).
    "llama-2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=SENTENCEPIECE_VOCAB,
                            multiple_of=256, norm_eps=1e-5, max_seq_len=4096),
    "llama-2-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=SENTENCEPIECE_VOCAB,
                             multiple_of=256, norm_eps=1e-5, max_seq_len=4096),
    "llama-2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=SENTENCEPIECE_VOCAB,
                             multiple_of=4096, ffn_dim_multiplier=1.3, norm_eps=1e-5, max_seq_len=4096),

    # ---- Code Llama (Aug 2023 / Jan 2024). Llama 2 architectures with rope_theta 1e6 from params.json
    # (the code default is 10000: CLREF model.py L35), trained at 16384 (HFCFG max_position_embeddings;
    # CLREF README). LIT L1396-1604, TG L119-155, HFCFG CodeLlama-13b-hf / -34b-hf.
    "code-llama-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=CODE_LLAMA_VOCAB,
                               multiple_of=256, norm_eps=1e-5, rope_theta=1e6, max_seq_len=16384),
    # Python variants of 7B/13B have no infilling tokens: vocab 32000 (LIT L1472, L1489).
    "code-llama-7b-python": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=SENTENCEPIECE_VOCAB,
                                      multiple_of=256, norm_eps=1e-5, rope_theta=1e6, max_seq_len=16384),
    "code-llama-13b": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=CODE_LLAMA_VOCAB,
                                multiple_of=256, norm_eps=1e-5, rope_theta=1e6, max_seq_len=16384),
    "code-llama-13b-python": ModelArgs(dim=5120, n_layers=40, n_heads=40, vocab_size=SENTENCEPIECE_VOCAB,
                                       multiple_of=256, norm_eps=1e-5, rope_theta=1e6, max_seq_len=16384),
    # 34B: GQA with 8 KV heads, vocab 32000 in every variant (no infilling). FFN 22016 = formula with no
    # multiplier, multiple_of 256 (LIT, TG, HFCFG intermediate_size 22016).
    "code-llama-34b": ModelArgs(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, vocab_size=SENTENCEPIECE_VOCAB,
                                multiple_of=256, norm_eps=1e-5, rope_theta=1e6, max_seq_len=16384),
    # 70B: the Llama 2 70B shape (1.3 / 4096 -> 28672); base and Python vocab 32016 (LIT L1452, L1528).
    # The model card says 70B Python/Instruct were not long-context fine-tuned; HF configs still say 16384.
    "code-llama-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=CODE_LLAMA_VOCAB,
                                multiple_of=4096, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=1e6,
                                max_seq_len=16384),

    # ---- Llama 3 (Apr 2024). NAK = Meta-Llama-3-8B/params.json verbatim; SKU L145-163; HFCFG. Context 8192.
    "llama-3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=TIKTOKEN_VOCAB,
                            multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                            max_seq_len=8192),
    "llama-3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=TIKTOKEN_VOCAB,
                             multiple_of=4096, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                             max_seq_len=8192),

    # ---- Llama 3.1 (Jul 2024). SKU L187-283 (use_scaled_rope: True); HFCFG rope_scaling
    # {llama3, factor 8, low 1, high 4, original 8192}; context 131072 (HFCONV).
    "llama-3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=TIKTOKEN_VOCAB,
                              multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                              rope_scaling=_llama3_scaling(8.0), max_seq_len=131072),
    "llama-3.1-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=TIKTOKEN_VOCAB,
                               multiple_of=4096, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=_llama3_scaling(8.0), max_seq_len=131072),
    # 405B: 8 KV heads as in the MP8 / FP8 params.json and the later HF Instruct snapshot. (The bf16-mp16
    # download's params.json says 16: its KV heads are duplicated per shard; same model, more tensors.)
    "llama-3.1-405b": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, vocab_size=TIKTOKEN_VOCAB,
                                multiple_of=4096, ffn_dim_multiplier=1.2, norm_eps=1e-5, rope_theta=500000.0,
                                rope_scaling=_llama3_scaling(8.0), max_seq_len=131072),

    # ---- Llama 3.2 text (Sep 2024). SKU L290-309 (arch_args_1b / _3b); HFCFG Llama-3.2-1B and
    # -3B-Instruct: rope factor 32 (not Meta code's 8), tie_word_embeddings true; MC32 "Shared Embeddings".
    "llama-3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=TIKTOKEN_VOCAB,
                              multiple_of=256, ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0,
                              rope_scaling=_llama3_scaling(32.0), max_seq_len=131072, tie_word_embeddings=True),
    "llama-3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=TIKTOKEN_VOCAB,
                              multiple_of=256, ffn_dim_multiplier=1.0, norm_eps=1e-5, rope_theta=500000.0,
                              rope_scaling=_llama3_scaling(32.0), max_seq_len=131072, tie_word_embeddings=True),

    # ---- Llama 3.3 (Dec 2024): the Llama 3.1 70B architecture (SKU L754; LIT L894).
    "llama-3.3-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=TIKTOKEN_VOCAB,
                               multiple_of=4096, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                               rope_scaling=_llama3_scaling(8.0), max_seq_len=131072),

    # ---- Llama Guard (safety classifiers built on the text models).
    # Guard 1 (Dec 2023): Llama 2 7B shape; HFCFG llamas-community/LlamaGuard-7b (max_position 2048).
    "llama-guard-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=SENTENCEPIECE_VOCAB,
                                multiple_of=256, norm_eps=1e-5, max_seq_len=2048),
    # Guard 2 (Apr 2024): Llama 3 8B shape. multiple_of 256 as in its SKU params (the formula gives 14336 with
    # 256 or 1024); vocab 128256 from the three HF config copies, not the SKU's 32000. rope_scaling null.
    "llama-guard-2-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=TIKTOKEN_VOCAB,
                                  multiple_of=256, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                                  max_seq_len=8192),
    # Guard 3 8B (Jul 2024): SKU safety_models() params, use_scaled_rope False. No source read states its
    # context; 8192 is Llama 3's trained window, the only one valid for unscaled RoPE.
    "llama-guard-3-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=TIKTOKEN_VOCAB,
                                  multiple_of=1024, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0,
                                  max_seq_len=8192),
    # Guard 3 1B (Sep 2024): Llama 3.2 1B shape, but HFCFG snapshot acf7aafa says rope factor 8.0 and
    # tie_word_embeddings false (HFCONV "Guard-3" agrees).
    "llama-guard-3-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=TIKTOKEN_VOCAB,
                                  multiple_of=256, ffn_dim_multiplier=1.5, norm_eps=1e-5, rope_theta=500000.0,
                                  rope_scaling=_llama3_scaling(8.0), max_seq_len=131072,
                                  tie_word_embeddings=False),
    # Guard 3 1B INT4 (pruned, ships as a .pte): SKU L801-818 gives 12 layers and hidden_dim 6400 outright,
    # use_scaled_rope True (scaling numbers not given: Meta's code applies factor 8) and theta as
    # rope_freq_base. Context and tying are not stated; the params.json defaults are kept.
    "llama-guard-3-1b-int4": ModelArgs(dim=2048, n_layers=12, n_heads=32, n_kv_heads=8, vocab_size=TIKTOKEN_VOCAB,
                                       hidden_dim=6400, norm_eps=1e-5, rope_theta=500000.0,
                                       rope_scaling=_llama3_scaling(8.0)),

    # ---- Llama 4 (Apr 2025), text model (llama_ref skips the vision encoder; see LLAMA4_VISION_PARAMS).
    # HFL4 = transformers' Llama4TextConfig defaults (configuration_llama4.py, documented as
    # meta-llama/Llama-4-Scout-17B-16E) and copies of the text_config of the models' config.json; REF4M = Meta's
    # llama4 code (args.py, model.py, moe.py in the llama-models 0.3.0 wheel). Both widths are stated outright
    # as HF's config.json states them: experts 8192 (intermediate_size), dense layers 16384
    # (intermediate_size_mlp). NoPE every 4th layer (HFL4 no_rope_layer_interval 4; Scout's no_rope_layers).
    # Scout: 16 experts, every layer MoE, QK norm. RoPE scaling factor 16, high_freq_factor 1 as Meta's code
    # sets for Scout (REF4M args.py: "Only Llama-4-Scout uses scaled rope"); Scout's HF config.json says
    # llama3 factor 8, high_freq_factor 4 instead (a discrepancy between the sources: Meta's code is followed).
    # Context 262144 = the base model's HF max_position_embeddings (the model card advertises 10M).
    "llama-4-scout-17b-16e": ModelArgs(
        dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=LLAMA4_VOCAB, hidden_dim=16384, norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 16.0, 1.0, 1.0, 8192), max_seq_len=262144,
        llama4=Llama4Args(n_experts=16, top_k=1, moe_layers=tuple(range(48)), expert_hidden_dim=8192,
                          nope_layers=tuple(range(3, 48, 4)), attention_chunk_size=8192, use_qk_norm=True,
                          attn_temperature_tuning=True, floor_scale=8192.0, attn_scale=0.1)),
    # Maverick: 128 experts in every other layer (interleave_moe_layer_step 2: layers 1, 3, ...; the others
    # dense), no QK norm (use_qk_norm false), no RoPE scaling (rope_scaling null), context 1048576: the
    # Maverick config.json as NVIDIA/TensorRT-LLM's Llama 4 test copies it (reduced there to 2 layers).
    "llama-4-maverick-17b-128e": ModelArgs(
        dim=5120, n_layers=48, n_heads=40, n_kv_heads=8, vocab_size=LLAMA4_VOCAB, hidden_dim=16384, norm_eps=1e-5,
        rope_theta=500000.0, max_seq_len=1048576,
        llama4=Llama4Args(n_experts=128, top_k=1, moe_layers=tuple(range(1, 48, 2)), expert_hidden_dim=8192,
                          nope_layers=tuple(range(3, 48, 4)), attention_chunk_size=8192, use_qk_norm=False,
                          attn_temperature_tuning=True, floor_scale=8192.0, attn_scale=0.1)),
}

# Llama 4's vision encoder, which the published totals (Scout 109B, Maverick 400B) include and llama_ref does
# not load: HF vision_config (34 layers, width 1408, MLP 5632, 14x14 patches of 336x336 images, pixel shuffle
# 0.5, projector to 4096 and then to the text width 5120). Per layer: q, k, v, o with biases, fc1 and fc2 with
# biases, two LayerNorms; around them: patch embedding, class and position embeddings, two LayerNorms, the
# adapter MLP (4 * 1408 -> 4096 -> 4096) and the projector (4096 -> 5120).
_V, _VI = 1408, 5632
LLAMA4_VISION_PARAMS = (34 * (4 * _V * _V + 4 * _V + 2 * _V * _VI + _VI + _V + 4 * _V)
                        + 3 * 14 * 14 * _V + _V + ((336 // 14) ** 2 + 1) * _V + 4 * _V
                        + 4 * _V * 4096 + 4096 * 4096 + 4096 * 5120)


def names() -> list[str]:
    """Every preset name, sorted."""
    return sorted(PRESETS)


def get(name: str) -> ModelArgs:
    """The ModelArgs of an official model by short name, e.g. "llama-3.1-8b" (case-insensitive)."""
    key = str(name).strip().lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(names())}")
    return PRESETS[key]
