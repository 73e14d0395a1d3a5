"""A dense layer of a one-token step in arithmetic="exact" in one compiled call: the Numba backend's `decode_layer`,
which the forward pass (llama_ref/model/transformer.py) calls through `decode_layers` for each layer of a decode
step in place of the layer's lines.

Per op, a decode step makes ~14 calls into compiled code a layer, each behind Python's dispatch, wrappers and
allocations (on the default model's 30 small layers a fair share of the step), and on two threads every product
starts its parallel region after a return to Python. Here one compiled call makes the lines' kernel calls, in
their order and with their arguments: RMSNorm; the products of wq, wk, wv (together, as kernels/linear.linears
takes them); RoPE of q and k; k, v stored into the cache at start_pos; attention over the cached keys; wo; the
residual add; RMSNorm; w1, w3; SwiGLU; w2; the residual add. The regions then follow each other from compiled
code, a few microseconds apart, while the threads still spin.

The bits: the layer calls the very kernels the lines call (kernels/linear.py's _mv_*, elementwise.py's and
attention.py's), with arguments of the same Numba types (C-contiguous, read-only weights, the same empty slots of
the 16-bit kernels), so each is the same compiled code with the same float32 operations in the same order; what
is computed here in between is copies and the residual adds (one float32 add each, as NumPy's). Logits and the
whole cache equal the lines' (np.array_equal; tests/test_exact_step.py). Where that cannot be promised the call
declines (returns None) and the lines run: a batch, anything other than float32 activations and cache, a matrix
kept in float32 of another dtype or in a format without a decode kernel, shapes other than the config's, a
backend whose products are not these kernels' (a sums= copy keeps them for one row: model/ops.with_sums).

Unlike kernels/ggml_step.py there is no work table and no serial twin: the products are the per-op kernels
themselves (each a parallel function), not their work items re-run inside one region. The layer itself is
serial code that calls them; at one Numba thread each kernel's region runs on the calling thread as the lines'
does. The kernel for each weight's format is chosen when the layer is compiled, from the Numba types of the
weights' kernel arrays (_product below): one compiled layer per mix of formats (all one format: one).
"""

from __future__ import annotations

import weakref

import numpy as np
from numba import njit, types
from numba.extending import overload

from llama_ref.model import ops as spec

from . import linear as lin
from ._common import JIT, layer_matrix_shapes, layer_tensor_names, readonly
from .attention import _attention
from .elementwise import PARALLEL_MIN, _rms_norm_serial, _rope_serial, _swiglu

# A matrix is described to the compiled layer as a tuple (code, *the arrays its decode kernel takes): the format's
# code says which kernel (kernels/linear.py's KINDS; the two 16-bit ones, and the Q8 and Q4 families, share array
# types, so the code is read at run time between two kernels of one signature).
F32, F16, BF16, INT8, Q8, Q4, Q6_K = range(7)
_CODES = {lin._mv_f16_one: F16, lin._mv_bf16_one: BF16, lin._mv_int8: INT8, lin._mv_q8: Q8, lin._mv_q4: Q4,
          lin._mv_q6_k: Q6_K}


def _product(x, m, nw, no):
    """out (N, R) = x (N, K) @ w.T for one matrix described by m, as kernels/linear.linear computes a decode row's
    product (fewer rows of x than its BLAS thresholds). nw, no: the 16-bit kernels' empty weight and output slots
    (linear._NO_W, _NO_OUT). Compiled only (the overload below)."""
    raise NotImplementedError


@overload(_product)
def _product_typed(x, m, nw, no):
    """The kernel for m's array types: float32 (_mv_f32), uint16 (_mv_f16 / _mv_bf16 with two empty slots, as
    linear._mv_f16_one), int8 + scales (_mv_int8), bytes + block scales (_mv_q6_k), bytes + scales + offsets +
    has_min (_mv_q8 / _mv_q4)."""
    arrays = m.types[1:]
    if len(arrays) == 1 and arrays[0].dtype == types.float32:
        def f32(x, m, nw, no):
            out = np.empty((x.shape[0], m[1].shape[0]), np.float32)  # (N, R)
            lin._mv_f32(x, m[1], out)
            return out
        return f32
    if len(arrays) == 1 and arrays[0].dtype == types.uint16:
        def sixteen(x, m, nw, no):
            out = np.empty((x.shape[0], m[1].shape[0]), np.float32)
            if m[0] == F16:
                lin._mv_f16(x, m[1], nw, nw, out, no, no)
            else:
                lin._mv_bf16(x, m[1], nw, nw, out, no, no)
            return out
        return sixteen
    if len(arrays) == 2 and arrays[0].dtype == types.int8:
        def int8(x, m, nw, no):
            out = np.empty((x.shape[0], m[1].shape[0]), np.float32)
            lin._mv_int8(x, m[1], m[2], out)
            return out
        return int8
    if len(arrays) == 2:
        def q6_k(x, m, nw, no):
            out = np.empty((x.shape[0], m[1].shape[0]), np.float32)
            lin._mv_q6_k(x, m[1], m[2], out)
            return out
        return q6_k
    if len(arrays) == 4:
        def blocks(x, m, nw, no):
            out = np.empty((x.shape[0], m[1].shape[0]), np.float32)
            if m[0] == Q4:
                lin._mv_q4(x, m[1], m[2], m[3], m[4], out)
            else:
                lin._mv_q8(x, m[1], m[2], m[3], m[4], out)
            return out
        return blocks
    return None


def _products(x, ms, together, nw, no):
    """(x @ w.T for each matrix of the tuple ms) as kernels/linear.linears computes them: with together, two or
    three 16-bit matrices of one format in one call of their kernel, else one product each. Compiled only."""
    raise NotImplementedError


@overload(_products)
def _products_typed(x, ms, together, nw, no):
    n = len(ms.types)
    sixteen = all(len(t.types) == 2 and t.types[1].dtype == types.uint16 for t in ms.types)
    if n == 1:
        return lambda x, ms, together, nw, no: (_product(x, ms[0], nw, no),)
    if n == 2 and sixteen:
        def two(x, ms, together, nw, no):
            if not together:
                return _product(x, ms[0], nw, no), _product(x, ms[1], nw, no)
            a, b = ms[0][1], ms[1][1]
            oa = np.empty((x.shape[0], a.shape[0]), np.float32)
            ob = np.empty((x.shape[0], b.shape[0]), np.float32)
            if ms[0][0] == F16:
                lin._mv_f16(x, a, b, nw, oa, ob, no)
            else:
                lin._mv_bf16(x, a, b, nw, oa, ob, no)
            return oa, ob
        return two
    if n == 2:
        return lambda x, ms, together, nw, no: (_product(x, ms[0], nw, no), _product(x, ms[1], nw, no))
    if n == 3 and sixteen:
        def three(x, ms, together, nw, no):
            if not together:
                return _product(x, ms[0], nw, no), _product(x, ms[1], nw, no), _product(x, ms[2], nw, no)
            a, b, c = ms[0][1], ms[1][1], ms[2][1]
            oa = np.empty((x.shape[0], a.shape[0]), np.float32)
            ob = np.empty((x.shape[0], b.shape[0]), np.float32)
            oc = np.empty((x.shape[0], c.shape[0]), np.float32)
            if ms[0][0] == F16:
                lin._mv_f16(x, a, b, c, oa, ob, oc)
            else:
                lin._mv_bf16(x, a, b, c, oa, ob, oc)
            return oa, ob, oc
        return three
    if n == 3:
        return lambda x, ms, together, nw, no: (_product(x, ms[0], nw, no), _product(x, ms[1], nw, no),
                                                _product(x, ms[2], nw, no))
    return None


@njit(**JIT)
def _layer(h, kc, vc, keys, values, pos, cos, sin, an, fn, eps, n_heads, qkv, wo, w13, w2, together, nw, no):
    """The layer's lines for h (1, 1, D) at position pos -> the new h (1, 1, D); k, v stored into kc, vc (1,
    capacity, KVH, HD); keys, values: kc, vc's first pos + 1 positions (1, pos + 1, KVH, HD), views made by the
    caller as cache.update returns them. an, fn (D,): the norms' weights; qkv, wo, w13, w2: the matrices
    (tuples of _product's descriptions); together: bit 0 wq wk wv, bit 1 w1 w3 in one 16-bit call."""
    D = h.shape[2]
    KVH, HD = kc.shape[2], kc.shape[3]
    H = n_heads
    h2 = h.reshape((1, D))  # (1, D) as as_f32_rows gives it

    # attention block: norm, q k v, RoPE, the cache, attention, wo, residual
    x = np.empty((1, D), np.float32)
    _rms_norm_serial(h2, an, eps, x)
    q, k, v = _products(x, qkv, together & 1 != 0, nw, no)  # (1, H*HD), (1, KVH*HD), (1, KVH*HD)
    qr = np.empty((1, 1, H, HD), np.float32)
    _rope_serial(q.reshape((1, 1, H, HD)), cos, sin, qr)
    kr = np.empty((1, 1, KVH, HD), np.float32)
    _rope_serial(k.reshape((1, 1, KVH, HD)), cos, sin, kr)
    kc[0, pos] = kr[0, 0]  # cache.update's stores
    vc[0, pos] = v.reshape((KVH, HD))
    mask = np.ones((1, pos + 1), np.bool_)  # (1, S): attention's mask when the caller has none
    attn = np.empty((1, 1, H, HD), np.float32)
    _attention(qr, keys, values, pos, mask, attn)
    (o,) = _products(attn.reshape((1, H * HD)), wo, False, nw, no)  # (1, D)
    h1 = np.empty((1, D), np.float32)
    for d in range(D):
        h1[0, d] = h2[0, d] + o[0, d]

    # feed-forward block: norm, w1 w3, SwiGLU, w2, residual
    _rms_norm_serial(h1, fn, eps, x)
    gate, up = _products(x, w13, together & 2 != 0, nw, no)  # (1, F) each
    F = gate.shape[1]
    act = np.empty(F, np.float32)
    _swiglu(gate.reshape((F,)), up.reshape((F,)), act)
    (o,) = _products(act.reshape((1, F)), w2, False, nw, no)
    out = np.empty((1, 1, D), np.float32)
    for d in range(D):
        out[0, 0, d] = h1[0, d] + o[0, d]
    return out


# model -> {layer i: (ids of its 9 tensors (7 matrices, 2 norms), its plan: the _layer arguments that are the
# layer's own, or False where it declines)}, made on the first step. Held by the model (weakly), not by the tensors:
# a plan holds views of the weights, so a cache keyed by the tensors' lives would keep float32 weights alive. The
# ids are checked on every step: a weight replaced in model.weights makes a new plan (the old one holds the old
# tensors, so their ids are not reused meanwhile).
_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _describe(w):
    """A matrix as _product reads it: (code, *the arrays kernels/linear.linear hands its decode kernel), or None
    where linear would not call one of those kernels on it as it is (a float array of another dtype: converted per
    call; a packed format without a kernel: dequantized per call)."""
    if isinstance(w, np.ndarray):
        return (F32, readonly(w)) if w.dtype == np.float32 and w.ndim == 2 else None
    kind = lin._kind(w)
    if kind is None:
        return None
    code = _CODES.get(lin.KINDS[kind][0])
    return None if code is None else (code, *w.kernel_args())


def _together(ws) -> bool:
    """Whether kernels/linear.linears computes a decode row's products of ws in one 16-bit kernel call."""
    kinds = {None if isinstance(w, np.ndarray) else lin._kind(w) for w in ws}
    return len(kinds) == 1 and kinds.pop() in lin.SIXTEEN and 2 <= len(ws) <= 3


def _plan(model, tensors):
    """The layer's plan, or False when it must decline: every matrix one that a decode kernel takes as it is, with
    the shapes the model's config gives them; the norms' weights float32 (D,)."""
    args = model.args
    D, H, KVH, HD = args.dim, args.n_heads, args.kv_heads, args.head_dim
    wq, wk, wv, wo, w1, w3, w2, an, fn = tensors
    mats = (wq, wk, wv, wo, w1, w3, w2)
    shapes = layer_matrix_shapes(args, w1)
    described = [_describe(w) for w in mats]
    plan = False
    if (all(d is not None for d in described) and all(tuple(w.shape) == s for w, s in zip(mats, shapes))
            and all(isinstance(n, np.ndarray) and n.shape == (D,) and n.dtype == np.float32 for n in (an, fn))
            and max(D, H * HD) < PARALLEL_MIN):  # the lines' serial RMSNorm and RoPE (elementwise.py)
        together = int(_together((wq, wk, wv))) | int(_together((w1, w3))) << 1
        plan = (readonly(an), readonly(fn), np.float32(args.norm_eps), H, tuple(described[:3]),
                (described[3],), tuple(described[4:6]), (described[6],), together, (KVH, HD))
    return plan


# The sums= copies of this backend (model/ops.with_sums) that leave a product of one row to its own linear.
_SUMS_COPIES = frozenset(f"{__name__.rpartition('.')[0]}+{s}_sums" for s in spec.SUMS if spec.SUMS_MIN_ROWS[s] > 1)


def _own_products(backend) -> bool:
    """Whether backend's products of one decode row are this backend's kernels: this module's package itself, or
    a sums= copy of it that keeps them."""
    own = getattr(backend, "linear", None) is lin.linear and getattr(backend, "linears", None) is lin.linears
    return own or backend.__name__ in _SUMS_COPIES  # a copy without linears (one product at a time) declines


def decode_layer(model, i: int, h: np.ndarray, start_pos: int, cache, cos: np.ndarray, sin: np.ndarray):
    """Dense layer i of a one-token step (h (1, 1, D) at position start_pos) in one compiled call: -> the new h
    (1, 1, D), k and v stored into cache at start_pos, bit for bit as the forward pass's lines with this backend
    compute them; None where it cannot promise that (then the lines run)."""
    w = model.weights
    tensors = tuple(w[n] for n in layer_tensor_names(i))
    key = tuple(map(id, tensors))
    plans = _PLANS.get(model)
    if plans is None:
        plans = _PLANS[model] = {}
    known = plans.get(i)
    if known is None or known[0] != key:
        known = plans[i] = (key, _plan(model, tensors))
    plan = known[1]
    kc, vc = cache.k[i], cache.v[i]
    if (not plan or h.shape[:2] != (1, 1) or h.dtype != np.float32 or not h.flags.c_contiguous
            or kc.dtype != np.float32 or kc.shape[0] != 1 or start_pos >= kc.shape[1] or kc.shape[2:] != plan[9]
            or vc.dtype != np.float32 or vc.shape != kc.shape or not kc.flags.c_contiguous
            or not vc.flags.c_contiguous or cos.dtype != np.float32 or sin.dtype != np.float32
            or not cos.flags.c_contiguous or not sin.flags.c_contiguous or not _own_products(model.ops)):
        return None
    an, fn, eps, n_heads, qkv, wo, w13, w2, together, _ = plan
    S = start_pos + 1
    out = _layer(h, kc, vc, kc[:, :S], vc[:, :S], int(start_pos), cos, sin, an, fn, eps, n_heads, qkv, wo, w13, w2,
                 together, lin._NO_W, lin._NO_OUT)
    cache.length = S  # as cache.update: a rewind drops the later positions
    return out


def decode_layers(model, i: int, h: np.ndarray, start_pos: int, cache, cos: np.ndarray, sin: np.ndarray):
    """The forward pass's hook (llama_ref/model/transformer.py): layer i by decode_layer -> (the new h, i + 1), or
    None where it declines. One layer a call: an exact step's products take milliseconds, so a return to Python
    between layers costs little here."""
    out = decode_layer(model, i, h, start_pos, cache, cos, sin)
    return None if out is None else (out, i + 1)
