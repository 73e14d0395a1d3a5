"""LLVM vector IR for ggml mode's attention (kernels/ggml_ops.py): ggml_vec_dot_f16 over the fp16 cache,
ggml_v_expf and the softmax sums, in the lane order of llama.cpp's AVX2 build (8 lanes) or its AVX-512
build (16 lanes), as Numba intrinsics.

Scalar Numba code neither fuses a multiply-add nor keeps a reduction's lanes apart once LLVM vectorizes it
(no fast-math: it does not vectorize at all), so each routine here writes ggml's vectors as LLVM vectors:
one <L x float> per ggml register, llvm.fma where ggml fuses, shuffles for its horizontal sums in its order.
Where ggml multiplies fp16 values and adds the product (GGML_F16_VEC_FMA), fma(a, b, acc) and acc + a * b
are the same number: the product of two fp16 values is exact in float32, so either rounds once.

- f16_scores(lanes): one query (fp16 values as float32) against a run of key rows (made as h16_: they read the
  cache's fp16 values themselves and widen them, as ggml does):
  ggml_vec_dot_f16 (4 accumulators of `lanes` lanes over the first HD - HD % 4L values, (0 + 2) + (1 + 3), the
  lanes summed by reduce_add_16 / GGML_F32x8_REDUCE, then the leftovers one by one in float64),
  times the softmax scale. A decode's: its one query meets each key row once.
- kt_scores(lanes): the same numbers with the keys in vector lanes (a prefill's: the keys transposed once, in
  blocks of 16, for its many queries): since every product is exact, a dot product's value is fixed by its
  additions, and each addition ggml makes inside one dot product is made here for 16 keys at once, vertically
  (no shuffles). At the 1B shape's 512-token prefill: 3.8 ms a layer against f16_scores' 5.5-6.3 (2 threads).
- f16_columns(lanes) (made as h16_, on fp16 values): probabilities (fp16 values) times V (transposed in llama.cpp):
  ggml_vec_dot_f16 of the probability row with every column of V, key p into accumulator lane p % 4L. Each
  accumulator lane of each column is a chain over the keys p = a, a + 4L, ...; a vector of columns (16 in the
  AVX-512 build's order, else 8) at a time, its chains made in the order of ggml's sum over the lanes and
  added at once, every partial sum in registers (up to 4 probability rows: each value vector loaded once for
  them). Storing every lane's chain and summing after took 1.4-1.8x as long (1B shape, 512 tokens).
- soft_max_row(lanes): a row of ggml's softmax in place: the mask, the maximum, e = ggml_v_expf(x - max), the
  float64 sum of its vectors' float32 sums (hsum_float_8 on AVX2, _mm512_reduce_add_ps on AVX-512), vector
  after vector, and the probabilities e * float32(1 / sum) rounded to fp16.
- swiglu_row(wide): ggml_v_silu(g) * u over a row, 8 lanes at a time.
- expf_vector(builder, x, wide): ggml_v_expf on an LLVM vector (either build's; llama_ref.model.ggml.ggml_v_expf
  is the specification).

Numba's on-disk cache checks a kernel against its own file only; kernels/_common.drop_stale_cache drops every
cached kernel when any source file changed.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .ggml_simd import F32, I32, I64, _declare, _gep_load, _ptr, _shuffle, opaque

F64 = ir.DoubleType()


def _cache_load(builder, base, index, n):
    """n values (n > 1: a vector) of a cache row at value index `index` (i64) from byte address base: fp16 values,
    widened to float32 (vcvtph2ps) as ggml_vec_dot_f16 widens them."""
    h = ir.VectorType(ir.HalfType(), n) if n > 1 else ir.HalfType()
    return builder.fpext(_gep_load(builder, base, builder.mul(index, _c64(2)), h, 2),
                         ir.VectorType(F32, n) if n > 1 else F32)


def _c64(v):
    return ir.Constant(I64, v)


def _splat(builder, value, n):
    """<n x float> with every lane `value` (an LLVM float)."""
    vt = ir.VectorType(value.type, n)
    return _shuffle(builder, builder.insert_element(ir.Constant(vt, ir.Undefined), value, ir.Constant(I32, 0)),
                    [0] * n)


def _vconst(ty, value, n):
    return ir.Constant(ir.VectorType(ty, n), [value] * n)


def _fma(builder, a, b, c):
    """llvm.fma on vectors (or scalars) of float: a * b + c rounded once."""
    name = f"llvm.fma.v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "llvm.fma.f32"
    return builder.call(_declare(builder.module, name, a.type, [a.type] * 3), [a, b, c])


def _halves(builder, v):
    """v (2k lanes) -> lanes 0 .. k-1 plus lanes k .. 2k-1, lane by lane."""
    k = v.type.count // 2
    return builder.fadd(_shuffle(builder, v, list(range(k))), _shuffle(builder, v, list(range(k, 2 * k))))


def _lane(builder, v, i):
    return builder.extract_element(v, ir.Constant(I32, i))


def reduce_add_16(builder, v):
    """_mm512_reduce_add_ps (llama_ref.model.ggml.reduce_add_16): halves added 16 -> 8 -> 4 -> 2, then the two."""
    for _ in range(3):
        v = _halves(builder, v)
    return builder.fadd(_lane(builder, v, 0), _lane(builder, v, 1))


def reduce_add_8(builder, v):
    """The end of GGML_F32x8_REDUCE (llama_ref.model.ggml.reduce_add_8): (i + i+4), then (0 + 1) + (2 + 3)."""
    r = _halves(builder, v)
    return builder.fadd(builder.fadd(_lane(builder, r, 0), _lane(builder, r, 1)),
                        builder.fadd(_lane(builder, r, 2), _lane(builder, r, 3)))


def hsum_float_8(builder, v):
    """hsum_float_8 (the AVX2 softmax's vector sum): (i + i+4), then (0 + 2) + (1 + 3)."""
    r = _halves(builder, v)
    return builder.fadd(builder.fadd(_lane(builder, r, 0), _lane(builder, r, 2)),
                        builder.fadd(_lane(builder, r, 1), _lane(builder, r, 3)))


# ---- ggml_v_expf ------------------------------------------------------------------------------------------------

_EXPF = {name: float.fromhex(h) for name, h in (
    ("r", "0x1.8p23"), ("log2e", "0x1.715476p+0"), ("ln2_hi", "0x1.62e4p-1"), ("ln2_lo", "0x1.7f7d1cp-20"),
    ("c4", "0x1.0e4020p-7"), ("c5", "0x1.573e2ep-5"), ("c6", "0x1.555e66p-3"), ("c7", "0x1.fffdb6p-2"),
    ("c8", "0x1.ffffecp-1"))}


def expf_vector(builder, x, wide):
    """ggml_v_expf of the float vector x, every lane as llama_ref.model.ggml.ggml_v_expf(isa) computes it:
    wide, the AVX-512 build's (j = 1 + b c1 + ..., j * 2^n rounded once: here in float64, where it is
    exact); else the AVX2 build's (j without its 1, fma(k, j, k) with k = 2^n from z's bits; past |n| = 126
    the power split as s2 * s1, past 192 s1 * s1, computed only when some lane needs them, as the C code
    branches on its movemask). Both sides of every select are computed, as in the C code; a NaN lane comes back
    as itself."""
    n_l = x.type.count
    b = builder

    def c(name):
        return _vconst(F32, _EXPF[name], n_l)
    z = _fma(b, x, c("log2e"), c("r"))
    n = b.fsub(z, c("r"))
    neg_n = b.fneg(n)
    red = _fma(b, neg_n, c("ln2_lo"), _fma(b, neg_n, c("ln2_hi"), x))
    u = b.fmul(red, red)
    p = _fma(b, _fma(b, c("c4"), red, c("c5")), u, _fma(b, c("c6"), red, c("c7")))
    fabs = _declare(b.module, f"llvm.fabs.v{n_l}f32", x.type, [x.type])
    a = b.call(fabs, [n])
    zero, inf = _vconst(F32, 0.0, n_l), _vconst(F32, float("inf"), n_l)
    n_le_0 = b.fcmp_ordered("<=", n, zero)
    if wide:
        j = _fma(b, p, u, _fma(b, c("c8"), red, _vconst(F32, 1.0, n_l)))
        # j * 2^n: 2^n from its float64 bits (n clamped first where it is past 192 or NaN: selected away below)
        small = b.fcmp_ordered("<=", a, _vconst(F32, 192.0, n_l))
        ni = b.fptosi(b.select(small, n, zero), ir.VectorType(I64, n_l))
        bits = b.shl(b.add(ni, _vconst(I64, 1023, n_l)), _vconst(I64, 52, n_l))
        pow2 = b.bitcast(bits, ir.VectorType(F64, n_l))
        out = b.fptrunc(b.fmul(b.fpext(j, ir.VectorType(F64, n_l)), pow2), x.type)
        out = b.select(small, out, b.select(n_le_0, zero, inf))
    else:
        i32v = ir.VectorType(I32, n_l)
        j = _fma(b, p, u, b.fmul(c("c8"), red))  # c8 * b: its own rounding
        e = b.shl(b.bitcast(z, i32v), _vconst(I32, 23, n_l))  # n in the exponent field
        k = b.bitcast(b.add(e, _vconst(I32, 0x3F800000, n_l)), x.type)  # 2^n for |n| <= 126
        out = _fma(b, k, j, k)
        # As the C code, the split powers only when some lane needs them (|n| > 126; a NaN lane does not): computed
        # for every vector, s1 * s1 (2^-250 where n <= 0, kept only past |n| = 192) underflowed in most of them,
        # and the underflow made an AVX2 EPYC (Zen 3) take ~2.3x the time of the vector (silu's expf(-g) for
        # g >= 0, every softmax vector). Skipped, those lanes were not taken anyway: the same values.
        big = b.fcmp_ordered(">", a, _vconst(F32, 126.0, n_l))
        fast_block = b.block
        with b.if_then(b.icmp_unsigned("!=", b.bitcast(big, ir.IntType(n_l)), ir.Constant(ir.IntType(n_l), 0)),
                       likely=False):
            g = b.select(n_le_0, _vconst(I32, 0x82000000 - 2**32, n_l), _vconst(I32, 0, n_l))
            s1 = b.bitcast(b.add(g, _vconst(I32, 0x7F000000, n_l)), x.type)  # 2^-125 (n <= 0) or 2^127
            s2 = b.bitcast(b.sub(e, g), x.type)
            split = b.select(big, b.fmul(_fma(b, s2, j, s2), s1), out)
            split = b.select(b.fcmp_ordered(">", a, _vconst(F32, 192.0, n_l)), b.fmul(s1, s1), split)
            split_block = b.block
        joined = b.phi(x.type)
        joined.add_incoming(out, fast_block)
        joined.add_incoming(split, split_block)
        out = joined
    out = b.select(b.fcmp_unordered("uno", x, x), x, out)
    # A caller that stores the result where x came from (the softmax, in place) had this select made a masked store
    # of the non-NaN lanes (vmaskmovps), microcoded on AMD Zen: an expf vector took ~18 cycles (AVX2 EPYC, Zen 3).
    # Hidden from LLVM, the select is a blend and the store a plain one. (8 lanes: a 16-lane vector fits no AVX2
    # register, and on AVX-512 a masked store is one instruction.)
    return opaque(b, out) if n_l == 8 else out


def _make_expf_array(lanes):
    @intrinsic
    def expf_array(typingctx, x, n, out):
        """out[i] = ggml_v_expf(x[i]) for i < n, `lanes` at a time (n a multiple of lanes; byte addresses)."""
        sig = types.void(types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            xp, n, outp = args
            vt = ir.VectorType(F32, lanes)
            with cgutils.for_range_slice(builder, _c64(0), n, _c64(lanes), intp=I64) as (i, _):
                off = builder.mul(i, _c64(4))
                e = expf_vector(builder, _gep_load(builder, xp, off, vt, 4), lanes == 16)
                builder.store(e, _ptr(builder, builder.add(outp, off), vt), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return expf_array


expf_array8 = _make_expf_array(8)
expf_array16 = _make_expf_array(16)


def _make_swiglu(wide):
    @intrinsic
    def swiglu_row(typingctx, g, u, n, out):
        """out[i] = ggml_v_silu(g[i]) * u[i] = (g / (1 + ggml_v_expf(-g))) * u for i < n, float32: 8 lanes at a
        time, then the last n % 8 one lane at a time (each value on its own: the lanes only choose the speed);
        the expf of the AVX-512 build (wide) or the AVX2 build's. Byte addresses, int64."""
        sig = types.void(types.int64, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            gp, up, n, outp = args
            b = builder
            whole = b.sub(n, b.srem(n, _c64(8)))
            for lanes, start, stop in ((8, _c64(0), whole), (1, whole, n)):
                vt = ir.VectorType(F32, lanes)
                with cgutils.for_range_slice(b, start, stop, _c64(lanes), intp=I64) as (i, _):
                    off = b.mul(i, _c64(4))
                    x = _gep_load(b, gp, off, vt, 4)
                    e = expf_vector(b, b.fneg(x), wide)
                    silu = b.fdiv(x, b.fadd(_vconst(F32, 1.0, lanes), e))
                    b.store(b.fmul(silu, _gep_load(b, up, off, vt, 4)), _ptr(b, b.add(outp, off), vt), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return swiglu_row


swiglu_row_avx2 = _make_swiglu(False)
swiglu_row_avx512 = _make_swiglu(True)


# ---- the softmax's exponentials and sum ---------------------------------------------------------------------------

def _make_softmax(lanes):
    @intrinsic
    def soft_max_row(typingctx, w, visible, used):
        """One row of ggml's softmax over scores w[0 .. visible) (w a byte address; used: visible rounded up
        to a whole vector of `lanes`): w[visible .. used) = -inf (the mask), the row maximum (NaN if any
        score is NaN, as NumPy's), e = ggml_v_expf(w - max), the float64 sum of each vector's float32 sum
        (hsum_float_8 / _mm512_reduce_add_ps) in order, and w[i] = fp16(e[i] * float32(1 / sum)) for i < used:
        the probabilities as the F16 product with V reads them. Past the visible keys exp(-inf) = 0: the
        zero vectors past `used` would add 0 to the sum, so the row stops there. -> the sum (float64)."""
        sig = types.float64(types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            wp, visible, used = args
            b = builder
            vt = ir.VectorType(F32, lanes)
            with cgutils.for_range_slice(b, visible, used, _c64(1), intp=I64) as (i, _):
                b.store(ir.Constant(F32, float("-inf")), _ptr(b, b.add(wp, b.mul(i, _c64(4))), F32), align=4)

            def take(x, m):  # max(x, m) that keeps a NaN x, as np.max does
                return b.select(b.or_(b.fcmp_unordered("uno", x, x), b.fcmp_ordered(">", x, m)), x, m)
            vmax = cgutils.alloca_once_value(b, ir.Constant(vt, [float("-inf")] * lanes))
            with cgutils.for_range_slice(b, _c64(0), used, _c64(lanes), intp=I64) as (i, _):
                b.store(take(_gep_load(b, wp, b.mul(i, _c64(4)), vt, 4), b.load(vmax)), vmax)
            v = b.load(vmax)
            row_max = _lane(b, v, 0)
            for i in range(1, lanes):
                row_max = take(_lane(b, v, i), row_max)
            m = _splat(b, row_max, lanes)
            total = cgutils.alloca_once_value(b, ir.Constant(F64, 0.0))
            with cgutils.for_range_slice(b, _c64(0), used, _c64(lanes), intp=I64) as (i, _):
                addr = b.add(wp, b.mul(i, _c64(4)))
                e = expf_vector(b, b.fsub(b.load(_ptr(b, addr, vt), align=4), m), lanes == 16)
                b.store(e, _ptr(b, addr, vt), align=4)
                s = reduce_add_16(b, e) if lanes == 16 else hsum_float_8(b, e)
                b.store(b.fadd(b.load(total), b.fpext(s, F64)), total)
            inv = _splat(b, b.fptrunc(b.fdiv(ir.Constant(F64, 1.0), b.load(total)), F32), lanes)
            half = ir.VectorType(ir.HalfType(), lanes)
            with cgutils.for_range_slice(b, _c64(0), used, _c64(lanes), intp=I64) as (i, _):
                addr = b.add(wp, b.mul(i, _c64(4)))
                p = b.fmul(b.load(_ptr(b, addr, vt), align=4), inv)
                b.store(b.fpext(b.fptrunc(p, half), vt), _ptr(b, addr, vt), align=4)
            return b.load(total)
        return sig, codegen
    return soft_max_row


soft_max_row8 = _make_softmax(8)
soft_max_row16 = _make_softmax(16)


# ---- q . k ------------------------------------------------------------------------------------------------------

ROWS = (1, 2, 3)  # query heads per call (heads of one KV head share each key and value row loaded)


def _key_sums8(builder, t):
    """GGML_F32x8_REDUCE's end for 8 keys at once: t, 8 vectors (one per key) -> one vector of their 8 sums
    in key order, each lane's additions those of reduce_add_8: (i + i+4), then (0 + 1) + (2 + 3)."""
    b = builder
    lo, hi = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    evens, odds = list(range(0, 16, 2)), list(range(1, 16, 2))

    def pair(x, y, first, second):
        mask = ir.VectorType(I32, 8)
        return b.fadd(b.shuffle_vector(x, y, ir.Constant(mask, first)),
                      b.shuffle_vector(x, y, ir.Constant(mask, second)))
    u = [pair(t[2 * i], t[2 * i + 1], lo, hi) for i in range(4)]  # keys 2i, 2i+1: their lanes i + i+4
    v = [pair(u[0], u[1], evens, odds), pair(u[2], u[3], evens, odds)]  # keys 0-3, 4-7: (0 + 1), (2 + 3)
    return pair(v[0], v[1], evens, odds)  # (0 + 1) + (2 + 3), keys 0 .. 7


def _make_scores(lanes, rows):
    @intrinsic
    def f16_scores(typingctx, q, k, k_stride, nkeys, hd, scale, out, out_stride):
        """out[r, j] = ggml_vec_dot_f16(q[r], key row j) * scale for r < `rows`, j < nkeys, float32: q rows of hd
        float32 holding fp16 values, one after the other; key row j at byte address k + j * k_stride (fp16 values:
        the cache's bits); out row r at out + r * out_stride, room for nkeys rounded up to 8 (the
        values past nkeys are left undefined). Per dot product: 4 accumulators of `lanes` over the first hd - hd %
        (4 lanes) values, (0 + 2) + (1 + 3), reduce_add_16 (16 lanes) or GGML_F32x8_REDUCE's end (8), then the
        leftovers q[i] k[i] (float32 products) added one by one in float64, rounded to float32, times scale
        (ggml_soft_max_ext's). Each key vector is loaded once for the `rows` queries; keys go 8 at a time, their
        lanes summed together (_key_sums8 with 8 lanes). Addresses and strides in bytes."""
        sig = types.void(types.int64, types.int64, types.int64, types.int64, types.int64, types.float32,
                         types.int64, types.int64)

        def codegen(context, builder, signature, args):
            qp, kp, ks, nkeys, hd, scale, outp, os_ = args
            b = builder
            vt = ir.VectorType(F32, lanes)
            v8 = ir.VectorType(F32, 8)
            step = 4 * lanes
            m = b.sub(hd, b.srem(hd, _c64(step)))
            qs = b.mul(hd, _c64(4))  # bytes from one query row to the next
            zero = ir.Constant(vt, [0.0] * lanes)
            accs = [[cgutils.alloca_once(b, vt) for _ in range(4)] for _ in range(rows)]
            sums = [cgutils.alloca_once(b, vt, size=8) for _ in range(rows)]  # a chunk's (0 + 2) + (1 + 3)
            scores = cgutils.alloca_once(b, F32, size=8)
            total = cgutils.alloca_once(b, F64)
            with cgutils.for_range_slice(b, _c64(0), nkeys, _c64(8), intp=I64) as (j0, _):
                n = b.select(b.icmp_signed("<", b.sub(nkeys, j0), _c64(8)), b.sub(nkeys, j0), _c64(8))
                with cgutils.for_range_slice(b, _c64(0), _c64(8), _c64(1), intp=I64) as (jj, _):
                    for r in range(rows):
                        b.store(zero, b.gep(sums[r], [jj]))  # keys past nkeys: sums of nothing
                with cgutils.for_range_slice(b, _c64(0), n, _c64(1), intp=I64) as (jj, _):
                    row = b.add(kp, b.mul(b.add(j0, jj), ks))
                    for acc in sum(accs, []):
                        b.store(zero, acc)
                    with cgutils.for_range_slice(b, _c64(0), m, _c64(step), intp=I64) as (s, _):
                        for c in range(4):
                            off = b.mul(b.add(s, _c64(lanes * c)), _c64(4))
                            kv = _cache_load(b, row, b.add(s, _c64(lanes * c)), lanes)
                            for r in range(rows):
                                qv = _gep_load(b, b.add(qp, b.mul(_c64(r), qs)), off, vt, 4)
                                b.store(_fma(b, qv, kv, b.load(accs[r][c])), accs[r][c])
                    for r in range(rows):
                        a0, a1, a2, a3 = (b.load(acc) for acc in accs[r])
                        b.store(b.fadd(b.fadd(a0, a2), b.fadd(a1, a3)), b.gep(sums[r], [jj]))
                for r in range(rows):
                    if lanes == 8:
                        t = [b.load(b.gep(sums[r], [_c64(i)])) for i in range(8)]
                        b.store(_key_sums8(b, t), b.bitcast(scores, ir.PointerType(v8)), align=4)
                    else:
                        for i in range(8):
                            b.store(reduce_add_16(b, b.load(b.gep(sums[r], [_c64(i)]))), b.gep(scores, [_c64(i)]))
                    qr = b.add(qp, b.mul(_c64(r), qs))
                    with b.if_then(b.icmp_signed("<", m, hd), likely=False):  # leftovers, in float64
                        with cgutils.for_range_slice(b, _c64(0), n, _c64(1), intp=I64) as (jj, _):
                            row = b.add(kp, b.mul(b.add(j0, jj), ks))
                            b.store(b.fpext(b.load(b.gep(scores, [jj])), F64), total)
                            with cgutils.for_range_slice(b, m, hd, _c64(1), intp=I64) as (i, _):
                                off = b.mul(i, _c64(4))
                                prod = b.fmul(_gep_load(b, qr, off, F32, 4), _cache_load(b, row, i, 1))
                                b.store(b.fadd(b.load(total), b.fpext(prod, F64)), total)
                            b.store(b.fptrunc(b.load(total), F32), b.gep(scores, [jj]))
                    res = b.fmul(b.load(b.bitcast(scores, ir.PointerType(v8)), align=4), _splat(b, scale, 8))
                    dst = b.add(b.add(outp, b.mul(_c64(r), os_)), b.mul(j0, _c64(4)))
                    b.store(res, _ptr(b, dst, v8), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return f16_scores


# on keys stored as fp16 (the ggml cache: model/cache.py's storage), the only form kernels/ggml_ops.py hands them in
h16_scores8_1, h16_scores8_2, h16_scores8_3 = (_make_scores(8, r) for r in ROWS)
h16_scores16_1, h16_scores16_2, h16_scores16_3 = (_make_scores(16, r) for r in ROWS)


def _lane_tree(builder, lanes, leaf):
    """ggml_vec_dot_f16's sum over its accumulator lanes, made vertically for several dot products at once: leaf(i)
    (i < lanes) -> a list of vectors (one a row, each lane its own dot product) holding lane i's (acc0 + acc2) +
    (acc1 + acc3); summed as reduce_add_16 halves its lanes (16 -> 8 -> 4 -> 2 -> 1) or as reduce_add_8 ends
    ((i + i+4), then (0 + 1) + (2 + 3)). Depth first: leaf(i) is called when its partner's sum is there, so few
    partial sums are live at once. -> the list of sums."""
    def add(x, y):
        return [builder.fadd(p, q) for p, q in zip(x, y)]
    if lanes == 8:
        h = [add(leaf(i), leaf(i + 4)) for i in range(4)]
        return add(add(h[0], h[1]), add(h[2], h[3]))

    def node(n, i):  # lane i of the level of n lanes: lane i + lane i + n of the level above
        return leaf(i) if n == 16 else add(node(2 * n, i), node(2 * n, i + n))
    return node(1, 0)


def _make_key_scores(lanes, rows):
    @intrinsic
    def kt_scores(typingctx, q, kt, nkeys, hd, scale, out, out_stride):
        """f16_scores (the same numbers: ggml_vec_dot_f16(q[r], key j) * scale for r < `rows`, j < nkeys) with
        the keys in vector lanes: kt holds them transposed in blocks of KW keys (16; the AVX2 build's order 8),
        (blocks, hd, KW) fp16 bits from byte address kt, zeros past nkeys. Each product q[d] k[d] is exact in
        float32, so a dot product's value is fixed by its additions alone; here every addition ggml makes in one
        dot product's accumulator lanes (4 accumulators of `lanes`, fused over the steps of 4L values, (0 + 2) +
        (1 + 3), then the lanes' tree: reduce_add_16's halves or reduce_add_8's (i + i+4), (0 + 1) + (2 + 3);
        then the float64 leftovers) is made once for KW keys, lane j of each vector being key j's: vertical
        arithmetic, no shuffles, each key vector loaded once for the `rows` queries. The tree goes depth first
        (few partial sums live); a head size of one or two steps (64, 128 on AVX-512) is unrolled whole. With one
        step each accumulator lane is a single product, exact, so its first addition (acc0 + acc2) is the fused
        multiply-add of the second product onto the first, the same number in one instruction less. out row
        r at out + r * out_stride, room for nkeys rounded up to KW (past nkeys: the padding's scores). Addresses
        and strides in bytes."""
        sig = types.void(types.int64, types.int64, types.int64, types.int64, types.float32, types.int64,
                         types.int64)

        def codegen(context, builder, signature, args):
            qp, kp, nkeys, hd, scale, outp, os_ = args
            b = builder
            kw = 16 if lanes == 16 else 8
            vk, vd = ir.VectorType(F32, kw), ir.VectorType(F64, kw)
            h = ir.VectorType(ir.HalfType(), kw)
            step = 4 * lanes
            m = b.sub(hd, b.srem(hd, _c64(step)))
            qs = b.mul(hd, _c64(4))  # bytes from one query row to the next
            block = b.mul(hd, _c64(2 * kw))  # bytes from one block of keys to the next
            zero = ir.Constant(vk, [0.0] * kw)

            def key_values(base, i):  # value i (i64) of the block's KW keys: widened as ggml does
                return b.fpext(_gep_load(b, base, b.mul(i, _c64(2 * kw)), h, 2), vk)

            def query(r, i):  # q[r, i] (i64), splat over the keys
                return _splat(b, _gep_load(b, b.add(qp, b.mul(_c64(r), qs)), b.mul(i, _c64(4)), F32, 4), kw)

            def scores(base, steps):  # every row's tree over the block's keys; steps: the loop unrolled, or None
                def leaf(lane):  # every row's (acc0 + acc2) + (acc1 + acc3) at this lane
                    if steps == 1:  # each accumulator lane holds one exact product: acc0 + acc2 = fma(q2, k2, acc0)
                        kv = [key_values(base, _c64(lanes * c + lane)) for c in range(4)]
                        sums = []
                        for r in range(rows):
                            a0, a1 = (_fma(b, query(r, _c64(lanes * c + lane)), kv[c], zero) for c in (0, 1))
                            s02 = _fma(b, query(r, _c64(2 * lanes + lane)), kv[2], a0)
                            s13 = _fma(b, query(r, _c64(3 * lanes + lane)), kv[3], a1)
                            sums.append(b.fadd(s02, s13))
                        return sums
                    if steps is not None:
                        accs = [[zero] * 4 for _ in range(rows)]
                        for st in range(steps):
                            for c in range(4):
                                i = _c64(step * st + lanes * c + lane)
                                kv = key_values(base, i)
                                for r in range(rows):
                                    accs[r][c] = _fma(b, query(r, i), kv, accs[r][c])
                    else:
                        slots = [[cgutils.alloca_once_value(b, zero) for _ in range(4)] for _ in range(rows)]
                        with cgutils.for_range_slice(b, _c64(0), m, _c64(step), intp=I64) as (s, _):
                            for c in range(4):
                                i = b.add(s, _c64(lanes * c + lane))
                                kv = key_values(base, i)
                                for r in range(rows):
                                    b.store(_fma(b, query(r, i), kv, b.load(slots[r][c])), slots[r][c])
                        accs = [[b.load(x) for x in row] for row in slots]
                    return [b.fadd(b.fadd(a[0], a[2]), b.fadd(a[1], a[3])) for a in accs]
                return _lane_tree(b, lanes, leaf)

            with cgutils.for_range_slice(b, _c64(0), nkeys, _c64(kw), intp=I64) as (j0, _):
                base = b.add(kp, b.mul(b.sdiv(j0, _c64(kw)), block))
                totals = [cgutils.alloca_once(b, vk) for _ in range(rows)]
                one, two = b.icmp_signed("==", m, _c64(step)), b.icmp_signed("==", m, _c64(2 * step))
                with b.if_else(one) as (then, other):
                    with then:
                        for r, x in enumerate(scores(base, 1)):
                            b.store(x, totals[r])
                    with other:
                        with b.if_else(two) as (then2, other2):
                            with then2:
                                for r, x in enumerate(scores(base, 2)):
                                    b.store(x, totals[r])
                            with other2:
                                for r, x in enumerate(scores(base, None)):
                                    b.store(x, totals[r])
                for r in range(rows):
                    with b.if_then(b.icmp_signed("<", m, hd), likely=False):  # leftovers, in float64
                        wide = cgutils.alloca_once_value(b, b.fpext(b.load(totals[r]), vd))
                        with cgutils.for_range_slice(b, m, hd, _c64(1), intp=I64) as (i, _):
                            prod = b.fmul(query(r, i), key_values(base, i))
                            b.store(b.fadd(b.load(wide), b.fpext(prod, vd)), wide)
                        b.store(b.fptrunc(b.load(wide), vk), totals[r])
                    res = b.fmul(b.load(totals[r]), _splat(b, scale, kw))
                    dst = b.add(b.add(outp, b.mul(_c64(r), os_)), b.mul(j0, _c64(4)))
                    b.store(res, _ptr(b, dst, vk), align=4)
            return context.get_dummy_value()
        return sig, codegen
    return kt_scores


# keys transposed (fp16 bits), keys in lanes: a prefill's scores (kernels/ggml_ops.attention); the AVX-512 build's
# order also 4 query heads a call (each key vector widened once for 4 queries: 1B shape, 512 keys, 0.66x the time)
kt_scores8_1, kt_scores8_2, kt_scores8_3 = (_make_key_scores(8, r) for r in ROWS)
kt_scores16_1, kt_scores16_2, kt_scores16_3, kt_scores16_4 = (_make_key_scores(16, r) for r in ROWS + (4,))


# ---- probabilities . V --------------------------------------------------------------------------------------------

def _make_columns(lanes, rows):
    @intrinsic
    def f16_columns(typingctx, w, w_stride, v, v_stride, nkeys, hd, out):
        """out[r, d] = ggml_vec_dot_f16(w[r], column d of V) for r < `rows`, d < hd (a multiple of 8), over nkeys keys
        (the rest of ggml's padded row is zero probabilities): key p into accumulator lane p % 4L (L = `lanes`), each
        lane a chain acc = fma(w[r, p], v[p, d], acc) over p = a, a + 4L, ...; the 4L lanes of each column summed as
        ggml_vec_dot_f16 sums its accumulators' lanes ((0 + 2) + (1 + 3), then reduce_add_16's halves or reduce_add_8's
        (i + i+4), (0 + 1) + (2 + 3)). Columns are independent, so they go 16 at a time (then 8 for a head size that is
        an odd multiple of 8): in the 8-lane build two vectors a row, so that each chain's loop has two fused
        multiply-adds a row in flight, not one behind the last's latency (default model, 512 tokens, 3 rows, one thread
        on an AVX2 EPYC: 2.90 ms a layer against 4.63 with 8 columns; 32 columns 4.42, register spills), and for each
        the chains are made in the order of that sum's tree, each added in as soon as its partner is there: depth first,
        every partial sum in registers (storing the 4L chains of every column and summing them after took 1.4-1.8x as
        long at the 1B shape). Each value vector is loaded once for the rows. w rows (w + r w_stride) of float32 fp16
        values; V row p at byte address v + p * v_stride (fp16 values: the cache's bits); out rows of hd float32, one
        after the other. Addresses in bytes."""
        sig = types.void(*([types.int64] * 7))

        def codegen(context, builder, signature, args):
            wp, ws, vp, vs, nkeys, hd, outp = args
            b = builder
            step = 4 * lanes

            def column_sums(col, n):  # columns col .. col + n - 1 of every row -> out
                vn = ir.VectorType(F32, n)
                zero = ir.Constant(vn, [0.0] * n)

                def chain(a):  # lane a's chain of every row
                    accs = [cgutils.alloca_once_value(b, zero) for _ in range(rows)]
                    with cgutils.for_range_slice(b, _c64(a), nkeys, _c64(step), intp=I64) as (p, _):
                        vv = _cache_load(b, b.add(vp, b.mul(p, vs)), col, n)
                        for r in range(rows):
                            wv = _splat(b, _gep_load(b, b.add(wp, b.mul(_c64(r), ws)), b.mul(p, _c64(4)), F32, 4), n)
                            b.store(_fma(b, wv, vv, b.load(accs[r])), accs[r])
                    return [b.load(acc) for acc in accs]

                def add(x, y):
                    return [b.fadd(p, q) for p, q in zip(x, y)]

                def leaf(i):  # lane i of (acc0 + acc2) + (acc1 + acc3): chains i, i + 2L, then i + L, i + 3L
                    left = add(chain(i), chain(2 * lanes + i))
                    return add(left, add(chain(lanes + i), chain(3 * lanes + i)))

                sums = _lane_tree(b, lanes, leaf)
                for r in range(rows):
                    dst = b.add(outp, b.mul(b.add(b.mul(_c64(r), hd), col), _c64(4)))
                    b.store(sums[r], _ptr(b, dst, vn), align=4)

            col = cgutils.alloca_once_value(b, _c64(0))
            for n in (16, 8):
                cond = b.append_basic_block("cols_cond")
                body = b.append_basic_block("cols_body")
                done = b.append_basic_block("cols_done")
                b.branch(cond)
                b.position_at_end(cond)
                c = b.load(col)
                b.cbranch(b.icmp_signed("<=", b.add(c, _c64(n)), hd), body, done)
                b.position_at_end(body)
                column_sums(c, n)
                b.store(b.add(c, _c64(n)), col)
                b.branch(cond)
                b.position_at_end(done)
            return context.get_dummy_value()
        return sig, codegen
    return f16_columns


# probability rows per call: up to 4 (two calls of the scores' 2 rows: each value vector loaded once for 4 rows)
COLUMN_ROWS = (1, 2, 3, 4)
h16_columns8_1, h16_columns8_2, h16_columns8_3, h16_columns8_4 = (_make_columns(8, r) for r in COLUMN_ROWS)
h16_columns16_1, h16_columns16_2, h16_columns16_3, h16_columns16_4 = (_make_columns(16, r) for r in COLUMN_ROWS)
