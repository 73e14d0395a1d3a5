"""Numba twins of llama_ref.model.ggml's operations outside the matrix products: attention over the fp16
cache (ggml_vec_dot_f16, ggml's softmax with ggml_v_expf), RMSNorm, the RoPE tables and rotation, SwiGLU.

Each computes what the NumPy specification computes, bit for bit (tests/test_ggml_kernels.py,
tests/test_ggml_arithmetic.py): the same float32 operations in the same order, fused multiply-adds by
llvm.fma (kernels/ggml_simd.py), float64 where the specification widens. No fast-math. Where a loop's lanes
are independent (a row of RMSNorm's products) LLVM vectorizes it without changing any rounding.

Attention and SwiGLU follow the specification's `isa` (llama_ref.model.ggml.ISA unless given): the AVX-512
build's 16-lane order and expf or the AVX2 build's 8-lane order and expf. Their vectors are written in LLVM
IR (kernels/ggml_vec.py): ggml_vec_dot_f16 for q.k and probabilities.V, ggml_v_expf, the softmax's sums.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange
from numba.extending import overload

from llama_ref.model import ggml as spec

from ._common import JIT
from .ggml_simd import fma32, fp16_round
from .ggml_vec import (expf_array8, expf_array16, h16_columns8_1, h16_columns8_2, h16_columns8_3, h16_columns8_4,
                       h16_columns16_1, h16_columns16_2, h16_columns16_3, h16_columns16_4, h16_scores8_1,
                       h16_scores8_2, h16_scores8_3, h16_scores16_1, h16_scores16_2, h16_scores16_3, kt_scores8_1,
                       kt_scores8_2, kt_scores8_3, kt_scores16_1, kt_scores16_2, kt_scores16_3, kt_scores16_4,
                       soft_max_row8, soft_max_row16, swiglu_row_avx2, swiglu_row_avx512)

PARALLEL_ROWS = 16  # fewer rows than this (a decode step): one thread, no parallel region to start


@njit(inline="always", **JIT)
def _scores(wide, rows, q, keys, row, visible, HD, scale, w, w_stride):
    """kernels/ggml_vec.h16_scores (the keys' rows, fp16 bits) for `rows` (1 to 3) query heads in the build's lane
    order: a decode's one query."""
    args = (q, keys, row, np.int64(visible), np.int64(HD), scale, w, w_stride)
    if wide:
        if rows == 3:
            h16_scores16_3(*args)
        elif rows == 2:
            h16_scores16_2(*args)
        else:
            h16_scores16_1(*args)
    elif rows == 3:
        h16_scores8_3(*args)
    elif rows == 2:
        h16_scores8_2(*args)
    else:
        h16_scores8_1(*args)


@njit(inline="always", **JIT)
def _key_scores(wide, rows, q, kt, visible, HD, scale, w, w_stride):
    """kernels/ggml_vec.kt_scores (the keys transposed in blocks, in vector lanes) for `rows` (1 to 3; 4 in the
    AVX-512 build's order) query heads in the build's lane order: h16_scores' numbers."""
    args = (q, kt, np.int64(visible), np.int64(HD), scale, w, w_stride)
    if wide:
        if rows == 4:
            kt_scores16_4(*args)
        elif rows == 3:
            kt_scores16_3(*args)
        elif rows == 2:
            kt_scores16_2(*args)
        else:
            kt_scores16_1(*args)
    elif rows == 3:
        kt_scores8_3(*args)
    elif rows == 2:
        kt_scores8_2(*args)
    else:
        kt_scores8_1(*args)


def _item_scores(kt, wide, rows, q, keys, row, b, kvh, visible, HD, scale, w, w_stride):
    """The scores of one call of _attention_item: _key_scores where kt holds the keys in blocks (5-D: a prefill's),
    _scores from the keys' rows where it is a 1-D placeholder (kernels/ggml_step.py's decode). Chosen when Numba
    types the call, so that each caller compiles only its own path."""


@overload(_item_scores, inline="always", jit_options=JIT)
def _item_scores_impl(kt, wide, rows, q, keys, row, b, kvh, visible, HD, scale, w, w_stride):
    if kt.ndim == 5:
        def impl(kt, wide, rows, q, keys, row, b, kvh, visible, HD, scale, w, w_stride):
            _key_scores(wide, rows, q, np.int64(kt[b, kvh].ctypes.data), visible, HD, scale, w, w_stride)
    else:
        def impl(kt, wide, rows, q, keys, row, b, kvh, visible, HD, scale, w, w_stride):
            _scores(wide, rows, q, keys, row, visible, HD, scale, w, w_stride)
    return impl


@njit(inline="always", **JIT)
def _columns(wide, rows, w, w_stride, values, row, visible, HD, out):
    """kernels/ggml_vec.h16_columns (V's fp16 bits) for `rows` (1 to 4) probability rows in the build's lane
    order."""
    args = (w, w_stride, values, row, np.int64(visible), np.int64(HD), out)
    if wide:
        if rows == 4:
            h16_columns16_4(*args)
        elif rows == 3:
            h16_columns16_3(*args)
        elif rows == 2:
            h16_columns16_2(*args)
        else:
            h16_columns16_1(*args)
    elif rows == 4:
        h16_columns8_4(*args)
    elif rows == 3:
        h16_columns8_3(*args)
    elif rows == 2:
        h16_columns8_2(*args)
    else:
        h16_columns8_1(*args)


QUERIES = 16  # positions per work item
# Attention's work (query rows x visible keys x head size, summed over query heads) below which it runs on one
# thread: a decode step's attention (1B shape, 32 heads, ~100 keys: ~0.1 ms) is less than what starting and
# joining a parallel region costs it on a busy machine (2 threads, load ~9: 2 ms of CPU, 9.6 ms wall a call,
# against 0.1 ms on one). 2^20 is about 0.8 ms of one thread's work (AVX2 EPYC); past it the threads share it.
SERIAL_WORK = 1 << 20
# The same for a quantized product of one activation row (kernels/ggml.py, ggml_kquants.py): a weight of fewer
# values runs on the calling thread. On the default model (matrices of 0.1-0.9 M values, ~10-60 us each) alone on
# 2 cores, a 2-thread decode ran at 0.63-0.89x of one thread's rate in six of eight formats (0.55-0.88x llama.cpp's
# 2 threads; benchmarks/results/ggml_decode_avx2_s28_quiet.md):
# a region's start and join cost what it shares. The 1B shape's smallest matrices (k, v: 2^20 values) and every
# larger one still use the threads.
SERIAL_WEIGHTS = 1 << 20


def serial_product(n_rows: int, n_weights: int) -> bool:
    """Whether a quantized product runs on the calling thread: one thread, or one row of x and a small weight.
    The rows are the same work items either way, so the same bits."""
    if n_rows != 1:
        return False
    return n_weights < SERIAL_WEIGHTS or numba.config.NUMBA_NUM_THREADS == 1 or numba.get_num_threads() == 1


@njit(inline="always", **JIT)
def _attention_item(q, k, v, start_pos, scale, wide, out, item, kt):
    """One work item of _attention: QUERIES positions of one KV head (item over B x KVH x position blocks). k, v:
    the cache's fp16 bits as uint16 (B, KVH, S, HD), or a view of them (ggml_step's decode reads the cache in
    place). kt: the keys' fp16 bits in blocks of KW keys, each block transposed, (B, KVH, P / KW, HD, KW) (P: S
    rounded up to 64, zeros past S; KW 16 keys where wide, else 8; key_blocks), for the scores with the keys in
    vector lanes; or a 1-D placeholder (a decode step's one query): the scores from k's rows (_item_scores)."""
    B, T, H, HD = q.shape
    KVH, S = k.shape[1], k.shape[2]
    G = H // KVH
    R = 3 if G % 3 == 0 else 2 if G % 2 == 0 else 1  # query heads per scores call
    if wide and kt.ndim == 5 and G % 4 == 0:  # a prefill's keys in lanes: 4 heads a call (kt_scores16_4)
        R = 4
    C = 4 if R == 2 and G % 4 == 0 else R  # ... per columns call: the scores of two calls (more rows, fewer loads)
    P = (S + 63) // 64 * 64  # ggml's cache view, padded
    width = 16 if wide else 8  # the lanes of one softmax vector
    row = np.int64(k.strides[2])  # bytes from one key (value) row to the next: 2 * HD, or more in a cache's view
    blocks = (T + QUERIES - 1) // QUERIES
    b, kvh, t0 = item // (KVH * blocks), item // blocks % KVH, item % blocks * QUERIES
    qh = np.empty((C, HD), np.float32)
    w = np.empty((C, P), np.float32)
    keys, values = np.int64(k[b, kvh].ctypes.data), np.int64(v[b, kvh].ctypes.data)
    wp, qp = np.int64(w.ctypes.data), np.int64(qh.ctypes.data)
    for t in range(t0, min(T, t0 + QUERIES)):
        visible = min(S, start_pos + t + 1)  # keys up to the query's own position
        used = min(P, (visible + width - 1) // width * width)  # whole softmax vectors (zeros past P)
        for h0 in range(kvh * G, kvh * G + G, C):
            for r in range(C):
                for d in range(HD):
                    qh[r, d] = fp16_round(q[b, t, h0 + r, d])
            # scores: ggml_vec_dot_f16(q, k_p) * scale for every visible key, R query heads a call
            for r0 in range(0, C, R):
                qr, wr = qp + 4 * HD * r0, wp + 4 * P * r0
                _item_scores(kt, wide, R, qr, keys, row, b, kvh, visible, HD, scale, wr, np.int64(4 * P))
            # softmax with the causal mask, the probabilities rounded to fp16
            for r in range(C):
                if wide:
                    soft_max_row16(wp + 4 * P * r, np.int64(visible), np.int64(used))
                else:
                    soft_max_row8(wp + 4 * P * r, np.int64(visible), np.int64(used))
            # the probabilities times each column of V (transposed in llama.cpp); masked keys' zero
            # probabilities add +0 to V's accumulators: nothing, so the products stop at `visible`
            op = np.int64(out.ctypes.data) + 4 * (((b * T + t) * H + h0) * HD)
            _columns(wide, C, wp, np.int64(4 * P), values, row, visible, HD, op)


def key_blocks(kh: np.ndarray, wide: bool) -> np.ndarray:
    """kh (B, KVH, S, HD) fp16 bits (uint16) -> (B, KVH, P / KW, HD, KW) uint16, the keys in blocks of KW (16 where
    wide, else 8), each block transposed; zeros past S up to P, S rounded up to 64 (ggml's padded cache view):
    _attention_item's kt."""
    B, KVH, S, HD = kh.shape
    kw, P = (16 if wide else 8), -(-S // 64) * 64
    bits = np.zeros((B, KVH, P, HD), np.uint16)
    bits[:, :, :S] = kh
    return np.ascontiguousarray(bits.reshape(B, KVH, P // kw, kw, HD).transpose(0, 1, 2, 4, 3))


@njit(parallel=True, **JIT)
def _attention(q, k, v, start_pos, scale, wide, out, kt):
    """q (B, T, H, HD) float32, k, v (B, KVH, S, HD) fp16 bits (uint16; HD a multiple of 8), kt the keys in
    blocks (key_blocks) -> out (B, T, H, HD): llama_ref.model.ggml.attention without a key mask, in the AVX-512
    build's order (wide) or the AVX2 build's, by kernels/ggml_vec.py's vectors. A work item is QUERIES positions of
    one KV head; its G query heads go in groups (_attention_item's R for the scores, C for the value columns) that
    share every key and value vector loaded."""
    B, T = q.shape[0], q.shape[1]
    blocks = (T + QUERIES - 1) // QUERIES
    for i in prange(B * k.shape[1] * blocks):
        _attention_item(q, k, v, start_pos, scale, wide, out, _balanced(i, blocks), kt)


@njit(inline="always", **JIT)
def _balanced(i, blocks):
    """prange's i -> a work item of _attention. A causal query block's keys grow with its position, and prange hands
    each thread one contiguous run of i: in the items' own order a 2-thread prefill gave one thread 1.4x the other's
    keys (default model, 512 tokens: 32 blocks of 3 KV heads). Here each KV head's blocks go first, last, second,
    second-to-last, ..., so that every two neighbouring i hold as many keys as any other two (within a block's
    queries): the threads' runs hold about the same work. Items write apart, so the order changes no value."""
    head, j = i // blocks, i % blocks
    return head * blocks + (j // 2 if j % 2 == 0 else blocks - 1 - j // 2)


@njit(**JIT)
def _attention_serial(q, k, v, start_pos, scale, wide, out, kt):
    """_attention on the calling thread: the same items, so the same bits (SERIAL_WORK)."""
    B, T = q.shape[0], q.shape[1]
    for item in range(B * k.shape[1] * ((T + QUERIES - 1) // QUERIES)):
        _attention_item(q, k, v, start_pos, scale, wide, out, item, kt)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
              key_mask: "np.ndarray | None" = None, isa: "str | None" = None) -> np.ndarray:
    """llama_ref.model.ggml.attention, compiled (a batch with a key mask, or a head size that is no multiple
    of 8: the specification's)."""
    isa = spec._isa(isa)
    HD = q.shape[-1]
    if key_mask is not None or q.dtype != np.float32 or HD % 8:
        return spec.attention(q, k, v, start_pos, key_mask, isa)
    B, S, KVH = k.shape[:3]
    # the F16 cache's values (model.ggml.cache_storage) as their bits, each head's rows together: the items widen
    # them as ggml does (float32 k, v are rounded to fp16 first, as ggml's cache would: the cast rounds to nearest
    # even, as vcvtps2ph does); half the bytes of float32 copies (a 512-token prefill's attention took 0.8x the time)
    with np.errstate(over="ignore"):  # past 65504 fp16 is inf, as in ggml
        kh, vh = (np.ascontiguousarray((a if a.dtype == np.float16 else np.asarray(a, np.float32).astype(np.float16))
                                       .view(np.uint16).transpose(0, 2, 1, 3)) for a in (k, v))  # (B, KVH, S, HD)
    out = np.empty(q.shape, np.float32)
    B, T, H = q.shape[:3]
    kt = key_blocks(kh, isa == "avx512")  # the keys transposed once for every query row (kt_scores)
    kernel = _attention_serial if B * T * H * S * HD < SERIAL_WORK else _attention
    kernel(np.ascontiguousarray(q), kh, vh, start_pos, np.float32(1 / np.sqrt(HD)), isa == "avx512", out, kt)
    return out


@njit(inline="always", **JIT)
def _rms_norm_row(x, weight, eps, out, n):
    D = x.shape[1]
    total = np.float64(0)
    for i in range(D):
        total += np.float64(x[n, i] * x[n, i])  # float32 products, summed in order in float64
    _rms_scale_row(x, weight, eps, out, n, total)


@njit(inline="always", **JIT)
def _rms_scale_row(x, weight, eps, out, n, total):
    """Row n of out: x's row times 1 / sqrt(mean + eps) (mean: float32 of the row's float64 sum of squares over
    D), times the weight."""
    mean = np.float32(total / x.shape[1])
    scale = np.float32(1) / np.sqrt(mean + eps)
    for i in range(x.shape[1]):
        out[n, i] = (x[n, i] * scale) * weight[i]


@njit(inline="always", **JIT)
def _rms_norm_rows4(x, weight, eps, out, n):
    """_rms_norm_row of rows n .. n + 3 at once: each row's float64 sum still in order, the four chains side by
    side, so that the CPU overlaps their additions (one chain waits ~4 cycles an addition: a prefill's norms of
    512 x 2048 took ~1 ms so)."""
    D = x.shape[1]
    t0 = t1 = t2 = t3 = np.float64(0)
    for i in range(D):
        a0, a1, a2, a3 = x[n, i], x[n + 1, i], x[n + 2, i], x[n + 3, i]
        t0 += np.float64(a0 * a0)
        t1 += np.float64(a1 * a1)
        t2 += np.float64(a2 * a2)
        t3 += np.float64(a3 * a3)
    for r, total in enumerate((t0, t1, t2, t3)):
        _rms_scale_row(x, weight, eps, out, n + r, total)


@njit(parallel=True, **JIT)
def _rms_norm(x, weight, eps, out):
    N = x.shape[0]
    for c in prange((N + 3) // 4):
        n = 4 * c
        if n + 4 <= N:
            _rms_norm_rows4(x, weight, eps, out, n)
        else:
            for m in range(n, N):
                _rms_norm_row(x, weight, eps, out, m)


@njit(**JIT)
def _rms_norm_serial(x, weight, eps, out):
    """The same for a few rows: a parallel region costs more than one decode row's work."""
    for n in range(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, n)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """llama_ref.model.ggml.rms_norm, compiled. x (..., D)."""
    if x.dtype != np.float32:
        return spec.rms_norm(x, weight, eps)
    rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
    out = np.empty(rows.shape, np.float32)
    (_rms_norm if rows.shape[0] >= PARALLEL_ROWS else _rms_norm_serial)(
        rows, np.ascontiguousarray(weight, np.float32), np.float32(eps), out)
    return out.reshape(x.shape)


@njit(**JIT)
def _rope_tables(theta_scale, factor, start_pos, cos, sin):
    T, n = cos.shape
    for t in range(T):
        theta = np.float32(start_pos + t)
        for i in range(n):
            angle = np.float32(theta / factor[i]) if factor[i] != 1 else theta
            cos[t, i] = np.float32(math.cos(angle))  # a float32 argument: libm's cosf, as ggml and the spec
            sin[t, i] = np.float32(math.sin(angle))
            theta = theta * theta_scale


# spec.rope_scale_factors of each table of frequencies seen (its bytes -> (theta_scale, factor)): ~7 us of NumPy that a
# decode step paid every token for the same model's same numbers (nothing writes into factor)
_SCALE_FACTORS: dict = {}


def rope_tables(freqs: np.ndarray, start_pos: int, length: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """llama_ref.model.ggml.rope_tables, compiled: cos, sin (T, HD/2)."""
    key = np.ascontiguousarray(freqs).tobytes()
    if key not in _SCALE_FACTORS:
        if len(_SCALE_FACTORS) >= 64:  # models come and go in one process: keep it bounded
            _SCALE_FACTORS.clear()
        _SCALE_FACTORS[key] = spec.rope_scale_factors(freqs)
    theta_scale, factor = _SCALE_FACTORS[key]
    cos = np.empty((length, freqs.shape[0]), np.float32)
    sin = np.empty((length, freqs.shape[0]), np.float32)
    _rope_tables(theta_scale, factor, start_pos, cos, sin)
    return cos.astype(dtype, copy=False), sin.astype(dtype, copy=False)


@njit(inline="always", **JIT)
def _rope_row(x, cos, sin, out, bt):
    """x (B, T, n, HD): each pair (x0, x1) -> (fma(x0, cos, -(x1 sin)), fma(x0, sin, x1 cos))."""
    T, n, HD = x.shape[1], x.shape[2], x.shape[3]
    b, t = bt // T, bt % T
    for h in range(n):
        for i in range(HD // 2):
            x0, x1 = x[b, t, h, 2 * i], x[b, t, h, 2 * i + 1]
            c, s = cos[t, i], sin[t, i]
            out[b, t, h, 2 * i] = fma32(x0, c, -(x1 * s))
            out[b, t, h, 2 * i + 1] = fma32(x0, s, x1 * c)


@njit(parallel=True, **JIT)
def _apply_rope(x, cos, sin, out):
    for bt in prange(x.shape[0] * x.shape[1]):
        _rope_row(x, cos, sin, out, bt)


@njit(**JIT)
def _apply_rope_serial(x, cos, sin, out):
    for bt in range(x.shape[0] * x.shape[1]):
        _rope_row(x, cos, sin, out, bt)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """llama_ref.model.ggml.apply_rope, compiled. x (B, T, n, HD), cos, sin (T, HD/2)."""
    if x.dtype != np.float32 or cos.dtype != np.float32:
        return spec.apply_rope(x, cos, sin)
    out = np.empty(x.shape, np.float32)
    rope = _apply_rope if x.shape[0] * x.shape[1] >= PARALLEL_ROWS else _apply_rope_serial
    rope(np.ascontiguousarray(x), np.ascontiguousarray(cos), np.ascontiguousarray(sin), out)
    return out


@njit(inline="always", **JIT)
def _swiglu_row(g, u, wide, out, n):
    args = (np.int64(g[n].ctypes.data), np.int64(u[n].ctypes.data), np.int64(g.shape[1]), np.int64(out[n].ctypes.data))
    if wide:
        swiglu_row_avx512(*args)
    else:
        swiglu_row_avx2(*args)


@njit(parallel=True, **JIT)
def _swiglu(g, u, wide, out):
    for n in prange(g.shape[0]):
        _swiglu_row(g, u, wide, out, n)


@njit(**JIT)
def _swiglu_serial(g, u, wide, out):
    for n in range(g.shape[0]):
        _swiglu_row(g, u, wide, out, n)


def swiglu(gate: np.ndarray, up: np.ndarray, isa: "str | None" = None) -> np.ndarray:
    """llama_ref.model.ggml.swiglu, compiled: ggml_v_silu(gate) * up."""
    isa = spec._isa(isa)
    if gate.dtype != np.float32 or up.dtype != np.float32 or gate.shape != up.shape:
        return spec.swiglu(gate, up, isa)
    g = np.ascontiguousarray(gate.reshape(-1, gate.shape[-1]))
    out = np.empty(g.shape, np.float32)
    (_swiglu if g.shape[0] >= PARALLEL_ROWS else _swiglu_serial)(
        g, np.ascontiguousarray(up.reshape(g.shape)), isa == "avx512", out)
    return out.reshape(gate.shape)


def expf(x: np.ndarray, isa: "str | None" = None) -> np.ndarray:
    """ggml_v_expf elementwise, compiled (kernels/ggml_vec.py's vectors; for the tests)."""
    x = np.ascontiguousarray(x, np.float32)
    flat = np.zeros(-(-x.size // 16) * 16, np.float32)  # whole vectors
    flat[:x.size] = x.reshape(-1)
    out = np.empty_like(flat)
    _expf_array(flat, spec._isa(isa) == "avx512", out)
    return out[:x.size].reshape(x.shape)


def soft_max(x: np.ndarray, visible: np.ndarray, isa: "str | None" = None) -> tuple[np.ndarray, np.ndarray]:
    """ggml's softmax of each row of x (N, S) over its first visible[n] values, as the attention computes it
    (for the tests): -> the probabilities rounded to fp16 (N, S; zero past each row's visible values) and
    each row's float64 sum of exponentials (N,)."""
    wide = spec._isa(isa) == "avx512"
    N, S = x.shape
    w = np.zeros((N, -(-S // 64) * 64), np.float32)  # rows padded as ggml's cache view is
    w[:, :S] = x
    totals = np.empty(N, np.float64)
    _soft_max_rows(w, np.asarray(visible, np.int64), wide, totals)
    probs = w[:, :S].copy()
    probs[np.arange(S)[None, :] >= np.asarray(visible)[:, None]] = 0  # masked: exp(-inf) = 0
    return probs, totals


@njit(**JIT)
def _soft_max_rows(w, visible, wide, totals):
    width = 16 if wide else 8
    for n in range(w.shape[0]):
        used = min(w.shape[1], (visible[n] + width - 1) // width * width)
        p = np.int64(w[n].ctypes.data)
        totals[n] = soft_max_row16(p, visible[n], used) if wide else soft_max_row8(p, visible[n], used)


@njit(**JIT)
def _expf_array(x, wide, out):
    if wide:
        expf_array16(np.int64(x.ctypes.data), np.int64(x.shape[0]), np.int64(out.ctypes.data))
    else:
        expf_array8(np.int64(x.ctypes.data), np.int64(x.shape[0]), np.int64(out.ctypes.data))
