"""Numba CPU kernels, installed as llama_ref.kernels. Each has a NumPy twin in llama_ref.model.ops.

A backend is a module with the functions the model calls: this one exports the same names and signatures
as llama_ref.model.ops, so `backend="numba"` changes how fast the forward pass runs, never what it computes
(beyond float32 rounding). Kernels compute in float32; other dtypes fall through to the NumPy twins. One more,
optional: decode_layers (exact_step.py), a dense layer of a one-token step as one compiled call of the same
kernels, which the forward pass asks for (model/transformer.py) and which gives the lines' bits or declines.
"""

from llama_ref.model.ops import rope_frequencies, rope_tables

from .attention import attention
from .elementwise import apply_rope, rms_norm, swiglu
from .exact_step import decode_layer, decode_layers
from .linear import embedding, linear, linears

__all__ = ["rms_norm", "linear", "linears", "embedding", "apply_rope", "attention", "swiglu", "rope_frequencies",
           "rope_tables", "decode_layer", "decode_layers"]
