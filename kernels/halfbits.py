"""16-bit floats to float32 inside compiled loops, in registers.

A weight stored as bfloat16 or IEEE half is a uint16 bit pattern; these two functions turn one into the
float32 it stands for, exactly (every 16-bit value is a float32 value). They are LLVM instructions, not
Python: a bit cast (bfloat16 is the top half of a float32) and `fpext half -> float` (F16C's vcvtph2ps on
x86, fcvt on ARM), so a loop over a row of weights vectorizes with no table and no buffer. A 65536-entry
table (packed.FP16_TO_F32) gives the same values but is read one gather at a time.

NumPy twins: `(bits.astype(np.uint32) << 16).view(np.float32)` and `bits.view(np.float16).astype(np.float32)`
(weights.packed.BF16Weight / F16Weight), checked against these in tests/test_kernels.py.

Also here, as another single LLVM instruction: `prefetch`, the memory hint the 16-bit decode kernels use.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


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
