"""What every kernel module shares: compile options and the small helpers of the Python wrappers.

Every kernel computes in float32; a call with any other dtype goes to its NumPy twin in llama_ref.model.ops, so
only float32 variants are ever compiled. Arrays reach the compiled code in few, fixed types (C-contiguous,
weights read-only) so that each kernel compiles once and loads from Numba's on-disk cache afterwards.
"""

from __future__ import annotations

import numpy as np

# Importing the thread policy sets GOMP_SPINCOUNT (how long Numba's OpenMP threads spin between kernels)
# before Numba can start its threads.
from llama_ref.runtime import threads as _threads  # noqa: F401

# Fast-math flags for the kernels that sum products: "reassoc" lets LLVM split a dot product over SIMD lanes
# (a different summation order, within float32 rounding of the NumPy result) and "contract" fuses
# multiply-adds. No flag that assumes away NaN or inf (nnan, ninf) or changes division or exp (arcp, afn).
FAST = {"reassoc", "contract"}

# Every kernel is cached on disk: JIT compilation is paid once per machine, not per process. Numba checks a
# cached kernel against its own source file only: after editing this file or expf.py (which other kernels
# inline), delete kernels/__pycache__/*.nbi and *.nbc, or the old machine code keeps running. NumPy's error
# model: a float division by zero gives inf or NaN as in NumPy, instead of a check-and-raise branch per
# division that keeps LLVM from vectorizing the loop around it (SwiGLU, RMSNorm).
JIT = dict(cache=True, nogil=True, error_model="numpy")


def as_f32_rows(x: np.ndarray) -> np.ndarray:
    """x (..., K) as a C-contiguous float32 matrix (N, K); no copy when it already is one."""
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only, C-contiguous view of a weight, so writable and file-mapped weights share one compiled type."""
    if a.flags.writeable or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a).view()
        a.flags.writeable = False
    return a
