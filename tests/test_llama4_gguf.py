"""Llama 4 GGUF files (llama.cpp's llama4 architecture) against llama.cpp and transformers.

tests/data/tiny_ckpt/llama4cpp_hf is a tiny random Llama 4 saved by transformers, llama4cpp.gguf the same model
converted by llama.cpp's own convert_hf_to_gguf.py, and llama4cpp_logits.npz the logits transformers and
llama.cpp (llama-cpp-python 0.3.36, float32 weights and KV cache) computed for an 8216-token prompt
(tests/fixtures/make_llama4_gguf.py). llama.cpp fixes the chunk size (8192), the NoPE layers (every 4th) and the
temperature tuning (floor 8192, scale 0.1) in its code, so the model has exactly those values (the other tiny
Llama 4, with chunk 8, would be a different model to llama.cpp) and the prompt crosses position 8192, where
the chunk and the first temperature step act. Neither library is needed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from llama_ref.model.config import ConfigError, from_gguf_metadata
from llama_ref.weights.gguf import gguf_metadata, open_gguf

DATA = Path(__file__).parent / "data" / "tiny_ckpt"
GGUF, HF = DATA / "llama4cpp.gguf", DATA / "llama4cpp_hf"
REF = np.load(DATA / "llama4cpp_logits.npz")
TOKENS, POSITIONS = REF["tokens"], REF["positions"]
FIRST = int(np.argmax(np.diff(POSITIONS) > 1)) + 1  # rows 0 .. FIRST-1 are positions 0 ..; the rest from 8184
LAST_ROWS = int(np.sum(POSITIONS >= 8191))  # positions the temperature step reaches
SHORT_TOL = 1e-5  # measured 2.0e-6 (llama.cpp) on the first 24 positions
LONG_TOL = 1e-4  # measured 3.1e-5 (llama.cpp) and 3.2e-5 (transformers) past position 8184; llama.cpp and
# transformers differ by 5.2e-6 there: both round RoPE angles (position x frequency) to float32, llama_ref
# computes them in float64. With its angles rounded to float32 too (ops.rope_tables patched, once), llama_ref
# was 3.6e-6 from llama.cpp and 3.1e-6 from transformers there.


@pytest.fixture(scope="module")
def gguf_model():
    return llama_ref.load(GGUF)


@pytest.fixture(scope="module")
def metadata():
    return gguf_metadata(open_gguf(GGUF))


def test_config_takes_the_file_s_values_and_llama_cpp_s_fixed_ones(gguf_model):
    hf = llama_ref.load(HF)
    a, b = gguf_model.args, hf.args
    m = a.llama4
    assert (m.attention_chunk_size, m.nope_layers, m.floor_scale, m.attn_scale) == (8192, (3,), 8192.0, 0.1)
    assert m.use_qk_norm and m.attn_temperature_tuning
    assert m == b.llama4  # the HF config states what llama.cpp fixes: the same model
    assert a.norm_eps == pytest.approx(b.norm_eps, rel=1e-7)  # stored as float32
    assert a.replace(norm_eps=b.norm_eps, rope_scaling=b.rope_scaling) == b
    # Scout's RoPE scaling travels as llama.cpp's rope_freqs tensor of per-frequency divisors.
    from llama_ref.weights.writers import llama3_rope_divisors
    freqs = gguf_model.freqs
    assert np.array_equal(freqs, hf.freqs) and llama3_rope_divisors(b) is not None


def test_weights_are_the_hf_checkpoint_s(gguf_model):
    hf = llama_ref.load(HF, weights="float32")
    assert set(gguf_model.weights) == set(hf.weights)
    for name, w in hf.weights.items():
        assert np.array_equal(np.asarray(gguf_model.weights[name]), np.asarray(w)), name


def test_logits_equal_the_hf_loaded_model_s(gguf_model):
    hf = llama_ref.load(HF)
    ids = TOKENS[:FIRST]
    assert np.abs(gguf_model.forward(ids) - hf.forward(ids)).max() <= 1e-6  # measured 0.0


def test_logits_match_llama_cpp_and_transformers_on_the_prompt_start(gguf_model):
    got = gguf_model.forward(TOKENS[:FIRST])
    assert np.abs(got - REF["llama_cpp"][:FIRST]).max() < SHORT_TOL
    assert np.abs(got - REF["hf"][:FIRST]).max() < SHORT_TOL


def _long_logits(model) -> np.ndarray:
    """The kept rows of the 8216-token prompt, prefilled in pieces of 1024."""
    return np.concatenate([model.forward(TOKENS[s:s + 1024], s) for s in range(0, len(TOKENS), 1024)])[POSITIONS]


@pytest.mark.slow
def test_logits_match_llama_cpp_past_the_chunk_boundary():
    """Two 8216-token prompts (about a minute each on the NumPy backend, 2 cores)."""
    import dataclasses

    model = llama_ref.load(GGUF)
    got = _long_logits(model)
    assert np.abs(got - REF["llama_cpp"]).max() < LONG_TOL
    assert np.abs(got - REF["hf"]).max() < LONG_TOL
    # The comparison can fail: without the temperature step (from position 8191) the last rows differ by
    # 0.016 or more (measured; without the chunk, by up to 5).
    m = model.args.llama4
    other = llama_ref.Transformer(model.args.replace(llama4=dataclasses.replace(m, attn_temperature_tuning=False)),
                                  model.weights, freq_divisors=np.array([1, 1, 1, 16.0]))
    assert np.abs(_long_logits(other)[-LAST_ROWS:] - REF["llama_cpp"][-LAST_ROWS:]).max(-1).min() > 100 * LONG_TOL


def test_packed_loading_gives_the_same_logits(gguf_model):
    packed = llama_ref.load(GGUF, weights="packed")
    ids = TOKENS[:12]
    assert np.array_equal(packed.forward(ids), gguf_model.forward(ids))


def test_qk_norm_follows_llama_cpp_s_expert_count_rule(metadata):
    """llama.cpp: QK norm unless the model is its 17B_128E type (Maverick): decided by expert_count alone."""
    assert from_gguf_metadata(metadata, has_output_tensor=True).llama4.use_qk_norm
    maverick = {**metadata, "llama4.expert_count": 128}
    assert not from_gguf_metadata(maverick, has_output_tensor=True).llama4.use_qk_norm


@pytest.mark.parametrize("change, message", [
    ({"llama4.attention.sliding_window": 16}, "sliding_window = 16: llama.cpp's llama4 ignores it and chunks by 8192"),
    ({"llama4.attention.sliding_window": 0}, "sliding_window = 0: 0 switches llama.cpp's llama4 to no chunking"),
    ({"llama4.attention.sliding_window_pattern": 2}, "chunks layers .0, 2., but llama.cpp's RoPE layers"),
    ({"llama4.attention.sliding_window_pattern": [True, True, True, True]}, "chunks layers .0, 1, 2, 3."),
    ({"llama4.expert_weights_scale": 2.5}, "expert_weights_scale = 2.5: llama.cpp's llama4 architecture does not read"),
    ({"llama4.expert_gating_func": 1}, "expert_gating_func = 1"),
    ({"llama4.attention.scale": 0.125}, "attention.scale = 0.125"),
    ({"llama4.expert_shared_feed_forward_length": 64}, "gives the shared expert the routed experts' width"),
    ({"llama4.expert_count": 0}, "expert_count is 0: llama.cpp's llama4 requires experts"),
    ({"llama4.rope.freq_base_swa": 10000.0}, "freq_base_swa differs"),
    ({"llama4.rope.scaling.type": "yarn"}, "rope.scaling.type 'yarn' is not supported"),
    ({"llama4.expert_feed_forward_length": [32, 32, 32, 64]}, "expert_feed_forward_length differs between layers"),
    ({"llama4.rope.dimension_count": 4}, "rope.dimension_count differs from the head size"),
    ({"llama4.block_count": 2 ** 40}, "block_count is 1099511627776; llama.cpp accepts 1 .. 512"),  # no 2^40 loop
    ({"llama4.expert_count": 2 ** 40}, "expert_count is 1099511627776; llama.cpp accepts at most 1024"),
])
def test_files_llama_cpp_would_run_differently_are_refused(metadata, change, message):
    with pytest.raises(ConfigError, match=message):
        from_gguf_metadata({**metadata, **change}, where="x.gguf", has_output_tensor=True)


def test_a_matching_window_and_pattern_are_accepted(metadata):
    meta = {**metadata, "llama4.attention.sliding_window": 8192,
            "llama4.attention.sliding_window_pattern": [True, True, True, False]}
    assert from_gguf_metadata(meta, has_output_tensor=True) == from_gguf_metadata(metadata, has_output_tensor=True)


def _rewrite(tmp_path, edit):
    """The fixture GGUF with its tensors passed through edit(name, array) -> [(name, array), ...]."""
    import gguf

    reader = open_gguf(GGUF)
    meta = gguf_metadata(reader)
    out = tmp_path / "edited.gguf"
    w = gguf.GGUFWriter(str(out), "llama4")
    from llama_ref.weights.writers import _gguf_value_type
    for key, value in meta.items():
        if not key.startswith(("general.architecture", "GGUF.")) and key != "general.alignment":
            w.add_key_value(key, value, *_gguf_value_type(value))
    for t in reader.tensors:
        for name, array, *raw_dtype in edit(t.name, np.array(t.data)):
            w.add_tensor(name, array, raw_dtype=raw_dtype[0] if raw_dtype else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_a_fused_qkv_tensor_loads_as_its_three_parts(tmp_path, gguf_model):
    """llama.cpp accepts blk.N.attn_qkv (rows q, k, v) in place of attn_q/k/v (convert's --fuse-qkv)."""
    parts = {}

    def fuse(name, array):
        if ".attn_q." in name or ".attn_k." in name or ".attn_v." in name:
            block = name.split(".")[1]
            parts.setdefault(block, {})[name.split(".")[2]] = array
            if len(parts[block]) < 3:
                return []
            p = parts[block]
            return [(f"blk.{block}.attn_qkv.weight", np.concatenate([p["attn_q"], p["attn_k"], p["attn_v"]]))]
        return [(name, array)]

    fused = llama_ref.load(_rewrite(tmp_path, fuse))
    assert np.array_equal(fused.forward(TOKENS[:10]), gguf_model.forward(TOKENS[:10]))


@pytest.mark.parametrize("edit, message", [
    (lambda n, a: [(n, a[:3])] if n == "blk.1.ffn_gate_exps.weight" else [(n, a)],
     "tensor blk.1.ffn_gate_exps.weight has shape .3, 32, 32., expected .4, .... experts"),
    (lambda n, a: [(n, a[:, :16])] if n == "blk.1.ffn_down_exps.weight" else [(n, a)],
     "tensor blk.1.ffn_down_exps.weight has shape .4, 16, 32., the config implies .32, 32."),
    (lambda n, a: [] if n == "blk.3.ffn_up_exps.weight" else [(n, a)],
     "layers.3.feed_forward.experts.0.w3.weight is missing"),
    (lambda n, a: [(n, a)] + ([("blk.1.exp_probs_b.bias", np.zeros(4, np.float32))] if n == "output.weight" else []),
     "unexpected tensor blk.1.exp_probs_b.bias for a llama4 model"),
])
def test_damaged_expert_tensors_are_refused_naming_them(tmp_path, edit, message):
    from llama_ref.weights.common import WeightsError
    with pytest.raises(WeightsError, match=message):
        llama_ref.load(_rewrite(tmp_path, edit))


def test_versions_of_the_oracles_are_recorded():
    meta = json.loads(str(REF["meta"]))
    assert meta["llama_cpp_python"] == "0.3.36" and meta["llama_cpp_kv_cache"] == "f32"


def test_llama4_pre_tokenizer_splits_text_as_metas_pattern():
    """Real Llama 4 GGUF files say tokenizer.ggml.pre = "llama4" (llama.cpp's name for the pattern of Meta's
    llama4 tokenizer); the text is split by that pattern, then mapped to GPT-2's byte-level characters."""
    regex = pytest.importorskip("regex")
    from llama_ref.text.tokenizer import _pre_tokenizer
    from llama_ref.text.tokenizer_llama4 import LLAMA4_PATTERN

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in chars)})
    for text in ("Hello's WORLD123456 it's  done\n\n x/y", "ÉTÉ été\t\tdéjà-vu 3.14159 CamelCaseWord's", "a\r\nb  \n"):
        want = ["".join(chars[b] for b in piece.encode()) for piece in regex.findall(LLAMA4_PATTERN, text)]
        assert [p for p, _ in _pre_tokenizer("llama4").pre_tokenize_str(text)] == want, text


@pytest.mark.parametrize("kind", ["Q8_0", "F16", "BF16"])
def test_quantized_and_16_bit_expert_tensors_are_cut_per_expert(tmp_path, gguf_model, kind):
    """Q8_0 / F16 / BF16 experts (3-D tensors, as llama.cpp stores them): each expert is its slice of the
    stored blocks or elements, kept packed or dequantized; both give the weights gguf's own dequantizer makes
    of the whole tensor, and the same logits."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]

    def store(name, array):
        if "_exps." in name or name.endswith(("attn_q.weight", "ffn_gate.weight")):
            return [(name, gguf.quants.quantize(array, qtype), qtype)]
        return [(name, array)]

    path = _rewrite(tmp_path, store)
    reader = open_gguf(path)
    stacked = next(t for t in reader.tensors if t.name == "blk.1.ffn_down_exps.weight")
    assert stacked.tensor_type.name == kind and len(stacked.shape) == 3
    want = gguf.quants.dequantize(np.asarray(stacked.data), stacked.tensor_type)  # (E, D, FE) as a whole
    as_float = llama_ref.load(path, weights="float32")
    packed = llama_ref.load(path, weights="packed")
    for e in range(4):
        name = f"layers.1.feed_forward.experts.{e}.w2.weight"
        assert np.array_equal(as_float.weights[name], want[e])
        assert type(packed.weights[name]).__name__ == f"{kind}Weight"
        assert np.array_equal(packed.weights[name].to_float(np.float32), want[e])
    ids = TOKENS[:12]
    assert np.abs(packed.forward(ids) - as_float.forward(ids)).max() < 1e-5
    diff = np.abs(as_float.forward(ids) - gguf_model.forward(ids)).max()
    # The weights were born bfloat16: BF16 holds them exactly, and so does F16 in its normal range (below
    # 2**-14 its subnormals keep fewer bits, a few of these random weights live there); Q8_0's rounding shows.
    if kind == "F16":
        for name, born in gguf_model.weights.items():
            moved = np.asarray(as_float.weights[name]) != np.asarray(born)
            assert np.all(np.abs(np.asarray(born)[moved]) < 2.0 ** -14), name
    assert diff > 1e-4 if kind == "Q8_0" else diff == 0 if kind == "BF16" else diff < 1e-6


@pytest.mark.parametrize("name", ["llama-4-scout-17b-16e", "llama-4-maverick-17b-128e"])
def test_scout_and_maverick_are_expressible_and_their_keys_read_back(tmp_path, name):
    """Both published models have llama.cpp's fixed values (Maverick: 128 experts, no QK norm); the llama4.*
    keys written for them read back as the same model (Scout's RoPE scaling travels as the rope_freqs tensor)."""
    import gguf

    from llama_ref.model import presets
    from llama_ref.weights.writers_llama4 import add_gguf_hyperparameters

    args = presets.get(name)
    w = gguf.GGUFWriter(str(tmp_path / "keys.gguf"), "llama4")
    add_gguf_hyperparameters(w, args)
    w.add_vocab_size(args.vocab_size)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = from_gguf_metadata(gguf_metadata(open_gguf(tmp_path / "keys.gguf")),
                              has_output_tensor=not args.tie_word_embeddings)
    assert back.llama4 == args.llama4 and back.ffn_hidden_dim == args.ffn_hidden_dim
    assert back.norm_eps == pytest.approx(args.norm_eps, rel=1e-7)  # float32 in the file
    for field in ("dim", "n_layers", "n_heads", "kv_heads", "head_dim", "vocab_size", "rope_theta", "max_seq_len"):
        assert getattr(back, field) == getattr(args, field), field
