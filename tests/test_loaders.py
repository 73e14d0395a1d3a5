"""Checkpoint loaders (Meta .pth, HF safetensors, GGUF), converters and `info`, against fixtures written by
PyTorch and logits computed by Meta's own model code (tests/fixtures/make_tiny_checkpoints.py)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from llama_ref.model.config import ConfigError
from llama_ref.tools.convert import convert, write_checkpoint
from llama_ref.model.transformer import Transformer
from llama_ref.weights.common import WeightsError
from llama_ref.weights.gguf import gguf_name_to_meta, load_gguf
from llama_ref.weights.hf import load_hf, read_hf_tensors
from llama_ref.weights.meta import load_meta
from llama_ref.weights.torch_zip import read_torch_file
from llama_ref.weights import writers

from tiny import file_backed

DATA = Path(__file__).parent / "data" / "tiny_ckpt"
MODELS = ["llama31_bf16", "llama2_fp16", "llama32_tied"]
REF = np.load(DATA / "reference.npz")
TOKENS = REF["tokens"]


def forms(name):
    """Every stored form of fixture model `name`: (label, path)."""
    out = [("meta", DATA / f"{name}_meta"), ("hf", DATA / f"{name}_hf"), ("gguf", DATA / f"{name}.gguf")]
    if (DATA / f"{name}_mp2_meta").exists():
        out.append(("meta-mp2", DATA / f"{name}_mp2_meta"))
    return out


def model_from(path, keep="stored") -> Transformer:
    """A model from any checkpoint path (the tiny GGUFs carry no tokenizer, so not through llama_ref.load)."""
    path = Path(path)
    if path.is_file():
        args, weights, extras = load_gguf(path)
    else:
        args, weights, extras = (load_meta if (path / "params.json").exists() else load_hf)(path, keep=keep)
    return Transformer(args, weights, freq_divisors=extras.get("freq_divisors"))


# ---- the same weights in every format ---------------------------------------------------------------------

def test_every_format_loads_with_torch_blocked():
    """Loading runs in a subprocess where `import torch` (and transformers) fails."""
    code = f"""
import sys, json
sys.modules['torch'] = None; sys.modules['transformers'] = None
import numpy as np, llama_ref
from llama_ref.weights.gguf import META_TO_GGUF, gguf_name_to_meta, load_gguf
from llama_ref.model.transformer import Transformer
try:
    import torch
    raise SystemExit('torch importable')
except ImportError:
    pass
ref = np.load({str(DATA / 'reference.npz')!r}); out = {{}}
for name in {MODELS!r}:
    for label in ['meta', 'hf', 'gguf']:
        p = {str(DATA)!r} + '/' + name + ('.gguf' if label == 'gguf' else '_' + label)
        if label == 'gguf':
            a, w, e = load_gguf(p); m = Transformer(a, w, freq_divisors=e['freq_divisors'])
        else:
            m = llama_ref.load(p)
        out[name + '/' + label] = float(np.abs(m.forward(ref['tokens']) - ref[name + '/full']).max())
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    diffs = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(diffs) == 9
    assert max(diffs.values()) < 1e-4, diffs


def meta_reference(name, path) -> Transformer:
    """The Meta-format model of fixture `name`, with the RoPE frequencies of the checkpoint at `path`.

    A GGUF file stores Llama 3.1's RoPE scaling as one float32 divisor per frequency (rope_freqs), not as the
    formula's parameters: its frequencies are the formula's to the float32 rounding of the divisors (computed in
    float32 by the file's writer: checked here within two float32 ulps, 2^-22 relative), and a model read from
    it is bit for bit the same weights with those frequencies, not with the formula's."""
    meta = model_from(DATA / f"{name}_meta")
    path = Path(path)
    divisors = load_gguf(path)[2].get("freq_divisors") if path.is_file() else None
    if divisors is None:
        return meta
    same = Transformer(meta.args.replace(rope_scaling=None), meta.weights, freq_divisors=divisors)
    np.testing.assert_allclose(same.freqs, meta.freqs, rtol=2.0 ** -22, atol=0)
    return same


@pytest.mark.parametrize("name", MODELS)
def test_all_forms_give_identical_logits(name):
    for label, path in forms(name):
        expected = meta_reference(name, path).forward(TOKENS)
        np.testing.assert_array_equal(model_from(path).forward(TOKENS), expected,
                                      err_msg=f"{name}: {label} differs from meta")


@pytest.mark.parametrize("name", ["llama31_bf16", "llama2_fp16"])
def test_shard_merge_equals_unsharded(name):
    _, whole, _ = load_meta(DATA / f"{name}_meta", keep="float32")
    _, merged, extras = load_meta(DATA / f"{name}_mp2_meta", keep="float32")
    assert extras["shards"] == 2
    assert whole.keys() == merged.keys()
    for key in whole:
        np.testing.assert_array_equal(merged[key], whole[key], err_msg=key)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("keep", ["stored", "float32"])
def test_logits_match_meta_reference(name, keep):
    """Prompt, chunked prefill through the KV cache, and single-token decode, vs Meta's llama3/model.py."""
    m = model_from(DATA / f"{name}_meta", keep=keep)
    np.testing.assert_allclose(m.forward(TOKENS), REF[f"{name}/full"], atol=1e-4, rtol=0)
    chunked = np.concatenate([m.forward(TOKENS[:4], 0), m.forward(TOKENS[4:], 4)])
    np.testing.assert_allclose(chunked, REF[f"{name}/chunked"], atol=1e-4, rtol=0)
    decode = [m.forward([t], len(TOKENS) + j)[-1] for j, t in enumerate(REF["decode_tokens"])]
    np.testing.assert_allclose(np.stack(decode), REF[f"{name}/decode"], atol=1e-4, rtol=0)


def test_16bit_weights_stay_16bit():
    _, bf, _ = load_hf(DATA / "llama31_bf16_hf")
    _, fp, _ = load_meta(DATA / "llama2_fp16_meta")
    _, f32, _ = load_hf(DATA / "llama31_bf16_hf", keep="float32")
    wq = "layers.0.attention.wq.weight"
    assert bf[wq].format == "bf16" and fp[wq].format == "f16"
    assert bf[wq].nbytes * 2 == f32[wq].nbytes
    # Widening is exact: the kept bf16 matrix equals the float32 load bit for bit.
    np.testing.assert_array_equal(bf[wq].to_float(np.float32), f32[wq])
    assert f32["norm.weight"].dtype == np.float32 and bf["norm.weight"].dtype == np.float32


@pytest.mark.parametrize("form", ["gguf", "hf", "meta"])
def test_weights_are_read_into_memory_unless_mmap_is_asked(form):
    """By default kept weights live in memory the process owns (decode streams them ~20% faster here than
    through the page cache); mmap=True leaves them mapped. Both give the same logits, bit for bit."""
    path = {"gguf": DATA / "llama31_bf16.gguf", "hf": DATA / "llama31_bf16_hf", "meta": DATA / "llama2_fp16_meta"}[form]
    loaded = {}
    for mapped in (False, True):
        if form == "gguf":
            args, weights, extras = load_gguf(path, packed=True, mmap=mapped)
        else:
            args, weights, extras = (load_hf if form == "hf" else load_meta)(path, mmap=mapped)
        matrices = [w for name, w in weights.items() if not name.endswith("norm.weight")]
        backed = [file_backed(w) for w in matrices]
        # Mapped: every matrix kept as stored (HF's wq/wk are permuted, so read: they are the exception).
        assert (any(backed) if mapped else not any(backed)), (form, mapped)
        loaded[mapped] = Transformer(args, weights, freq_divisors=extras.get("freq_divisors")).forward(TOKENS)
    np.testing.assert_array_equal(loaded[False], loaded[True])


def test_llama32_tied_storage_and_llama2_vocab():
    args, w, _ = load_meta(DATA / "llama32_tied_meta")
    assert args.tie_word_embeddings and w["output.weight"] is w["tok_embeddings.weight"]
    args2, _, _ = load_meta(DATA / "llama2_fp16_meta")  # vocab_size -1 and rope.freqs in the file
    assert json.loads((DATA / "llama2_fp16_meta" / "params.json").read_text())["vocab_size"] == -1
    assert args2.vocab_size == 96 and args2.n_kv_heads is None and args2.rope_theta == 10000.0


# ---- conversion -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_convert_round_trips(tmp_path, name):
    expected = model_from(DATA / f"{name}_meta").forward(TOKENS)
    for src_label, src in forms(name)[:3]:
        for to in ("meta", "hf", "gguf-f32"):
            dst = tmp_path / f"{src_label}-{to}"
            convert(src, dst, to)
            got = model_from(dst).forward(TOKENS)
            want = meta_reference(name, dst).forward(TOKENS) if to.startswith("gguf") else expected
            np.testing.assert_array_equal(got, want, err_msg=f"{src_label} -> {to}")
    # f16 output rounds bf16 weights again: close, and the file really holds F16 tensors.
    convert(DATA / f"{name}_hf", tmp_path / "f16.gguf", "gguf-f16")
    import gguf
    types = {t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "f16.gguf")).tensors}
    assert types == {"F16", "F32"}
    np.testing.assert_allclose(model_from(tmp_path / "f16.gguf").forward(TOKENS), expected, atol=1e-3)


def test_written_meta_file_is_read_like_torch_writes_it(tmp_path):
    """Our .pth writer's output read back tensor by tensor equals the torch-written original."""
    convert(DATA / "llama32_tied_meta", tmp_path / "m", "meta")
    ours, theirs = read_torch_file(tmp_path / "m" / "consolidated.00.pth"), read_torch_file(
        DATA / "llama32_tied_meta" / "consolidated.00.pth")
    assert ours.keys() == theirs.keys()
    for k in theirs:
        assert ours[k].dtype_name == theirs[k].dtype_name
        np.testing.assert_array_equal(ours[k].read(), theirs[k].read())
    assert ours["output.weight"].storage == ours["tok_embeddings.weight"].storage


@pytest.mark.slow
def test_smollm2_converted_to_meta_and_hf_matches_gguf(tmp_path, default_model_path, default_model):
    """The real model: GGUF -> Meta (the full `convert` path, tokenizer carried along) and the loaded model
    -> HF (write_checkpoint), each loaded back, give the GGUF's logits exactly (float32 throughout)."""
    ids = [1, 504, 3458]
    expected = default_model.forward(ids)
    convert(default_model_path, tmp_path / "meta", "meta")
    back = llama_ref.load(tmp_path / "meta")
    np.testing.assert_array_equal(back.forward(ids), expected)
    text = "Hello world, 123 tokens!"
    assert back.tokenizer.encode(text) == default_model.tokenizer.encode(text)
    del back
    write_checkpoint(default_model.args, default_model.weights, tmp_path / "hf", "hf")
    assert not list(tmp_path.glob(".*partial*"))
    back = llama_ref.load(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > 4 * default_model.args.param_count()
    np.testing.assert_array_equal(back.forward(ids), expected)


def test_interrupted_convert_leaves_nothing(tmp_path, monkeypatch):
    real = writers.write_safetensors
    calls = []

    def interrupted(path, tensors, metadata=None, on_tensor=None):
        real(path, tensors[:3], metadata, on_tensor)  # part of the file is on disk ...
        calls.append(path)
        raise KeyboardInterrupt  # ... when the user presses Ctrl-C

    monkeypatch.setattr(writers, "write_safetensors", interrupted)
    dst = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(DATA / "llama31_bf16_meta", dst, "hf")
    assert calls and not calls[0].exists()  # the partial file was written, then removed
    assert not dst.exists() and list(tmp_path.iterdir()) == []


def test_convert_refuses_existing_output_and_bad_target(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(WeightsError, match="already exists"):
        convert(DATA / "llama31_bf16_meta", tmp_path / "x", "hf")
    with pytest.raises(WeightsError, match="--to"):
        convert(DATA / "llama31_bf16_meta", tmp_path / "y", "safetensors")


# ---- info and the command line ------------------------------------------------------------------------------

def test_info_and_cli(tmp_path, capsys):
    from llama_ref.tools.cli import main

    assert main(["info", str(DATA / "llama2_fp16_mp2_meta")]) == 0
    out = capsys.readouterr().out
    args, _, _ = load_meta(DATA / "llama2_fp16_meta")
    assert "Meta" in out and "2 shard" in out and "float16" in out
    assert f"parameters:  {args.param_count():,}" in out
    assert main(["info", str(DATA / "llama32_tied_hf")]) == 0
    assert "tied embeddings" in capsys.readouterr().out
    assert main(["convert", str(DATA / "llama31_bf16_hf"), str(tmp_path / "g.gguf"), "--to", "gguf-f32", "-q"]) == 0
    assert (tmp_path / "g.gguf").is_file()
    assert main(["convert", str(DATA / "llama31_bf16_hf"), str(tmp_path / "g.gguf"), "--to", "hf", "-q"]) == 2
    assert "already exists" in capsys.readouterr().err


# ---- GGUF weight types ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
def test_gguf_weight_types(tmp_path, kind):
    """A small model with every matrix of one GGUF type loads; its values are what the type encodes."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from tiny import random_weights, tiny_args
    from gguf_files import write_llama_gguf
    from llama_ref.weights.packed import from_gguf_tensor

    args = tiny_args(dim=256, n_heads=4, n_kv_heads=2, hidden_dim=256, n_layers=1, vocab_size=64)
    weights = random_weights(args, seed=3)
    qtype = T[kind]
    rng = np.random.default_rng(7)
    originals, stored = {}, {}
    for name, x in weights.items():
        if x.ndim == 1:
            continue  # norms stay float32
        originals[name] = x
        if kind in ("Q4_K", "Q5_K", "Q6_K"):
            # gguf-py cannot quantize K-quants: random blocks with small, finite fp16 scales instead.
            size = gguf.GGML_QUANT_SIZES[qtype][1]
            blocks = rng.integers(0, 256, (x.shape[0], x.shape[1] // 256, size), dtype=np.uint8)
            d_at = {"Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[kind]
            for at in d_at:
                blocks[..., at:at + 2] = np.full(blocks.shape[:2], 0.01, np.float16).view(np.uint8).reshape(
                    *blocks.shape[:2], 2)
            stored[name] = (blocks.reshape(x.shape[0], -1), qtype)
        else:
            q = gguf.quants.quantize(x, qtype)
            stored[name] = (q, qtype if q.dtype == np.uint8 else None)
    path = write_llama_gguf(tmp_path / f"{kind}.gguf", args, weights, {"llama.vocab_size": args.vocab_size},
                            raw=stored)

    loaded_args, loaded, _ = load_gguf(path)
    reader = gguf.GGUFReader(str(path))
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {kind}
    # A second, independent decoder (llama_ref.weights.packed) agrees with what the loader produced.
    for t in reader.tensors:
        if len(t.shape) != 2:
            continue
        meta_name = gguf_name_to_meta(t.name)
        packed = from_gguf_tensor(t)  # None for F32: the raw data are the values
        ref = np.asarray(t.data).reshape(loaded[meta_name].shape) if packed is None else (
            packed if isinstance(packed, np.ndarray) else packed.to_float(np.float32))
        np.testing.assert_array_equal(loaded[meta_name], ref, err_msg=meta_name)
        if meta_name in originals and kind not in ("Q4_K", "Q5_K", "Q6_K"):
            # Quantization error stays within what the type's step allows.
            x = originals[meta_name]
            bound = {"F32": 0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 0.01, "Q4_0": 0.2, "Q4_1": 0.12}[kind]
            assert np.abs(loaded[meta_name] - x).max() <= bound * np.abs(x).max() + 1e-7
    logits = Transformer(loaded_args, loaded).forward([1, 2, 3])
    assert np.isfinite(logits).all()
    # Kept in its stored blocks (K-quants regrouped), the Numba kernels give the same logits: 3 tokens
    # take the matrix-vector kernels, 12 the decoded tiles multiplied by BLAS.
    _, kept, _ = load_gguf(path, packed=True)
    if kind != "F32":
        assert kept["layers.0.attention.wq.weight"].format == kind.lower()
    tokens = np.arange(12) % args.vocab_size
    want = Transformer(loaded_args, loaded).forward(tokens)
    for n in (3, 12):
        got = Transformer(loaded_args, kept, backend="numba").forward(tokens[:n])
        np.testing.assert_allclose(got, want[:n], rtol=0, atol=1e-5 * np.abs(want).max())


# ---- bad input ------------------------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_files(tmp_path):
    d = _copy(DATA / "llama31_bf16_meta", tmp_path / "meta")
    pth = d / "consolidated.00.pth"
    pth.write_bytes(pth.read_bytes()[: pth.stat().st_size // 2])
    with pytest.raises(WeightsError, match="consolidated.00.pth.*truncated"):
        load_meta(d)
    h = _copy(DATA / "llama2_fp16_hf", tmp_path / "hf")
    st = h / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="model.safetensors: truncated"):
        load_hf(h)
    g = tmp_path / "t.gguf"
    g.write_bytes((DATA / "llama2_fp16.gguf").read_bytes()[:-100])
    with pytest.raises(WeightsError, match="t.gguf"):
        load_gguf(g)


def test_missing_shard(tmp_path):
    d = _copy(DATA / "llama31_bf16_mp2_meta", tmp_path / "mp")
    (d / "consolidated.00.pth").unlink()
    with pytest.raises(WeightsError, match="consolidated.00.pth is missing"):
        load_meta(d)
    # Only the first of two shards: shapes no longer fit the config.
    d2 = _copy(DATA / "llama31_bf16_mp2_meta", tmp_path / "mp2")
    (d2 / "consolidated.01.pth").unlink()
    with pytest.raises(WeightsError, match="shape"):
        load_meta(d2)
    h = _copy(DATA / "llama31_bf16_hf", tmp_path / "hf")
    (h / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors.*missing"):
        load_hf(h)


def _rewrite_meta(src: Path, dst: Path, edit) -> Path:
    """A copy of a Meta checkpoint with its state dict passed through edit(dict of raw arrays)."""
    shutil.copytree(src, dst)
    tensors = read_torch_file(src / "consolidated.00.pth")
    raw = {k: (t.read(), {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}[t.dtype_name])
           for k, t in tensors.items()}
    edit(raw)
    writers.write_torch_file(dst / "consolidated.00.pth", [(k, r, o) for k, (r, o) in raw.items()])
    return dst


def _rewrite_hf(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = read_hf_tensors(src)
    raw = {k: (t.read(), {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}[t.dtype_name])
           for k, t in tensors.items()}
    edit(raw)
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    writers.write_safetensors(dst / "model.safetensors", [(k, r, o) for k, (r, o) in raw.items()])
    return dst


def test_missing_tensor(tmp_path):
    d = _rewrite_meta(DATA / "llama2_fp16_meta", tmp_path / "m",
                      lambda raw: raw.pop("layers.1.feed_forward.w3.weight"))
    with pytest.raises(WeightsError, match="layers.1.feed_forward.w3.weight is missing"):
        load_meta(d)
    h = _rewrite_hf(DATA / "llama2_fp16_hf", tmp_path / "h", lambda raw: raw.pop("model.norm.weight"))
    with pytest.raises(WeightsError, match="norm.weight is missing"):
        load_hf(h)


def test_wrong_shape(tmp_path):
    def shrink(raw):
        r, o = raw["layers.0.attention.wv.weight"]
        raw["layers.0.attention.wv.weight"] = (r[:-8].copy(), o)
    d = _rewrite_meta(DATA / "llama31_bf16_meta", tmp_path / "m", shrink)
    with pytest.raises(WeightsError, match=r"layers.0.attention.wv.weight has shape \(8, 32\)"):
        load_meta(d)

    def shrink_k(raw):
        r, o = raw["model.layers.1.self_attn.k_proj.weight"]
        raw["model.layers.1.self_attn.k_proj.weight"] = (r[:, :-1].copy(), o)
    h = _rewrite_hf(DATA / "llama31_bf16_hf", tmp_path / "h", shrink_k)
    with pytest.raises(WeightsError, match="wk.weight has shape"):
        load_hf(h)


def test_unknown_dtype(tmp_path):
    def to_double(raw):
        raw["norm.weight"] = (raw["norm.weight"][0].astype(np.float64), "f64")
    writers.OUT_DTYPES["f64"] = (np.dtype("<f8"), "DoubleStorage", "F64")  # only to write the bad files
    try:
        d = _rewrite_meta(DATA / "llama31_bf16_meta", tmp_path / "m", to_double)
        h = _rewrite_hf(DATA / "llama31_bf16_hf", tmp_path / "h",
                        lambda raw: raw.update(
                            {"model.norm.weight": (raw["model.norm.weight"][0].astype(np.float64), "f64")}))
    finally:
        del writers.OUT_DTYPES["f64"]
    with pytest.raises(WeightsError, match="consolidated.00.pth: .*DoubleStorage.*not supported"):
        load_meta(d)
    with pytest.raises(WeightsError, match="model.safetensors: tensor model.norm.weight has dtype F64"):
        load_hf(h)


def test_config_contradicting_tensors(tmp_path):
    d = _copy(DATA / "llama31_bf16_meta", tmp_path / "m")
    params = json.loads((d / "params.json").read_text())
    params["n_kv_heads"] = 4  # the file has 2 KV heads
    (d / "params.json").write_text(json.dumps(params))
    with pytest.raises(WeightsError, match=r"m: tensor layers.0.attention.wk.weight has shape \(16, 32\)"):
        load_meta(d)
    h = _copy(DATA / "llama2_fp16_hf", tmp_path / "h")
    config = json.loads((h / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (h / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="h: the config says 3 layers, the checkpoint holds tensors of 2"):
        load_hf(h)
    config["num_hidden_layers"] = 2
    config["num_attention_heads"] = 5  # does not divide hidden_size
    (h / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="config.json"):
        load_hf(h)


class _Payload:
    """Pickles to a call of os.system that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_pth(path: Path, payload) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("consolidated/data.pkl", pickle.dumps({"tok_embeddings.weight": payload}, protocol=2))
        zf.writestr("consolidated/version", "3\n")


def test_hostile_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(DATA / "llama2_fp16_meta" / "params.json", d / "params.json")
    _hostile_pth(d / "consolidated.00.pth", _Payload(marker))
    # The payload is real: an ordinary unpickler (in a throwaway process) does create the marker ...
    probe = tmp_path / "probe.pth"
    _hostile_pth(probe, _Payload(tmp_path / "probe-ran"))
    subprocess.run([sys.executable, "-c", "import pickle, zipfile, sys; "
                    "pickle.loads(zipfile.ZipFile(sys.argv[1]).read('consolidated/data.pkl'))", str(probe)],
                   check=True, timeout=60)
    assert (tmp_path / "probe-ran").exists()
    # ... while our loader refuses it before anything runs, naming the file and the global.
    with pytest.raises(WeightsError, match=r"consolidated.00.pth: refused to unpickle.*(posix|os)\.system"):
        load_meta(d)
    with pytest.raises(WeightsError, match="refused"):
        llama_ref.load(d)
    assert not marker.exists()
    # Other ways in: builtins.eval, and an allowed-looking module with a foreign name.
    for module, name in [("builtins", "eval"), ("torch._utils", "_rebuild_from_type_v2"), ("torch", "load")]:
        raw = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x05\x00\x00\x00'x'*9\x85R."
        with zipfile.ZipFile(d / "consolidated.00.pth", "w") as zf:
            zf.writestr("consolidated/data.pkl", raw)
        with pytest.raises(WeightsError, match=f"refused to unpickle.*{module}.{name}"):
            read_torch_file(d / "consolidated.00.pth")


def test_state_dict_metadata_attribute(tmp_path):
    """model.state_dict() pickles with a `_metadata` attribute (a BUILD step); it is accepted."""
    from collections import OrderedDict

    sd = OrderedDict()
    sd._metadata = OrderedDict({"": {"version": 1}})
    path = tmp_path / "m.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps(sd, protocol=2))
    assert read_torch_file(path) == {}


def test_corrupt_safetensors_header(tmp_path):
    src = (DATA / "llama2_fp16_hf" / "model.safetensors").read_bytes()
    n = int.from_bytes(src[:8], "little")
    cases = {
        "huge-length": (10 ** 12).to_bytes(8, "little") + src[8:],
        "not-json": src[:8] + b"{" * n + src[8 + n:],
        "bad-offsets": src[:8] + src[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[2,', 1) + src[8 + n:],
        "empty": b"",
    }
    for label, blob in cases.items():
        h = tmp_path / label
        shutil.copytree(DATA / "llama2_fp16_hf", h)
        (h / "model.safetensors").write_bytes(blob)
        with pytest.raises(WeightsError, match=f"{label}/model.safetensors: (corrupt|truncated)"):
            load_hf(h)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "params.json").write_text("{}")
    (tmp_path / "consolidated.00.pth").write_bytes(b"garbage" * 10)
    with pytest.raises(WeightsError, match="consolidated.00.pth: truncated or not a PyTorch zip"):
        load_meta(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="empty: neither a Meta"):
        llama_ref.load(tmp_path / "empty")
