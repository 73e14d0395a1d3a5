"""The dense layers of a one-token step in arithmetic="ggml" in one compiled call: kernels/ggml.py's
`decode_layers`, which the forward pass (llama_ref/model/transformer.py) calls in place of the layers' lines.

Per op, a decode step of the default model (30 layers) makes ~14 compiled calls a layer, each a few to tens of
microseconds of work behind Python's dispatch, allocations and wrappers; on two threads each product also starts a
parallel region after the threads may have gone back to sleep. Here one call does what the lines do, in their order:
RMSNorm; x quantized; wq, wk, wv (kernels/ggml_linears.py's work items: the same tiles, so the same bits); RoPE of q
and k; k, v rounded to fp16 and stored into the cache at start_pos (model/cache.py: the cache of arithmetic="ggml"
holds fp16 values in float16 arrays, as cache.store rounds them; here taken as their bits, uint16); the attention of
the one query row (ggml_ops' _attention_item per KV head, reading the head's fp16 keys and values where they lie in
the cache: no copy, unlike the lines' attention, which widens and gathers every head's rows each call); wo; the
residual add; RMSNorm; w1, w3; SwiGLU; w2; the residual add. One parallel region runs the whole step: every thread
runs the lines, and the threads share the products' tiles and the attention's heads, each phase's outputs read only
once its count says all are done (PHASES below); at one Numba thread the same function compiled without the region
runs. One call runs every layer of the step (the cache's layers are views of one array, KVCache.layers): a call per
layer returned to Python between layers, ~15 us each with its checks, and the threads could fall asleep meanwhile
(measured 1.06-1.3x on a 1B Q4_K step, ~1.1x on the default model's Q4_0).

Every value is computed by the same code as the per-op lines (the same float32 operations in the same order), so
the layer's output and the cache are the lines', bit for bit (tests/test_ggml_step.py). Where that cannot be
promised the call declines (returns None) and the lines run: a batch, anything other than float32, a matrix
the one-row products do not take (F32 / F16), a head size that is no multiple of 8, shapes that disagree, a
cache that does not hold its keys and values in float16 arrays (in this arithmetic Transformer.new_cache's do).

The two compiled layers inline code of ggml_linears, ggml.py, ggml_kquants, ggml_ops, ggml_vec and ggml_simd, and
Numba's on-disk cache checks a kernel against its own file only; _common.drop_stale_cache drops every cached
kernel when any of the sources changed, so an edit of one of those recompiles these too. A first compile of both
takes ~1-4 minutes (2-core EPYC).
"""

from __future__ import annotations

import functools
import weakref

import numba
import numpy as np
from numba import njit, prange

from llama_ref.model import ggml as spec

from . import ggml as legacy
from . import ggml_linears as gl
from ._common import JIT, layer_matrix_shapes, layer_tensor_names
from .ggml_ops import _attention_item, _rms_norm_row, _rope_row, _swiglu_row
from .atomics import fetch_add, load_acquire, spin_pause
from .ggml_simd import fp16_bits, prefetch

# The products of a layer, in the order the lines make them: (wq, wk, wv), (wo,), (w1, w3), (w2,).
QKV, WO, W13, W2 = range(4)
# The columns of a plan's `groups` (int64, one row per product group): its rows in the joined work table, its
# work items (tiles), which activations it quantizes x to (ggml_linears._quantize), its outputs.
T0, T1, TILES, LEGACY, KACTS, REPACKED, TOTAL = range(7)
# `serial` bits: group g's products run on one thread (one share, taken whole by the first to claim it) when bit g
# is set, the attention when bit 4 is.
ATTENTION = 4

# Below these a phase's work runs on one thread, as kernels/ggml_ops' SERIAL_WEIGHTS / SERIAL_WORK do for the lines:
# weights of a product group (rows x columns), attention's heads x visible keys x head size. Within one call the
# threads stay hot between phases (when each phase was a region of its own, ~4 us on a quiet machine, not the
# ~15-20 us of a region after Python), so the limits are far lower than the lines'. Measured under other helpers'
# load (benchmarks/results/ggml_decode_fused_layer_s31.md) neither 0 nor the lines' 2^20 won in every format; 0, as
# the lead's quiet measurement of the lines favoured (every product shared). The rows are the same work items either
# way: the same bits.
SERIAL_WEIGHTS = 0
SERIAL_WORK = 1 << 14
# Each thread, its share of a product group done, asks for the first PREFETCH_NEXT bytes of its share of the layer's
# next group (q, k, v -> wo -> w1, w3 -> w2) and the first lines of their scales: a phase's threads otherwise start
# their shares cold from memory, and the lines between phases (RoPE, the cache, attention, norms) leave the time
# for them to arrive. Hints only: no value depends on them. AMD EPYC Zen 3, 2 threads, the default model's decode
# alternated with the step without them (session 53): Q4_0 median 266 against 250 tok/s and 244 against 206 in a
# busier spell, 8 KiB over 16; Q8_0 and Q5_0 (bound by the tiles' arithmetic there) within the noise.
PREFETCH_NEXT = 8 << 10  # bytes (8 KiB)

# The phases of a layer whose work the threads share: its four product groups (QKV, WO, W13, W2: their tiles) and
# the attention (ATTENTION: its KV heads). One parallel region runs all of a step's layers (_layers_parallel): each
# thread runs the lines between the phases on its own (the same bits: norms, quantizing x, RoPE, SwiGLU, residuals;
# a few microseconds a layer) and takes its part of each phase, then waits until the phase's count says every item
# is done, where a region a phase cost ~1.5 us to start and end (an empty one, 2 threads), and a thread that ended
# its share early waited there. A thread takes its own share first (as prange split it: the same streams, and
# PREFETCH_NEXT asks for the right bytes), CHUNKS chunks a share, then what is left of the others' shares, so a
# thread that runs late (a descheduled vCPU) leaves its chunks to the others. Each chunk goes to the thread whose
# atomic add claimed it (kernels/atomics.py); a thread waits only on chunks others have claimed and are computing,
# so whatever order the threads run in (even one after the other) the step ends. Every item is the same tile or
# head whoever takes it: the same bits.
PHASES = 5
CHUNKS = 4
LINE_BYTES = 64  # each counter on a cache line of its own


@njit(inline="always", **JIT)
def _share_start(t, c):
    """The byte addresses where work item c of the work table t starts reading: its first weight row (a repacked
    Q4_K's group of 8 rows) and that row's scales (ggml_linears' columns)."""
    i = gl.weight_of(t, c)
    r0 = (c - t[i, gl.TILEF]) * gl.ROWS
    rows = t[i, gl.WF] + (r0 // 8 if t[i, gl.KINDF] == gl.Q4_KR else r0) * t[i, gl.WSF]
    return rows, t[i, gl.DF] + r0 * t[i, gl.DSF]


@njit(inline="always", **JIT)
def _prefetch_share(t, c):
    """Ask for the first PREFETCH_NEXT bytes of work item c's weight rows and 256 of their scales (prefetcht0: a
    request never faults, even past an array's end)."""
    rows, scales = _share_start(t, c)
    for off in range(0, PREFETCH_NEXT, 64):
        prefetch(rows + off)
    for off in range(0, 256, 64):
        prefetch(scales + off)


@njit(inline="always", **JIT)
def _share(total, s, shares):
    """Share s of `shares` of a phase's `total` items -> (its first item, its end, the items a chunk of it takes:
    CHUNKS chunks a share)."""
    lo, hi = total * s // shares, total * (s + 1) // shares
    return lo, hi, max(1, (hi - lo + CHUNKS - 1) // CHUNKS)


@njit(inline="always", **JIT)
def _claim(base, s, lo, hi, size):
    """The next chunk of share s (items lo .. hi - 1, `size` a chunk; its counter on line s + 1 of the phase's
    counters at base) -> (c0, c1); c0 >= hi when none is left. Each chunk goes to exactly one thread."""
    c0 = lo + fetch_add(base + LINE_BYTES * (s + 1), 1) * size
    return c0, min(hi, c0 + size)


@njit(inline="always", **JIT)
def _wait(base, total):
    """Until the phase's `total` items are done (its count, line 0 of its counters at base): every thread's
    writes of them are then visible to this one."""
    while load_acquire(base) < total:
        spin_pause()


@njit(inline="always", **JIT)
def _products(g, x, table, groups, out, use_simd, serial, p, n, base):
    """Product group g of the layer by the one row x (1, K) into out (its total,), thread p's part of it: x quantized
    as its weights ask (ggml_linears._quantize; every thread quantizes its own copy, the same bits), then
    ggml_linears' work items over the group's own rows of the joined table, claimed a chunk at a time (_claim)
    from thread p's own share first, then from what is left of the others' (serial: one share, taken by whoever
    comes first), until every item is done."""
    t = table[groups[g, T0]:groups[g, T1]]
    xq, xd, xs, off, kq8, kd, kbs = gl._quantize(x, groups[g, LEGACY] != 0, groups[g, KACTS] != 0,
                                                 groups[g, REPACKED] != 0)
    tiles = groups[g, TILES]
    shares = 1 if serial else n
    for k in range(shares):
        s = (p + k) % shares
        lo, hi, size = _share(tiles, s, shares)
        while True:
            c0, c1 = _claim(base, s, lo, hi, size)
            if c0 >= hi:
                break
            gl._items(c0, c1, t, xq, xd, xs, off, kq8, kd, kbs, out, use_simd)
            fetch_add(base, c1 - c0)
        if k == 0 and g < W2:  # the first bytes of this thread's share of the next group, as it will split them
            _prefetch_share(table[groups[g + 1, T0]:groups[g + 1, T1]], groups[g + 1, TILES] * p // n)
    _wait(base, tiles)


@njit(**JIT)
def _attend_head(kc, vc, S, q, pos, scale, wide, attn, j):
    """KV head j of the one query row: ggml_ops' work item for it (T = 1: item j is head j) on the cache's first S
    positions seen as (1, KVH, S, HD), the layout it takes (a view: one key row to the next is KVH * HD floats)."""
    _attention_item(q, kc[:, :S].transpose((0, 2, 1, 3)), vc[:, :S].transpose((0, 2, 1, 3)), pos, scale, wide,
                    attn, j, np.empty(0, np.uint16))  # one query: the scores from the keys' rows


@njit(inline="always", **JIT)
def _attention(kc, vc, k, v, pos, q, scale, wide, attn, serial, p, n, base):
    """The attention of the one query row, thread p's part of it: KV heads claimed one at a time, as _products
    claims tiles; each claimed head's key and value stored into the cache at pos as its values (fp16, cache.store;
    kc, vc their bits), then its attention (_attend_head) on the cache's first pos + 1 positions."""
    KVH, HD = kc.shape[2], kc.shape[3]
    shares = 1 if serial else n
    for i in range(shares):
        s = (p + i) % shares
        lo, hi, _ = _share(KVH, s, shares)
        while True:
            j, _ = _claim(base, s, lo, hi, 1)
            if j >= hi:
                break
            for d in range(HD):
                kc[0, pos, j, d] = fp16_bits(k[0, 0, j, d])
                vc[0, pos, j, d] = fp16_bits(v[j, d])
            _attend_head(kc, vc, pos + 1, q, pos, scale, wide, attn, j)
            fetch_add(base, 1)
    _wait(base, KVH)


@njit(inline="always", **JIT)
def _layer(h, kc, vc, pos, cos, sin, table, groups, norms, use_simd, wide, serial, p, n, base, shared):
    """The layer's lines for h (1, 1, D) at position pos, thread p of n's part of them -> the new h (1, 1, D); k, v
    stored into kc, vc (1, capacity, KVH, HD) uint16: the bits of the cache's fp16 values. norms: (2, D + 2)
    float32, the attention and feed-forward norms' weights, each row followed by eps and attention's scale. Every
    thread runs the lines between the phases on its own copies (the same bits); the phases' outputs are the
    layer's row of `shared`; phase f's counters at base + f (n + 1) LINE_BYTES."""
    D = h.shape[2]
    KVH, HD = kc.shape[2], kc.shape[3]
    Q = groups[QKV, TOTAL]
    H = (Q - 2 * KVH * HD) // HD
    F = groups[W13, TOTAL] // 2
    eps, scale = norms[0, D], norms[0, D + 1]
    at = (n + 1) * LINE_BYTES  # bytes of a phase's counters
    h2 = h.reshape((1, D))
    qkv, attn = shared[:Q], shared[Q:Q + H * HD].reshape((1, 1, H, HD))
    o, gu, o2 = shared[Q + H * HD:Q + H * HD + D], shared[Q + H * HD + D:Q + H * HD + D + 2 * F], shared[-D:]

    # attention block: norm, q k v, RoPE, the cache and attention, wo, residual
    x = np.empty((1, D), np.float32)
    _rms_norm_row(h2, norms[0, :D], eps, x, 0)
    _products(QKV, x, table, groups, qkv, use_simd, serial & 1, p, n, base + QKV * at)
    q = np.empty((1, 1, H, HD), np.float32)
    _rope_row(qkv[:H * HD].reshape((1, 1, H, HD)), cos, sin, q, 0)
    k = np.empty((1, 1, KVH, HD), np.float32)
    _rope_row(qkv[H * HD:(H + KVH) * HD].reshape((1, 1, KVH, HD)), cos, sin, k, 0)
    v = qkv[(H + KVH) * HD:].reshape((KVH, HD))
    _attention(kc, vc, k, v, pos, q, scale, wide, attn, serial & (1 << ATTENTION), p, n, base + ATTENTION * at)
    _products(WO, attn.reshape((1, H * HD)), table, groups, o, use_simd, serial & 2, p, n, base + WO * at)
    h1 = np.empty((1, D), np.float32)
    for d in range(D):
        h1[0, d] = h2[0, d] + o[d]

    # feed-forward block: norm, w1 w3, SwiGLU, w2, residual
    _rms_norm_row(h1, norms[1, :D], eps, x, 0)
    _products(W13, x, table, groups, gu, use_simd, serial & 4, p, n, base + W13 * at)
    act = np.empty((1, F), np.float32)
    _swiglu_row(gu[:F].reshape((1, F)), gu[F:].reshape((1, F)), wide, act, 0)
    _products(W2, act, table, groups, o2, use_simd, serial & 8, p, n, base + W2 * at)
    out = np.empty((1, 1, D), np.float32)
    for d in range(D):
        out[0, 0, d] = h1[0, d] + o2[d]
    return out


@njit(inline="always", **JIT)
def _layers(h, kb, vb, pos, cos, sin, table, groups, norms, use_simd, wide, serial, p, n, sync, shared):
    """Consecutive layers, the first from h (1, 1, D), thread p of n's part of them: layer j's cache kb[j], vb[j]
    (1, capacity, KVH, HD; fp16 bits), its product groups groups[j] (4, 7; rows of the joined table), its norms
    norms[j] (2, D + 2), its phases' outputs shared[j] and counters (zeros at the start) from byte j PHASES
    (n + 1) LINE_BYTES of sync on."""
    for j in range(kb.shape[0]):
        h = _layer(h, kb[j], vb[j], pos, cos, sin, table, groups[j], norms[j], use_simd, wide, serial, p, n,
                   np.int64(sync.ctypes.data) + j * PHASES * (n + 1) * LINE_BYTES, shared[j])
    return h


@njit(inline="always", **JIT)
def _scratch(h, kb, groups, n):
    """The counters of every layer's phases (zeros; n + 1 lines a phase: its count of items done, then a claim
    counter per share) and the phases' outputs (a row a layer: q k v, attention, wo, w1 w3, w2)."""
    D, KVH, HD = h.shape[2], kb.shape[3], kb.shape[4]
    Q = groups[0, QKV, TOTAL]
    sync = np.zeros(kb.shape[0] * PHASES * (n + 1) * LINE_BYTES // 8, np.int64)
    shared = np.empty((kb.shape[0], 2 * Q - 2 * KVH * HD + 2 * D + groups[0, W13, TOTAL]), np.float32)
    return sync, shared


@njit(parallel=True, **JIT)
def _layers_parallel(h, kb, vb, pos, cos, sin, table, groups, norms, use_simd, wide, serial, threads):
    """_layers on `threads` threads in one parallel region: each runs every layer's lines and takes its part of
    each phase (_claim), waiting on a phase's count only for the outputs it reads next. The count comes from
    Python: numba.get_num_threads() here is a ctypes call, which Numba's disk cache refuses."""
    n = threads
    sync, shared = _scratch(h, kb, groups, n)
    out = np.empty(h.shape, np.float32)
    for p in prange(n):
        hp = _layers(h, kb, vb, pos, cos, sin, table, groups, norms, use_simd, wide, serial, p, n, sync, shared)
        if p == 0:
            out[:] = hp
    return out


@njit(**JIT)
def _layers_serial(h, kb, vb, pos, cos, sin, table, groups, norms, use_simd, wide, serial, threads):
    """_layers on the calling thread alone (thread 0 of 1: every chunk its own, in order). A function of its own,
    not _layers_parallel's compiled again: Numba's on-disk cache keys a kernel by its Python function and
    signature, not its flags, so a twin would load the other's machine code."""
    sync, shared = _scratch(h, kb, groups, 1)
    return _layers(h, kb, vb, pos, cos, sin, table, groups, norms, use_simd, wide, serial, 0, 1, sync, shared)


# tuple of ids of a layer's 9 tensors (7 matrices, 2 norms) -> its plan (table, groups, norms, the groups of
# ggml_linears that keep the weights' arrays alive, weights per group) or False where the layer declines; made on
# the first step, dropped when any matrix goes (before its id can be reused), as ggml_linears' _GROUPS.
_PLANS: dict = {}


def _plan(model, tensors, key):
    """The layer's plan, or False when it must decline: every matrix in a format ggml_linears takes in one call,
    with the shapes the model's config gives them."""
    args = model.args
    D, KVH, HD = args.dim, args.kv_heads, args.head_dim
    wq, wk, wv, wo, w1, w3, w2, an, fn = tensors
    mats = (wq, wk, wv, wo, w1, w3, w2)
    shapes = layer_matrix_shapes(args, w1)
    plan = False
    if (HD % 8 == 0 and all(spec.supported(w) and tuple(w.shape) == s for w, s in zip(mats, shapes))
            and all(np.shape(n) == (D,) for n in (an, fn))):
        groups_w = ((wq, wk, wv), (wo,), (w1, w3), (w2,))
        made = [gl._group(ws) for ws in groups_w]
        tables, rows, at = [], [], 0
        for g in made:
            table, tiles, legacy_acts, k_acts, repacked, _, total, _, _ = g
            rows.append([at, at + table.shape[0], tiles, legacy_acts, k_acts, repacked, total])
            tables.append(table)
            at += table.shape[0]
        table = np.concatenate(tables)
        groups = np.array(rows, np.int64)
        norms = np.empty((2, D + 2), np.float32)
        norms[0, :D] = np.ascontiguousarray(an, np.float32)  # as ggml_ops.rms_norm converts them
        norms[1, :D] = np.ascontiguousarray(fn, np.float32)
        norms[:, D] = np.float32(args.norm_eps)
        norms[:, D + 1] = np.float32(1 / np.sqrt(HD))  # ggml_ops.attention's scale
        for a in (table, groups, norms):
            a.flags.writeable = False
        weights = [sum(w.shape[0] for w in ws) * ws[0].shape[1] for ws in groups_w]
        plan = (table, groups, norms, made, weights, (KVH, HD))
    try:
        for t in tensors:  # every tensor, norms too: a stale id must not find this plan
            weakref.finalize(t, _PLANS.pop, key, None)
    except TypeError:  # a tensor without weak references: not cached, so never stale
        return plan
    _PLANS[key] = plan
    return plan


# tuple of ids of the 9 tensors of each of layers i .. end - 1 -> their run (below) or False where layer i declines;
# dropped, as a plan, when any of those tensors goes.
_RUNS: dict = {}


def _run(model, tensors, key):
    """The run of the layers whose tensors these are, from the first as far as they have plans, as one compiled
    call takes it: (its layers n, the joined work table, groups (n, 4, 7) with rows in that table, norms (n, 2,
    D + 2), weights per product group, (KVH, HD), the plans, which keep the weights' arrays alive); False where
    the first layer declines."""
    plans = []
    for at in range(0, len(tensors), 9):
        plan = _PLANS.get(key[at:at + 9])
        if plan is None:
            plan = _plan(model, tensors[at:at + 9], key[at:at + 9])
        if not plan:
            break
        plans.append(plan)
    run = False
    if plans:
        groups = np.stack([p[1] for p in plans])  # (n, 4, 7)
        starts = np.cumsum([0] + [p[0].shape[0] for p in plans[:-1]])  # where each layer's rows go in the table
        groups[:, :, T0] += starts[:, None]
        groups[:, :, T1] += starts[:, None]
        table, norms = np.concatenate([p[0] for p in plans]), np.stack([p[2] for p in plans])
        for a in (table, groups, norms):
            a.flags.writeable = False
        run = (len(plans), table, groups, norms, plans[0][4], plans[0][5], plans)  # every layer has the same shapes
    try:
        for t in tensors:
            weakref.finalize(t, _RUNS.pop, key, None)
    except TypeError:  # a tensor without weak references: not cached, so never stale
        return run
    _RUNS[key] = run
    return run


@functools.lru_cache(maxsize=256)
def _names(i: int, end: int) -> tuple:
    return tuple(n for layer in range(i, end) for n in layer_tensor_names(layer))


def decode_layers(model, i: int, h: np.ndarray, start_pos: int, cache, cos: np.ndarray, sin: np.ndarray):
    """Dense layers i .. end - 1 of a one-token step (h (1, 1, D) at position start_pos) in one compiled call: ->
    (the new h (1, 1, D), end), each layer's k and v stored into cache at start_pos, bit for bit as the forward
    pass's lines with kernels/ggml compute them; None where layer i cannot promise that (then its lines run).
    The run goes on to the last layer, or up to one that declines, or only to layer i when a vision block runs
    before each layer (model.cross_attention) or the cache's layers are not views of one array (KVCache.layers)."""
    w = model.weights
    end = model.args.n_layers if model.cross_attention is None else i + 1
    tensors = tuple(map(w.__getitem__, _names(i, end)))
    key = tuple(map(id, tensors))
    run = _RUNS.get(key)
    if run is None:
        run = _run(model, tensors, key)
    if (not run or h.shape[:2] != (1, 1) or h.dtype != np.float32 or not h.flags.c_contiguous
            or cos.dtype != np.float32 or not cos.flags.c_contiguous or not sin.flags.c_contiguous):
        return None
    n, table, groups, norms, weights, (KVH, HD), _ = run
    blocks = cache.layers(i, i + n) if hasattr(cache, "layers") else None
    if blocks is None:  # this layer alone, its cache as it lies
        n, blocks = 1, (cache.k[i][None], cache.v[i][None])
    kb, vb = blocks  # (n, 1, capacity, KVH, HD) each
    # float16 arrays: their older positions hold fp16 values, whoever made the cache, as the step reads them
    if (kb.dtype != np.float16 or vb.dtype != np.float16 or kb.shape != vb.shape or kb.shape[1] != 1
            or start_pos >= kb.shape[2] or kb.shape[3:] != (KVH, HD) or not kb.flags.c_contiguous
            or not vb.flags.c_contiguous):
        return None
    threads = numba.get_num_threads()
    if threads == 1:
        step, serial = _layers_serial, 0
    else:
        step = _layers_parallel
        serial = sum(1 << g for g in range(4) if weights[g] < SERIAL_WEIGHTS)
        if (groups[0, QKV, TOTAL] - 2 * KVH * HD) * (start_pos + 1) < SERIAL_WORK:  # heads x keys x head size
            serial |= 1 << ATTENTION
    out = step(h, kb.view(np.uint16), vb.view(np.uint16), start_pos, cos, sin, table, groups[:n], norms[:n],
               legacy.SIMD, spec._isa(None) == "avx512", serial, threads)
    cache.length = start_pos + 1  # as cache.update: a rewind drops the later positions
    return out, i + n
