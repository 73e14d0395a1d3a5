"""ggml mode's KV cache as llama.cpp's F16 cache (issue 14): each position's keys and values rounded to fp16 once,
when stored, kept head-major (KVCache(fp16=True), F16Values), and read by attention as they lie.

Rounding is idempotent, so a model computes the same bits with it as with a plain float32 cache, which the
attention rounds and transposes at every call: the logits are compared bit for bit (NumPy specification and
Numba kernels; prefill, chunked prefill, decode steps, a rewind, growth, a padded batch, a batch's rows
dropped), and the server's batching paths run on a ggml-mode model.
"""

from __future__ import annotations

import numpy as np
import pytest

import llama_ref
from llama_ref.kernels import ggml_ops
from llama_ref.model import ggml
from llama_ref.model.cache import KVCache
from llama_ref.model.ggml import F16Values, fp16
from llama_ref.model.transformer import Transformer
from llama_ref.weights.packed import quantize_weights
from tiny import random_weights, tiny_args

# head sizes 8 (G = 2) and 32 (G = 3: rows of three query heads), both a multiple of 8: the Numba kernel's path
SHAPES = [dict(), dict(dim=192, n_heads=6, n_kv_heads=2)]


def ggml_model(backend: str, shape: dict, seed: int = 3) -> Transformer:
    args = tiny_args(**shape)
    weights = quantize_weights(random_weights(args, seed=seed, scale=1.0), "q8_0")
    return Transformer(args, weights, backend=ggml.backend_for(backend, weights, "tiny"))


def run_steps(model: Transformer, cache: KVCache) -> list[np.ndarray]:
    """Prefill, a chunked prefill, decode steps, a rewind over the last three positions, decode again."""
    out = [model.forward(np.array([1, 5, 9, 2, 7]), 0, cache=cache)]
    out.append(model.forward(np.array([4, 4, 8, 3]), 5, cache=cache))  # a second chunk
    for i, t in enumerate([6, 11, 13, 2, 9]):
        out.append(model.forward(np.array([t]), 9 + i, cache=cache))
    out.append(model.forward(np.array([10, 12, 1]), 11, cache=cache))  # rewind: positions 11.. again
    for i, t in enumerate([3, 5, 7]):
        out.append(model.forward(np.array([t]), 14 + i, cache=cache))
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_fp16_cache_logits_equal_a_plain_cache_bit_for_bit(backend, shape):
    model = ggml_model(backend, shape)
    plain = KVCache(model.args, 1, np.float32, capacity=4)
    f16 = KVCache(model.args, 1, np.float32, capacity=4, fp16=True)  # small: it grows on the way
    for a, b in zip(run_steps(model, plain), run_steps(model, f16)):
        assert np.array_equal(a, b)
    assert f16.capacity == plain.capacity > 4 and f16.length == plain.length == 17
    assert f16.nbytes == plain.nbytes
    for layer in range(model.args.n_layers):
        for ours, theirs in ((f16.k[layer], plain.k[layer]), (f16.v[layer], plain.v[layer])):
            assert isinstance(ours, F16Values) and ours.shape == theirs.shape
            assert np.array_equal(ours[:, :17], fp16(theirs[:, :17]))  # stored rounded
            assert ours.transpose(0, 2, 1, 3).view(np.ndarray)[0, 0].flags.c_contiguous  # head-major rows


def test_the_numba_kernel_reads_the_store_without_copying_it():
    model = ggml_model("numba", SHAPES[1])
    cache = KVCache(model.args, 1, np.float32, fp16=True)
    model.forward(np.array([1, 2, 3]), 0, cache=cache)
    keys, values = cache.update(0, 3, np.ones((1, 1, 2, 32), np.float32), np.ones((1, 1, 2, 32), np.float32))
    assert np.shares_memory(ggml_ops._f16_heads(keys), cache.k[0])
    assert np.shares_memory(ggml_ops._f16_heads(values), cache.v[0])
    store = ggml_ops._f16_heads(keys)
    assert store.flags.c_contiguous and store.shape == (1, 2, cache.capacity, 32)  # the whole store: n > S rows
    for other in (np.array(keys.view(np.ndarray)), keys[:, 1:]):  # a plain copy; a view (no .heads): rounded here
        heads = ggml_ops._f16_heads(other)
        assert not np.shares_memory(heads, cache.k[0]) and heads.shape == (1, 2, other.shape[1], 32)
        assert np.array_equal(heads, store[:, :, 4 - other.shape[1]:4])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_padded_batch_and_dropped_rows_equal_a_plain_cache(backend):
    """A batch with a key mask (the specification's path), then its first row dropped as generation does
    (k[layer] replaced by a copy of some rows: update() lays it out head-major again)."""
    from llama_ref.generation.generate import _keep_rows

    model = ggml_model(backend, SHAPES[0])
    tokens = np.array([[0, 0, 3, 5, 8], [1, 2, 3, 4, 5], [0, 7, 7, 1, 2]])
    mask = tokens != 0
    logits = []
    for fp16_cache in (False, True):
        cache = KVCache(model.args, 3, np.float32, capacity=8, fp16=fp16_cache)
        out = [model.forward(tokens, 0, cache=cache, key_mask=mask)]
        step = np.concatenate([mask, np.ones((3, 1), bool)], axis=1)  # (B, S): the new position is seen
        out.append(model.forward(np.array([[4], [6], [9]]), 5, cache=cache, key_mask=step))
        _keep_rows(cache, [1, 2])
        for i, t in enumerate([3, 11, 2]):  # grows past 8, from the replaced layout
            m = np.concatenate([mask[1:], np.ones((2, 2 + i), bool)], axis=1)
            out.append(model.forward(np.array([[t], [t + 1]]), 6 + i, cache=cache, key_mask=m))
        out.append(model.forward(np.array([[5], [6]]), 9, cache=cache))  # no mask: the compiled kernel's path
        logits.append(out)
        if fp16_cache:
            assert all(cache._head_major(a) for a in cache.k + cache.v)
    for a, b in zip(*logits):
        assert np.array_equal(a, b)


def test_f16_values_round_what_is_written_and_drop_the_mark_when_computed_on():
    a = np.zeros((2, 3), np.float32).view(F16Values)
    x = np.float32([[0.1, 1 / 3, 70000.0]])
    a[0] = x
    assert np.array_equal(a[0], fp16(x)[0]) and a[0, 2] == np.inf  # past 65504: inf, as ggml's conversion
    view = a[:, :2].T
    assert isinstance(view, F16Values) and isinstance(a.copy(), F16Values)
    view[1, 1] = 0.1  # through a view: rounded too
    assert a[1, 1] == fp16(np.float32(0.1))
    for result in (a * 3, a + np.float32(0.001), np.sqrt(a), a[:, :2] @ np.ones((2, 2), np.float32)):
        assert type(result) is np.ndarray  # arithmetic's results are no longer fp16 values
    b = np.zeros((2, 3), np.float32).view(F16Values)
    np.add(b, np.float32(0.1), out=b)  # a ufunc writing into one rounds it
    assert isinstance(b, F16Values) and np.all(b == fp16(np.float32(0.1)))
    b *= np.float32(1 / 3)
    assert isinstance(b, F16Values) and np.all(b == fp16(fp16(np.float32(0.1)) * np.float32(1 / 3)))
    assert np.array_equal(ggml.f16_values(np.float32([0.1])), fp16(np.float32([0.1])))


def test_for_model_gives_ggml_mode_the_fp16_cache():
    model = ggml_model("numpy", SHAPES[0])
    assert not KVCache.for_model(model).fp16  # Transformer.arithmetic: "exact"
    model.arithmetic = "ggml"
    cache = KVCache.for_model(model, 2, capacity=5)
    assert cache.fp16 and cache.batch_size == 2 and cache.capacity == 5 and isinstance(cache.k[0], F16Values)
    model.forward(np.array([1, 2]))
    assert model.cache.fp16
    with pytest.raises(llama_ref.errors.InputError, match="float32"):
        KVCache(model.args, 1, np.float64, fp16=True)


# ---- generation and the server's batching on a ggml-mode model ------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ggml(tmp_path_factory):
    from test_cli import write_tiny_gguf

    path = write_tiny_gguf(tmp_path_factory.mktemp("ggml_cache") / "tiny.gguf", context_length=1024)
    return llama_ref.load(path, arithmetic="ggml", backend="numba")


def test_generation_in_ggml_mode_equals_a_plain_cache(tiny_ggml, monkeypatch):
    ids = tiny_ggml.tokenizer.encode("the theme of the")
    ours = tiny_ggml.generate(ids, max_new_tokens=12, stop_ids=[])
    assert tiny_ggml.cache.fp16
    chained = tiny_ggml.generate(ids + ours.ids[:5], max_new_tokens=7, stop_ids=[])  # reuses the kept cache
    assert chained.ids == ours.ids[5:]
    monkeypatch.setattr(tiny_ggml, "arithmetic", "exact")  # the same ggml backend, a plain float32 cache
    tiny_ggml.reset()
    theirs = tiny_ggml.generate(ids, max_new_tokens=12, stop_ids=[])
    assert not tiny_ggml.cache.fp16
    assert ours.ids == theirs.ids and ours.logprobs == theirs.logprobs


def test_server_batching_in_ggml_mode(tiny_ggml):
    """test_server's batching paths on a ggml-mode model (fp16 caches): rows joining a running batch (caches
    stacked), padding rows dropped, a kept prefix resumed at another position (its keys rotated and rounded
    as they are stored); each answer equals the prompt's answer alone."""
    pytest.importorskip("httpx")
    pytest.importorskip("openai")
    import test_server

    test_server.test_batcher_joins_rows_mid_batch_both_ways(tiny_ggml)
    test_server.test_batcher_resumes_a_conversation_inside_a_running_batch(tiny_ggml)
