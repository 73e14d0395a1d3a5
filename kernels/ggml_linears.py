"""One-row products in one compiled call: kernels/ggml.py's `linears` (wq, wk, wv; w1, w3 of a decode step, that
read the same x) and its `linear` of one row (wo, w2, the output head), the same bits as kernels/ggml.py's
quantized_linear weight by weight.

A decode step's products are small (the default model: 0.1-0.9 M values, ~10-60 us each on one thread), and
on two threads a Numba parallel region costs ~15-20 us to start and join (omp, quiet machine), so each product
alone either runs on the calling thread or pays a region for a few tens of microseconds of work. Here x is
quantized once per activation type (Q8_0 / Q8_1 for the legacy formats, Q8_K for the K-quants: a Q4_K_M file
mixes both), then one prange runs over the tiles of ROWS rows of all the matrices, one work list. Each weight
row meets the same quantized x in the same tile code as in its own product (kernels/ggml.py _decode_rows,
ggml_kquants._tile_rows / _q4_k_tile_rows, and for Q4_K with rows in groups of 8 ggml_kquants' 8-row tile on the
weight's repacked copy), so every output is bit for bit the one `linear` gives; only the split of rows over
threads differs, and no row's sum depends on it.
"""

from __future__ import annotations

import weakref

import numpy as np
from numba import njit, prange

from . import ggml as legacy
from . import ggml_kquants as kq
from ._common import JIT, address, readonly
from .ggml_ops import serial_product

ROWS = 16  # weight rows per work item, as both modules' products split them
# The kinds of the work list: kernels/ggml.py's KIND (0-14: Q8_0, Q5_1, Q4_0, repacked Q4_0, Q4_1, Q5_0; Q5_1 and
# Q5_0 in their file's blocks; 7, 8, 9 Q5_1, Q5_0 and Q4_1 in the "x8" form; 10-14 Q4_1, Q5_0, Q5_1, Q8_0 and Q4_0
# in "x16"), then the K-quants,
# whose activations are Q8_K; Q4_KR, Q4_K with rows in groups of 8, read from its repacked copy (ggml_kquants.q4_kx8).
Q4_K, Q4_KR, Q5_K, Q6_K = 16, 17, 18, 19
# The columns of the work list (one int64 row per weight): its kind, rows, blocks per row, the addresses and row
# strides of its bytes (qs / blocks; Q4_KR: the repacked copy and its stride per group of 8 rows), scales (d, or
# Q4_K's head) and mins (m), where its rows start in the output, and the first work item (tile) that is its.
KINDF, RF, NBF, WF, WSF, DF, DSF, MF, OUTF, TILEF = range(10)


@njit(inline="always", **JIT)
def weight_of(table, c):
    """The row of the work table whose weight holds work item c (its tiles are TILEF .. the next row's TILEF - 1)."""
    i = 0
    while i + 1 < table.shape[0] and table[i + 1, TILEF] <= c:
        i += 1
    return i


@njit(inline="always", **JIT)
def _acts(xq, xd, xs, off, kq8, kd, kbs):
    """What a work item reads of x, from _quantize's arrays: (Q8_0 / Q8_1 quants' address and columns, scales, sums,
    repacked Q4_0's offsets; Q8_K quants' address and columns, scales, block sums), as int64."""
    return (address(xq), np.int64(xq.shape[1]), address(xd), address(xs), address(off), address(kq8),
            np.int64(kq8.shape[1]), address(kd), address(kbs))


@njit(inline="always", **JIT)
def _item(c, table, acts, out0, use_simd):
    """Work item c: tile c of the weights' tiles taken in order (the weight whose tiles hold c, then its rows
    c0 .. c0 + ROWS - 1), each row as its own product computes it, into out (at out0) at the weight's offset; x
    by address (acts: _acts)."""
    x0, xK, xd0, xs0, off0, k0, kK, kd0, kbs0 = acts
    i = weight_of(table, c)
    kind, R, nb = table[i, KINDF], table[i, RF], table[i, NBF]
    w0, ws, d0, wds, m0 = table[i, WF], table[i, WSF], table[i, DF], table[i, DSF], table[i, MF]
    o0 = out0 + 4 * table[i, OUTF]
    r0 = (c - table[i, TILEF]) * ROWS
    r1 = min(R, r0 + ROWS)
    ost = np.int64(4 * R)
    if kind < Q4_K:  # kernels/ggml.py's decode rows: Q8_0 / Q8_1 activations
        xs = off0 if legacy._takes_offsets(kind) else xs0  # Q4_0's 8 sum(x) a block, or the Q8_1 sums
        legacy._rows_at(kind, w0, ws, d0, wds, m0, nb, x0, xK, xd0, xs, o0, ost, use_simd, r0, r1)
        return
    # ggml_kquants' tile rows with one activation row: Q8_K activations
    K, x0, xd0, bs0 = kK, k0, kd0, kbs0
    xds, bss = np.int64(4 * nb), np.int64(64 * nb)
    if kind == Q4_KR:  # the repacked copy: groups of 8 rows (ROWS is a multiple of 8, and so is R)
        g, g1 = r0 // 8, r1 // 8
        while g < g1:  # two groups at once where the 16 rows fill a 512-bit vector (as kq._q4_kx8_groups)
            if kq.two_groups(use_simd) and g + 1 < g1:
                kq._q4x16_1(w0 + g * ws, x0, K, xd0, bs0, xds, bss, nb, o0 + 32 * g, ost)
                g += 2
            else:
                kq._q4x8_1(w0 + g * ws, x0, K, xd0, bs0, xds, bss, nb, o0 + 32 * g, ost, use_simd)
                g += 1
        return
    for r in range(r0, r1):
        w = w0 + r * ws
        if kind == Q4_K:
            kq._q4_11(w, ws, d0 + r * wds, x0, K, xd0, bs0, xds, bss, nb, o0 + 4 * r, ost, use_simd)
        elif kind == Q5_K:
            kq._q5_11(w, ws, x0, K, xd0, bs0, xds, bss, nb, o0 + 4 * r, ost, use_simd)
        else:
            kq._q6_11(w, ws, x0, K, xd0, bs0, xds, bss, nb, o0 + 4 * r, ost, use_simd)


@njit(**JIT)
def _items(c0, c1, table, xq, xd, xs, off, kq8, kd, kbs, out, use_simd):
    """Work items c0 .. c1 - 1 of the work table, x quantized into xq .. kbs (_quantize) and out the products'.
    A function of its own, called, not inlined: its arguments live until it returns, so the addresses taken once
    here stay valid for every item; and _item inlines every kind's tiles, which compiled into each caller took
    minutes (kernels/ggml_step.py's four product groups). The items take x and out by address: passing the arrays
    into the inlined _item cost an atomic increment and decrement of five of their counts per item (~5% of a
    decode step of the default model, one thread)."""
    acts, out0 = _acts(xq, xd, xs, off, kq8, kd, kbs), address(out)
    for c in range(c0, c1):
        _item(c, table, acts, out0, use_simd)


@njit(inline="always", **JIT)
def _quantize(x, legacy_acts, k_acts, repacked):
    """x (1, K) float32 as the weights ask for it: Q8_0 / Q8_1 blocks (xq, xd, xs) when any weight is a legacy
    one, repacked Q4_0's offsets from them, Q8_K blocks (kq8, kd, kbs) when any is a K-quant; empty otherwise."""
    K = x.shape[1]
    nl, nk = (1 if legacy_acts else 0), (1 if k_acts else 0)
    xq = np.empty((nl, K), np.int8)
    xd = np.empty((nl, K // 32), np.float32)
    xs = np.empty((nl, K // 32), np.float32)
    off = np.empty((nl if repacked else 0, K // 32), np.int32)  # repacked Q4_0's, made in the same pass
    if legacy_acts:
        legacy._quantize_q8_row(x, xq, xd, xs, 0, off)
    kq8 = np.empty((nk, K), np.int8)
    kd = np.empty((nk, K // 256), np.float32)
    kbs = np.empty((nk, K // 256, 16), np.int32)
    if k_acts:
        kq._quantize_q8_K(x, kq8, kd, kbs)
    return xq, xd, xs, off, kq8, kd, kbs


@njit(**JIT)
def _linears_parallel(x, table, tiles, legacy_acts, k_acts, repacked, out, use_simd):
    """Every weight of table by the one row x (1, K) into out (sum of R,): x quantized on the calling thread,
    then one parallel region over all the tiles (_items_parallel)."""
    xq, xd, xs, off, kq8, kd, kbs = _quantize(x, legacy_acts, k_acts, repacked)
    _items_parallel(tiles, table, xq, xd, xs, off, kq8, kd, kbs, out, use_simd)


@njit(parallel=True, **JIT)
def _items_parallel(tiles, table, xq, xd, xs, off, kq8, kd, kbs, out, use_simd):
    """_items over all the tiles, shared by the threads. The addresses are taken before the region (the arrays are
    arguments: they live until it returns); a region that called _items once per item took each array's count up
    and down from both threads, the same cache lines bouncing between the cores: the output head of the default
    model 0.62 -> 1.13 ms (2 threads)."""
    acts, out0 = _acts(xq, xd, xs, off, kq8, kd, kbs), address(out)
    for c in prange(tiles):
        _item(c, table, acts, out0, use_simd)


@njit(**JIT)
def _linears_serial(x, table, tiles, legacy_acts, k_acts, repacked, out, use_simd):
    """_linears_parallel on the calling thread: the same work items in order, no parallel region."""
    xq, xd, xs, off, kq8, kd, kbs = _quantize(x, legacy_acts, k_acts, repacked)
    _items(0, tiles, table, xq, xd, xs, off, kq8, kd, kbs, out, use_simd)


# tuple(id(w) for w in ws) -> (table, tiles, legacy_acts, k_acts, repacked, offsets, weights' rows, the weights'
# arrays, their columns K), made once per group of weights (as kernels/ggml.py's _ARGS per weight); an entry goes
# when any of its weights goes, before an id can be reused.
_GROUPS: dict = {}


def _row(w) -> "tuple[list, bool, bool, tuple]":
    """The work list's row for weight w (its tile column left for later), whether its activations are Q8_K,
    whether it is repacked Q4_0, and the arrays the row's addresses point into (kept alive with it)."""
    R, K = w.shape
    if w.format in ("q5_k", "q6_k"):
        b = readonly(w.blocks)
        kind = Q5_K if w.format == "q5_k" else Q6_K
        return [kind, R, K // 256, b.ctypes.data, b.shape[1], 0, 0, 0], True, False, (b,)
    if w.format == "q4_k" and R % 8 == 0:  # llama.cpp's repacked Q4_K: its copy, as its own product reads it
        x8 = kq.q4_kx8(w)
        return [Q4_KR, R, K // 256, x8.ctypes.data, x8.shape[1], 0, 0, 0], True, False, (x8,)
    if w.format == "q4_k":
        qs, head = readonly(w.qs), readonly(w.head)
        return [Q4_K, R, K // 256, qs.ctypes.data, qs.shape[1], head.ctypes.data, 16 * (K // 256), 0], True, False, \
            (qs, head)
    kind, qs, d, m = legacy._weight_args(w)
    nb = d.shape[1]
    return [kind, R, nb, qs.ctypes.data, qs.shape[1], d.ctypes.data, nb * d.itemsize, m.ctypes.data], False, \
        legacy._takes_offsets(kind), (qs, d, m)


def _group(ws) -> tuple:
    key = tuple(id(w) for w in ws)
    group = _GROUPS.get(key)
    if group is None:
        rows, keep, offsets = [], [], []
        legacy_acts = k_acts = repacked = False
        out_at = tile = 0
        for w in ws:
            row, kact, rep, arrays = _row(w)
            rows.append(row + [out_at, tile])
            offsets.append(out_at)
            keep.append(arrays)
            k_acts |= kact
            legacy_acts |= not kact
            repacked |= rep
            out_at += w.shape[0]
            tile += (w.shape[0] + ROWS - 1) // ROWS
        table = np.array(rows, np.int64)
        table.flags.writeable = False
        group = _GROUPS[key] = (table, tile, legacy_acts, k_acts, repacked, tuple(offsets), out_at, keep,
                                 ws[0].shape[1])
        for w in ws:
            weakref.finalize(w, _GROUPS.pop, key, None)
    return group


def linears(x: np.ndarray, *ws, use_simd: "int | None" = None) -> tuple:
    """tuple(kernels.ggml.linear(x, w) for w in ws), bit for bit: for one row of x (a decode step) and weights
    in the integer formats, in one compiled call (x quantized once per activation type, one parallel region
    over all the rows, or none where serial_product says the whole work is small); otherwise weight by
    weight. kernels/ggml.py's linear sends its one-row products here too (ws one weight)."""
    K = x.shape[-1]
    group = _GROUPS.get(tuple(map(id, ws)))  # a decode step's products: made on the first step
    if group is None:
        if not all(legacy.spec.supported(w) and w.shape[1] == K for w in ws):
            return tuple(legacy._rows_linear(x, w) for w in ws)
        group = _group(ws)
    if x.size != K:  # a prefill's rows
        return legacy._rows_linears(x, ws)
    if x.dtype != np.float32 or not x.flags.c_contiguous or group[8] != K:
        return tuple(legacy._rows_linear(x, w) for w in ws)
    table, tiles, legacy_acts, k_acts, repacked, offsets, total, _, _ = group
    out = np.empty(total, np.float32)
    use = legacy.SIMD if use_simd is None else int(use_simd)
    run = _linears_serial if serial_product(1, total * K) else _linears_parallel
    run(x.reshape(1, K), table, tiles, legacy_acts, k_acts, repacked, out, use)
    lead = x.shape[:-1]
    if len(ws) == 1:
        return (out.reshape(lead + (total,)),)  # no slice to take
    return tuple(out[o:o + w.shape[0]].reshape(lead + (w.shape[0],)) for o, w in zip(offsets, ws))
