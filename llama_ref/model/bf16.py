"""A bf16 engine's matrix products, written out in NumPy: the specification of `arithmetic="bf16"`.

In the default ("exact") arithmetic a bf16 weight is widened to float32 and multiplied with the float32
activations. The hardware that multiplies bf16 (AMX's TDPBF16PS, AVX-512 BF16's VDPBF16PS, oneDNN under
PyTorch) cannot take a float32 x: it takes x rounded to bfloat16. This mode computes what such an engine
computes in its matrix products, and nothing else changes:

1. Before each product of the forward pass (wq, wk, wv, wo, w1, w3, w2 and the output head), the activation row
   is rounded to bfloat16: to nearest, ties to even (round_bf16: torch's `.to(torch.bfloat16)`, gguf's BF16
   quantizer), a NaN to the quiet NaN. It stays a float32 array whose low 16 bits are zero.
2. The product of a bf16 x and a bf16 weight has at most 16 significant bits: exact in float32.
3. The products are summed in float32, in the backend's order: BLAS's here, the AMX tiles' in the Numba
   backend (kernels/amx.py, one pass), the matrix-vector kernels' in a decode step.

Everything else (RMSNorm, RoPE, attention with its float32 KV cache, softmax, SwiGLU, the residual stream) is
exact mode's, in float32. So this is not a copy of a bf16 model, which also rounds the residual stream, the
norms' outputs, the cache and every elementwise result to bf16 (transformers' dtype=torch.bfloat16): it keeps
the one rounding that buys the hardware's speed. Why have it: on AMX tiles a bf16 prefill takes one pass this
way, where exact mode cuts every x into three bf16 parts and takes three (at the 1B shape, 1.44-1.48x exact mode's
prefill). Decode is bound by reading the weights and gains nothing.

What it costs, measured (docs/verification.md, 2c; tests/data/bf16_distance.json): on the default model's
weights rounded to bf16, logits 0.19-0.44 from the float64 truth at most (mean 0.035-0.06), against exact mode's
2e-5-8e-5 and transformers' bf16 model's 0.62-2.6 (mean 0.10-0.21).

The backends agree as in exact mode only product by product (tests/test_bf16_arithmetic.py). Over a model they
do not, and cannot without one summation order: a float32 sum that lands on the other side of a bf16 rounding
boundary moves the next product's input by a whole bf16 step, and over 30 layers such flips make the Numba and
NumPy logits as far apart as each is from float64. A bit-for-bit oracle of quantized arithmetic is
arithmetic="ggml"; this mode measures what bf16 activations cost, and runs fast.

Weights: every matrix the products read must be stored bf16 and kept 16-bit (the default for Meta and Hugging
Face directories, packed for a GGUF BF16 file); float32 computation only; one process. llama_ref.load(...,
arithmetic="bf16") takes its backend from backend_for(): llama_ref.model.ops with linear and linears below, or
the Numba kernels with kernels/linear.linear_bf16 and linears_bf16.
"""

from __future__ import annotations

import types

import numpy as np

from ..errors import InputError
from ..weights.bf16 import bf16_bits_to_float32, float32_to_bf16_bits
from . import ops

# The matrices whose products this mode rounds: a layer's seven and the output head (model/transformer.py).
PRODUCTS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
            "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")


def round_bf16(x: np.ndarray) -> np.ndarray:
    """x (float32, any shape) rounded to the nearest bfloat16, ties to even, as torch's .to(torch.bfloat16) rounds
    (weights/bf16.py: a finite x beyond bf16's range becomes inf, a NaN the quiet NaN 0x7FC0), kept as float32
    values with their low 16 bits zero."""
    return bf16_bits_to_float32(float32_to_bf16_bits(x))


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T with x rounded to bfloat16 first (rule 1); w a bf16 weight stored (out, in). x (..., in) ->
    (..., out). The products of bf16 values are exact in float32 (rule 2), so the rest is exact mode's product."""
    return ops.linear(round_bf16(x), w)


def linears(x: np.ndarray, *ws) -> tuple:
    """linear(x, w) for each w that reads the same x (wq, wk, wv; w1, w3): x rounded once."""
    xr = round_bf16(x)
    return tuple(ops.linear(xr, w) for w in ws)


# ---- choosing this arithmetic at load (llama_ref.load(..., arithmetic="bf16")) -------------------------------

def check_options(*, weights, dtype, parallel, sums) -> str:
    """The `weights` choice for bf16 mode, or an InputError for a load option it cannot honour."""
    if parallel is not None:
        raise InputError("arithmetic='bf16' runs in one process (parallel must be None)")
    if np.dtype(dtype) != np.float32:
        raise InputError(f"arithmetic='bf16' computes in float32, got dtype {np.dtype(dtype)}")
    if weights == "float32":
        raise InputError("arithmetic='bf16' multiplies the stored bf16 weights: weights must be 'packed' "
                         "(the default in this mode), not 'float32'")
    if sums not in (None, "blas"):
        raise InputError(f"sums={sums!r} is implemented for arithmetic='exact' only; arithmetic='bf16' sums "
                         f"its exact products as the backend's product does (sums='blas')")
    return "packed"


def _format(w) -> str:
    if isinstance(w, np.ndarray):
        return str(w.dtype)
    return getattr(w, "format", None) or type(w).__name__


def backend_for(backend: str, weights: dict, where: str, n_layers: int, llama4=None) -> types.ModuleType:
    """The backend computing bf16 mode for `backend` ("numpy": ops with this module's products; "numba": the
    kernels with kernels/linear.py's bf16 products), once every matrix the products read is bf16 (else an
    InputError naming the tensor and its type). Llama 4 (args.llama4), whose experts multiply through
    model/llama4.py's own products, is refused."""
    if llama4 is not None:
        raise InputError(f"{where}: arithmetic='bf16' is implemented for the dense Llama models, not Llama 4")
    names = [f"layers.{i}.{p}" for i in range(n_layers) for p in PRODUCTS] + ["output.weight"]
    for name in names:
        w = weights.get(name)
        if w is None:
            continue  # a checkpoint without it is refused by the model itself, naming what is missing
        if _format(w) != "bf16":
            raise InputError(f"{where}: tensor {name} is {_format(w)}; arithmetic='bf16' multiplies bf16 "
                             f"weights (load with arithmetic='exact', or convert the checkpoint to bf16)")
    if backend == "numpy":
        base, product, together = ops, linear, linears
    elif backend == "numba":
        from .. import kernels  # imported lazily, like the exact Numba backend
        from ..kernels.linear import linear_bf16, linears_bf16
        base, product, together = kernels, linear_bf16, linears_bf16
    else:
        raise InputError(f"backend must be 'numpy' or 'numba', got {backend!r}")
    copy = types.ModuleType(f"{base.__name__}+bf16")
    copy.__dict__.update({k: v for k, v in vars(base).items() if not k.startswith("__")})
    copy.linear, copy.linears = product, together
    copy.__dict__.pop("decode_layers", None)  # the fused exact step multiplies unrounded rows
    return copy
