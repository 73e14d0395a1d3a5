"""kernels/ggml_step.py: the dense layers of a one-token step in one compiled call (kernels/ggml.py's decode_layers)
gives the forward pass's per-op lines' logits and cache, bit for bit, in every integer format, on one thread and
two, with its regions forced onto the calling thread or into parallel loops; it declines (None) where it must,
and the lines then give the answer."""

from __future__ import annotations

import copy

import numba
import numpy as np
import pytest

from llama_ref.model import ggml
from llama_ref.model.transformer import Transformer
from test_ggml_kernels import TYPES as LEGACY
from test_ggml_kquants import TYPES as KQUANTS, random_kquant
from tiny import random_weights, tiny_args

MATRICES = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w3",
            "feed_forward.w2")
# A Q4_K_M file's mix (wv and w2 in Q6_K), and legacy and K-quant products in one group (Q8_0 / Q8_1 and Q8_K
# activations of one x).
Q4_K_M = ("q4_k", "q4_k", "q6_k", "q4_k", "q4_k", "q4_k", "q6_k")
MIXED = ("q4_k", "q8_0", "q5_1", "q4_0", "q5_k", "q4_1", "q5_0")


def step():
    from llama_ref.kernels import ggml_step
    return ggml_step


def kernels():
    from llama_ref.kernels import ggml as kernels_ggml
    return kernels_ggml


def model_in(formats, seed=0, floats=()):
    """A 2-layer model of dim 256 (head size 64, 4 query and 2 KV heads, FFN 256) whose layers' 7 matrices are in
    formats (one format for all, or one per matrix in MATRICES' order); the layers in floats keep float32 ones."""
    args = tiny_args(dim=256, n_heads=4, n_kv_heads=2, hidden_dim=256, vocab_size=64)
    weights = random_weights(args, seed)
    if isinstance(formats, str):
        formats = (formats,) * len(MATRICES)
    for i in range(args.n_layers):
        if i in floats:
            continue
        for j, (name, fmt) in enumerate(zip(MATRICES, formats)):
            key = f"layers.{i}.{name}.weight"
            rows, cols = weights[key].shape
            if fmt in KQUANTS:  # random blocks (no K-quant quantizer here)
                weights[key] = random_kquant(KQUANTS[fmt], rows, cols, seed + 10 * i + j)
            else:
                weights[key] = LEGACY[fmt].quantize(weights[key])
    return Transformer(args, weights, backend=ggml.backend_for("numba", weights, "tiny"))


def decode(model, tokens, steps=4):
    """Logits of a prefill of tokens (B, T), then of `steps` one-token steps, then of a step that rewinds one
    position (a regenerated token), concatenated along positions; and the cache's keys and values."""
    B, T = tokens.shape
    out = [model.forward(tokens)]
    for s in range(steps):
        out.append(model.forward(np.full((B, 1), 7 + 3 * s), start_pos=T + s))
    out.append(model.forward(np.full((B, 1), 5), start_pos=T + steps - 1))
    n = model.cache.length
    return np.concatenate(out, axis=1), [a[:, :n].copy() for a in model.cache.k + model.cache.v]


class Hook:
    """kernels.ggml.decode_layers, counting the layers it computed, the calls that computed them and the layers
    it declined; off: always None."""

    def __init__(self, on=True):
        self.real, self.on, self.done, self.calls, self.declined = step().decode_layers, on, 0, 0, 0

    def __call__(self, model, i, *a):
        if not self.on:
            return None
        out = self.real(model, i, *a)
        if out is not None:
            assert i < out[1] <= model.args.n_layers
            self.done += out[1] - i
            self.calls += 1
        self.declined += out is None
        return out


def same(a, b) -> bool:
    return a[0].dtype == b[0].dtype and np.array_equal(a[0], b[0]) and len(a[1]) == len(b[1]) \
        and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))


def check(model, tokens, monkeypatch, configs):
    """The fused layer's logits and cache equal the lines' in each (threads, forced, twin) of configs: forced
    "serial" every region on the calling thread, "parallel" every one a parallel loop; twin "parallel" runs the
    parallel twin at one thread too."""
    mod = step()
    lines = Hook(on=False)
    monkeypatch.setattr(kernels(), "decode_layers", lines)
    expected = decode(model, tokens)
    assert np.isfinite(expected[0]).all()
    before = numba.get_num_threads()
    serial_twin = mod._layers_serial
    try:
        for threads, forced, twin in configs:
            numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
            limit = 1 << 62 if forced == "serial" else 0
            monkeypatch.setattr(mod, "SERIAL_WEIGHTS", limit)
            monkeypatch.setattr(mod, "SERIAL_WORK", limit)
            monkeypatch.setattr(mod, "_layers_serial", mod._layers_parallel if twin == "parallel" else serial_twin)
            hook = Hook()
            monkeypatch.setattr(kernels(), "decode_layers", hook)
            got = decode(model, tokens)
            assert hook.done == 5 * model.args.n_layers and hook.declined == 0  # every decode layer fused
            assert hook.calls == 5  # all of a step's layers in one call
            assert same(got, expected), (threads, forced, twin)
    finally:
        numba.set_num_threads(before)


ALL = [(1, "serial", "serial"), (1, "parallel", "parallel"), (2, "serial", "serial"), (2, "parallel", "serial")]
TOKENS = np.array([[3, 1, 4, 1, 5]])


def test_q8_0_and_q4_k_m_equal_the_lines(monkeypatch):
    """The fast twin of the slow test below: two formats, a configuration each."""
    check(model_in("q8_0"), TOKENS, monkeypatch, [(1, "serial", "serial")])
    check(model_in(Q4_K_M), TOKENS, monkeypatch, [(2, "parallel", "serial")])


@pytest.mark.slow
@pytest.mark.parametrize("formats", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", Q4_K_M, MIXED])
def test_every_format_equals_the_lines(formats, monkeypatch):
    check(model_in(formats, seed=1), TOKENS, monkeypatch, ALL)


def test_more_shares_than_threads_ends_and_equals_the_lines(monkeypatch):
    """The one-region step split in more shares than Numba runs threads (3 and 5 on CI's one thread a worker, or on
    two in test_two_threads' child): prange then runs some shares' loops one after another on one thread, which find
    every chunk claimed and done by the loops before. A thread waits only on chunks that another is computing, so
    the step ends (a watchdog ends the process if it does not), and its logits and cache are the lines'."""
    import faulthandler
    import types

    mod = step()
    model = model_in(MIXED)
    monkeypatch.setattr(kernels(), "decode_layers", Hook(on=False))
    expected = decode(model, TOKENS)
    faulthandler.dump_traceback_later(600, exit=True)
    try:
        for claimed in (3, 5):
            monkeypatch.setattr(mod, "numba", types.SimpleNamespace(get_num_threads=lambda: claimed))
            hook = Hook()
            monkeypatch.setattr(kernels(), "decode_layers", hook)
            assert same(decode(model, TOKENS), expected), claimed
            assert hook.done == 5 * model.args.n_layers and hook.calls == 5
    finally:
        faulthandler.cancel_dump_traceback_later()


def test_declines_float_matrices_and_batches(monkeypatch):
    """A layer with F32 matrices and a batch of 2 go to the lines (None), and the answers are the lines'."""
    mod = step()

    def lines_then_hook(model, tokens):
        """decode() by the lines, then with the hook counting: (whether they agree, the hook)."""
        monkeypatch.setattr(kernels(), "decode_layers", Hook(on=False))
        expected = decode(model, tokens)
        hook = Hook()
        monkeypatch.setattr(kernels(), "decode_layers", hook)
        return same(decode(model, tokens), expected), hook

    for floats in (0,), (1,):  # that layer in float32: declined; the other fused (a run stops before it)
        agree, hook = lines_then_hook(model_in("q8_0", floats=floats), TOKENS)
        assert agree and hook.done == 5 and hook.declined == 5

    model = model_in("q4_0")
    agree, hook = lines_then_hook(model, np.array([[3, 1, 4, 1, 5], [2, 7, 1, 8, 2]]))
    assert agree and hook.done == 0 and hook.declined == 10
    assert mod.decode_layers(model, 0, np.zeros((1, 1, 256), np.float64), 0, model.cache, *model.ops.rope_tables(
        model.freqs, 0, 1, np.float32)) is None  # float64 activations


def test_the_cache_holds_fp16_values_and_the_step_reads_it_only_then(monkeypatch):
    """arithmetic="ggml" stores keys and values rounded to fp16 (llama.cpp's F16 cache; Transformer.new_cache) in
    float16 arrays, in both backends, and an exact model's cache stores them as computed, in float32. The step reads
    the cache's older positions as they are, so a cache that is not float16 (its values as computed, or fp16 values
    held in float32) makes it decline, and the lines then answer alike, since their attention rounds whatever it is
    handed; a float16 cache made by hand holds fp16 values too, and the step takes it."""
    from llama_ref.model.cache import KVCache

    model = model_in("q8_0")
    tokens = np.array([[3, 1, 4, 1, 5, 9, 2]])
    model.forward(tokens)
    stored = [a[:, :model.cache.length] for a in model.cache.k + model.cache.v]
    assert model.cache.values is kernels().cache_values  # the specification's rounding, compiled
    assert all(a.dtype == np.float16 for a in model.cache.k + model.cache.v)  # fp16 values, exactly, in 2 bytes
    assert all(np.array_equal(a, ggml.fp16(a)) for a in stored)
    assert all(np.abs(a).max() > 0 for a in stored)
    spec = Transformer(model.args, model.weights, backend=ggml.backend_for("numpy", model.weights, "tiny"))
    spec.forward(tokens)
    assert spec.cache.values is ggml.cache_values and spec.cache.k[0].dtype == np.float16
    assert all(np.array_equal(a, b[:, :7]) for a, b in zip(stored, spec.cache.k + spec.cache.v))
    exact = Transformer(model.args, random_weights(model.args, 0))
    exact.forward(tokens)
    assert exact.cache.values is None and exact.cache.k[0].dtype == np.float32
    assert model.cache.nbytes * 2 == exact.cache.nbytes
    assert not all(np.array_equal(a, ggml.fp16(a)) for a in exact.cache.k[0][:, :7])

    lines = Hook(on=False)
    monkeypatch.setattr(kernels(), "decode_layers", lines)
    expected = model.forward(np.array([[6]]), start_pos=7)
    for cache, fused in ((KVCache(model.args, 1, model.dtype), False),  # float32 as computed: not trusted
                         (KVCache(model.args, 1, model.dtype, values=model.cache_values), False),  # fp16 in float32
                         (KVCache(model.args, 1, model.dtype, storage=np.float16), True)):  # made by hand, float16
        model.forward(tokens, cache=cache)
        hook = Hook()
        monkeypatch.setattr(kernels(), "decode_layers", hook)
        assert np.array_equal(model.forward(np.array([[6]]), start_pos=7, cache=cache), expected)
        assert (hook.done, hook.declined) == ((model.args.n_layers, 0) if fused else (0, model.args.n_layers))
    hook = Hook()
    monkeypatch.setattr(kernels(), "decode_layers", hook)
    assert np.array_equal(model.forward(np.array([[6]]), start_pos=7), expected)
    assert hook.done == model.args.n_layers


def test_one_layer_a_call_before_vision_blocks_and_in_a_cache_of_other_arrays(monkeypatch):
    """A vision block runs before each layer (model.cross_attention), so a call stops after its layer; a cache whose
    layers are no longer views of one array (generation's batch code replaced them: KVCache.layers is None) is
    read layer by layer where it lies, and so is a deep copy of a cache. All give the lines' bits."""
    from llama_ref.generation.generate import _keep_rows

    seen = []

    def block(i, h, start_pos, cache):  # stands for a gated cross-attention: it records where it ran
        seen.append(i)
        return h

    def run(model, kept):
        """decode(), the cache's rows taken anew after the prefill when kept, as generation drops finished rows."""
        out = [model.forward(TOKENS)]
        if kept == "copied":  # a deep copy: its views no longer look into its blocks
            model.cache = copy.deepcopy(model.cache)
        elif kept:
            _keep_rows(model.cache, [0])
        if kept:
            assert model.cache.layers(0, model.args.n_layers) is None
        for s in range(3):
            out.append(model.forward(np.array([[7 + 3 * s]]), start_pos=5 + s))
        return np.concatenate(out, axis=1), [a[:, :8].copy() for a in model.cache.k + model.cache.v]

    model = model_in(Q4_K_M, seed=2)
    for vision, kept in ((True, False), (False, True), (False, "copied")):
        model.cross_attention = block if vision else None
        monkeypatch.setattr(kernels(), "decode_layers", Hook(on=False))
        expected = run(model, kept)
        hook = Hook()
        monkeypatch.setattr(kernels(), "decode_layers", hook)
        seen.clear()
        assert same(run(model, kept), expected), vision
        assert hook.done == hook.calls == 3 * model.args.n_layers and hook.declined == 0
        assert seen == (list(range(model.args.n_layers)) * 4 if vision else [])  # the prefill and 3 steps


def test_the_compiled_step_can_be_kept_in_numbas_disk_cache():
    """Machine code that holds an address of this process (a ctypes call such as numba.get_num_threads() inside
    the step, a large global array) is never written to Numba's disk cache: every process would compile the step
    anew, 30-60 s before its first decode token (sessions 35-36). Checked on the compiled code itself, which a
    cold compile (a clean checkout, as CI's) makes."""
    mod = step()
    model = model_in("q8_0")
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            model.forward(TOKENS)
            model.forward(np.array([[7]]), start_pos=5)
    finally:
        numba.set_num_threads(before)
    compiled = [c for f in (mod._layers_serial, mod._layers_parallel) for c in f.overloads.values()]
    assert compiled and not any(c.library.has_dynamic_globals for c in compiled)


@pytest.mark.parametrize("formats", [MIXED, "q4_k"])
def test_the_next_groups_prefetch_asks_for_each_items_own_rows(formats):
    """_share_start (the lines each thread asks for before the next region) gives every work item of every product
    group the address its first tile reads: a weight's first item its first row (the weight's own array for the
    legacy formats), each later item ROWS rows on (a repacked Q4_K's groups of 8 rows counted as such), never past
    the weight's bytes."""
    from llama_ref.kernels import ggml_linears as gl
    mod = step()
    model = model_in(formats)
    decode(model, TOKENS, steps=1)  # the run and its tables are made on the first step
    # this model's run (another test's model may still hold one of its own in this process)
    n, table, groups, *_ = mod._RUNS[tuple(id(model.weights[k]) for k in mod._names(0, model.args.n_layers))]
    legacy = {kernels()._weight_args(w)[1].ctypes.data for w in model.weights.values() if hasattr(w, "format")
              and w.format in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")}
    for layer in range(n):
        for g in range(4):
            t = table[groups[layer, g, mod.T0]:groups[layer, g, mod.T1]]
            for i in range(t.shape[0]):
                repacked = t[i, gl.KINDF] == gl.Q4_KR
                rows = t[i, gl.RF] // 8 if repacked else t[i, gl.RF]
                end = t[i + 1, gl.TILEF] if i + 1 < t.shape[0] else groups[layer, g, mod.TILES]
                assert t[i, gl.KINDF] >= gl.Q4_K or t[i, gl.WF] in legacy
                for c in range(t[i, gl.TILEF], end):
                    at, scales = mod._share_start(t, c)
                    step_rows = (c - t[i, gl.TILEF]) * (gl.ROWS // 8 if repacked else gl.ROWS)
                    assert at == t[i, gl.WF] + step_rows * t[i, gl.WSF] < t[i, gl.WF] + rows * t[i, gl.WSF]
                    if c == t[i, gl.TILEF]:
                        assert scales == t[i, gl.DF]
