"""exp for float32 that LLVM can vectorize, within 2 ulps of NumPy's np.exp.

Numba compiles np.exp in a loop to one libm call per element (~15 cycles): the softmax of a decode step and
the SwiGLU gate spend most of their time there. This version is arithmetic only, so a loop of it becomes
SIMD code. It is the classic Cody-Waite reduction (Cephes' expf coefficients):
    exp(x) = 2^n * exp(r),   n = round(x / ln 2),   r = x - n ln 2 in [-ln2/2, ln2/2],
with ln 2 split in two constants so that r is exact, exp(r) by a degree-7 polynomial, and 2^n built from
its exponent bits. tests/test_kernels.py checks it against np.exp, ulp by ulp, over the whole float32 range.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types
from numba.extending import intrinsic

LOG2E = np.float32(1.44269504088896341)
LN2_HI = np.float32(0.693359375)  # ln 2 = LN2_HI + LN2_LO; n * LN2_HI is exact for |n| < 2^9
LN2_LO = np.float32(-2.12194440e-4)
# exp(x) overflows to inf above this, and is below half the smallest subnormal float32 under X_MIN.
X_MAX = np.float32(88.72283935546875)
X_MIN = np.float32(-103.972084045410)


ROUND = np.float32(12582912.0)  # 1.5 * 2^23: adding it and taking it away rounds a float32 to an integer


@intrinsic
def _pow2(typingctx, n):
    """2^n for an integer-valued float32 n in [-126, 127], built from its exponent bits. In LLVM's own
    32-bit integer ops: Numba's scalar integer arithmetic would widen to 64-bit lanes and halve the SIMD."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.add(builder.fptosi(args[0], i32), ir.Constant(i32, 127)), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(types.float32), codegen


@njit(inline="always", cache=True, error_model="numpy")
def expf(x):
    """exp(x) for a float32 x: inf above X_MAX, 0 below X_MIN, NaN for NaN.

    Evaluated as written: callers must not compile it with fast-math reassociation (see exp_shifted).
    """
    c = min(max(x, X_MIN), X_MAX)  # keeps n in [-150, 128]
    n = (c * LOG2E + ROUND) - ROUND  # round(c / ln 2), without a call to floor
    r = (c - n * LN2_HI) - n * LN2_LO
    z = r * r
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = (p * z + r) + np.float32(1)
    # y * 2^n in two products of normal powers of two (2^n itself may be subnormal or 2^128): the second
    # product rounds once, into the subnormal range when it must, as np.exp does.
    adj = np.float32(-24) if n < np.float32(-126) else (np.float32(1) if n > np.float32(127) else np.float32(0))
    out = (y * _pow2(n - adj)) * _pow2(adj)
    if x > X_MAX:
        out = np.float32(np.inf)
    if x < X_MIN:
        out = np.float32(0)
    if x != x:
        out = x
    return out


@njit(cache=True, error_model="numpy")
def expf_array(x, out):
    """out = expf(x) elementwise, for 1-D float32 arrays (what the tests compare with np.exp)."""
    for i in range(x.shape[0]):
        out[i] = expf(x[i])


@njit(cache=True, error_model="numpy")  # no fast-math: reassociation would undo the exact range reduction above
def exp_shifted(a, n, shift):
    """a[:n] = exp(a[:n] - shift) in place: the numerators of a softmax tile (-inf scores give 0)."""
    for i in range(n):
        a[i] = expf(a[i] - shift)
