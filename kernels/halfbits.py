"""16-bit floats to float32 inside compiled loops, in registers.

A weight stored as bfloat16 or IEEE half is a uint16 bit pattern; these two functions turn one into the
float32 it stands for, exactly (every 16-bit value is a float32 value). They are LLVM instructions, not
Python: a bit cast (bfloat16 is the top half of a float32) and `fpext half -> float` (F16C's vcvtph2ps on
x86, fcvt on ARM), so a loop over a row of weights vectorizes with no table and no buffer. A 65536-entry
table (packed.FP16_TO_F32) gives the same values but is read one gather at a time.

NumPy twins: `(bits.astype(np.uint32) << 16).view(np.float32)` and `bits.view(np.float16).astype(np.float32)`
(weights.packed.BF16Weight / F16Weight), checked against these in tests/test_kernels.py.

Also here, as another single LLVM instruction: `prefetch`, the memory hint the quantized decode kernels use;
and `f16_row_dot` / `bf16_row_dot` (one row) and `f16_row_dots4` / `bf16_row_dots4` (4 rows at once), the dot
products of a float32 vector with rows of 16-bit weights that the 16-bit decode kernels (kernels/linear.py)
are made of, written as LLVM vector IR.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .ggml_simd import _declare, _shuffle


@intrinsic
def bf16_to_f32(typingctx, bits):
    """bfloat16 bits (uint16) -> float32: the bits become the top half of a float32."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], ir.IntType(32))
        return builder.bitcast(builder.shl(wide, ir.Constant(ir.IntType(32), 16)), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f16_to_f32(typingctx, bits):
    """IEEE half bits (uint16) -> float32, exact (subnormals, inf and NaN included)."""
    if bits != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def prefetch(typingctx, ary, r, k):
    """A hint to start loading the cache line that holds ary[r, k] (2-D array): LLVM's llvm.prefetch (a
    read, kept in every cache level: x86 prefetcht0). It reads nothing into the program and cannot fault,
    so the index is not checked. The 16-bit matrix-vector kernels (kernels/linear.py) call it for the rows
    they read next: one core alone keeps too few loads in flight to reach its memory bandwidth."""
    if not isinstance(ary, types.Array) or ary.ndim != 2:
        return None

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        a = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer2(context, builder, data=a.data, shape=cgutils.unpack_tuple(builder, a.shape),
                                        strides=cgutils.unpack_tuple(builder, a.strides), layout=aryty.layout,
                                        inds=[args[1], args[2]], wraparound=False, boundscheck=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                            "llvm.prefetch.p0")
        # (address, 0 = read, 3 = keep in all cache levels, 1 = data cache)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(ary, r, k), codegen


# ---- rows of 16-bit weights by a float32 vector ---------------------------------------------------------------

# The sums' order, fixed by the IR whatever the CPU (LLVM splits a 16-lane vector in two on AVX2): a row's
# accumulators are ACCUMULATORS vectors of LANES float32 lanes; the row's first K // LANES * LANES values go in
# groups of LANES, group g to accumulator g % ACCUMULATORS (value k to lane k % LANES), each lane one fused
# multiply-add chain (llvm.fma) in increasing k; then the accumulators lane by lane (a0 + a1), then the lanes by
# halves (16 -> 8 -> 4 -> 2 -> 1). The caller adds the last K % LANES values one by one. The same order for a
# row alone and for 4 rows at once (x's values loaded once for the 4), so a row's sum does not depend on which
# of the two computed it. Two chains a row keep enough fused multiply-adds in flight for a loop bound by memory
# (one row alone, session 38, Xeon: the same GB/s with 2 accumulators as with the 4 it had before).
# 4 rows at once also ask, each iteration, for the cache line of the next 4 rows at the same column
# (llvm.prefetch): see kernels/linear.py ONE_ROW_MAX_K for why and where.
LANES = 16
ACCUMULATORS = 2


def _define_row_dots(module, fmt: str, rows: int):
    """void f(x, w, ws, ng, sums): the dot products of ng * LANES float32 at byte address x with as many 16-bit
    weights ("f16": IEEE half, "bf16": bfloat16) of each of `rows` rows (the first at w, ws bytes apart), in the
    order above, stored as float32 at sums, sums + 4, ..."""
    name = f"llama_ref_row_dots_{fmt}_{rows}"
    if name in module.globals:
        return module.globals[name]
    A = ACCUMULATORS
    f32, i8, i16, i32, i64 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
    vf, vh = ir.VectorType(f32, LANES), ir.VectorType(i16, LANES)
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [i64] * 5), name)
    fn.linkage = "internal"
    x, w, ws, ng, sums = fn.args
    fma = _declare(module, f"llvm.fma.v{LANES}f32", vf, [vf] * 3)
    hint = _declare(module, "llvm.prefetch.p0", ir.VoidType(), [i8.as_pointer(), i32, i32, i32])
    c64 = lambda v: ir.Constant(i64, v)  # noqa: E731
    zero = ir.Constant(vf, [0.0] * LANES)
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    b = ir.IRBuilder(entry)
    nk = b.sdiv(ng, c64(A))  # whole iterations of A groups
    b.cbranch(b.icmp_signed(">", nk, c64(0)), loop, done)

    def group(b, g, j, accs):
        """Group g (i64) of every row into its accumulator j: -> the rows' new accumulators j."""
        def load(addr, ty):
            return b.load(b.inttoptr(addr, ir.PointerType(ty)), align=2)

        def widen(h):  # <LANES x i16> bits -> <LANES x float>, exactly
            if fmt == "f16":
                return b.fpext(b.bitcast(h, ir.VectorType(ir.HalfType(), LANES)), vf)  # vcvtph2ps
            wide = b.zext(h, ir.VectorType(i32, LANES))
            return b.bitcast(b.shl(wide, ir.Constant(wide.type, [16] * LANES)), vf)  # the top half of a float32

        xv = load(b.add(x, b.mul(g, c64(4 * LANES))), vf)
        wo = b.mul(g, c64(2 * LANES))
        return [b.call(fma, [xv, widen(load(b.add(b.add(w, b.mul(ws, c64(r))), wo), vh)), accs[r][j]])
                for r in range(rows)]

    b = ir.IRBuilder(loop)
    i = b.phi(i64)
    accs = [[b.phi(vf) for _ in range(A)] for _ in range(rows)]
    if rows > 1:  # the next `rows` rows, same columns: one line each (A LANES 16-bit values are 64 bytes)
        at = b.add(w, b.add(b.mul(ws, c64(rows)), b.mul(i, c64(2 * LANES * A))))
        for r in range(rows):  # (address, 0: a read, 3: kept in every cache level, 1: data)
            b.call(hint, [b.inttoptr(b.add(at, b.mul(ws, c64(r))), i8.as_pointer()), i32(0), i32(3), i32(1)])
    new = [list(row) for row in accs]
    for j in range(A):
        for r, v in enumerate(group(b, b.add(b.mul(i, c64(A)), c64(j)), j, accs)):
            new[r][j] = v
    after = b.add(i, c64(1))
    i.add_incoming(c64(0), entry)
    i.add_incoming(after, loop)
    for r in range(rows):
        for acc, nxt in zip(accs[r], new[r]):
            acc.add_incoming(zero, entry)
            acc.add_incoming(nxt, loop)
    b.cbranch(b.icmp_signed("<", after, nk), loop, done)

    b = ir.IRBuilder(done)
    cur = [[None] * A for _ in range(rows)]
    for r in range(rows):
        for j in range(A):
            acc = b.phi(vf)
            acc.add_incoming(zero, entry)
            acc.add_incoming(new[r][j], loop)
            cur[r][j] = acc
    # the groups past the last whole iteration (ng % A of them), group nk A + j into accumulator j
    rest = b.sub(ng, b.mul(nk, c64(A)))
    for j in range(A - 1):
        take, join = fn.append_basic_block(f"rest{j}"), fn.append_basic_block(f"rest{j}_done")
        here = b.block
        b.cbranch(b.icmp_signed(">", rest, c64(j)), take, join)
        b = ir.IRBuilder(take)
        taken = group(b, b.add(b.mul(nk, c64(A)), c64(j)), j, cur)
        b.branch(join)
        b = ir.IRBuilder(join)
        for r in range(rows):
            acc = b.phi(vf)
            acc.add_incoming(cur[r][j], here)
            acc.add_incoming(taken[r], take)
            cur[r][j] = acc
    for r in range(rows):
        vs = cur[r]
        while len(vs) > 1:  # pairwise (with two: a0 + a1)
            vs = [b.fadd(vs[j], vs[j + 1]) for j in range(0, len(vs), 2)]
        v, n = vs[0], LANES
        while n > 1:
            n //= 2
            v = b.fadd(_shuffle(b, v, list(range(n))), _shuffle(b, v, list(range(n, 2 * n))))
        b.store(b.extract_element(v, ir.Constant(i32, 0)), b.inttoptr(b.add(sums, c64(4 * r)), ir.PointerType(f32)),
                align=4)
    b.ret_void()
    return fn


def _row_dots(fmt: str, rows: int):
    @intrinsic
    def row_dots(typingctx, x, w, ws, ng, sums):
        """Byte addresses x (float32), w (16-bit rows, ws bytes apart), sums (float32 out); ng groups of LANES."""
        sig = types.void(*([types.int64] * 5))

        def codegen(context, builder, signature, args):
            builder.call(_define_row_dots(builder.module, fmt, rows), args)
            return context.get_dummy_value()
        return sig, codegen
    return row_dots


f16_row_dot, f16_row_dots4 = _row_dots("f16", 1), _row_dots("f16", 4)
bf16_row_dot, bf16_row_dots4 = _row_dots("bf16", 1), _row_dots("bf16", 4)
