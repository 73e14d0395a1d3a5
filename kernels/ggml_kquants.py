"""Numba twin of llama_ref.model.ggml_kquants: Q4_K, Q5_K and Q6_K weights by Q8_K activations, compiled.

The NumPy module is the specification; these kernels compute the same numbers bit for bit
(tests/test_ggml_kquants.py): the activations are quantized by the specification's quantize_row_q8_K (O(K)
per row), the integer sums are exact in int32 in any order, and the float steps are the specification's, in
its order, each fused multiply-add one rounding (llvm.fma.f32). No fast-math.

The weights are read as llama_ref.weights.packed keeps them, nothing copied: `qs` (Q4_K: Q4_1-style
sub-blocks of 16 bytes, value j in the low nibble of byte j and j + 16 in its high nibble; Q5_K: one byte per
value, 0..31; Q6_K: one int8 per value, q - 32) and `head` (the file's scale bytes of every super-block:
Q4_K/Q5_K d | dmin | 12 bytes of 6-bit scales and mins, Q6_K 16 int8 scales | d), decoded per row here.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from llama_ref.model import ggml_kquants as spec

from ._common import JIT, readonly
from .ggml_simd import fma32
from .halfbits import f16_to_f32

ROWS = 16  # weight rows per parallel work item (a multiple of 8: the repacked Q4_K's groups)

I8, I16, I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


def _shuffle(builder, v, idx):
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(ir.VectorType(I32, len(idx)), idx))


@intrinsic
def _add_subblock_lanes(typingctx, acc, w, x, scale_lo, scale_hi, kind):
    """acc[u] += scale * lane u of one 32-value sub-block, u = 0..7: lane u is the sum of products 4u .. 4u+3
    (what _mm256_maddubs_epi16 then _mm256_madd_epi16 leave), scale is scale_lo for lanes 0..3 and scale_hi
    for 4..7 (Q6_K's two 16-value scales; Q4_K/Q5_K pass one scale twice); exact in int32. acc, w and x are
    byte addresses: acc 8 int32, x 32 int8 activations, w the weights as `kind` (a literal) stores them:
    0 Q4_K (16 bytes, value j in the low nibble of byte j and j + 16 in the high one), 1 Q5_K (32 bytes,
    0..31), 2 Q6_K (32 int8 q - 32, taken back to 0..63 as ggml does). Vector IR: LLVM selects vpmaddwd."""
    if not isinstance(kind, types.IntegerLiteral):
        return None
    k = kind.literal_value
    sig = types.void(types.int64, types.int64, types.int64, types.int32, types.int32, kind)

    def codegen(context, builder, signature, args):
        v16, v32, v8_32 = ir.VectorType(I8, 16), ir.VectorType(I8, 32), ir.VectorType(I32, 8)
        raw = builder.load(builder.inttoptr(args[1], ir.PointerType(v16 if k == 0 else v32)), align=1)
        if k == 0:
            lo = builder.and_(raw, ir.Constant(v16, [15] * 16))
            hi = builder.lshr(raw, ir.Constant(v16, [4] * 16))
            wv = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 32), list(range(32))))
        elif k == 2:
            wv = builder.add(raw, ir.Constant(v32, [32] * 32))
        else:
            wv = raw
        xv = builder.load(builder.inttoptr(args[2], ir.PointerType(v32)), align=1)
        w16 = builder.zext(wv, ir.VectorType(I16, 32))  # unsigned values
        x16 = builder.sext(xv, ir.VectorType(I16, 32))
        v16_32 = ir.VectorType(I32, 16)

        def products(idx):
            return builder.mul(builder.sext(_shuffle(builder, w16, idx), v16_32),
                               builder.sext(_shuffle(builder, x16, idx), v16_32))
        pairs = builder.add(products(list(range(0, 32, 2))), products(list(range(1, 32, 2))))  # (16,)
        lanes = builder.add(_shuffle(builder, pairs, list(range(0, 16, 2))),
                            _shuffle(builder, pairs, list(range(1, 16, 2))))  # (8,)
        scale = ir.Constant(v8_32, ir.Undefined)
        for u in range(8):
            scale = builder.insert_element(scale, args[3] if u < 4 else args[4], ir.Constant(I32, u))
        accp = builder.inttoptr(args[0], ir.PointerType(v8_32))
        builder.store(builder.add(builder.load(accp, align=4), builder.mul(lanes, scale)), accp, align=4)
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always", **JIT)
def _fma(a, b, c):
    """float32 a * b + c rounded once (llvm.fma.f32), as llama_ref.model.ggml.fma computes it."""
    return fma32(np.float32(a), np.float32(b), np.float32(c))


@njit(inline="always", **JIT)
def _f16(lo, hi):
    """Two little-endian bytes of an fp16 -> float32, exactly."""
    return f16_to_f32(np.uint16(np.uint16(lo) | (np.uint16(hi) << np.uint16(8))))


@njit(**JIT)
def _row_scales(head, r, sc, mn, dw, dminw):
    """Q4_K/Q5_K: decode row r's super-block headers (head (R, nb, 16)) into sc, mn (nb, 8) int32 (6-bit
    scales and mins, as weights.packed.kquant_scales) and dw, dminw (nb,) float32 (the fp16 d and dmin)."""
    for b in range(head.shape[1]):
        h = head[r, b]
        dw[b] = _f16(h[0], h[1])
        dminw[b] = _f16(h[2], h[3])
        for j in range(4):
            sc[b, j] = np.int32(h[4 + j]) & 63
            mn[b, j] = np.int32(h[8 + j]) & 63
            sc[b, 4 + j] = (np.int32(h[12 + j]) & 15) | ((np.int32(h[4 + j]) >> 6) << 4)
            mn[b, 4 + j] = (np.int32(h[12 + j]) >> 4) | ((np.int32(h[8 + j]) >> 6) << 4)


@njit(parallel=True, **JIT)
def _dot_q45_k(xq, xd, xbs, qs, head, four_bit, out):
    """ggml_vec_dot_q4_K_q8_K (four_bit) and ggml_vec_dot_q5_K_q8_K: xq (N, K) int8, xd (N, nb) float32,
    xbs (N, nb, 16) int32 bsums; qs, head as packed. out (N, R).

    8 lanes per super-block, lane u = sum_j sc[j] * (products 4u .. 4u+3 of sub-block j), fma(d_x d_w, lane,
    acc[u]); the mins: Q4_K in 4 float lanes (pairs of sub-blocks), Q5_K in one float32 scalar."""
    N, K = xq.shape
    R = qs.shape[0]
    nb = K // 256
    step = 16 if four_bit else 32  # weight bytes per sub-block
    for c in prange((R + ROWS - 1) // ROWS):
        sc = np.empty((nb, 8), np.int32)
        mn = np.empty((nb, 8), np.int32)
        dw = np.empty(nb, np.float32)
        dminw = np.empty(nb, np.float32)
        lanes = np.empty(8, np.int32)
        acc = np.empty(8, np.float32)
        s = np.empty(8, np.int32)
        la = lanes.ctypes.data
        for r in range(c * ROWS, min(R, (c + 1) * ROWS)):
            _row_scales(head, r, sc, mn, dw, dminw)
            wa = qs[r].ctypes.data
            for n in range(N):
                xa = xq[n].ctypes.data
                acc[:] = 0
                m0 = m1 = m2 = m3 = summs = np.float32(0)
                for b in range(nb):
                    lanes[:] = 0
                    for j in range(8):
                        sub = b * 8 + j
                        if four_bit:
                            _add_subblock_lanes(la, wa + 16 * sub, xa + 32 * sub, sc[b, j], sc[b, j], 0)
                        else:
                            _add_subblock_lanes(la, wa + step * sub, xa + 32 * sub, sc[b, j], sc[b, j], 1)
                    d = xd[n, b] * dw[b]
                    for u in range(8):
                        acc[u] = _fma(d, np.float32(lanes[u]), acc[u])
                    dmin = -(xd[n, b] * dminw[b])
                    for j in range(8):
                        s[j] = mn[b, j] * (xbs[n, b, 2 * j] + xbs[n, b, 2 * j + 1])
                    if four_bit:
                        m0 = _fma(dmin, np.float32(s[0] + s[1]), m0)
                        m1 = _fma(dmin, np.float32(s[2] + s[3]), m1)
                        m2 = _fma(dmin, np.float32(s[4] + s[5]), m2)
                        m3 = _fma(dmin, np.float32(s[6] + s[7]), m3)
                    else:
                        summs = _fma(dmin, np.float32(s.sum()), summs)
                main = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
                out[n, r] = main + ((m0 + m2) + (m1 + m3)) if four_bit else main + summs


@njit(parallel=True, **JIT)
def _gemv_q4_k(xq, xd, xbs, qs, head, out):
    """ggml_gemv_q4_K_8x8_q8_K (rows in groups of 8): one integer per super-block for the values (the sum
    of the 8 lanes of sc-scaled sub-blocks), one for the mins; acc = fma(iacc, d_w d_x, acc), acc_min
    likewise with dmin; out = acc - acc_min."""
    N, K = xq.shape
    R = qs.shape[0]
    nb = K // 256
    for c in prange((R + ROWS - 1) // ROWS):
        sc = np.empty((nb, 8), np.int32)
        mn = np.empty((nb, 8), np.int32)
        dw = np.empty(nb, np.float32)
        dminw = np.empty(nb, np.float32)
        lanes = np.empty(8, np.int32)
        la = lanes.ctypes.data
        for r in range(c * ROWS, min(R, (c + 1) * ROWS)):
            _row_scales(head, r, sc, mn, dw, dminw)
            wa = qs[r].ctypes.data
            for n in range(N):
                xa = xq[n].ctypes.data
                acc = np.float32(0)
                acc_min = np.float32(0)
                for b in range(nb):
                    lanes[:] = 0
                    imin = np.int32(0)
                    for j in range(8):
                        sub = b * 8 + j
                        _add_subblock_lanes(la, wa + 16 * sub, xa + 32 * sub, sc[b, j], sc[b, j], 0)
                        imin += mn[b, j] * (xbs[n, b, 2 * j] + xbs[n, b, 2 * j + 1])
                    iacc = lanes.sum()
                    acc = _fma(np.float32(iacc), dw[b] * xd[n, b], acc)
                    acc_min = _fma(np.float32(imin), dminw[b] * xd[n, b], acc_min)
                out[n, r] = acc - acc_min


@njit(parallel=True, **JIT)
def _dot_q6_k(xq, xd, xbs, qs, head, out):
    """ggml_vec_dot_q6_K_q8_K: qs (R, K) int8 bytes q - 32, head (R, nb, 18) 16 int8 scales | d fp16.

    Lane u of a super-block: sum_c sc[2c + (u >= 4)] * (products 32c + 4u .. 32c + 4u + 3 of the unsigned
    q = 0..63) - 32 (sc[2u] bsum[2u] + sc[2u+1] bsum[2u+1]); fma(d_x d_w, lane, acc[u]); hsum_float_8."""
    N, K = xq.shape
    R = qs.shape[0]
    nb = K // 256
    for c in prange((R + ROWS - 1) // ROWS):
        sc = np.empty((nb, 16), np.int32)
        dw = np.empty(nb, np.float32)
        lanes = np.empty(8, np.int32)
        acc = np.empty(8, np.float32)
        la = lanes.ctypes.data
        for r in range(c * ROWS, min(R, (c + 1) * ROWS)):
            for b in range(nb):
                h = head[r, b]
                for j in range(16):
                    sc[b, j] = np.int32(np.int8(h[j]))
                dw[b] = _f16(h[16], h[17])
            wa = qs[r].ctypes.data
            for n in range(N):
                xa = xq[n].ctypes.data
                acc[:] = 0
                for b in range(nb):
                    lanes[:] = 0
                    for j in range(8):
                        sub = b * 8 + j
                        _add_subblock_lanes(la, wa + 32 * sub, xa + 32 * sub, sc[b, 2 * j], sc[b, 2 * j + 1], 2)
                    d = xd[n, b] * dw[b]
                    for u in range(8):  # the -32 of every value, by the bsums (_mm256_madd_epi16 << 5)
                        off = sc[b, 2 * u] * xbs[n, b, 2 * u] + sc[b, 2 * u + 1] * xbs[n, b, 2 * u + 1]
                        acc[u] = _fma(d, np.float32(lanes[u] - 32 * off), acc[u])
                out[n, r] = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))


def quantized_linear(x2: np.ndarray, w) -> np.ndarray:
    """x2 (N, K) float32 @ w.T in ggml's arithmetic for a Q4_K / Q5_K / Q6_K weight w (R, K). -> (N, R)."""
    N, R = x2.shape[0], w.shape[0]
    xd, xq, xbs = spec.quantize_row_q8_K(x2)  # (N, nb), (N, nb, 256), (N, nb, 16)
    xq = xq.reshape(N, -1)
    out = np.empty((N, R), np.float32)
    qs, head = readonly(w.qs), readonly(w.head)
    if w.format == "q6_k":
        _dot_q6_k(xq, xd, xbs, qs, head, out)
    elif w.format == "q4_k" and R % 8 == 0:  # repacked by llama.cpp (spec.dot_for)
        _gemv_q4_k(xq, xd, xbs, qs, head, out)
    else:
        _dot_q45_k(xq, xd, xbs, qs, head, w.format == "q4_k", out)
    return out
