"""16-bit floats to float32 inside compiled loops, in registers.

A weight stored as bfloat16 or IEEE half is a uint16 bit pattern; these two functions turn one into the
float32 it stands for, exactly (every 16-bit value is a float32 value). They are LLVM instructions, not
Python: a bit cast (bfloat16 is the top half of a float32) and `fpext half -> float` (F16C's vcvtph2ps on
x86, fcvt on ARM), so a loop over a row of weights vectorizes with no table and no buffer. A 65536-entry
table (packed.FP16_TO_F32) gives the same values but is read one gather at a time.

NumPy twins: `(bits.astype(np.uint32) << 16).view(np.float32)` and `bits.view(np.float16).astype(np.float32)`
(weights.packed.BF16Weight / F16Weight), checked against these in tests/test_kernels.py.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
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
