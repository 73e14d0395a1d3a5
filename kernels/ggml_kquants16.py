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
  d_x (float32).
- Q5_K's mins, per group of ACTS16 activation rows (MINS_BYTES): 4 vectors of 16 int32 lanes, lane a of vector m
  holding (S[2m], S[2m + 1]) of the group's row a as two int16; then 16 float32, d_x of row a at lane a.
Q6_K's -32: vpdpwssd of the row pair's -32 sc[j] by the broadcast bsums adds, to lane 8 h + u, -32 (sc[2u] bsum[2u]
+ sc[2u + 1] bsum[2u + 1]) of row h: the offset of the specification's lane u, as the same integer. Q5_K's mins: for
one weight row, vpdpwssd of its (mn[2m], mn[2m + 1]) broadcast by the group's vector m, m = 0..3, puts M of the
group's row a in lane a (_define_w16_mins).

The activation rows are padded with zero rows to a whole number of groups of ACTS16 (their outputs dropped), and a
last odd weight row is paired with itself (its twin's output dropped).
"""

from __future__ import annotations

import llvmlite.binding as llvm_binding
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ._common import JIT, aligned
from .ggml_kquants import Q5_BYTES, Q6_BYTES, _kquant_header, _q6_k_value_chunk
from .ggml_simd import HAS_VNNI512, _declare, _gep_load, _hsum8, _ptr, _shuffle

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
W16_BYTES = 1152  # a row pair's super-block: 16 pieces x 64 bytes | 64 bytes of offsets or mins | 16 float32 d_w
A16_BYTES = 576  # an activation row's super-block: 256 int16 quants | 16 int16 bsums | d_x | padding
MINS_BYTES = 320  # a group's super-block, Q5_K's mins: 4 x 64 bytes of (S[2m], S[2m + 1]) pairs | 16 float32 d_x
ROWS16 = 32  # weight rows per work item (16 pairs: 16 x 36 KiB at K = 8192, in L2)
# The tile: row pairs by activation rows. Measured (Q6_K, 8192 x 2048 and 2048 x 8192 by 512 rows, one thread,
# GMAC/s): 2 x 6 131-137, 4 x 3 124-127, 3 x 4 130-135, 2 x 4 89-97, 2 x 5 88-93, 1 x 8 92, 3 x 5 72-74,
# 2 x 8 48-49, 4 x 4 51-52 (LLVM spills the lanes past 24 or so to the stack); SEG16 2, 4, 8 the same within 4%,
# ROWS16 64 the same as 32.
PAIRS, ACTS16 = 2, 6
SEG16 = 4  # super-blocks a tile takes at a time (the activation rows' share, 14 KiB, stays in L1)
MIN_ROWS = 16  # activation rows from which a prefill takes this path (the weights' rewrite costs ~2 rows' products)
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


def _splat(b, v, n):
    """A scalar in all n lanes of a vector."""
    vec = ir.VectorType(v.type, n)
    return _shuffle(b, b.insert_element(ir.Constant(vec, ir.Undefined), v, ir.Constant(I32, 0)), [0] * n)


def _define_w16_rows(module, five):
    """void f(a, b, out, nb): rows a and b (the file's Q5_K (five) or Q6_K bytes from addresses a, b; b = a for a
    last odd row) -> nb super-blocks of a row pair in the W16 layout at out."""
    name = f"llama_ref_q{5 if five else 6}_k_w16_rows"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 4), name)
    fn.linkage = "internal"
    a, b_, out, nb = fn.args
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
            for j in range(8):  # sub-block j: nibbles of ql bytes 32 (j // 2) .., low for even j; bit j of qh
                ql = _gep_load(b, blk, c64(48 + 32 * (j // 2)), v32, 1)
                low = b.and_(ql, ir.Constant(v32, [15] * 32)) if j % 2 == 0 else b.lshr(ql, ir.Constant(v32, [4] * 32))
                bit = b.and_(b.lshr(qh, ir.Constant(v32, [j] * 32)) if j else qh, ir.Constant(v32, [1] * 32))
                vals = b.or_(low, b.shl(bit, ir.Constant(v32, [4] * 32)))
                _store_pieces(b, dst, h, j, vals, _shuffle(b, sc8, [j] * 32))
            b.store(b.trunc(mn8, ir.VectorType(I16, 8)), _ptr(b, b.add(dst, c64(1024 + 16 * h)), ir.VectorType(I16, 8)),
                    align=1)
            b.store(dminw, _ptr(b, b.add(dst, c64(1056 + 4 * h)), F32), align=4)
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
    i1 = b.add(i, c64(1))
    b.cbranch(b.icmp_signed("<", i1, nb), loop, done)
    i.add_incoming(c64(0), entry)
    i.add_incoming(i1, loop)
    b = ir.IRBuilder(done)
    b.ret_void()
    return fn


def _rows_intrinsic(five):
    @intrinsic
    def rows(typingctx, a, b, out, nb):
        """The intrinsic of _define_w16_rows (byte addresses, int64)."""
        sig = types.void(types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            builder.call(_define_w16_rows(builder.module, five), args)
            return context.get_dummy_value()
        return sig, codegen
    return rows


_rows5, _rows6 = _rows_intrinsic(True), _rows_intrinsic(False)


@njit(**JIT)
def _w16_rows_py(five, a, b, out, nb):
    """The rewrite on arrays (the tests' view of it): rows a, b (the file's bytes, 1-D) -> out (uint8)."""
    if five:
        _rows5(np.int64(a.ctypes.data), np.int64(b.ctypes.data), np.int64(out.ctypes.data), np.int64(nb))
    else:
        _rows6(np.int64(a.ctypes.data), np.int64(b.ctypes.data), np.int64(out.ctypes.data), np.int64(nb))


@njit(parallel=True, **JIT)
def _acts16(xq, xdbits, xbs, out):
    """The activation rows (Q8_K: xq (N, K) int8, xdbits (N, nb) the bits of d_x as uint32, xbs (N, nb, 16)
    int32) -> rows 0 .. N - 1 of out (N', nb * A16_BYTES / 2) int16 in the A16 layout (d_x's bits in two int16)."""
    N, nb = xdbits.shape
    for n in prange(N):
        for i in range(nb):
            o = i * (A16_BYTES // 2)
            for c in range(8):
                for j in range(32):  # piece 2c + t2, place 2u + s: value 4u + 2 t2 + s of piece c
                    t2, u, s = j // 16, (j % 16) // 2, j % 2
                    out[n, o + 32 * c + j] = xq[n, 256 * i + 32 * c + 4 * u + 2 * t2 + s]
            for j in range(16):
                out[n, o + 256 + j] = np.int16(xbs[n, i, j])
            bits = xdbits[n, i]
            out[n, o + 272] = np.int16(np.uint16(bits & np.uint32(0xFFFF)))
            out[n, o + 273] = np.int16(np.uint16(bits >> np.uint32(16)))
            for j in range(274, A16_BYTES // 2):
                out[n, o + j] = 0


@njit(**JIT)
def _mins16(xd, xbs, out):
    """Q5_K's group records (MINS_BYTES each) from the activation rows' bsums and d_x (rows 0 .. N - 1; out
    (G, nb * MINS_BYTES / 4) int32, zeros beyond): lane a of vector m = S[2m] | S[2m + 1] << 16 of the group's row
    a (two int16), S[j] = bsum[2j] + bsum[2j + 1]; then d_x of row a (float32 bits) at lane a of the 16 after."""
    N, nb = xd.shape
    xbits = xd.view(np.int32)
    for n in range(N):
        g, a = n // ACTS16, n % ACTS16
        for i in range(nb):
            o = i * (MINS_BYTES // 4)
            for m in range(4):
                lo = np.int32(xbs[n, i, 4 * m] + xbs[n, i, 4 * m + 1])
                hi = np.int32(xbs[n, i, 4 * m + 2] + xbs[n, i, 4 * m + 3])
                out[g, o + 16 * m + a] = (lo & np.int32(0xFFFF)) | (hi << np.int32(16))
            out[g, o + 64 + a] = xbits[n, i]


# ---- the tiles ------------------------------------------------------------------------------------------------

def _dpwssd(b, acc, p, q):
    """acc + vpdpwssd(p, q) (<16 x i32> each: p, q as 32 int16, neighbouring products summed onto each lane), as one
    instruction in inline assembly. Through the intrinsic (llvm.x86.avx512.vpdpwssd.512), LLVM 22's machine
    combiner split a chain of them into vpmaddwd and vpaddd (twice the instructions) in the Q5_K tile: 93-98
    GMAC/s against 117-124 for the Q6_K tile, which it left whole."""
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
    i1 = b.add(i, c64(1))
    b.cbranch(b.icmp_signed("<", i1, nb), loop, done)
    i.add_incoming(c64(0), entry)
    i.add_incoming(i1, loop)
    for phi, v0, v in zip(accs, init, new):
        phi.add_incoming(v0, entry)
        phi.add_incoming(v, loop)

    b = ir.IRBuilder(done)
    finals = [b.phi(v16f) for _ in new]
    for phi, v0, v in zip(finals, init, new):
        phi.add_incoming(v0, entry)
        phi.add_incoming(v, loop)
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


def _define_w16_mins(module):
    """void f(mn_at, dmin_at, xg, nb, out, ostride): Q5_K's mins of one weight row by one group of ACTS16
    activation rows, nb super-blocks: the row's mn[j] (8 int16) at mn_at and its dmin_w at dmin_at in its pair's
    W16 records (W16_BYTES apart), the group's MINS records from xg. summs (lane a: the group's row a) = fma(-(d_x
    dmin_w), float32(M), summs) super-block after super-block, M = the sum over m of vpdpwssd of the row's (mn[2m],
    mn[2m + 1]) broadcast by the group's vector m; then out[a * ostride] += summs[a]: the specification's
    hsum_float_8(acc) + summs, the first term stored there by the tile."""
    name = "llama_ref_q5_k_w16_mins"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 6), name)
    fn.linkage = "internal"
    mn_at, dmin_at, xg, nb, out, ostride = fn.args
    v16i, v16f = ir.VectorType(I32, 16), ir.VectorType(F32, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero16f, zero16i = ir.Constant(v16f, [0.0] * 16), ir.Constant(v16i, [0] * 16)
    dpwssd = _declare(module, "llvm.x86.avx512.vpdpwssd.512", v16i, [v16i] * 3)
    fma16 = _declare(module, "llvm.fma.v16f32", v16f, [v16f] * 3)
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    b = ir.IRBuilder(entry)
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)
    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    summs = b.phi(v16f)
    wi, xi = b.mul(i, c64(W16_BYTES)), b.add(xg, b.mul(i, c64(MINS_BYTES)))
    m = zero16i
    for k in range(4):  # (mn[2k], mn[2k + 1]) of the row: one int32, broadcast
        pair = _splat(b, _gep_load(b, b.add(mn_at, wi), c64(4 * k), I32, 4), 16)
        m = b.call(dpwssd, [m, pair, _gep_load(b, xi, c64(64 * k), v16i, 64)])
    dx = _gep_load(b, xi, c64(256), v16f, 64)
    dmin = b.fneg(b.fmul(dx, _splat(b, _gep_load(b, b.add(dmin_at, wi), c64(0), F32, 4), 16)))  # -(d_x dmin_w)
    new = b.call(fma16, [dmin, b.sitofp(m, v16f), summs])
    i1 = b.add(i, c64(1))
    b.cbranch(b.icmp_signed("<", i1, nb), loop, done)
    i.add_incoming(c64(0), entry)
    i.add_incoming(i1, loop)
    summs.add_incoming(zero16f, entry)
    summs.add_incoming(new, loop)
    b = ir.IRBuilder(done)
    final = b.phi(v16f)
    final.add_incoming(zero16f, entry)
    final.add_incoming(new, loop)
    for a in range(ACTS16):
        at = _ptr(b, b.add(out, b.mul(c64(a), ostride)), F32)
        b.store(b.fadd(b.load(at, align=4), b.extract_element(final, ir.Constant(I32, a))), at, align=4)
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
def _mins(typingctx, mn_at, dmin_at, xg, nb, out, ostride):
    """The intrinsic of _define_w16_mins."""
    sig = types.void(*([types.int64] * 6))

    def codegen(context, builder, signature, args):
        builder.call(_define_w16_mins(builder.module), args)
        return context.get_dummy_value()
    return sig, codegen


_tile5, _tile5_1 = _w16_tile(True, PAIRS, ACTS16), _w16_tile(True, 1, ACTS16)
_tile6, _tile6_1 = _w16_tile(False, PAIRS, ACTS16), _w16_tile(False, 1, ACTS16)


@njit(parallel=True, **JIT)
def _dot_w16(five, blocks, xa, xg, out):
    """ggml_vec_dot_q5_K_q8_K (five) or ggml_vec_dot_q6_K_q8_K of every weight row (blocks (R, nb * 176 or 210),
    the file's bytes) with every activation row (xa (N', nb * A16_BYTES / 2) int16, N' a multiple of ACTS16;
    Q5_K: xg, the groups' mins records) -> out (N', R') float32, R' = R rounded up to even. Parallel over work
    items of ROWS16 rows: each rewrites its rows (W16 layout) into a buffer of its own, then each group of ACTS16
    activation rows meets them SEG16 super-blocks at a time (the float lanes carried in acc), PAIRS row pairs a
    tile, a last odd pair alone; Q5_K's mins row by row after.

    Measured (Sapphire Rapids-class Xeon, session 47, 512 activation rows, against ggml_kquants' grouped tiles in
    the same process): Q6_K 8192 x 2048 and 2048 x 8192 one thread 134-137 GMAC/s (1.99-2.09x), two threads
    267-273 (2.00-2.12x)."""
    R = blocks.shape[0]
    N = xa.shape[0]
    size = Q5_BYTES if five else Q6_BYTES
    nb = blocks.shape[1] // size
    ws, xs, ost = np.int64(nb * W16_BYTES), np.int64(xa.shape[1] * 2), np.int64(out.shape[1] * 4)
    w0, x0, o0 = np.int64(blocks.ctypes.data), np.int64(xa.ctypes.data), np.int64(out.ctypes.data)
    g0, gs = np.int64(xg.ctypes.data), np.int64(xg.shape[1] * 4)
    bst = np.int64(blocks.shape[1])
    for item in prange((R + ROWS16 - 1) // ROWS16):
        r0 = item * ROWS16
        r1 = min(R, r0 + ROWS16)
        npairs = (r1 - r0 + 1) // 2
        raw = np.empty(npairs * ws + 64, np.uint8)
        buf = np.int64(raw.ctypes.data)
        buf += (64 - buf % 64) % 64  # 64-byte aligned: every piece on one cache line
        rawacc = np.empty(npairs * ACTS16 * 16 + 16, np.float32)  # each (pair, activation)'s float lanes
        acc = np.int64(rawacc.ctypes.data)
        acc += (64 - acc % 64) % 64
        for p in range(npairs):
            ra = r0 + 2 * p
            rb = ra + 1 if ra + 1 < r1 else ra
            if five:
                _rows5(w0 + ra * bst, w0 + rb * bst, buf + p * ws, nb)
            else:
                _rows6(w0 + ra * bst, w0 + rb * bst, buf + p * ws, nb)
        full = npairs - npairs % PAIRS
        for n in range(0, N, ACTS16):
            x, on = x0 + n * xs, o0 + n * ost + 4 * r0
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
                for r in range(2 * npairs):
                    pw = buf + (r // 2) * ws
                    _mins(pw + 1024 + 16 * (r % 2), pw + 1056 + 4 * (r % 2), g0 + (n // ACTS16) * gs, nb,
                          on + 4 * r, ost)


def quantized_linear(five: bool, blocks: np.ndarray, xq, xd, xbs) -> np.ndarray:
    """x @ w.T for a Q5_K (five) or Q6_K weight (blocks (R, nb * 176 or 210), the file's bytes) and Q8_K
    activation rows (xq (N, K), xd (N, nb), xbs (N, nb, 16): ggml_kquants.quantize_q8_K's) -> (N, R) float32, on
    this CPU's 512-bit VNNI (usable() says where): the same bits as ggml_kquants' tiles."""
    N, R = xq.shape[0], blocks.shape[0]
    nb = xd.shape[1]
    n_pad = -(-N // ACTS16) * ACTS16
    xa = aligned((n_pad, nb * A16_BYTES // 2), np.int16)  # 64-byte aligned, as the tile's loads say
    xa[N:] = 0  # padding rows: d_x = 0, quants 0
    xd = np.ascontiguousarray(xd)
    _acts16(xq, xd.view(np.uint32), xbs, xa)
    xg = aligned((n_pad // ACTS16, nb * MINS_BYTES // 4 if five else 16), np.int32)
    if five:
        xg[:] = 0
        _mins16(xd, xbs, xg)
    out = np.empty((n_pad, R + R % 2), np.float32)
    _dot_w16(five, blocks, xa, xg, out)
    return out[:N] if R % 2 == 0 else np.ascontiguousarray(out[:N, :R])
