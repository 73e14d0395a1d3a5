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
from .ggml_simd import axpy32, f16_dots, fma32, fp16_round, ldexp32

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


@njit(inline="always", **JIT)
def _hsum8(v, o):
    """hsum_float_8 of v[o .. o+8] (the AVX2 softmax's sum of a vector): (i + i+4), then (0 + 2) + (1 + 3)."""
    a0, a1 = v[o] + v[o + 4], v[o + 1] + v[o + 5]
    a2, a3 = v[o + 2] + v[o + 6], v[o + 3] + v[o + 7]
    return (a0 + a2) + (a1 + a3)


@njit(inline="always", **JIT)
def _reduce8(t0, t1, t2, t3, t4, t5, t6, t7):
    """The end of GGML_F32x8_REDUCE: (i + i+4), then _mm_hadd_ps twice: (0 + 1) + (2 + 3)."""
    a0, a1, a2, a3 = t0 + t4, t1 + t5, t2 + t6, t3 + t7
    return (a0 + a1) + (a2 + a3)


@njit(inline="always", **JIT)
def _reduce16(v, o):
    """_mm512_reduce_add_ps of v[o .. o+16]: halves added 16 -> 8 -> 4 -> 2, then the two."""
    a0 = v[o] + v[o + 8]
    a1 = v[o + 1] + v[o + 9]
    a2 = v[o + 2] + v[o + 10]
    a3 = v[o + 3] + v[o + 11]
    a4 = v[o + 4] + v[o + 12]
    a5 = v[o + 5] + v[o + 13]
    a6 = v[o + 6] + v[o + 14]
    a7 = v[o + 7] + v[o + 15]
    b0, b1, b2, b3 = a0 + a4, a1 + a5, a2 + a6, a3 + a7
    return (b0 + b2) + (b1 + b3)


@njit(inline="always", **JIT)
def _finish_columns(acc, out):
    """The end of ggml_vec_dot_f16 for every column of acc (64, HD) at once -> out (HD,): accumulators
    (0 + 2) + (1 + 3), then reduce_add_16 (16 -> 8 -> 4 -> 2 -> 1). Column d is what _finish_f16 gives."""
    HD = acc.shape[1]
    t = np.empty((16, HD), np.float32)
    for i in range(16):
        for d in range(HD):
            t[i, d] = (acc[i, d] + acc[32 + i, d]) + (acc[16 + i, d] + acc[48 + i, d])
    for half in (8, 4, 2, 1):
        for i in range(half):
            for d in range(HD):
                t[i, d] = t[i, d] + t[i + half, d]
    for d in range(HD):
        out[d] = t[0, d]


@njit(inline="always", **JIT)
def _finish_columns_avx2(acc, out):
    """The end of ggml_vec_dot_f16 on AVX2 for every column of acc (32, HD): accumulator c is rows 8c .. 8c+7;
    (0 + 2) + (1 + 3), then GGML_F32x8_REDUCE's lanes (_reduce8)."""
    for d in range(acc.shape[1]):
        out[d] = _reduce8(_acc_lane(acc, 0, d), _acc_lane(acc, 1, d), _acc_lane(acc, 2, d), _acc_lane(acc, 3, d),
                          _acc_lane(acc, 4, d), _acc_lane(acc, 5, d), _acc_lane(acc, 6, d), _acc_lane(acc, 7, d))


@njit(inline="always", **JIT)
def _acc_lane(acc, i, d):
    """Lane i of (accumulator 0 + 2) + (1 + 3), accumulator c being rows 8c .. 8c+7 of acc (32, HD)."""
    return (acc[i, d] + acc[16 + i, d]) + (acc[8 + i, d] + acc[24 + i, d])


@njit(inline="always", **JIT)
def _f16_dot_avx2(qh, keys, p, m, acc):
    """ggml_vec_dot_f16's SIMD part on AVX2 of q (fp16 values) with key row p (rounded to fp16 here): 4
    accumulators of 8 lanes (acc (32, 1), the caller's scratch) over the first m = HD - HD % 32 values,
    (0 + 2) + (1 + 3), _reduce8."""
    acc[:] = 0
    for s in range(0, m, 32):
        for i in range(32):
            acc[i, 0] += qh[s + i] * fp16_round(keys[p, s + i])  # exact product, one rounding
    return _reduce8(_acc_lane(acc, 0, 0), _acc_lane(acc, 1, 0), _acc_lane(acc, 2, 0), _acc_lane(acc, 3, 0),
                    _acc_lane(acc, 4, 0), _acc_lane(acc, 5, 0), _acc_lane(acc, 6, 0), _acc_lane(acc, 7, 0))


@njit(**JIT)
def _to_fp16(x, out):
    """out = x rounded to fp16 (as float32), x and out flat (vcvtps2ph, vcvtph2ps: memory speed, one thread)."""
    for i in range(x.shape[0]):
        out[i] = fp16_round(x[i])


@njit(parallel=True, **JIT)
def _attention(q, k, v, start_pos, scale, wide, out):
    """q (B, T, H, HD), k, v (B, S, KVH, HD) float32 (v holding fp16 values) -> out (B, T, H, HD):
    llama_ref.model.ggml.attention without a key mask, K rounded to fp16 as it is read, in the AVX-512
    build's order (wide) or the AVX2 build's. One work item per (batch, position, head)."""
    B, T, H, HD = q.shape
    S, KVH = v.shape[1], v.shape[2]
    G = H // KVH
    P = (S + 63) // 64 * 64
    step = 64 if wide else 32  # GGML_F16_STEP: 4 accumulators of 16 or 8 lanes
    width = 16 if wide else 8  # the lanes of one softmax vector
    m = HD - HD % step
    for item in prange(B * T * H):
        b, rest = item // (T * H), item % (T * H)
        t, h = rest // H, rest % H
        kvh = h // G
        last = start_pos + t  # the last visible key
        qh = np.empty(HD, np.float32)
        for d in range(HD):
            qh[d] = fp16_round(q[b, t, h, d])
        # scores: ggml_vec_dot_f16(q, k_p) for every visible key, times the scale; -inf for the others
        w = np.full(P, -np.inf, np.float32)
        visible = min(S, last + 1)
        keys = k[b, :, kvh]  # (S, HD), rows KVH * HD apart
        if wide:
            f16_dots(np.int64(qh.ctypes.data), np.int64(keys.ctypes.data), np.int64(4 * KVH * HD),
                     np.int64(visible), np.int64(m // 64), np.int64(w.ctypes.data))
        else:
            acc = np.empty((32, 1), np.float32)
            for p in range(visible):
                w[p] = _f16_dot_avx2(qh, keys, p, m, acc)
        for p in range(visible):
            total = np.float64(w[p])
            for i in range(m, HD):  # the leftovers of HD % 64, one by one in float64
                total += np.float64(qh[i] * fp16_round(keys[p, i]))
            w[p] = np.float32(total) * scale
        # softmax: minus the maximum, ggml_v_expf, sums of 16 (8) in float32 added in float64, times 1 / sum.
        # Past the visible keys exp(-inf) = 0: whole chunks of zeros add 0 to the float64 sum and zero
        # probabilities add +0 to V's accumulators, both exactly nothing, so the loops stop at `used`.
        used = min(P, (visible + width - 1) // width * width)
        row_max = w[0]
        for p in range(1, visible):
            if w[p] > row_max:
                row_max = w[p]
        total = np.float64(0)
        if wide:
            for p in range(used):
                w[p] = _expf(w[p] - row_max)
            for c in range(used // 16):
                total += np.float64(_reduce16(w, 16 * c))
        else:
            for p in range(used):
                w[p] = _expf_avx2(w[p] - row_max)
            for c in range(used // 8):
                total += np.float64(_hsum8(w, 8 * c))
        inv = np.float32(1.0 / total)
        for p in range(visible):
            w[p] = fp16_round(w[p] * inv)
        # the probabilities times each column of V (transposed in llama.cpp): ggml_vec_dot_f16 over P keys,
        # key p into accumulator lane p % 64 (AVX2: p % 32) of every column
        accv = np.zeros((step, HD), np.float32)
        a0, vrow = np.int64(accv.ctypes.data), np.int64(v[b, 0, kvh].ctypes.data)
        for p in range(visible):  # accv[p % step] += w[p] * v[p]
            axpy32(a0 + 4 * HD * (p % step), w[p], vrow + 4 * KVH * HD * p, np.int64(HD))
        # (P % 64 == 0: no leftover products, and the float64 sum of one float32 rounds back to it)
        if wide:
            _finish_columns(accv, out[b, t, h])
        else:
            _finish_columns_avx2(accv, out[b, t, h])


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
              key_mask: "np.ndarray | None" = None, isa: "str | None" = None) -> np.ndarray:
    """llama_ref.model.ggml.attention, compiled (a batch with a key mask: the specification's)."""
    isa = spec._isa(isa)
    if key_mask is not None or q.dtype != np.float32:
        return spec.attention(q, k, v, start_pos, key_mask, isa)
    out = np.empty(q.shape, np.float32)
    HD = q.shape[-1]
    vh = np.empty(v.shape, np.float32)  # the F16 cache's values (the keys are rounded as they are read)
    _to_fp16(np.ascontiguousarray(v, np.float32).reshape(-1), vh.reshape(-1))
    _attention(np.ascontiguousarray(q), np.ascontiguousarray(k, np.float32), vh, start_pos,
               np.float32(1 / np.sqrt(HD)), isa == "avx512", out)
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
    """ggml_v_expf elementwise, compiled (for the tests)."""
    x = np.ascontiguousarray(x, np.float32)
    return _expf_array(x.reshape(-1), spec._isa(isa) == "avx512").reshape(x.shape)


@njit(**JIT)
def _expf_array(x, wide):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = _expf(x[i]) if wide else _expf_avx2(x[i])
    return out
