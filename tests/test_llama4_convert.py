"""`llama-ref convert` for Llama 4: Meta's, Hugging Face's and llama.cpp's layouts written as their own tools
write them (compared with the files Meta's code, transformers and llama.cpp's convert_hf_to_gguf.py wrote for
the same weights: tests/fixtures/make_llama4_checkpoint.py, make_llama4_gguf.py), read back to bit-identical
logits, and a model llama.cpp's llama4 architecture cannot express refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from llama_ref.tools.convert import convert
from llama_ref.weights.common import WeightsError

DATA = Path(__file__).parent / "data" / "tiny_ckpt"
META, HF = DATA / "llama4_meta", DATA / "llama4_hf"  # chunk 8, NoPE layer 2: not expressible in GGUF
CPP_HF, CPP_GGUF = DATA / "llama4cpp_hf", DATA / "llama4cpp.gguf"  # llama.cpp's fixed values
IDS = np.arange(20) * 37 % 128


def _same_model(a, b):
    # multiple_of and ffn_dim_multiplier only derive widths that the written files state outright.
    assert a.args.ffn_hidden_dim == b.args.ffn_hidden_dim
    assert a.args.replace(multiple_of=1, ffn_dim_multiplier=None, hidden_dim=1) == \
        b.args.replace(multiple_of=1, ffn_dim_multiplier=None, hidden_dim=1)
    assert np.array_equal(a.forward(IDS), b.forward(IDS))


@pytest.mark.parametrize("src", [META, HF, CPP_GGUF], ids=["meta", "hf", "gguf"])
@pytest.mark.parametrize("to", ["meta", "hf"])
def test_meta_and_hf_outputs_give_identical_logits(tmp_path, src, to):
    out = convert(src, tmp_path / "out", to)
    source, written = llama_ref.load(src), llama_ref.load(out)
    if src == CPP_GGUF:  # the rope_freqs tensor becomes Scout's scaling numbers; the norm eps stays float32's
        assert written.args.rope_scaling.high_freq_factor == 1.0 and written.args.rope_scaling.factor == 16.0
        assert np.array_equal(written.freqs, source.freqs)
        assert np.array_equal(written.forward(IDS), source.forward(IDS))
    else:
        _same_model(source, written)


def _torch_file(path):
    from llama_ref.weights.torch_zip import read_torch_file
    return {name: (t.shape, t.dtype_name, np.asarray(t.read()).tobytes()) for name, t in read_torch_file(path).items()}


def test_meta_output_is_metas_own_state_dict(tmp_path):
    """Same names, shapes, dtype and bytes as the state dict Meta's llama4 Transformer saved."""
    out = convert(HF, tmp_path / "out", "meta")
    assert _torch_file(out / "consolidated.00.pth") == _torch_file(META / "consolidated.00.pth")
    # params.json: llama_ref's form (the Llama 4 block), read back as the same config as Meta's file.
    assert llama_ref.model.config.from_params_json(out / "params.json").llama4 == \
        llama_ref.model.config.from_params_json(META / "params.json").llama4


def _safetensors(path):
    from llama_ref.weights.hf import read_hf_tensors
    return {name: (tuple(t.shape), t.dtype_name, np.asarray(t.read()).tobytes())
            for name, t in read_hf_tensors(path).items()}


def test_hf_output_is_what_transformers_saved(tmp_path):
    """Same tensors as transformers' save_pretrained of the same Llama4ForCausalLM (transformers itself read
    an output of this writer to logits identical to the fixture's, when this test was written)."""
    out = convert(META, tmp_path / "out", "hf")
    assert _safetensors(out) == _safetensors(HF)
    mine, theirs = (json.loads((d / "config.json").read_text()) for d in (out, HF))
    for key in ("model_type", "hidden_size", "intermediate_size", "intermediate_size_mlp", "num_local_experts",
                "num_experts_per_tok", "moe_layers", "no_rope_layers", "attention_chunk_size", "layer_types",
                "use_qk_norm", "attn_temperature_tuning", "floor_scale", "attn_scale", "head_dim",
                "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings"):
        assert mine[key] == theirs[key], key
    assert mine["rope_parameters"] == {**theirs["rope_parameters"], "rope_type": "llama3"}


def test_gguf_output_is_what_llama_cpps_converter_wrote(tmp_path):
    """Every tensor (type, shape, bytes) and every llama4.* key equal to convert_hf_to_gguf.py's file."""
    from llama_ref.weights.gguf import gguf_metadata, open_gguf

    out = convert(CPP_HF, tmp_path / "out.gguf", "gguf-f32")
    mine, theirs = open_gguf(out), open_gguf(CPP_GGUF)
    tensors = lambda r: {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape), np.asarray(t.data).tobytes())  # noqa: E731
                         for t in r.tensors}
    assert tensors(mine) == tensors(theirs)
    keys = lambda r: {k: v for k, v in gguf_metadata(r).items() if k.startswith("llama4.")}  # noqa: E731
    assert keys(mine) == keys(theirs)
    assert gguf_metadata(mine)["general.architecture"] == "llama4"


@pytest.mark.parametrize("to", ["gguf-f32", "gguf-f16"])
def test_gguf_round_trip(tmp_path, to):
    out = convert(CPP_GGUF, tmp_path / "out.gguf", to)
    source, written = llama_ref.load(CPP_GGUF), llama_ref.load(out)
    assert written.args == source.args and written.tokenizer is not None
    diff = np.abs(written.forward(IDS) - source.forward(IDS)).max()
    assert diff == 0 if to == "gguf-f32" else diff < 1e-5  # bf16-born weights: f16 rounds the smallest


def test_a_model_llama_cpp_cannot_express_is_refused_before_writing(tmp_path):
    with pytest.raises(WeightsError, match=r"cannot write this Llama 4 model as a llama.cpp GGUF: .*"
                                           r"attention_chunk_size 8 \(llama.cpp: 8192\); NoPE layers \[2\] "
                                           r"\(llama.cpp: every 4th, \[3\]\); floor_scale 4.0 and attn_scale 0.5"):
        convert(HF, tmp_path / "out.gguf", "gguf-f32")
    assert list(tmp_path.iterdir()) == []  # no partial output, no manifest


def test_gguf_expressibility_checks_qk_norm_and_moe_layers():
    import dataclasses

    from llama_ref.weights.writers_llama4 import check_gguf_expressible

    args = llama_ref.load(CPP_GGUF).args
    check_gguf_expressible(args)
    m = args.llama4
    for change, message in (({"use_qk_norm": False}, "use_qk_norm False with 4 experts"),
                            ({"moe_layers": (0, 3)}, r"MoE layers \[0, 3\]"),
                            ({"attn_temperature_tuning": False}, "no attention temperature tuning")):
        with pytest.raises(WeightsError, match=message):
            check_gguf_expressible(args.replace(llama4=dataclasses.replace(m, **change)))


def test_meta_shards_are_cut_as_metas_model_parallel_code_cuts_them(tmp_path):
    """--shards 2 writes, tensor for tensor and byte for byte, the shards tests/test_llama4.py cuts along the
    axes read from Meta's own llama4 modules at world size 2 (llama4_mp2_layout.json); they load back to the
    single file's logits, and a count that does not divide the heads is refused before anything is written."""
    from test_llama4 import _cut_meta_shards

    out = convert(HF, tmp_path / "out", "meta", shards=2)
    _cut_meta_shards(tmp_path / "metas", 2)
    for r in range(2):
        name = f"consolidated.{r:02d}.pth"
        assert _torch_file(out / name) == _torch_file(tmp_path / "metas" / name)
    assert np.array_equal(llama_ref.load(out).forward(IDS), llama_ref.load(HF).forward(IDS))
    with pytest.raises(WeightsError, match="3 model-parallel shards do not divide n_heads"):
        convert(HF, tmp_path / "three", "meta", shards=3)
    assert not (tmp_path / "three").exists()


@pytest.mark.slow  # about 20 s: merges recovered from 200000 ranks, a 60 MB GGUF with its 202048-token vocabulary
def test_gguf_output_carries_the_llama4_tokenizer(tmp_path):
    """A directory with Meta's Llama 4 tokenizer.model converts to a GGUF whose tokenizer.* keys (llama.cpp's
    gpt2 model, pre "llama4", control tokens) read back to Meta's ids on the whole corpus. (llama.cpp itself,
    llama-cpp-python 0.3.36, tokenizes 309 of its 323 texts the same: its approximation of the pattern splits
    some random strings that mix marks and punctuation differently, on any Llama 4 GGUF.)"""
    from llama_ref.tools.convert import write_checkpoint
    from llama_ref.weights.gguf import gguf_metadata, open_gguf

    try:
        model_path = llama_ref.fetch("llama4-tokenizer", progress=False)
    except llama_ref.FetchError as e:
        pytest.skip(f"the official Llama 4 tokenizer.model could not be fetched from PyPI: {e}")
    source = llama_ref.load(CPP_HF, weights="float32")
    vocab = 202048
    weights = dict(source.weights)
    for name in ("tok_embeddings.weight", "output.weight"):  # the 128 rows repeated to the tokenizer's size
        weights[name] = np.resize(np.asarray(weights[name]), (vocab, source.args.dim))
    hf = write_checkpoint(source.args.replace(vocab_size=vocab), weights, tmp_path / "hf", "hf", checksums=False)
    (hf / "tokenizer.model").write_bytes(Path(model_path).read_bytes())
    out = convert(hf, tmp_path / "out.gguf", "gguf-f32", checksums=False)
    meta = gguf_metadata(open_gguf(out))
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "llama4")
    tok = llama_ref.load(out).tokenizer
    cases = json.loads((Path(__file__).parent / "data" / "tokenizers" / "llama4-cases.json").read_text("utf-8"))
    for case in cases["cases"]:
        assert tok.encode(case["text"], bos=False) == case["ids"], case["text"]
        assert tok.encode(case["text"], bos=True, eos=True, allow_special=True) == case["ids_special"], case["text"]
    assert sorted(tok.stop_ids) == sorted(cases["stop_tokens"])
