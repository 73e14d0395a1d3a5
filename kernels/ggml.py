"""Numba twin of llama_ref.model.ggml: arithmetic="ggml" compiled, bit for bit (tests/test_ggml_kernels.py,
tests/test_ggml_arithmetic.py).

The matrix products: the activation rows are quantized to Q8_0 / Q8_1 blocks here (_quantize_q8, the
specification's x86 quantize_row_q8_0 / q8_1), and each weight row's dot product with them runs in
kernels/ggml_simd.py's vector IR: the integers of each block (vpdpbusd, AVX2's vpmaddubsw + vpmaddwd, or
portable IR, exact every way), then ggml's float order with true fused multiply-adds (llvm.fma). Work is
split over tiles of ROWS weight rows (prange); in a prefill four rows are summed side by side against four
activation rows (on AVX2 as two passes of two, ggml_simd.SPLIT_ACTS, so the sums fit the 16 registers) and every
activation row passes the tile while its bytes are in cache; a decode reads the rows one after another, each
product of one row in one compiled call that quantizes x too, on the calling thread or in one parallel region
(kernels/ggml_linears.py, which also takes the projections that read the same x together). The other
operations (attention over the fp16 cache, softmax, RMSNorm, RoPE, SwiGLU) are kernels/ggml_ops.py's. No
fast-math anywhere.
"""

from __future__ import annotations

import weakref

import numpy as np
from numba import njit, prange

from llama_ref.model import ggml as spec
from llama_ref.model.ggml import rope_frequencies  # noqa: F401  (the specification's own)
from llama_ref.weights.packed import Q4_0Weight, Q4_1Weight, Q5_0Weight, Q5_1Weight, Q8_0Weight, q5_scales_in_order

from . import ggml_simd as simd
from .linear import _rows_q8
from .linear import embedding as _compiled_rows
from ._common import JIT, readonly
from .ggml_ops import apply_rope, attention, rms_norm, rope_tables, serial_product, swiglu  # noqa: F401

ROWS = 16  # weight rows per parallel work item: their bytes stay in cache while every activation row passes
# Q5_0 (kind 5) and Q5_1 (kind 1) in their file's blocks (_weight_args): a decode's tile spreads the fifth bits
# and nibbles in registers, as llama.cpp's does.
KIND = {"q8_0": 0, "q5_1": 1, "q4_0": 2, "q4_0r": 3, "q4_1": 4, "q5_0": 5, "q5_1x8": 7, "q5_0x8": 8, "q4_1x8": 9,
        "q4_1x16": 10, "q5_0x16": 11, "q5_1x16": 12, "q8_0x16": 13, "q4_0x16": 14}
# Q5_1 (kind 7), Q5_0 (8) and Q4_1 (9) in the "x8" form (weights/packed.py Q5_BIT_ORDERS, Q4_1Weight: each 8 rows'
# blocks side by side), where this host's tiles read Q5's fifth bits "shifted" (AVX2 without GFNI: X8_HOST, where it
# was measured) and the rows come in groups of 8: a decode's 8-row tile (ggml_simd._define_x8) turns the 8 rows'
# lanes on their side, the same sums. One weight form a host and shape (the file's bytes moved, not changed).
X8 = (7, 8, 9)
X8_HOST = simd.Q5_BIT_ORDER == "shifted"
# Q4_1 (kind 10), Q5_0 (11), Q5_1 (12) and Q8_0 (13) in the "x16" form (Q4_1Weight.x8_form(16), Q5_BIT_ORDERS,
# Q8_0Weight.x8_form(16): each 16 rows' blocks side by side) where the host runs 512-bit VNNI at full width
# (ggml_simd.host_prefers_512: Intel's AVX-512 Xeons) and the rows come in groups of 16: a decode's 16-row tile
# (ggml_simd._define_x16), 16 rows' lanes on their side in each 512-bit vector. The default model's decode on an
# Emerald Rapids guest: sessions.md, sessions 63, 64. Q4_0 (14) in the same form (Q4_0Weight.x8_form(16)) keeps
# repacked Q4_0's arithmetic (one integer a block and row): ggml_simd._define_q4_0x16's tiles of 16 rows by one
# activation row or ACTS, a prefill's too (no unpacking: the form is the one those tiles read).
X16_HOST = simd.HAS_VNNI512 and simd.host_prefers_512()
# A prefill (more than one activation row) first unpacks each tile's ROWS rows of a Q5 or Q4_1 weight to one byte per
# value (ggml_simd.unpack_row, _unpacked_tile; a scratch of the thread's own), then runs the byte tiles on them: Q5_1
# and Q4_1 this kind, Q5_0 Q8_0's (its int8 values q - 16). Only _linear sees this kind, never
# kernels/ggml_linears.py's work list.
Q5_1_BYTES = 6

# The best integer instructions of this CPU (VNNI, else AVX2), unless LLAMA_REF_GGML_PORTABLE=1 asks for the
# portable integer code (same results).
SIMD = simd.simd_default()

ACTS = 4  # activation rows per tile of a prefill: each weight block loaded once for 4 of them


def _tiles(kind):
    """(rows x acts tiles of kind): (4 x 4, 4 x 1, 1 x 4, 1 x 1); repacked Q4_0: (8 x 4, 8 x 1)."""
    rows = 8 if kind == "q4_0r" else 4
    return (simd.make_dot(kind, rows, ACTS), simd.make_dot(kind, rows, 1),
            simd.make_dot(kind, 1, ACTS) if rows == 4 else None, simd.make_dot(kind, 1, 1) if rows == 4 else None)


_q8_RA, _q8_R1, _q8_1A, _q8_11 = _tiles("q8_0")
# Q5_1 and Q5_0 in their file's 24 / 22 bytes a block (_weight_args): only a decode's tiles, one row or 4 (_q5_1_R1,
# _q5_0_R1 below) by one activation row (a prefill unpacks to one byte per value: Q5_1_BYTES and Q8_0's tiles)
_q5_1_11 = simd.make_dot("q5_1c", 1, 1)
_q5_0_11 = simd.make_dot("q5_0c", 1, 1)
# A decode's rows 4 at a time (1 or 4: the 4-row tiles; repacked Q4_0 keeps its 8), each row's sums in its own order,
# as alone: the activation's loads, the offset (Q5_0) and the loop shared, and four fma chains at once where one row
# waits on its own chain, 4 cycles a block (Q4_1 and Q5_1 two chains, the mins'). Sapphire Rapids-class Xeon, session
# 39, one thread, alternated in one process: the default model's 1536 x 576 in cache 1.1-1.3x the one-row tile's rate
# (Q8_0 1.25x, Q4_1 1.2-1.3x), 1B's 8192 x 2048 streamed from memory the same (Q5_0 7-9 GB/s, Q8_0 11 GB/s either
# way); model decode (Q5_0) 94 against 74 tok/s. On an AVX2 EPYC (Zen 3, session 51; 2 threads, model decodes
# alternated, 3 rounds, 4 rows against 1) too: the default model Q4_1 1.18-1.22x, Q5_0 1.07-1.32x, Q5_1 1.18-1.33x,
# Q8_0 0.95-1.17x, Q4_K_M 0.99-1.14x, Q5_K_M 0.94-1.08x; the 1B shape Q4_1 1.09-1.19x, Q5_0 1.06-1.17x, Q8_0
# 0.98-1.11x, Q5_1 0.97-1.00x. (Zen kept one row at a time from the Zen 3 sessions, when the 4-row tiles of that
# time took 1.3-2.4x longer out of cache there.) Zen 4 is not measured with them.
DECODE_ROWS = 4
_q5_1_R1 = simd.make_dot("q5_1c", 4, 1)
_q5_0_R1 = simd.make_dot("q5_0c", 4, 1)
_q5_1x8_R1, _q5_0x8_R1 = simd.make_dot("q5_1x8", 8, 1), simd.make_dot("q5_0x8", 8, 1)  # decode, 8 rows
_q4_1x8_R1 = simd.make_dot("q4_1x8", 8, 1)
_q4_1x16_R1 = simd.make_dot("q4_1x16", 16, 1)  # decode, 16 rows
_q5_0x16_R1, _q5_1x16_R1 = simd.make_dot("q5_0x16", 16, 1), simd.make_dot("q5_1x16", 16, 1)
_q8_0x16_R1 = simd.make_dot("q8_0x16", 16, 1)
_q4_0x16_RA, _q4_0x16_R1 = simd.make_dot("q4_0x16", 16, ACTS), simd.make_dot("q4_0x16", 16, 1)
_q5_1x_RA, _q5_1x_R1, _q5_1x_1A, _q5_1x_11 = _tiles("q5_1")  # one byte per value: a prefill's
_q4_0_RA, _q4_0_R1, _q4_0_1A, _q4_0_11 = _tiles("q4_0")
_q4_0r_RA, _q4_0r_R1, _, _ = _tiles("q4_0r")
# Q4_1 with fp16 d, m pairs (_weight_args): only a decode's tiles (a prefill unpacks it to Q5_1_BYTES: _unpacked_tile)
_q4_1_R1, _q4_1_11 = simd.make_dot("q4_1h", 4, 1), simd.make_dot("q4_1h", 1, 1)


@njit(inline="always", **JIT)
def _dot(kind, many_rows, many_acts, w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd):
    """One call of kernels/ggml_simd.py's tile for this weight kind: 4 rows (8 for kind 3) or 1, by ACTS
    activation rows or 1."""
    if kind == 0:
        if many_rows:
            if many_acts:
                _q8_RA(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
            else:
                _q8_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
        elif many_acts:
            _q8_1A(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
        else:
            _q8_11(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == 1:  # Q5_1's file blocks: 4 rows or one by one activation row (a decode's)
        if many_rows:
            _q5_1_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
        else:
            _q5_1_11(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == 5:  # Q5_0's, the same
        if many_rows:
            _q5_0_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
        else:
            _q5_0_11(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == 2:
        if many_rows:
            if many_acts:
                _q4_0_RA(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
            else:
                _q4_0_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
        elif many_acts:
            _q4_0_1A(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
        else:
            _q4_0_11(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == Q5_1_BYTES:  # Q5_1 one byte per value (a prefill's, unpacked: _linear)
        if many_rows:
            if many_acts:
                _q5_1x_RA(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
            else:
                _q5_1x_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
        elif many_acts:
            _q5_1x_1A(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
        else:
            _q5_1x_11(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == 7:  # Q5_1 in the "x8" form: 8 rows by one activation row (a decode's; R % 8 == 0)
        _q5_1x8_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == 8:  # Q5_0's, the same
        _q5_0x8_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == 9:  # Q4_1's, the same
        _q4_1x8_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == 10:  # Q4_1 in the "x16" form: 16 rows by one activation row (a decode's; R % 16 == 0)
        _q4_1x16_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == 11:  # Q5_0's, the same
        _q5_0x16_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == 12:  # Q5_1's, the same
        _q5_1x16_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == 13:  # Q8_0's, the same
        _q8_0x16_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == 14:  # Q4_0 in the "x16" form: always 16 rows (R % 16 == 0)
        if many_acts:
            _q4_0x16_RA(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
        else:
            _q4_0x16_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    elif kind == 3:  # repacked Q4_0: always 8 rows (R % 8 == 0)
        if many_acts:
            _q4_0r_RA(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
        else:
            _q4_0r_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
    else:  # Q4_1's nibbles with fp16 pairs: 4 rows or one by one activation row (a decode's)
        if many_rows:
            _q4_1_R1(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)
        else:
            _q4_1_11(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, use_simd)


@njit(parallel=True, **JIT)
def _linear(kind, xq, xd, xs, off, qs, d, m, out, use_simd):
    """out (N, R) = ggml's dot product of every weight row (qs (R, bytes) with scales d, mins m (R, nb);
    repacked Q4_0: d = m its fp16 scales in tiles; Q4_1, Q5_1: d = m their fp16 pairs; Q5_0: d = m its fp16 d;
    see _weight_args) with every quantized activation row
    (xq (N, K) int8, scales xd, Q8_1 sums xs (N, nb); repacked Q4_0's tiles take off, its _x_offsets, in place of
    xs). Every work item takes the arrays by address: arguments, they live until the call returns (an array made
    here would be freed after its last use by name), and an array handed into the inlined tiles cost an atomic
    increment and decrement of its count per item from every thread. Parallel over tiles of
    ROWS weight rows; within a tile, the activation rows pass ACTS at a time, meeting the tile's rows 4
    (repacked Q4_0: 8) at a time while their bytes are in cache. A Q5 or Q4_1 tile is unpacked first, once, to one
    byte per value and float32 scales in a scratch of its own (_unpacked_tile), for the byte tiles: spreading
    the bits in every tile call instead cost a prefill ~1.25x the time (the 4 x 4 tile runs as two passes on AVX2,
    each spreading them again; Q4_1 ~1.3x).

    A decode (N = 1) walks the rows DECODE_ROWS at a time instead (repacked Q4_0: 8 at a time, see _decode_rows),
    asking for the weights ~4 KB ahead: a weight read once streams from memory. 4 at a time are faster in cache
    and as fast or faster streamed, on an Intel Xeon and on an AVX2 EPYC (DECODE_ROWS). Every row's sums are the
    same either way, bit for bit."""
    N, K = xq.shape
    R, nb = d.shape
    # wds: bytes between the scales of two weight rows (float32, or the fp16 scales and pairs)
    ws, wds = np.int64(qs.shape[1]), np.int64(nb * d.itemsize)
    w0, d0, m0 = np.int64(qs.ctypes.data), np.int64(d.ctypes.data), np.int64(m.ctypes.data)
    x0, xd0, o0 = np.int64(xq.ctypes.data), np.int64(xd.ctypes.data), np.int64(out.ctypes.data)
    xs0 = np.int64(off.ctypes.data) if _takes_offsets(kind) else np.int64(xs.ctypes.data)  # Q4_0: 8 sum(x) a block
    for c in prange((R + ROWS - 1) // ROWS):
        r0, r1 = np.int64(c * ROWS), min(R, (c + 1) * ROWS)
        if N == 1:
            _rows_at(kind, w0, ws, d0, wds, m0, nb, x0, np.int64(K), xd0, xs0, o0, np.int64(4 * R), use_simd, r0, r1)
        elif _prefill_unpacks(kind):
            _unpacked_tile(kind, w0 + r0 * ws, ws, d0 + r0 * wds, wds, nb, K, r0, r1, x0, xd0, xs0, o0, N, R,
                           use_simd, np.empty(ROWS * K, np.uint8), np.empty(2 * ROWS * nb, np.float32))
        else:
            _tile(kind, w0 + r0 * ws, ws, d0 + r0 * wds, m0 + r0 * wds, wds, nb, K, r0, r1, x0, xd0, xs0, o0, N, R,
                  use_simd)


@njit(inline="always", **JIT)
def _tile(kind, w, ws, wd, wm, wds, nb, K, r0, r1, x0, xd0, xs0, o0, N, R, use_simd):
    """A prefill's work item: weight rows r0 .. r1 - 1 (the first at byte address w, ws bytes apart; scales wd and
    mins wm, wds apart; nb blocks of K values) by all N activation rows (int8 at x0, K apart; scales xd0, sums xs0,
    4 nb bytes apart) into out at o0 (R float32 a row), ACTS activation rows at a time meeting the rows 4
    (repacked Q4_0: 8) at a time."""
    xst, xds, ost = np.int64(K), np.int64(4 * nb), np.int64(4 * R)
    step = 8 if kind == 3 else 16 if kind == 14 else 4  # Q4_0: R % 8 (16) == 0, so every tile is whole groups
    n = np.int64(0)
    while n < N:
        many = n + ACTS <= N
        x, xdn, xsn, on = x0 + n * xst, xd0 + n * xds, xs0 + n * xds, o0 + n * ost
        r = r0
        while r + step <= r1:
            _dot(kind, True, many, w + (r - r0) * ws, ws, wd + (r - r0) * wds, wm + (r - r0) * wds, wds, x, xst,
                 xdn, xsn, xds, nb, on + 4 * r, ost, use_simd)
            r += step
        while r < r1:
            _dot(kind, False, many, w + (r - r0) * ws, ws, wd + (r - r0) * wds, wm + (r - r0) * wds, wds, x, xst,
                 xdn, xsn, xds, nb, on + 4 * r, ost, use_simd)
            r += 1
        n += ACTS if many else 1


@njit(**JIT)
def _unpacked_tile(kind, w, ws, wd, wds, nb, K, r0, r1, x0, xd0, xs0, o0, N, R, use_simd, sq, sdm):
    """_tile for a Q5 weight in its file's blocks (kind 1 or 5; its fp16 scales, or pairs, at wd, wds apart) or a
    Q4_1 weight (kind 4; its nibbles, its fp16 pairs d, m at wd: _scale_pairs): rows r0 .. r1 - 1 unpacked once
    into sq (ROWS K bytes: one byte per value) and sdm (float32 d, then m, ROWS nb each), then the byte tiles on
    them (Q5_1_BYTES for Q5_1 and Q4_1, Q8_0's for Q5_0's int8 q - 16): the integers and scales those tiles read
    from a byte layout, so the same bits. ggml_vec_dot_q4_1_q8_1 and ggml_vec_dot_q5_1_q8_1 differ only in how a
    block's values come apart (the same integer lanes, d_w d_x fma, then m_w s_x); Q4_1's own 4 x 4 tile spread
    its nibbles in every call (on AVX2 two passes, each spreading them again): Zen 3, one thread, 2048 x 2048 by
    256 activation rows 39.5 -> ~30 ms this way. A function of its own, not inlined: sq and sdm are its
    arguments, so they live until it returns (only their addresses are used)."""
    q, dm, sds = np.int64(sq.ctypes.data), np.int64(sdm.ctypes.data), np.int64(4 * nb)
    form = _unpack_form(kind)
    for r in range(r0, r1):
        src, sc = _row_start(kind, w, ws, wd, wds, nb, r - r0)
        simd.unpack_row(src, sc, nb, form, q + (r - r0) * K, dm + (r - r0) * sds, dm + (ROWS + r - r0) * sds)
    signed = kind == 5 or _half_scales(kind)  # Q5_0: Q8_0's tiles on its int8 q - 16 (Q8_0: its q)
    _tile(0 if signed else Q5_1_BYTES, q, np.int64(K), dm, dm + ROWS * sds, sds, nb, K, r0, r1, x0,
          xd0, xs0, o0, N, R, use_simd)


@njit(inline="always", **JIT)
def _is_x8(kind):
    """Whether a KIND is one of the "x8" forms (X8) or the "x16" ones: rows only in groups (_group)."""
    return kind == 7 or kind == 8 or kind == 9 or _is_x16(kind)


@njit(inline="always", **JIT)
def _is_x16(kind):
    """Whether a KIND is one of the "x16" forms: rows only in groups of 16."""
    return kind == 10 or kind == 11 or kind == 12 or kind == 13 or kind == 14


@njit(inline="always", **JIT)
def _prefill_unpacks(kind):
    """Whether a KIND's prefill tiles read its rows unpacked to one byte per value (_unpacked_tile): Q5_1, Q4_1, Q5_0
    and the grouped forms, but for Q4_0's "x16" form, whose 16-row tiles read the form as it is."""
    return kind == 1 or kind == 5 or kind == 4 or (_is_x8(kind) and kind != 14)


@njit(inline="always", **JIT)
def _takes_offsets(kind):
    """Whether a KIND's tiles take _x_offsets (8 sum(x) a block) for xs: Q4_0, repacked or in the "x16" form."""
    return kind == 3 or kind == 14


@njit(inline="always", **JIT)
def _group(kind):
    """The rows of a group in the form of this KIND (_is_x8): 16 for "x16", else 8."""
    return 16 if _is_x16(kind) else 8


@njit(inline="always", **JIT)
def _unpack_form(kind):
    """ggml_simd.unpack_row's form for a weight of this KIND (Q5_1, Q4_1, Q5_0, or one of them in the "x8" form)."""
    if kind == 1:
        return np.int64(simd.UNPACK_Q5_1)
    if kind == 4:
        return np.int64(simd.UNPACK_Q4_1)
    if kind == 5:
        return np.int64(simd.UNPACK_Q5_0)
    if kind == 7:
        return np.int64(simd.UNPACK_Q5_1X8)
    if kind == 8:
        return np.int64(simd.UNPACK_Q5_0X8)
    if kind == 10:
        return np.int64(simd.UNPACK_Q4_1X16)
    if kind == 11:
        return np.int64(simd.UNPACK_Q5_0X16)
    if kind == 12:
        return np.int64(simd.UNPACK_Q5_1X16)
    if kind == 13:
        return np.int64(simd.UNPACK_Q8_0X16)
    if kind == 14:
        return np.int64(simd.UNPACK_Q4_0X16)
    return np.int64(simd.UNPACK_Q4_1X8)


@njit(inline="always", **JIT)
def _row_start(kind, w, ws, wd, wds, nb, r):
    """Where row r of a weight (bytes at w, ws a row; scales at wd, wds a row) starts, as unpack_row takes it: the
    row itself, or in the "x8" form (kinds X8) its group of 8 rows' start + 4 (r % 8) bytes, and its scales + r % 8
    (each of 2 bytes, Q5_0, or 4, Q5_1 and Q4_1's pairs); in the "x16" forms the same for groups of 16."""
    if _is_x8(kind):
        n = _group(kind)
        g, k = r // n * n, r % n
        return w + g * ws + 4 * k, wd + g * wds + k * (2 if _half_scales(kind) else 4)
    return w + r * ws, wd + r * wds


@njit(inline="always", **JIT)
def _half_scales(kind):
    """Whether a grouped KIND (_is_x8) has one fp16 d a block (Q5_0, Q8_0, Q4_0; int8 values once unpacked), not a
    pair."""
    return kind == 8 or kind == 11 or kind == 13 or kind == 14


@njit(inline="always", **JIT)
def _decode_rows(kind, xq, xd, xs, off, qs, d, m, out, use_simd, r0, r1):
    """Rows r0 .. r1 - 1 of a decode (one activation row xq (1, K), its scales xd and Q8_1 sums xs; repacked
    Q4_0 takes off, its _x_offsets, for xs), DECODE_ROWS at a time (repacked Q4_0 8), each tile asking for
    the weights ~4 KB ahead block by block (ggml_simd._prefetch_ahead)."""
    R, nb = d.shape
    ws, wds = np.int64(qs.shape[1]), np.int64(nb * d.itemsize)
    w0, d0, m0 = np.int64(qs.ctypes.data), np.int64(d.ctypes.data), np.int64(m.ctypes.data)
    x0, xd0, o0 = np.int64(xq.ctypes.data), np.int64(xd.ctypes.data), np.int64(out.ctypes.data)
    xs0 = np.int64(off.ctypes.data) if _takes_offsets(kind) else np.int64(xs.ctypes.data)
    _rows_at(kind, w0, ws, d0, wds, m0, nb, x0, np.int64(xq.shape[1]), xd0, xs0, o0, np.int64(4 * R), use_simd, r0, r1)


@njit(inline="always", **JIT)
def _rows_at(kind, w0, ws, d0, wds, m0, nb, x0, K, xd0, xs0, o0, ost, use_simd, r0, r1):
    """_decode_rows by address (also kernels/ggml_linears.py's work items): weight rows r0 .. r1 - 1 (bytes at
    w0, ws apart; scales d0 and mins m0, wds apart; nb blocks) by one quantized activation row (x0, K values;
    scales xd0; Q8_1 sums or repacked Q4_0's offsets xs0) into out at o0 (ost bytes a row)."""
    # Repacked Q4_0 keeps its 8-row tile: one row at a time it must sum each block's lanes into one integer
    # before its fma, and took 1.6x longer (model, one thread); rows r0, r1 are multiples of 8 there, as in the
    # "x8" form (X8), whose rows exist only as groups of 8. The other kinds go DECODE_ROWS at a time, the last few
    # one at a time.
    step = _group(kind) if _is_x8(kind) else 8 if kind == 3 else DECODE_ROWS
    r = r0
    while r + step <= r1:
        _dot(kind, step > 1, False, w0 + r * ws, ws, d0 + r * wds, m0 + r * wds, wds, x0, K, xd0, xs0,
             np.int64(4 * nb), nb, o0 + 4 * r, ost, use_simd)
        r += step
    while r < r1:  # the last rows, fewer than DECODE_ROWS (repacked Q4_0's r0, r1 are multiples of 8)
        _dot(kind, False, False, w0 + r * ws, ws, d0 + r * wds, m0 + r * wds, wds, x0, K, xd0, xs0,
             np.int64(4 * nb), nb, o0 + 4 * r, ost, use_simd)
        r += 1


@njit(inline="always", **JIT)
def _x_offsets(xq, wanted):
    """8 times the sum of each 32-value block of xq (N, K) int8, as int32 (N, K // 32): what repacked Q4_0's
    nibbles 0..15 owe for their offset 8, made once per activation row for all its tiles (an empty array
    unless wanted)."""
    N, nb = (xq.shape[0], xq.shape[1] // 32) if wanted else (0, 0)
    off = np.empty((N, nb), np.int32)
    for n in range(N):
        for b in range(nb):
            s = 0
            for j in range(b * 32, b * 32 + 32):
                s += np.int32(xq[n, j])
            off[n, b] = 8 * s
    return off


@njit(**JIT)
def _decode_serial(kind, x, qs, d, m, out, use_simd):
    """A decode on one thread in one compiled call: x (..., K) one row quantized, then every row of the weight
    into out (..., R) (_decode_rows). Saves the ~15 us per matrix of two calls and a parallel region (a decode
    step of the default model makes 211 products)."""
    K = x.shape[-1]
    x = x.reshape((1, K))
    xq = np.empty((1, K), np.int8)
    xd = np.empty((1, K // 32), np.float32)
    xs = np.empty((1, K // 32), np.float32)
    off = np.empty((1 if _takes_offsets(kind) else 0, K // 32), np.int32)  # Q4_0's offsets, from the same pass
    _quantize_q8_row(x, xq, xd, xs, 0, off)
    _decode_rows(kind, xq, xd, xs, off, qs, d, m, out, use_simd, 0, d.shape[0])


@njit(inline="always", **JIT)
def _quantize_q8_row(x, xq, xd, xs, n, off=None):
    """x86 quantize_row_q8_0 (xd, xq) and quantize_row_q8_1's sums (xs) of row n of x (N, K) float32, as
    llama_ref.model.ggml computes them: d = amax / 127, q = roundeven(x * (127 / amax)), fp16(d), fp16(d sum q);
    and 8 sum q into row n of off (N, K // 32) int32 where it has that row (repacked Q4_0's offsets, _x_offsets).
    ggml_simd.quantize_q8_0_blocks makes each block's 32 values in four 8-lane vectors, its amax an integer max of
    the bits of |x| (non-negative floats order as their bits; a NaN, above infinity's, wins, as in np.max): 576
    values 0.55 -> 0.21 us (Zen 3), where LLVM left the scalar loops scalar."""
    xr = np.ascontiguousarray(x[n])  # the row itself where x is C-ordered (every caller's)
    qr, dr, sr = xq[n], xd[n], xs[n]
    offsets = np.int64(0)  # no address: no offsets written
    if off is not None:
        if n < off.shape[0]:
            offsets = np.int64(off[n].ctypes.data)
    simd.quantize_q8_0_blocks(xr.ctypes.data, x.shape[1] // 32, qr.ctypes.data, dr.ctypes.data, sr.ctypes.data,
                              offsets)


@njit(parallel=True, **JIT)
def _quantize_q8(x, xq, xd, xs):
    for n in prange(x.shape[0]):
        _quantize_q8_row(x, xq, xd, xs, n)


@njit(**JIT)
def _quantize_q8_serial(x, xq, xd, xs):
    for n in range(x.shape[0]):
        _quantize_q8_row(x, xq, xd, xs, n)


@njit(parallel=True, **JIT)
def _fp16_values(x, out):
    for i in prange(x.shape[0]):
        out[i] = simd.fp16_round(x[i])


# Below this many values the cache's rounding stays NumPy's (a decode step's few keys: no parallel region).
FP16_MIN_VALUES = 1 << 14
# The tables whose arrays exact mode's compiled embedding reads as this arithmetic holds them (embedding below)
_ROWS_AS_HELD = (np.ndarray, Q8_0Weight, Q4_0Weight, Q4_1Weight)


def embedding(tokens: np.ndarray, table, dtype) -> np.ndarray:
    """ggml_get_rows: the specification's embedding, which is exact mode's (model/ops.py). Compiled (exact mode's
    twin: the same values, tests/test_kernels.py) for a float array and the formats whose arrays it reads as they
    are held (Q8_0, Q4_0, Q4_1): a decode step's one row took 16-24 us in NumPy, 3.5 us so (default model); Q5_0 /
    Q5_1, and Q4_1 held in the "x8" form, from the blocks this arithmetic holds (_unpacked_rows: the NumPy rows took
    ~90 us, a Q5 decode step's 2 %). For the K-quants it would first unpack the whole table beside the form this
    arithmetic keeps (the originals, which Q4_K drops for its repacked copy), so they keep the specification's rows."""
    x8 = isinstance(table, (Q4_1Weight, Q8_0Weight, Q4_0Weight)) and _held_group(table)  # in the "x8" / "x16" form
    if isinstance(table, _ROWS_AS_HELD) and not x8:
        return _compiled_rows(tokens, table, dtype)
    if isinstance(table, (Q5_0Weight, Q5_1Weight, Q4_1Weight, Q8_0Weight, Q4_0Weight)) and \
            np.dtype(dtype) == np.float32:
        tokens = np.asarray(tokens)
        ids = np.ascontiguousarray(tokens.reshape(-1), dtype=np.int64)  # (N,)
        out = np.empty((ids.shape[0], table.shape[1]), np.float32)  # (N, D)
        kind, blocks, scales, _ = _weight_args(table)
        _unpacked_rows(blocks, scales, np.int64(kind), ids, out)
        return out.reshape(*tokens.shape, table.shape[1])
    return spec.embedding(tokens, table, dtype)


@njit(**JIT)
def _unpacked_rows(blocks, scales, kind, ids, out):
    """out (N, K) = rows ids of a Q5_0 or Q5_1 weight (its KIND; or Q4_1 in the "x8" form) from the blocks ggml mode
    holds (_weight_args: Q5's fifth bits in ggml_simd.Q5_BIT_ORDER, or the "x8" form; the fp16 scales apart), as the
    specification's rows (weights/packed.py _dequantize_blocks): each row unpacked by ggml_simd.unpack_row (a
    prefill's own) to one byte per value and float32 d (and m), then read as exact mode reads such a row
    (kernels/linear._rows_q8: d * (q - 16), or d * q + m in float32, one rounding each)."""
    K = out.shape[1]
    q, d, m = np.empty((1, K), np.uint8), np.empty((1, K // 32), np.float32), np.empty((1, K // 32), np.float32)
    first = np.zeros(1, np.int64)  # the one unpacked row
    signed = kind == 5 or _half_scales(kind)
    form = _unpack_form(kind)
    w, ws, wd, wds = (np.int64(blocks.ctypes.data), np.int64(blocks.shape[1]), np.int64(scales.ctypes.data),
                      np.int64(scales.shape[1] * scales.itemsize))
    for i in range(ids.shape[0]):
        src, sc = _row_start(kind, w, ws, wd, wds, K // 32, ids[i])
        simd.unpack_row(src, sc, K // 32, form, q.ctypes.data, d.ctypes.data, m.ctypes.data)
        _rows_q8(q, d, m, not signed, first, out[i:i + 1])


cache_storage = spec.cache_storage  # the cache's fp16 values in float16 arrays, as the specification keeps them


def cache_values(x: np.ndarray) -> np.ndarray:
    """The specification's cache_values (model/ggml.fp16: what llama.cpp's F16 cache holds), compiled for a
    prefill's keys and values: fptrunc to half and back (vcvtps2ph, ties to even, inf past 65504), the same
    values. NumPy's cast through float16 took ~2-3 % of a 512-token prefill (1B Q4_K, default model Q8_0)."""
    x = np.asarray(x)
    if x.dtype != np.float32 or x.size < FP16_MIN_VALUES:
        return spec.cache_values(x)
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)
    _fp16_values(flat, out)
    return out.reshape(x.shape)


def quantize_q8(x2: np.ndarray):
    """(xq (N, K) int8, xd (N, nb), xs (N, nb)): the Q8_0 / Q8_1 blocks of x2 (N, K)."""
    N, K = x2.shape
    xq = np.empty((N, K), np.int8)
    xd = np.empty((N, K // 32), np.float32)
    xs = np.empty((N, K // 32), np.float32)
    (_quantize_q8 if N >= 16 else _quantize_q8_serial)(x2, xq, xd, xs)
    return xq, xd, xs


# id(weight) -> (kind, qs, d, m) as the kernels take them, made once per weight: a decode step makes 211
# products of ~7-50 us, and rebuilding these (format checks, read-only views) with the reshapes around them
# cost ~13 us a call (~2.7 ms a step on the default model, one thread). Keyed by id, a plain dict look-up
# (a WeakKeyDictionary's took ~0.5 us); weakref.finalize drops the entry when the weight goes, before its id
# can be reused.
_ARGS: dict = {}


def _weight_args(w) -> tuple:
    args = _ARGS.get(id(w))
    if args is None:
        fmt = w.format
        if fmt == "q4_0" and w.shape[0] % 8 == 0:  # llama.cpp repacks Q4_0 matrices whose rows come in groups of 8
            fmt = "q4_0r"
        if fmt == "q4_0r" and _held_group(w):  # its arithmetic in the "x16" form (16 rows' nibbles side by side)
            fmt = "q4_0x16"
        if fmt in ("q5_0", "q5_1"):
            # As llama.cpp streams them and the weight holds them (weights/packed.py file_form): each block's 20
            # bytes of fifth bits and nibbles, and its fp16 d (Q5_0) or fp16 pair d, m (Q5_1; d = m: the tiles
            # read both from d). 22 / 24 bytes a block, the file's, where one byte per value and float32 scales
            # took 36 / 40; and the weight holds no other copy. The fifth bits in the order this host's tiles read
            # (ggml_simd.Q5_BIT_ORDER; the weight then holds them so).
            group = _held_group(w)
            fmt += f"x{group}" if group else ""
            qs, d = w.file_form(f"x{group}" if group else simd.Q5_BIT_ORDER)
            qs, d = readonly(qs), readonly(d)
            m = d
        elif fmt == "q4_1":
            # As llama.cpp streams it: d and m as one fp16 pair per block (d = m: the tiles read both from d). A
            # decode streams its weights from memory once a token: 20 bytes a block instead of 24. Rows in groups
            # of 8 on an X8_HOST: the nibbles in the "x8" form (the weight then holds them so), the pairs too.
            d = m = _scale_pairs(w.d, w.m)
            group = _held_group(w)
            if group:
                fmt += f"x{group}"
                qs, d = readonly(w.x8_form(group)), readonly(q5_scales_in_order(d, f"x{group}", "file"))
                m = d
            else:
                qs = readonly(w.qs)
        elif fmt in ("q8_0", "q4_0x16") and _held_group(w):
            # In the "x16" form (Q8_0Weight.x8_form(16): q + 128, each 16 rows' blocks side by side; Q4_0's nibbles
            # as Q4_1's) with the 16 rows' fp16 d of a block side by side (34 / 18 bytes a block streamed, as the
            # file's, where float32 d took 36 / 20)
            fmt = w.format + "x16"
            qs = readonly(w.x8_form(16))
            d = m = readonly(q5_scales_in_order(_fp16_bits(w.d, w.ggml_type), "x16", "file"))
        else:
            qs = readonly(w.qs)
            d = m = _repack_scales(w.d) if fmt == "q4_0r" else readonly(w.d)
        args = _ARGS[id(w)] = (KIND[fmt], qs, d, m)
        weakref.finalize(w, _ARGS.pop, id(w), None)
    return args


def _held_group(w) -> int:
    """The rows of a group of the form ggml mode holds weight w in: 16, the "x16" form (a Q4_1, Q5_0, Q5_1, Q8_0 or
    Q4_0 weight whose rows come in groups of 16, on an X16_HOST); 8, the "x8" form (Q4_1, Q5_0 or Q5_1 in groups of
    8, on an X8_HOST); or 0, its rows as they are (Q4_0 then repacked by 8 where its rows allow)."""
    if w.format in ("q8_0", "q4_0"):  # Q8_0 only where vpdpbusd takes its q + 128 (AVX2's int16 pairs saturate)
        return 16 if X16_HOST and w.shape[0] % 16 == 0 else 0
    if w.format not in ("q4_1", "q5_0", "q5_1"):
        return 0
    return 16 if X16_HOST and w.shape[0] % 16 == 0 else 8 if X8_HOST and w.shape[0] % 8 == 0 else 0


def _repack_scales(d: np.ndarray) -> np.ndarray:
    """Repacked Q4_0's scales d (R, nb) float32 as its tiles read them: the 8 scales of rows 8g .. 8g + 7 in
    block b side by side in fp16 (16 bytes at element 8 (g nb + b)), as llama.cpp's block_q4_0x8 keeps them.
    Viewed as (R, nb), so that the tile at row r = 8g finds its scales r rows in. One load and a vcvtph2ps per
    block instead of 8 loads from 8 rows; 2 bytes per block beside the float32 d (which the specification and
    the other paths keep using); 18 bytes a block streamed, as llama.cpp's, instead of 20. Exact: every GGUF
    scale is an fp16 (checked)."""
    R, nb = d.shape
    side_by_side = np.ascontiguousarray(d.reshape(R // 8, 8, nb).transpose(0, 2, 1))  # (R/8, nb, 8)
    return readonly(_fp16_bits(side_by_side, "Q4_0").reshape(R, nb))  # the fp16 bits: Numba's arrays have no float16


def _fp16_bits(a: np.ndarray, fmt: str) -> np.ndarray:
    """The fp16 bits (uint16) of float32 scales a, each of which is an fp16 value (every GGUF scale is: checked)."""
    a16 = a.astype(np.float16)
    if not np.array_equal(a16.astype(np.float32), a, equal_nan=True):
        raise ValueError(f"{fmt} scales that are not fp16 values")
    return a16.view(np.uint16)


def _scale_pairs(d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_1's d and m (R, nb) float32 as the tiles read them (kernels/ggml_simd.py's fp16 pairs): one
    uint32 per block, fp16 d in its low half (its lower address) and fp16 m in its high half, as a block of the
    file begins. Exact: every GGUF d and m is an fp16 (checked, as _repack_scales)."""
    d16, m16 = _fp16_bits(d, "Q4_1"), _fp16_bits(m, "Q4_1")
    pairs = d16.astype(np.uint32) | (m16.astype(np.uint32) << np.uint32(16))
    return readonly(pairs)  # (R, nb)


def quantized_linear(x2: np.ndarray, w, use_simd: "int | None" = None, acts: "tuple | None" = None) -> np.ndarray:
    """x2 (N, K) float32 @ w.T in ggml's arithmetic, for a Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 weight. -> (N, R).
    use_simd: 0 the portable integer code, 2 AVX2's (where the CPU has it), 1 the best this CPU has (vpdpbusd,
    else AVX2); default SIMD. All give the same integers, so the same floats. acts: quantize_q8(x2) of N > 1
    rows, where the caller has made it already (_rows_linears)."""
    if w.format in ("q4_k", "q5_k", "q6_k"):  # Q8_K activations and 256-value super-blocks: their own module
        from . import ggml_kquants
        return ggml_kquants.quantized_linear(x2, w, use_simd)
    N = x2.shape[0]
    kind, qs, d, m = _weight_args(w)
    out = np.empty((N, d.shape[0]), np.float32)
    use = SIMD if use_simd is None else int(use_simd)
    if acts is None and serial_product(N, d.shape[0] * x2.shape[1]):
        _decode_serial(kind, x2, qs, d, m, out, use)
        return out
    xq, xd, xs = quantize_q8(x2) if acts is None else acts
    _linear(kind, xq, xd, xs, _x_offsets(xq, _takes_offsets(kind)), qs, d, m, out, use)
    return out


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T in ggml's arithmetic: llama_ref.model.ggml.linear with the quantized products compiled."""
    if x.size == x.shape[-1]:
        # One row (a decode step's wo, w2 and output head): kernels/ggml_linears.py's one compiled call, x quantized
        # inside it (Q8_0 / Q8_1 or Q8_K), then every row on the calling thread or in one parallel region, x and
        # the output in the caller's shape (B, T, D) -> (B, T, R). Before, a parallel product made two calls
        # (quantize, then the region) and a K-quant one two on the calling thread too.
        return linears(x, w)[0]
    return _rows_linear(x, w)


def _rows_linear(x: np.ndarray, w) -> np.ndarray:
    """linear for any x (N rows: quantized_linear; a weight ggml mode keeps in floats: the specification's);
    kernels/ggml_linears.py's fallback."""
    if not spec.supported(w):
        return spec.linear(x, w)
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    if rows.dtype != np.float32 or not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
    out = quantized_linear(rows, w)
    return out if x.ndim == 2 else out.reshape(x.shape[:-1] + (w.shape[0],))


def _rows_linears(x: np.ndarray, ws) -> tuple:
    """tuple(_rows_linear(x, w) for w in ws), the same bits, for x of N > 1 rows (a prefill's wq, wk, wv; w1, w3):
    x quantized once per activation type its weights take (Q8_0 / Q8_1 blocks, Q8_K super-blocks), the blocks
    each product would make of it. Quantizing a 512-row prompt for every product took ~6 % of a Q8_0 prefill of
    the default model and ~8 % of a 1B Q4_K one."""
    if not all(spec.supported(w) for w in ws):
        return tuple(_rows_linear(x, w) for w in ws)
    from . import ggml_kquants

    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    if rows.dtype != np.float32 or not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
    q8 = q8k = None
    outs = []
    for w in ws:
        if w.format in ("q4_k", "q5_k", "q6_k"):
            q8k = ggml_kquants.quantize_q8_K(rows) if q8k is None else q8k
            out = ggml_kquants.quantized_linear(rows, w, acts=q8k)
        else:
            q8 = quantize_q8(rows) if q8 is None else q8
            out = quantized_linear(rows, w, acts=q8)  # (N, R)
        outs.append(out if x.ndim == 2 else out.reshape(x.shape[:-1] + (w.shape[0],)))
    return tuple(outs)


def linears(x: np.ndarray, *ws) -> tuple:
    """tuple(linear(x, w) for w in ws), the same bits: the projections that read the same x (wq, wk, wv; w1, w3)
    of a decode step in one compiled call, x quantized once, one parallel region (kernels/ggml_linears.py)."""
    global _together
    if _together is None:  # imported on first use, as the K-quant products are (it imports this module)
        from .ggml_linears import linears as _together
    return _together(x, *ws)


_together = None


def decode_layers(model, i, h, start_pos, cache, cos, sin):
    """Dense layers i .. end - 1 of a one-token step in one compiled call, bit for bit the forward pass's lines:
    (h, end), or None where layer i declines (kernels/ggml_step.py; the forward pass's hook,
    llama_ref/model/transformer.py)."""
    global _step
    if _step is None:  # imported on first use, as linears
        from .ggml_step import decode_layers as _step
    return _step(model, i, h, start_pos, cache, cos, sin)


_step = None


__all__ = spec.__all__
