"""LLVM IR for the inner loops of arithmetic="ggml": a true fused multiply-add, fp16 rounding, and the
integer block dot products of ggml's quantized matrix products, as Numba intrinsics.

Scalar Numba code neither fuses a multiply-add (math.fma is not supported) nor vectorizes a dot product
whose float part must keep ggml's 8-lane order, so the loops that decide the speed are written here in
LLVM's vector IR, one function per weight format and row count, and called from kernels/ggml.py:

- fma32(a, b, c): llvm.fma.f32, float32 a * b + c rounded once (vfmadd; libm's fmaf where the CPU has none).
  llama_ref.model.ggml.fma computes the same rounding exactly in NumPy (round to odd).
- fp16_round(x): float32 -> fp16 (round to nearest even, vcvtps2ph) -> float32.
- roundeven32(x): float32 rounded to the nearest integer, ties to even (_mm256_round_ps).
- quantize_q8_0_blocks: a row's Q8_0 / Q8_1 activation blocks (quantize_row_q8_0 / q8_1), 8 lanes at a time.
- dot_rows(kind, rows): ggml's dot product of `rows` weight rows with one quantized activation row:
  per 32-value block, the 8 int32 lanes of 4 products each (or, for repacked Q4_0, their sum), then
  acc = fma(d_w * d_x, lanes, acc) block after block in float32, then hsum_float_8 (see model/ggml.py).
  The integer part is exact in any order, so three implementations give identical results, chosen at run
  time by an argument (`simd`): vpdpbusd (AVX-512 VNNI / AVX-VNNI: unsigned bytes times signed bytes, four
  at a time), AVX2's vpmaddubsw + vpmaddwd (what llama.cpp runs on AVX2: unsigned times signed byte pairs
  summed into int16, then pairs of those into int32; see lanes_u8s8 for why nothing saturates), and
  portable IR (widen and multiply; on x86 LLVM makes vpmovsxbd + vpmulld of it, not vpmaddwd, so it is the
  slow one). simd = 0 takes the portable code, 2 AVX2 where the CPU has it (so that a VNNI machine tests
  that branch too), 3 the prefill tiles' 512-bit VNNI form where the CPU has AVX-512 VNNI (two activation rows
  in each vector: lanes 0-7 one (row, activation) pair, lanes 8-15 the next, each lane the same integers and
  fma chain as the 8-lane tile; host_prefers_512 makes it the default on Intel's AVX-512 Xeons), any other
  value the best this CPU has: VNNI, then AVX2, then portable. A branch is only emitted when the host CPU has
  its instructions (Numba compiles for the host).

Numba's on-disk cache checks a kernel against its own file only: after editing this file delete
kernels/__pycache__/ggml*.nbi and *.nbc (see _common.py).
"""

from __future__ import annotations

import os

import llvmlite.binding as llvm_binding
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

F32 = ir.FloatType()
I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)


def host_has_vnni() -> bool:
    """Whether this CPU has vpdpbusd on 256-bit registers (AVX-VNNI, or AVX-512 VNNI with VL)."""
    feats = set(llvm_binding.get_host_cpu_features().flatten().split(","))
    return "+avxvnni" in feats or {"+avx512vnni", "+avx512vl"} <= feats


def host_has_avx2() -> bool:
    """Whether this CPU has AVX2's 256-bit vpmaddubsw, vpmaddwd and vpsignb."""
    return "+avx2" in llvm_binding.get_host_cpu_features().flatten().split(",")


def host_has_avx512bw() -> bool:
    """Whether this CPU has vpmaddubsw on 512-bit registers (AVX-512 BW)."""
    return "+avx512bw" in llvm_binding.get_host_cpu_features().flatten().split(",")


def host_prefers_512() -> bool:
    """Whether the prefill tiles should take two activation rows in each 512-bit vector (simd=3, "vnni512"): on a
    CPU with AVX-512 VNNI and BW whose cores run 512-bit vectors at full width. Intel's AVX-512 Xeons issue them
    on two ports, as many a cycle as 256-bit float and VNNI ones (ports 0 and 1), so twice the lanes; AMD's Zen 4
    splits each into two 256-bit halves, where a 512-bit prefill tile ran 1.14-1.23x slower (session 36).
    The same choice (simd=3) also gives repacked Q4_0's and Q4_K's 8-row tiles their vpdpbusd forms, and a Q4_K
    prefill two groups of 8 rows in 512-bit vectors, measured faster on an Intel core only (_define_q4_0r,
    ggml_kquants._define_q4_kx8_tile and _define_q4_kx16_tile).
    LLAMA_REF_GGML_WIDE=0 / 1 overrides the choice (the same results either way)."""
    forced = os.environ.get("LLAMA_REF_GGML_WIDE", "")
    return HAS_VNNI512 and (forced == "1" if forced in ("0", "1") else not HOST_IS_ZEN)


# An AMD Zen core (LLVM's host name znver*): where measured kernel choices differ from Intel's (host_prefers_512,
# kernels/linear.py ONE_ROW_MAX_K)
HOST_IS_ZEN = llvm_binding.get_host_cpu_name().startswith("znver")
HAS_VNNI = host_has_vnni()
HAS_AVX2 = host_has_avx2()
HAS_AVX512BW = host_has_avx512bw()
# 512-bit vpdpbusd (AVX-512 VNNI): the tiles' "vnni512" form, simd=3, can run on this CPU
HAS_VNNI512 = HAS_VNNI and HAS_AVX512BW and "+avx512vnni" in llvm_binding.get_host_cpu_features().flatten().split(",")
# The integer instructions `simd` != 0 selects on this CPU, best first; "portable" where it has neither.
BEST = "vnni" if HAS_VNNI else "avx2" if HAS_AVX2 else "portable"
HAS_SIMD = BEST != "portable"


def simd_default() -> int:
    """The `simd` argument the kernels take by default: 1 (the best integer instructions of this CPU), or 3 (the
    same, with the prefill tiles' 512-bit form, where host_prefers_512), unless it has neither VNNI nor AVX2 or
    LLAMA_REF_GGML_PORTABLE=1 asks for the portable code (same results)."""
    if not HAS_SIMD or os.environ.get("LLAMA_REF_GGML_PORTABLE", "") == "1":
        return 0
    return 3 if host_prefers_512() else 1


def dispatch(builder, use, emit, wide: bool = False) -> None:
    """Emit emit(isa) once for each integer instruction set this CPU has, and branch between them on `use`
    (an i64 at run time: 0 "portable", 2 "avx2" where the CPU has it, else BEST). wide: the emitter also has a
    512-bit form, "vnni512", which use 3 takes where the CPU has it (HAS_VNNI512); elsewhere 3 is 1."""
    if BEST == "portable":
        emit("portable")
        return
    if wide and HAS_VNNI512:
        with builder.if_else(builder.icmp_signed("==", use, ir.Constant(I64, 3))) as (wide_, other):
            with wide_:
                emit("vnni512")
            with other:
                dispatch(builder, use, emit)
        return
    with builder.if_else(builder.icmp_signed("==", use, ir.Constant(I64, 0))) as (portable, fast):
        with portable:
            emit("portable")
        with fast:
            if BEST == "vnni" and HAS_AVX2:
                with builder.if_else(builder.icmp_signed("==", use, ir.Constant(I64, 2))) as (avx2, vnni):
                    with avx2:
                        emit("avx2")
                    with vnni:
                        emit("vnni")
            else:
                emit(BEST)


# ---- scalar intrinsics -----------------------------------------------------------------------------------------

@intrinsic
def fma32(typingctx, a, b, c):
    """float32 a * b + c with one rounding (llvm.fma.f32)."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        return builder.call(_declare(builder.module, "llvm.fma.f32", F32, [F32] * 3), args)
    return sig, codegen


@intrinsic
def fp16_round(typingctx, x):
    """float32 -> nearest fp16 (ties to even; inf past 65504) -> float32: fptrunc then fpext."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), F32)
    return sig, codegen


@intrinsic
def fp16_bits(typingctx, x):
    """float32 -> the bits of the nearest fp16 (ties to even; inf past 65504), as uint16: what a float16 array
    holds for fp16_round(x)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return sig, codegen


@intrinsic
def roundeven32(typingctx, x):
    """float32 rounded to the nearest integer, ties to even (llvm.roundeven.f32)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.call(_declare(builder.module, "llvm.roundeven.f32", F32, [F32]), args)
    return sig, codegen


def _join(builder, u, v):
    """<2n x T>: the lanes of u then those of v (two <n x T>)."""
    n = 2 * u.type.count
    return builder.shuffle_vector(u, v, ir.Constant(ir.VectorType(I32, n), list(range(n))))


@intrinsic
def quantize_q8_0_blocks(typingctx, x, nb, q, d, sums, offsets):
    """quantize_row_q8_0 (and quantize_row_q8_1's sums) of nb blocks of 32 float32 at byte address x, as
    llama_ref.model.ggml.quantize_row_q8_1 computes them, one block's 32 values as four 8-lane vectors: amax the
    unsigned max of the bits of |x| (a NaN's bits, above infinity's, win), d = amax / 127, inv = 127 / amax (0 where
    amax == 0), q = int8(roundeven(x inv)), s = the sum of q; -> q (int8, 32 a block), d as fp16_round(d) and sums
    as fp16_round(d s) (float32, one a block), and offsets (int32 8 s, repacked Q4_0's: kernels/ggml._x_offsets)
    where that address is not 0. 576 values in 0.21 us (Zen 3), where Numba's scalar loops took 0.55."""
    sig = types.void(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        b = builder
        xp, nb, qp, dp, sp, op = args
        v8f, v8i = ir.VectorType(F32, 8), ir.VectorType(I32, 8)
        umax = _declare(b.module, "llvm.umax.v8i32", v8i, [v8i, v8i])
        top_of = _declare(b.module, "llvm.vector.reduce.umax.v8i32", I32, [v8i])
        add_of = _declare(b.module, "llvm.vector.reduce.add.v8i32", I32, [v8i])
        rnd = _declare(b.module, "llvm.roundeven.v8f32", v8f, [v8f])
        magnitude = ir.Constant(v8i, [0x7FFFFFFF] * 8)
        zero, c127 = ir.Constant(F32, 0.0), ir.Constant(F32, 127.0)
        with cgutils.for_range(b, nb, intp=I64) as loop:
            i = loop.index
            base = b.add(xp, b.mul(i, ir.Constant(I64, 128)))
            xs = [_gep_load(b, base, ir.Constant(I64, 32 * k), v8f, 4) for k in range(4)]
            bits = [b.and_(b.bitcast(v, v8i), magnitude) for v in xs]
            amax = b.bitcast(b.call(top_of, [b.call(umax, [b.call(umax, bits[:2]), b.call(umax, bits[2:])])]), F32)
            dv = b.fdiv(amax, c127)
            inv = b.select(b.fcmp_unordered("!=", amax, zero), b.fdiv(c127, amax), zero)
            splat = _shuffle(b, b.insert_element(ir.Constant(v8f, ir.Undefined), inv, ir.Constant(I32, 0)), [0] * 8)
            qs = [b.fptosi(b.call(rnd, [b.fmul(v, splat)]), v8i) for v in xs]
            qbase = b.add(qp, b.mul(i, ir.Constant(I64, 32)))
            # int8(q) of the 32 at once: their low bytes (a NaN's q keeps its 0, as the scalar int8() cast), which x86
            # makes with two unsigned packs and a permute, where a trunc per vector took ~20 shuffles
            q32 = _join(b, _join(b, qs[0], qs[1]), _join(b, qs[2], qs[3]))
            low = b.trunc(b.and_(q32, ir.Constant(ir.VectorType(I32, 32), [255] * 32)), ir.VectorType(I8, 32))
            b.store(low, _ptr(b, qbase, ir.VectorType(I8, 32)), align=1)
            s = b.call(add_of, [b.add(b.add(qs[0], qs[1]), b.add(qs[2], qs[3]))])
            at = b.mul(i, ir.Constant(I64, 4))
            half = ir.HalfType()
            b.store(b.fpext(b.fptrunc(dv, half), F32), _ptr(b, b.add(dp, at), F32))
            b.store(b.fpext(b.fptrunc(b.fmul(dv, b.sitofp(s, F32)), half), F32), _ptr(b, b.add(sp, at), F32))
            with b.if_then(b.icmp_unsigned("!=", op, ir.Constant(I64, 0))):
                b.store(b.mul(s, ir.Constant(I32, 8)), _ptr(b, b.add(op, at), I32))
        return context.get_dummy_value()
    return sig, codegen


def _prefetch(builder, addr, into="l1"):
    """A read prefetch of the cache line at byte address addr (i64) into all cache levels (prefetcht0), or
    into="l2": into L2 and below (prefetcht1). On Intel a prefetch into L1 holds one of its ~16 fill buffers
    until the line arrives; one into L2 gives its buffer back sooner and waits in L2's longer queue, so more
    lines are in flight: the K-quant decode tiles streamed from memory (8192 x 2048 .. 2048 x 8192, two
    threads, Sapphire Rapids) went from 19-25 to 23-26 GB/s (Q5_K) and 20-27 to 26-32 GB/s (Q6_K) so, the
    same in cache; Q4_K's repacked tile and the 512 MiB bandwidth probe read no faster (30 and 32.5 GB/s)."""
    i8p = ir.PointerType(I8)
    fn = _declare(builder.module, "llvm.prefetch.p0", ir.VoidType(), [i8p, I32, I32, I32])
    level = {"l1": 3, "l2": 2}[into]  # llvm.prefetch's locality: 3 -> prefetcht0, 2 -> prefetcht1
    builder.call(fn, [builder.inttoptr(addr, i8p), ir.Constant(I32, 0), ir.Constant(I32, level), ir.Constant(I32, 1)])


@intrinsic
def prefetch(typingctx, addr):
    """A read prefetch of the cache line at byte address addr (int64) into all cache levels (llvm.prefetch)."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):
        _prefetch(builder, args[0])
        return context.get_dummy_value()
    return sig, codegen


# ---- the block dot products --------------------------------------------------------------------------------------

# kind: (bytes per block of a weight row, nibbles? (True: 16 bytes of them; Q5: 4 bytes of fifth bits, then 16 of
#        nibbles), signed values? (Q5_0: the fifth bits make int8 q - 16 of the nibbles), offset subtracted from
#        nibbles, 8 lanes?, has a min term (Q4_1 / Q5_1: + sum_b fma(m_w, s_x)), how the scales come: False float32
#        d at wd and m at wm; "pair" one fp16 pair per block (wd: one 32-bit word, d in its low half, m in its
#        high half; wm unused); "half" one fp16 d per block at wd)
KINDS = {
    "q8_0": (32, False, True, 0, True, False, False),  # also Q5_0 in a prefill, unpacked to int8 values q - 16
    "q5_1": (32, False, False, 0, True, True, False),  # one byte per value 0..31 (Q5_1 in a prefill, unpacked)
    "q4_0": (16, True, True, 8, True, False, False),  # not repacked: 8 lanes
    "q4_0r": (16, True, True, 8, False, False, False),  # repacked (ggml_gemv_q4_0_8x8_q8_0): one integer per block
    "q4_1": (16, True, False, 0, True, True, False),
    # As llama.cpp streams them (kernels/ggml.py _weight_args): Q4_1's nibbles with d, m as an fp16 pair (20
    # bytes a block, against 24 with float32 d and m); Q5_1 and Q5_0 as their file's blocks without the header,
    # fifth bits then nibbles, with the fp16 pair (24 bytes a block, against 40 as one byte per value and float32
    # d, m) or the fp16 d (22 bytes, against 36 as int8 values and a float32 d).
    "q4_1h": (16, True, False, 0, True, True, "pair"),
    "q5_1c": (20, "q5", False, 0, True, True, "pair"),
    "q5_0c": (20, "q5", True, 0, True, False, "half"),
}


def _declare(module, name, ret, args):
    """The function `name` of `module` (an LLVM intrinsic), declared on first use."""
    fn = module.globals.get(name)
    return fn if fn is not None else ir.Function(module, ir.FunctionType(ret, args), name)


def _ptr(builder, addr, ty):
    return builder.inttoptr(addr, ir.PointerType(ty))


def _gep_load(builder, base, offset, ty, align):
    """Load a `ty` at byte address base + offset (both i64)."""
    p = _ptr(builder, builder.add(base, offset), ty)
    return builder.load(p, align=align)


def _shuffle(builder, v, idx):
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(ir.VectorType(I32, len(idx)), idx))


# gf2p8affineqb's matrices (one per 64-bit lane; output bit i is the parity of x and byte 7 - i): x & 15 and x >> 4
_LOW_NIBBLE, _HIGH_NIBBLE = 0x0102040800000000, 0x1020408000000000
# GFNI's affine byte transform and AVX-512 BW's byte masks: the host's own features, as Numba compiles for it
HAS_GFNI_MASKS = {"+gfni", "+avx512bw", "+avx512vl"} <= set(llvm_binding.get_host_cpu_features().flatten().split(","))
# The order of a Q5 block's fifth bits that every Q5 tile of this host reads (weights/packed.py Q5_BIT_ORDERS; kernels/
# ggml.py _weight_args asks the weight for it): with GFNI and AVX-512 BW the file's, loaded as a mask; with AVX2
# "shifted", spread to bytes by one vpsllvd and read by one vpblendvb (q5_values); without either the file's. One order
# a host, whatever integer code a call picks (use_simd, LLAMA_REF_GGML_PORTABLE): the portable tiles read it too.
Q5_BIT_ORDER = "shifted" if HAS_AVX2 and not HAS_GFNI_MASKS else "file"


def _weight_values(builder, raw, nibbles, offset, portable=False):
    """A weight block's raw bytes -> <32 x i8> values in value order. Nibbles (16 bytes: values 0..15 low, 16..31
    high): where the CPU has GFNI and AVX-512 BW (HAS_GFNI_MASKS), unless portable (plain IR, no x86 intrinsics),
    the 16 bytes in both halves of a vector (a vbroadcasti128 from memory) and one vgf2p8affineqb that keeps the low
    nibbles in the lower half and takes the high ones in the upper (a matrix per 64-bit lane), where an and, a
    shift and an insert took three vector instructions; elsewhere, unless portable, the same broadcast, a
    variable shift and an and. The same bytes every way."""
    if not nibbles:
        return raw
    v16, v32 = ir.VectorType(I8, 16), ir.VectorType(I8, 32)
    if HAS_GFNI_MASKS and not portable:
        matrix = ir.Constant(ir.VectorType(I64, 4), [_LOW_NIBBLE] * 2 + [_HIGH_NIBBLE] * 2)
        affine = _declare(builder.module, "llvm.x86.vgf2p8affineqb.256", v32, [v32, v32, I8])
        vals = builder.call(affine, [_shuffle(builder, raw, list(range(16)) * 2), builder.bitcast(matrix, v32),
                                     ir.Constant(I8, 0)])
    elif not portable:
        # AVX2 without GFNI: the 16 bytes in both halves (a vbroadcasti128 from memory), the upper half's 32-bit
        # words shifted right by 4 (one vpsrlvd), then & 15, where a vpsrlw, a vinserti128 and the and took three
        # vector instructions, two of them on Zen 3's two shuffle pipes (the insert on one only: one a cycle).
        # Zen 3, one thread, in cache, the decode tiles (session 53): Q5_0 2.05 -> 1.86 ns a block and row, Q5_1
        # 2.05 -> 1.93, Q4_1 1.53 -> 1.42.
        v8i = ir.VectorType(I32, 8)
        both = builder.bitcast(_shuffle(builder, raw, list(range(16)) * 2), v8i)
        both = builder.lshr(both, ir.Constant(v8i, [0] * 4 + [4] * 4))
        vals = builder.and_(builder.bitcast(both, v32), ir.Constant(v32, [15] * 32))
    else:
        lo = builder.and_(raw, ir.Constant(v16, [15] * 16))
        hi = builder.lshr(raw, ir.Constant(v16, [4] * 16))
        vals = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(I32, 32), list(range(32))))
    if offset:
        vals = builder.sub(vals, ir.Constant(ir.VectorType(I8, 32), [offset] * 32))
    return vals


def _fifth_bits(builder, qh, signed=False):
    """Q5's high bits: qh (i32, bit j for value j, little-endian) -> <32 x i8>, 16 where bit j is set, else 0
    (llama.cpp's bytes_from_bits_32: byte j // 8 of qh broadcast to value j, tested against its bit). signed
    (Q5_0): 0 where bit j is set, else 0xF0, so that ORed into a nibble n it makes the int8 q - 16 (n where q =
    n + 16, n - 16 where q = n), as llama.cpp's AVX2 ggml_vec_dot_q5_0_q8_0 does (andnot with 0xF0)."""
    v32 = ir.VectorType(I8, 32)
    qb = builder.bitcast(qh, ir.VectorType(I8, 4))
    sel = builder.shuffle_vector(qb, ir.Constant(qb.type, ir.Undefined),
                                 ir.Constant(ir.VectorType(I32, 32), [j // 8 for j in range(32)]))
    bit = ir.Constant(v32, [1 << (j % 8) for j in range(32)])
    is_set = builder.icmp_unsigned("==", builder.and_(sel, bit), bit)
    on, off = (0, -16) if signed else (16, 0)
    return builder.select(is_set, ir.Constant(v32, [on] * 32), ir.Constant(v32, [off] * 32))


def _shifted_fifth_bits(builder, qh):
    """Q5's high bits in Q5_BIT_ORDER "shifted" (value 4j + b's at bit 8b + 7 - j of qh, i32) -> <32 x i8> whose
    byte v has value v's bit at its top (bit 7; the other bits are qh's others): qh in 8 lanes of 32 bits, lane j
    shifted left by j (one vpsllvd)."""
    v8i = ir.VectorType(I32, 8)
    lanes = _shuffle(builder, builder.insert_element(ir.Constant(v8i, ir.Undefined), qh, ir.Constant(I32, 0)), [0] * 8)
    return builder.bitcast(builder.shl(lanes, ir.Constant(v8i, list(range(8)))), ir.VectorType(I8, 32))


def q5_values(builder, block, signed, portable=False):
    """A Q5 block without its header (4 bytes of fifth bits in Q5_BIT_ORDER, then 16 of nibbles, at byte address
    block, i64) -> its 32 values as <32 x i8>: q 0..31 (Q5_1), or signed the int8 q - 16 (Q5_0).

    Where the CPU has GFNI and AVX-512 BW (HAS_GFNI_MASKS), in two vector instructions and two loads: the nibbles
    as _weight_values takes them (a vbroadcasti128 and one vgf2p8affineqb), the 32 fifth bits loaded as a mask
    (kmovd) and 16 added where set (a masked vpaddb); signed, 16 taken off where clear. Elsewhere the bits come
    "shifted" (Q5_BIT_ORDER): the nibbles (a vbroadcasti128, a vpsrlvd, an and), the bits at the top of each byte by
    one vpsllvd (_shifted_fifth_bits), and one vpblendvb that takes, where a bit is set, the nibble (signed; else the
    nibble | 0xF0, n - 16 as int8) or the nibble | 16 (else the nibble): five vector instructions where llama.cpp's
    AVX2 form (bytes_from_bits_32: a vpshufb, an and, a compare, an andnot, an or) took seven. Zen 3, one thread,
    the decode tiles in cache (session 54): Q5_0 1.86 -> 1.62 ns a block and row, Q5_1 1.94 -> 1.81. The portable
    tiles (portable: plain IR, no x86 intrinsics) read the host's order with a compare and a select. The same bytes
    every way."""
    v16 = ir.VectorType(I8, 16)
    raw = _gep_load(builder, block, ir.Constant(I64, 4), v16, 1)
    qh = _gep_load(builder, block, ir.Constant(I64, 0), I32, 1)
    return q5_values_of(builder, raw, qh, signed, portable)


def q5_values_of(builder, raw, qh, signed, portable=False):
    """q5_values of a block's 16 bytes of nibbles raw (<16 x i8>) and its fifth bits qh (i32), in Q5_BIT_ORDER."""
    v32 = ir.VectorType(I8, 32)
    if Q5_BIT_ORDER == "shifted":
        return _blend_fifth(builder, _weight_values(builder, raw, True, 0, portable), _shifted_fifth_bits(builder, qh),
                            signed, portable)
    if portable or not HAS_GFNI_MASKS:
        return builder.or_(_weight_values(builder, raw, True, 0, portable), _fifth_bits(builder, qh, signed))
    nib = _weight_values(builder, raw, True, 0)
    is_set = builder.bitcast(qh, ir.VectorType(ir.IntType(1), 32))
    if signed:
        return builder.select(is_set, nib, builder.sub(nib, ir.Constant(v32, [16] * 32)))
    return builder.select(is_set, builder.add(nib, ir.Constant(v32, [16] * 32)), nib)


def _blend_fifth(builder, nib, top, signed, portable):
    """<32 x i8> nibbles n and `top` (each value's fifth bit at the top of its byte) -> q 0..31 (n | 16 where the
    bit is set), or signed the int8 q - 16 (n where set, else n - 16 = n | 0xF0): one vpblendvb, asked for by its
    intrinsic (written as a select, LLVM made a vpcmpgtb, an and and an or of it); portable, that select."""
    v32 = ir.VectorType(I8, 32)
    if signed:  # where the bit is set q - 16 = n, else n - 16 = n | 0xF0 as int8
        when_set, when_clear = nib, builder.or_(nib, ir.Constant(v32, [-16] * 32))
    else:
        when_set, when_clear = builder.or_(nib, ir.Constant(v32, [16] * 32)), nib
    if portable:
        return builder.select(builder.icmp_signed("<", top, ir.Constant(v32, [0] * 32)), when_set, when_clear)
    blend = _declare(builder.module, "llvm.x86.avx2.pblendvb", v32, [v32, v32, v32])  # top bit set: the second
    return builder.call(blend, [when_clear, when_set, top])


def _scale_pair(builder, addr):
    """An fp16 pair (d low, m high) at byte address addr -> (d, m) as float32 (exact: vcvtph2ps)."""
    pair = builder.fpext(_gep_load(builder, addr, ir.Constant(I64, 0), ir.VectorType(ir.HalfType(), 2), 2),
                         ir.VectorType(F32, 2))
    return tuple(builder.extract_element(pair, ir.Constant(I32, k)) for k in (0, 1))


def _pair_scales(b, wd, xd, i, scales):
    """A decode tile's scales of blocks i and i + 1 of one row (wd: its scales), for both at once: the two
    fp16 d (Q5_0, "half") or fp16 pairs d, m (Q5_1, Q4_1: "pair") in one load and one conversion, times the two
    activation scales (float32 at xd) in one vmulps. -> ((d_w d_x, m_w) of block i, the same of i + 1), m_w None
    for Q5_0. The same float32 products as one block at a time (each lane rounded alone)."""
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    per = 2 if scales == "half" else 4  # bytes of scales a block
    wbits = _gep_load(b, wd, b.mul(i, c64(per)), I32 if per == 2 else I64, per)
    # through a general register and moved over whole (see _scale_half)
    wbits = b.asm(ir.FunctionType(wbits.type, [wbits.type]), "", "=r,0", [wbits], False)
    halves = b.fpext(b.bitcast(wbits, ir.VectorType(ir.HalfType(), per)), ir.VectorType(F32, per))  # d (m) pairs
    dw = halves if per == 2 else _shuffle(b, halves, [0, 2])
    dx = _gep_load(b, xd, b.mul(i, c64(4)), ir.VectorType(F32, 2), 4)
    prod = b.fmul(dw, dx)
    return tuple((b.extract_element(prod, ir.Constant(I32, k)),
                  None if per == 2 else b.extract_element(halves, ir.Constant(I32, 2 * k + 1))) for k in (0, 1))


def _vector(b, values):
    """Scalars of one type -> a vector of them, in order."""
    vec = ir.Constant(ir.VectorType(values[0].type, len(values)), ir.Undefined)
    for k, v in enumerate(values):
        vec = b.insert_element(vec, v, ir.Constant(I32, k))
    return vec


def splat8(b, v):
    """A float32 in all 8 lanes of a vector."""
    v8f = ir.VectorType(F32, 8)
    return _shuffle(b, b.insert_element(ir.Constant(v8f, ir.Undefined), v, ir.Constant(I32, 0)), [0] * 8)


def _tile_scales(b, wd, wds, xd, i, rows, scales, buf, m_lanes=False):
    """A decode tile's scales of blocks i and i + 1 for all its rows (rows > 1; one row keeps _pair_scales'
    registers): each row's two fp16 d (Q5_0, "half") or fp16 pairs d, m (Q5_1, Q4_1: "pair") gathered 8 fp16 to a
    vector (4 rows, or 2), converted in one vcvtph2ps and multiplied in one vmulps by the activation scales (d_x of
    block i, i + 1 at each d_w; 1.0 at each m_w, which leaves it as it is), then stored to `buf` (4 float32 a row,
    on the stack) and read back through an address LLVM cannot see into, so that each block's fma takes its
    d_w d_x as a broadcast from memory (a load) where a vbroadcastss or vpermps of a register took a shuffle each
    (one thread in cache: Q5_0 1.09-1.37x, Q5_1 1.13-1.18x; streamed, where memory bounds it, the same). Only
    256-bit vectors: one 512-bit conversion in the loop (LLVM's choice for 16 fp16) shut half the vector
    ports and made the Q5_1 tile 1.2x slower. -> per row ((d_w d_x, m_w) of block i, the same of i + 1), d_w d_x
    as an 8-lane splat, m_w a float32 load (None for Q5_0); m_lanes (pairs, 4 rows): m_w instead the 4 rows' m_w of
    the block side by side, <4 x float>, shuffled out of the conversions (the same vector for every row). The same
    float32 products as one block at a time (each lane rounded alone)."""
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    per = 2 if scales == "half" else 4  # fp16 values a row for two blocks
    word = I32 if per == 2 else I64
    dx = _gep_load(b, xd, b.mul(i, c64(4)), ir.VectorType(F32, 2), 4)
    with_one = b.shuffle_vector(dx, ir.Constant(dx.type, [1.0, 1.0]), ir.Constant(ir.VectorType(I32, 4), [0, 1, 2, 3]))
    chunk = 8 // per
    converted = []
    for r0 in range(0, rows, chunk):
        n = min(chunk, rows - r0)
        vec = ir.Constant(ir.VectorType(word, n), ir.Undefined)
        for r in range(n):
            at = b.add(b.add(wd, b.mul(c64(r0 + r), wds)), b.mul(i, c64(per)))
            vec = b.insert_element(vec, _gep_load(b, at, c64(0), word, per), ir.Constant(I32, r))
        halves = b.fpext(b.bitcast(vec, ir.VectorType(ir.HalfType(), n * per)), ir.VectorType(F32, n * per))
        converted.append(halves)
        mult = _shuffle(b, with_one, ([0, 1] if per == 2 else [0, 2, 1, 2]) * n)  # d_x at each d_w, 1.0 at each m_w
        prod = b.fmul(halves, mult)
        b.store(prod, b.bitcast(b.gep(buf, [ir.Constant(I32, r0 * per)]), ir.PointerType(prod.type)), align=4)
    # the buffer's address through an empty asm that may have written memory: the loads below cannot be forwarded
    # from the stores above (they would become shuffles of prod again)
    addr = b.asm(ir.FunctionType(I64, [I64]), "", "=r,0,~{memory}", [b.ptrtoint(buf, I64)], True)

    def at(k):  # float k of the buffer
        return b.load(_ptr(b, b.add(addr, c64(4 * k)), F32), align=4)

    step = per // 2  # a block's floats in the buffer: d_w d_x (and m_w)
    if m_lanes:  # rows 0, 1 in converted[0] and 2, 3 in [1], each row d, m of block i, then of i + 1
        ms = b.shuffle_vector(converted[0], converted[1],
                              ir.Constant(ir.VectorType(I32, 8), [1, 5, 9, 13, 3, 7, 11, 15]))
        m4 = [_shuffle(b, ms, [0, 1, 2, 3]), _shuffle(b, ms, [4, 5, 6, 7])]
        return [tuple((splat8(b, at(per * r + step * k)), m4[k]) for k in (0, 1)) for r in range(rows)]
    return [tuple((splat8(b, at(per * r + step * k)), at(per * r + step * k + 1) if per == 4 else None)
                  for k in (0, 1)) for r in range(rows)]


def _scale_half(builder, addr):
    """An fp16 at byte address addr -> float32 (exact). Loaded into a general register (movzwl) and moved over
    whole (vmovd): a 2-byte load into a vector register is vpinsrw, which keeps the rest of its destination, and
    LLVM picked the decode tile's accumulator for it, chaining each block's scale to the previous block's sums
    (the Q5_0 tile ran ~1.2x the time of Q8_0's one byte per value)."""
    bits = builder.zext(_gep_load(builder, addr, ir.Constant(I64, 0), ir.IntType(16), 2), I32)
    bits = builder.asm(ir.FunctionType(I32, [I32]), "", "=r,0", [bits], False)  # stays in a general register
    pair = builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), 2)), ir.VectorType(F32, 2))
    return builder.extract_element(pair, ir.Constant(I32, 0))


# The weight forms unpack_row takes (its `form`)
UNPACK_Q5_1, UNPACK_Q5_0, UNPACK_Q4_1, UNPACK_Q5_1X8, UNPACK_Q5_0X8, UNPACK_Q4_1X8 = range(6)
UNPACK_Q4_1X16, UNPACK_Q5_1X16, UNPACK_Q5_0X16, UNPACK_Q8_0X16, UNPACK_Q4_0X16 = range(6, 11)


@intrinsic
def unpack_row(typingctx, src, scales, nb, form, qs, d, m):
    """One row of a Q5 or Q4_1 weight in its form for a decode (kernels/ggml.py _weight_args) unpacked as the
    prefill tiles of one byte per value read it: nb blocks at src -> 32 nb bytes at qs, and the block scales at
    `scales` -> float32 at d (and m), exactly. form: UNPACK_Q5_1 (20-byte blocks of fifth bits and nibbles, q
    0..31; fp16 pairs d, m), UNPACK_Q5_0 (the same blocks, the int8 q - 16; one fp16 d a block) or UNPACK_Q4_1
    (16 bytes of nibbles, q 0..15; fp16 pairs d, m); UNPACK_Q5_1X8 / UNPACK_Q5_0X8 / UNPACK_Q4_1X8: row r of a
    group of 8 in the "x8" form (weights/packed.py Q5_BIT_ORDERS, Q4_1Weight; src and scales at the group's start
    + 4 r bytes and + r scales: the row's 4 words of nibbles 32 bytes apart in each 160-byte block (Q4_1: 128), Q5's
    fifth bits 128 on, its scales 8 apart); UNPACK_Q4_1X16 / UNPACK_Q5_1X16 / UNPACK_Q5_0X16: row r of a group of 16
    in the "x16" form (its words 64 bytes apart in each 256-byte block, Q5's 320 with its fifth bits, "shifted",
    256 on; its scales 16 apart); UNPACK_Q8_0X16: row r of a group of 16 of Q8_0 in the "x16" form (its 8 words
    of q + 128, 64 bytes apart in each 512-byte block; fp16 d 16 apart) -> its int8 q and d; UNPACK_Q4_0X16: row r
    of a group of 16 of Q4_0 in the "x16" form (its words 64 bytes apart in each 256-byte block, as Q4_1's; fp16 d
    16 apart) -> its int8 q - 8 and d.
    All addresses int64."""
    sig = types.void(*([types.int64] * 7))

    def codegen(context, builder, signature, args):
        src_, sc, nb_, form_, qs_, d_, m_ = args
        fn = _define_unpack(builder.module)
        builder.call(fn, [src_, sc, nb_, form_, qs_, d_, m_])
        return context.get_dummy_value()
    return sig, codegen


def _define_unpack(module):
    """void f(src, scales, nb, form, qs, d, m): unpack_row's loop over the blocks."""
    name = "llama_ref_ggml_unpack_row"
    if name in module.globals:
        return module.globals[name]
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 7), name)
    fn.linkage = "internal"
    src, sc, nb, form, qs, d, m = fn.args
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    v32 = ir.VectorType(I8, 32)
    b = ir.IRBuilder(entry)
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)
    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    four = b.mul(i, c64(4))
    out = _ptr(b, b.add(qs, b.mul(i, c64(32))), v32)
    latch = fn.append_basic_block("latch")
    switch = b.switch(form, latch)  # one case per form, each on to the latch

    def case(f):
        block = fn.append_basic_block(f"form{f}")
        switch.add_case(ir.Constant(I64, f), block)
        return ir.IRBuilder(block)

    def block_at(b, size):  # the address of block i of `size` bytes (a row's own, or its group's)
        return b.add(src, b.mul(i, c64(size)))

    def row_nibbles(b, block, apart):  # the row's 16 bytes of nibbles: its 4 words in its group's block
        return b.bitcast(_vector(b, [_gep_load(b, block, c64(apart * j), I32, 1) for j in range(4)]),
                         ir.VectorType(I8, 16))

    def half(b, per):  # an fp16 d (per bytes a block) -> float32 at d
        b.store(_scale_half(b, b.add(sc, b.mul(i, c64(per)))), _ptr(b, b.add(d, four), F32), align=4)

    def pair(b, per=4):  # an fp16 pair d, m (per bytes a block) -> float32 at d and m
        dm = _scale_pair(b, b.add(sc, b.mul(i, c64(per))))
        b.store(dm[0], _ptr(b, b.add(d, four), F32), align=4)
        b.store(dm[1], _ptr(b, b.add(m, four), F32), align=4)

    def q5_scales(b, signed, per):  # Q5_0's fp16 d (per bytes a block), or Q5_1's pair d, m (2 per)
        if signed:
            half(b, per)
        else:
            pair(b, 2 * per)

    b = case(UNPACK_Q8_0X16)  # Q8_0's row: its 8 words from its group's 512-byte block, back to int8 q
    words = b.bitcast(_vector(b, [_gep_load(b, block_at(b, 512), c64(64 * j), I32, 1) for j in range(8)]), v32)
    b.store(b.xor(words, ir.Constant(v32, [-128] * 32)), out, align=1)
    half(b, 32)
    b.branch(latch)
    b = case(UNPACK_Q4_0X16)  # Q4_0's row: its 4 words of nibbles from its group's 256-byte block, int8 q - 8
    b.store(_weight_values(b, row_nibbles(b, block_at(b, 256), 64), True, 8), out, align=1)
    half(b, 32)
    b.branch(latch)
    b = case(UNPACK_Q4_1)  # a row's own 16 bytes of nibbles
    b.store(_weight_values(b, _gep_load(b, src, b.mul(i, c64(16)), ir.VectorType(I8, 16), 1), True, 0), out,
            align=1)
    pair(b)
    b.branch(latch)
    for f, size, apart, per in ((UNPACK_Q4_1X8, 128, 32, 32), (UNPACK_Q4_1X16, 256, 64, 64)):
        b = case(f)  # the row's nibbles from its group's block
        b.store(_weight_values(b, row_nibbles(b, block_at(b, size), apart), True, 0), out, align=1)
        pair(b, per)
        b.branch(latch)
    for f, signed in ((UNPACK_Q5_0X16, True), (UNPACK_Q5_1X16, False)):
        b = case(f)  # the row's nibbles and fifth bits ("shifted", whatever the host) from its group's 320-byte block
        block = block_at(b, 320)
        nib = _weight_values(b, row_nibbles(b, block, 64), True, 0)
        top = _shifted_fifth_bits(b, _gep_load(b, block, c64(256), I32, 1))
        b.store(_blend_fifth(b, nib, top, signed, not HAS_AVX2), out, align=1)
        q5_scales(b, signed, 32)
        b.branch(latch)
    for f, signed in ((UNPACK_Q5_0X8, True), (UNPACK_Q5_1X8, False)):
        b = case(f)  # the row's nibbles and fifth bits from its group's 160-byte block
        block = block_at(b, 160)
        b.store(q5_values_of(b, row_nibbles(b, block, 32), _gep_load(b, block, c64(128), I32, 1), signed), out,
                align=1)
        q5_scales(b, signed, 16)
        b.branch(latch)
    for f, signed in ((UNPACK_Q5_0, True), (UNPACK_Q5_1, False)):
        b = case(f)  # a row's own 20-byte blocks
        b.store(q5_values(b, block_at(b, 20), signed), out, align=1)
        q5_scales(b, signed, 2)
        b.branch(latch)
    b = ir.IRBuilder(latch)
    i1 = b.add(i, c64(1))
    b.cbranch(b.icmp_signed("<", i1, nb), loop, done)
    i.add_incoming(c64(0), entry)
    i.add_incoming(i1, latch)
    b = ir.IRBuilder(done)
    b.ret_void()
    return fn


def lanes_portable(builder, w, x, signed):
    """<32 x i8> w, x -> <8 x i32>, lane j = sum of products 4j .. 4j+3: widen to int32, multiply, add
    neighbours twice (on x86, LLVM makes vpmovsxbd + vpmulld of this)."""
    v32_16, v16_32 = ir.VectorType(I16, 32), ir.VectorType(I32, 16)
    w16 = builder.sext(w, v32_16) if signed else builder.zext(w, v32_16)
    x16 = builder.sext(x, v32_16)
    even, odd = list(range(0, 32, 2)), list(range(1, 32, 2))

    def products(idx):
        return builder.mul(builder.sext(_shuffle(builder, w16, idx), v16_32), builder.sext(_shuffle(builder, x16, idx),
                                                                                            v16_32))
    pairs = builder.add(products(even), products(odd))  # (16,) int32
    return builder.add(_shuffle(builder, pairs, list(range(0, 16, 2))), _shuffle(builder, pairs, list(range(1, 16, 2))))


def pairs_u8s8(builder, u, s):
    """vpmaddubsw: <32 x i8> u (unsigned) and s (signed) -> <16 x i16>, u[2i] s[2i] + u[2i+1] s[2i+1]
    saturated to int16. Exact where |u| <= 128 and |s| <= 127 (2 * 128 * 127 = 32512 < 32767); every caller
    stays inside that (see lanes_u8s8)."""
    v16_16 = ir.VectorType(I16, 16)
    v32 = ir.VectorType(I8, 32)
    return builder.call(_declare(builder.module, "llvm.x86.avx2.pmadd.ub.sw", v16_16, [v32, v32]), [u, s])


def pairs_u8s8_512(builder, u, s):
    """vpmaddubsw on 512-bit registers (AVX-512 BW): <64 x i8> u, s -> <32 x i16>, pairs_u8s8 of each half."""
    v32_16, v64 = ir.VectorType(I16, 32), ir.VectorType(I8, 64)
    return builder.call(_declare(builder.module, "llvm.x86.avx512.pmaddubs.w.512", v32_16, [v64, v64]), [u, s])


def madd16(builder, a, b):
    """vpmaddwd: <16 x i16> a, b -> <8 x i32>, a[2i] b[2i] + a[2i+1] b[2i+1] (exact unless all four are -32768)."""
    v16_16 = ir.VectorType(I16, 16)
    return builder.call(_declare(builder.module, "llvm.x86.avx2.pmadd.wd", ir.VectorType(I32, 8), [v16_16] * 2),
                        [a, b])


def sign8(builder, s, by):
    """vpsignb: <32 x i8> s with the sign of `by`: -s where by < 0, 0 where by == 0, s where by > 0. sign8(w, w)
    is |w|, with |-128| = 128 as an unsigned byte."""
    v32 = ir.VectorType(I8, 32)
    return builder.call(_declare(builder.module, "llvm.x86.avx2.psign.b", v32, [v32, v32]), [s, by])


def lanes_u8s8(builder, u, s, isa):
    """<32 x i8> u (unsigned bytes) and s (signed bytes) -> <8 x i32>, lane j = the sum of products 4j .. 4j+3,
    in one instruction with VNNI (vpdpbusd), in two with AVX2 (vpmaddubsw, then vpmaddwd by ones).

    AVX2 sums two products in int16 with saturation, so every use is bounded here (s is an activation of
    -127..127: ggml's Q8_0 / Q8_1 / Q8_K quantization never gives -128): unsigned weights Q4_1 0..15 and
    Q5_1 0..31 (at most 2 * 31 * 127 = 7874), Q4_0's nibbles 0..15 before their offset 8 is taken off
    (3810), Q8_0 / Q5_0's signed values by ggml's sign trick, |w| <= 128 times x with w's sign (32512), and
    the ones that sum the activations (254); the K-quants (kernels/ggml_kquants.py) Q4_K 0..15, Q5_K 0..31,
    Q6_K 0..63 (16002). All under 32767: the int16 sums are exact, and so the int32 lanes."""
    if isa == "vnni":
        return lanes_u8s8_onto(builder, ir.Constant(ir.VectorType(I32, 8), [0] * 8), u, s, isa)
    return madd16(builder, pairs_u8s8(builder, u, s), ir.Constant(ir.VectorType(I16, 16), [1] * 16))


def lanes_u8s8_onto(builder, acc, u, s, isa):
    """acc (<8 x i32>) + lanes_u8s8(u, s). With VNNI the one vpdpbusd adds onto acc: a tile whose lanes start from
    a correction (-128 sum(w) of Q8_0's (x + 128) form, -8 sum(x) of Q4_0's nibbles) then needs no zeroed register
    and no vpsubd per pair. The same integers: nothing overflows int32 (see lanes_u8s8)."""
    if isa == "vnni":
        v8 = ir.VectorType(I32, 8)
        fn = _declare(builder.module, "llvm.x86.avx512.vpdpbusd.256", v8, [v8, v8, v8])
        return builder.call(fn, [acc, builder.bitcast(u, v8), builder.bitcast(s, v8)])
    return builder.add(acc, lanes_u8s8(builder, u, s, isa))


def _offset_lanes(builder, x, offset, isa):
    """offset * (the sums of x's 4-value groups) as <8 x i32>, once per activation block: with VNNI or AVX2
    the nibbles of Q4_0 enter the unsigned side (0..15) and the offset 8 is taken off afterwards, exactly,
    instead of applying each weight's sign to x."""
    ones = ir.Constant(ir.VectorType(I8, 32), [1] * 32)
    sums = lanes_u8s8(builder, ones, x, isa)
    return builder.mul(sums, ir.Constant(ir.VectorType(I32, 8), [offset] * 8))


def _hsum8(builder, acc):
    """hsum_float_8: (lane i + lane i+4), then (0 + 2) + (1 + 3)."""
    r = builder.fadd(_shuffle(builder, acc, [0, 1, 2, 3]), _shuffle(builder, acc, [4, 5, 6, 7]))
    r = builder.fadd(_shuffle(builder, r, [0, 1]), _shuffle(builder, r, [2, 3]))
    first, second = (builder.extract_element(r, ir.Constant(I32, i)) for i in (0, 1))
    return builder.fadd(first, second)


def _combine(builder, a, b):
    """<8 x i32> a, b -> the sums of neighbouring pairs, a's four then b's four (vphaddd)."""
    evens, odds = list(range(0, 16, 2)), list(range(1, 16, 2))
    v8 = ir.Constant(ir.VectorType(I32, 8), evens)
    return builder.add(builder.shuffle_vector(a, b, v8), builder.shuffle_vector(a, b, ir.Constant(v8.type, odds)))


def opaque(builder, v):
    """v, through an empty inline asm that LLVM cannot see into: a splat it would otherwise fold back into a
    scalar product and a broadcast (fmul(splat a, splat b) -> splat(a * b), two instructions a pair where the
    vector product is one)."""
    return builder.asm(ir.FunctionType(v.type, [v.type]), "", "=x,0", [v], False)


def _close_loop(b, i, nb, entry, loop, done, carried, head=None):
    """End a loop over blocks i = 0 .. nb - 1: i + 1, back to `loop` while below nb, else on to `done`. Each
    (phi, next value, zero) in `carried` gets its incomings (zero from entry, the next value from the loop).
    A loop of several blocks (an inner loop inside it) goes back to `head`, its first block, from `loop`, its
    last (the one b is in), where i and the carried phis live in head.
    -> a builder in `done` and the values leaving the loop, in carried's order (phis first, as LLVM requires)."""
    i1 = b.add(i, ir.Constant(I64, 1))
    b.cbranch(b.icmp_signed("<", i1, nb), head or loop, done)
    i.add_incoming(ir.Constant(I64, 0), entry)
    i.add_incoming(i1, loop)
    for phi, val, zero in carried:
        phi.add_incoming(zero, entry)
        phi.add_incoming(val, loop)
    b = ir.IRBuilder(done)
    finals = []
    for _, val, zero in carried:
        phi = b.phi(val.type)
        phi.add_incoming(zero, entry)
        phi.add_incoming(val, loop)
        finals.append(phi)
    return b, finals


def _close_pair_loop(b, i, nb, blocks, carried, second, step, first, zeros):
    """End a loop that takes blocks i and i + 1 an iteration (the builder b in `loop`, block i's products made:
    first = (accs, mins)), then block nb - 1 alone where nb is odd. blocks: (entry, loop, after, tail, done); the
    entry branches to `loop` when nb > 1, else to `after`. carried: the loop's phis (accs, then mins), zeros their
    values before any block. second(b, accs, mins) -> (accs, mins) emits block i + 1's products, step(b, i, accs,
    mins) -> (accs, mins) any one block's (the odd last).
    -> a builder in `done` and the values leaving, in carried's order."""
    entry, loop, after, tail, done = blocks
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    n_acc = len(first[0])
    accs2, mins2 = second(b, list(first[0]), list(first[1]))
    vals = list(accs2) + list(mins2)
    i2 = b.add(i, c64(2))
    b.cbranch(b.icmp_signed("<", b.add(i2, c64(1)), nb), loop, after)  # two more blocks to go
    loop_end = b.block
    i.add_incoming(c64(0), entry)
    i.add_incoming(i2, loop_end)
    for phi, val, zero in zip(carried, vals, zeros):
        phi.add_incoming(zero, entry)
        phi.add_incoming(val, loop_end)
    b = ir.IRBuilder(after)
    i_n = b.phi(I64)
    i_n.add_incoming(c64(0), entry)
    i_n.add_incoming(i2, loop_end)
    mid = []
    for val, zero in zip(vals, zeros):
        phi = b.phi(val.type)
        phi.add_incoming(zero, entry)
        phi.add_incoming(val, loop_end)
        mid.append(phi)
    b.cbranch(b.icmp_signed("<", i_n, nb), tail, done)
    b = ir.IRBuilder(tail)
    accs3, mins3 = step(b, i_n, mid[:n_acc], mid[n_acc:])
    last = list(accs3) + list(mins3)
    b.branch(done)
    tail_end = b.block
    b = ir.IRBuilder(done)
    finals = []
    for m, val in zip(mid, last):
        phi = b.phi(val.type)
        phi.add_incoming(m, after)
        phi.add_incoming(val, tail_end)
        finals.append(phi)
    return b, finals


def _define_tile(module, kind, rows, acts, isa):
    """void f(w, ws, wd, wm, wds, x, xstride, xd, xs, xds, nb, out, ostride): the dot products of `rows`
    weight rows (from byte address w, ws bytes apart; scales wd and mins wm float32, wds bytes apart) with
    `acts` activation rows (int8 from x, xstride bytes apart; scales xd and sums xs, xds bytes apart), nb
    blocks each -> out[a * ostride + 4 r] float32. Each (row, activation) pair keeps its own accumulators and
    sums in exactly the order of a lone dot product; the tile only shares the loads (and, with VNNI or AVX2,
    the work that depends on one side only) between pairs. isa: "vnni", "avx2" or "portable" (lanes_u8s8).

    8-lane kinds: acc[r][a] = fma(d_w d_x, lanes, acc) per block, hsum_float_8 (+ the mins' sum) at the end.
    Repacked Q4_0 (rows = 8): the 8 rows' integer sums gathered into one vector, one float32 lane per row
    (with VNNI or AVX2 _define_q4_0r builds them so from the start); its scales come repacked too (REPACKED_SCALES:
    wd points at the tile's 8 fp16 scales of block 0, the next block's 16 bytes on)."""
    if kind in X8_KINDS:  # 8 rows in the "x8" form, one activation row (a decode's)
        name = f"llama_ref_ggml_tile_{kind}_{isa if isa == 'portable' else 'avx2'}"
        return module.globals.get(name) or _define_x8(module, name, kind, isa == "portable")
    if kind in X16_KINDS:  # 16 rows in the "x16" form, one activation row
        name = f"llama_ref_ggml_tile_{kind}_{isa}"
        return module.globals.get(name) or _define_x16(module, name, isa, kind)
    if kind == "q4_0x16":  # Q4_0's 16 rows in the "x16" form, by 1 or ACTS activation rows
        name = f"llama_ref_ggml_tile_{kind}_{acts}_{isa}"
        return module.globals.get(name) or _define_q4_0x16(module, name, acts, isa)
    if isa == "vnni512" and (not KINDS[kind][4] or acts % 2 or KINDS[kind][1] == "q5") and kind != "q4_0r":
        isa = "vnni"  # the 512-bit form pairs activation rows: 8-lane byte tiles of an even count only
    name = f"llama_ref_ggml_tile_{kind}_{rows}x{acts}_{isa}"
    if name in module.globals:
        return module.globals[name]
    if kind == "q4_0r" and isa in ("avx2", "vnni", "vnni512"):
        # VNNI too: its generic 8-row tile (8 x 8-lane sums, then a tree of horizontal adds per block) ran a 1B
        # prefill at 0.5x and a decode at 0.8x this one's on an AVX-512 AMD EPYC (Zen 4, session 34: 45-48 against
        # 94-97 tok/s at 128 tokens, 18-20 against 22-28 tok/s decoding). The integers are the same either way.
        return _define_q4_0r(module, name, acts, isa)
    # "vnni512": the "vnni" tile with two activation rows in each 512-bit vector (see host_prefers_512)
    wide, isa = isa == "vnni512", "vnni" if isa == "vnni512" else isa
    block, nibbles, signed, offset, lanes8, has_min, scales = KINDS[kind]
    if lanes8 and isa == "avx2" and acts > SPLIT_ACTS and acts % SPLIT_ACTS == 0:
        return _define_split(module, name, kind, rows, acts, isa)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 13), name)
    fn.linkage = "internal"
    w, ws, wd, wm, wds, x, xstride, xd, xs, xds, nb, out, ostride = fn.args
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    v8f, v8i, v32 = ir.VectorType(F32, 8), ir.VectorType(I32, 8), ir.VectorType(I8, 32)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero8 = ir.Constant(v8f, [0.0] * 8)
    fma_s = _declare(module, "llvm.fma.f32", F32, [F32] * 3)
    fma_v = _declare(module, "llvm.fma.v8f32", v8f, [v8f] * 3)
    v16f, v16i = ir.VectorType(F32, 16), ir.VectorType(I32, 16)
    fma_w = _declare(module, "llvm.fma.v16f32", v16f, [v16f] * 3) if wide else None
    dpbusd_w = _declare(module, "llvm.x86.avx512.vpdpbusd.512", v16i, [v16i] * 3) if wide else None
    # A decode's tile of fp16 scales (Q5_0, Q5_1, Q4_1; rows by one activation row) takes two blocks an iteration
    # (then the last block of an odd count alone): the loop's pointer steps, the requests ahead and the scales'
    # load and conversion (_tile_scales) shared by two blocks. Each block's fma follows the last in block order, as
    # one at a time: the same sums.
    pairs = acts == 1 and scales in ("pair", "half")
    after, tail = (fn.append_basic_block("after"), fn.append_basic_block("tail")) if pairs else (None, None)
    b = ir.IRBuilder(entry)
    # An AVX2 prefill tile of float32 scales takes each pair's d_w d_x from a table made before its loop (one
    # vmulps for 8 blocks of a pair), not a vmulps a block and pair in the loop: vpsignb, vmulps and the fma share
    # Zen 3's two pipes FP0 / FP1, where 12 + 8 + 8 of them a block bound the 4 x 2 tile.
    table = None
    if lanes8 and not wide and acts > 1 and not scales and isa == "avx2":
        b, table = _pair_products(b, fn, wd, wds, xd, xds, nb, rows, acts)
        entry = b.block  # the loop's way in
    ahead = _rows_ahead(b, ws, rows)
    scale_buf = b.alloca(F32, size=4 * rows) if pairs and rows > 1 else None
    if pairs:  # into the loop with two blocks to go, else to the last one alone (or none)
        b.cbranch(b.icmp_signed(">", nb, c64(1)), loop, after)
    else:
        b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)

    n_acc = acts if not lanes8 else rows * acts // (2 if wide else 1)  # repacked Q4_0: one (8 rows) per activation
    # A decode's 4-row tile of fp16 pairs (Q4_1, Q5_1): the four rows' mins in the lanes of one <4 x float>, one fma
    # of 4 lanes a block, each lane its row's own chain (the same float32 sums), where four scalar fmas and four
    # loads of m_w took longer than the rest of the mins' work (a timing probe without them: Zen 3, one thread, in
    # cache, Q5_1 1.81 -> 1.54 ns a block and row, Q4_1 1.45 -> 1.20)
    vec_mins = has_min and pairs and rows == 4
    v4f = ir.VectorType(F32, 4)
    fma_4 = _declare(module, "llvm.fma.v4f32", v4f, [v4f] * 3) if vec_mins else None
    n_min = 1 if vec_mins else rows * acts if has_min else 0
    zero = ir.Constant(F32, 0.0)

    def block_step(b, i, accs, mins, given=None):
        """Block i's products added to accs (and mins): -> the new accs, mins. given (a decode's tile): each
        row's d_w d_x (an 8-lane splat) and m_w of the block, from _tile_scales, instead of loading them here."""
        four = b.mul(i, c64(4))

        # Signed 8-bit weights (Q8_0, Q5_0): VNNI takes (x + 128) as unsigned bytes times w, less 128 sum(w) per
        # lane; AVX2 cannot (255 * 128 twice saturates int16) and takes ggml's sign trick, |w| times x with w's
        # sign. Q4_0's nibbles enter both unsigned, less 8 sum(x). A decode's Q5_0 with VNNI (q5_off): its q 0..31
        # unsigned times x, added by vpdpbusd onto -16 sum(x) (a vpdpbusd of 16 times x, once a block for all
        # rows), where the x + 128 form took four vector instructions more a block (an xor, a vpdpbusd for sum(w),
        # a shift, a subtraction) and a subtraction after the products one more a row (in cache 1.04-1.11x).
        fast = isa != "portable"
        signed_bytes = signed and nibbles is not True  # Q8_0's bytes, Q5_0's q - 16; not Q4_0's nibbles
        q5_off = isa == "vnni" and signed and nibbles == "q5"
        by_x128 = isa == "vnni" and signed_bytes and not q5_off
        by_sign = isa == "avx2" and signed_bytes
        unsigned_offset = fast and offset
        # the activation side, once per block: quants, scale, sum, and what the integer instructions need of x alone
        xq, xdv, xsv, x_off, x_u8 = [], [], [], [], []
        for a_ in range(acts):
            xa = b.add(x, b.mul(c64(a_), xstride))
            xq.append(_gep_load(b, xa, b.mul(i, c64(32)), v32, 1))
            xdv.append(_gep_load(b, b.add(xd, b.mul(c64(a_), xds)), four, F32, 4) if table is None else None)
            xsv.append(_gep_load(b, b.add(xs, b.mul(c64(a_), xds)), four, F32, 4) if has_min else None)
            x_off.append(_offset_lanes(b, xq[a_], offset, isa) if unsigned_offset else None)
            x_u8.append(b.xor(xq[a_], ir.Constant(v32, [-128] * 32)) if by_x128 else None)
        # the weight side, once per block: emitted row by row next to the row's products (below), so that LLVM's
        # schedule keeps one row's values live at a time
        wvals, w_corr, w_abs, wdv, wmv = [None] * rows, [None] * rows, [None] * rows, [None] * rows, [None] * rows

        def weight_row(r):
            row, at = b.add(w, b.mul(c64(r), ws)), b.mul(i, c64(block))
            if nibbles == "q5":  # 4 bytes of fifth bits, then 16 of nibbles
                wvals[r] = q5_values(b, b.add(row, at), signed and not q5_off, portable=not fast)
            else:
                raw = _gep_load(b, row, at, ir.VectorType(I8, block), 1)
                wvals[r] = _weight_values(b, raw, nibbles, 0 if unsigned_offset else offset, portable=not fast)
            ones = ir.Constant(v32, [1] * 32)
            w_corr[r] = b.shl(lanes_u8s8(b, ones, wvals[r], isa), ir.Constant(v8i, [7] * 8)) if by_x128 else None
            w_abs[r] = sign8(b, wvals[r], wvals[r]) if by_sign else None
            if given is not None:
                wmv[r] = given[r][1]
            elif scales == "pair":
                wdv[r], wmv[r] = _scale_pair(b, b.add(b.add(wd, b.mul(c64(r), wds)), four))
            elif scales == "half":
                wdv[r] = _scale_half(b, b.add(b.add(wd, b.mul(c64(r), wds)), b.mul(i, c64(2))))
            elif lanes8 and table is None:
                wdv[r] = _gep_load(b, b.add(wd, b.mul(c64(r), wds)), four, F32, 4)

        def lanes(r, a_):
            if not fast:
                return lanes_portable(b, wvals[r], xq[a_], signed)
            if q5_off:  # sum (q - 16) x = -sum 16 x + sum q x, lane by lane: the same integers
                sixteen = ir.Constant(v32, [16] * 32)
                return lanes_u8s8_onto(b, b.neg(lanes_u8s8(b, sixteen, xq[a_], isa)), wvals[r], xq[a_], isa)
            if by_x128:  # (VNNI only) from -128 sum(w), onto which vpdpbusd adds (x + 128) w
                return lanes_u8s8_onto(b, b.neg(w_corr[r]), x_u8[a_], wvals[r], isa)
            if by_sign:
                return lanes_u8s8(b, w_abs[r], sign8(b, xq[a_], wvals[r]), isa)
            if unsigned_offset and isa == "vnni":  # from -8 sum(x), onto which vpdpbusd adds the nibbles' products
                return lanes_u8s8_onto(b, b.neg(x_off[a_]), wvals[r], xq[a_], isa)
            if unsigned_offset:
                return b.sub(lanes_u8s8(b, wvals[r], xq[a_], isa), x_off[a_])
            return lanes_u8s8(b, wvals[r], xq[a_], isa)  # unsigned weights as they stand

        new_accs, new_mins = [None] * n_acc, [None] * len(mins)
        if wide:  # row by row, each row's products with the activation rows two at a time: lanes 0-7 the pair
            # (r, a), lanes 8-15 (r, a + 1), each lane the 8-lane tile's same integers and the same fma chain
            def join(u, v):  # two 8-lane (or 32-byte) vectors -> one of twice the lanes, u's first
                return b.shuffle_vector(u, v, ir.Constant(ir.VectorType(I32, 2 * u.type.count),
                                                          list(range(2 * u.type.count))))
            pairs_x = [join(x_u8[a_] if by_x128 else xq[a_], x_u8[a_ + 1] if by_x128 else xq[a_ + 1])
                       for a_ in range(0, acts, 2)]
            xsplat = [opaque(b, join(splat8(b, xdv[a_]), splat8(b, xdv[a_ + 1]))) for a_ in range(0, acts, 2)]
            for r in range(rows):
                weight_row(r)
                w2 = b.bitcast(join(wvals[r], wvals[r]), v16i)
                dw2 = join(splat8(b, wdv[r]), splat8(b, wdv[r]))
                for p in range(acts // 2):
                    if by_x128:  # from -128 sum(w), onto which vpdpbusd adds (x + 128) w
                        start, u, sv = b.neg(join(w_corr[r], w_corr[r])), b.bitcast(pairs_x[p], v16i), w2
                    elif unsigned_offset:  # from -8 sum(x), onto which it adds the nibbles' products
                        start, u, sv = b.neg(join(x_off[2 * p], x_off[2 * p + 1])), w2, b.bitcast(pairs_x[p], v16i)
                    else:  # unsigned weights as they stand
                        start, u, sv = ir.Constant(v16i, [0] * 16), w2, b.bitcast(pairs_x[p], v16i)
                    lanes_w = b.call(dpbusd_w, [start, u, sv])
                    scale = b.fmul(dw2, xsplat[p])  # float32 d_w * d_x
                    k = r * (acts // 2) + p
                    new_accs[k] = b.call(fma_w, [scale, b.sitofp(lanes_w, v16f), accs[k]])
        elif lanes8:  # row by row, each row's products with every activation row
            # d_x as a vector LLVM cannot see is a splat: d_w * d_x then takes one vmulps of two broadcasts
            # (the same float32 product in every lane) instead of vmulss + vbroadcastss
            xsplat = [opaque(b, splat8(b, v)) for v in xdv] if table is None else None
            for r in range(rows):
                weight_row(r)
                for a_ in range(acts):
                    # float32 d_w * d_x
                    if table is not None:
                        scale = splat8(b, _gep_load(b, table, _pair_at(b, r, a_, acts, nb, four), F32, 4))
                    else:
                        scale = given[r][0] if given is not None else b.fmul(splat8(b, wdv[r]), xsplat[a_])
                    k = r * acts + a_
                    new_accs[k] = b.call(fma_v, [scale, b.sitofp(lanes(r, a_), v8f), accs[k]])
        else:
            for r in range(rows):
                weight_row(r)
            for a_ in range(acts):
                sums = [lanes(r, a_) for r in range(rows)]
                while len(sums) > 1:  # 8 vectors of 8 lanes -> one vector of the 8 rows' sums (exact integers)
                    sums = [_combine(b, sums[j], sums[j + 1]) for j in range(0, len(sums), 2)]
                rscales = _repacked_scales(b, wd, i)
                new_accs[a_] = b.call(fma_v, [b.fmul(rscales, splat8(b, xdv[a_])), b.sitofp(sums[0], v8f), accs[a_]])
        for a_ in range(acts if has_min else 0):
            if vec_mins:  # m_w of the 4 rows from _tile_scales, or gathered here (the odd last block's own loads)
                m4 = given[0][1] if given is not None else _vector(b, wmv)
                new_mins[0] = b.call(fma_4, [m4, _vector(b, [xsv[a_]] * 4), mins[0]])
                continue
            for r in range(rows):
                m = wmv[r] if scales == "pair" else _gep_load(b, b.add(wm, b.mul(c64(r), wds)), four, F32, 4)
                k = r * acts + a_
                new_mins[k] = b.call(fma_s, [m, xsv[a_], mins[k]])
        return new_accs, new_mins

    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    accs = [b.phi(v16f if wide else v8f) for _ in range(n_acc)]
    mins = [b.phi(v4f if vec_mins else F32) for _ in range(n_min)]
    if acts == 1:
        _prefetch_ahead(b, w, ws, wd, wds, wm if has_min and not scales else None, i, rows, block, ahead,
                        16 if kind == "q4_0r" else 2 * rows if scales == "half" else 4 * rows,
                        2 if pairs else 1, PREFETCH_INTO.get(kind, "l1"))
    # each row's (block i's, block i + 1's) scales
    if pairs and rows > 1:
        given = _tile_scales(b, wd, wds, xd, i, rows, scales, scale_buf, m_lanes=vec_mins)
    elif pairs:  # one row: its pair of scales stays in registers (two broadcasts; no stack)
        g = _pair_scales(b, wd, xd, i, scales)
        given = [tuple((splat8(b, s), m) for s, m in g)]
    else:
        given = None
    new_accs, new_mins = block_step(b, i, accs, mins, [g[0] for g in given] if pairs else None)
    zeros = [ir.Constant(v16f, [0.0] * 16) if wide else zero8] * n_acc + \
        [ir.Constant(v4f, [0.0] * 4) if vec_mins else zero] * n_min
    if pairs:
        b, ends = _close_pair_loop(b, i, nb, (entry, loop, after, tail, done), accs + mins,
                                   lambda b, accs, mins: block_step(b, b.add(i, c64(1)), accs, mins,
                                                                    [g[1] for g in given]),
                                   block_step, (new_accs, new_mins), zeros)
    else:
        b, ends = _close_loop(b, i, nb, entry, loop, done, list(zip(accs + mins, new_accs + new_mins, zeros)))
    finals, final_mins = ends[:len(accs)], ends[len(accs):]
    for a_ in range(acts):
        row_out = b.add(out, b.mul(c64(a_), ostride))
        if not lanes8:
            b.store(finals[a_], _ptr(b, row_out, v8f), align=4)
            continue
        for r in range(rows):
            k = r * acts + a_
            if wide:  # the pair's half of its vector
                half = list(range(8 * (a_ % 2), 8 * (a_ % 2) + 8))
                total = _hsum8(b, _shuffle(b, finals[r * (acts // 2) + a_ // 2], half))
            else:
                total = _hsum8(b, finals[k])
            if has_min:
                m_sum = b.extract_element(final_mins[0], ir.Constant(I32, r)) if vec_mins else final_mins[k]
                total = b.fadd(total, m_sum)  # the offsets' float32 sum, added last
            b.store(total, _ptr(b, b.add(row_out, c64(4 * r)), F32), align=4)
    b.ret_void()
    return fn


def _pair_at(b, r, a_, acts, nb, four):
    """The byte offset of block i's product (four: 4 i) of pair (r, a_) in _pair_products' table."""
    return b.add(b.mul(ir.Constant(I64, 4 * (r * acts + a_)), nb), four)


def _pair_products(b, fn, wd, wds, xd, xds, nb, rows, acts):
    """The float32 d_w d_x of every (row, activation row) pair and block of a tile, in a table on the stack:
    pair (r, a)'s nb products from byte 4 nb (r acts + a) on, 8 blocks a vmulps, then the last nb % 8 one by one
    (the same products: one rounding each). b: a builder in the tile's entry.
    -> (a builder in a new block after the table's loops, the table's address as an i64)."""
    v8f = ir.VectorType(F32, 8)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    table = b.ptrtoint(b.alloca(F32, size=b.mul(nb, c64(rows * acts))), I64)
    whole = b.sub(nb, b.and_(nb, c64(7)))
    start = b.block
    vec, tail, scal, out = (fn.append_basic_block(n) for n in ("table8", "table_tail", "table1", "tabled"))
    b.cbranch(b.icmp_signed(">", whole, c64(0)), vec, tail)

    def products(b, i, ty):
        four = b.mul(i, c64(4))
        for r in range(rows):
            dw = _gep_load(b, b.add(wd, b.mul(c64(r), wds)), four, ty, 4)
            for a_ in range(acts):
                dx = _gep_load(b, b.add(xd, b.mul(c64(a_), xds)), four, ty, 4)
                b.store(b.fmul(dw, dx), _ptr(b, b.add(table, _pair_at(b, r, a_, acts, nb, four)), ty), align=4)

    b = ir.IRBuilder(vec)
    i = b.phi(I64)
    products(b, i, v8f)
    i8 = b.add(i, c64(8))
    b.cbranch(b.icmp_signed("<", i8, whole), vec, tail)
    i.add_incoming(c64(0), start)
    i.add_incoming(i8, vec)
    b = ir.IRBuilder(tail)
    b.cbranch(b.icmp_signed("<", whole, nb), scal, out)
    b = ir.IRBuilder(scal)
    j = b.phi(I64)
    products(b, j, F32)
    j1 = b.add(j, c64(1))
    b.cbranch(b.icmp_signed("<", j1, nb), scal, out)
    j.add_incoming(whole, tail)
    j.add_incoming(j1, scal)
    return ir.IRBuilder(out), table


# Activation rows per pass of an 8-lane AVX2 tile. 16 ymm registers: a 4 x 4 tile's 16 accumulators alone
# fill them, and LLVM spilled ~30 of them a block (Q8_0, 4 x 4: 179 instructions a block, 32 stack
# loads and stores); 4 rows x 2 activations, as llama.cpp's tinyBLAS_Q0_AVX runs on AVX2 (gemm4xN<2>), keeps 8
# accumulators, and a 4 x 4 call makes two such passes over the blocks, the second reading the 4 weight rows
# again from L1. Each output's sums are untouched: the same fma chain over the blocks, in the same order.
SPLIT_ACTS = 2


def _define_split(module, name, kind, rows, acts, isa):
    """The `rows` x `acts` tile as acts / SPLIT_ACTS calls of the rows x SPLIT_ACTS tile, one after the other
    (arguments as _define_tile's)."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 13), name)
    fn.linkage = "internal"
    w, ws, wd, wm, wds, x, xstride, xd, xs, xds, nb, out, ostride = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    part = _define_tile(module, kind, rows, SPLIT_ACTS, isa)
    for a0 in range(0, acts, SPLIT_ACTS):
        c = ir.Constant(I64, a0)
        b.call(part, [w, ws, wd, wm, wds, b.add(x, b.mul(c, xstride)), xstride, b.add(xd, b.mul(c, xds)),
                      b.add(xs, b.mul(c, xds)), xds, nb, b.add(out, b.mul(c, ostride)), ostride])
    b.ret_void()
    return fn


# How far ahead a decode tile asks for the weights, in bytes (rounded up to whole tiles).
AHEAD_BYTES = 4096  # 2048 and 8192 measured no faster (Q8_0, Q5_1, repacked Q4_0 streamed, one thread)
# Which cache a decode tile's requests fill, by kind (else L1, prefetcht0). Q8_0, the most bytes per value, into L2
# (prefetcht1): on Intel a request into L1 holds one of the core's ~16 fill buffers until its line arrives, one into
# L2 frees it sooner, so more lines are in flight (as the K-quants' decode tiles, kernels/ggml_kquants.py). Sapphire
# Rapids-class Xeon, 2 threads, model decode alternated (session 50): the default model's Q8_0 118-120 -> 127-142
# tok/s, the 1B shape's 16.3-16.4 -> 17.8; Q4_0 (repacked), Q4_1, Q5_0, Q5_1 no faster or slower, so they keep L1.
PREFETCH_INTO = {"q8_0": "l2"}


def _rows_ahead(builder, ws, rows):
    """The rows between a tile and the one it prefetches: `rows` times the tiles in AHEAD_BYTES (at least 1),
    rows ws bytes apart (i64)."""
    tile = builder.mul(ws, ir.Constant(I64, rows))
    tiles = builder.sdiv(builder.add(ir.Constant(I64, AHEAD_BYTES - 1), tile), tile)
    return builder.mul(tiles, ir.Constant(I64, rows))


def _prefetch_ahead(builder, w, ws, wd, wds, wm, i, rows, block, ahead, scale_bytes, blocks=1, into="l1"):
    """A decode streams its weights once: block i of a tile of `rows` rows asks for its share of the tile
    `ahead` rows on (rows * block quant bytes, scale_bytes of scales and of mins: rows * 4 bytes of float32, 16
    of repacked Q4_0's fp16; the rows of a tile are one run of bytes in each array), so that the requests
    spread over the loop. A burst for the next rows before each tile left the loop waiting on memory
    (repacked Q4_0, 1536 x 576 streamed, one thread: 80-117 us against 45-64 us so; 38-42 us in cache).
    blocks: the blocks an iteration of the loop takes (a pair loop's 2: the quants of both asked for; asking for one
    block's share an iteration left a 4-row Q5_0 tile's streams with gaps, 7-10% slower streamed from memory).
    Prefetching past the end of an array is harmless (never faults). into: the cache they fill (PREFETCH_INTO)."""
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    qs = builder.add(builder.add(w, builder.mul(ws, ahead)), builder.mul(i, c64(rows * block)))
    for off in range(0, blocks * rows * block, 64):
        _prefetch(builder, builder.add(qs, c64(off)), into)
    for base in (wd, wm) if wm is not None else (wd,):
        _prefetch(builder, builder.add(builder.add(base, builder.mul(wds, ahead)), builder.mul(i, c64(scale_bytes))),
                  into)


def _repacked_scales(builder, wd, i):
    """Repacked Q4_0's 8 weight scales of block i as <8 x float>: 8 fp16 at byte address wd + 16 i (one
    vcvtph2ps; see kernels/ggml.py's _weight_args for the layout)."""
    half8 = _gep_load(builder, wd, builder.mul(i, ir.Constant(I64, 16)), ir.VectorType(ir.HalfType(), 8), 2)
    return builder.fpext(half8, ir.VectorType(F32, 8))


def _define_q4_0r(module, name, acts, isa):
    """Repacked Q4_0 (8 rows) by `acts` activation rows with VNNI or AVX2, as llama.cpp's gemv sums it: one
    32-bit lane per weight row from the start, so that no horizontal sums are left to do per block.

    Per block, the 8 rows' 16 bytes are transposed as 32-bit words (V_k, k = 0..3: lane r holds bytes
    4k .. 4k+3 of row r, so values 4k .. 4k+3 in its low nibbles and 16+4k .. 16+4k+3 in its high ones);
    each nibble vector meets the activation's 4 matching values broadcast to every lane (nibbles 0..15
    unsigned), and 8 sum(x) is taken off (the offset 8 of the nibbles). AVX2: vpmaddubsw, the 8 products of
    pairs summed in int16 stay exact (8 * 2 * 15 * 127 = 30480 < 32767), one vpmaddwd by ones makes each lane
    the row's sum of 32 products; "vnni" (Zen 4) takes these too. "vnni512" (Intel's AVX-512 VNNI cores,
    host_prefers_512; 256-bit vectors all the same): vpdpbusd adds each vector's products onto its lanes, in two
    chains of 4 (one starting from -8 sum(x), one from 0) added at the end. One chain of 8 kept 8 x 5 cycles of
    latency per activation row and block waiting in the scheduler and ran 1.07-1.09x the AVX2 tile's speed, two
    chains 1.18-1.27x (8 x 4 tile in L1, Sapphire Rapids-class Xeon, session 38; 4 chains 1.08-1.23x, 8
    0.85-1.05x); Zen 4 is not measured with them. The same integers every way. Then, as every path:
    fma(d_w d_x, sumi, acc) with one float32 lane per row.

    The scales come repacked, the tile's 8 fp16 of a block side by side (_repacked_scales: one load and a
    vcvtph2ps, where gathering 8 float32 from 8 rows took 8 loads, 7 inserts and spilled row pointers).
    8 sum(x) of each block comes from xs (int32 per block, xds bytes between activation rows: kernels/ggml.py's
    _x_offsets), made once per activation row instead of once per tile and block."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 13), name)
    fn.linkage = "internal"
    w, ws, wd, wm, wds, x, xstride, xd, xs, xds, nb, out, ostride = fn.args
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    v8f, v8i, v32, v16 = ir.VectorType(F32, 8), ir.VectorType(I32, 8), ir.VectorType(I8, 32), ir.VectorType(I8, 16)
    v16_16 = ir.VectorType(I16, 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero8 = ir.Constant(v8f, [0.0] * 8)
    fma_v = _declare(module, "llvm.fma.v8f32", v8f, [v8f] * 3)
    b = ir.IRBuilder(entry)
    ahead = _rows_ahead(b, ws, 8)
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)

    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    accs = [b.phi(v8f) for _ in range(acts)]
    four = b.mul(i, c64(4))

    def shuffle2(u, v, idx):
        return b.shuffle_vector(u, v, ir.Constant(ir.VectorType(I32, len(idx)), idx))

    # the weight side: 8 rows' 16 bytes -> (row r | row r + 4) -> V_0 .. V_3 (lane r = row r), nibbles apart
    raw = [_gep_load(b, b.add(w, b.mul(c64(r), ws)), b.mul(i, c64(16)), v16, 1) for r in range(8)]
    y = [b.bitcast(shuffle2(raw[r], raw[r + 4], list(range(32))), v8i) for r in range(4)]
    lo01, hi01 = shuffle2(y[0], y[1], [0, 8, 1, 9, 4, 12, 5, 13]), shuffle2(y[0], y[1], [2, 10, 3, 11, 6, 14, 7, 15])
    lo23, hi23 = shuffle2(y[2], y[3], [0, 8, 1, 9, 4, 12, 5, 13]), shuffle2(y[2], y[3], [2, 10, 3, 11, 6, 14, 7, 15])
    words = [shuffle2(lo01, lo23, [0, 1, 8, 9, 4, 5, 12, 13]), shuffle2(lo01, lo23, [2, 3, 10, 11, 6, 7, 14, 15]),
             shuffle2(hi01, hi23, [0, 1, 8, 9, 4, 5, 12, 13]), shuffle2(hi01, hi23, [2, 3, 10, 11, 6, 7, 14, 15])]
    low4 = ir.Constant(v8i, [0x0F0F0F0F] * 8)
    lows = [b.bitcast(b.and_(v, low4), v32) for v in words]  # values 4k .. 4k+3 of each row
    highs = [b.bitcast(b.and_(b.lshr(v, ir.Constant(v8i, [4] * 8)), low4), v32) for v in words]  # 16+4k ..
    scales = _repacked_scales(b, wd, i)
    if acts == 1:
        _prefetch_ahead(b, w, ws, wd, wds, None, i, 8, 16, ahead, 16)

    ones16 = ir.Constant(v16_16, [1] * 16)
    new_accs = []
    for a_ in range(acts):
        xq = b.bitcast(_gep_load(b, b.add(x, b.mul(c64(a_), xstride)), b.mul(i, c64(32)), v32, 1), v8i)
        xs_a = _gep_load(b, b.add(xs, b.mul(c64(a_), xds)), four, I32, 4)  # 8 sum(x), made beforehand
        off = _shuffle(b, b.insert_element(ir.Constant(v8i, ir.Undefined), xs_a, ir.Constant(I32, 0)), [0] * 8)
        if isa == "vnni512":  # its two chains, the first from -8 sum(x)
            chains = [b.sub(ir.Constant(v8i, [0] * 8), off), ir.Constant(v8i, [0] * 8)]
        pairs = None
        for j, (vals, word) in enumerate((v, k + 4 * h) for k in range(4) for h, v in enumerate((lows[k], highs[k]))):
            xk = b.bitcast(_shuffle(b, xq, [word] * 8), v32)  # activation values 4 word .. 4 word + 3
            if isa == "vnni512":
                chains[j % 2] = lanes_u8s8_onto(b, chains[j % 2], vals, xk, "vnni")
            else:
                p = pairs_u8s8(b, vals, xk)
                pairs = p if pairs is None else b.add(pairs, p)
        sumi = b.add(*chains) if isa == "vnni512" else b.sub(madd16(b, pairs, ones16), off)
        xdv = _gep_load(b, b.add(xd, b.mul(c64(a_), xds)), four, F32, 4)
        xsplat = splat8(b, xdv)
        new_accs.append(b.call(fma_v, [b.fmul(scales, xsplat), b.sitofp(sumi, v8f), accs[a_]]))
    b, finals = _close_loop(b, i, nb, entry, loop, done, [(p, v, zero8) for p, v in zip(accs, new_accs)])
    for a_ in range(acts):
        b.store(finals[a_], _ptr(b, b.add(out, b.mul(c64(a_), ostride)), v8f), align=4)
    b.ret_void()
    return fn


# The kinds of 8 rows in the "x8" form (weights/packed.py): Q5_0, Q5_1 (Q5_BIT_ORDERS), Q4_1 (Q4_1Weight)
X8_KINDS = ("q5_0x8", "q5_1x8", "q4_1x8")


def _define_x8(module, name, kind, portable):
    """Q5_0, Q5_1 or Q4_1 (kind: X8_KINDS), 8 rows in the "x8" form (weights/packed.py Q5_BIT_ORDERS, Q4_1Weight),
    by one activation row: ggml_vec_dot_q5_0_q8_0 / ggml_vec_dot_q5_1_q8_1 / ggml_vec_dot_q4_1_q8_1 of each row, its
    8 float32 lanes turned on their side.

    Row r's sums are kept in lane r of 8 accumulators, accumulator l holding what the row's lane l holds in ggml's
    AVX2 loop: the int32 sum of its products 4l .. 4l+3 times d_w d_x, fma'd on block after block. The blocks are
    stored so (packed.py "x8") that each 32-byte vector of nibbles holds, for the 8 rows, the 4 values of one lane
    (its low nibbles lane j, its high ones lane j + 4), the activation's 4 values of that lane are one broadcast,
    the 8 rows' scales of a block one load and one vcvtph2ps (a vector, where a row at a time takes a splat of
    each), and the rows' fifth-bit words (shifted) one vector Q, whose Q << l puts each value of lane l's bit at
    the top of its byte (one vpslld; _blend_fifth; Q4_1 has none: 128 bytes a block). At the end hsum_float_8's
    order, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), is 7 vector adds for the 8 rows (Q5_1, Q4_1: + the
    mins' sum, lane by lane). The same integers, products and sums as the 4-row tile: the same bits. In C models of
    both (gcc -march=znver3, one thread, in L1, session 59) Q5_0 5.6 -> 3.9 cycles a block and row, Q4_1 4.6-5.4 ->
    2.2.

    Q5_0's signed q - 16 meets x by ggml's sign trick (vpsignb, as the 4-row tile); Q5_1's q 0..31 and Q4_1's 0..15
    as they stand, the mins m_w s_x (the 8 rows' m_w a vector) one fma a block. portable: the same IR without x86
    intrinsics."""
    signed, fifth = kind == "q5_0x8", kind != "q4_1x8"
    block_bytes = 160 if fifth else 128
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 13), name)
    fn.linkage = "internal"
    w, ws, wd, wm, wds, x, xstride, xd, xs, xds, nb, out, ostride = fn.args
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    v8f, v8i, v32 = ir.VectorType(F32, 8), ir.VectorType(I32, 8), ir.VectorType(I8, 32)
    v8h = ir.VectorType(ir.HalfType(), 8)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    fma_v = _declare(module, "llvm.fma.v8f32", v8f, [v8f] * 3)
    per = 2 if signed else 4  # scale bytes a row and block: fp16 d, or the fp16 pair d, m
    b = ir.IRBuilder(entry)
    ahead = _rows_ahead(b, ws, 8)
    b.cbranch(b.icmp_signed(">", nb, c64(0)), loop, done)

    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    accs = [b.phi(v8f) for _ in range(8)]
    mins = None if signed else b.phi(v8f)
    _prefetch_ahead(b, w, ws, wd, wds, None, i, 8, block_bytes // 8, ahead, 8 * per)
    block = b.add(w, b.mul(i, c64(block_bytes)))
    # the 8 rows' scales of block i: d_w d_x (and m_w) as vectors, lane r row r
    if signed:
        dw = b.fpext(_gep_load(b, wd, b.mul(i, c64(16)), v8h, 2), v8f)
    else:  # 8 pairs d | m << 16: the d's and the m's apart, each 8 fp16 converted alone (256-bit vectors only)
        pairs = _gep_load(b, wd, b.mul(i, c64(32)), ir.VectorType(I16, 16), 4)
        dw, mw = (b.fpext(b.bitcast(_shuffle(b, pairs, list(range(k, 16, 2))), v8h), v8f) for k in (0, 1))
        mins_next = b.call(fma_v, [mw, splat8(b, _gep_load(b, xs, b.mul(i, c64(4)), F32, 4)), mins])
    scale = b.fmul(dw, splat8(b, _gep_load(b, xd, b.mul(i, c64(4)), F32, 4)))  # float32 d_w * d_x, lane by lane
    q = _gep_load(b, block, c64(128), v8i, 4) if fifth else None  # row r's fifth bits (shifted) in lane r
    xblock = b.add(x, b.mul(i, c64(32)))
    low4 = ir.Constant(v32, [15] * 32)
    new_accs = [None] * 8
    for j in range(4):
        nib = _gep_load(b, block, c64(32 * j), v32, 1)
        high = b.bitcast(b.lshr(b.bitcast(nib, ir.VectorType(I16, 16)), ir.Constant(ir.VectorType(I16, 16), [4] * 16)),
                         v32)
        for lane, n in ((j, b.and_(nib, low4)), (j + 4, b.and_(high, low4))):
            if fifth:
                vals = _blend_fifth(b, n, b.bitcast(b.shl(q, ir.Constant(v8i, [lane] * 8)), v32), signed, portable)
            else:
                vals = n
            xl = b.bitcast(_shuffle(b, b.insert_element(ir.Constant(v8i, ir.Undefined),
                                                        _gep_load(b, xblock, c64(4 * lane), I32, 1),
                                                        ir.Constant(I32, 0)), [0] * 8), v32)  # its 4 values, 8 times
            if portable:
                lanes = lanes_portable(b, vals, xl, signed)
            elif signed:  # ggml's sign trick: |w| times x with w's sign
                lanes = lanes_u8s8(b, sign8(b, vals, vals), sign8(b, xl, vals), "avx2")
            else:
                lanes = lanes_u8s8(b, vals, xl, "avx2")
            new_accs[lane] = b.call(fma_v, [scale, b.sitofp(lanes, v8f), accs[lane]])
    _end_sideways(b, i, nb, entry, loop, done, accs, new_accs, None if signed else (mins, mins_next), out)
    return fn


def _end_sideways(b, i, nb, entry, loop, done, accs, new_accs, mins, out):
    """Close the block loop of a tile whose 8 accumulators hold ggml's 8 lanes on their side (lane r: row r; the
    "x8" and "x16" tiles) and store each row's hsum_float_8, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), as
    vector adds for all rows, plus the mins' float32 sum where the format has them (mins: (phi, next) or None)."""
    zero = ir.Constant(accs[0].type, [0.0] * accs[0].type.count)
    carried = list(zip(accs, new_accs, [zero] * 8)) + ([] if mins is None else [(*mins, zero)])
    b, finals = _close_loop(b, i, nb, entry, loop, done, carried)
    t = [b.fadd(finals[k], finals[k + 4]) for k in range(4)]
    total = b.fadd(b.fadd(t[0], t[2]), b.fadd(t[1], t[3]))
    if mins is not None:
        total = b.fadd(total, finals[8])  # the mins' float32 sum, added last
    b.store(total, _ptr(b, out, accs[0].type), align=4)
    b.ret_void()


def _lanes16(b, vals, xl, isa, offset=0):
    """<64 x i8> vals (unsigned: q + offset) and xl (signed) -> <16 x i32>, lane j the sum of products q x over values
    4j .. 4j + 3: one 512-bit vpdpbusd (isa "vnni512"), else each 32-byte half by lanes_u8s8 ("vnni", "avx2") or
    lanes_portable, less offset times the lane's sum of x by the same instructions. Offset 128 (Q8_0's x16 form, q
    -128..127) without VNNI: q itself (vals XOR 0x80) by ggml's sign trick (AVX2's int16 pairs would saturate on
    (q + 128) x) or as signed bytes (portable). The same integers every way."""
    v16i = ir.VectorType(I32, 16)
    if offset == 128 and isa in ("avx2", "portable"):
        q = b.xor(vals, ir.Constant(vals.type, [-128] * 64))
        halves = []
        for h in (0, 1):
            v, xv = (_shuffle(b, a, list(range(32 * h, 32 * h + 32))) for a in (q, xl))
            halves.append(lanes_portable(b, v, xv, True) if isa == "portable" else
                          lanes_u8s8(b, sign8(b, v, v), sign8(b, xv, v), isa))
        return _shuffle2(b, halves[0], halves[1], list(range(16)))
    if offset:
        return b.sub(_lanes16(b, vals, xl, isa), _lanes16(b, ir.Constant(vals.type, [offset] * 64), xl, isa))
    if isa == "vnni512":
        fn = _declare(b.module, "llvm.x86.avx512.vpdpbusd.512", v16i, [v16i] * 3)
        return b.call(fn, [ir.Constant(v16i, [0] * 16), b.bitcast(vals, v16i), b.bitcast(xl, v16i)])
    halves = []
    for h in (0, 1):
        v, xv = (_shuffle(b, a, list(range(32 * h, 32 * h + 32))) for a in (vals, xl))
        halves.append(lanes_portable(b, v, xv, False) if isa == "portable" else lanes_u8s8(b, v, xv, isa))
    return _shuffle2(b, halves[0], halves[1], list(range(16)))


def _shuffle2(builder, u, v, idx):
    """shufflevector of two vectors (lanes of u, then v's) by the constant indices idx."""
    return builder.shuffle_vector(u, v, ir.Constant(ir.VectorType(I32, len(idx)), idx))


def _splat16(b, value):
    """<16 x value's type>, every lane value."""
    undef = ir.Constant(ir.VectorType(value.type, 16), ir.Undefined)
    return _shuffle(b, b.insert_element(undef, value, ir.Constant(I32, 0)), [0] * 16)


def _tile16_function(module, name):
    """A 16-row tile's function (the 13 i64 arguments of every tile), its arguments, its blocks (entry, loop, done)
    with entry built (the rows ahead to prefetch, then the loop unless nb <= 0), and those rows ahead."""
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 13), name)
    fn.linkage = "internal"
    blocks = tuple(fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    b = ir.IRBuilder(blocks[0])
    ahead = _rows_ahead(b, fn.args[1], 16)
    b.cbranch(b.icmp_signed(">", fn.args[10], ir.Constant(I64, 0)), blocks[1], blocks[2])
    return fn, fn.args, blocks, ahead


def _x16_nibbles(b, block, j):
    """Vector j (64 bytes at block + 64 j) of a block of 16 rows' nibbles in the "x16" form -> (the bytes, the bytes
    shifted right by 4 as 16-bit words): lane j's 4 values of each row in the low 4 bits of the first, lane j + 4's
    in the low 4 bits of the second; their upper 4 bits hold other values (an and with 15 takes them off)."""
    v64, v32s = ir.VectorType(I8, 64), ir.VectorType(I16, 32)
    nib = _gep_load(b, block, ir.Constant(I64, 64 * j), v64, 1)
    return nib, b.bitcast(b.lshr(b.bitcast(nib, v32s), ir.Constant(v32s, [4] * 32)), v64)


# The kinds of 16 rows in the "x16" form (weights/packed.py): Q4_1 (Q4_1Weight.x8_form(16)), Q5_1, Q5_0 (Q5_BIT_ORDERS),
# Q8_0 (Q8_0Weight.x8_form(16))
X16_KINDS = ("q4_1x16", "q5_1x16", "q5_0x16", "q8_0x16")


def _define_x16(module, name, isa, kind):
    """Q4_1, Q5_1 or Q5_0 (kind: X16_KINDS), 16 rows in the "x16" form (weights/packed.py) by one activation row:
    ggml_vec_dot_q4_1_q8_1 (q5_1_q8_1, q5_0_q8_0) of each row, its 8 lanes turned on their side as in _define_x8,
    16 rows to a 512-bit vector: accumulator l holds in lane r what row r's lane l holds in ggml's AVX2 loop (the
    int32 sum of its products 4l .. 4l + 3 times d_w d_x, fma'd block after block), each 64-byte vector of nibbles
    the 4 values of lanes j (low nibbles) and j + 4 (high ones) for the 16 rows, the activation's 4 values of a
    lane one broadcast, the 16 rows' fp16 pairs (Q5_0: d's) of a block one load; the mins m_w s_x one fma a block
    (Q4_1, Q5_1); at the end
    hsum_float_8's order, ((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7)), then the mins' sum. The same
    integers, products and sums as the 4-row and 8-row tiles: the same bits. On an Emerald Rapids core (C model
    of this loop, one thread, 1536 x 576): 0.52-0.58 ns a block and row in L2, 0.64-0.70 from L3, where the
    4-row tile takes 0.8 and 0.87. isa "vnni512": 512-bit vpdpbusd; any other: _lanes16's halves (the portable
    code and AVX2's, so that every path is tested on a VNNI host).

    Q5: the 16 rows' words of fifth bits ("shifted") one vector Q, each value of lane l's bit at bit 7 - l of its
    byte; the values q 0..31 are the nibble, or the nibble | 16 where that bit is set ("vnni512" with GFNI: one
    vgf2p8affineqb moves the bit to bit 4, one vpternlogd takes the nibble's low 4 bits and puts it in; elsewhere
    plain IR). Q5_0's q - 16 meets x as q times x less 16 sum(x) of the lane: each
    lane's vpdpbusd starts from it (one ymm vpdpbusd of 16s for the block, each lane's start a broadcast from the
    stack), the same integers as ggml's sign trick. The loop is bound by the one vector port that multiplies and
    converts on 512-bit registers: a shift, a vpmovb2m and an and a lane for the bit, and a vpermd a lane for the
    start, took it from 0.83 to 0.62 ns a block and row (Q5_0, 576 x 576 in L2, one thread; Q5_1 0.80-0.83 to
    0.63-0.66; sessions.md, session 65).

    Q8_0: each 64-byte vector of the block's 8 holds lane j's 4 values for the 16 rows, q + 128 (unsigned), and
    meets x less 128 sum(x) of the lane (_lanes16's offset), the same integers as ggml_vec_dot_q8_0_q8_0's sign
    trick; its 16 fp16 d one load, as Q5_0's."""
    q8, signed, fifth = kind == "q8_0x16", kind in ("q5_0x16", "q8_0x16"), kind in ("q5_0x16", "q5_1x16")
    block_bytes = 512 if q8 else 320 if fifth else 256
    fn, (w, ws, wd, wm, wds, x, xstride, xd, xs, xds, nb, out, ostride), (entry, loop, done), ahead = \
        _tile16_function(module, name)
    v16f, v64, v16i = ir.VectorType(F32, 16), ir.VectorType(I8, 64), ir.VectorType(I32, 16)
    v16h, v32s = ir.VectorType(ir.HalfType(), 16), ir.VectorType(I16, 32)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    fma_v = _declare(module, "llvm.fma.v16f32", v16f, [v16f] * 3)

    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    accs = [b.phi(v16f) for _ in range(8)]
    mins = None if signed else b.phi(v16f)
    _prefetch_ahead(b, w, ws, wd, wds, None, i, 16, block_bytes // 16, ahead, 32 if signed else 64)
    block = b.add(w, b.mul(i, c64(block_bytes)))
    if signed:  # the 16 rows' fp16 d of block i
        dw = b.fpext(_gep_load(b, wd, b.mul(i, c64(32)), v16h, 2), v16f)
    else:  # the 16 rows' pairs d | m << 16 of block i: the d's and the m's apart, each 16 fp16 converted at once
        pairs = _gep_load(b, wd, b.mul(i, c64(64)), v32s, 4)
        dw, mw = (b.fpext(b.bitcast(_shuffle(b, pairs, list(range(k, 32, 2))), v16h), v16f) for k in (0, 1))
        mins_next = b.call(fma_v, [mw, _splat16(b, _gep_load(b, xs, b.mul(i, c64(4)), F32, 4)), mins])
    scale = b.fmul(dw, _splat16(b, _gep_load(b, xd, b.mul(i, c64(4)), F32, 4)))  # float32 d_w * d_x, lane by lane
    qb = _gep_load(b, block, c64(256), v64, 4) if fifth else None  # row r's fifth bits (shifted) in dword r
    xblock = b.add(x, b.mul(i, c64(32)))
    low4, sixteen = ir.Constant(v64, [15] * 64), ir.Constant(v64, [16] * 64)
    new_accs = [None] * 8
    gfni = isa == "vnni512" and HAS_GFNI_MASKS
    if fifth and gfni:
        affine = _declare(module, "llvm.x86.vgf2p8affineqb.512", v64, [v64, v64, I8])
        ternlog = _declare(module, "llvm.x86.avx512.pternlog.d.512", v16i, [v16i, v16i, v16i, I32])

    def values():  # (lane, its 16 rows' 4 values as unsigned bytes) of block i
        if q8:
            for lane in range(8):
                yield lane, _gep_load(b, block, c64(64 * lane), v64, 1)
            return
        for j in range(4):
            for lane, n in zip((j, j + 4), _x16_nibbles(b, block, j)):
                if fifth and gfni:  # (n & 15) | the bit moved to bit 4: a vgf2p8affineqb and one vpternlogd
                    matrix = b.bitcast(ir.Constant(ir.VectorType(I64, 8), [(1 << (7 - lane)) << 24] * 8), v64)
                    bit = b.bitcast(b.call(affine, [qb, matrix, ir.Constant(I8, 0)]), v16i)
                    n = b.bitcast(b.call(ternlog, [b.bitcast(n, v16i), bit, ir.Constant(v16i, [0x0F0F0F0F] * 16),
                                                   ir.Constant(I32, 0xEC)]), v64)  # (A & C) | B
                elif fifth:  # q = n | 16 where lane `lane`'s bit of the value is set: bit 7 - lane of its byte in Q
                    n = b.and_(n, low4)
                    bit = b.and_(qb, ir.Constant(v64, [1 << (7 - lane)] * 64))
                    n = b.select(b.icmp_unsigned("!=", bit, ir.Constant(v64, [0] * 64)), b.or_(n, sixteen), n)
                else:
                    n = b.and_(n, low4)
                yield lane, n
    offset = 128 if q8 else 16 if signed else 0
    if offset and isa == "vnni512":  # -offset sum(x) of every lane of the block: where each lane's vpdpbusd starts
        xv = _gep_load(b, xblock, c64(0), ir.VectorType(I8, 32), 1)
        starts = b.neg(lanes_u8s8(b, ir.Constant(ir.VectorType(I8, 32), [offset] * 32), xv, "vnni"))
        vpdpbusd = _declare(b.module, "llvm.x86.avx512.vpdpbusd.512", v16i, [v16i] * 3)
        # each lane's start as a broadcast from memory (a load) where a vpermd of the register took a shuffle each (the
        # vector ports' second, beside the multiplies): stored to the stack and read back through an address LLVM
        # cannot see into (_tile_scales), so that the loads are not forwarded into shuffles again
        at_entry = ir.IRBuilder(entry)
        at_entry.position_at_start(entry)
        sbuf = at_entry.alloca(ir.VectorType(I32, 8))
        b.store(starts, sbuf, align=32)
        saddr = b.asm(ir.FunctionType(I64, [I64]), "", "=r,0,~{memory}", [b.ptrtoint(sbuf, I64)], True)
    for lane, n in values():
        xl = b.bitcast(_splat16(b, _gep_load(b, xblock, c64(4 * lane), I32, 1)), v64)  # its 4 values, 16 times
        if offset and isa == "vnni512":
            start = _splat16(b, b.load(_ptr(b, b.add(saddr, c64(4 * lane)), I32), align=4))
            lanes = b.call(vpdpbusd, [start, b.bitcast(n, v16i), b.bitcast(xl, v16i)])
        else:  # Q5_0: (q - 16) x = q x - 16 x, summed over the lane's 4 values; Q8_0 (q + 128) x - 128 x
            lanes = _lanes16(b, n, xl, isa, offset)
        new_accs[lane] = b.call(fma_v, [scale, b.sitofp(lanes, v16f), accs[lane]])
    _end_sideways(b, i, nb, entry, loop, done, accs, new_accs, None if signed else (mins, mins_next), out)
    return fn


def _define_q4_0x16(module, name, acts, isa):
    """Q4_0, 16 rows in the "x16" form (Q4_0Weight.x8_form(16): each 64-byte vector of a block's 256 the 4 nibble
    bytes 4j .. 4j + 3 of the 16 rows, as Q4_1's), by `acts` activation rows (a decode's 1, a prefill's ACTS):
    repacked Q4_0's arithmetic (_define_q4_0r, ggml_gemv_q4_0_8x8_q8_0), one int32 lane per row from the start. The
    form needs no transpose: vector j's low nibbles are values 4j .. 4j + 3 of every row (lane r row r), its high ones
    16 + 4j ..; each meets the activation's 4 matching values broadcast, and 8 sum(x) (xs: _x_offsets) is taken off,
    as the 8-row tile does. "vnni512": vpdpbusd onto two chains, the first starting from -8 sum(x); other isas
    _lanes16's halves summed. Then fma(d_w d_x, sumi, acc), one float32 lane per row, the 16 rows' fp16 d of a block
    one load: the same integers and the same float steps as the 8-row tile, so the same bits."""
    fn, (w, ws, wd, wm, wds, x, xstride, xd, xs, xds, nb, out, ostride), (entry, loop, done), ahead = \
        _tile16_function(module, name)
    v16f, v64, v16i = ir.VectorType(F32, 16), ir.VectorType(I8, 64), ir.VectorType(I32, 16)
    v16h = ir.VectorType(ir.HalfType(), 16)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    fma_v = _declare(module, "llvm.fma.v16f32", v16f, [v16f] * 3)
    vpdpbusd = _declare(module, "llvm.x86.avx512.vpdpbusd.512", v16i, [v16i] * 3)

    b = ir.IRBuilder(loop)
    i = b.phi(I64)
    accs = [b.phi(v16f) for _ in range(acts)]
    four = b.mul(i, c64(4))
    if acts == 1:
        _prefetch_ahead(b, w, ws, wd, wds, None, i, 16, 16, ahead, 32)
    block = b.add(w, b.mul(i, c64(256)))
    dw = b.fpext(_gep_load(b, wd, b.mul(i, c64(32)), v16h, 2), v16f)  # the 16 rows' fp16 d of block i
    low4 = ir.Constant(v64, [15] * 64)
    vals = [None] * 8  # lane l: values 4l .. 4l + 3 (l < 4: low nibbles of vector l; else high ones of l - 4)
    for j in range(4):
        vals[j], vals[j + 4] = (b.and_(n, low4) for n in _x16_nibbles(b, block, j))
    new_accs = []
    for a_ in range(acts):
        xblock = b.add(b.add(x, b.mul(c64(a_), xstride)), b.mul(i, c64(32)))
        off = _gep_load(b, b.add(xs, b.mul(c64(a_), xds)), four, I32, 4)  # 8 sum(x), made beforehand
        chains = [b.sub(ir.Constant(v16i, [0] * 16), _splat16(b, off)), ir.Constant(v16i, [0] * 16)]
        for lane in range(8):
            xl = b.bitcast(_splat16(b, _gep_load(b, xblock, c64(4 * lane), I32, 1)), v64)  # its 4 values, 16 times
            if isa == "vnni512":
                chains[lane % 2] = b.call(vpdpbusd, [chains[lane % 2], b.bitcast(vals[lane], v16i),
                                                     b.bitcast(xl, v16i)])
            else:
                chains[lane % 2] = b.add(chains[lane % 2], _lanes16(b, vals[lane], xl, isa))
        sumi = b.add(chains[0], chains[1])
        xdv = _gep_load(b, b.add(xd, b.mul(c64(a_), xds)), four, F32, 4)
        new_accs.append(b.call(fma_v, [b.fmul(dw, _splat16(b, xdv)), b.sitofp(sumi, v16f), accs[a_]]))
    zero = ir.Constant(v16f, [0.0] * 16)
    b, finals = _close_loop(b, i, nb, entry, loop, done, [(p, v, zero) for p, v in zip(accs, new_accs)])
    for a_ in range(acts):
        b.store(finals[a_], _ptr(b, b.add(out, b.mul(c64(a_), ostride)), v16f), align=4)
    b.ret_void()
    return fn


def make_dot(kind: str, rows: int, acts: int):
    """The intrinsic dot(w, ws, wd, wm, wds, x, xstride, xd, xs, xds, nb, out, ostride, simd) for `kind`, a
    tile of `rows` weight rows by `acts` activation rows (see _define_tile; addresses and strides in bytes as
    int64; simd chooses the integer instructions as `dispatch` says)."""
    @intrinsic
    def dot(typingctx, w, ws, wd, wm, wds, x, xstride, xd, xs, xds, nb, out, ostride, simd):
        sig = types.void(*([types.int64] * 14))

        def codegen(context, builder, signature, args):
            def emit(isa):
                builder.call(_define_tile(builder.module, kind, rows, acts, isa), args[:13])
            dispatch(builder, args[13], emit, wide=True)
            return context.get_dummy_value()
        return sig, codegen
    return dot
