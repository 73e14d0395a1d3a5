"""Q5_K and Q6_K prefills on 16-bit integers: ggml's vec_dot integers from 512-bit vpdpwssd (AVX-512 VNNI).

ggml_kquants' grouped tiles (_define_q5_k_gtile, _define_q6_k_gtile) take a prefill's products AVX2's way, as
llama.cpp's vec_dot does: the file's bytes unpacked in registers, vpmaddubsw, then vpmaddwd by the scales, 32
products per two multiplies. A scale covers 16 (Q6_K) or 32 (Q5_K) values, so the integer instructions cannot
sum a piece before its scale, and unsigned bytes times a scale overflow a byte. Two 16-bit integers hold both: the
weight rows of a work item are first written out with each value already times its scale, w = sc q (Q6_K: q the
unsigned 6-bit value, sc the signed 8-bit scale of its 16 values, |w| <= 8064; Q5_K: 5-bit q by a 6-bit scale,
w <= 1953), and the activations widened to 16 bits; then one 512-bit vpdpwssd adds 32 products onto 16 int32
lanes. Measured: _dot_w16.

The integers are the specification's (llama_ref.model.ggml_kquants) exactly, every sum exact in int32 (|lane| <
2^21), so in any order: lane u of a super-block = sum over its 8 pieces c of 32 values of the piece's scale
(Q6_K: sc[2c + (u >= 4)]; Q5_K: sc[c]) times the products 4u .. 4u + 3 of the unsigned q; Q6_K less 32 (sc[2u]
bsum[2u] + sc[2u + 1] bsum[2u + 1]); Q5_K's mins M = sum_j mn[j] S[j] (S[j] = bsum[2j] + bsum[2j + 1]) apart.
The float steps are the specification's, in its order: acc[u] = fma(d_x d_w, float32(lane u), acc[u]) super-block
after super-block (llvm.fma: one rounding), hsum_float_8; Q5_K then + summs, summs = fma(-(d_x dmin_w),
float32(M), summs) super-block after super-block. The same bits as every other Q5_K / Q6_K kernel
(tests/test_ggml_kquants16.py).

The layouts, per super-block:
- a row pair (rows 2p, 2p + 1 of a work item; W16_BYTES): 16 pieces of 64 bytes, piece k = 2c + t2 (c the
  32-value piece, t2 = 0, 1) holding, as int16, for row h of the pair at 16 h + 2u + s, the scaled value 32c + 4u
  + 2 t2 + s (u = 0..7, s = 0, 1), so that vpdpwssd's int32 lane 8 h + u adds two of row h's lane u's four
  products; then (Q6_K) 32 int16, -32 sc[j] of row h at 16 h + j, or (Q5_K) 8 int16 mn[j] of row h at 8 h + j
  and at byte 1056 + 4 h its dmin_w (float32); then at byte 1088 16 float32, d_w of row h at lanes 8 h .. 8 h + 7.
- an activation row (A16_BYTES): the Q8_K quants as int16, 16 per piece k at 16 k + 2u + s (the same values as
  one row's half of a weights' piece: one 32-byte load broadcast to both halves); then its 16 bsums as int16; then
  d_x (float32); then (S[2m], S[2m + 1]) as two int16, m = 0..3, S[j] = bsum[2j] + bsum[2j + 1].
- Q5_K's mins, per 16 weight rows of a work item (MINS_BYTES): 4 vectors of 16 int32 lanes, lane r of vector m
  holding (mn[2m], mn[2m + 1]) of row r as two int16; then 16 float32, dmin_w of row r at lane r.
Q6_K's -32: vpdpwssd of the row pair's -32 sc[j] by the broadcast bsums adds, to lane 8 h + u, -32 (sc[2u] bsum[2u]
+ sc[2u + 1] bsum[2u + 1]) of row h: the offset of the specification's lane u, as the same integer. Q5_K's mins: for
16 weight rows and one activation row, vpdpwssd of their vector m by the activation's (S[2m], S[2m + 1]) broadcast,
m = 0..3, puts M of row r in lane r (_define_w16_mins).

The activation rows are padded with zero rows to a whole number of groups of ACTS16 (their outputs dropped), and a
last odd weight row is paired with itself (its twin's output dropped).
"""

from __future__ import annotations

import threading

import llvmlite.binding as llvm_binding
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ._common import JIT, aligned
from .ggml_kquants import Q5_BYTES, Q6_BYTES, _kquant_header, _q5_k_value_chunk, _q6_k_value_chunk
from .ggml_simd import HAS_VNNI512, _close_loop, _declare, _gep_load, _hsum8, _ptr, _shuffle, prefetch
from .ggml_vec import _splat

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
W16_BYTES = 1152  # a row pair's super-block: 16 pieces x 64 bytes | 64 bytes of offsets or mins | 16 float32 d_w
A16_BYTES = 576  # an activation row's super-block: 256 int16 quants | 16 int16 bsums | d_x | 8 int16 S | padding
MINS_BYTES = 320  # 16 rows' super-block, Q5_K's mins: 4 x 64 bytes of (mn[2m], mn[2m + 1]) pairs | 16 float32 dmin_w
ROWS16 = 32  # weight rows per work item (16 pairs: 16 x 36 KiB at K = 8192, in L2)
# The tile: row pairs by activation rows. Measured (Q6_K, 8192 x 2048 and 2048 x 8192 by 512 rows, one thread,
# GMAC/s): 2 x 6 131-137, 4 x 3 124-127, 3 x 4 130-135, 2 x 4 89-97, 2 x 5 88-93, 1 x 8 92, 3 x 5 72-74,
# 2 x 8 48-49, 4 x 4 51-52 (LLVM spills the lanes past 24 or so to the stack); SEG16 2, 4, 8 the same within 4%,
# ROWS16 64 the same as 32. Two integer chains per (pair, activation) (k even and odd: half the dependent vpdpwssd
# a super-block) with the float lanes kept in memory between super-blocks, to give the chains the registers:
# 2 x 6 0.85-0.95x of this, 2 x 5 0.93-0.97x, 3 x 4, 3 x 3, 2 x 4, 4 x 2 slower still (Q5_K and Q6_K, 1B shapes).
PAIRS, ACTS16 = 2, 6
PREFETCH_GROUPS = 16  # groups of activation rows over which the next work item's rows are asked for
SEG16 = 4  # super-blocks a tile takes at a time (the activation rows' share, 14 KiB, stays in L1)
MIN_ROWS = 16  # activation rows from which a prefill takes this path (the weights' rewrite costs ~5 rows' products)
llvm_binding.initialize_native_asmparser()  # _dpwssd's inline assembly
_W_ORDER = [v for t2 in (0, 1) for v in (4 * u + 2 * t2 + s for u in range(8) for s in (0, 1))]  # piece order


def usable(n_rows: int, simd: int) -> bool:
    """Whether a Q5_K / Q6_K product of n_rows activation rows takes this path: simd 3 (the Intel AVX-512 VNNI
    form, ggml_simd.host_prefers_512) on a CPU with 512-bit VNNI, and a prefill of at least MIN_ROWS rows."""
    return simd == 3 and HAS_VNNI512 and n_rows >= MIN_ROWS


# ---- the rewrites ---------------------------------------------------------------------------------------------

def _store_pieces(b, dst, h, c, vals, scale):
    """Piece c's 32 values (<32 x i8>, value order) of row h times scale (<32 x i16>) -> its two halves' places."""
    w = b.mul(b.zext(vals, ir.VectorType(I16, 32)), scale)
    for t2 in (0, 1):
        piece = _shuffle(b, w, _W_ORDER[16 * t2:16 * t2 + 16])
        b.store(piece, _ptr(b, b.add(dst, ir.Constant(I64, 64 * (2 * c + t2) + 32 * h)), ir.VectorType(I16, 16)),
                align=1)


def _define_w16_rows(module, five):
    """void f(a, b, out, nb, ma, mb): rows a and b (the file's Q5_K (five) or Q6_K bytes from addresses a, b; b = a
    for a last odd row) -> nb super-blocks of a row pair in the W16 layout at out; Q5_K also each row's mins in its
    lane of the MINS layout: row a's at address ma (its lane's first int32), row b's at mb (unless mb = ma)."""
    name = f"llama_ref_q{5 if five else 6}_k_w16_rows"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 6), name)
    fn.linkage = "internal"
    a, b_, out, nb, ma, mb = fn.args
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    v32, v16, v16_16, v8f = ir.VectorType(I8, 32), ir.VectorType(I8, 16), ir.VectorType(I16, 16), ir.VectorType(F32, 8)
    b = ir.IRBuilder(entry)
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)
    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    dst = b.add(out, b.mul(i, c64(W16_BYTES)))
    for h, row in enumerate((a, b_)):
        if five:  # d | dmin | 12 bytes of 6-bit scales and mins | 32 bytes qh | 128 bytes ql
            blk = b.add(row, b.mul(i, c64(Q5_BYTES)))
            dw, dminw, sc8, mn8 = _kquant_header(b, blk, "avx2", whole=True)  # sc <8 x i16>, mn <8 x i32>
            qh = _gep_load(b, blk, c64(16), v32, 1)
            for j in range(8):
                _store_pieces(b, dst, h, j, _q5_k_value_chunk(b, blk, qh, j), _shuffle(b, sc8, [j] * 32))
            mn16 = b.trunc(mn8, ir.VectorType(I16, 8))
            b.store(mn16, _ptr(b, b.add(dst, c64(1024 + 16 * h)), ir.VectorType(I16, 8)), align=1)
            b.store(dminw, _ptr(b, b.add(dst, c64(1056 + 4 * h)), F32), align=4)
            lane = b.add([ma, mb][h], b.mul(i, c64(MINS_BYTES)))  # this row's lane of the MINS record
            mn32 = b.bitcast(mn16, ir.VectorType(I32, 4))  # (mn[2m], mn[2m + 1]) at m
            for m in range(4):
                b.store(b.extract_element(mn32, ir.Constant(I32, m)), _ptr(b, b.add(lane, c64(64 * m)), I32), align=4)
            b.store(dminw, _ptr(b, b.add(lane, c64(256)), F32), align=4)
        else:  # 128 bytes ql | 64 bytes qh | 16 int8 scales | d fp16
            blk = b.add(row, b.mul(i, c64(Q6_BYTES)))
            sc = b.sext(_gep_load(b, blk, c64(192), v16, 1), v16_16)
            for half in (0, 1):
                qh = _gep_load(b, blk, c64(128 + 32 * half), v32, 1)
                for k in range(4):
                    c = 4 * half + k
                    vals = _q6_k_value_chunk(b, _gep_load(b, blk, c64(64 * half + 32 * (k % 2)), v32, 1), qh, k)
                    _store_pieces(b, dst, h, c, vals, _shuffle(b, sc, [2 * c] * 16 + [2 * c + 1] * 16))
            b.store(b.mul(sc, ir.Constant(v16_16, [-32] * 16)), _ptr(b, b.add(dst, c64(1024 + 32 * h)), v16_16),
                    align=1)
            dw = b.fpext(_gep_load(b, blk, c64(208), ir.HalfType(), 1), F32)
        b.store(_splat(b, dw, 8), _ptr(b, b.add(dst, c64(1088 + 32 * h)), v8f), align=1)
    b, _ = _close_loop(b, i, nb, entry, loop, done, [])
    b.ret_void()
    return fn


def _rows_intrinsic(five):
    @intrinsic
    def rows(typingctx, a, b, out, nb, ma, mb):
        """The intrinsic of _define_w16_rows (byte addresses, int64)."""
        sig = types.void(*([types.int64] * 6))

        def codegen(context, builder, signature, args):
            builder.call(_define_w16_rows(builder.module, five), args)
            return context.get_dummy_value()
        return sig, codegen
    return rows


_rows5, _rows6 = _rows_intrinsic(True), _rows_intrinsic(False)


@njit(**JIT)
def _w16_rows_py(five, a, b, out, nb, mins):
    """The rewrite on arrays (the tests' view of it): rows a, b (the file's bytes, 1-D) -> out (uint8); Q5_K also
    their mins in lanes 0 and 1 of mins (uint8, nb MINS records)."""
    ma = np.int64(mins.ctypes.data)
    if five:
        _rows5(np.int64(a.ctypes.data), np.int64(b.ctypes.data), np.int64(out.ctypes.data), np.int64(nb), ma, ma + 4)
    else:
        _rows6(np.int64(a.ctypes.data), np.int64(b.ctypes.data), np.int64(out.ctypes.data), np.int64(nb), ma, ma + 4)


@intrinsic
def _acts_quants(typingctx, src, dst):
    """The 256 quants of one activation super-block (int8 at src) -> the A16 layout's 256 int16 at dst: per piece c
    of 32 values, widened (vpmovsxbw) and put in _W_ORDER (one vpermw), as one row's half of the weights' pieces."""
    sig = types.void(types.int64, types.int64)

    def codegen(context, builder, signature, args):
        src_, dst_ = args
        for c in range(8):
            q = _gep_load(builder, src_, ir.Constant(I64, 32 * c), ir.VectorType(I8, 32), 1)
            wide = builder.sext(q, ir.VectorType(I16, 32))
            builder.store(_shuffle(builder, wide, _W_ORDER),
                          _ptr(builder, builder.add(dst_, ir.Constant(I64, 64 * c)), ir.VectorType(I16, 32)), align=2)
        return context.get_dummy_value()
    return sig, codegen


@njit(parallel=True, **JIT)
def _acts16(xq, xdbits, xbs, out):
    """The activation rows (Q8_K: xq (N, K) int8, xdbits (N, nb) the bits of d_x as uint32, xbs (N, nb, 16)
    int32) -> rows 0 .. N - 1 of out (N', nb * A16_BYTES / 2) int16 in the A16 layout (d_x's bits in two int16)."""
    N, nb = xdbits.shape
    for n in prange(N):
        for i in range(nb):
            o = i * (A16_BYTES // 2)
            _acts_quants(np.int64(xq[n].ctypes.data) + 256 * i, np.int64(out[n].ctypes.data) + 2 * o)
            for j in range(16):
                out[n, o + 256 + j] = np.int16(xbs[n, i, j])
            bits = xdbits[n, i]
            out[n, o + 272] = np.int16(np.uint16(bits & np.uint32(0xFFFF)))
            out[n, o + 273] = np.int16(np.uint16(bits >> np.uint32(16)))
            for j in range(8):  # S[j] = bsum[2j] + bsum[2j + 1] (|S| <= 32 x 127)
                out[n, o + 274 + j] = np.int16(xbs[n, i, 2 * j] + xbs[n, i, 2 * j + 1])
            for j in range(282, A16_BYTES // 2):
                out[n, o + j] = 0


# ---- the tiles ------------------------------------------------------------------------------------------------

def _dpwssd(b, acc, p, q):
    """acc + vpdpwssd(p, q) (<16 x i32> each: p, q as 32 int16, neighbouring products summed onto each lane), as
    one instruction in inline assembly. Through the intrinsic (llvm.x86.avx512.vpdpwssd.512) LLVM 22's machine
    combiner may split a tile's chains into vpmaddwd and vpaddd, twice the instructions, and which chains it
    splits depends on the CPU it schedules for: on Sapphire Rapids the Q5_K tile's (93-98 GMAC/s against 128-133,
    one thread) and not the Q6_K tile's, whose intrinsic was there 130-136 against the assembly's 118-125 (LLVM
    folds the loads into the intrinsic); on Emerald Rapids (session 61) the Q6_K tile's too, with spills: 43-50
    GMAC/s against the assembly's 124-131 (8192 x 2048 and 2048 x 8192 by 512 rows). The assembly is never split."""
    v16i = ir.VectorType(I32, 16)
    return b.asm(ir.FunctionType(v16i, [v16i] * 3), "vpdpwssd $3, $2, $0", "=v,0,v,v", [acc, p, q], False)


def _define_w16_tile(module, five, pairs, acts):
    """void f(w, ws, x, xs, nb, acc, part, out, ostride): `pairs` row pairs (W16 layout from w, ws bytes apart)
    by `acts` activation rows (A16 layout from x, xs bytes apart), nb super-blocks. As ggml_kquants' grouped tiles,
    a row may come in segments: part & 1, its first (the float lanes start at zero, else from acc, 64 bytes per
    (pair r, activation a) at 64 (r acts + a)); part & 2, its last (hsum_float_8 of row 2r + h's lanes ->
    out[a * ostride + 4 (2r + h)], else the lanes -> acc). Q5_K's mins: _define_w16_mins, after.

    Each (pair, activation) keeps 16 int32 lanes (8 per row) over a super-block and 16 float32 lanes over the
    row; one pair's piece is one 64-byte load that meets every activation row, and an activation's piece one
    32-byte load broadcast to both halves (vbroadcasti64x4) that meets every pair."""
    name = f"llama_ref_q{5 if five else 6}_k_w16_{pairs}x{acts}"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 9), name)
    fn.linkage = "internal"
    w, ws, x, xs, nb, acc, part, out, ostride = fn.args
    v16i, v8i, v16f = ir.VectorType(I32, 16), ir.VectorType(I32, 8), ir.VectorType(F32, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero16f, zero16i = ir.Constant(v16f, [0.0] * 16), ir.Constant(v16i, [0] * 16)
    fma16 = _declare(module, "llvm.fma.v16f32", v16f, [v16f] * 3)
    both = list(range(8)) * 2  # a 32-byte vector in both halves
    entry, loop, done, last, keep = (fn.append_basic_block(n) for n in ("entry", "loop", "done", "last", "keep"))
    b = ir.IRBuilder(entry)
    first = b.icmp_signed("!=", b.and_(part, c64(1)), c64(0))
    pairs_at = [b.add(w, b.mul(c64(r), ws)) for r in range(pairs)]
    acts_at = [b.add(x, b.mul(c64(a), xs)) for a in range(acts)]
    init = [b.select(first, zero16f, _gep_load(b, acc, c64(64 * t), v16f, 4)) for t in range(pairs * acts)]
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)

    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    accs = [b.phi(v16f) for _ in range(pairs * acts)]  # (pair r, activation a) at r * acts + a
    wi = [b.add(p, b.mul(i, c64(W16_BYTES))) for p in pairs_at]
    xi = [b.add(q, b.mul(i, c64(A16_BYTES))) for q in acts_at]
    lanes = [zero16i] * (pairs * acts)
    for k in range(16):
        wv = [_gep_load(b, wi[r], c64(64 * k), v16i, 64) for r in range(pairs)]
        for a in range(acts):
            xv = _shuffle(b, _gep_load(b, xi[a], c64(32 * k), v8i, 32), both)
            for r in range(pairs):
                t = r * acts + a
                lanes[t] = _dpwssd(b, lanes[t], wv[r], xv)
    new = [None] * (pairs * acts)
    for r in range(pairs):
        nsc = None if five else _gep_load(b, wi[r], c64(1024), v16i, 64)  # -32 sc[j] of each row
        dw = _gep_load(b, wi[r], c64(1088), v16f, 64)
        for a in range(acts):
            t = r * acts + a
            total = lanes[t]
            if not five:  # the lanes less their offsets
                total = _dpwssd(b, total, nsc, _shuffle(b, _gep_load(b, xi[a], c64(512), v8i, 32), both))
            dx = _splat(b, _gep_load(b, xi[a], c64(544), F32, 4), 16)
            new[t] = b.call(fma16, [b.fmul(dw, dx), b.sitofp(total, v16f), accs[t]])  # d_w d_x (float32)
    b, finals = _close_loop(b, i, nb, entry, loop, done, [(phi, v, v0) for phi, v0, v in zip(accs, init, new)])
    b.cbranch(b.icmp_signed("!=", b.and_(part, c64(2)), c64(0)), last, keep)
    b = ir.IRBuilder(last)
    for r in range(pairs):
        for a in range(acts):
            row_at = b.add(out, b.add(b.mul(c64(a), ostride), c64(8 * r)))
            for h in (0, 1):
                total = _hsum8(b, _shuffle(b, finals[r * acts + a], list(range(8 * h, 8 * h + 8))))
                b.store(total, _ptr(b, b.add(row_at, c64(4 * h)), F32), align=4)
    b.ret_void()
    b = ir.IRBuilder(keep)
    for t, v in enumerate(finals):
        b.store(v, _ptr(b, b.add(acc, c64(64 * t)), v16f), align=4)
    b.ret_void()
    return fn


def _define_w16_mins(module, acts):
    """void f(mt, x, xs, nb, out, ostride): Q5_K's mins of 16 weight rows (their MINS records from mt) by `acts`
    activation rows (A16 records from x, xs bytes apart), nb super-blocks. Per activation row a, lane r: summs =
    fma(-(d_x dmin_w), float32(M), summs) super-block after super-block, M = the sum over m of vpdpwssd of the rows'
    vector m by the activation's (S[2m], S[2m + 1]) broadcast; then out[a * ostride + 4r] += summs[r]: the
    specification's hsum_float_8(acc) + summs, whose first term the tile stored there."""
    name = f"llama_ref_q5_k_w16_mins_{acts}"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 6), name)
    fn.linkage = "internal"
    mt, x, xs, nb, out, ostride = fn.args
    v16i, v16f = ir.VectorType(I32, 16), ir.VectorType(F32, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero16f, zero16i = ir.Constant(v16f, [0.0] * 16), ir.Constant(v16i, [0] * 16)
    fma16 = _declare(module, "llvm.fma.v16f32", v16f, [v16f] * 3)
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    b = ir.IRBuilder(entry)
    acts_at = [b.add(x, b.mul(c64(a), xs)) for a in range(acts)]
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)
    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    summs = [b.phi(v16f) for _ in range(acts)]
    mi = b.add(mt, b.mul(i, c64(MINS_BYTES)))
    mn = [_gep_load(b, mi, c64(64 * m), v16i, 64) for m in range(4)]
    dminw = _gep_load(b, mi, c64(256), v16f, 64)
    new = []
    for a in range(acts):
        xi = b.add(acts_at[a], b.mul(i, c64(A16_BYTES)))
        m = zero16i
        for k in range(4):
            m = _dpwssd(b, m, mn[k], _splat(b, _gep_load(b, xi, c64(548 + 4 * k), I32, 4), 16))
        dmin = b.fneg(b.fmul(_splat(b, _gep_load(b, xi, c64(544), F32, 4), 16), dminw))  # -(d_x dmin_w)
        new.append(b.call(fma16, [dmin, b.sitofp(m, v16f), summs[a]]))
    b, finals = _close_loop(b, i, nb, entry, loop, done, [(phi, v, zero16f) for phi, v in zip(summs, new)])
    for a, final in enumerate(finals):
        at = _ptr(b, b.add(out, b.mul(c64(a), ostride)), v16f)
        b.store(b.fadd(b.load(at, align=4), final), at, align=4)
    b.ret_void()
    return fn


def _w16_tile(five, pairs, acts):
    """The intrinsic tile(w, ws, x, xs, nb, acc, part, out, ostride) of _define_w16_tile."""
    @intrinsic
    def tile(typingctx, w, ws, x, xs, nb, acc, part, out, ostride):
        sig = types.void(*([types.int64] * 9))

        def codegen(context, builder, signature, args):
            builder.call(_define_w16_tile(builder.module, five, pairs, acts), args)
            return context.get_dummy_value()
        return sig, codegen
    return tile


@intrinsic
def _mins(typingctx, mt, x, xs, nb, out, ostride):
    """The intrinsic of _define_w16_mins for a group of ACTS16 activation rows."""
    sig = types.void(*([types.int64] * 6))

    def codegen(context, builder, signature, args):
        builder.call(_define_w16_mins(builder.module, ACTS16), args)
        return context.get_dummy_value()
    return sig, codegen


_tile5, _tile5_1 = _w16_tile(True, PAIRS, ACTS16), _w16_tile(True, 1, ACTS16)
_tile6, _tile6_1 = _w16_tile(False, PAIRS, ACTS16), _w16_tile(False, 1, ACTS16)


@njit(parallel=True, **JIT)
def _dot_w16(five, blocks, xa, mins, out):
    """ggml_vec_dot_q5_K_q8_K (five) or ggml_vec_dot_q6_K_q8_K of every weight row (blocks (R, nb * 176 or 210),
    the file's bytes) with every activation row (xa (N', nb * A16_BYTES / 2) int16, N' a multiple of ACTS16) -> out
    (N', R') float32, R' = R rounded up to a multiple of ROWS16 (a last odd row is paired with itself; the columns
    past R hold nothing). mins: zeros, Q5_K's MINS records, ROWS16 / 16 x nb per work item.

    Parallel over work items of ROWS16 rows: each rewrites its rows (W16 layout) into a buffer of its own (Q5_K
    also their MINS records, into its part of mins), then each group of ACTS16 activation rows meets them SEG16
    super-blocks at a time (the float lanes carried in acc), PAIRS row pairs a tile, a last odd pair alone; Q5_K's
    mins after, 16 rows at a time.

    The next item's rows are asked for (prefetch) while this one runs: in a model its weights come from memory,
    and its rewrite waited for them (a 1B Q5_K_M prefill's products 4-7% faster, 3 alternated pairs).

    Measured (Sapphire Rapids-class Xeon, session 47, 8192 x 2048, 2048 x 8192 and 512 x 2048 by 512 activation
    rows, against ggml_kquants' grouped tiles in the same process): one thread Q6_K 123-137 GMAC/s (1.7-2.1x), Q5_K
    121-132 (1.6-1.9x); two threads 233-271 (varying with the host's load over the day)."""
    R = blocks.shape[0]
    N = xa.shape[0]
    size = Q5_BYTES if five else Q6_BYTES
    nb = blocks.shape[1] // size
    ws, xs, ost = np.int64(nb * W16_BYTES), np.int64(xa.shape[1] * 2), np.int64(out.shape[1] * 4)
    w0, x0, o0 = np.int64(blocks.ctypes.data), np.int64(xa.ctypes.data), np.int64(out.ctypes.data)
    bst, mst = np.int64(blocks.shape[1]), np.int64(nb * MINS_BYTES)
    m0, mis = np.int64(mins.ctypes.data), np.int64(mins.shape[1])
    for item in prange((R + ROWS16 - 1) // ROWS16):
        r0 = item * ROWS16
        r1 = min(R, r0 + ROWS16)
        npairs = (r1 - r0 + 1) // 2
        # Scratch of the largest item's size, the same for every item: Numba hoists an allocation in a prange body out
        # of the loop it runs on each thread ("allocation hoisting": one buffer a thread, reused from item to item),
        # which its parallel diagnostics also reported for sizes that depend on the item (see quantized_linear's mins)
        raw = np.empty(ROWS16 // 2 * ws + 64, np.uint8)
        buf = np.int64(raw.ctypes.data)
        buf += (64 - buf % 64) % 64  # 64-byte aligned: every piece on one cache line
        mt = m0 + item * mis  # this item's MINS records (Q5_K)
        rawacc = np.empty(ROWS16 // 2 * ACTS16 * 16 + 16, np.float32)  # each (pair, activation)'s float lanes
        acc = np.int64(rawacc.ctypes.data)
        acc += (64 - acc % 64) % 64
        for p in range(npairs):
            ra = r0 + 2 * p
            rb = ra + 1 if ra + 1 < r1 else ra
            ma = mt + ((2 * p) // 16) * mst + 4 * ((2 * p) % 16)  # row 2p's lane of the MINS records, 2p + 1's next
            if five:
                _rows5(w0 + ra * bst, w0 + rb * bst, buf + p * ws, nb, ma, ma + 4 if rb > ra else ma)
            else:
                _rows6(w0 + ra * bst, w0 + rb * bst, buf + p * ws, nb, ma, ma)
        full = npairs - npairs % PAIRS
        # the next item's rows (the same thread's, as the loop is cut into runs of items), asked for a share per
        # group of activation rows over the first PREFETCH_GROUPS groups, so that its rewrite finds them in cache
        ahead_lo = w0 + min(R, r1) * bst
        ahead_n = (min(R, r1 + ROWS16) - min(R, r1)) * bst
        share = (ahead_n // 64 + PREFETCH_GROUPS - 1) // PREFETCH_GROUPS * 64
        for n in range(0, N, ACTS16):
            x, on = x0 + n * xs, o0 + n * ost + 4 * r0
            g = n // ACTS16
            if g < PREFETCH_GROUPS:
                for off in range(g * share, min(ahead_n, (g + 1) * share), 64):
                    prefetch(ahead_lo + off)
            for s in range(0, nb, SEG16):
                m = min(SEG16, nb - s)
                part = (1 if s == 0 else 0) | (2 if s + m == nb else 0)
                for p in range(0, full, PAIRS):
                    w, xw, a = buf + p * ws + s * W16_BYTES, x + s * A16_BYTES, acc + p * (64 * ACTS16)
                    if five:
                        _tile5(w, ws, xw, xs, m, a, part, on + 8 * p, ost)
                    else:
                        _tile6(w, ws, xw, xs, m, a, part, on + 8 * p, ost)
            if full < npairs:
                if five:
                    _tile5_1(buf + full * ws, ws, x, xs, nb, acc, 3, on + 8 * full, ost)
                else:
                    _tile6_1(buf + full * ws, ws, x, xs, nb, acc, 3, on + 8 * full, ost)
            if five:
                for blk in range((2 * npairs + 15) // 16):
                    _mins(mt + blk * mst, x, xs, nb, on + 64 * blk, ost)


_SCRATCH = threading.local()
KEEP_BYTES = 64 << 20  # the largest scratch kept between calls (a 1B prefill of 512 rows: 9.4 MB)


def _scratch(name: str, nbytes: int) -> np.ndarray:
    """nbytes of this thread's buffer `name` (uint8, 64-byte aligned, as the tiles' loads say), kept between calls
    up to KEEP_BYTES and grown as needed: a prefill's fresh megabytes each call cost their page faults and the
    kernel's zeroing (1B shape, Q6_K, 512 rows: the products 4-5% faster in the model so)."""
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.size < nbytes:
        buf = aligned((max(nbytes, 64),), np.uint8)
        if nbytes <= KEEP_BYTES:
            setattr(_SCRATCH, name, buf)
    return buf[:nbytes]


def quantized_linear(five: bool, blocks: np.ndarray, xq, xd, xbs) -> np.ndarray:
    """x @ w.T for a Q5_K (five) or Q6_K weight (blocks (R, nb * 176 or 210), the file's bytes) and Q8_K
    activation rows (xq (N, K), xd (N, nb), xbs (N, nb, 16): ggml_kquants.quantize_q8_K's) -> (N, R) float32, on
    this CPU's 512-bit VNNI (usable() says where): the same bits as ggml_kquants' tiles."""
    N, R = xq.shape[0], blocks.shape[0]
    nb = xd.shape[1]
    n_pad = -(-N // ACTS16) * ACTS16
    xa = _scratch("acts", n_pad * nb * A16_BYTES).view(np.int16).reshape(n_pad, nb * A16_BYTES // 2)
    xa[N:] = 0  # padding rows: d_x = 0, quants 0
    _acts16(xq, np.ascontiguousarray(xd).view(np.uint32), xbs, xa)
    items = -(-R // ROWS16)
    # Q5_K's mins records (zeros past the last row), allocated here: an np.zeros of them in _dot_w16's parallel loop
    # corrupted the heap and the results on 2 threads (Numba 0.68: its "allocation hoisting" makes an allocation in a
    # prange body one buffer for every iteration where it can; numba/numba issue 9529)
    mins = _scratch("mins", items * (ROWS16 // 16 * nb * MINS_BYTES if five else 64)).reshape(items, -1)
    mins[:] = 0
    out = np.empty((n_pad, items * ROWS16), np.float32)
    _dot_w16(five, blocks, xa, mins, out)
    return out[:N] if out.shape[1] == R else np.ascontiguousarray(out[:N, :R])
