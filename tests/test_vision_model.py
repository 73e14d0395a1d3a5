"""Llama 3.2 Vision: image encoder, cross-attention and loaders, against Meta's reference and transformers' Mllama.

tests/data/tiny_ckpt/vision_{meta,meta_mp2,hf} hold one tiny random model in Meta's format (one and two
model-parallel shards) and Hugging Face's; vision_logits.npz the logits Meta's llama3.multimodal code and
transformers' MllamaForConditionalGeneration computed for it, with the tiles Meta's image transform made
(tests/fixtures/make_vision_checkpoint.py; neither library is needed here). Cases: one wide image (1x3 tiles)
after two text tokens, two images (3x1 and 2x2) with text between, two consecutive images (1x1 and 2x2), an
image as the first token, and a prompt without images. Each is run as one prompt pass and as pieces plus
one-token decode steps.

Meta and transformers differ in two places (llama_ref.vision.model): a token that sees no image (text before the
first image; with two or more images, generated tokens) skips the block in Meta's code and attends evenly to
every image token in transformers'; and transformers' generated tokens see what the last prompt token sees.
rule="meta" (default) reproduces Meta's logits, rule="hf" transformers'.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from llama_ref.errors import LlamaRefError
from llama_ref.model.config import ConfigError
from llama_ref.tools.capture import capture
from llama_ref.vision.config import (PRESETS, PUBLISHED_PARAMS, fusion_schedule, from_hf_config,
                                     from_params_json, param_count, preset)
from llama_ref.vision.model import VisionModel, image_spans
from llama_ref.vision.preprocess import ImageError, ImageTiles
from llama_ref.weights.common import WeightsError

DATA = Path(__file__).parent / "data" / "tiny_ckpt"
FORMATS = {"meta": DATA / "vision_meta", "meta_mp2": DATA / "vision_meta_mp2", "hf": DATA / "vision_hf"}
REF = np.load(Path(__file__).parent / "data" / "vision_logits.npz")
CASES = sorted({k.split("/")[0] for k in REF.files if "/" in k})
TOL = 1e-4


@pytest.fixture(scope="module")
def models():
    return {fmt: llama_ref.load(path) for fmt, path in FORMATS.items()}


def case_images(c):
    """The case's images as the tiles Meta's transform made (the model is checked apart from preprocessing)."""
    out = []
    for j in range(int(REF[f"{c}/n_images"])):
        tiles = REF[f"{c}/tiles{j}"]
        out.append(ImageTiles(tiles=tiles, aspect_ratio=tuple(int(a) for a in REF[f"{c}/ar{j}"]), aspect_ratio_id=0,
                              num_tiles=len(tiles), max_num_chunks=4, resized=(0, 0)))
    return out


def run(model, c, rule="meta", steps=False):
    """Logits of case c: the prompt in one pass, or its pieces and then one-token decode steps."""
    tokens, P = REF[f"{c}/tokens"], int(REF[f"{c}/prompt_len"])
    model.attach_images(case_images(c), tokens[:P], rule=rule)
    if not steps:
        return model.forward(tokens[:P], 0)
    spans = [tuple(p) for p in REF[f"{c}/pieces"]] + [(t, t + 1) for t in range(P, len(tokens))]
    return np.concatenate([model.forward(tokens[a:b], a) for a, b in spans])


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("c", CASES)
def test_logits_match_meta_reference(models, fmt, c):
    full, steps = run(models[fmt], c), run(models[fmt], c, steps=True)
    assert np.abs(full - REF[f"{c}/meta_full"]).max() < TOL
    assert np.abs(steps - REF[f"{c}/meta_steps"]).max() < TOL


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("c", CASES)
def test_logits_match_transformers_with_its_rule(models, fmt, c):
    full, steps = run(models[fmt], c, "hf"), run(models[fmt], c, "hf", steps=True)
    assert np.abs(full - REF[f"{c}/hf_full"]).max() < TOL
    assert np.abs(steps - REF[f"{c}/hf_steps"]).max() < TOL


def test_the_two_rules_differ_where_the_references_do(models):
    m = models["meta"]
    # A token before the first image: Meta skips the block, transformers attends evenly to all image tokens.
    assert np.abs(REF["one_wide/meta_full"] - REF["one_wide/hf_full"]).max() > 0.1
    assert np.abs(run(m, "one_wide") - run(m, "one_wide", "hf")).max() > 0.1
    # Image first: no text row lacks an image, so one image agrees everywhere, prompt and decode.
    assert np.abs(run(m, "image_first", steps=True) - run(m, "image_first", "hf", steps=True)).max() < 1e-6
    # transformers 5.24 as installed takes each vision layer's output as the intermediate feature (Meta: its
    # input); the fixture records that too, and it is far from both.
    assert np.abs(REF["image_first/hf_asis_full"] - REF["image_first/meta_full"]).max() > 0.1


@pytest.mark.parametrize("c", CASES)
def test_meta_and_hf_copies_give_identical_logits(models, c):
    ref = run(models["meta"], c, steps=True)
    for fmt in ("meta_mp2", "hf"):
        np.testing.assert_array_equal(run(models[fmt], c, steps=True), ref)


@pytest.mark.slow  # compiling the kernels: ~3 s on 2 cores
def test_numba_backend_agrees_with_numpy(models):
    fast = llama_ref.load(FORMATS["meta"], backend="numba")
    for c in ("two", "consecutive"):
        ours = run(fast, c, steps=True)
        assert np.abs(ours - run(models["meta"], c, steps=True)).max() < 1e-5
        assert np.abs(ours - REF[f"{c}/meta_steps"]).max() < TOL


def test_every_gate_changes_the_logits(models):
    """The fixture's gates are all non-zero and each one matters (else a test could pass with it ignored)."""
    m = models["meta"]
    base = run(m, "two")
    gates = [n for n in m.weights if n.endswith(("gate", "gate_attn", "gate_ffn", "gate_ffwd"))]
    assert len(gates) == 2 * 2 + 2 * 2 + 3  # cross blocks, global layers, positional + 2 tile embeddings
    for name in gates:
        saved = m.weights[name]
        m.weights[name] = np.zeros_like(saved)
        try:
            changed = np.abs(run(m, "two") - base).max()
        finally:
            m.weights[name] = saved
        assert changed > 1e-3, name


def test_images_are_encoded_once_per_prompt_and_their_keys_once_per_cache(models, monkeypatch):
    from llama_ref.vision import model as vm
    m = models["meta"]
    calls = []
    real = vm.encode_image
    monkeypatch.setattr(vm, "encode_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    run(m, "two", steps=True)
    assert len(calls) == 2  # two images, one prompt: pieces and decode steps reuse them
    assert m.cache.images[0] is m.images and len(m.cache.images[1]) == 2  # K/V of both cross layers, held


def test_fusion_schedule_is_metas():
    assert fusion_schedule(32, 8) == (3, 7, 11, 15, 19, 23, 27, 31)  # 11B: HF's flat 3, 8, ..., 38
    assert fusion_schedule(80, 20)[:3] == (3, 7, 11) and fusion_schedule(80, 20)[-1] == 79
    assert fusion_schedule(4, 2) == (1, 3)


def test_image_spans_follow_create_vision_mask():
    IMG = 9
    assert image_spans([1, IMG, 2, 3], IMG) == [[1, -1]]
    assert image_spans([1, IMG, 2, IMG, 3], IMG) == [[1, 3], [3, 5]]
    assert image_spans([IMG, IMG, 2, 3], IMG) == [[0, 4], [1, 4]]  # consecutive images share the text after them


@pytest.mark.parametrize("name", PRESETS)
def test_presets_read_and_count(name):
    text, vision = preset(name)
    assert vision.cross_layers == fusion_schedule(text.n_layers, 8 if "11b" in name else 20)
    assert vision.output_dim == 7680 and vision.tokens_per_tile == (vision.chunk_size // 14) ** 2 + 1
    if name in PUBLISHED_PARAMS:
        assert round(param_count(text, vision) / 1e9, 1) == PUBLISHED_PARAMS[name] / 1e9


def test_11b_bf16_weights_size():
    text, vision = preset("llama-3.2-11b-vision-instruct")
    assert param_count(text, vision) * 2 == 21_258_368_070  # bytes in bfloat16: 19.8 GiB


def test_hf_config_reads_like_params_json():
    t1, v1 = from_params_json(FORMATS["meta"] / "params.json")
    t2, v2 = from_hf_config(FORMATS["hf"] / "config.json")
    assert v1 == v2
    assert (t1.dim, t1.n_layers, t1.n_heads, t1.kv_heads, t1.vocab_size, t1.ffn_hidden_dim, t1.rope_theta) == \
        (t2.dim, t2.n_layers, t2.n_heads, t2.kv_heads, t2.vocab_size, t2.ffn_hidden_dim, t2.rope_theta)


# ---- capture names -------------------------------------------------------------------------------------------

def test_capture_records_the_vision_intermediates(models):
    m = models["meta"]
    with capture(m) as acts:
        run(m, "two")
    for j in range(2):
        for name in ("patch_embeddings", "embeddings", "layers.3", "global_layers.1", "features", "projection"):
            assert f"vision.{j}.{name}" in acts, f"vision.{j}.{name}"
    assert acts["vision.1.projection"].shape == (1, 4, 5, 32)  # 4 tile slots, 5 tokens, text width
    assert acts["vision.0.features"].shape == (1, 4, 5, 48)  # last layer + 2 interleaved intermediates
    for k in range(2):
        assert f"cross_attention_layers.{k}.attention.heads" in acts
        assert f"cross_attention_layers.{k}.residual" in acts


# ---- errors ---------------------------------------------------------------------------------------------------

def test_image_given_to_a_text_only_model_is_refused():
    text_model = llama_ref.load(DATA / "llama31_bf16_meta")
    with pytest.raises(LlamaRefError, match="text-only"):
        text_model.generate([1, 2, 3], 2, images=[np.zeros((8, 8, 3), np.uint8)])


def test_image_count_must_match_the_image_tokens(models):
    m = models["meta"]
    tokens = list(REF["two/tokens"][: int(REF["two/prompt_len"])])
    with pytest.raises(ImageError, match="1 given for 2 <|image|> tokens"):
        m.attach_images(case_images("two")[:1], tokens)
    with pytest.raises(ImageError, match="0 given for 2"):
        m.generate(tokens, 1)


def test_too_many_images_are_refused(models):
    m = models["meta"]
    n = m.max_images + 1
    with pytest.raises(ImageError, match=f"{n} images given, the model takes at most {m.max_images}"):
        m.attach_images([np.zeros((8, 8, 3), np.uint8)] * n, [1] + [m.vision.image_token_id] * n)


def test_unreadable_image_names_the_file(models, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    m = models["meta"]
    with pytest.raises(ImageError, match="broken.png"):
        m.generate([1, m.vision.image_token_id], 1, images=[str(bad)])


def test_generate_with_an_image_array(models):
    """An uint8 picture goes through llama_ref.vision.preprocess; its greedy token is Meta's."""
    m = models["meta"]
    tokens, P = REF["one_wide/tokens"], int(REF["one_wide/prompt_len"])
    out = m.generate(list(tokens[:P]), 1, images=[REF["one_wide/image0"]], stop_ids=[])
    assert list(out.ids)[-1] == int(np.argmax(REF["one_wide/meta_full"][-1]))


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_unknown_encoder_key_is_refused(tmp_path):
    d = _copy(FORMATS["meta"], tmp_path)
    p = json.loads((d / "params.json").read_text())
    p["vision_encoder"]["dilation"] = 2
    (d / "params.json").write_text(json.dumps(p))
    with pytest.raises(ConfigError, match="vision_encoder.dilation"):
        llama_ref.load(d)


def test_hf_config_with_other_aspect_ratios_is_refused(tmp_path):
    d = _copy(FORMATS["hf"], tmp_path)
    c = json.loads((d / "config.json").read_text())
    c["vision_config"]["supported_aspect_ratios"] = [[1, 1], [2, 2]]
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(ConfigError, match="supported_aspect_ratios"):
        llama_ref.load(d)


def test_vision_config_that_contradicts_the_weights_is_refused(tmp_path):
    d = _copy(FORMATS["meta"], tmp_path)
    p = json.loads((d / "params.json").read_text())
    p["vision_encoder"]["layers"] = 5
    (d / "params.json").write_text(json.dumps(p))
    with pytest.raises(WeightsError, match="5 vision transformer layers"):
        llama_ref.load(d)


def test_missing_shard_tensor_is_refused(tmp_path):
    d = _copy(FORMATS["meta_mp2"], tmp_path)
    (d / "consolidated.01.pth").unlink()
    with pytest.raises(WeightsError):
        llama_ref.load(d)


def test_unimplemented_load_options_are_refused():
    with pytest.raises(WeightsError, match="quantize is not implemented"):
        llama_ref.load(FORMATS["meta"], quantize="int8")


def test_vision_model_class():
    assert isinstance(llama_ref.load(FORMATS["hf"]), VisionModel)


# ---- command line -------------------------------------------------------------------------------------------

def test_cli_image_errors(capsys):
    from llama_ref.tools.cli import main
    assert main(["generate", "--model", str(FORMATS["meta"]), "hi", "--image", "/no/such/picture.png"]) != 0
    assert "--image /no/such/picture.png: no such file" in capsys.readouterr().err
    picture = Path(__file__).parent / "data" / "vision" / "images" / "coffee.jpg"
    assert main(["generate", "--model", str(DATA / "llama31_bf16_meta"), "hi", "--image", str(picture),
                 "--quiet"]) != 0
    assert "text-only model" in capsys.readouterr().err


class TinyTokenizer:
    """A stand-in Llama 3 tokenizer for the 128-token test model: one id per character, Meta's specials low."""
    special_tokens = {"<|begin_of_text|>": 1, "<|end_of_text|>": 2, "<|start_header_id|>": 3,
                      "<|end_header_id|>": 4, "<|eot_id|>": 5, "<|eom_id|>": 6, "<|python_tag|>": 7, "<|image|>": 9}
    stop_ids = (5,)
    chat_template = None
    bos_id = 1

    def encode(self, text, bos=False, allow_special=False):
        return ([1] if bos else []) + [16 + ord(c) % 100 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def stream_decoder(self):
        class D:
            def push(self, token):
                return chr(token)

            def flush(self):
                return ""
        return D()


def test_chat_with_an_image_part_is_metas_prompt(models):
    """model.chat builds Meta's vision chat prompt (llama_ref.text.chat), attaches the image at its
    <|image|> token and gives the logits of the same ids and image fed by hand."""
    m = llama_ref.load(FORMATS["meta"])
    m.tokenizer = TinyTokenizer()
    picture = REF["one_wide/image0"]
    messages = [{"role": "user", "content": [{"type": "image", "image": picture}, {"type": "text", "text": "hi"}]}]
    out = m.chat(messages, max_new_tokens=2, stop_ids=[])
    ids = [1, 3] + m.tokenizer.encode("user") + [4] + m.tokenizer.encode("\n\n") + [m.vision.image_token_id] + \
        m.tokenizer.encode("hi") + [5, 3] + m.tokenizer.encode("assistant") + [4] + m.tokenizer.encode("\n\n")
    assert list(out.prompt_ids) == ids
    m.attach_images([picture], ids)
    first = int(np.argmax(m.forward(ids, 0)[-1]))
    assert out.ids[0] == first


def test_text_prompt_places_the_images():
    m = llama_ref.load(FORMATS["meta"])
    m.tokenizer = TinyTokenizer()
    IMG, enc = m.vision.image_token_id, m.tokenizer.encode
    assert m.prompt_ids("ab<|image|>c", ["x"]) == [1] + enc("ab") + [IMG] + enc("c")
    assert m.prompt_ids("abc", ["x", "y"]) == [1, IMG, IMG] + enc("abc")  # no marker: the images lead
    out = m.generate("abc", 2, images=[REF["two/image0"], REF["two/image1"]], stop_ids=[])
    assert list(out.prompt_ids) == [1, IMG, IMG] + enc("abc") and len(out.ids) == 2


def test_a_tensor_whose_strides_multiply_past_the_element_cap_loads(tmp_path):
    """Strides are offsets: the product of (1, 2, 512, 1024)'s strides is 2^49, yet the tensor has 1M elements
    (the 11B's (4, 4, 1601, 1280) positional embedding was refused as 'impossibly large' before)."""
    from llama_ref.weights.torch_zip import read_torch_file
    from llama_ref.weights.writers import write_torch_file
    x = np.arange(2 * 512 * 1024, dtype=np.uint16).reshape(1, 2, 512, 1024)
    write_torch_file(tmp_path / "t.pth", [("w", x, "bf16")])
    t = read_torch_file(tmp_path / "t.pth")["w"]
    assert t.shape == (1, 2, 512, 1024)
    np.testing.assert_array_equal(t.read(), x)


def test_verify_compares_the_vision_path(models, tmp_path):
    """tools.verify: a dump of the Meta copy with images, checked against the HF copy given the same images."""
    from llama_ref.tools.verify import dump, verify
    tokens = REF["two/tokens"][: int(REF["two/prompt_len"])]
    models["meta"].attach_images(case_images("two"), tokens)
    ref = dump(models["meta"], tokens, tmp_path / "ref.safetensors")
    models["hf"].attach_images(case_images("two"), tokens)
    report = verify(models["hf"], ref)
    assert report.passed
    assert {"vision.1.projection", "cross_attention_layers.1.residual"} <= {d.name for d in report.tensors}


def test_gelu_kernel_is_the_numpy_twin():
    from llama_ref.kernels.vision import gelu as fast
    from llama_ref.vision.encoder import gelu
    x = np.concatenate([np.linspace(-12, 12, 40001), [0.0, -0.0, 1e-30, -40, 40]]).astype(np.float32)
    np.testing.assert_array_equal(fast(x), gelu(x))  # the same libm erf in float64, rounded once
    big = np.random.default_rng(0).standard_normal((3, 40000)).astype(np.float32)  # the parallel loop
    np.testing.assert_array_equal(fast(big), gelu(big))
    assert fast(x.astype(np.float64)).dtype == np.float64


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_attend_all_is_unmasked_attention_in_blocks(backend, monkeypatch):
    """attend_all (every query sees every visible key) over several query blocks, against softmax by hand."""
    from llama_ref.model import ops
    from llama_ref.vision.encoder import attend_all
    k_ops = ops if backend == "numpy" else __import__("llama_ref.kernels", fromlist=["attention"])
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 150, 4, 8)).astype(np.float32)
    k, v = (rng.standard_normal((1, 100, 2, 8)).astype(np.float32) for _ in range(2))
    mask = rng.random((1, 100)) < 0.7
    out = attend_all(k_ops, q, k, v, mask)
    if backend == "numba":
        from llama_ref.kernels import vision as kv
        monkeypatch.setattr(kv, "QUERY_BLOCK", 64)  # several blocks
        assert np.abs(kv.bidirectional_attention(q, k, v, mask) - out).max() < 1e-6  # the BLAS twin
    kk = np.repeat(k, 2, axis=2)[0]  # (S, H, HD): query head h reads KV head h // 2
    vv = np.repeat(v, 2, axis=2)[0]
    scores = np.einsum("thd,shd->hts", q[0].astype(np.float64), kk) / np.sqrt(8)
    scores[:, :, ~mask[0]] = -np.inf
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), vv)
    assert np.abs(out[0] - want).max() < 1e-5


def test_param_count_is_the_tensors_of_the_checkpoint():
    from llama_ref.weights.mllama import load_mllama
    text, vision, weights, _ = load_mllama(FORMATS["meta"], "meta", keep="float32")
    assert param_count(text, vision) == sum(w.size for w in weights.values()) == 114_859


def test_info_describes_a_vision_checkpoint():
    from llama_ref.tools.info import describe
    report = describe(FORMATS["hf"])
    assert "Llama 3.2 Vision" in report and "114,859" in report
    assert "cross-attention before text layers [1, 3]" in report


def test_text_only_tools_name_a_vision_checkpoint():
    from llama_ref.weights.directory import load_directory
    with pytest.raises(WeightsError, match="a Llama 3.2 Vision checkpoint"):
        load_directory(FORMATS["meta"])


def test_float64_runs_the_same_path():
    m = llama_ref.load(FORMATS["hf"], dtype=np.float64)
    out = run(m, "two", steps=True)
    assert out.dtype == np.float64 and np.abs(out - REF["two/meta_steps"]).max() < TOL
