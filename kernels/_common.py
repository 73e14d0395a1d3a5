"""What every kernel module shares: compile options and the small helpers of the Python wrappers.

Every kernel computes in float32; a call with any other dtype goes to its NumPy twin in llama_ref.model.ops, so
only float32 variants are ever compiled. Arrays reach the compiled code in few, fixed types (C-contiguous,
weights read-only) so that each kernel compiles once and loads from Numba's on-disk cache afterwards.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

# Importing the thread policy sets GOMP_SPINCOUNT (how long Numba's OpenMP threads spin between kernels)
# before Numba can start its threads.
from llama_ref.runtime import threads as _threads  # noqa: F401

# Fast-math flags for the kernels that sum products: "reassoc" lets LLVM split a dot product over SIMD lanes
# (a different summation order, within float32 rounding of the NumPy result) and "contract" fuses
# multiply-adds. No flag that assumes away NaN or inf (nnan, ninf) or changes division or exp (arcp, afn).
FAST = {"reassoc", "contract"}

# Every kernel is cached on disk: JIT compilation is paid once per machine, not per process (drop_stale_cache
# below keeps that cache honest). NumPy's error model: a float division by zero gives inf or NaN as in NumPy,
# instead of a check-and-raise branch per division that keeps LLVM from vectorizing the loop around it (SwiGLU,
# RMSNorm).
JIT = dict(cache=True, nogil=True, error_model="numpy")

# The sources a compiled kernel can hold code or constants of: every kernel module (this folder's *.py), and the
# specification modules they import (in the llama_ref package).
SPECIFICATION = ("model/ops.py", "model/ggml.py", "model/ggml_kquants.py", "vision/encoder.py")


def _cache_folder() -> "Path | None":
    """Where Numba keeps this folder's compiled kernels: what its first cache locator that accepts a file here
    chooses (kernels/__pycache__ in a source tree, else a user-wide or $NUMBA_CACHE_DIR folder); None if unknown."""
    try:
        from numba.core.caching import FunctionCache

        return Path(FunctionCache(_cache_folder).cache_path)
    except Exception:  # another Numba's internals: keep its own checks only
        return None


def _sources() -> list:
    """This folder's kernel modules and the specification modules they import (SPECIFICATION)."""
    import llama_ref

    package = Path(llama_ref.__file__).resolve().parent
    return sorted(Path(__file__).resolve().parent.glob("*.py")) + [package / name for name in SPECIFICATION]


def drop_stale_cache(folder: "Path | None" = None, sources: "list | None" = None) -> bool:
    """Drop the compiled kernels of other sources; True if it did. Numba checks a cached kernel against its own
    file only, but kernels inline each other's code (kernels/ggml_step.py inlines six modules), so after an edit or
    a `git pull` into an editable install a kernel whose own file did not change would load its old machine code:
    silently the old arithmetic. So a hash of all the sources is kept beside the cache, and on import a cache made
    from other sources (or of unknown ones) is deleted: its kernels compile again, once."""
    folder = _cache_folder() if folder is None else Path(folder)
    if folder is None:
        return False
    digest = hashlib.sha256()
    for path in (_sources() if sources is None else sources):
        path = Path(path)
        try:
            digest.update(f"{path.parent.name}/{path.name}".encode() + b"\0" + path.read_bytes())
        except OSError:  # not there (a trimmed install): its absence is part of the hash
            digest.update(f"{path.parent.name}/{path.name}".encode() + b"\0missing")
    stamp = folder / "llama_ref_sources.sha256"
    try:
        if stamp.read_text() == digest.hexdigest():
            return False
    except OSError:
        pass
    try:
        for old in [*folder.glob("*.nbi"), *folder.glob("*.nbc")]:
            old.unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        mine = folder / f"{stamp.name}.{os.getpid()}"
        mine.write_text(digest.hexdigest())
        os.replace(mine, stamp)  # whole or not at all: another process may read it now
    except OSError:  # a read-only install: Numba then keeps its cache elsewhere or none
        return False
    return True


drop_stale_cache()


def as_f32_rows(x: np.ndarray) -> np.ndarray:
    """x (..., K) as a C-contiguous float32 matrix (N, K); no copy when it already is one."""
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)


def aligned(shape, dtype) -> np.ndarray:
    """An empty C-contiguous array whose data starts on a 64-byte boundary, a cache line: a 512-bit vector load
    that straddles two lines runs at half speed (an AMX tile row: kernels/amx.py; a float64 row of x:
    kernels/sums.float64_sums, where NumPy's own allocation left 10-15 % on the table at 8-15 rows)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(n + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + n].view(dtype).reshape(shape)


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only, C-contiguous view of a weight, so writable and file-mapped weights share one compiled type."""
    if a.flags.writeable or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a).view()
        a.flags.writeable = False
    return a


_LAYER_NAMES: list = []  # layer i -> the names of its 9 tensors in the weights dict


def layer_tensor_names(i: int) -> tuple:
    """The weights-dict names of dense layer i's 7 matrices and 2 norms, in the order the decode layers take them
    (kernels/ggml_step.py, kernels/exact_step.py)."""
    while len(_LAYER_NAMES) <= i:
        p = f"layers.{len(_LAYER_NAMES)}."
        _LAYER_NAMES.append(tuple(p + n for n in (
            "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
            "feed_forward.w1.weight", "feed_forward.w3.weight", "feed_forward.w2.weight",
            "attention_norm.weight", "ffn_norm.weight")))
    return _LAYER_NAMES[i]


def layer_matrix_shapes(args, w1) -> tuple:
    """The (rows, cols) the model's config gives a dense layer's 7 matrices, in layer_tensor_names' order. The
    hidden size is read from w1 (-1 where w1 is not a matrix, which then matches nothing)."""
    D, H, KVH, HD = args.dim, args.n_heads, args.kv_heads, args.head_dim
    F = w1.shape[0] if getattr(w1, "ndim", 0) == 2 else -1
    return ((H * HD, D), (KVH * HD, D), (KVH * HD, D), (D, H * HD), (F, D), (F, D), (D, F))


@intrinsic
def address(typingctx, arr):
    """The byte address of an array's first element, as int64. `arr.ctypes.data` gives the same number, but makes
    an object holding a reference to the array: an atomic increment and decrement of its count, which a work item
    called ~13 000 times a decode step (kernels/ggml_linears.py) paid for each of its arrays."""
    if not isinstance(arr, types.Array):
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))
    return types.int64(arr), codegen
