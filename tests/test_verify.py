"""llama_ref.tools.verify: reference files, comparisons, and finding the layer where an injected bug enters."""

from __future__ import annotations

import json
import struct
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from llama_ref.model import ops
from llama_ref.tools.capture import run_and_capture
from llama_ref.tools.cli import main
from llama_ref.model.transformer import Transformer
from llama_ref.tools.verify import (ReferenceFileError, compare, dump, load_reference, logits_diff, save_reference,
                              tensor_diff, verify)

from tiny import tiny_model

TOKENS = [1, 5, 9, 3, 7, 2, 40, 11]


def reference_of(model, tokens=TOKENS):
    """A reference dict as another implementation would write it: tokens plus every activation."""
    return {"tokens": np.array(tokens), **run_and_capture(model, tokens)}


def half_split_rope(x, cos, sin):
    """The classic porting bug: rotating (x[i], x[i + HD/2]) with Meta's interleaved weights."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]  # (B, T, n, HD/2) each
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([a * c - b * s, a * s + b * c], axis=-1)


def backend_with(**replaced):
    """The NumPy backend with some operations swapped for buggy ones."""
    module = types.ModuleType("buggy_ops")
    module.__dict__.update({k: v for k, v in vars(ops).items() if not k.startswith("__")})
    module.__dict__.update(replaced)
    return module


# ---- the unmodified model, and round trips -------------------------------------------------------------

def test_unmodified_model_passes_with_zero_difference():
    model = tiny_model(n_layers=3)
    report = verify(model, reference_of(model))
    assert report.passed and report.first_divergence is None
    assert report.max_rel == 0 and len(report.tensors) == 2 + 3 * 12 + 1
    assert report.logits.top1_rate == 1.0 and report.logits.kl.max() == 0
    assert "PASS" in report.table()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_dump_then_verify_round_trips_with_zero_difference(tmp_path, suffix):
    model = tiny_model()
    path = dump(model, TOKENS, tmp_path / f"ref{suffix}", extra_meta={"prompt": "x"})
    arrays, meta = load_reference(path)
    assert meta["format"] == "llama_ref.activations" and meta["version"] == 1
    assert meta["qk_layout"] == "interleaved" and meta["prompt"] == "x" and meta["dtype"] == "float32"
    assert meta["args"]["n_layers"] == model.args.n_layers
    np.testing.assert_array_equal(arrays["tokens"], TOKENS)
    assert arrays["layers.1.attention.q"].shape == (len(TOKENS), model.args.n_heads, model.args.head_dim)
    report = verify(model, path)
    assert report.passed and all(t.max_abs == 0 for t in report.tensors)


def test_default_model_dump_then_verify_is_exact(default_model, tmp_path):
    tokens = default_model.tokenizer.encode("Hi")[:3]
    path = dump(default_model, tokens, tmp_path / "smollm2.npz", names=["layers.*.residual", "logits"])
    report = verify(default_model, path)
    assert report.passed and len(report.tensors) == default_model.args.n_layers + 1
    assert all(t.max_abs == 0 for t in report.tensors)


HF_ACTIVATIONS = Path(__file__).parent / "data" / "smollm2_hf_activations.safetensors"


def test_default_model_matches_hf_transformers_layer_by_layer(default_model):
    """Per-layer activations from transformers (tests/fixtures/make_hf_activations.py), v in HF's layout."""
    report = verify(default_model, HF_ACTIVATIONS)
    assert report.passed and not report.missing and not report.mismatched
    assert len(report.tensors) == 2 + 29 + 30 + 30  # embeddings, norm, residuals, v, ffn outputs
    assert report.max_rel < 1e-4  # float32 on both sides: measured 4.6e-6 (docs/verification.md)


def test_swapped_w1_w3_in_the_default_model_is_found_against_hf(default_model):
    weights = dict(default_model.weights)
    w1, w3 = "layers.10.feed_forward.w1.weight", "layers.10.feed_forward.w3.weight"
    weights[w1], weights[w3] = weights[w3], weights[w1]
    report = verify(Transformer(default_model.args, weights), HF_ACTIVATIONS)
    assert not report.passed and report.first_divergence.name == "layers.10.feed_forward.output"


# ---- injected errors: verify names the layer where each enters -----------------------------------------

def test_wrong_rope_pairing_is_found_at_layer_0_queries():
    model = tiny_model(n_layers=3)
    buggy = Transformer(model.args, model.weights, backend=backend_with(apply_rope=half_split_rope))
    report = verify(buggy, reference_of(model))
    assert not report.passed
    assert report.first_divergence.name == "layers.0.attention.q" and report.first_divergence.layer == 0
    # Position 0 has angle 0: the rotation is the identity there whatever the pairing.
    assert report.first_divergence.position_max_abs[0] == 0
    assert "layers.0.attention.q (layer 0)" in report.table()


def test_wrong_eps_is_found_at_the_first_norm():
    model = tiny_model(n_layers=3)
    buggy = Transformer(model.args.replace(norm_eps=model.args.norm_eps / 10), model.weights)
    report = verify(buggy, reference_of(model))
    assert not report.passed
    assert report.first_divergence.name == "layers.0.attention_norm"
    assert report.tensors[0].name == "embeddings" and report.tensors[0].max_abs == 0


@pytest.mark.parametrize("layer", [0, 2])
def test_swapped_w1_w3_is_found_in_the_layer_where_it_enters(layer):
    model = tiny_model(n_layers=3)
    weights = dict(model.weights)
    w1, w3 = f"layers.{layer}.feed_forward.w1.weight", f"layers.{layer}.feed_forward.w3.weight"
    weights[w1], weights[w3] = weights[w3], weights[w1]
    report = verify(Transformer(model.args, weights), reference_of(model))
    first = report.first_divergence
    assert first.name == f"layers.{layer}.feed_forward.gate" and first.layer == layer
    # Everything before it is exact; the jump is from nothing to something.
    before = report.tensors[:report.tensors.index(first)]
    assert before and all(t.max_abs == 0 for t in before) and np.isinf(first.jump)
    assert f"layer {layer}" in report.table()


def test_tolerance_decides_pass_or_fail():
    model = tiny_model()
    ref = reference_of(model)
    ref["logits"] = ref["logits"] * (1 + 1e-4)  # a small, known relative error
    assert verify(model, ref, tolerance=1e-3).passed
    failed = verify(model, ref, tolerance=1e-5)
    assert not failed.passed and failed.first_divergence.name == "logits"
    assert failed.first_divergence.rel == pytest.approx(1e-4, rel=1e-2)


# ---- comparison details --------------------------------------------------------------------------------

def test_half_split_reference_layout_is_understood():
    """A reference from an HF-style implementation stores q and k with RoPE halves split."""
    model = tiny_model()
    ref = reference_of(model)
    for name in [n for n in ref if n.endswith((".attention.q", ".attention.k"))]:
        T, n, hd = ref[name].shape
        ref[name] = ref[name].reshape(T, n, hd // 2, 2).swapaxes(-1, -2).reshape(T, n, hd)
    ours = run_and_capture(model, TOKENS)
    assert compare(ours, ref, qk_layout="half_split").passed
    assert verify(model, ref, qk_layout="half_split").passed
    assert compare(ours, ref).first_divergence.name == "layers.0.attention.q"


def test_batch_axis_and_flattened_heads_in_the_reference_are_matched():
    model = tiny_model()
    ref = reference_of(model)
    ref["layers.0.attention.q"] = ref["layers.0.attention.q"].reshape(len(TOKENS), -1)  # (T, H*HD)
    ref["logits"] = ref["logits"][None]  # (1, T, V)
    ref["layers.1.residual"] = ref["layers.1.residual"][:3]  # fewer positions: cannot be matched
    ref["something.else"] = np.zeros(3)
    report = compare(run_and_capture(model, TOKENS), ref)
    assert report.missing == ["something.else"]
    assert len(report.mismatched) == 1 and report.mismatched[0].startswith("layers.1.residual")
    assert not report.passed and "shape mismatch" in report.table()
    assert next(t for t in report.tensors if t.name == "logits").max_abs == 0


def test_logits_diff_reports_argmax_topk_and_kl():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((4, 50))
    ours = ref.copy()
    ours[2, np.argmax(ref[2])] -= 100  # position 2's favourite drops out of our top-k
    lg = logits_diff(ours, ref, k=5)
    assert lg.top1_agree.tolist() == [True, True, False, True]
    assert lg.topk_overlap[2] == pytest.approx(0.8) and lg.topk_overlap[[0, 1, 3]].min() == 1
    assert lg.kl[[0, 1, 3]].max() == 0 and lg.kl[2] > 0.01


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(2, 40), st.floats(-3, 3), st.integers(0, 2**31))
def test_kl_is_non_negative_and_shift_invariant(T, V, shift, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((T, V)) * 3, rng.standard_normal((T, V)) * 3
    assert logits_diff(a, b).kl.min() >= 0
    # Adding a constant to every logit leaves the distribution, and so the KL, unchanged.
    assert np.allclose(logits_diff(a + shift, b).kl, logits_diff(a, b).kl, atol=1e-9)
    assert logits_diff(b + shift, b).kl.max() < 1e-9


def test_nan_is_an_infinite_difference():
    model = tiny_model()
    ref = reference_of(model)
    ref["layers.1.attention.v"] = ref["layers.1.attention.v"].copy()
    ref["layers.1.attention.v"][2, 0, 0] = np.nan
    report = verify(model, ref)
    assert not report.passed and report.first_divergence.name == "layers.1.attention.v"
    assert np.isinf(report.first_divergence.rel) and report.first_divergence.worst_position == 2
    d = tensor_diff("x", np.array([[np.inf, 1.0]]), np.array([[np.inf, 1.0]]))
    assert d.max_abs == 0 and d.rel == 0


def test_tensor_diff_measures():
    ref = np.array([[1.0, -2.0], [4.0, 0.0]])
    ours = ref + np.array([[0.0, 0.5], [0.0, -1.0]])
    d = tensor_diff("x", ours, ref)
    assert (d.max_abs, d.mean_abs, d.rel, d.mean_rel) == (1.0, 0.375, 0.25, 0.375 / 1.75)
    assert d.position_max_abs.tolist() == [0.5, 1.0] and d.worst_position == 1


# ---- reference files -----------------------------------------------------------------------------------

def test_bf16_safetensors_reference_is_widened_exactly(tmp_path):
    values = np.array([[1.0, -2.5, 3.140625]], dtype=np.float32)  # exactly representable in bfloat16
    raw = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    header = json.dumps({"__metadata__": {"__metadata__": json.dumps({"qk_layout": "half_split"})},
                         "logits": {"dtype": "BF16", "shape": [1, 3], "data_offsets": [0, len(raw)]}}).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw)
    arrays, meta = load_reference(path)
    np.testing.assert_array_equal(arrays["logits"], values)
    assert meta == {"qk_layout": "half_split"}


def test_bad_reference_files_are_reported_by_name(tmp_path):
    with pytest.raises(ReferenceFileError, match=r"ref\.txt.*\.npz or \.safetensors"):
        load_reference(tmp_path / "ref.txt")
    with pytest.raises(ReferenceFileError, match="missing.npz: file not found"):
        load_reference(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ReferenceFileError, match="junk.npz: not a readable"):
        load_reference(tmp_path / "junk.npz")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05")
    with pytest.raises(ReferenceFileError, match="junk.safetensors: not a safetensors"):
        load_reference(tmp_path / "junk.safetensors")
    # Reference files go through the checkpoint reader's checks: here two tensors claim the same bytes.
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "overlap.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(ReferenceFileError, match="overlap.safetensors: not a safetensors.*overlaps"):
        load_reference(tmp_path / "overlap.safetensors")
    model = tiny_model()
    save_reference(tmp_path / "notokens.npz", {"logits": np.zeros((2, 64))})
    with pytest.raises(ReferenceFileError, match="no 'tokens'"):
        verify(model, tmp_path / "notokens.npz")
    save_reference(tmp_path / "foreign.npz", {"tokens": np.array([1, 2]), "model.layers.0.mlp": np.zeros(2)})
    with pytest.raises(ReferenceFileError, match="capture name"):
        verify(model, tmp_path / "foreign.npz")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    with pytest.raises(ReferenceFileError, match="'bad' has dtype object"):
        save_reference(tmp_path / "ref.npz", {"bad": np.array([object()])})

    def savez_then_fail(f, **arrays):
        f.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_reference(tmp_path / "ref.npz", {"tokens": np.arange(3)})
    assert list(tmp_path.iterdir()) == []


# ---- the command line ----------------------------------------------------------------------------------

@pytest.fixture
def tiny_cli(monkeypatch):
    """`llama-ref dump/verify` on a tiny model: the loader is replaced, the command is not."""
    model = tiny_model()
    buggy_weights = dict(model.weights)
    buggy_weights["layers.1.feed_forward.w1.weight"] = model.weights["layers.1.feed_forward.w3.weight"]
    models = {"tiny": model, "tiny-buggy": Transformer(model.args, buggy_weights)}
    monkeypatch.setattr("llama_ref.loading.load", lambda name, **kw: models[name])
    return models


def test_cli_dump_and_verify(tiny_cli, tmp_path, capsys):
    out = tmp_path / "ref.safetensors"
    assert main(["dump", "tiny", "--tokens", "1, 2,3", "-o", str(out)]) == 0
    assert load_reference(out)[0]["tokens"].tolist() == [1, 2, 3]
    assert main(["verify", "tiny", "--reference", str(out)]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["verify", "tiny-buggy", "--reference", str(out), "--all"]) == 1
    text = capsys.readouterr().out
    assert "FAIL: first difference past tolerance 0.001: layers.1.feed_forward.gate (layer 1)" in text
    assert "layers.0.attention.q " in text  # --all lists every tensor


def test_cli_errors_are_one_line_and_write_nothing(tiny_cli, tmp_path, capsys):
    assert main(["verify", "tiny", "--reference", str(tmp_path / "nope.npz")]) == 2
    assert "nope.npz: file not found" in capsys.readouterr().err
    assert main(["dump", "tiny", "--tokens", "1,x", "-o", str(tmp_path / "a.npz")]) == 2
    assert "--tokens must be comma-separated integers" in capsys.readouterr().err
    assert main(["dump", "tiny", "--tokens", "1,999", "-o", str(tmp_path / "a.npz")]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err
    assert main(["dump", "tiny", "--tokens", "1", "-o", str(tmp_path / "a.bin")]) == 2
    assert list(tmp_path.iterdir()) == []
