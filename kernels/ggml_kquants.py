"""Numba twin of llama_ref.model.ggml_kquants: Q4_K, Q5_K and Q6_K weights by Q8_K activations, compiled.

The NumPy module is the specification; these kernels compute the same numbers bit for bit
(tests/test_ggml_kquants.py): the activations are quantized to Q8_K as the specification does (compiled:
NumPy's version costs ~40 us a call, and a decode step makes ~7 per layer), the integer sums are exact in
int32 in any order, and the float steps are the specification's, in its order, each fused multiply-add one
rounding (llvm.fma.f32). No fast-math.

The weights are read as llama_ref.weights.packed keeps them, nothing copied. Q4_K whose rows do not come in
groups of 8: `qs` (Q4_1-style sub-blocks of 16 bytes, value j in the low nibble of byte j and j + 16 in its
high nibble) and `head` (the file's d | dmin | 12 bytes of 6-bit scales and mins of every super-block). Q5_K
and Q6_K: `blocks`, the file's bytes.

Repacked Q4_K (rows % 8 == 0, as llama.cpp repacks them): a copy of the weight made on its first product
(q4_kx8: repack_q4_k) interleaves 8 rows so that one 32-byte load feeds all 8, their scales and mins decoded;
the weight then keeps only that copy (weights.packed.Q4_KWeight.hold_x8). A prefill runs as llama.cpp's
ggml_gemm_q4_K_8x8_q8_K, a tile of 8 rows by ACTS8 activation rows keeping the rows in the 8 lanes
(_define_q4_kx8_tile; kernel level, 8192 x 2048 by 128-512 rows, one thread, 2.7-3.2x the 1 x 6 tile it
replaced); a decode as its gemv, a tile of 8 rows by one activation row that asks for the weights ahead
(1.14-1.35x the one-row tile on qs / head, kernel level), or with simd 3 on an AVX-512 VNNI CPU two groups at
once (_define_q4_kx16_tile by one activation row); kernels/ggml_linears.py's work items use them too.

On an Intel CPU with AVX-512 VNNI (simd 3, ggml_simd.host_prefers_512) a Q5_K or Q6_K prefill of 16 rows or more
goes to kernels/ggml_kquants16.py instead: each value times its scale in 16-bit integers, 512-bit vpdpwssd, the
same bits; 1.6-2.1x the grouped tiles below at 1B shapes by 512 rows. Elsewhere (AVX2, Zen's 512-bit halves, the
portable code) Q5_K and Q6_K prefill with their activations in groups (group_acts: GROUP rows' quants, int16 bsums
and scales in one record per super-block), a tile of one weight row by a group (_define_q5_k_gtile, _define_q6_k_gtile),
SEG super-blocks at a time so that the group's bytes stay in L1 while the rows pass; kernel level (Q6_K 8192 x
2048 and 2048 x 8192 by 120 rows, one thread) 1.10-1.20x the 1 x ACTS tile on the plain arrays, Q5_K 1.86-1.93x.
The records are woven (group_acts) so that two 32-value pieces share one vpmaddwd (_weave, _woven_lanes: 3
multiplies per 64 values and activation row instead of 4; the multiplies bound these tiles on AVX2) and carry
the sub-block sums for Q5_K's mins in one vector; Q5_K 1.16-1.29x the tile before (1B shapes by 512 rows, one
thread, best of 3 interleaved rounds). Each work item first unpacks its weight rows once (unpack_q5_k,
unpack_q6_k: values as bytes, woven the same way, and the decoded scales), so that the tiles' loops only load
and multiply: in registers, the unpacking was done again for every group that passed a row (Zen 3, one
thread, 2048 x 2048 by 256 rows: Q5_K 21.4 -> 14-17 ms, Q6_K 22 -> 14-15.5; in L1, cycles a super-block of 6
rows, Q5_K 87 -> 57, Q6_K 83 -> 59, where weaving in registers had cost Q6_K more than it saved, 0.87-0.96x).

Every other inner loop is one LLVM vector-IR function per tile of one weight row by ACTS activation rows (a
decode: by one), over the whole row (_define_q4_k_tile, _define_q5_k_tile, _define_q6_k_tile): per super-block
the row's header is decoded and its values unpacked in registers once (shifts, ands and ors, as llama.cpp's
AVX2 code) for every activation row of the tile; the 8 int32 lanes of each 32-value sub-block, scaled by the
sub-block scales, summed in registers, and ggml's float steps; the accumulators stay in registers across the
row. The K-quants' values are unsigned, so they enter the unsigned side of the integer instructions as they
stand: vpdpbusd where the CPU has AVX-512 VNNI / AVX-VNNI, else AVX2's vpmaddubsw (pairs into int16, exact:
see ggml_simd.lanes_u8s8) then vpmaddwd by the scales (pairs into int32, as llama.cpp's AVX2 code does), else
portable IR. Which integer code runs is chosen at run time as in kernels/ggml.py (simd 0 portable, 2 AVX2, 1
the best; LLAMA_REF_GGML_PORTABLE=1 forces the portable one); all give the same integers.
Numba's on-disk cache checks a kernel against its own file only: after editing kernels/ggml_simd.py delete
kernels/__pycache__/ggml_kquants*.nbi and *.nbc.
"""

from __future__ import annotations

import weakref

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ._common import JIT, readonly
from .ggml_ops import serial_product
from .ggml_simd import (HAS_AVX512BW, HAS_VNNI512, _close_loop, _declare, _gep_load, _hsum8, _prefetch, _ptr,
                        _rows_ahead, _shuffle, dispatch, lanes_portable, lanes_u8s8, lanes_u8s8_onto, madd16,
                        pairs_u8s8, pairs_u8s8_512, roundeven32, simd_default, splat8)
from .ggml_vec import _splat

ROWS = 16  # weight rows per parallel work item

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
# The best integer instructions of this CPU (VNNI, else AVX2), unless LLAMA_REF_GGML_PORTABLE=1 asks for the
# portable integer code (same results).
SIMD = simd_default()


# ---- the tiles: a weight row by activation rows, unpacked in registers ----------------------------------------

def _pairs(b, u, s, isa):
    """vpmaddubsw (ggml_simd.pairs_u8s8), or the same int16 sums in plain IR (portable; never saturating here)."""
    if isa != "portable":
        return pairs_u8s8(b, u, s)
    prod = b.mul(b.zext(u, ir.VectorType(I16, 32)), b.sext(s, ir.VectorType(I16, 32)))
    return b.add(_shuffle(b, prod, list(range(0, 32, 2))), _shuffle(b, prod, list(range(1, 32, 2))))


def _madd(b, p, q, isa):
    """vpmaddwd (ggml_simd.madd16) of <16 x i16> p, q, or the same in plain IR (portable)."""
    if isa != "portable":
        return madd16(b, p, q)
    v16_32 = ir.VectorType(I32, 16)
    prod = b.mul(b.sext(p, v16_32), b.sext(q, v16_32))
    return b.add(_shuffle(b, prod, list(range(0, 16, 2))), _shuffle(b, prod, list(range(1, 16, 2))))


def _weave(b, c, c_):
    """Two 32-value pieces' values (<32 x i8>, value order) -> V1, V2 woven by 16-bit words for one vpmaddwd of
    both (_define_q5_k_gtile; group_acts' woven records hold the activations the same way): dword u of V1 =
    values 4u, 4u + 1 of c, then of c_; of V2 = values 4u + 2, 4u + 3 of c, then of c_ (vpslld / vpsrld by 16
    and vpblendw)."""
    v8i, v16_16, v32 = ir.VectorType(I32, 8), ir.VectorType(I16, 16), ir.VectorType(I8, 32)
    c32, c_32, sixteen = b.bitcast(c, v8i), b.bitcast(c_, v8i), ir.Constant(v8i, [16] * 8)
    weave = ir.Constant(ir.VectorType(I32, 16), [k + (16 if k % 2 else 0) for k in range(16)])  # even words
    # from the first, odd from the second
    v1 = b.shuffle_vector(b.bitcast(c32, v16_16), b.bitcast(b.shl(c_32, sixteen), v16_16), weave)
    v2 = b.shuffle_vector(b.bitcast(b.lshr(c32, sixteen), v16_16), b.bitcast(c_32, v16_16), weave)
    return b.bitcast(v1, v32), b.bitcast(v2, v32)


def _woven_lanes(b, v1, v2, x1, x2, scale, isa):
    """The int32 lanes of two woven pieces by one activation row: vpmaddubsw(V1, X1) + vpmaddubsw(V2, X2) holds
    the 4-product sums P of the first piece at int16 2u and of the second at 2u + 1 (exact where |P| <= 32767:
    Q5_K 4 x 31 x 127 = 15748, Q6_K 4 x 63 x 127 = 32004; Q8_K's quants are within +-127), then one vpmaddwd
    by their scales (16 x i16, the first piece's at 2u, the second's at 2u + 1): lane u = s P + s' P', the sum
    of the two pieces' own lanes."""
    return _madd(b, b.add(_pairs(b, v1, x1, isa), _pairs(b, v2, x2, isa)), scale, isa)


def _woven_pairs(b, loop, tail, blk, xr, acts, isa, pairs_n, scale):
    """The loop over a super-block's pairs p of 32-value pieces in a grouped tile (b in its block, entered from
    `loop`, on to `tail` after pairs_n): pair p's V1, V2 (64 bytes from blk + 64 p, an unpacked row's record) by
    each activation row's X1, X2 (from xr + 256 a + 64 p, group_acts' record), scale(b, p) their vpmaddwd's
    scales. -> each activation row's int32 lanes, summed over the pairs (exact in any order)."""
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    v32, v8i = ir.VectorType(I8, 32), ir.VectorType(I32, 8)
    pairs_ = b.block
    p = b.phi(I64)
    lanes_in = [b.phi(v8i) for _ in range(acts)]
    totals = list(lanes_in)
    wp, xp = b.add(blk, b.mul(p, c64(64))), b.add(xr, b.mul(p, c64(64)))
    v1, v2 = (_gep_load(b, wp, c64(32 * k), v32, 1) for k in range(2))
    sc = scale(b, p)
    for a in range(acts):
        x1, x2 = (_gep_load(b, xp, c64(256 * a + 32 * k), v32, 1) for k in range(2))
        totals[a] = b.add(totals[a], _woven_lanes(b, v1, v2, x1, x2, sc, isa))
    p1 = b.add(p, c64(1))
    b.cbranch(b.icmp_signed("<", p1, pairs_n), pairs_, tail)
    p.add_incoming(c64(0), loop)
    p.add_incoming(p1, pairs_)
    for phi, v in zip(lanes_in, totals):
        phi.add_incoming(ir.Constant(v8i, [0] * 8), loop)
        phi.add_incoming(v, pairs_)
    return totals


def _unseen(b, n):
    """The int64 n through an empty inline asm: a loop to it that LLVM cannot count, so does not unroll whole
    (the grouped tiles' loops over a super-block's pieces, unrolled, kept 20-70 vectors on the stack)."""
    return b.asm(ir.FunctionType(I64, [I64]), "", "=r,0", [ir.Constant(I64, n)], False)


# A Q6_K prefill tile: one weight row by ACTS activation rows, each super-block of the row unpacked once for
# all of them. Measured (576 x 1536, N = 512, one thread, against the kernel before it, interleaved): 1 x 6
# 1.77-1.92x, 1 x 5 1.65-1.87x, 1 x 4 1.45-1.69x, 1 x 8 1.18-1.34x, 2 x 4 1.39x, 4 x 2 1.01-1.17x (more rows or
# activations than AVX2's 16 registers hold, and LLVM spills the lanes to the stack).
ACTS = 6
Q5_BYTES = 176  # a Q5_K super-block in the file: d | dmin | 12 bytes scales | 32 bytes qh | 128 bytes ql
Q6_BYTES = 210  # a super-block in the file: 128 bytes ql (low nibbles) | 64 bytes qh (2 high bits) | 16 int8
# scales | d fp16


def _q6_isa(isa: str) -> str:
    """The integer instructions Q6_K's tiles use: AVX2's (vpmaddubsw, then vpmaddwd by the scales) on a VNNI CPU
    too. vpdpbusd leaves int32 lanes, and the scales then cost a vpmulld, a zeroed accumulator and a shuffle per
    chunk (107 instructions a half super-block against 76). Measured on an AVX-512 AMD EPYC (Zen 4, session 35,
    alternated in-process): a decode 1.21x (576 x 1536) and 1.2x (2048 x 8192 in cache), a 128-row prefill
    1.10-1.16x. The same integers either way."""
    return "avx2" if isa == "vnni" else isa


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


def _q5_k_value_chunk(b, blk, qh, j):
    """Sub-block j (32 values) of a Q5_K super-block from the file's bytes at byte address blk (qh: its 32 bytes of
    high bits) -> <32 x i8> values 0..31 in value order: the low (even j) or high nibbles of ql bytes 48 + 32 (j // 2)
    .. and bit j of qh as bit 4."""
    v32 = ir.VectorType(I8, 32)

    def const(v):
        return ir.Constant(v32, [v] * 32)
    ql = _gep_load(b, blk, ir.Constant(I64, 48 + 32 * (j // 2)), v32, 1)
    low = b.and_(ql, const(15)) if j % 2 == 0 else b.lshr(ql, const(4))
    bit = b.and_(b.lshr(qh, const(j)) if j else qh, const(1))
    return b.or_(low, b.shl(bit, const(4)))


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
    isa = _q6_isa(isa)
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
            _prefetch(b, b.add(pa, c64(off)), into="l2")

    # Emitted chunk by chunk (32 values), in the order the registers allow: each row's chunk is unpacked
    # from its bytes and meets each activation's chunk, into the (row, activation) pair's integer lanes. A loop
    # over the two 128-value halves (the integer lanes carried), so that LLVM keeps one half's chunks in
    # registers. The scales as the instructions take them: AVX2 <16 x i16> per chunk, sc[2c] for its first 16
    # values and sc[2c+1] for the rest (vpmaddwd); else <8 x i32>.
    wb = [b.add(b.add(w, b.mul(c64(r), ws)), blk) for r in range(rows)]
    xa = [b.add(b.add(x, b.mul(c64(a), xstride)), b.mul(i, c64(256))) for a in range(acts)]
    outer, half, tail = loop, fn.append_basic_block("half"), fn.append_basic_block("tail")
    b.branch(half)
    b = ir.IRBuilder(half)
    h = b.phi(I64)
    lanes_in = [b.phi(ir.VectorType(I32, 8)) for _ in range(rows * acts)]  # pair (r, a) at r * acts + a
    totals = list(lanes_in)
    wh = [b.add(wb[r], b.mul(h, c64(64))) for r in range(rows)]  # the half's ql bytes; its qh 32 h on
    xh = [b.add(xa[a], b.mul(h, c64(128))) for a in range(acts)]
    sch = [b.sext(_gep_load(b, b.add(wb[r], b.mul(h, c64(8))), c64(192), ir.VectorType(I8, 8), 1),
                  ir.VectorType(I16, 8) if isa == "avx2" else ir.VectorType(I32, 8)) for r in range(rows)]
    for k in range(4):  # chunk k of the half
        for r in range(rows):
            ql = _gep_load(b, wh[r], c64(32 * (k % 2)), v32, 1)
            qh = _gep_load(b, b.add(wh[r], b.mul(h, c64(-32))), c64(128), v32, 1)  # 128 + 32 h
            vals = _q6_k_value_chunk(b, ql, qh, k)
            if isa == "avx2":
                scale = _shuffle(b, sch[r], [2 * k] * 8 + [2 * k + 1] * 8)
            else:
                scale = _shuffle(b, sch[r], [2 * k] * 4 + [2 * k + 1] * 4)
            for a in range(acts):
                xv = _gep_load(b, xh[a], c64(32 * k), v32, 1)
                if isa == "avx2":
                    part = madd16(b, pairs_u8s8(b, vals, xv), scale)
                else:
                    lanes = (lanes_u8s8(b, vals, xv, isa) if isa == "vnni" else lanes_portable(b, vals, xv, False))
                    part = b.mul(lanes, scale)
                t = r * acts + a
                totals[t] = b.add(totals[t], part)
    h1 = b.add(h, c64(1))
    b.cbranch(b.icmp_signed("<", h1, c64(2)), half, tail)
    h.add_incoming(c64(0), outer)
    h.add_incoming(h1, half)
    for phi, v in zip(lanes_in, totals):
        phi.add_incoming(ir.Constant(ir.VectorType(I32, 8), [0] * 8), outer)
        phi.add_incoming(v, half)
    b = ir.IRBuilder(tail)
    sc = [b.sext(_gep_load(b, wb[r], c64(192), v16, 1), v16_16 if isa == "avx2" else v16_32) for r in range(rows)]

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
            new_accs[t] = b.call(fma_v, [splat8(b, d), b.sitofp(b.sub(totals[t], offset), v8f), accs[t]])
    i1 = b.add(i, c64(1))  # the super-block loop closes in `tail`
    b.cbranch(b.icmp_signed("<", i1, nb), outer, done)
    i.add_incoming(c64(0), entry)
    i.add_incoming(i1, tail)
    for phi, v in zip(accs, new_accs):
        phi.add_incoming(zero8, entry)
        phi.add_incoming(v, tail)
    b = ir.IRBuilder(done)
    finals = [b.phi(v8f) for _ in new_accs]
    for phi, v in zip(finals, new_accs):
        phi.add_incoming(zero8, entry)
        phi.add_incoming(v, tail)
    for r in range(rows):
        for a in range(acts):
            at = b.add(b.add(out, b.mul(c64(a), ostride)), c64(4 * r))
            b.store(_hsum8(b, finals[r * acts + a]), _ptr(b, at, F32), align=4)
    b.ret_void()
    return fn


def _define_q6_k_decode512(module):
    """_define_q6_k_tile's decode (one row by one activation row) on 512-bit registers (AVX-512 BW, simd 3 on Intel's
    AVX-512 VNNI cores): two 32-value chunks to a vector, the same integers. A half's 64 ql bytes are one load
    (chunks 0 and 1 in their low nibbles, 2 and 3 in their high ones, value order in each 32-byte half); its 32 qh
    bytes in both halves, shifted as words by 2k for chunk k (a byte's bits from its neighbour land above bit 1, and
    the & 3 drops them); vpmaddubsw, then vpmaddwd by the chunks' scales (sc[2c] for a chunk's first 16 values,
    sc[2c + 1] for the rest), added into 16 int32 lanes: chunk 2p's lanes in the lower 8, 2p + 1's in the upper 8,
    which are added together once a super-block, so that lane u holds ggml's sum over every chunk of the
    super-block, exact in int32. Then the -32 of every value and ggml's float steps as the AVX2 tile. On an Emerald
    Rapids core the loop is 60 instructions a super-block where the AVX2 tile's is 83 (GFNI's affine for its byte
    shifts), and one thread reads 1.7x the bytes in L2 (576 x 1536: 1.07-1.10 against 1.83-1.85 ns per 32 values;
    sessions.md, session 64)."""
    name = "llama_ref_ggml_q6_k_1x1_vnni512"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 11), name)
    fn.linkage = "internal"
    w, ws, x, xstride, xd, bs, xds, bss, nb, out, ostride = fn.args
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    v8f, v64, v32 = ir.VectorType(F32, 8), ir.VectorType(I8, 64), ir.VectorType(I8, 32)
    v32s, v16i, v16_16 = ir.VectorType(I16, 32), ir.VectorType(I32, 16), ir.VectorType(I16, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    fma_v = _declare(module, "llvm.fma.v8f32", v8f, [v8f] * 3)
    madd512 = _declare(module, "llvm.x86.avx512.pmaddw.d.512", v16i, [v32s, v32s])
    b = ir.IRBuilder(entry)
    ahead = _rows_ahead(b, ws, 1)
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)

    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    acc = b.phi(v8f)
    blk = b.add(w, b.mul(i, c64(Q6_BYTES)))
    pa = b.add(blk, b.mul(ws, ahead))  # this super-block's share of the row `ahead` on (210 bytes: 4 lines)
    for off in range(0, Q6_BYTES, 64):
        _prefetch(b, b.add(pa, c64(off)), into="l2")
    sc = b.sext(_gep_load(b, blk, c64(192), ir.VectorType(I8, 16), 1), v16_16)  # the 16 scales, int16
    xb = b.add(x, b.mul(i, c64(256)))
    low4, three = ir.Constant(v64, [15] * 64), ir.Constant(v64, [3] * 64)
    total = ir.Constant(v16i, [0] * 16)
    for h in range(2):
        ql = _gep_load(b, blk, c64(64 * h), v64, 1)
        qh = _gep_load(b, blk, c64(128 + 32 * h), v32, 1)
        qh2 = b.bitcast(_shuffle(b, qh, list(range(32)) * 2), v32s)  # the half's qh bytes, twice
        nibbles = (b.and_(ql, low4), b.and_(b.bitcast(b.lshr(b.bitcast(ql, v32s), ir.Constant(v32s, [4] * 32)), v64),
                                            low4))
        for p in range(2):  # chunks 2p and 2p + 1 of the half
            k0 = 2 * p
            bits = b.bitcast(b.lshr(qh2, ir.Constant(v32s, [2 * k0] * 16 + [2 * k0 + 2] * 16)), v64)
            high = b.bitcast(b.shl(b.bitcast(b.and_(bits, three), v32s), ir.Constant(v32s, [4] * 32)), v64)
            vals = b.or_(nibbles[p], high)
            xv = _gep_load(b, xb, c64(128 * h + 64 * p), v64, 1)
            c0 = 4 * h + k0  # the super-block's chunk in the lower half
            scale = _shuffle(b, sc, [2 * c0] * 8 + [2 * c0 + 1] * 8 + [2 * c0 + 2] * 8 + [2 * c0 + 3] * 8)
            total = b.add(total, b.call(madd512, [pairs_u8s8_512(b, vals, xv), scale]))
    lanes = b.add(_shuffle(b, total, list(range(8))), _shuffle(b, total, list(range(8, 16))))
    # the -32 of every value, as the AVX2 tile: 32 (sc[2u] bsum[2u] + sc[2u+1] bsum[2u+1]) per lane
    bsum = _gep_load(b, bs, b.mul(i, c64(64)), v16i, 4)
    offset = madd16(b, b.shl(sc, ir.Constant(v16_16, [5] * 16)), b.trunc(bsum, v16_16))
    dw = b.fpext(_gep_load(b, blk, c64(208), ir.HalfType(), 1), F32)
    d = b.fmul(_gep_load(b, xd, b.mul(i, c64(4)), F32, 4), dw)  # float32 d_x * d_w
    new_acc = b.call(fma_v, [splat8(b, d), b.sitofp(b.sub(lanes, offset), v8f), acc])
    b, (final,) = _close_loop(b, i, nb, entry, loop, done, [(acc, new_acc, ir.Constant(v8f, [0.0] * 8))])
    b.store(_hsum8(b, final), _ptr(b, out, F32), align=4)
    b.ret_void()
    return fn


# ---- prefill: a weight row by a group of activation rows, the group's bytes in one record per super-block ------

# A prefill's Q8_K activations as the grouped tiles read them (group_acts): ACTS rows at a time, one record
# per super-block of their quants (ACTS x 256 int8), bsums as int16 (ACTS x 16; |bsum| <= 16 x 127) and scales
# (ACTS float32), padded to whole cache lines. One address per super-block where the plain layout took three
# per activation row (with 6 rows LLVM kept those 18 on the stack and reloaded them every super-block); the
# bsums as vpmaddwd takes them (int32 ones cost four packing instructions per activation row and super-block);
# and one stream of bytes, read SEG super-blocks at a time so that a group's segment stays in L1 while the
# weight rows pass it (K = 8192: 6 rows' 8 KB each did not; 1.3x the time per block pair of K = 2048).
SEG = 8
# Activation rows per group. Measured (Q6_K, 8192 x 2048 and 2048 x 8192 by 120 rows, one thread, against the
# plain 1 x 6 tile, interleaved, 15 rounds): 6 1.10-1.15x, 8 1.07-1.14x, 4 0.70-0.75x.
GROUP = 6


def act_record(acts: int) -> int:
    """The bytes of one super-block of a group of `acts` Q8_K activation rows (group_acts), with the sub-block
    sums for Q5_K's mins at pair_sums(acts)."""
    return -(-(pair_sums(acts) + 128) // 64) * 64


def pair_sums(acts: int) -> int:
    """Where a record (group_acts) keeps its sub-block sums: after the scales, 32-byte aligned."""
    return -(-acts * 292 // 32) * 32


GROUP_RECORD = act_record(GROUP)


# A Q6_K row as its prefill tile reads it (unpack_q6_k, once per work item; _define_q6_k_gtile), per super-block:
# the 256 values 0..63 as bytes, per pair p of 32-value chunks c = 2p, 2p + 1 (64 bytes from 64 p) woven by 16-bit
# words into V1, V2 (_weave) | per pair p the scales its vpmaddwd takes (<16 x i16>: words 2u, 2u + 1 the scales of
# lane u's values in chunk 2p, in chunk 2p + 1: sc[4p + (u >= 4)], sc[4p + 2 + (u >= 4)]) | the 16 scales times 32
# as int16 (the -32 of every value, by the bsums) | d as float32 | zeros to a whole number of lines
Q6U_BYTES = 448
Q6U_SC, Q6U_SC32, Q6U_D = 256, 384, 416


def _q6_k_record(b, blk, o):
    """One Q6_K super-block of the file (210 bytes at byte address blk) -> its Q6U_BYTES record at byte address o:
    the values, scales and fp16 -> float32 d as _define_q6_k_tile decodes them in registers (unpack_q6_k)."""
    v32, v16_16 = ir.VectorType(I8, 32), ir.VectorType(I16, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    sc = b.sext(_gep_load(b, blk, c64(192), ir.VectorType(I8, 16), 1), v16_16)
    chunks = []  # the 8 chunks of 32 values, in value order
    for h in range(2):
        qh = _gep_load(b, blk, c64(128 + 32 * h), v32, 1)
        chunks += [_q6_k_value_chunk(b, _gep_load(b, blk, c64(64 * h + 32 * (k % 2)), v32, 1), qh, k) for k in range(4)]
    for p in range(4):
        for k, v in enumerate(_weave(b, chunks[2 * p], chunks[2 * p + 1])):
            b.store(v, _ptr(b, b.add(o, c64(64 * p + 32 * k)), v32), align=1)
        scale = _shuffle(b, sc, [4 * p, 4 * p + 2] * 4 + [4 * p + 1, 4 * p + 3] * 4)
        b.store(scale, _ptr(b, b.add(o, c64(Q6U_SC + 32 * p)), v16_16), align=1)
    b.store(b.shl(sc, ir.Constant(v16_16, [5] * 16)), _ptr(b, b.add(o, c64(Q6U_SC32)), v16_16), align=1)
    b.store(b.fpext(_gep_load(b, blk, c64(208), ir.HalfType(), 1), F32), _ptr(b, b.add(o, c64(Q6U_D)), F32), align=4)
    return Q6U_D + 4  # where the record's zeros start


def _define_q6_k_gtile(module, acts, isa):
    """void f(w, x, nb, out, ostride, acc, part): ggml_vec_dot_q6_K_q8_K of one weight row (its unpack_q6_k
    records from byte address w) with a group of `acts` activation rows (group_acts' woven records from byte
    address x), nb super-blocks, with _define_q6_k_tile's lanes and float steps. A row may come in
    segments of super-blocks: part & 1, its first (the float32 lanes start at zero, else from acc: 8 per
    activation row, 32 bytes apart); part & 2, its last (hsum_float_8 of the lanes -> out[a * ostride], else
    the lanes -> acc). Stored and loaded whole, the lanes carry the same chain of fma's as one call.

    Two chunks of 32 values share one vpmaddwd, as Q5_K's sub-blocks (_define_q5_k_gtile, _woven_lanes): lane u
    of the specification is the sum over the chunks c of sc[2c + (u >= 4)] times the products 4u .. 4u + 3 of c,
    and the woven pair (2p, 2p + 1) adds both chunks' terms of lane u in one vpmaddwd, exact in int32, so the same
    lanes (the same integers in each), with 3 multiplies per 64 values and activation row instead of 4. Weaving
    in registers cost more than it saved (0.87-0.96x, session 33); the row comes unpacked and woven
    (unpack_q6_k, once per work item), so the loop only loads: Zen 3, in L1, 83 -> 59 cycles a super-block of 6
    activation rows."""
    isa = _q6_isa(isa)
    name = f"llama_ref_ggml_q6_k_g{acts}_{isa}"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 7), name)
    fn.linkage = "internal"
    w, x, nb, out, ostride, acc, part = fn.args
    entry, loop, pairs_, tail, done, last, keep = (fn.append_basic_block(n) for n in (
        "entry", "loop", "pairs", "tail", "done", "last", "keep"))
    v8f = ir.VectorType(F32, 8)
    v16_16, v16_32 = ir.VectorType(I16, 16), ir.VectorType(I32, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero8 = ir.Constant(v8f, [0.0] * 8)
    fma_v = _declare(module, "llvm.fma.v8f32", v8f, [v8f] * 3)
    rec, bso, xdo = act_record(acts), 256 * acts, 288 * acts  # a record; its bsums, its scales
    b = ir.IRBuilder(entry)
    first = b.icmp_signed("!=", b.and_(part, c64(1)), c64(0))
    pairs_n = _unseen(b, 4)  # a loop LLVM keeps (unrolled whole, its values spilled to the stack)
    init = [b.select(first, zero8, _gep_load(b, acc, c64(32 * a), v8f, 4)) for a in range(acts)]
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)

    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    accs = [b.phi(v8f) for _ in range(acts)]
    blk, xr = b.add(w, b.mul(i, c64(Q6U_BYTES))), b.add(x, b.mul(i, c64(rec)))
    b.branch(pairs_)

    # the 4 pairs of chunks in a loop, the integer lanes carried; pair p's scales: 32 bytes from Q6U_SC + 32 p
    totals = _woven_pairs(ir.IRBuilder(pairs_), loop, tail, blk, xr, acts, isa, pairs_n,
                          lambda b, p: _gep_load(b, b.add(blk, b.mul(p, c64(32))), c64(Q6U_SC), v16_16, 2))

    # the -32 of every value (as _define_q6_k_tile's), then the float lanes
    b = ir.IRBuilder(tail)
    sc32 = _gep_load(b, blk, c64(Q6U_SC32), v16_16, 2)
    if isa != "avx2":
        sc32 = b.sext(sc32, v16_32)
    dw = _gep_load(b, blk, c64(Q6U_D), F32, 4)
    even, odd = list(range(0, 16, 2)), list(range(1, 16, 2))
    new_accs = []
    for a in range(acts):
        bsum = _gep_load(b, xr, c64(bso + 32 * a), v16_16, 2)
        if isa == "avx2":
            offset = madd16(b, sc32, bsum)
        else:
            prod = b.mul(sc32, b.sext(bsum, v16_32))
            offset = b.add(_shuffle(b, prod, even), _shuffle(b, prod, odd))
        d = b.fmul(_gep_load(b, xr, c64(xdo + 4 * a), F32, 4), dw)  # float32 d_x * d_w
        d8 = splat8(b, d)
        new_accs.append(b.call(fma_v, [d8, b.sitofp(b.sub(totals[a], offset), v8f), accs[a]]))
    i1 = b.add(i, c64(1))
    b.cbranch(b.icmp_signed("<", i1, nb), loop, done)
    i.add_incoming(c64(0), entry)
    i.add_incoming(i1, tail)
    for phi, v0, v in zip(accs, init, new_accs):
        phi.add_incoming(v0, entry)
        phi.add_incoming(v, tail)

    b = ir.IRBuilder(done)
    finals = [b.phi(v8f) for _ in new_accs]
    for phi, v0, v in zip(finals, init, new_accs):
        phi.add_incoming(v0, entry)
        phi.add_incoming(v, tail)
    b.cbranch(b.icmp_signed("!=", b.and_(part, c64(2)), c64(0)), last, keep)
    b = ir.IRBuilder(last)
    for a in range(acts):
        b.store(_hsum8(b, finals[a]), _ptr(b, b.add(out, b.mul(c64(a), ostride)), F32), align=4)
    b.ret_void()
    b = ir.IRBuilder(keep)
    for a in range(acts):
        b.store(finals[a], _ptr(b, b.add(acc, c64(32 * a)), v8f), align=4)
    b.ret_void()
    return fn


# A Q5_K row as its prefill tile reads it (unpack_q5_k, once per work item; _define_q5_k_gtile), per super-block:
# the 256 values 0..31 as bytes, per pair p of sub-blocks (64 bytes from 64 p) woven by 16-bit words into V1, V2
# (_weave) | 8 int16 scales sc[j] | 8 int16 mins mn[j] | d, dmin as float32 | zeros to a whole number of lines
Q5U_BYTES = 320
Q5U_SC, Q5U_MN, Q5U_D = 256, 272, 288


def _q5_k_record(b, blk, o):
    """One Q5_K super-block of the file (176 bytes at byte address blk) -> its Q5U_BYTES record at byte address o:
    the values, scales and mins as _define_q5_k_tile decodes them in registers (the same integers, the same fp16
    -> float32 d, dmin; unpack_q5_k)."""
    v32 = ir.VectorType(I8, 32)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    dw, dminw, sc8, mn8 = _kquant_header(b, blk, "avx2", whole=True)  # sc8 <8 x i16>, mn8 <8 x i32>
    b.store(sc8, _ptr(b, b.add(o, c64(Q5U_SC)), sc8.type), align=1)
    mn16 = b.trunc(mn8, ir.VectorType(I16, 8))
    b.store(mn16, _ptr(b, b.add(o, c64(Q5U_MN)), mn16.type), align=1)
    b.store(dw, _ptr(b, b.add(o, c64(Q5U_D)), F32), align=4)
    b.store(dminw, _ptr(b, b.add(o, c64(Q5U_D + 4)), F32), align=4)
    qh = _gep_load(b, blk, c64(16), v32, 1)
    for p in range(4):
        pieces = (_q5_k_value_chunk(b, blk, qh, j) for j in (2 * p, 2 * p + 1))
        for k, v in enumerate(_weave(b, *pieces)):
            b.store(v, _ptr(b, b.add(o, c64(64 * p + 32 * k)), v32), align=1)
    return Q5U_D + 8  # where the record's zeros start


def _define_unpack(module, five):
    """void f(w, nb, out): nb Q5_K (five) or Q6_K super-blocks of the file (from byte address w) -> their records
    at out (_q5_k_record / _q6_k_record, then zeros to the record's end), written once for every group of
    activation rows that passes the row."""
    name = f"llama_ref_ggml_unpack_q{5 if five else 6}_k"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 3), name)
    fn.linkage = "internal"
    w, nb, out = fn.args
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    size, record, fill = (Q5_BYTES, Q5U_BYTES, _q5_k_record) if five else (Q6_BYTES, Q6U_BYTES, _q6_k_record)
    b = ir.IRBuilder(entry)
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)
    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    o = b.add(out, b.mul(i, c64(record)))
    for z in range(fill(b, b.add(w, b.mul(i, c64(size))), o), record, 4):
        b.store(ir.Constant(I32, 0), _ptr(b, b.add(o, c64(z)), I32), align=4)
    i1 = b.add(i, c64(1))
    b.cbranch(b.icmp_signed("<", i1, nb), loop, done)
    i.add_incoming(c64(0), entry)
    i.add_incoming(i1, loop)
    b = ir.IRBuilder(done)
    b.ret_void()
    return fn


def _unpack(five):
    """The intrinsic unpack(w, nb, out) of _define_unpack: nb Q5_K (five) or Q6_K super-blocks (the file's bytes at
    byte address w) -> Q5U_BYTES / Q6U_BYTES records at out."""
    @intrinsic
    def unpack(typingctx, w, nb, out):
        sig = types.void(types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            builder.call(_define_unpack(builder.module, five), args)
            return context.get_dummy_value()
        return sig, codegen
    return unpack


unpack_q5_k, unpack_q6_k = _unpack(True), _unpack(False)


def _define_q5_k_gtile(module, acts, isa):
    """void f(w, x, nb, out, ostride, acc, part): ggml_vec_dot_q5_K_q8_K of one weight row (its unpack_q5_k
    records from byte address w) with a group of `acts` activation rows (group_acts' woven records from byte
    address x), in _define_q5_k_tile's order; segments and acc (per activation row 64
    bytes: the 8 float32 lanes, then summs) as _define_q6_k_gtile's.

    Two sub-blocks j = 2p, j' = 2p + 1 share one vpmaddwd: their values (c, c' in value order) are woven by 16-bit
    words into V1 (dword u: word 2u of c, word 2u of c') and V2 (words 2u + 1), the activations the same way (X1,
    X2); vpmaddubsw(V1, X1) + vpmaddubsw(V2, X2) holds P[j, u] at int16 2u and P[j', u] at 2u + 1 (P: the 4
    products 4u .. 4u + 3 of a sub-block, |P| <= 4 x 31 x 127 = 15748: exact), and vpmaddwd by (sc[j], sc[j'])
    gives lane u = sc[j] P[j, u] + sc[j'] P[j', u], exact in int32: the same lanes as one vpmaddubsw and one
    vpmaddwd per sub-block, with 3 multiplies per activation row and pair of sub-blocks instead of 4 (the
    multiplies bound this loop). Per super-block a loop over the 4 pairs, each pair's V1, V2 and scales loaded
    once for all the activation rows. The row comes unpacked (unpack_q5_k): in registers, the unpacking and
    weave took 16 of the loop's 47 vector instructions and the header ~25 more a super-block, for every group
    that passed the row (Zen 3, in L1: 87 -> 57 cycles a super-block of 6 activation rows). The mins: one
    vpmaddwd of (mn[j], mn[j]) by the int16 bsums per activation row, its 8 int32 summed (exact in any order).
    The portable code computes the same int16 and int32 sums in plain IR."""
    name = f"llama_ref_ggml_q5_k_g{acts}_{isa}"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 7), name)
    fn.linkage = "internal"
    w, x, nb, out, ostride, acc, part = fn.args
    entry, loop, pairs_, tail, done, last, keep = (fn.append_basic_block(n) for n in (
        "entry", "loop", "pairs", "tail", "done", "last", "keep"))
    v8f, v16_16 = ir.VectorType(F32, 8), ir.VectorType(I16, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero8 = ir.Constant(v8f, [0.0] * 8)
    fma_v = _declare(module, "llvm.fma.v8f32", v8f, [v8f] * 3)
    rec, xdo, spo = act_record(acts), 288 * acts, pair_sums(acts)
    assert acts <= 8  # the mins and summs: one int32 / float32 lane per activation row

    def pair_splat(b, at):  # the two int16 at byte address `at` in every dword: <16 x i16>
        return b.bitcast(_splat(b, _gep_load(b, at, c64(0), I32, 4), 8), v16_16)
    b = ir.IRBuilder(entry)
    first = b.icmp_signed("!=", b.and_(part, c64(1)), c64(0))
    pairs_n = _unseen(b, 4)  # a loop LLVM keeps (unrolled whole, its values spilled to the stack)
    init = [b.select(first, zero8, _gep_load(b, acc, c64(64 * a), v8f, 4)) for a in range(acts)]
    init.append(b.select(first, zero8, _gep_load(b, acc, c64(32), v8f, 4)))  # summs, activation row a in lane a
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)

    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    accs = [b.phi(v8f) for _ in range(acts + 1)]  # each activation row's 8 lanes, then the summs of all
    blk, xr = b.add(w, b.mul(i, c64(Q5U_BYTES))), b.add(x, b.mul(i, c64(rec)))
    b.branch(pairs_)

    # the 4 pairs of sub-blocks in a loop, the integer lanes carried; pair p's scales: (sc[2p], sc[2p + 1]) in
    # every dword
    totals = _woven_pairs(ir.IRBuilder(pairs_), loop, tail, blk, xr, acts, isa, pairs_n,
                          lambda b, p: pair_splat(b, b.add(b.add(blk, c64(Q5U_SC)), b.mul(p, c64(4)))))

    # the mins of all the activation rows at once, lane a for row a: sum_p (mn[2p] S[2p] + mn[2p+1] S[2p+1]),
    # four vpmaddwd of (mn[2p], mn[2p+1]) by the record's (S[2p], S[2p+1]) of each row (exact in any order:
    # |mn| <= 63, |S| <= 32 x 127); summs = fma(-(d_x dmin_w), that, summs) lane by lane, as ggml's scalar
    b = ir.IRBuilder(tail)
    imin = None
    for q in range(4):
        part_ = _madd(b, pair_splat(b, b.add(blk, c64(Q5U_MN + 4 * q))), _gep_load(b, xr, c64(spo + 32 * q), v16_16, 2),
                      isa)
        imin = part_ if imin is None else b.add(imin, part_)
    dw, dminw = (_gep_load(b, blk, c64(Q5U_D + 4 * k), F32, 4) for k in range(2))
    xd8 = _gep_load(b, xr, c64(xdo), v8f, 4)  # the rows' d_x (zeros past the last row)
    dmin = b.fneg(b.fmul(xd8, splat8(b, dminw)))  # -(d_x * dmin_w)
    new = []
    for a in range(acts):
        xdv = _gep_load(b, xr, c64(xdo + 4 * a), F32, 4)
        d8 = splat8(b, b.fmul(xdv, dw))
        new.append(b.call(fma_v, [d8, b.sitofp(totals[a], v8f), accs[a]]))
    new.append(b.call(fma_v, [dmin, b.sitofp(imin, v8f), accs[acts]]))
    i1 = b.add(i, c64(1))
    b.cbranch(b.icmp_signed("<", i1, nb), loop, done)
    i.add_incoming(c64(0), entry)
    i.add_incoming(i1, tail)
    for phi, v0, v in zip(accs, init, new):
        phi.add_incoming(v0, entry)
        phi.add_incoming(v, tail)

    b = ir.IRBuilder(done)
    finals = [b.phi(v.type) for v in new]
    for phi, v0, v in zip(finals, init, new):
        phi.add_incoming(v0, entry)
        phi.add_incoming(v, tail)
    b.cbranch(b.icmp_signed("!=", b.and_(part, c64(2)), c64(0)), last, keep)
    b = ir.IRBuilder(last)
    for a in range(acts):
        summs = b.extract_element(finals[acts], ir.Constant(I32, a))
        total = b.fadd(_hsum8(b, finals[a]), summs)  # the mins' float32 sum, added last
        b.store(total, _ptr(b, b.add(out, b.mul(c64(a), ostride)), F32), align=4)
    b.ret_void()
    b = ir.IRBuilder(keep)
    for a in range(acts):
        b.store(finals[a], _ptr(b, b.add(acc, c64(64 * a)), v8f), align=4)
    b.store(finals[acts], _ptr(b, b.add(acc, c64(32)), v8f), align=4)
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
    v8f, v32, v16_32 = ir.VectorType(F32, 8), ir.VectorType(I8, 32), ir.VectorType(I32, 16)
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
            _prefetch(b, b.add(b.add(wb, b.mul(ws, ahead)), c64(off)), into="l2")

    dw, dminw, scales, mn8 = _kquant_header(b, wb, isa)  # the block's 16 header bytes

    xa = [b.add(b.add(x, b.mul(c64(a), xstride)), b.mul(i, c64(256))) for a in range(acts)]
    totals = [None] * acts
    qh = _gep_load(b, wb, c64(16), v32, 1)
    for j in range(8):
        vals = _q5_k_value_chunk(b, wb, qh, j)
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
        new_accs.append(b.call(fma_v, [splat8(b, b.fmul(xdv, dw)), b.sitofp(totals[a], v8f), accs[a]]))
        dmin = b.fneg(b.fmul(xdv, dminw))  # -(d_x * dmin_w)
        new_summs.append(b.call(fma_s, [dmin, b.sitofp(imin, F32), summs[a]]))
    zero = ir.Constant(F32, 0.0)
    b, finals = _close_loop(b, i, nb, entry, loop, done, [(p, v, zero8) for p, v in zip(accs, new_accs)]
                            + [(p, v, zero) for p, v in zip(summs, new_summs)])
    for a in range(acts):
        total = b.fadd(_hsum8(b, finals[a]), finals[acts + a])  # the mins' float32 sum, added last
        b.store(total, _ptr(b, b.add(out, b.mul(c64(a), ostride)), F32), align=4)
    b.ret_void()
    return fn


def _kquant_header(b, hb, isa, whole=False):
    """A Q4_K / Q5_K super-block's 16 header bytes at byte address hb -> (d, dmin float32, the 8 six-bit
    scales as the integer instructions take them, <8 x i32> mins): llama.cpp's utmp / kmask words, as
    <4 x i8> pieces. Scales: AVX2's vpmaddwd wants <16 x i16> with sc[j] everywhere, the rest <8 x i32>;
    whole: the 8 in one vector instead (<8 x i16> on AVX2, else <8 x i32>)."""
    v4 = ir.VectorType(I8, 4)

    def c4(v):
        return ir.Constant(v4, [v] * 4)
    dw, dminw = (b.fpext(_gep_load(b, hb, ir.Constant(I64, off), ir.HalfType(), 1), F32) for off in (0, 2))
    s03, m03, md = (_gep_load(b, hb, ir.Constant(I64, off), v4, 1) for off in (4, 8, 12))
    sc_hi = b.or_(b.and_(md, c4(15)), b.and_(b.lshr(s03, c4(2)), c4(0x30)))
    mn_hi = b.or_(b.lshr(md, c4(4)), b.and_(b.lshr(m03, c4(2)), c4(0x30)))
    eight = ir.Constant(ir.VectorType(I32, 8), list(range(8)))
    sc8 = b.shuffle_vector(b.and_(s03, c4(63)), sc_hi, eight)  # <8 x i8>, 0..63
    mn8 = b.zext(b.shuffle_vector(b.and_(m03, c4(63)), mn_hi, eight), ir.VectorType(I32, 8))
    sc = b.zext(sc8, ir.VectorType(I16 if isa == "avx2" else I32, 8))
    if whole:  # the 8 scales in one vector: <8 x i16> on AVX2, else <8 x i32>
        return dw, dminw, sc, mn8
    return dw, dminw, [_shuffle(b, sc, [j] * (16 if isa == "avx2" else 8)) for j in range(8)], mn8


def _define_q4_k_tile(module, acts, repacked, isa):
    """void f(w, ws, h, x, xstride, xd, bs, xds, bss, nb, out, ostride): Q4_K by Q8_K of one weight row (its
    quants as weights.packed keeps them at byte address w, 128 bytes a super-block, ws bytes a row; its
    headers at h, 16 bytes a super-block) with `acts` activation rows (as _define_q6_k_tile's) -> out[a *
    ostride]. The header decoded in registers once per super-block (_kquant_header) and each sub-block's
    nibbles unpacked once for every activation row; lanes as the other tiles'.

    repacked (ggml_gemv_q4_K_8x8_q8_K's order): iacc = the lanes' sum, acc = fma(iacc, d_w d_x, acc);
    iacc_min = sum_j mn[j] (bsum[2j] + bsum[2j+1]), acc_min = fma(iacc_min, dmin_w d_x, acc_min); result
    acc - acc_min. Else ggml_vec_dot_q4_K_q8_K's: acc[u] = fma(d_x d_w, lane u, acc[u]); the mins in 4 lanes
    m[k] = fma(-(d_x dmin_w), mn[2k] S[2k] + mn[2k+1] S[2k+1], m[k]); hsum_float_8(acc) + ((m0 + m2) + (m1 + m3))."""
    name = f"llama_ref_ggml_q4_k{'r' if repacked else ''}_1x{acts}_{isa}"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 12), name)
    fn.linkage = "internal"
    w, ws, h, x, xstride, xd, bs, xds, bss, nb, out, ostride = fn.args
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    v8f, v4f, v16, v16_32 = ir.VectorType(F32, 8), ir.VectorType(F32, 4), ir.VectorType(I8, 16), ir.VectorType(I32, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    fma_v = _declare(module, "llvm.fma.v8f32", v8f, [v8f] * 3)
    fma_4 = _declare(module, "llvm.fma.v4f32", v4f, [v4f] * 3)
    fma_s = _declare(module, "llvm.fma.f32", F32, [F32] * 3)
    # the accumulators of each activation row: repacked acc, acc_min (float32); else acc (8 lanes), m (4 lanes)
    kinds = (F32, F32) if repacked else (v8f, v4f)
    b = ir.IRBuilder(entry)
    ahead = _rows_ahead(b, ws, 1)
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)

    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    phis = [[b.phi(ty) for ty in kinds] for _ in range(acts)]
    wq, hb = b.add(w, b.mul(i, c64(128))), b.add(h, b.mul(i, c64(16)))
    if acts == 1:  # a decode: this super-block of the row `ahead` on (2 lines, and its header's)
        for off in (0, 64):
            _prefetch(b, b.add(b.add(wq, b.mul(ws, ahead)), c64(off)))
        _prefetch(b, b.add(hb, b.mul(b.mul(nb, c64(16)), ahead)))

    def splat(v, ty=v8f):
        return _shuffle(b, b.insert_element(ir.Constant(ty, ir.Undefined), v, ir.Constant(I32, 0)),
                        [0] * ty.count)
    dw, dminw, scales, mn8 = _kquant_header(b, hb, isa)
    xa = [b.add(b.add(x, b.mul(c64(a), xstride)), b.mul(i, c64(256))) for a in range(acts)]
    totals = [None] * acts
    for j in range(8):  # sub-block j: 16 bytes, value i the low nibble of byte i, i + 16 its high nibble
        raw = _gep_load(b, wq, c64(16 * j), v16, 1)
        lo, hi = b.and_(raw, ir.Constant(v16, [15] * 16)), b.lshr(raw, ir.Constant(v16, [4] * 16))
        vals = b.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 32), list(range(32))))
        for a in range(acts):
            xv = _gep_load(b, xa[a], c64(32 * j), ir.VectorType(I8, 32), 1)
            if isa == "avx2":
                part = madd16(b, pairs_u8s8(b, vals, xv), scales[j])
            else:
                lanes = lanes_u8s8(b, vals, xv, isa) if isa == "vnni" else lanes_portable(b, vals, xv, False)
                part = b.mul(lanes, scales[j])
            totals[a] = part if totals[a] is None else b.add(totals[a], part)

    def hsum_int(v, n):  # exact: the order of an integer sum does not matter
        while n > 1:
            n //= 2
            v = b.add(_shuffle(b, v, list(range(n))), _shuffle(b, v, list(range(n, 2 * n))))
        return b.extract_element(v, ir.Constant(I32, 0))
    even, odd = list(range(0, 16, 2)), list(range(1, 16, 2))
    new = []
    for a in range(acts):
        bsum = _gep_load(b, b.add(bs, b.mul(c64(a), bss)), b.mul(i, c64(64)), v16_32, 4)
        prod = b.mul(mn8, b.add(_shuffle(b, bsum, even), _shuffle(b, bsum, odd)))  # (8,) mn[j] (S[2j] + S[2j+1])
        xdv = _gep_load(b, b.add(xd, b.mul(c64(a), xds)), b.mul(i, c64(4)), F32, 4)
        acc, accm = phis[a]
        if repacked:
            acc = b.call(fma_s, [b.sitofp(hsum_int(totals[a], 8), F32), b.fmul(dw, xdv), acc])
            accm = b.call(fma_s, [b.sitofp(hsum_int(prod, 8), F32), b.fmul(dminw, xdv), accm])
        else:
            acc = b.call(fma_v, [splat(b.fmul(xdv, dw)), b.sitofp(totals[a], v8f), acc])
            pairs = b.add(_shuffle(b, prod, [0, 2, 4, 6]), _shuffle(b, prod, [1, 3, 5, 7]))  # (4,) lanes k
            dmin = b.fneg(b.fmul(xdv, dminw))  # -(d_x * dmin_w)
            accm = b.call(fma_4, [splat(dmin, v4f), b.sitofp(pairs, v4f), accm])
        new.append((acc, accm))
    zeros = [ir.Constant(ty, 0.0 if ty is F32 else [0.0] * ty.count) for ty in kinds]
    b, ends = _close_loop(b, i, nb, entry, loop, done,
                          [(phi, val, zero) for pa, na in zip(phis, new) for phi, val, zero in zip(pa, na, zeros)])
    finals = [ends[k:k + len(kinds)] for k in range(0, len(ends), len(kinds))]  # per activation row, as `new`
    for a in range(acts):
        acc, accm = finals[a]
        if repacked:
            total = b.fsub(acc, accm)
        else:
            m = [b.extract_element(accm, ir.Constant(I32, k)) for k in range(4)]
            total = b.fadd(_hsum8(b, acc), b.fadd(b.fadd(m[0], m[2]), b.fadd(m[1], m[3])))
        b.store(total, _ptr(b, b.add(out, b.mul(c64(a), ostride)), F32), align=4)
    b.ret_void()
    return fn


# ---- repacked Q4_K prefill: 8 weight rows x activation rows, llama.cpp's ggml_gemm_q4_K_8x8_q8_K -------------

# A group of 8 rows' super-block as the 8-row tile reads it (made once per weight, repack_q4_k): 1248 bytes,
# against 8 x 144 in the file.
Q4X8_QS, Q4X8_SC, Q4X8_MN, Q4X8_D, Q4X8_DMIN, Q4X8_BYTES = 0, 1024, 1152, 1216, 1232, 1248
# Activation rows per 8-row tile: 4 as llama.cpp's gemm; each pass of a sub-block then keeps 4 int16 sums, 4
# int32 sums and the unpacked weights in registers (the 8 float32 sums are touched once a super-block).
ACTS8 = 4
# How far ahead the 8 x 1 tile (a decode's) asks for the group's bytes. Measured (8 streamed matrices of 8192 x
# 2048 and of 2048 x 8192, one activation row, one thread, against the 1 x 1 tile on qs / head, 15-25 rounds):
# 1024 1.14-1.35x, 512 1.11-1.25x, 2048 0.96-1.11x, 4096 0.92-1.05x, 8192 1.03-1.16x; without 0.78-1.04x.
Q4X8_AHEAD = 1024


def repack_q4_k(qs: np.ndarray, head: np.ndarray) -> np.ndarray:
    """Q4_K rows as weights.packed keeps them (qs (R, nb * 128): 16-byte sub-blocks, value v in the low nibble
    of byte v and v + 16 in its high nibble; head (R, nb, 16): d | dmin | 12 bytes of 6-bit scales and mins),
    R % 8 == 0 -> (R / 8, nb * 1248) uint8: per group of 8 rows and super-block, so that one 32-byte load
    feeds the 8 rows (as llama.cpp's block_q4_Kx8) and the header is decoded here, not per tile:
      bytes    0..1023  quants: sub-block pair p, 4-value step t (at 256 p + 32 t): byte 4 r + i =
                        q[r, 2p, 4t + i] | q[r, 2p + 1, 4t + i] << 4 (row r, value 4t + i of the two sub-blocks)
      bytes 1024..1151  scales: sub-block j at 1024 + 16 j, sc[r, j] at bytes 2r and 2r + 1 (vpmaddwd's pairs)
      bytes 1152..1215  mins: pair p at 1152 + 16 p, mn[r, 2p] at byte 2r, mn[r, 2p + 1] at 2r + 1
      bytes 1216..1247  d of rows 0..7 (fp16), then dmin of rows 0..7 (fp16)
    The same integers and fp16 scales as the file's; 156 bytes per row's super-block."""
    from ..weights.packed import kquant_scales
    R, nb = head.shape[:2]
    G = R // 8
    b = qs.reshape(G, 8, nb, 8, 16)  # (groups, row, super-block, sub-block, 16 bytes)
    q = np.concatenate([b & np.uint8(15), b >> np.uint8(4)], axis=4)  # (G, 8, nb, 8, 32): values in order
    q = q.reshape(G, 8, nb, 4, 2, 8, 4)  # (G, r, nb, pair p, low/high, step t, i)
    quants = q[:, :, :, :, 0] | (q[:, :, :, :, 1] << np.uint8(4))  # (G, r, nb, p, t, i)
    quants = quants.transpose(0, 2, 3, 4, 1, 5).reshape(G, nb, 1024)  # (G, nb, p, t, r, i)
    sc, mn = kquant_scales(head.reshape(R * nb, 16)[:, 4:16])  # (R * nb, 8) each, 0..63
    sc = sc.reshape(G, 8, nb, 8).transpose(0, 2, 3, 1)  # (G, nb, j, r)
    scales = np.repeat(sc, 2, axis=3).reshape(G, nb, 128)  # sc[r, j] twice
    mins = mn.reshape(G, 8, nb, 4, 2).transpose(0, 2, 3, 1, 4).reshape(G, nb, 64)  # (G, nb, p, r, 2)
    h = head.reshape(G, 8, nb, 16)
    d = h[:, :, :, 0:2].transpose(0, 2, 1, 3).reshape(G, nb, 16)  # (G, nb, r, 2 bytes)
    dmin = h[:, :, :, 2:4].transpose(0, 2, 1, 3).reshape(G, nb, 16)
    return np.concatenate([quants, scales, mins, d, dmin], axis=2).reshape(G, nb * Q4X8_BYTES)


def unpack_q4_kx8(packed: np.ndarray, ids: np.ndarray) -> tuple:
    """repack_q4_k undone for rows ids (int array, n rows) of the weight: packed (R / 8, nb * 1248) -> qs
    (n, nb * 128) and head (n, nb, 16) as weights.packed keeps them, bit for bit (the 6-bit scales and mins
    packed back into the file's 12 bytes: kquant_scales inverted). Only those rows are read: a Q4_K weight
    that keeps only this copy (weights.packed.Q4_KWeight.hold_x8) serves an embedding's lookups from it."""
    G, nb, n = packed.shape[0], packed.shape[1] // Q4X8_BYTES, ids.shape[0]
    g, r = ids // 8, ids % 8  # each row's group and its place in it
    blk = packed.reshape(G, nb, Q4X8_BYTES)

    def part(lo, hi, *inner):  # bytes lo..hi of every super-block, (G, nb, *inner), a view
        return blk[:, :, lo:hi].reshape(G, nb, *inner)
    q = part(Q4X8_QS, Q4X8_SC, 4, 8, 8, 4)[g, :, :, :, r]  # (n, nb, pair p, step t, i): row r at 4 r + i
    values = np.stack([q & np.uint8(15), q >> np.uint8(4)], axis=3)  # (n, nb, p, low/high, t, i)
    values = values.reshape(n, nb, 8, 32)  # (n, nb, sub-block 2p / 2p + 1, value 4t + i)
    qs = values[..., :16] | (values[..., 16:] << np.uint8(4))  # (n, nb, 8, 16): value v low, v + 16 high
    sc = part(Q4X8_SC, Q4X8_MN, 8, 8, 2)[g, :, :, r, 0]  # (n, nb, j), each written twice
    mn = part(Q4X8_MN, Q4X8_D, 4, 8, 2)[g, :, :, r].reshape(n, nb, 8)  # (n, nb, j = 2p + k)
    d = part(Q4X8_D, Q4X8_DMIN, 8, 2)[g, :, r]  # (n, nb, 2 bytes)
    dmin = part(Q4X8_DMIN, Q4X8_BYTES, 8, 2)[g, :, r]
    top = np.uint8(0x30)  # scales and mins 4..7 keep their top 2 bits in the top bits of bytes 0..7
    low = np.uint8(15)
    scales = np.concatenate([sc[..., :4] | ((sc[..., 4:] & top) << np.uint8(2)),
                             mn[..., :4] | ((mn[..., 4:] & top) << np.uint8(2)),
                             (sc[..., 4:] & low) | ((mn[..., 4:] & low) << np.uint8(4))], axis=2)  # (n, nb, 12)
    head = np.concatenate([d, dmin, scales], axis=2)  # (n, nb, 16)
    return qs.reshape(n, nb * 128), head


@njit(parallel=True, **JIT)
def _repack_q4_k(qs, head, out):
    """repack_q4_k compiled (the same bytes, tests/test_ggml_kquants.py): its NumPy form costs ~90 ms per 16 M
    values, ~4 s for a 1B model's Q4_K matrices on their first prefill. Parallel over groups of 8 rows."""
    R, nb = head.shape[0], head.shape[1]
    for g in prange(R // 8):
        for i in range(nb):
            o = i * Q4X8_BYTES
            for r in range(8):
                row = 8 * g + r
                q = qs[row, 128 * i:128 * i + 128]  # 8 sub-blocks of 16 bytes: value v low, v + 16 high
                for p in range(4):
                    for v in range(32):  # value v of sub-blocks 2p (low nibble) and 2p + 1 (high)
                        lo, hi = q[32 * p + v % 16], q[32 * p + 16 + v % 16]
                        if v >= 16:
                            lo, hi = lo >> 4, hi >> 4
                        out[g, o + 256 * p + 32 * (v // 4) + 4 * r + v % 4] = (lo & 15) | ((hi & 15) << 4)
                h = head[row, i]  # d | dmin | 12 bytes: kquant_scales' 6-bit scales and mins
                for j in range(8):
                    if j < 4:
                        sc, mn = h[4 + j] & 63, h[8 + j] & 63
                    else:
                        sc = (h[8 + j] & 15) | ((h[j] >> 2) & 48)
                        mn = (h[8 + j] >> 4) | ((h[4 + j] >> 2) & 48)
                    out[g, o + 1024 + 16 * j + 2 * r] = sc
                    out[g, o + 1024 + 16 * j + 2 * r + 1] = sc
                    out[g, o + 1152 + 16 * (j // 2) + 2 * r + j % 2] = mn
                for c in range(2):
                    out[g, o + 1216 + 2 * r + c] = h[c]
                    out[g, o + 1232 + 2 * r + c] = h[2 + c]


def _q4_kx8_tail(b, blk, i, iacc, accs, bs, bss, xd, xds, isa):
    """The float steps that end super-block i of one group of 8 rows (its bytes at blk), for each activation row
    a: its mins' int32 sums against the activation's sub-block sums, then acc = fma(float32(iacc[a]), d_w d_x,
    acc) and acc_min = fma(float32(iacc_min), dmin_w d_x, acc_min) -> the new accs (acc at 2a, acc_min at 2a + 1)."""
    v8f, v8h = ir.VectorType(F32, 8), ir.VectorType(ir.HalfType(), 8)
    v16, v16_16, v16_32 = ir.VectorType(I8, 16), ir.VectorType(I16, 16), ir.VectorType(I32, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    fma_v = _declare(b.module, "llvm.fma.v8f32", v8f, [v8f] * 3)
    mins = [b.zext(_gep_load(b, blk, c64(Q4X8_MN + 16 * p), v16, 1), v16_16) for p in range(4)]
    dw = b.fpext(_gep_load(b, blk, c64(Q4X8_D), v8h, 1), v8f)
    dminw = b.fpext(_gep_load(b, blk, c64(Q4X8_DMIN), v8h, 1), v8f)
    new = []
    for a in range(len(iacc)):
        bsum = _gep_load(b, b.add(bs, b.mul(c64(a), bss)), b.mul(i, c64(64)), v16_32, 4)
        s = b.add(_shuffle(b, bsum, list(range(0, 16, 2))), _shuffle(b, bsum, list(range(1, 16, 2))))  # S[j]
        s = b.bitcast(b.trunc(s, ir.VectorType(I16, 8)), ir.VectorType(I32, 4))  # (S[2p], S[2p + 1]) at p
        imin = None
        for p in range(4):
            part = _madd(b, mins[p], b.bitcast(_shuffle(b, s, [p] * 8), v16_16), isa)
            imin = part if imin is None else b.add(imin, part)
        xdv = _gep_load(b, b.add(xd, b.mul(c64(a), xds)), b.mul(i, c64(4)), F32, 4)
        xs = splat8(b, xdv)
        new.append(b.call(fma_v, [b.sitofp(iacc[a], v8f), b.fmul(dw, xs), accs[2 * a]]))
        new.append(b.call(fma_v, [b.sitofp(imin, v8f), b.fmul(dminw, xs), accs[2 * a + 1]]))
    return new


def _define_q4_kx8_tile(module, acts, isa):
    """void f(w, x, xstride, xd, bs, xds, bss, nb, out, ostride): ggml_gemm_q4_K_8x8_q8_K's products of 8 weight
    rows (one group of repack_q4_k, from byte address w) with `acts` Q8_K activation rows (as
    _define_q6_k_tile's) -> out[a * ostride + 4 r], 8 contiguous float32 per activation row.

    The 8 rows are the 8 lanes throughout. Per sub-block j and activation row: 8 steps t of 4 values, each
    one vpmaddubsw of the unpacked 32 bytes (4 values of each row) by the activation's 4 bytes broadcast,
    summed in int16 (at most 16 x 15 x 127 = 30480 per element: exact), then one vpmaddwd by the rows' scales
    sc[r, j] -> int32 lane r = sc[r, j] (q_rj . x_j), summed over j (iacc, exact). The mins: 4 vpmaddwd of
    (mn[r, 2p], mn[r, 2p + 1]) by the activation's (S[2p], S[2p + 1]) (S[j] = bsum[2j] + bsum[2j + 1], at
    most 4064: int16). The float steps per super-block as the gemm (and the gemv, the same per output):
    acc = fma(float32(iacc), d_w * d_x, acc), acc_min = fma(float32(iacc_min), dmin_w * d_x, acc_min), lane by
    lane; the result acc - acc_min. The portable code computes the same int16 and int32 sums in plain IR.

    A decode's tile (acts 1) on a CPU with AVX-512 BW, best code ("vnni"), takes two steps t in one 512-bit
    vpmaddubsw (64 bytes, the activation's 4 bytes of each step broadcast to its half), then adds the two halves'
    int16 sums: the same integers (each half sums 4 steps, at most 15240), half the multiply instructions;
    in-cache 1.02-1.14x the AVX2 code (2 threads, 2048 and 8192 rows). The prefill tiles ran 1.14-1.23x slower
    that way (128 rows), so they and simd 2 keep AVX2's.

    A prefill's tile in the "vnni512" form (simd 3: Intel's AVX-512 VNNI cores, ggml_simd.host_prefers_512), 256-bit
    vectors: each step's vpdpbusd adds the 4 products of row r onto int32 lane r (steps in two chains, even and odd
    t, added after the 8 steps), and the sub-block's sum is multiplied by sc[r, j] (vpmulld) onto iacc: the same
    integers (|32 x 15 x 127| per sub-block, times 63, stays far inside int32) without vpmaddubsw's int16 sums and
    their 7 adds. The 8 x 4 tile in L1 ran 1.09-1.24x the AVX2 code's rate where the AVX2-form VNNI tile ran
    0.98-1.04x (Sapphire Rapids-class Xeon, session 38, interleaved in one process)."""
    dp = isa == "vnni512" and acts > 1
    isa = "vnni" if isa == "vnni512" else isa  # a decode's tile: the same as "vnni"
    wide = isa == "vnni" and HAS_AVX512BW and acts == 1
    name = f"llama_ref_ggml_q4_kx8_8x{acts}_{isa}{'_zmm' if wide else ''}{'_dp' if dp else ''}"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 10), name)
    fn.linkage = "internal"
    w, x, xstride, xd, bs, xds, bss, nb, out, ostride = fn.args
    v8f, v8 = ir.VectorType(F32, 8), ir.VectorType(I32, 8)
    v32, v16, v16_16 = ir.VectorType(I8, 32), ir.VectorType(I8, 16), ir.VectorType(I16, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero8 = ir.Constant(v8f, [0.0] * 8)

    # Two nested loops: super-blocks i (the float sums carried), and in each its 4 pairs p of sub-blocks (the
    # int32 sums carried). A pair's 8 unpacked vectors per sub-block then stay in registers while the activation
    # rows pass them; with the 8 sub-blocks written out in one block LLVM unpacked all 64 for the first activation
    # row and kept them on the stack for the others (326 stack loads and stores a super-block). The pair's two
    # sub-blocks are the low and the high nibbles of the same bytes, each unpacked with a constant shift (vpand;
    # vpsrlw 4 and vpand): a loop over single sub-blocks shifted by a variable amount, and x86 has no byte shift,
    # so LLVM widened every vector to 16-bit words, shifted and narrowed it back (vpmovzxbw, vpsrlw, vpmovwb,
    # vpand: 4 instructions a vector where this takes 1 or 2). The second sub-block reads the pair's bytes again,
    # from L1, so that no more vectors are live than before.
    entry, outer, inner, tail, done = (fn.append_basic_block(n) for n in ("entry", "outer", "inner", "tail", "done"))
    b = ir.IRBuilder(entry)
    b.cbranch(b.icmp_signed(">", nb, c64(0)), outer, done)

    b = ir.IRBuilder(outer)
    i = b.phi(I64)
    accs = [b.phi(v8f) for _ in range(2 * acts)]  # activation a: acc at 2a, acc_min at 2a + 1
    blk = b.add(w, b.mul(i, c64(Q4X8_BYTES)))
    if acts == 1:  # a decode streams the rows once: this super-block's bytes Q4X8_AHEAD on
        for off in range(0, Q4X8_BYTES, 64):
            _prefetch(b, b.add(blk, c64(Q4X8_AHEAD + off)))
    xa = [b.add(b.add(x, b.mul(c64(a), xstride)), b.mul(i, c64(256))) for a in range(acts)]
    b.branch(inner)

    b = ir.IRBuilder(inner)
    p = b.phi(I64)
    iacc = [b.phi(v8) for _ in range(acts)]
    pair = b.add(blk, b.mul(p, c64(256)))  # the quants of sub-blocks 2p, 2p + 1
    fifteen, four = ir.Constant(v32, [15] * 32), ir.Constant(v16_16, [4] * 16)
    v64, v32_16 = ir.VectorType(I8, 64), ir.VectorType(I16, 32)
    fifteen64, four32 = ir.Constant(v64, [15] * 64), ir.Constant(v32_16, [4] * 32)
    new_iacc = list(iacc)
    for high in (0, 1):  # sub-block j = 2p + high: the low, then the high nibbles
        j = b.add(b.mul(p, c64(2)), c64(high))
        xj = [b.add(xa[a], b.mul(j, c64(32))) for a in range(acts)]
        sums = [None] * acts
        chains = [[ir.Constant(v8, [0] * 8)] * 2 for _ in range(acts)]  # dp: each row's steps t even and odd
        for t in range(0, 8, 2) if wide else range(8):
            if wide:  # steps t and t + 1: 64 bytes, the activation's 8 bytes 4t .. 4t + 7 split over the halves
                raw = _gep_load(b, pair, c64(Q4X8_QS + 32 * t), v64, 1)
                if high:
                    raw = b.bitcast(b.lshr(b.bitcast(raw, v32_16), four32), v64)
                vals = b.and_(raw, fifteen64)
            else:
                raw = _gep_load(b, pair, c64(Q4X8_QS + 32 * t), v32, 1)
                if high:
                    raw = b.bitcast(b.lshr(b.bitcast(raw, v16_16), four), v32)
                vals = b.and_(raw, fifteen)  # row r at 4r
            for a in range(acts):
                if wide:
                    x8 = _gep_load(b, xj[a], c64(4 * t), ir.VectorType(I32, 2), 1)
                    part = pairs_u8s8_512(b, vals, b.bitcast(_shuffle(b, x8, [0] * 8 + [1] * 8), v64))
                else:
                    x4 = _gep_load(b, xj[a], c64(4 * t), I32, 1)  # the activation's values 4t .. 4t + 3 of sub-block j
                    xb = b.bitcast(_shuffle(b, b.insert_element(ir.Constant(v8, ir.Undefined), x4,
                                                                ir.Constant(I32, 0)), [0] * 8), v32)
                    if dp:
                        chains[a][t % 2] = lanes_u8s8_onto(b, chains[a][t % 2], vals, xb, isa)
                        continue
                    part = _pairs(b, vals, xb, isa)
                sums[a] = part if sums[a] is None else b.add(sums[a], part)
        if wide:  # the two halves' int16 sums added: steps 0, 2, 4, 6 and 1, 3, 5, 7 (|sum| <= 30480)
            sums = [b.add(_shuffle(b, v, list(range(16))), _shuffle(b, v, list(range(16, 32)))) for v in sums]
        scales = _gep_load(b, b.add(blk, b.mul(j, c64(16))), c64(Q4X8_SC), v16, 1)  # sc[r, j] at bytes 2r, 2r + 1
        if dp:
            sc32 = b.zext(_shuffle(b, scales, list(range(0, 16, 2))), v8)  # sc[r, j] at int32 lane r
            new_iacc = [b.add(new_iacc[a], b.mul(b.add(*chains[a]), sc32)) for a in range(acts)]
        else:
            sc = b.zext(scales, v16_16)  # sc[r, j] at int16 lanes 2r, 2r + 1
            new_iacc = [b.add(new_iacc[a], _madd(b, sums[a], sc, isa)) for a in range(acts)]
    p1 = b.add(p, c64(1))
    b.cbranch(b.icmp_signed("<", p1, c64(4)), inner, tail)
    p.add_incoming(c64(0), outer)
    p.add_incoming(p1, inner)
    for phi, v in zip(iacc, new_iacc):
        phi.add_incoming(ir.Constant(v8, [0] * 8), outer)
        phi.add_incoming(v, inner)

    b = ir.IRBuilder(tail)
    new = _q4_kx8_tail(b, blk, i, new_iacc, accs, bs, bss, xd, xds, isa)
    b, finals = _close_loop(b, i, nb, entry, tail, done, [(phi, v, zero8) for phi, v in zip(accs, new)], outer)
    for a in range(acts):
        b.store(b.fsub(finals[2 * a], finals[2 * a + 1]), _ptr(b, b.add(out, b.mul(c64(a), ostride)), v8f), align=4)
    b.ret_void()
    return fn


def _q4_kx8_tile(acts):
    """The intrinsic tile(w, x, xstride, xd, bs, xds, bss, nb, out, ostride, simd) of _define_q4_kx8_tile."""
    @intrinsic
    def tile(typingctx, w, x, xstride, xd, bs, xds, bss, nb, out, ostride, simd):
        sig = types.void(*([types.int64] * 11))

        def codegen(context, builder, signature, args):
            dispatch(builder, args[10], lambda isa: builder.call(_define_q4_kx8_tile(builder.module, acts, isa),
                                                                 args[:10]), wide=True)
            return context.get_dummy_value()
        return sig, codegen
    return tile


def _define_q4_kx16_tile(module, acts):
    """void f(w, x, xstride, xd, bs, xds, bss, nb, out, ostride): _define_q4_kx8_tile's products for two groups of
    8 rows at once, the group at w and the next (w + nb Q4X8_BYTES: repack_q4_k's groups lie one after another),
    -> 16 contiguous float32 per activation row. Only in the "vnni512" form (simd 3, a CPU with AVX-512 VNNI):
    row r of the 16 is int32 lane r of 512-bit vectors, each step one vpdpbusd of the two groups' 32 bytes (one
    vector: a load and an insert of the other) by the activation's 4 bytes broadcast to the 16 lanes, steps in
    two chains, then vpmulld by the 16 rows' sc[r, j] onto iacc; each group's float steps as the 8-row tile's
    (_q4_kx8_tail on each half). The same integers and float steps lane by lane, so the same bits as two 8-row
    tiles. An Intel core issues 512-bit VNNI on two ports at twice the lanes of 256-bit ones: 1.24x the two
    8-row tiles' rate (4 activation rows, in L1, Sapphire Rapids-class Xeon, session 38). By one activation row (a
    decode) each group's bytes are asked for Q4X8_AHEAD on, as the 8-row tile's."""
    name = f"llama_ref_ggml_q4_kx16_16x{acts}"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 10), name)
    fn.linkage = "internal"
    w, x, xstride, xd, bs, xds, bss, nb, out, ostride = fn.args
    v8f, v16i = ir.VectorType(F32, 8), ir.VectorType(I32, 16)
    v32, v16, v64, v32_16 = ir.VectorType(I8, 32), ir.VectorType(I8, 16), ir.VectorType(I8, 64), ir.VectorType(I16, 32)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero8, zero16 = ir.Constant(v8f, [0.0] * 8), ir.Constant(v16i, [0] * 16)
    dpbusd = _declare(module, "llvm.x86.avx512.vpdpbusd.512", v16i, [v16i] * 3)

    def join(lo, hi):  # two vectors of n elements -> one of 2n, lo's first
        n = lo.type.count
        return b.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 2 * n), list(range(2 * n))))

    # the loops of _define_q4_kx8_tile: super-blocks i (float sums carried), pairs p of sub-blocks (int32 sums)
    entry, outer, inner, tail, done = (fn.append_basic_block(n) for n in ("entry", "outer", "inner", "tail", "done"))
    b = ir.IRBuilder(entry)
    group = b.mul(nb, c64(Q4X8_BYTES))
    b.cbranch(b.icmp_signed(">", nb, c64(0)), outer, done)

    b = ir.IRBuilder(outer)
    i = b.phi(I64)
    accs = [[b.phi(v8f) for _ in range(2 * acts)] for _ in range(2)]  # per group, as the 8-row tile's
    blks = [b.add(w, b.mul(i, c64(Q4X8_BYTES)))]
    blks.append(b.add(blks[0], group))
    if acts == 1:  # a decode streams the rows once: each group's super-block Q4X8_AHEAD on, as the 8-row tile
        for blk in blks:
            for off in range(0, Q4X8_BYTES, 64):
                _prefetch(b, b.add(blk, c64(Q4X8_AHEAD + off)))
    xa = [b.add(b.add(x, b.mul(c64(a), xstride)), b.mul(i, c64(256))) for a in range(acts)]
    b.branch(inner)

    b = ir.IRBuilder(inner)
    p = b.phi(I64)
    iacc = [b.phi(v16i) for _ in range(acts)]
    pairs = [b.add(blk, b.mul(p, c64(256))) for blk in blks]
    fifteen, four = ir.Constant(v64, [15] * 64), ir.Constant(v32_16, [4] * 32)
    new_iacc = list(iacc)
    for high in (0, 1):  # sub-block j = 2p + high: the low, then the high nibbles
        j = b.add(b.mul(p, c64(2)), c64(high))
        xj = [b.add(xa[a], b.mul(j, c64(32))) for a in range(acts)]
        chains = [[zero16, zero16] for _ in range(acts)]
        for t in range(8):
            raw = join(*(_gep_load(b, pair, c64(Q4X8_QS + 32 * t), v32, 1) for pair in pairs))
            if high:
                raw = b.bitcast(b.lshr(b.bitcast(raw, v32_16), four), v64)
            vals = b.bitcast(b.and_(raw, fifteen), v16i)  # row r's 4 values at lane r
            for a in range(acts):
                x4 = _gep_load(b, xj[a], c64(4 * t), I32, 1)
                xb = _shuffle(b, b.insert_element(ir.Constant(v16i, ir.Undefined), x4, ir.Constant(I32, 0)), [0] * 16)
                chains[a][t % 2] = b.call(dpbusd, [chains[a][t % 2], vals, xb])
        sc = join(*(_gep_load(b, b.add(blk, b.mul(j, c64(16))), c64(Q4X8_SC), v16, 1) for blk in blks))
        sc32 = b.zext(_shuffle(b, sc, list(range(0, 32, 2))), v16i)  # sc[r, j] at int32 lane r
        new_iacc = [b.add(new_iacc[a], b.mul(b.add(*chains[a]), sc32)) for a in range(acts)]
    p1 = b.add(p, c64(1))
    b.cbranch(b.icmp_signed("<", p1, c64(4)), inner, tail)
    p.add_incoming(c64(0), outer)
    p.add_incoming(p1, inner)
    for phi, v in zip(iacc, new_iacc):
        phi.add_incoming(zero16, outer)
        phi.add_incoming(v, inner)

    b = ir.IRBuilder(tail)
    new = [_q4_kx8_tail(b, blks[h], i, [_shuffle(b, v, list(range(8 * h, 8 * h + 8))) for v in new_iacc],
                        accs[h], bs, bss, xd, xds, "vnni") for h in range(2)]
    carried = [(phi, v, zero8) for h in range(2) for phi, v in zip(accs[h], new[h])]
    b, finals = _close_loop(b, i, nb, entry, tail, done, carried, outer)
    for a in range(acts):
        for h in range(2):
            f = finals[2 * acts * h:2 * acts * (h + 1)]  # group h's, in accs' order
            b.store(b.fsub(f[2 * a], f[2 * a + 1]),
                    _ptr(b, b.add(b.add(out, b.mul(c64(a), ostride)), c64(32 * h)), v8f), align=4)
    b.ret_void()
    return fn


def _q4_kx16_tile(acts):
    """The intrinsic tile(w, x, xstride, xd, bs, xds, bss, nb, out, ostride) of _define_q4_kx16_tile; on a CPU
    without AVX-512 VNNI an empty body (never called there: _q4_kx8_groups asks for it only where HAS_VNNI512)."""
    @intrinsic
    def tile(typingctx, w, x, xstride, xd, bs, xds, bss, nb, out, ostride):
        sig = types.void(*([types.int64] * 10))

        def codegen(context, builder, signature, args):
            if HAS_VNNI512:
                builder.call(_define_q4_kx16_tile(builder.module, acts), args)
            return context.get_dummy_value()
        return sig, codegen
    return tile


def _q4_k_tile(acts, repacked):
    """The intrinsic tile(w, ws, h, x, xstride, xd, bs, xds, bss, nb, out, ostride, simd) of
    _define_q4_k_tile (byte addresses and strides as int64; simd as ggml_simd.dispatch says)."""
    @intrinsic
    def tile(typingctx, w, ws, h, x, xstride, xd, bs, xds, bss, nb, out, ostride, simd):
        sig = types.void(*([types.int64] * 13))

        def codegen(context, builder, signature, args):
            dispatch(builder, args[12], lambda isa: builder.call(
                _define_q4_k_tile(builder.module, acts, repacked, isa), args[:12]))
            return context.get_dummy_value()
        return sig, codegen
    return tile


def _kquant_tile(kind, acts):
    """The intrinsic tile(w, ws, x, xstride, xd, bs, xds, bss, nb, out, ostride, simd) of one weight row by
    `acts` activation rows, kind "q5_k" (_define_q5_k_tile) or "q6_k" (_define_q6_k_tile); byte addresses and
    strides as int64; simd chooses the integer instructions as ggml_simd.dispatch says."""
    @intrinsic
    def tile(typingctx, w, ws, x, xstride, xd, bs, xds, bss, nb, out, ostride, simd):
        sig = types.void(*([types.int64] * 12))

        def define(module, isa):
            if kind == "q6_k" and acts == 1 and isa == "vnni512":  # a decode's, on 512-bit registers
                return _define_q6_k_decode512(module)
            isa = "vnni" if isa == "vnni512" else isa
            return _define_q5_k_tile(module, acts, isa) if kind == "q5_k" else _define_q6_k_tile(module, 1, acts, isa)

        def codegen(context, builder, signature, args):
            dispatch(builder, args[11], lambda isa: builder.call(define(builder.module, isa), args[:11]), wide=True)
            return context.get_dummy_value()
        return sig, codegen
    return tile


_q6_1A, _q6_11 = _kquant_tile("q6_k", ACTS), _kquant_tile("q6_k", 1)


def _kquant_gtile(kind, acts):
    """The intrinsic tile(w, x, nb, out, ostride, acc, part, simd) of a weight row by a group of `acts`
    activation rows, kind "q5_k" (_define_q5_k_gtile) or "q6_k" (_define_q6_k_gtile)."""
    define = _define_q5_k_gtile if kind == "q5_k" else _define_q6_k_gtile

    @intrinsic
    def tile(typingctx, w, x, nb, out, ostride, acc, part, simd):
        sig = types.void(*([types.int64] * 8))

        def codegen(context, builder, signature, args):
            dispatch(builder, args[7], lambda isa: builder.call(define(builder.module, acts, isa), args[:7]))
            return context.get_dummy_value()
        return sig, codegen
    return tile


_q5_G, _q6_G = _kquant_gtile("q5_k", GROUP), _kquant_gtile("q6_k", GROUP)
_q5_1A, _q5_11 = _kquant_tile("q5_k", ACTS), _kquant_tile("q5_k", 1)


_q4_1A, _q4_11 = _q4_k_tile(ACTS, False), _q4_k_tile(1, False)
# The gemv's order on qs / head, one row by one activation row. No product runs it: repacked Q4_K (rows % 8 ==
# 0) decodes from its 8-row copy (_q4x8_1, the same bits, tests/test_ggml_q4k_decode.py checks the two tile by
# tile); kept as that cross-check.
_q4r_11 = _q4_k_tile(1, True)


@njit(inline="always", **JIT)
def _act_addresses(xq, xd, xbs, out):
    """What every tile walk takes of the Q8_K activations (xq (N, K), xd (N, nb), xbs (N, nb, 16)) and of out
    (N, R): (nb, xq's, xd's, xbs' and out's row strides in bytes, then their addresses)."""
    K = xq.shape[1]
    nb = K // 256
    return (nb, np.int64(K), np.int64(4 * nb), np.int64(64 * nb), np.int64(4 * out.shape[1]),
            np.int64(xq.ctypes.data), np.int64(xd.ctypes.data), np.int64(xbs.ctypes.data), np.int64(out.ctypes.data))


@njit(inline="always", **JIT)
def _q4_k_tile_rows(xq, xd, xbs, qs, head, simd, out, r0, r1):
    """Rows r0 .. r1 - 1 of a Q4_K weight whose rows do not come in groups of 8 (qs, head), as _tile_rows walks
    Q5_K's and Q6_K's (_define_q4_k_tile)."""
    N = xq.shape[0]
    nb, xst, xds, bss, ost, x0, xd0, bs0, o0 = _act_addresses(xq, xd, xbs, out)
    ws, hs, w0, h0 = np.int64(qs.shape[1]), np.int64(16 * nb), np.int64(qs.ctypes.data), np.int64(head.ctypes.data)
    n = np.int64(0)
    while n < N:
        many = n + ACTS <= N
        x, xdn, bsn, on = x0 + n * xst, xd0 + n * xds, bs0 + n * bss, o0 + n * ost
        for r in range(r0, r1):
            w, h = w0 + r * ws, h0 + r * hs
            if many:
                _q4_1A(w, ws, h, x, xst, xdn, bsn, xds, bss, nb, on + 4 * r, ost, simd)
            else:
                _q4_11(w, ws, h, x, xst, xdn, bsn, xds, bss, nb, on + 4 * r, ost, simd)
        n += ACTS if many else 1


@njit(parallel=True, **JIT)
def _dot_q4_k_tiles(xq, xd, xbs, qs, head, simd, out):
    """Q4_K by Q8_K (qs, head as weights.packed keeps them) -> out (N, R), parallel over tiles of ROWS rows."""
    R = qs.shape[0]
    for c in prange((R + ROWS - 1) // ROWS):
        _q4_k_tile_rows(xq, xd, xbs, qs, head, simd, out, c * ROWS, min(R, (c + 1) * ROWS))


@njit(**JIT)
def _decode_q4_k_tiles(xq, xd, xbs, qs, head, simd, out):
    """_dot_q4_k_tiles of one activation row on one thread: no parallel region (~15 us a call)."""
    _q4_k_tile_rows(xq, xd, xbs, qs, head, simd, out, 0, qs.shape[0])


_q4x8_A, _q4x8_1 = _q4_kx8_tile(ACTS8), _q4_kx8_tile(1)
_q4x16_A, _q4x16_1 = _q4_kx16_tile(ACTS8), _q4_kx16_tile(1)


@njit(inline="always", **JIT)
def two_groups(simd):
    """Whether repacked Q4_K's tiles take two groups of 8 rows at once (_define_q4_kx16_tile): simd 3 on a CPU with
    AVX-512 VNNI."""
    return simd == 3 and HAS_VNNI512


@njit(inline="always", **JIT)
def _q4_kx8_groups(xq, xd, xbs, packed, simd, out, g0, g1):
    """Groups g0 .. g1 - 1 of 8 rows of a repacked Q4_K weight (packed, repack_q4_k's) by every activation row:
    ACTS8 activation rows at a time (the rest one by one) meet each group while its bytes are in cache; with
    simd 3 on an AVX-512 VNNI CPU, two groups at a time (_define_q4_kx16_tile; a last odd group alone), a decode's
    too, asking for the weights ahead as the 8-row tile does (one thread, session 65: 64 matrices of 8192 x 2048
    streamed from memory 12.9-13.7 GB/s against 11.7-12.5, and 10.5-11.2 without the prefetch; 2048 x 8192 from L3
    5.5-6.1 ns a row's super-block either way)."""
    N = xq.shape[0]
    nb, xst, xds, bss, ost, x0, xd0, bs0, o0 = _act_addresses(xq, xd, xbs, out)
    gs, w0 = np.int64(packed.shape[1]), np.int64(packed.ctypes.data)
    two = two_groups(simd)
    n = np.int64(0)
    while n < N:
        many = n + ACTS8 <= N
        x, xdn, bsn, on = x0 + n * xst, xd0 + n * xds, bs0 + n * bss, o0 + n * ost
        g = g0
        while g < g1:
            if two and g + 1 < g1:
                if many:
                    _q4x16_A(w0 + g * gs, x, xst, xdn, bsn, xds, bss, nb, on + 32 * g, ost)
                else:
                    _q4x16_1(w0 + g * gs, x, xst, xdn, bsn, xds, bss, nb, on + 32 * g, ost)
                g += 2
                continue
            if many:
                _q4x8_A(w0 + g * gs, x, xst, xdn, bsn, xds, bss, nb, on + 32 * g, ost, simd)
            else:
                _q4x8_1(w0 + g * gs, x, xst, xdn, bsn, xds, bss, nb, on + 32 * g, ost, simd)
            g += 1
        n += ACTS8 if many else 1


@njit(parallel=True, **JIT)
def _dot_q4_kx8(xq, xd, xbs, packed, simd, out):
    """Repacked Q4_K (repack_q4_k) by Q8_K -> out (N, R), parallel over work items of ROWS rows (ROWS / 8
    groups)."""
    G, step = packed.shape[0], ROWS // 8
    for c in prange((G + step - 1) // step):
        _q4_kx8_groups(xq, xd, xbs, packed, simd, out, c * step, min(G, (c + 1) * step))


@njit(**JIT)
def _decode_q4_kx8(xq, xd, xbs, packed, simd, out):
    """_dot_q4_kx8 of one activation row on one thread: no parallel region."""
    _q4_kx8_groups(xq, xd, xbs, packed, simd, out, 0, packed.shape[0])


@njit(inline="always", **JIT)
def _tile_rows(five, xq, xd, xbs, blocks, simd, out, r0, r1):
    """Rows r0 .. r1 - 1 of _decode_q56_k: the activation rows pass ACTS at a time (the rest one by one), meeting
    each row while the rows' bytes are in cache. One activation row (a decode): the rows one after another,
    the weights asked for ahead (in the tiles). five: Q5_K's tiles, else Q6_K's."""
    N = xq.shape[0]
    nb, xst, xds, bss, ost, x0, xd0, bs0, o0 = _act_addresses(xq, xd, xbs, out)
    ws, w0 = np.int64(blocks.shape[1]), np.int64(blocks.ctypes.data)
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


@njit(**JIT)
def _decode_q56_k(five, xq, xd, xbs, blocks, simd, out):
    """ggml_vec_dot_q5_K_q8_K (five) or ggml_vec_dot_q6_K_q8_K of every weight row (blocks (R, nb * 176 or
    210), the file's bytes) with every Q8_K activation row (xq (N, K) int8, xd (N, nb) float32, xbs (N, nb, 16)
    int32 bsums) -> out (N, R), on the calling thread (a decode: no parallel region, ~15 us a call)."""
    _tile_rows(five, xq, xd, xbs, blocks, simd, out, 0, blocks.shape[0])


@njit(inline="always", **JIT)
def _unpack_rows(five, w, ws, nb, u, us, n):
    """n rows of a Q5_K (five) or Q6_K weight (the file's bytes from byte address w, ws apart) -> their records
    (unpack_q5_k, unpack_q6_k) from byte address u, us apart."""
    for r in range(n):
        if five:
            unpack_q5_k(w + r * ws, nb, u + r * us)
        else:
            unpack_q6_k(w + r * ws, nb, u + r * us)


@njit(inline="always", **JIT)
def _group_rows(five, xg, xq, xd, xbs, blocks, simd, out, acc, wu, r0, r1):
    """Rows r0 .. r1 - 1 of a Q5_K (five) or Q6_K prefill: each group of GROUP activation rows (xg: group_acts'
    records) meets the rows SEG super-blocks at a time, the group's segment in L1 while they pass it, each
    row's float sums carried in acc (64 bytes per activation row) from segment to segment; the activation rows
    left over one by one (_define_q5_k_tile / _define_q6_k_tile on the plain arrays). The rows are unpacked
    first, once, into wu (ROWS rows of nb Q5U_BYTES / Q6U_BYTES records, from its first cache line:
    unpack_q5_k, unpack_q6_k)."""
    N, G = xq.shape[0], xg.shape[0]
    nb, xst, xds, bss, ost, x0, xd0, bs0, o0 = _act_addresses(xq, xd, xbs, out)
    ws, w0 = np.int64(blocks.shape[1]), np.int64(blocks.ctypes.data)
    gs, g0, a0 = np.int64(xg.shape[1]), np.int64(xg.ctypes.data), np.int64(acc.ctypes.data)
    rec, size = np.int64(GROUP_RECORD), np.int64(Q5U_BYTES if five else Q6U_BYTES)
    u0, us = (np.int64(wu.ctypes.data) + 63) // 64 * 64, nb * size  # the unpacked rows, us bytes apart
    if G > 0:
        _unpack_rows(five, w0 + r0 * ws, ws, nb, u0, us, r1 - r0)
    for g in range(G):
        on = o0 + g * GROUP * ost
        for s in range(0, nb, SEG):
            m = min(SEG, nb - s)
            part = (1 if s == 0 else 0) | (2 if s + m == nb else 0)
            for r in range(r0, r1):
                w, x, a = u0 + (r - r0) * us + s * size, g0 + g * gs + s * rec, a0 + (r - r0) * (64 * GROUP)
                if five:
                    _q5_G(w, x, m, on + 4 * r, ost, a, part, simd)
                else:
                    _q6_G(w, x, m, on + 4 * r, ost, a, part, simd)
    for n in range(G * GROUP, N):
        x, xdn, bsn, on = x0 + n * xst, xd0 + n * xds, bs0 + n * bss, o0 + n * ost
        for r in range(r0, r1):
            if five:
                _q5_11(w0 + r * ws, ws, x, xst, xdn, bsn, xds, bss, nb, on + 4 * r, ost, simd)
            else:
                _q6_11(w0 + r * ws, ws, x, xst, xdn, bsn, xds, bss, nb, on + 4 * r, ost, simd)


@njit(**JIT)
def _unpack_all(five, blocks, out):
    _unpack_rows(five, np.int64(blocks.ctypes.data), np.int64(blocks.shape[1]),
                 np.int64(out.shape[1]) // (Q5U_BYTES if five else Q6U_BYTES), np.int64(out.ctypes.data),
                 np.int64(out.shape[1]), blocks.shape[0])


def unpacked_rows(w) -> np.ndarray:
    """A Q5_K / Q6_K weight's rows as the prefill tiles read them (unpack_q5_k, unpack_q6_k): (R, nb records of
    Q5U_BYTES / Q6U_BYTES) uint8. The prefill unpacks each work item's rows into a scratch of its own; this
    whole copy is for looking at them."""
    five = w.format == "q5_k"
    out = np.empty((w.shape[0], w.shape[1] // 256 * (Q5U_BYTES if five else Q6U_BYTES)), np.uint8)
    _unpack_all(five, readonly(w.blocks), out)
    return out


@njit(parallel=True, **JIT)
def _dot_groups(five, xg, xq, xd, xbs, blocks, simd, out):
    """ggml_vec_dot_q5_K_q8_K (five) or ggml_vec_dot_q6_K_q8_K of every weight row (blocks, the file's bytes)
    with every Q8_K activation row (xg, group_acts' records of its groups; xq, xd, xbs, the rows) -> out
    (N, R), parallel over tiles of ROWS rows (_define_q5_k_gtile, _define_q6_k_gtile)."""
    R, nb, G = blocks.shape[0], xq.shape[1] // 256, xg.shape[0]
    for c in prange((R + ROWS - 1) // ROWS):
        acc = np.empty(ROWS * GROUP * 16, np.float32)  # each (row, activation row)'s float sums between segments
        wu = np.empty(ROWS * nb * (Q5U_BYTES if five else Q6U_BYTES) + 64 if G else 0, np.uint8)  # the rows unpacked
        _group_rows(five, xg, xq, xd, xbs, blocks, simd, out, acc, wu, c * ROWS, min(R, (c + 1) * ROWS))


@njit(parallel=True, **JIT)
def _group_acts(xq, xq16, xd, xbs, acts, b16, d):
    """group_acts' records from the Q8_K rows (xq, and xq16 its bytes as int16): b16 and d view the same bytes
    as int16 and float32. The groups in parallel (each writes its own records), the weave by 16-bit words: a
    serial loop by bytes took 1.3 ms for 512 rows of 2048 values (3.3 for 8192; ~0.4 now) before every Q5_K / Q6_K
    product of a prefill."""
    nb = xq.shape[1] // 256
    rec = 2 * b16.shape[0] // max(1, (xq.shape[0] // acts) * nb)
    spo = -(-acts * 292 // 32) * 32  # pair_sums(acts)
    for g in prange(xq.shape[0] // acts):
        for i in range(nb):
            o = (g * nb + i) * rec
            for a in range(acts):
                n = g * acts + a
                src, dst = 256 * i, o + 256 * a
                # per pair of 32-value pieces P, P' (64 values), X1 then X2 (see group_acts), by words:
                for p in range(4):  # X1's dword u = (word 2u of P, of P'), X2's = (word 2u + 1 of P, of P')
                    at, to = (src + 64 * p) // 2, (dst + 64 * p) // 2
                    for u in range(8):
                        b16[to + 2 * u] = xq16[n, at + 2 * u]
                        b16[to + 2 * u + 1] = xq16[n, at + 16 + 2 * u]
                        b16[to + 16 + 2 * u] = xq16[n, at + 2 * u + 1]
                        b16[to + 17 + 2 * u] = xq16[n, at + 17 + 2 * u]
                for j in range(16):
                    b16[(o + 256 * acts + 32 * a) // 2 + j] = xbs[n, i, j]
                d[(o + 288 * acts + 4 * a) // 4] = xd[n, i]
                # (S[2p], S[2p + 1]) of row a at dword a of 32 bytes p, S[j] = bsum[2j] + bsum[2j + 1]
                for j in range(8):
                    b16[(o + spo + 32 * (j // 2) + 4 * a) // 2 + j % 2] = xbs[n, i, 2 * j] + xbs[n, i, 2 * j + 1]


def group_acts(xq, xd, xbs, acts: int = GROUP) -> np.ndarray:
    """Q8_K activation rows (quantize_q8_K's) -> (N // acts, nb * act_record(acts)) int8: per group of `acts`
    rows and super-block i, at (g, i * act_record(acts)): the rows' quants (256 bytes each), their 16 bsums as
    int16 (32 bytes each), their scales (float32), then (pair_sums) per pair p 32 bytes of (S[2p], S[2p + 1]) of
    each row (int16, row a at dword a, zeros past the last), S[j] = bsum[2j] + bsum[2j + 1] (Q5_K's mins), zeros
    to the record's end. The rows past the last whole group are not in it. The quants woven as the rows'
    values (_define_q5_k_gtile, _define_q6_k_gtile): per pair of 32-value pieces j = 2p, j' = 2p + 1 (64 bytes
    from 64 p), by 16-bit words, X1 (32 bytes: dword u = values 4u, 4u + 1 of j, then of j') and X2 (dword u =
    values 4u + 2, 4u + 3 of j, then of j')."""
    N, K = xq.shape
    G, nb, rec = N // acts, K // 256, act_record(acts)
    buf = np.zeros(G * nb * rec, np.int8)
    _group_acts(xq, xq.view(np.int16), xd, xbs, acts, buf.view(np.int16), buf.view(np.float32))
    return buf.reshape(G, nb * rec)


@njit(inline="always", **JIT)
def _quantize_q8_K_row(x, xq, xd, xbs, n):
    """quantize_row_q8_K (x86: quantize_row_q8_K_ref) of row n of x (N, K) float32, as
    llama_ref.model.ggml_kquants computes it: per 256 values, max = the first value of largest magnitude,
    iscale = -127 / max, q = min(127, roundeven(iscale x)), d = 1 / iscale, bsums of each 16; a zero block
    keeps d = 0, q = 0, bsums = 0.

    Written so that LLVM vectorizes its loops (3.6x the one loop that kept the first largest value as it went, 512 x
    8192, one thread): the largest magnitude as the bits of |x| (non-negative floats order as their bits; NaN,
    above infinity's bits, left out as ggml's `ax > amax` leaves it), its first place found after; then the
    quants, then their sums."""
    xr, xb, qr = x[n], x[n].view(np.uint32), xq[n]
    magnitude, infinity = np.uint32(0x7FFFFFFF), np.uint32(0x7F800000)
    for b in range(x.shape[1] // 256):
        o = b * 256
        top = np.uint32(0)
        for j in range(o, o + 256):
            a = xb[j] & magnitude
            top = max(top, a if a <= infinity else np.uint32(0))
        if top == 0:
            xd[n, b] = 0
            qr[o:o + 256] = 0
            xbs[n, b] = 0
            continue
        j = o
        while xb[j] & magnitude != top:  # the first value of that magnitude
            j += 1
        iscale = np.float32(-127) / xr[j]
        xd[n, b] = np.float32(1) / iscale
        for j in range(o, o + 256):
            r = roundeven32(xr[j] * iscale)
            qr[j] = np.int8(np.int32(np.float32(127) if np.float32(127) < r else r))
        for g in range(16):
            s = np.int32(0)
            for j in range(o + 16 * g, o + 16 * g + 16):
                s += np.int32(qr[j])
            xbs[n, b, g] = s


@njit(**JIT)
def _quantize_q8_K(x, xq, xd, xbs):
    """_quantize_q8_K_row of every row of x (N, K), on the calling thread."""
    for n in range(x.shape[0]):
        _quantize_q8_K_row(x, xq, xd, xbs, n)


@njit(parallel=True, **JIT)
def _quantize_q8_K_rows(x, xq, xd, xbs):
    """_quantize_q8_K's rows in parallel (a prefill's: on one thread they took ~8 % of a 1B Q4_K prefill)."""
    for n in prange(x.shape[0]):
        _quantize_q8_K_row(x, xq, xd, xbs, n)


def quantize_q8_K(x2: np.ndarray):
    """llama_ref.model.ggml_kquants.quantize_row_q8_K, compiled: d (N, nb), q (N, K) int8, bsums (N, nb, 16)."""
    N, K = x2.shape
    xq = np.empty((N, K), np.int8)
    xd = np.empty((N, K // 256), np.float32)
    xbs = np.empty((N, K // 256, 16), np.int32)
    (_quantize_q8_K_rows if N >= 16 else _quantize_q8_K)(np.ascontiguousarray(x2, np.float32), xq, xd, xbs)
    return xd, xq, xbs


def quantized_linear(x2: np.ndarray, w, simd: "int | None" = None, acts: "tuple | None" = None) -> np.ndarray:
    """x2 (N, K) float32 @ w.T in ggml's arithmetic for a Q4_K / Q5_K / Q6_K weight w (R, K). -> (N, R).
    simd: 0 the portable integer code, 2 AVX2's (where the CPU has it), 1 the best this CPU has (vpdpbusd,
    else AVX2); default as kernels/ggml.py (LLAMA_REF_GGML_PORTABLE=1 forces the portable one). All give the
    same integers, so the same floats. acts: quantize_q8_K(x2), where the caller has made it already (the
    products that read the same x: kernels/ggml._rows_linears)."""
    N, R = x2.shape[0], w.shape[0]
    xd, xq, xbs = quantize_q8_K(x2) if acts is None else acts  # (N, nb), (N, K), (N, nb, 16)
    out = np.empty((N, R), np.float32)
    use = SIMD if simd is None else int(simd)
    one = serial_product(N, R * x2.shape[1])  # a decode on the calling thread
    if w.format in ("q5_k", "q6_k") and not one:
        from . import ggml_kquants16  # imports this module
        if ggml_kquants16.usable(N, use):  # a prefill on 16-bit integers (512-bit vpdpwssd)
            return ggml_kquants16.quantized_linear(w.format == "q5_k", readonly(w.blocks), xq, xd, xbs)
    if w.format in ("q5_k", "q6_k") and not one:  # a prefill: the activations in groups (group_acts)
        five = w.format == "q5_k"
        _dot_groups(five, group_acts(xq, xd, xbs), xq, xd, xbs, readonly(w.blocks), use, out)
        return out
    if w.format in ("q5_k", "q6_k"):  # a decode, on the calling thread
        _decode_q56_k(w.format == "q5_k", xq, xd, xbs, readonly(w.blocks), use, out)
        return out
    if R % 8 == 0:  # repacked by llama.cpp (model/ggml_kquants.dot_for): 8 rows by 4 activation rows (its gemm),
        # the activation rows left over and a decode's by 8 rows x 1 (its gemv): the same order either way
        (_decode_q4_kx8 if one else _dot_q4_kx8)(xq, xd, xbs, q4_kx8(w), use, out)
        return out
    (_decode_q4_k_tiles if one else _dot_q4_k_tiles)(xq, xd, xbs, readonly(w.qs), readonly(w.head), use, out)
    return out


# id(weight) -> repack_q4_k of its rows, made on the first product that reads it (as kernels/ggml.py's _ARGS);
# weakref.finalize drops it when the weight goes, before its id can be reused.
_Q4X8: dict = {}


def q4_kx8(w) -> np.ndarray:
    """The repacked copy of a Q4_K weight with rows % 8 == 0 that every product of it reads (repack_q4_k): made
    on first use and handed to the weight (weights.packed.Q4_KWeight.hold_x8), which then drops its qs and head
    (156 bytes per 256 values in place of 144: the weight is held once)."""
    packed = _Q4X8.get(id(w))
    if packed is None:
        packed = w.x8
        if packed is None:
            qs, head = readonly(w.qs), readonly(w.head)
            packed = np.empty((qs.shape[0] // 8, head.shape[1] * Q4X8_BYTES), np.uint8)
            _repack_q4_k(qs, head, packed)
            del qs, head
            w.hold_x8(packed)
            packed = w.x8
        _Q4X8[id(w)] = packed
        weakref.finalize(w, _Q4X8.pop, id(w), None)
    return packed
