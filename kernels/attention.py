"""Causal grouped-query attention over the KV cache, for one-token decode and prefill chunks alike.

One work item is (batch, query head, query position); the query head reads its group's KV head straight
from the cache (no KV head is repeated or copied). Keys are visited in tiles with a running
maximum, flash-attention style: scores of a tile, then the softmax numerator and the weighted sum of values
are rescaled only when the maximum grows. Memory stays O(tile) whatever the context length.

Chunks of BLAS_MIN_QUERIES queries or more (prefill) go to NumPy's BLAS instead: two matrix products per KV
head and block of queries, with a causal softmax in between, faster than the loops above once there are
many queries to share each key. That softmax is serial on purpose: right after a BLAS call, OpenBLAS's
threads still spin on the other cores, and a parallel Numba region fighting them measured ~6x slower.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from llama_ref.model import ops
from llama_ref.runtime import threads

from ._common import FAST, JIT
from .expf import exp_shifted

TILE = 64  # keys per tile
BLAS_MIN_QUERIES = 16  # query positions from which a chunk's attention goes to BLAS
QUERY_BLOCK = 64  # queries per block of the BLAS path: scores of H x 64 x S floats at a time ...
SCORES_BUDGET = 1 << 24  # ... and fewer queries when that would exceed 16M floats (64 MiB): long contexts


@njit(parallel=True, fastmath=FAST, **JIT)
def _attention(q, k, v, start_pos, key_mask, out):
    """q, out (B, T, H, HD); k, v (B, S, KVH, HD); key_mask (B, S) bool (all True when the caller has none)."""
    B, T, H, HD = q.shape
    G = H // k.shape[2]  # query heads per KV head
    root = np.float32(np.sqrt(HD))  # scores are divided by sqrt(HD) in float32, as in the reference
    neg_inf = np.float32(-np.inf)
    for item in prange(B * H * T):
        # One (batch, query head, position) per item: a decode step still has H items to share out. Later
        # queries see more keys, so position i is paired with T-1-i: every thread's share costs the same.
        b, rest = item // (H * T), item % (H * T)
        h, i = rest // T, rest % T
        t = i // 2 if i % 2 == 0 else T - 1 - i // 2
        kvh = h // G  # the KV head this query head reads, in place
        last = start_pos + t  # this query may see keys 0 .. last
        scores = np.empty(TILE, np.float32)  # (TILE,)
        acc = np.zeros(HD, np.float32)  # (HD,) running sum of p * v
        run_max, run_sum = neg_inf, np.float32(0)
        for s0 in range(0, last + 1, TILE):
            s1 = min(last + 1, s0 + TILE)
            # Scores of this tile; masked keys score -inf.
            tile_max = neg_inf
            for s in range(s0, s1):
                score = neg_inf
                if key_mask[b, s]:
                    dot = np.float32(0)
                    for d in range(HD):
                        dot += q[b, t, h, d] * k[b, s, kvh, d]
                    score = dot / root
                scores[s - s0] = score
                tile_max = max(tile_max, score)
            if tile_max == neg_inf:
                continue  # every key of the tile is masked: nothing to add
            # A larger maximum rescales what was summed so far: exp(old - new) <= 1.
            if tile_max > run_max:
                shrink = np.exp(run_max - tile_max)
                run_sum *= shrink
                for d in range(HD):
                    acc[d] *= shrink
                run_max = tile_max
            exp_shifted(scores, s1 - s0, run_max)  # (s1 - s0,) softmax numerators, vectorized
            for s in range(s1 - s0):
                run_sum += scores[s]
            for s in range(s0, s1):
                p = scores[s - s0]
                for d in range(HD):
                    acc[d] += p * v[b, s, kvh, d]
        # A query that sees no key at all (left padding) gets zeros, as in the reference.
        inv = np.float32(1) / run_sum if run_sum > 0 else np.float32(0)
        for d in range(HD):
            out[b, t, h, d] = acc[d] * inv


@njit(fastmath=FAST, **JIT)
def _causal_softmax(scores, n, root):
    """Softmax, in place, of each row of scores / root over the keys its query sees.

    scores (R, S): rows are (KV head, group head, query i of n), the queries at the last n positions of
    the S keys, so row query i sees keys 0 .. S - n + i; later keys get probability 0. Rows that see no
    key (every score -inf: left padding) become zeros, as in the reference.
    """
    R, S = scores.shape
    neg_inf = np.float32(-np.inf)
    for row in range(R):
        seen = S - n + row % n + 1
        top = neg_inf
        for s in range(seen):
            scores[row, s] /= root
            top = max(top, scores[row, s])
        if top == neg_inf:
            for s in range(S):
                scores[row, s] = 0
            continue
        exp_shifted(scores[row], seen, top)
        total = np.float32(0)
        for s in range(seen):
            total += scores[row, s]
        for s in range(seen):
            scores[row, s] /= total
        for s in range(seen, S):
            scores[row, s] = 0


def _attention_blas(q, k, v, start_pos, key_mask):
    """Prefill chunks: each KV head's scores for a block of queries as one BLAS product.

    The G query heads of a KV head are stacked as rows, so every KV head is read in place. Queries go in
    blocks of QUERY_BLOCK, and a block multiplies only the keys its last query can see: causal attention
    skips the upper triangle of the scores, about half of the work of a prompt. The softmax in between
    (_causal_softmax) masks each query's future keys as it goes, shifted by the row maximum. The (batch,
    block, KV head) items are shared by the threads of runtime.threads.each_thread, each multiplying with
    a one-thread BLAS: a multi-threaded BLAS call here left OpenBLAS's threads spinning (~0.1 s) through
    the projections that follow, which run on that same pool (kernels/linear.py).
    """
    B, T, H, HD = q.shape
    KVH = k.shape[2]
    G = H // KVH
    root = np.float32(np.sqrt(HD))
    block = max(1, min(QUERY_BLOCK, SCORES_BUDGET // (H * k.shape[1])))  # queries per block
    out = np.empty(q.shape, np.float32)  # (B, T, H, HD)
    items = iter([(b, t0, h) for b in range(B) for t0 in range(0, T, block) for h in range(KVH)])

    def work():
        for b, t0, h in items:  # shared by the threads: next() on it is atomic under the GIL
            n = min(T, t0 + block) - t0
            S = start_pos + t0 + n  # keys 0 .. S-1 are visible to some query of the block
            keys = k[b, :S, h].T  # (HD, S) a view
            values = v[b, :S, h]  # (S, HD) a view
            rows = q[b, t0:t0 + n, h * G:(h + 1) * G].transpose(1, 0, 2).reshape(G * n, HD)  # (G*n, HD)
            scores = rows @ keys  # (G*n, S)
            if key_mask is not None and not key_mask[b, :S].all():
                scores[:, ~key_mask[b, :S]] = -np.inf
            # Query t0+i sits at position start_pos+t0+i and sees keys 0 .. that position.
            _causal_softmax(scores, n, root)
            heads = scores @ values  # (G*n, HD)
            out[b, t0:t0 + n, h * G:(h + 1) * G] = heads.reshape(G, n, HD).transpose(1, 0, 2)  # (n, G, HD)

    threads.each_thread(work, threads.count())
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
              key_mask: "np.ndarray | None" = None) -> np.ndarray:
    """Causal grouped-query attention of a chunk of queries over all cached keys. Same contract as ops.

    q (B, T, H, HD) at positions start_pos ..; k, v (B, S, KVH, HD), S = start_pos + T; key_mask (B, S).
    """
    if q.dtype != np.float32 or k.dtype != np.float32 or v.dtype != np.float32:
        return ops.attention(q, k, v, start_pos, key_mask)
    if q.shape[1] >= BLAS_MIN_QUERIES:
        return _attention_blas(q, k, v, int(start_pos), key_mask)
    B, S = k.shape[0], k.shape[1]
    if key_mask is None:
        key_mask = np.ones((B, S), np.bool_)
    out = np.empty(q.shape, np.float32)  # (B, T, H, HD)
    _attention(np.ascontiguousarray(q), np.ascontiguousarray(k), np.ascontiguousarray(v), int(start_pos),
               np.ascontiguousarray(key_mask, dtype=np.bool_), out)
    return out
