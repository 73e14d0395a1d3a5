"""The 16-bit kernels at real sizes and the thread policy (issue 13).

- The in-register 16-bit conversions (kernels.halfbits) give every one of the 65536 bit patterns exactly
  as NumPy does (packed.BF16Weight / F16Weight, the kernels' NumPy twins); the decode kernels' row dot product
  (halfbits.f16_row_dot / bf16_row_dot) sums in its documented order, bit for bit, and the matrix-vector
  kernels built on it agree with the reference for any K (a remainder past the last STEP) and strides.
- Prefill on 16-bit weights goes through a reused float32 tile; a tile smaller than the matrix (several
  tiles and a remainder) gives the reference's product.
- A real-shape smoke test: two layers of the Llama 3.2 1B shape (dim 2048, FFN 8192, 32 query and 8 KV
  heads, bf16 weights) give the same logits on the numba and numpy backends, for a prefill and a decode step;
  the decode step's projections in one region each (kernels.linears) give the bits of one at a time.
- load(..., threads=N) and set_threads set BLAS and Numba alike, as threadpoolctl reports them.
- Prefill tiles are shared by one pool of threads (runtime.threads.each_thread, BLAS at one thread inside):
  every thread runs at once, BLAS's count comes back after, errors reach the caller, and the product equals
  the reference's, bit for bit the one-thread product wherever the tiles are the same.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit
from test_kernels import dot_bound, random_packed

from llama_ref import kernels
from llama_ref.kernels.halfbits import (LANES, bf16_row_dot, bf16_row_dots4, bf16_to_f32, f16_row_dot,
                                       f16_row_dots4, f16_to_f32)
from llama_ref.model import ops
from llama_ref.weights import packed


@njit(cache=False)
def _widen(bits, bf16):
    out = np.empty(bits.shape[0], np.float32)
    for i in range(bits.shape[0]):
        out[i] = bf16_to_f32(bits[i]) if bf16 else f16_to_f32(bits[i])
    return out


def test_16bit_conversions_are_exact_for_every_bit_pattern():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    want_bf16 = (bits.astype(np.uint32) << 16).view(np.float32)
    want_f16 = bits.view(np.float16).astype(np.float32)
    got_bf16, got_f16 = _widen(bits, True), _widen(bits, False)
    # Bit for bit, NaNs included (quiet NaNs keep their payload; signalling ones are quieted either way).
    finite = ~np.isnan(want_f16)
    np.testing.assert_array_equal(got_bf16.view(np.uint32), want_bf16.view(np.uint32))
    np.testing.assert_array_equal(got_f16[finite].view(np.uint32), want_f16[finite].view(np.uint32))
    assert np.isnan(got_f16[~finite]).all()


@njit(cache=False)
def _row_dots(x, w, bf16, four):
    """halfbits' dot products of x (K,) float32 with the rows of w (R, K) uint16, R a multiple of 4 (four: 4 rows a
    call), over the first K // LANES * LANES values."""
    out = np.empty(w.shape[0], np.float32)
    ng, ws = x.shape[0] // LANES, np.int64(w.strides[0])
    a = np.int64(x.ctypes.data)
    for r in range(0, w.shape[0], 4 if four else 1):
        b, o = np.int64(w[r].ctypes.data), np.int64(out[r:].ctypes.data)
        if four:
            bf16_row_dots4(a, b, ws, ng, o) if bf16 else f16_row_dots4(a, b, ws, ng, o)
        else:
            bf16_row_dot(a, b, ws, ng, o) if bf16 else f16_row_dot(a, b, ws, ng, o)
    return out


def _fma32(a, b, c):
    """float32 fma(a, b, c) through float64: a * b is exact there; the sum is rounded to float64 and then to
    float32, which differs from one rounding only when the float64 sum falls exactly halfway between two float32
    (a chance of about 2^-29 per operation)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


@pytest.mark.parametrize("K", [16, 32, 48, 5 * 64, 5 * 64 + 48, 5 * 64 + 57])
@pytest.mark.parametrize("four", [False, True])
@pytest.mark.parametrize("fmt", ["f16", "bf16"])
def test_row_dots_sum_in_their_documented_order(fmt, four, K):
    """halfbits' row dot products: the first K // LANES groups of LANES values, group g into accumulator g % A
    (A = ACCUMULATORS), value k into lane k % LANES, one fused multiply-add chain each in increasing k (the groups
    past the last whole A too); then the accumulators pairwise and the lanes by halves. The same bits on every
    x86 CPU (LLVM splits the 16-lane vectors on AVX2, and no step is reordered), for a row alone or among 4 (the
    same reference for both)."""
    from llama_ref.kernels.halfbits import ACCUMULATORS

    A = ACCUMULATORS
    rng = np.random.default_rng(K)
    x = rng.standard_normal(K, dtype=np.float32)
    w32 = rng.standard_normal((8, K), dtype=np.float32)
    bits = (w32.view(np.uint32) >> 16).astype(np.uint16) if fmt == "bf16" else w32.astype(np.float16).view(np.uint16)
    w = _widen(bits.reshape(-1), fmt == "bf16").reshape(bits.shape)
    acc = np.zeros((8, A, LANES), np.float32)
    for g in range(K // LANES):
        k = g * LANES
        acc[:, g % A] = _fma32(x[k:k + LANES], w[:, k:k + LANES], acc[:, g % A])
    vs = [acc[:, j] for j in range(A)]
    while len(vs) > 1:
        vs = [vs[j] + vs[j + 1] for j in range(0, len(vs), 2)]
    v = vs[0]  # (8, LANES)
    while v.shape[1] > 1:
        half = v.shape[1] // 2
        v = v[:, :half] + v[:, half:]
    np.testing.assert_array_equal(_row_dots(x, bits, fmt == "bf16", four).view(np.uint32), v[:, 0].view(np.uint32))


@pytest.mark.parametrize("fmt", ["f16", "bf16"])
@pytest.mark.parametrize("K", [1, 63, 64, 130, 576, 3104, 4099])
def test_16bit_decode_kernels_any_width_and_strides(fmt, K):
    """The 16-bit matrix-vector kernels (kernels/linear.py _mv_f16 / _mv_bf16, three weights at once as linears
    calls them): within float32 rounding of the float64 product for K not a multiple of LANES (the rest of a
    row added one value at a time), 4 rows at once with a remainder of rows (or, on AMD Zen, one row at a time
    while K <= ONE_ROW_MAX_K), and the same values, summed one value at a time, from a strided x or w."""
    lin = importlib.import_module("llama_ref.kernels.linear")  # (kernels.linear is its function)
    rng = np.random.default_rng(K)
    mv = lin._mv_f16 if fmt == "f16" else lin._mv_bf16
    x = rng.standard_normal((3, K), dtype=np.float32)
    ws = [_random_16bit(fmt, rows, K, rng).kernel_args()[0] for rows in (5, 37, 16)]
    outs = [np.empty((3, w.shape[0]), np.float32) for w in ws]
    mv(x, *ws, *outs)
    for w, out in zip(ws, outs):
        w64 = _widen(w.reshape(-1), fmt == "bf16").reshape(w.shape).astype(np.float64)
        exact = x.astype(np.float64) @ w64.T
        bound = dot_bound(x, w64)
        assert np.all(np.abs(out - exact) <= bound)
    wide = [np.repeat(w, 2, axis=1)[:, ::2] for w in ws]  # the same values, 4 bytes apart
    xs = np.repeat(x, 2, axis=1)[:, ::2]
    strided = [np.empty_like(o) for o in outs]
    mv(xs, *wide, *strided)
    for w, out in zip(ws, strided):
        w64 = _widen(w.reshape(-1), fmt == "bf16").reshape(w.shape).astype(np.float64)
        assert np.all(np.abs(out - x.astype(np.float64) @ w64.T) <= dot_bound(x, w64))


def _random_16bit(fmt, rows, cols, rng):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    if fmt == "f16":
        return packed.F16Weight(w.astype(np.float16).view(np.uint16), w.shape)
    return packed.BF16Weight((w.view(np.uint32) >> 16).astype(np.uint16), w.shape)


@pytest.mark.parametrize("fmt", ["bf16", "f16"])
@given(n=st.integers(8, 40), rows=st.integers(1, 90), cols=st.integers(1, 70), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=10, deadline=None)
def test_prefill_through_small_tiles_equals_the_reference(fmt, n, rows, cols, seed):
    lin = importlib.import_module("llama_ref.kernels.linear")  # the module (the package exports the function)
    rng = np.random.default_rng(seed)
    w = _random_16bit(fmt, rows, cols, rng)
    x = rng.standard_normal((n, cols)).astype(np.float32)
    want = ops.linear(x, w)
    old = lin.TILE_FLOATS
    lin.TILE_FLOATS = 7 * cols  # 7 rows a tile (at least one): several tiles and a remainder
    try:
        got = kernels.linear(x, w)
    finally:
        lin.TILE_FLOATS = old
    dense = w.to_float(np.float32)
    bound = 4 * cols * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(dense).astype(np.float64).T)
    assert got.shape == want.shape == (n, rows)
    assert np.all(np.abs(got - want) <= bound + 1e-30)


def _one_b_layers(n_layers=2, vocab=512):
    """The Llama 3.2 1B shape with n_layers layers and a small vocabulary (the embedding is not what is
    tested, and 128256 rows would cost 0.5 GB), random bf16 weights at std 0.02."""
    from llama_ref.model import presets
    from llama_ref.weights.common import expected_shapes

    args = presets.get("llama-3.2-1b").replace(n_layers=n_layers, vocab_size=vocab, max_seq_len=256)
    rng = np.random.default_rng(0)
    weights = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith("norm.weight"):
            weights[name] = np.ones(shape, np.float32)
            continue
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
        weights[name] = packed.BF16Weight((w.view(np.uint32) >> 16).astype(np.uint16), shape)
    if args.tie_word_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return args, weights


@pytest.mark.slow
def test_two_layers_of_the_1b_shape_agree_across_backends():
    from llama_ref.model.transformer import Transformer

    args, weights = _one_b_layers()
    tokens = np.random.default_rng(1).integers(0, args.vocab_size, 40)
    logits = {}
    for backend in ("numpy", "numba"):
        model = Transformer(args, weights, backend=backend)
        prefill = model.forward(tokens, 0)  # (T, V): the tiled BLAS path and blocked attention
        step = model.forward(tokens[:1], len(tokens))  # (1, V): the matrix-vector kernels
        logits[backend] = np.concatenate([prefill.reshape(-1, args.vocab_size), step.reshape(-1, args.vocab_size)])
    assert np.isfinite(logits["numpy"]).all()
    np.testing.assert_allclose(logits["numba"], logits["numpy"], rtol=0, atol=1e-4)
    # The decode step's wq/wk/wv and w1/w3 in one parallel region each (kernels.linears) give the same bits
    # as the Numba backend without linears, which takes them one at a time.
    one_by_one = types.ModuleType("one_by_one")
    one_by_one.__dict__.update({k: v for k, v in vars(kernels).items() if k != "linears"})
    model = Transformer(args, weights, backend=one_by_one)
    model.forward(tokens, 0)
    step = model.forward(tokens[:1], len(tokens)).reshape(-1, args.vocab_size)
    np.testing.assert_array_equal(logits["numba"][-1:], step)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_cli import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def _in_subprocess(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_load_threads_sets_blas_and_numba(tiny_gguf):
    # In a fresh process: the setting is process-wide, and the test process keeps its own.
    got = _in_subprocess(
        "import json, numba, threadpoolctl, llama_ref; "
        f"m = llama_ref.load({str(tiny_gguf)!r}, backend='numba', threads=1); m.forward([1, 2], 0); "
        # NumPy's own BLAS: Numba's first compile also loads SciPy's copy (for np.dot in compiled code,
        # which no kernel calls), after the limit was set.
        "blas = [p['num_threads'] for p in threadpoolctl.threadpool_info() "
        "        if p['user_api'] == 'blas' and 'numpy' in p['filepath']]; "
        "from llama_ref.runtime.threads import describe; "
        "print(json.dumps({'blas': blas, 'numba': numba.get_num_threads(), 'policy': describe()}))")
    assert got["blas"] and set(got["blas"]) == {1}
    assert got["numba"] == 1
    assert got["policy"].startswith("1 thread")


@pytest.mark.parametrize("user_value", [None, "7"])
def test_spin_count_is_set_before_numba_can_start_its_threads(user_value):
    """set_threads() may start Numba's OpenMP threads (numba.set_num_threads) before any kernel module is
    imported; libgomp reads GOMP_SPINCOUNT then, so importing llama_ref sets it. A user's value is kept."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if user_value is not None:
        env["GOMP_SPINCOUNT"] = user_value
    code = ("import os, sys, numba, llama_ref; from llama_ref.runtime.threads import set_threads; "
            "assert 'llama_ref.kernels' not in sys.modules; set_threads(1); print(os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (user_value or "30000")


def test_default_threads_is_the_physical_cores_unless_told(monkeypatch):
    from llama_ref.runtime import threads

    for var in threads.THREAD_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    assert 1 <= threads.default_threads() == threads.physical_cores() <= (len(threads._cpus()) or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.default_threads() == 1
    monkeypatch.setenv("LLAMA_REF_THREADS", "3")
    assert threads.default_threads() == 3


def _numpy_blas_threads() -> int:
    from threadpoolctl import threadpool_info

    return next(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas" and "numpy" in p["filepath"])


def test_each_thread_runs_every_call_at_once_with_one_blas_thread():
    from llama_ref.runtime import threads

    before = _numpy_blas_threads()
    together = threading.Barrier(3, timeout=30)  # broken (an error) unless 3 calls run at the same time
    seen, lock = [], threading.Lock()

    def work():
        together.wait()
        with lock:
            seen.append((threading.get_ident(), _numpy_blas_threads()))

    threads.each_thread(work, 3)
    assert len({ident for ident, _ in seen}) == 3
    assert [blas for _, blas in seen] == [1, 1, 1]
    assert _numpy_blas_threads() == before

    def fails():
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("a helper's error")

    with pytest.raises(ValueError, match="a helper's error"):
        threads.each_thread(fails, 2)
    assert _numpy_blas_threads() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_each_thread_works_in_a_forked_child():
    from llama_ref.runtime import threads

    calls = []
    threads.each_thread(lambda: calls.append(1), 2)  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: a fresh pool, or this call would wait forever (the alarm ends it)
        signal.alarm(20)
        done = []
        threads.each_thread(lambda: done.append(1), 2)
        os._exit(0 if len(done) == 2 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert len(calls) == 2


@pytest.mark.parametrize("fmt", ["f32", "bf16", "f16", "q8_0", "q4_k"])
@given(n=st.integers(8, 30), rows=st.integers(1, 60), blocks=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
@settings(max_examples=6, deadline=None)
def test_prefill_tiles_shared_by_three_threads(fmt, n, rows, blocks, seed):
    from llama_ref.runtime import threads

    lin = importlib.import_module("llama_ref.kernels.linear")
    rng = np.random.default_rng(seed)
    cols = blocks * 256
    w = rng.standard_normal((rows, cols)).astype(np.float32) if fmt == "f32" else random_packed(fmt, rows, cols, rng)
    x = rng.standard_normal((n + 8 * (fmt == "f32"), cols)).astype(np.float32)  # float32: BLAS from 16 rows
    old = lin.TILE_FLOATS, lin.TILE_ROWS, threads._chosen
    lin.TILE_FLOATS, lin.TILE_ROWS = 5 * cols, 5  # 5 rows a tile: more tiles than threads, and a remainder
    try:
        threads._chosen = 3  # more threads than this machine may have cores: each takes tiles in turn
        got = kernels.linear(x, w)
        threads._chosen = 1
        alone = kernels.linear(x, w)
    finally:
        lin.TILE_FLOATS, lin.TILE_ROWS, threads._chosen = old
    assert got.shape == (x.shape[0], rows)
    dense = w if fmt == "f32" else w.to_float(np.float32)
    assert np.all(np.abs(got - ops.linear(x, w)) <= dot_bound(x, dense) + 1e-30)
    # The same tiles as one thread's (16-bit: 5 rows each; float32 is one block per thread, not the same)
    if fmt != "f32" and (rows >= 15 or fmt not in ("bf16", "f16")):
        np.testing.assert_array_equal(got, alone)
