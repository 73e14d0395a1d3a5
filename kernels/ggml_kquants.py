"""Numba twin of llama_ref.model.ggml_kquants: Q4_K, Q5_K and Q6_K weights by Q8_K activations, compiled.

The NumPy module is the specification; these kernels compute the same numbers bit for bit
(tests/test_ggml_kquants.py): the activations are quantized to Q8_K as the specification does (compiled:
NumPy's version costs ~40 us a call, and a decode step makes ~7 per layer), the integer sums are exact in
int32 in any order, and the float steps are the specification's, in its order, each fused multiply-add one
rounding (llvm.fma.f32). No fast-math.

The weights are read as llama_ref.weights.packed keeps them, nothing copied. Q4_K: `qs` (Q4_1-style sub-blocks
of 16 bytes, value j in the low nibble of byte j and j + 16 in its high nibble) and `head` (the file's d | dmin
| 12 bytes of 6-bit scales and mins of every super-block), decoded per row here. Q5_K and Q6_K: `blocks`, the
file's bytes, their five or six bits and their headers unpacked in registers.

Q4_K's inner loop is one LLVM vector-IR intrinsic per super-block (_superblock): the 8 int32 lanes of each
32-value sub-block, scaled by the sub-block scales and summed in registers, then one 8-lane llvm.fma. Q5_K's
and Q6_K's are one function per tile of a weight row by ACTS activation rows over the whole row
(_define_q5_k_tile, _define_q6_k_tile: each super-block unpacked once for all of them, lanes and
accumulators in registers). The
K-quants' values are unsigned, so they enter the unsigned side of the integer instructions as they stand:
vpdpbusd where the CPU has AVX-512 VNNI / AVX-VNNI, else AVX2's vpmaddubsw (pairs into int16, exact: see
ggml_simd.lanes_u8s8) then vpmaddwd by the scales (pairs into int32, as llama.cpp's AVX2 code does), else
portable IR. Which integer code runs is chosen at run time as in kernels/ggml.py (simd 0 portable, 2 AVX2,
1 the best; LLAMA_REF_GGML_PORTABLE=1 forces the portable one); all give the same integers.
Numba's on-disk cache checks a kernel against its own file only: after editing kernels/ggml_simd.py delete
kernels/__pycache__/ggml_kquants*.nbi and *.nbc.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ._common import JIT, readonly
from .ggml_simd import (AHEAD_BYTES, _declare, _gep_load, _hsum8, _prefetch, _ptr, _rows_ahead, _shuffle, dispatch,
                        fma32, lanes_portable, lanes_u8s8, madd16, pairs_u8s8, prefetch, roundeven32, simd_default)
from .halfbits import f16_to_f32

ROWS = 16  # weight rows per parallel work item (a multiple of 8: the repacked Q4_K's groups)

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
# The best integer instructions of this CPU (VNNI, else AVX2), unless LLAMA_REF_GGML_PORTABLE=1 asks for the
# portable integer code (same results).
SIMD = simd_default()


def _superblock_ir(builder, args, kind, isa):
    """The body of _superblock (below) for one choice of integer instructions (isa: "vnni", "avx2",
    "portable")."""
    acc_a, w_a, x_a, sc_a, off_a, d = args[:6]
    store_int = kind == 3  # 3: the integer lanes stored, no fma
    v16, v32, v8_32, v8_f = ir.VectorType(I8, 16), ir.VectorType(I8, 32), ir.VectorType(I32, 8), ir.VectorType(F32, 8)
    total = ir.Constant(v8_32, [0] * 8)
    for j in range(8):  # Q4_K: 16 bytes per sub-block, value i low nibble of byte i, value i + 16 its high nibble
        raw = builder.load(builder.inttoptr(builder.add(w_a, ir.Constant(I64, 16 * j)), ir.PointerType(v16)), align=1)
        lo = builder.and_(raw, ir.Constant(v16, [15] * 16))
        hi = builder.lshr(raw, ir.Constant(v16, [4] * 16))
        wv = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 32), list(range(32))))
        xv = builder.load(builder.inttoptr(builder.add(x_a, ir.Constant(I64, 32 * j)), ir.PointerType(v32)), align=1)
        scp = builder.inttoptr(builder.add(sc_a, ir.Constant(I64, 8 * j)), ir.PointerType(ir.VectorType(I32, 2)))
        sc2 = builder.load(scp, align=4)  # the scales of the sub-block's two 16-value halves
        if isa == "avx2":  # vpmaddwd multiplies by the scales as it adds pairs: |sc| <= 128, exact in int32
            sc16 = builder.trunc(sc2, ir.VectorType(I16, 2))
            sc16 = builder.shuffle_vector(sc16, sc16, ir.Constant(ir.VectorType(I32, 16), [0] * 8 + [1] * 8))
            total = builder.add(total, madd16(builder, pairs_u8s8(builder, wv, xv), sc16))
            continue
        scale = builder.shuffle_vector(sc2, sc2, ir.Constant(v8_32, [0, 0, 0, 0, 1, 1, 1, 1]))
        lanes = lanes_u8s8(builder, wv, xv, isa) if isa == "vnni" else lanes_portable(builder, wv, xv, False)
        total = builder.add(total, builder.mul(lanes, scale))
    total = builder.sub(total, builder.load(builder.inttoptr(off_a, ir.PointerType(v8_32)), align=4))
    if store_int:
        builder.store(total, builder.inttoptr(acc_a, ir.PointerType(v8_32)), align=4)
        return
    accp = builder.inttoptr(acc_a, ir.PointerType(v8_f))
    dv = builder.insert_element(ir.Constant(v8_f, ir.Undefined), d, ir.Constant(I32, 0))
    dv = builder.shuffle_vector(dv, dv, ir.Constant(v8_32, [0] * 8))
    fma = builder.module.globals.get("llvm.fma.v8f32") or ir.Function(
        builder.module, ir.FunctionType(v8_f, [v8_f] * 3), "llvm.fma.v8f32")
    builder.store(builder.call(fma, [dv, builder.sitofp(total, v8_f), builder.load(accp, align=4)]), accp, align=4)


@intrinsic
def _superblock(typingctx, acc, w, x, sc, off, d, simd, kind):
    """One super-block of a Q4_K row into ggml's 8 float32 lanes: acc[u] = fma(d, lane u, acc[u]) with
    lane u = sum_j sc[2j + (u >= 4)] * (products 4u .. 4u+3 of sub-block j) - off[u], exact in int32.

    acc (8 float32), w (the row's Q4_K bytes of this super-block as weights.packed keeps them: 16 bytes per
    sub-block, value i in the low nibble of byte i and i + 16 in the high one), x (256 int8 activations), sc
    (16 int32: the scale of each 16-value half sub-block, each sub-block's scale twice), off (8 int32) are byte
    addresses; d float32 (d_x * d_w); simd (int): the integer instructions, as ggml_simd.dispatch chooses them
    (0 portable, 2 AVX2, else the best of this CPU), same integers. kind 0: the fma; kind 3: the integer
    lanes are stored at acc (8 int32) instead (the repacked gemv sums them).
    One call keeps the 8 lanes in registers across the super-block."""
    if not isinstance(kind, types.IntegerLiteral):
        return None
    k = kind.literal_value
    sig = types.void(types.int64, types.int64, types.int64, types.int64, types.int64, types.float32,
                     types.int64, kind)

    def codegen(context, builder, signature, args):
        dispatch(builder, args[6], lambda isa: _superblock_ir(builder, args, k, isa))
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
def _row_scales(head, r, sc16, mn, dw, dminw):
    """Q4_K: decode row r's super-block headers (head (R, nb, 16)) into sc16 (nb, 16) int32 (each 6-bit
    sub-block scale twice, once per 16-value half, as _superblock reads them), mn (nb, 8) int32 (the 6-bit
    mins, as weights.packed.kquant_scales) and dw, dminw (nb,) float32 (the fp16 d and dmin)."""
    for b in range(head.shape[1]):
        h = head[r, b]
        dw[b] = _f16(h[0], h[1])
        dminw[b] = _f16(h[2], h[3])
        for j in range(4):
            lo = np.int32(h[4 + j]) & 63
            hi = (np.int32(h[12 + j]) & 15) | ((np.int32(h[4 + j]) >> 6) << 4)
            sc16[b, 2 * j] = sc16[b, 2 * j + 1] = lo
            sc16[b, 8 + 2 * j] = sc16[b, 9 + 2 * j] = hi
            mn[b, j] = np.int32(h[8 + j]) & 63
            mn[b, 4 + j] = (np.int32(h[12 + j]) >> 4) | ((np.int32(h[8 + j]) >> 6) << 4)


@njit(inline="always", **JIT)
def _prefetch_superblock(wa, ha, ahead, row_bytes, head_bytes, b, sb_bytes):
    """Ask for super-block b of the row `ahead` rows on (its quants, sb_bytes at wa, and its 16-byte header
    at ha): a decode's weights, streamed once, requested spread over the loop as ggml_simd._prefetch_ahead
    does (a prefetch past the end of a matrix never faults)."""
    pa = wa + ahead * row_bytes + sb_bytes * b
    for off in range(0, sb_bytes, 64):
        prefetch(pa + off)
    prefetch(ha + ahead * head_bytes + 16 * b)


@njit(inline="always", **JIT)
def _q4_k_rows(xq, xd, xbs, qs, head, simd, out, r0, r1, ahead):
    """Rows r0 .. r1 - 1 of _dot_q4_k; ahead > 0: a decode, asking for the row `ahead` rows on."""
    N, K = xq.shape
    nb = K // 256
    sc16 = np.empty((nb, 16), np.int32)
    mn = np.empty((nb, 8), np.int32)
    dw = np.empty(nb, np.float32)
    dminw = np.empty(nb, np.float32)
    acc = np.empty(8, np.float32)
    zero = np.zeros(8, np.int32)
    s = np.empty(8, np.int32)
    aa, za, sa = acc.ctypes.data, zero.ctypes.data, sc16.ctypes.data
    for r in range(r0, r1):
        _row_scales(head, r, sc16, mn, dw, dminw)
        wa = qs[r].ctypes.data
        ha = head[r].ctypes.data
        for n in range(N):
            xa = xq[n].ctypes.data
            acc[:] = 0
            m0 = m1 = m2 = m3 = np.float32(0)
            for b in range(nb):
                if ahead:
                    _prefetch_superblock(wa, ha, ahead, qs.shape[1], 16 * nb, b, 128)
                _superblock(aa, wa + 128 * b, xa + 256 * b, sa + 64 * b, za, xd[n, b] * dw[b], simd, 0)
                dmin = -(xd[n, b] * dminw[b])
                for j in range(8):
                    s[j] = mn[b, j] * (xbs[n, b, 2 * j] + xbs[n, b, 2 * j + 1])
                m0 = _fma(dmin, np.float32(s[0] + s[1]), m0)
                m1 = _fma(dmin, np.float32(s[2] + s[3]), m1)
                m2 = _fma(dmin, np.float32(s[4] + s[5]), m2)
                m3 = _fma(dmin, np.float32(s[6] + s[7]), m3)
            main = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]))
            out[n, r] = main + ((m0 + m2) + (m1 + m3))


@njit(parallel=True, **JIT)
def _dot_q4_k(xq, xd, xbs, qs, head, simd, out):
    """ggml_vec_dot_q4_K_q8_K (rows not in groups of 8): xq (N, K) int8, xd (N, nb) float32, xbs (N, nb, 16)
    int32 bsums; qs, head as packed. out (N, R).

    8 lanes per super-block, lane u = sum_j sc[j] * (products 4u .. 4u+3 of sub-block j), fma(d_x d_w, lane,
    acc[u]) (_superblock); the mins in 4 float lanes (pairs of sub-blocks)."""
    R = qs.shape[0]
    for c in prange((R + ROWS - 1) // ROWS):
        _q4_k_rows(xq, xd, xbs, qs, head, simd, out, c * ROWS, min(R, (c + 1) * ROWS), 0)


@njit(inline="always", **JIT)
def _gemv_q4_k_rows(xq, xd, xbs, qs, head, simd, out, r0, r1, ahead):
    """Rows r0 .. r1 - 1 of _gemv_q4_k; ahead > 0: a decode, asking for the row `ahead` rows on."""
    N, K = xq.shape
    nb = K // 256
    sc16 = np.empty((nb, 16), np.int32)
    mn = np.empty((nb, 8), np.int32)
    dw = np.empty(nb, np.float32)
    dminw = np.empty(nb, np.float32)
    lanes = np.empty(8, np.int32)
    zero = np.zeros(8, np.int32)
    la, za, sa = lanes.ctypes.data, zero.ctypes.data, sc16.ctypes.data
    for r in range(r0, r1):
        _row_scales(head, r, sc16, mn, dw, dminw)
        wa = qs[r].ctypes.data
        ha = head[r].ctypes.data
        for n in range(N):
            xa = xq[n].ctypes.data
            acc = np.float32(0)
            acc_min = np.float32(0)
            for b in range(nb):
                if ahead:
                    _prefetch_superblock(wa, ha, ahead, qs.shape[1], 16 * nb, b, 128)
                _superblock(la, wa + 128 * b, xa + 256 * b, sa + 64 * b, za, np.float32(0), simd, 3)
                imin = np.int32(0)
                for j in range(8):
                    imin += mn[b, j] * (xbs[n, b, 2 * j] + xbs[n, b, 2 * j + 1])
                acc = _fma(np.float32(lanes.sum()), dw[b] * xd[n, b], acc)
                acc_min = _fma(np.float32(imin), dminw[b] * xd[n, b], acc_min)
            out[n, r] = acc - acc_min


@njit(parallel=True, **JIT)
def _gemv_q4_k(xq, xd, xbs, qs, head, simd, out):
    """ggml_gemv_q4_K_8x8_q8_K (rows in groups of 8): one integer per super-block for the values (the sum
    of the 8 lanes of sc-scaled sub-blocks), one for the mins; acc = fma(iacc, d_w d_x, acc), acc_min
    likewise with dmin; out = acc - acc_min."""
    R = qs.shape[0]
    for c in prange((R + ROWS - 1) // ROWS):
        _gemv_q4_k_rows(xq, xd, xbs, qs, head, simd, out, c * ROWS, min(R, (c + 1) * ROWS), 0)


@njit(**JIT)
def _decode_q4_k(xq, xd, xbs, qs, head, repacked, simd, out):
    """One activation row on one thread, Q4_K (repacked: the gemv's order): no parallel region (~15 us a
    call), the weights asked for ~4 KB ahead (ggml_simd.AHEAD_BYTES)."""
    ahead = max(1, (AHEAD_BYTES + qs.shape[1] - 1) // qs.shape[1])
    if repacked:
        _gemv_q4_k_rows(xq, xd, xbs, qs, head, simd, out, 0, qs.shape[0], ahead)
    else:
        _q4_k_rows(xq, xd, xbs, qs, head, simd, out, 0, qs.shape[0], ahead)


# ---- Q6_K: the file's bytes, unpacked in registers -----------------------------------------------------------

# A Q6_K prefill tile: one weight row by ACTS activation rows, each super-block of the row unpacked once for
# all of them. Measured (576 x 1536, N = 512, one thread, against the kernel before it, interleaved): 1 x 6
# 1.77-1.92x, 1 x 5 1.65-1.87x, 1 x 4 1.45-1.69x, 1 x 8 1.18-1.34x, 2 x 4 1.39x, 4 x 2 1.01-1.17x (more rows or
# activations than AVX2's 16 registers hold, and LLVM spills the lanes to the stack).
ACTS = 6
Q5_BYTES = 176  # a Q5_K super-block in the file: d | dmin | 12 bytes scales | 32 bytes qh | 128 bytes ql
Q6_BYTES = 210  # a super-block in the file: 128 bytes ql (low nibbles) | 64 bytes qh (2 high bits) | 16 int8
# scales | d fp16


def _q6_k_value_chunk(b, ql, qh, k):
    """Chunk k (0..3, 32 values) of a 128-value half of a Q6_K super-block from the file's bytes -> <32 x i8>
    values 0..63 in value order: the low (k < 2) or high nibble of ql (the half's ql bytes 32 (k % 2) ..
    32 (k % 2) + 31) and bits 2k, 2k+1 of qh (its 32 qh bytes). ggml's q4bits / q4bitsH: shifts, ands and
    ors (byte shifts are word shifts and a mask on x86, as in llama.cpp)."""
    v32 = ir.VectorType(I8, 32)

    def const(v):
        return ir.Constant(v32, [v] * 32)
    low = b.and_(ql, const(15)) if k < 2 else b.lshr(ql, const(4))
    high = b.shl(b.and_(qh if k == 0 else b.lshr(qh, const(2 * k)), const(3)), const(4))
    return b.or_(low, high)


def _define_q6_k_tile(module, rows, acts, isa):
    """void f(w, ws, x, xstride, xd, bs, xds, bss, nb, out, ostride): ggml_vec_dot_q6_K_q8_K of `rows` weight
    rows (the file's Q6_K blocks from byte address w, rows ws bytes apart) with `acts` activation rows (Q8_K:
    int8 from x, xstride bytes apart; float32 scales xd, xds bytes apart; int32 bsums bs, bss bytes apart),
    nb super-blocks each -> out[a * ostride + 4 r] float32.

    Per super-block each weight row is unpacked once (_q6_k_values) and its scales widened once, and meet
    every activation row of the tile; each (row, activation) pair keeps its own 8 float32 lanes in ggml's
    order: lane u = sum_c sc[2c + (u >= 4)] * (products 32c + 4u .. 32c + 4u + 3 of the unsigned q) -
    32 (sc[2u] bsum[2u] + sc[2u+1] bsum[2u+1]), exact in int32 (AVX2: vpmaddubsw, then vpmaddwd by the
    scales, as llama.cpp; the offsets _mm256_madd_epi16(bsums, scales) << 5, here by the scales times 32,
    the same integers); acc[u] = fma(d_x d_w, lane u, acc[u]); hsum_float_8 at the end. acts == 1 tiles
    (a decode) ask for the weights ~4 KB ahead, a super-block's share per super-block."""
    name = f"llama_ref_ggml_q6_k_{rows}x{acts}_{isa}"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 11), name)
    fn.linkage = "internal"
    w, ws, x, xstride, xd, bs, xds, bss, nb, out, ostride = fn.args
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    v8f, v32, v16 = ir.VectorType(F32, 8), ir.VectorType(I8, 32), ir.VectorType(I8, 16)
    v16_16, v16_32 = ir.VectorType(I16, 16), ir.VectorType(I32, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero8 = ir.Constant(v8f, [0.0] * 8)
    fma_v = _declare(module, "llvm.fma.v8f32", v8f, [v8f] * 3)
    b = ir.IRBuilder(entry)
    ahead = _rows_ahead(b, ws, rows)
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)

    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    accs = [b.phi(v8f) for _ in range(rows * acts)]  # pair (r, a) at r * acts + a
    blk = b.mul(i, c64(Q6_BYTES))
    if acts == 1:  # a decode: this super-block's share of the rows `ahead` on (210 bytes: 4 lines)
        pa = b.add(b.add(w, b.mul(ws, ahead)), b.mul(blk, c64(rows)))
        for off in range(0, rows * Q6_BYTES, 64):
            _prefetch(b, b.add(pa, c64(off)))

    def splat(v):
        return _shuffle(b, b.insert_element(ir.Constant(v8f, ir.Undefined), v, ir.Constant(I32, 0)), [0] * 8)

    # Emitted chunk by chunk (32 values), in the order the registers allow: each row's chunk is unpacked
    # from its bytes and meets each activation's chunk, into the (row, activation) pair's integer lanes.
    # The scales as the instructions take them: AVX2 <16 x i16> per chunk, sc[2c] for its first 16 values
    # and sc[2c+1] for the rest (vpmaddwd); else <8 x i32>.
    wb = [b.add(b.add(w, b.mul(c64(r), ws)), blk) for r in range(rows)]
    xa = [b.add(b.add(x, b.mul(c64(a), xstride)), b.mul(i, c64(256))) for a in range(acts)]
    sc = [b.sext(_gep_load(b, wb[r], c64(192), v16, 1), v16_16 if isa == "avx2" else v16_32) for r in range(rows)]
    totals = [None] * (rows * acts)  # pair (r, a) at r * acts + a
    for c in range(8):
        h, k = divmod(c, 4)  # chunk k of the 128-value half h
        for r in range(rows):
            ql = _gep_load(b, wb[r], c64(64 * h + 32 * (k % 2)), v32, 1)
            qh = _gep_load(b, wb[r], c64(128 + 32 * h), v32, 1)
            vals = _q6_k_value_chunk(b, ql, qh, k)
            if isa == "avx2":
                scale = _shuffle(b, sc[r], [2 * c] * 8 + [2 * c + 1] * 8)
            else:
                scale = _shuffle(b, sc[r], [2 * c] * 4 + [2 * c + 1] * 4)
            for a in range(acts):
                xv = _gep_load(b, xa[a], c64(32 * c), v32, 1)
                if isa == "avx2":
                    part = madd16(b, pairs_u8s8(b, vals, xv), scale)
                else:
                    lanes = (lanes_u8s8(b, vals, xv, isa) if isa == "vnni" else lanes_portable(b, vals, xv, False))
                    part = b.mul(lanes, scale)
                t = r * acts + a
                totals[t] = part if totals[t] is None else b.add(totals[t], part)

    # the -32 of every value: 32 (sc[2u] bsum[2u] + sc[2u+1] bsum[2u+1]) per lane (|32 sc| <= 4096 and
    # |bsum| <= 16 * 127: int16 for vpmaddwd), then the float lanes
    even, odd = list(range(0, 16, 2)), list(range(1, 16, 2))
    five = ir.Constant(sc[0].type, [5] * 16)
    sc32 = [b.shl(sc[r], five) for r in range(rows)]
    dw = [b.fpext(_gep_load(b, wb[r], c64(208), ir.HalfType(), 1), F32) for r in range(rows)]
    new_accs = [None] * (rows * acts)
    for a in range(acts):
        bsum = _gep_load(b, b.add(bs, b.mul(c64(a), bss)), b.mul(i, c64(64)), v16_32, 4)
        xdv = _gep_load(b, b.add(xd, b.mul(c64(a), xds)), b.mul(i, c64(4)), F32, 4)
        for r in range(rows):
            if isa == "avx2":
                offset = madd16(b, sc32[r], b.trunc(bsum, v16_16))
            else:
                prod = b.mul(sc32[r], bsum)  # (16,) int32: 32 sc[k] bsum[k]
                offset = b.add(_shuffle(b, prod, even), _shuffle(b, prod, odd))
            t = r * acts + a
            d = b.fmul(xdv, dw[r])  # float32 d_x * d_w
            new_accs[t] = b.call(fma_v, [splat(d), b.sitofp(b.sub(totals[t], offset), v8f), accs[t]])
    i1 = b.add(i, c64(1))
    b.cbranch(b.icmp_signed("<", i1, nb), loop, done)
    i.add_incoming(c64(0), entry)
    i.add_incoming(i1, loop)
    for phi, val in zip(accs, new_accs):
        phi.add_incoming(zero8, entry)
        phi.add_incoming(val, loop)

    b = ir.IRBuilder(done)
    finals = []
    for val in new_accs:  # the phis first, as LLVM requires
        phi = b.phi(v8f)
        phi.add_incoming(zero8, entry)
        phi.add_incoming(val, loop)
        finals.append(phi)
    for r in range(rows):
        for a in range(acts):
            at = b.add(b.add(out, b.mul(c64(a), ostride)), c64(4 * r))
            b.store(_hsum8(b, finals[r * acts + a]), _ptr(b, at, F32), align=4)
    b.ret_void()
    return fn


def _define_q5_k_tile(module, acts, isa):
    """void f(w, ws, x, xstride, xd, bs, xds, bss, nb, out, ostride): ggml_vec_dot_q5_K_q8_K of one weight row
    (the file's Q5_K blocks at byte address w; ws, the row's bytes, sets how far ahead a decode asks for
    them) with `acts` activation rows (as _define_q6_k_tile's), nb super-blocks -> out[a * ostride].

    Per super-block the row's header is decoded once in registers (llama.cpp's utmp / kmask words: the 6-bit
    scales sc and mins mn from 12 bytes, fp16 d and dmin) and its values unpacked once (low or high nibble
    of ql | bit j of qh << 4), and meet every activation row: lane u = sum_j sc[j] * (products 4u .. 4u+3 of
    sub-block j), exact in int32 (AVX2: vpmaddubsw, then vpmaddwd by the scales), acc[u] = fma(d_x d_w,
    lane u, acc[u]); the mins as one integer sum_j mn[j] (bsum[2j] + bsum[2j+1]) (exact in any order),
    summs = fma(-(d_x dmin_w), that, summs). Result hsum_float_8(acc) + summs."""
    name = f"llama_ref_ggml_q5_k_1x{acts}_{isa}"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 11), name)
    fn.linkage = "internal"
    w, ws, x, xstride, xd, bs, xds, bss, nb, out, ostride = fn.args
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    v8f, v32, v4 = ir.VectorType(F32, 8), ir.VectorType(I8, 32), ir.VectorType(I8, 4)
    v8i, v16_32 = ir.VectorType(I32, 8), ir.VectorType(I32, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero8 = ir.Constant(v8f, [0.0] * 8)
    fma_v = _declare(module, "llvm.fma.v8f32", v8f, [v8f] * 3)
    fma_s = _declare(module, "llvm.fma.f32", F32, [F32] * 3)
    b = ir.IRBuilder(entry)
    ahead = _rows_ahead(b, ws, 1)
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)

    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    accs = [b.phi(v8f) for _ in range(acts)]
    summs = [b.phi(F32) for _ in range(acts)]
    wb = b.add(w, b.mul(i, c64(Q5_BYTES)))
    if acts == 1:  # a decode: this super-block of the row `ahead` on (176 bytes: 3-4 lines)
        for off in range(0, Q5_BYTES, 64):
            _prefetch(b, b.add(b.add(wb, b.mul(ws, ahead)), c64(off)))

    def splat(v):
        return _shuffle(b, b.insert_element(ir.Constant(v8f, ir.Undefined), v, ir.Constant(I32, 0)), [0] * 8)

    def bytes4(off):
        return _gep_load(b, wb, c64(off), v4, 1)

    def c4(v):
        return ir.Constant(v4, [v] * 4)
    # the header: d | dmin | bytes 4..7 (scales 0..3, top bits of 4..7) | 8..11 (mins 0..3, top bits) | 12..15
    dw, dminw = (b.fpext(_gep_load(b, wb, c64(off), ir.HalfType(), 1), F32) for off in (0, 2))
    s03, m03, md = bytes4(4), bytes4(8), bytes4(12)
    sc_hi = b.or_(b.and_(md, c4(15)), b.and_(b.lshr(s03, c4(2)), c4(0x30)))
    mn_hi = b.or_(b.lshr(md, c4(4)), b.and_(b.lshr(m03, c4(2)), c4(0x30)))
    eight = ir.Constant(ir.VectorType(I32, 8), list(range(8)))
    sc8 = b.shuffle_vector(b.and_(s03, c4(63)), sc_hi, eight)  # <8 x i8>, 0..63
    mn8 = b.zext(b.shuffle_vector(b.and_(m03, c4(63)), mn_hi, eight), v8i)
    if isa == "avx2":
        sc = b.zext(sc8, ir.VectorType(I16, 8))
        scales = [_shuffle(b, sc, [j] * 16) for j in range(8)]  # vpmaddwd's <16 x i16>, sc[j] everywhere
    else:
        sc = b.zext(sc8, v8i)
        scales = [_shuffle(b, sc, [j] * 8) for j in range(8)]

    xa = [b.add(b.add(x, b.mul(c64(a), xstride)), b.mul(i, c64(256))) for a in range(acts)]
    totals = [None] * acts
    qh = _gep_load(b, wb, c64(16), v32, 1)
    for j in range(8):  # sub-block j: nibbles of ql bytes 32 (j // 2) .., low for even j; bit j of qh
        ql = _gep_load(b, wb, c64(48 + 32 * (j // 2)), v32, 1)
        low = b.and_(ql, ir.Constant(v32, [15] * 32)) if j % 2 == 0 else b.lshr(ql, ir.Constant(v32, [4] * 32))
        bit = b.and_(b.lshr(qh, ir.Constant(v32, [j] * 32)) if j else qh, ir.Constant(v32, [1] * 32))
        vals = b.or_(low, b.shl(bit, ir.Constant(v32, [4] * 32)))
        for a in range(acts):
            xv = _gep_load(b, xa[a], c64(32 * j), v32, 1)
            if isa == "avx2":
                part = madd16(b, pairs_u8s8(b, vals, xv), scales[j])
            else:
                lanes = lanes_u8s8(b, vals, xv, isa) if isa == "vnni" else lanes_portable(b, vals, xv, False)
                part = b.mul(lanes, scales[j])
            totals[a] = part if totals[a] is None else b.add(totals[a], part)

    even, odd = list(range(0, 16, 2)), list(range(1, 16, 2))
    new_accs, new_summs = [], []
    for a in range(acts):
        bsum = _gep_load(b, b.add(bs, b.mul(c64(a), bss)), b.mul(i, c64(64)), v16_32, 4)
        prod = b.mul(mn8, b.add(_shuffle(b, bsum, even), _shuffle(b, bsum, odd)))  # (8,) mn[j] (S[2j] + S[2j+1])
        prod = b.add(_shuffle(b, prod, [0, 1, 2, 3]), _shuffle(b, prod, [4, 5, 6, 7]))
        prod = b.add(_shuffle(b, prod, [0, 1]), _shuffle(b, prod, [2, 3]))
        imin = b.add(b.extract_element(prod, ir.Constant(I32, 0)), b.extract_element(prod, ir.Constant(I32, 1)))
        xdv = _gep_load(b, b.add(xd, b.mul(c64(a), xds)), b.mul(i, c64(4)), F32, 4)
        new_accs.append(b.call(fma_v, [splat(b.fmul(xdv, dw)), b.sitofp(totals[a], v8f), accs[a]]))
        dmin = b.fneg(b.fmul(xdv, dminw))  # -(d_x * dmin_w)
        new_summs.append(b.call(fma_s, [dmin, b.sitofp(imin, F32), summs[a]]))
    i1 = b.add(i, c64(1))
    b.cbranch(b.icmp_signed("<", i1, nb), loop, done)
    i.add_incoming(c64(0), entry)
    i.add_incoming(i1, loop)
    for phis, vals_, zero in ((accs, new_accs, zero8), (summs, new_summs, ir.Constant(F32, 0.0))):
        for phi, val in zip(phis, vals_):
            phi.add_incoming(zero, entry)
            phi.add_incoming(val, loop)

    b = ir.IRBuilder(done)
    finals = []
    for vals_, zero, ty in ((new_accs, zero8, v8f), (new_summs, ir.Constant(F32, 0.0), F32)):
        for val in vals_:  # the phis first, as LLVM requires
            phi = b.phi(ty)
            phi.add_incoming(zero, entry)
            phi.add_incoming(val, loop)
            finals.append(phi)
    for a in range(acts):
        total = b.fadd(_hsum8(b, finals[a]), finals[acts + a])  # the mins' float32 sum, added last
        b.store(total, _ptr(b, b.add(out, b.mul(c64(a), ostride)), F32), align=4)
    b.ret_void()
    return fn


def _kquant_tile(kind, acts):
    """The intrinsic tile(w, ws, x, xstride, xd, bs, xds, bss, nb, out, ostride, simd) of one weight row by
    `acts` activation rows, kind "q5_k" (_define_q5_k_tile) or "q6_k" (_define_q6_k_tile); byte addresses and
    strides as int64; simd chooses the integer instructions as ggml_simd.dispatch says."""
    @intrinsic
    def tile(typingctx, w, ws, x, xstride, xd, bs, xds, bss, nb, out, ostride, simd):
        sig = types.void(*([types.int64] * 12))

        def define(module, isa):
            return _define_q5_k_tile(module, acts, isa) if kind == "q5_k" else _define_q6_k_tile(module, 1, acts, isa)

        def codegen(context, builder, signature, args):
            dispatch(builder, args[11], lambda isa: builder.call(define(builder.module, isa), args[:11]))
            return context.get_dummy_value()
        return sig, codegen
    return tile


_q6_1A, _q6_11 = _kquant_tile("q6_k", ACTS), _kquant_tile("q6_k", 1)
_q5_1A, _q5_11 = _kquant_tile("q5_k", ACTS), _kquant_tile("q5_k", 1)


@njit(inline="always", **JIT)
def _tile_rows(five, xq, xd, xbs, blocks, simd, out, r0, r1):
    """Rows r0 .. r1 - 1 of _dot_q56_k: the activation rows pass ACTS at a time (the rest one by one), meeting
    each row while the rows' bytes are in cache. One activation row (a decode): the rows one after another,
    the weights asked for ahead (in the tiles). five: Q5_K's tiles, else Q6_K's."""
    N, K = xq.shape
    nb = K // 256
    ws, xst, xds, bss, ost = (np.int64(blocks.shape[1]), np.int64(K), np.int64(4 * nb), np.int64(64 * nb),
                              np.int64(4 * out.shape[1]))
    w0, x0, xd0, bs0, o0 = (np.int64(blocks.ctypes.data), np.int64(xq.ctypes.data), np.int64(xd.ctypes.data),
                            np.int64(xbs.ctypes.data), np.int64(out.ctypes.data))
    n = np.int64(0)
    while n < N:
        many = n + ACTS <= N
        x, xdn, bsn, on = x0 + n * xst, xd0 + n * xds, bs0 + n * bss, o0 + n * ost
        for r in range(r0, r1):
            w = w0 + r * ws
            if five:
                if many:
                    _q5_1A(w, ws, x, xst, xdn, bsn, xds, bss, nb, on + 4 * r, ost, simd)
                else:
                    _q5_11(w, ws, x, xst, xdn, bsn, xds, bss, nb, on + 4 * r, ost, simd)
            elif many:
                _q6_1A(w, ws, x, xst, xdn, bsn, xds, bss, nb, on + 4 * r, ost, simd)
            else:
                _q6_11(w, ws, x, xst, xdn, bsn, xds, bss, nb, on + 4 * r, ost, simd)
        n += ACTS if many else 1


@njit(parallel=True, **JIT)
def _dot_q56_k(five, xq, xd, xbs, blocks, simd, out):
    """ggml_vec_dot_q5_K_q8_K (five) or ggml_vec_dot_q6_K_q8_K of every weight row (blocks (R, nb * 176 or
    210), the file's bytes) with every Q8_K activation row (xq (N, K) int8, xd (N, nb) float32, xbs (N, nb, 16)
    int32 bsums) -> out (N, R), parallel over tiles of ROWS rows (_define_q5_k_tile, _define_q6_k_tile)."""
    R = blocks.shape[0]
    for c in prange((R + ROWS - 1) // ROWS):
        _tile_rows(five, xq, xd, xbs, blocks, simd, out, c * ROWS, min(R, (c + 1) * ROWS))


@njit(**JIT)
def _decode_q56_k(five, xq, xd, xbs, blocks, simd, out):
    """_dot_q56_k of one activation row on one thread: no parallel region (~15 us a call)."""
    _tile_rows(five, xq, xd, xbs, blocks, simd, out, 0, blocks.shape[0])


@njit(**JIT)
def _quantize_q8_K(x, xq, xd, xbs):
    """quantize_row_q8_K (x86: quantize_row_q8_K_ref), as llama_ref.model.ggml_kquants computes it: per 256
    values, max = the first value of largest magnitude, iscale = -127 / max, q = min(127, roundeven(iscale x)),
    d = 1 / iscale, bsums of each 16; a zero block keeps d = 0, q = 0, bsums = 0. x (N, K) float32."""
    N, K = x.shape
    for n in range(N):
        for b in range(K // 256):
            amax = np.float32(0)
            vmax = np.float32(0)
            for j in range(b * 256, b * 256 + 256):
                a = abs(x[n, j])
                if a > amax:
                    amax = a
                    vmax = x[n, j]
            if amax == 0:
                xd[n, b] = 0
                xq[n, b * 256:b * 256 + 256] = 0
                xbs[n, b] = 0
                continue
            iscale = np.float32(-127) / vmax
            xd[n, b] = np.float32(1) / iscale
            for g in range(16):
                s = np.int32(0)
                for j in range(b * 256 + 16 * g, b * 256 + 16 * g + 16):
                    q = np.int32(min(roundeven32(x[n, j] * iscale), np.float32(127)))
                    xq[n, j] = q
                    s += q
                xbs[n, b, g] = s


def quantize_q8_K(x2: np.ndarray):
    """llama_ref.model.ggml_kquants.quantize_row_q8_K, compiled: d (N, nb), q (N, K) int8, bsums (N, nb, 16)."""
    N, K = x2.shape
    xq = np.empty((N, K), np.int8)
    xd = np.empty((N, K // 256), np.float32)
    xbs = np.empty((N, K // 256, 16), np.int32)
    _quantize_q8_K(np.ascontiguousarray(x2, np.float32), xq, xd, xbs)
    return xd, xq, xbs


def quantized_linear(x2: np.ndarray, w, simd: "int | None" = None) -> np.ndarray:
    """x2 (N, K) float32 @ w.T in ggml's arithmetic for a Q4_K / Q5_K / Q6_K weight w (R, K). -> (N, R).
    simd: 0 the portable integer code, 2 AVX2's (where the CPU has it), 1 the best this CPU has (vpdpbusd,
    else AVX2); default as kernels/ggml.py (LLAMA_REF_GGML_PORTABLE=1 forces the portable one). All give the
    same integers, so the same floats."""
    N, R = x2.shape[0], w.shape[0]
    xd, xq, xbs = quantize_q8_K(x2)  # (N, nb), (N, K), (N, nb, 16)
    out = np.empty((N, R), np.float32)
    use = SIMD if simd is None else int(simd)
    one = N == 1 and (numba.config.NUMBA_NUM_THREADS == 1 or numba.get_num_threads() == 1)  # a serial decode
    if w.format in ("q5_k", "q6_k"):  # the file's bytes
        (_decode_q56_k if one else _dot_q56_k)(w.format == "q5_k", xq, xd, xbs, readonly(w.blocks), use, out)
        return out
    qs, head = readonly(w.qs), readonly(w.head)
    repacked = R % 8 == 0  # Q4_K repacked by llama.cpp (model/ggml_kquants.dot_for)
    if one:
        _decode_q4_k(xq, xd, xbs, qs, head, repacked, use, out)
    elif repacked:
        _gemv_q4_k(xq, xd, xbs, qs, head, use, out)
    else:
        _dot_q4_k(xq, xd, xbs, qs, head, use, out)
    return out
