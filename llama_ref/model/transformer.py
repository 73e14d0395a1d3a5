"""The Llama forward pass. This file is the specification; it reads top to bottom.

Weights live in one dict under Meta's names (tok_embeddings.weight, layers.{i}.attention.wq.weight, ...),
with wq/wk rows in Meta's interleaved RoPE pairing; every loader converts to this layout. Every operation
comes from a backend (`llama_ref.model.ops` for NumPy, `llama_ref.kernels` for Numba) with identical signatures.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Optional

import numpy as np

from . import llama4, ops
from .cache import KVCache
from .config import ModelArgs
from ..errors import InputError
from ..generation.generate import GenerationMixin
from ..runtime.parallel import SINGLE
from ..runtime.threads import StepThreads, adapts_threads


class Transformer(GenerationMixin):
    """A Llama model: config, weights in Meta's layout, a backend of operations, and a KV cache."""

    arithmetic = "exact"  # or "ggml": llama.cpp's quantized arithmetic (set by llama_ref.load, model/ggml.py)

    def __init__(self, args: ModelArgs, weights: dict, *, backend: "str | ModuleType" = "numpy",
                 dtype=np.float32, freq_divisors: Optional[np.ndarray] = None):
        self.args = args
        self.weights = weights
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise InputError(f"dtype must be float32 or float64 for computation, got {self.dtype}")
        self.backend_name, self.ops = _resolve_backend(backend)
        self.freqs = self.ops.rope_frequencies(args, freq_divisors)  # (HD/2,) float64
        self.cache: Optional[KVCache] = None
        # Held by the generation that uses self.cache (llama_ref.generation.generate); others get a cache of their own.
        self.cache_lock = threading.Lock()
        self.tokenizer = None  # attached by llama_ref.load
        self.source = None
        self.capture = None  # set by llama_ref.tools.capture to collect intermediate tensors by name
        # Llama 3.2 Vision (llama_ref.vision.model): a block run before text layer i, (i, h, start_pos, cache) -> h.
        self.cross_attention = None
        # The ranks this model's matrices are split across (llama_ref.runtime.parallel); in one process SINGLE, whose
        # all_reduce and all_gather return their argument.
        self.parallel = SINGLE
        # How many threads the numba backend's one-token steps run on (runtime/threads.py: fewer while fewer are
        # faster, as when another process holds a core; the values are the same at any count).
        self.step_threads = StepThreads()

    # ---- the forward pass ----------------------------------------------------------------------------
    @adapts_threads  # a one-token call on the numba backend runs on StepThreads' count of threads (same values)
    def forward(self, tokens, start_pos: int = 0, *, cache: Optional[KVCache] = None,
                key_mask: Optional[np.ndarray] = None, last_only: bool = False) -> np.ndarray:
        """Logits for a chunk of tokens placed at positions start_pos .. start_pos+T-1.

        tokens: (T,) or (B, T) ints. Prefill, chunked prefill and one-token decode are all this call; the
        chunk's keys and values join `cache` (the model's own cache if none is given; a call at start_pos 0
        starts it afresh). Returns float logits (T, V) or (B, T, V); only the last position if last_only.
        """
        args, op, w, rec = self.args, self.ops, self.weights, self._record  # op: the backend (ops or kernels)
        tokens, batched, cache = self._prepare(tokens, start_pos, cache)  # tokens (B, T)
        B, T = tokens.shape
        H, KVH, HD = args.n_heads, args.kv_heads, args.head_dim
        cos, sin = self.ops.rope_tables(self.freqs, start_pos, T, self.dtype)  # (T, HD/2) each

        # Token embeddings: one row of the table per token (tensor parallel: each rank holds part of it).
        h = op.embedding(tokens, w["tok_embeddings.weight"], self.dtype)  # (B, T, D)
        h = rec("embeddings", self.parallel.all_reduce(h))
        # A backend may compute layers of a one-token step in one compiled call (kernels/ggml_step.py, exact_step.py):
        # the values of the lines below, bit for bit, without a return to Python between them. None where it does not.
        fused = _fused_layers(self, key_mask) if T == 1 else None
        fused_to = 0  # layers below this one are done

        for i in range(args.n_layers):
            if i < fused_to:
                continue
            if self.cross_attention is not None:  # Llama 3.2 Vision: gated cross-attention to the images
                h = self.cross_attention(i, h, start_pos, cache)
            if args.llama4 is not None:  # Llama 4: experts, NoPE layers, chunked attention (model/llama4.py)
                h = llama4.layer(self, i, h, start_pos, cache, key_mask, cos, sin)
                continue
            if fused is not None and (done := fused(self, i, h, start_pos, cache, cos, sin)) is not None:
                h, fused_to = done  # (B, 1, D): layers i .. fused_to - 1, as the lines below compute them
                continue
            p = f"layers.{i}."
            # Attention block, pre-norm: normalise, project to queries, keys and values.
            x = rec(p + "attention_norm", op.rms_norm(h, w[p + "attention_norm.weight"], args.norm_eps))  # (B, T, D)
            q, k, v = linears(op, x, w[p + "attention.wq.weight"], w[p + "attention.wk.weight"],
                              w[p + "attention.wv.weight"])  # (B, T, H*HD), (B, T, KVH*HD), (B, T, KVH*HD)
            q, k, v = q.reshape(B, T, H, HD), k.reshape(B, T, KVH, HD), v.reshape(B, T, KVH, HD)
            # Rotate queries and keys by their absolute positions (relative positions emerge in q.k).
            q = rec(p + "attention.q", op.apply_rope(q, cos, sin))  # (B, T, H, HD)
            k = rec(p + "attention.k", op.apply_rope(k, cos, sin))  # (B, T, KVH, HD)
            v = rec(p + "attention.v", v)  # (B, T, KVH, HD), not rotated
            # Append this chunk's keys and values to the cache and attend causally over all of them.
            keys, values = cache.update(i, start_pos, k, v)  # (B, S, KVH, HD) each
            attn = rec(p + "attention.heads", op.attention(q, keys, values, start_pos, key_mask))  # (B, T, H, HD)
            # Mix the heads back into the residual stream (tensor parallel: add every rank's heads).
            out = op.linear(attn.reshape(B, T, H * HD), w[p + "attention.wo.weight"])  # (B, T, D)
            out = rec(p + "attention.output", self.parallel.all_reduce(out))
            h = rec(p + "attention_residual", h + out)  # (B, T, D)

            # Feed-forward block, pre-norm: SwiGLU, w2(silu(w1 x) * w3 x).
            x = rec(p + "ffn_norm", op.rms_norm(h, w[p + "ffn_norm.weight"], args.norm_eps))  # (B, T, D)
            gate, up = linears(op, x, w[p + "feed_forward.w1.weight"], w[p + "feed_forward.w3.weight"])  # (B, T, F)
            gate, up = rec(p + "feed_forward.gate", gate), rec(p + "feed_forward.up", up)
            out = op.linear(op.swiglu(gate, up), w[p + "feed_forward.w2.weight"])  # (B, T, D)
            out = rec(p + "feed_forward.output", self.parallel.all_reduce(out))  # tensor parallel: add the ranks' terms
            h = rec(p + "residual", h + out)  # (B, T, D)
        cache.remember(start_pos, tokens, key_mask is not None)

        # Final norm, then the output head (the embedding table itself when the model ties them).
        if last_only:
            h = h[:, -1:]  # (B, 1, D)
        h = rec("norm", op.rms_norm(h, w["norm.weight"], args.norm_eps))  # (B, T, D)
        logits = op.linear(h, w["output.weight"])  # (B, T, V)
        logits = rec("logits", self.parallel.all_gather(logits))  # tensor parallel: join the ranks' vocabulary slices
        return logits if batched else logits[0]

    __call__ = forward

    def _record(self, name: str, x: np.ndarray) -> np.ndarray:
        """Hand an intermediate tensor to the active capture (tools/capture.py), and return it."""
        if self.capture is not None:
            self.capture.record(name, x)
        return x

    def _prepare(self, tokens, start_pos: int, cache: Optional[KVCache]) -> tuple[np.ndarray, bool, KVCache]:
        """Check the call and make room in the cache: (tokens (B, T) int64, whether a batch was given, cache)."""
        tokens = np.asarray(tokens)
        batched = tokens.ndim == 2
        tokens = self._check_tokens(tokens, start_pos)  # (B, T)
        B, T = tokens.shape
        if cache is None:
            if self.cache is None or start_pos == 0 or self.cache.batch_size != B:
                if start_pos != 0:
                    raise InputError("start_pos > 0 needs a cache holding the earlier positions")
                self.cache = self.new_cache(B)
            cache = self.cache
        if start_pos > cache.length:
            raise InputError(f"start_pos {start_pos} would leave a gap: the cache holds positions "
                             f"0 .. {cache.length - 1} only")
        cache.reserve(start_pos + T)
        cache.forget_from(start_pos)  # an interrupted call leaves the ids of the positions before it only
        return tokens, batched, cache

    def _check_tokens(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        if tokens.ndim == 1:
            tokens = tokens[None, :]
        if tokens.ndim != 2:
            raise InputError(f"tokens must have shape (T,) or (B, T), got {tokens.shape}")
        if tokens.shape[1] == 0:
            raise InputError("tokens is empty: the model needs at least one token")
        if tokens.dtype.kind not in "iu":
            if tokens.dtype.kind == "f" and np.all(tokens == np.round(tokens)):
                tokens = tokens.astype(np.int64)
            else:
                raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}")
        bad = (tokens < 0) | (tokens >= self.args.vocab_size)
        if bad.any():
            raise InputError(f"token id {int(tokens[bad][0])} is outside the vocabulary "
                             f"(0 .. {self.args.vocab_size - 1})")
        if not isinstance(start_pos, (int, np.integer)) or start_pos < 0:
            raise InputError(f"start_pos must be a non-negative integer, got {start_pos!r}")
        if start_pos + tokens.shape[1] > self.args.max_seq_len:
            raise InputError(f"positions {start_pos}..{start_pos + tokens.shape[1] - 1} exceed the context "
                             f"window of {self.args.max_seq_len} tokens")
        return tokens.astype(np.int64, copy=False)

    def reset(self) -> None:
        """Forget the cached positions."""
        self.cache = None

    @property
    def cache_values(self):
        """What this model's arithmetic stores in its KV cache: the backend's cache_values (arithmetic="ggml":
        keys and values rounded to fp16, as llama.cpp's F16 cache holds them), or None (as computed)."""
        return getattr(self.ops, "cache_values", None)

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> KVCache:
        """An empty KV cache for this model: its dtype, and what its arithmetic stores (cache_values), in the
        arithmetic's own storage type where it has one (cache_storage: ggml's fp16 values in float16)."""
        return KVCache(self.args, batch_size, self.dtype, capacity, values=self.cache_values,
                       storage=getattr(self.ops, "cache_storage", None))


def linears(op, x: np.ndarray, *ws) -> tuple:
    """op.linear(x, w) for each w: the projections that read the same x (wq, wk, wv; w1, w3). A backend with a
    `linears(x, *ws)` of its own computes them together, the same values (one parallel region, one quantized
    copy of x, one choice of the columns to sum apart); any other backend takes them one by one."""
    together = getattr(op, "linears", None)
    return together(x, *ws) if together is not None else tuple(op.linear(x, w) for w in ws)


def _fused_layers(model, key_mask):
    """The backend's `decode_layers(model, i, h, start_pos, cache, cos, sin) -> (h, end) or None`, where one call may
    stand in for the lines of layers i .. end - 1 (at least layer i; only it when a vision block runs before each
    layer): not while a capture records the steps between them, under a key mask, or split over ranks."""
    if model.capture is not None or key_mask is not None or model.parallel is not SINGLE:
        return None
    return getattr(model.ops, "decode_layers", None)


def _resolve_backend(backend):
    if isinstance(backend, ModuleType):
        return backend.__name__, backend
    if backend == "numpy":
        return "numpy", ops
    if backend == "numba":
        from .. import kernels  # imported lazily: compiling kernels is only paid for when asked
        return "numba", kernels
    raise InputError(f"backend must be 'numpy' or 'numba', got {backend!r}")
