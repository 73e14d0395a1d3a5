"""Numba twins of llama_ref.model.ggml's operations outside the matrix products: attention over the fp16
cache (ggml_vec_dot_f16, ggml's softmax with ggml_v_expf), RMSNorm, the RoPE tables and rotation, SwiGLU.

Each computes what the NumPy specification computes, bit for bit (tests/test_ggml_kernels.py): the same
float32 operations in the same order, fused multiply-adds by llvm.fma (kernels/ggml_simd.py), float64 where
the specification widens. No fast-math. Where a loop's lanes are independent (the 64 accumulators of
ggml_vec_dot_f16, a row of RMSNorm's products) LLVM vectorizes it without changing any rounding.

Attention and SwiGLU follow the specification's `isa` (llama_ref.model.ggml.ISA unless given): the AVX-512
build's 16-lane order (ggml_vec_dot_f16's SIMD part by kernels/ggml_simd.f16_dots) or the AVX2 build's
8-lane order and expf (loops here; tests/test_ggml_arithmetic.py checks both against the specification).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from llama_ref.model import ggml as spec

from ._common import JIT
from .ggml_simd import fma32, fp16_round, ldexp32
from .ggml_vec import (exp_sums8, exp_sums16, expf_array8, expf_array16, f16_columns8_1, f16_columns8_2,
                       f16_columns8_3, f16_columns16_1, f16_columns16_2, f16_columns16_3, f16_scores8_1,
                       f16_scores8_2, f16_scores8_3, f16_scores16_1, f16_scores16_2, f16_scores16_3)

PARALLEL_ROWS = 16  # fewer rows than this (a decode step): one thread, no parallel region to start

_R = np.float32(float.fromhex("0x1.8p23"))
_LOG2E = np.float32(float.fromhex("0x1.715476p+0"))
_LN2_HI = np.float32(float.fromhex("0x1.62e4p-1"))
_LN2_LO = np.float32(float.fromhex("0x1.7f7d1cp-20"))
_C4 = np.float32(float.fromhex("0x1.0e4020p-7"))
_C5 = np.float32(float.fromhex("0x1.573e2ep-5"))
_C6 = np.float32(float.fromhex("0x1.555e66p-3"))
_C7 = np.float32(float.fromhex("0x1.fffdb6p-2"))
_C8 = np.float32(float.fromhex("0x1.ffffecp-1"))


@njit(inline="always", **JIT)
def _expf_reduce(x):
    """ggml_v_expf's argument reduction, the same in both builds: x = n ln2 + b, n an integer (as float32),
    and u = b^2."""
    z = fma32(x, _LOG2E, _R)
    n = z - _R
    b = fma32(-n, _LN2_LO, fma32(-n, _LN2_HI, x))
    return n, b, b * b


@njit(inline="always", **JIT)
def _expf(x):
    """ggml_v_expf on one float32 (llama_ref.model.ggml.ggml_v_expf)."""
    if x != x:  # NaN: itself
        return x
    n, b, u = _expf_reduce(x)
    j = fma32(fma32(fma32(_C4, b, _C5), u, fma32(_C6, b, _C7)), u, fma32(_C8, b, np.float32(1)))
    if abs(n) > 192:
        return np.float32(0) if n <= 0 else np.float32(np.inf)
    return ldexp32(j, np.int32(n))  # j * 2^n exact in float64, then one rounding to float32


@njit(inline="always", **JIT)
def _expf_avx2(x):
    """ggml_v_expf on one float32 as the AVX2 build computes it (llama_ref.model.ggml.ggml_v_expf, isa
    "avx2"): the polynomial without its 1, then fma(k, j, k) with k = 2^n; for 126 < |n| <= 192 the power
    split as s2 * s1 (fma(s2, j, s2) rounded, then times s1); past 192, 0 or inf. Every power of two here is
    exact (ldexp32 of 1), as the exponent bits the C code writes are."""
    if x != x:  # NaN: itself
        return x
    n, b, u = _expf_reduce(x)
    j = fma32(fma32(fma32(_C4, b, _C5), u, fma32(_C6, b, _C7)), u, _C8 * b)  # _C8 * b: its own rounding
    a = abs(n)
    if a <= 126:
        k = ldexp32(np.float32(1), np.int32(n))
        return fma32(k, j, k)
    if a <= 192:
        if n <= 0:
            s2 = ldexp32(np.float32(1), np.int32(np.int32(n) + 125))
            return fma32(s2, j, s2) * ldexp32(np.float32(1), np.int32(-125))
        s2 = ldexp32(np.float32(1), np.int32(np.int32(n) - 127))
        return fma32(s2, j, s2) * ldexp32(np.float32(1), np.int32(127))
    return np.float32(0) if n <= 0 else np.float32(np.inf)  # s1 * s1: 2^-250 or 2^254


@njit(**JIT)
def _fp16_heads(x, out):
    """out (B, KVH, S, HD) = x (B, S, KVH, HD) rounded to fp16 (as float32): the F16 cache's values, each
    head's rows contiguous (vcvtps2ph, vcvtph2ps)."""
    B, S, KVH, HD = x.shape
    for b in range(B):
        for s in range(S):
            for h in range(KVH):
                for d in range(HD):
                    out[b, h, s, d] = fp16_round(x[b, s, h, d])


@njit(inline="always", **JIT)
def _scores(wide, rows, q, keys, row, visible, HD, scale, w, w_stride):
    """kernels/ggml_vec.f16_scores for `rows` (1 to 3) query heads in the build's lane order."""
    args = (q, keys, row, np.int64(visible), np.int64(HD), scale, w, w_stride)
    if wide:
        if rows == 3:
            f16_scores16_3(*args)
        elif rows == 2:
            f16_scores16_2(*args)
        else:
            f16_scores16_1(*args)
    elif rows == 3:
        f16_scores8_3(*args)
    elif rows == 2:
        f16_scores8_2(*args)
    else:
        f16_scores8_1(*args)


@njit(inline="always", **JIT)
def _columns(wide, rows, w, w_stride, values, row, visible, HD, acc, out):
    """kernels/ggml_vec.f16_columns for `rows` (1 to 3) probability rows in the build's lane order."""
    args = (w, w_stride, values, row, np.int64(visible), np.int64(HD), acc, out)
    if wide:
        if rows == 3:
            f16_columns16_3(*args)
        elif rows == 2:
            f16_columns16_2(*args)
        else:
            f16_columns16_1(*args)
    elif rows == 3:
        f16_columns8_3(*args)
    elif rows == 2:
        f16_columns8_2(*args)
    else:
        f16_columns8_1(*args)


@njit(parallel=True, **JIT)
def _attention(q, k, v, start_pos, scale, wide, out):
    """q (B, T, H, HD) float32, k, v (B, KVH, S, HD) fp16 values as float32 (HD a multiple of 8) -> out
    (B, T, H, HD): llama_ref.model.ggml.attention without a key mask, in the AVX-512 build's order (wide) or
    the AVX2 build's, by kernels/ggml_vec.py's vectors. One work item per (batch, KV head, position): its G
    query heads in groups of R (3, 2 or 1) that share every key and value row loaded."""
    B, T, H, HD = q.shape
    KVH, S = k.shape[1], k.shape[2]
    G = H // KVH
    R = 3 if G % 3 == 0 else 2 if G % 2 == 0 else 1
    P = (S + 63) // 64 * 64  # ggml's cache view, padded
    step = 64 if wide else 32  # GGML_F16_STEP: 4 accumulators of 16 or 8 lanes
    width = 16 if wide else 8  # the lanes of one softmax vector
    row = np.int64(4 * HD)  # bytes from one key (value) row to the next
    for item in prange(B * KVH * T):
        b, kvh, t = item // (KVH * T), item // T % KVH, item % T
        qh = np.empty((R, HD), np.float32)
        w = np.empty((R, P), np.float32)
        acc = np.empty((R, step, HD), np.float32)
        keys, values = np.int64(k[b, kvh].ctypes.data), np.int64(v[b, kvh].ctypes.data)
        wp, qp, ap = np.int64(w.ctypes.data), np.int64(qh.ctypes.data), np.int64(acc.ctypes.data)
        visible = min(S, start_pos + t + 1)  # keys up to the query's own position
        # past the visible keys exp(-inf) = 0: whole vectors of zeros add 0 to the float64 sum and zero
        # probabilities add +0 to V's accumulators, both nothing, so the loops stop at `used` / `visible`
        used = min(P, (visible + width - 1) // width * width)
        for h0 in range(kvh * G, kvh * G + G, R):
            for r in range(R):
                for d in range(HD):
                    qh[r, d] = fp16_round(q[b, t, h0 + r, d])
            # scores: ggml_vec_dot_f16(q, k_p) * scale for every visible key, -inf for the others
            _scores(wide, R, qp, keys, row, visible, HD, scale, wp, np.int64(4 * P))
            for r in range(R):
                for p in range(visible, used):
                    w[r, p] = -np.inf
                row_max = w[r, 0]
                for p in range(1, visible):
                    if w[r, p] > row_max:
                        row_max = w[r, p]
                # softmax: ggml_v_expf(x - max), the vectors' sums added in float64, times float32(1 / sum)
                wr = wp + 4 * P * r
                total = exp_sums16(wr, np.int64(used), row_max) if wide else exp_sums8(wr, np.int64(used), row_max)
                inv = np.float32(1.0 / total)
                for p in range(visible):
                    w[r, p] = fp16_round(w[r, p] * inv)
            # the probabilities times each column of V (transposed in llama.cpp)
            op = np.int64(out.ctypes.data) + 4 * (((b * T + t) * H + h0) * HD)
            _columns(wide, R, wp, np.int64(4 * P), values, row, visible, HD, ap, op)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
              key_mask: "np.ndarray | None" = None, isa: "str | None" = None) -> np.ndarray:
    """llama_ref.model.ggml.attention, compiled (a batch with a key mask, or a head size that is no multiple
    of 8: the specification's)."""
    isa = spec._isa(isa)
    HD = q.shape[-1]
    if key_mask is not None or q.dtype != np.float32 or HD % 8:
        return spec.attention(q, k, v, start_pos, key_mask, isa)
    B, S, KVH = k.shape[:3]
    kh = np.empty((B, KVH, S, HD), np.float32)  # the F16 cache: rounded once, each head's rows together
    vh = np.empty((B, KVH, S, HD), np.float32)
    _fp16_heads(np.ascontiguousarray(k, np.float32), kh)
    _fp16_heads(np.ascontiguousarray(v, np.float32), vh)
    out = np.empty(q.shape, np.float32)
    _attention(np.ascontiguousarray(q), kh, vh, start_pos, np.float32(1 / np.sqrt(HD)), isa == "avx512", out)
    return out


@njit(inline="always", **JIT)
def _rms_norm_row(x, weight, eps, out, n):
    D = x.shape[1]
    total = np.float64(0)
    for i in range(D):
        total += np.float64(x[n, i] * x[n, i])  # float32 products, summed in order in float64
    mean = np.float32(total / D)
    scale = np.float32(1) / np.sqrt(mean + eps)
    for i in range(D):
        out[n, i] = (x[n, i] * scale) * weight[i]


@njit(parallel=True, **JIT)
def _rms_norm(x, weight, eps, out):
    for n in prange(x.shape[0]):
        _rms_norm_row(x, weight, eps, out, n)


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


def rope_tables(freqs: np.ndarray, start_pos: int, length: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """llama_ref.model.ggml.rope_tables, compiled: cos, sin (T, HD/2)."""
    theta_scale, factor = spec.rope_scale_factors(freqs)
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
def _silu(x, wide):
    """ggml_v_silu: x / (1 + ggml_v_expf(-x)) (the AVX-512 or the AVX2 expf)."""
    return x / (np.float32(1) + (_expf(-x) if wide else _expf_avx2(-x)))


@njit(parallel=True, **JIT)
def _swiglu(g, u, wide, out):
    N, F = g.shape
    for n in prange(N):
        for i in range(F):
            out[n, i] = _silu(g[n, i], wide) * u[n, i]


@njit(**JIT)
def _swiglu_serial(g, u, wide, out):
    N, F = g.shape
    for n in range(N):
        for i in range(F):
            out[n, i] = _silu(g[n, i], wide) * u[n, i]


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


@njit(**JIT)
def _expf_array(x, wide, out):
    if wide:
        expf_array16(np.int64(x.ctypes.data), np.int64(x.shape[0]), np.int64(out.ctypes.data))
    else:
        expf_array8(np.int64(x.ctypes.data), np.int64(x.shape[0]), np.int64(out.ctypes.data))
