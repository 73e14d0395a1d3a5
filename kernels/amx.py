"""bfloat16 weights times float32 activations on Intel's AMX tiles, every product exact (prefill only).

Exact mode multiplies float32 activations by the weights; plain bf16 hardware would round the activations to
bf16 (8 significant bits) first. So each float32 x is cut into three bfloat16 parts, x = hi + mid + lo
(split_bf16x3: hi is x with its low 16 bits cleared, mid the same of x - hi, lo what is left, at most 8
significant bits; exact from |x| = 2**-103 up, see below), and each part is multiplied by the bf16 weights with
TDPBF16PS. A bf16 x bf16 product has at most 16 significant bits, exact in float32, and the tiles add products
in float32: the same sum of the same exact products as the float32 path (a tile of decoded weights through
sgemm), in another order. Against float64 on a random 512 x 2048 x 2048 product the error is the size of
sgemm's (max 3.0e-6 against 2.4e-6, rms 2.3e-7 against 3.3e-7). Where it is not exact: below |x| = 2**-103 a
part can hold bits under 2**-126, which a bf16 part cannot keep and TDPBF16PS would not read anyway (it takes a
subnormal input as zero): what an activation loses there is under 2**-125 (after an RMSNorm, activations are
near 1); and an infinite activation gives NaN (inf - inf in the split) where the float32 path gives inf.

The layout (one K panel of KC values at a time: a block's weights transposed once per panel into a per-thread
buffer that stays in L2 while the thread runs every token block over them):
- activations: split once per product into xp (3 parts, N / 16 token blocks, K / 32, 16 tokens, 32 values):
  one 1 KiB tile (16 rows of 64 bytes) per part, token block and 32 k's, the A operand;
- weights: each 32-row block's panel transposed into TDPBF16PS's B layout (pairs of k side by side: row kk of
  a tile holds (w[r, 2 kk], w[r, 2 kk + 1]) for the 16 rows r; _transpose16 moves 16 x 16 32-bit pairs in
  registers), once per panel, into a per-thread buffer;
- the register tile: 32 tokens x 32 weight rows in four float32 tiles (tmm0-3), the two A tiles of a part
  (tmm4, tmm5) and the two B tiles (tmm6, tmm7); the products of the three parts of 32 k's go into the same
  tiles (hi, mid, lo, then the next 32 k's), stored to the output after each panel and loaded back for the next.
  Every output's sum runs k by k in order (a panel's C tile stored and reloaded is exact), so its bits depend on K
  only: not on KC, the blocks or the thread count (KC 64 to 2048: the same bits on a 512 x 2048 x 2048 product).
arithmetic="bf16" (model/bf16.py) rounds x to bf16 before the product: its mid and lo parts are zero, so the
split keeps hi alone and the product takes one pass (split_bf16x3(..., parts=1)).
AMX is reached through inline assembly (one instruction per Numba intrinsic; LLVM itself never uses the tile
registers, so they keep their values between the statements). Linux lends the tile registers' state only to a
process that asks (arch_prctl ARCH_REQ_XCOMP_PERM): available() asks once, and says False on a CPU without
AMX-BF16, where the kernel refuses, or with LLAMA_REF_AMX=0; kernels/linear.py then takes the sgemm path.

Measured (sessions 40-41, a 2-core Sapphire Rapids-class VM; 1B: benchmarks/results/shapes-llama-3.2-1b_*_s4*):
a TDPBF16PS alone runs at 17 ns here; with its operands' tile loads it averaged 27 ns in L1 (a tile register is
not renamed: a load waits for the products reading the register before it). This kernel, 512 x 2048 x 2048 on one
thread pinned to a core (sgemm: 49 GMAC/s): 17 ns a TDPBF16PS, 154-166 GMAC/s of exact float32 products, at
moments when the core's AMX unit is free, 40-45 ns (61-69 GMAC/s) at others; a thread pinned to each vCPU at once
summed 151-183 GMAC/s, about one free unit's rate, and the two threads of one product reach 154-204: the VM's two
vCPUs behave as if they shared one AMX unit, which then bounds a prefill on both.
"""

from __future__ import annotations

import ctypes
import os
import threading

import llvmlite.binding as llvm_binding
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ._common import JIT, aligned

I32, I64 = ir.IntType(32), ir.IntType(64)
# k's a panel. Between panels the C tiles are stored and loaded back, and that cost more than the activations'
# leaving L1: the 1B shape's products (512 rows by 2048 x 8192, 8192 x 2048, 2048 x 2048; two threads, session 49)
# ran 326-376 GMAC/s of exact products with panels of 192 k's (a 32-token block's three parts in L1), 338-355 with
# 384, 395-426 with 768, 413-470 with 1024, 428-480 with 2048; with one part (arithmetic="bf16") 572-674, 641-809
# (384), 696-906 (1024), 844-1147 (2048). A thread's B panel is then 1 MiB (ROWS x 2048 bf16), in L2.
KC = 2048
ROWS = 256  # weight rows a work item
TOKENS = 32  # token rows are padded to a multiple of this (two 16-row tiles)

_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158
_state = {}


def available() -> bool:
    """Whether the AMX path can run here: the CPU has AMX-BF16, Linux granted this process the tile state, and
    LLAMA_REF_AMX is not "0". Asked once (the permission holds for the whole process)."""
    if os.environ.get("LLAMA_REF_AMX", "") == "0":
        return False
    if "ok" not in _state:
        feats = set(llvm_binding.get_host_cpu_features().flatten().split(","))
        ok = {"+amx-tile", "+amx-bf16"} <= feats
        if ok:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                ok = libc.syscall(ctypes.c_long(_SYS_ARCH_PRCTL), ctypes.c_long(_ARCH_REQ_XCOMP_PERM),
                                  ctypes.c_long(_XFEATURE_XTILEDATA)) == 0
            except (OSError, AttributeError):
                ok = False
        if ok:
            llvm_binding.initialize_native_asmparser()  # the kernel's instructions are inline assembly
        _state["ok"] = ok
    return _state["ok"]


# ---- the instructions -------------------------------------------------------------------------------------------

def _instruction(text: str, nargs: int):
    """A Numba intrinsic that emits one line of AT&T assembly with nargs int64 operands ($0, $1) in registers."""
    def codegen(context, builder, signature, args):
        constraints = ",".join(["r"] * nargs + ["~{memory}"])
        builder.asm(ir.FunctionType(ir.VoidType(), [I64] * nargs), text, constraints, list(args), True)
        return context.get_dummy_value()

    if nargs == 0:
        def typer(typingctx):
            return types.void(), codegen
    elif nargs == 1:
        def typer(typingctx, a):
            return types.void(types.int64), codegen
    else:
        def typer(typingctx, a, b):
            return types.void(types.int64, types.int64), codegen
    typer.__name__ = "amx_" + text.split()[0]
    return intrinsic(typer)


_config = _instruction("ldtilecfg ($0)", 1)  # the tiles' shapes, from a 64-byte block (_CONFIG)
_release = _instruction("tilerelease", 0)
_zero0, _zero1, _zero2, _zero3 = (_instruction(f"tilezero %tmm{t}", 0) for t in range(4))
# tileloadd / tilestored (address $0, row stride $1 bytes): 16 rows of 64 bytes
_load0, _load1, _load2, _load3, _load4, _load5, _load6, _load7 = (
    _instruction(f"tileloadd ($0,$1,1), %tmm{t}", 2) for t in range(8))
_store0, _store1, _store2, _store3 = (_instruction(f"tilestored %tmm{t}, ($0,$1,1)", 2) for t in range(4))
# tmm[c] += A (tmm4 or tmm5: 16 tokens x 32 bf16) x B (tmm6 or tmm7: 16 pairs of k x 16 rows x 2 bf16)
_dot046 = _instruction("tdpbf16ps %tmm6, %tmm4, %tmm0", 0)
_dot147 = _instruction("tdpbf16ps %tmm7, %tmm4, %tmm1", 0)
_dot256 = _instruction("tdpbf16ps %tmm6, %tmm5, %tmm2", 0)
_dot357 = _instruction("tdpbf16ps %tmm7, %tmm5, %tmm3", 0)


def _tile_config() -> np.ndarray:
    """ldtilecfg's 64 bytes: palette 1, tiles 0-7 each 16 rows of 64 bytes."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    cfg[16:32].view(np.uint16)[:] = 64
    cfg[48:56] = 16
    return cfg


_CONFIG = _tile_config()


@intrinsic
def _transpose16(typingctx, src, stride, dst):
    """dst (16 x 16 32-bit words, rows 64 bytes apart) = the transpose of the 16 x 16 words at src (rows `stride`
    bytes apart): four rounds of two-vector shuffles, each swapping the off-diagonal blocks of size 8, 4, 2, 1."""
    sig = types.void(types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        s, st, d = args
        v16 = ir.VectorType(I32, 16)
        rows = [builder.load(builder.inttoptr(builder.add(s, builder.mul(st, ir.Constant(I64, i))),
                                              ir.PointerType(v16)), align=4) for i in range(16)]
        for h in (8, 4, 2, 1):
            lo = ir.Constant(ir.VectorType(I32, 16), [j if not j & h else 16 + j - h for j in range(16)])
            hi = ir.Constant(ir.VectorType(I32, 16), [j + h if not j & h else 16 + j for j in range(16)])
            for i in range(16):
                if not i & h:
                    a, b = rows[i], rows[i + h]
                    rows[i], rows[i + h] = builder.shuffle_vector(a, b, lo), builder.shuffle_vector(a, b, hi)
        for i in range(16):
            builder.store(rows[i], builder.inttoptr(builder.add(d, ir.Constant(I64, 64 * i)), ir.PointerType(v16)),
                          align=4)
        return context.get_dummy_value()
    return sig, codegen


# ---- the activations' three parts ------------------------------------------------------------------------------

@njit(**JIT)
def _split(x, xp, b0, b1):
    """xp[:, b0:b1] = the bf16 parts of x (N, K) (split_bf16x3) for the token blocks b0 .. b1 - 1 (16 tokens each),
    tokens beyond N zero. xp (P, NB, K / 32, 16, 32) uint16: P = 3 parts, or P = 1, hi alone (x already bf16
    values: arithmetic="bf16"). One tile (16 tokens x 32 k's) at a time, each part's 1 KiB written in order, and
    the 32 k's of a token in one vectorized step."""
    N, K = x.shape
    P = xp.shape[0]
    mask, sixteen = np.uint32(0xFFFF0000), np.uint32(16)
    for jb in range(b0, b1):
        for c in range(K // 32):
            for t in range(16):
                n = jb * 16 + t
                if n >= N:  # a padding token row
                    xp[:, jb, c, t, :] = 0
                    continue
                for k in range(32):
                    v = np.float32(x[n, c * 32 + k])
                    hi = np.uint32(v.view(np.uint32) & mask)  # v's top 16 bits
                    r1 = np.float32(v - hi.view(np.float32))  # exact: v and hi share their leading bits
                    mid = np.uint32(r1.view(np.uint32) & mask)
                    lo = np.float32(r1 - mid.view(np.float32))  # exact, and at most 8 significant bits: a bf16
                    xp[0, jb, c, t, k] = np.uint16(hi >> sixteen)
                    if P == 3:
                        xp[1, jb, c, t, k] = np.uint16(mid >> sixteen)
                        xp[2, jb, c, t, k] = np.uint16(lo.view(np.uint32) >> sixteen)


@njit(parallel=True, **JIT)
def _split_parallel(x, xp):
    """_split of every token block, the blocks shared by Numba's threads (each writes its own tiles)."""
    for jb in prange(xp.shape[1]):
        _split(x, xp, jb, jb + 1)


def split_bf16x3(x: np.ndarray, parts: int = 3) -> np.ndarray:
    """x (N, K) float32, K a multiple of 32 -> (parts, ceil(N / 32) * 2, K / 32, 16, 32) uint16: the bfloat16
    parts hi, mid, lo with hi + mid + lo == x exactly, in A tiles (16 tokens x 32 k's), 64-byte aligned; the
    token blocks shared by Numba's threads (the same tiles whoever writes them). parts=1: hi alone, for an x
    whose values are bf16 already (mid and lo would be zero; the caller rounds: arithmetic="bf16",
    kernels/linear.linear_bf16), and then the product takes one pass."""
    if parts not in (1, 3):
        raise ValueError(f"kernels.amx.split_bf16x3: parts must be 1 or 3, got {parts!r}")
    N, K = x.shape
    xp = aligned((parts, -(-N // TOKENS) * 2, K // 32, 16, 32), np.uint16)  # (parts, NB, K/32, 16, 32)
    _split_parallel(np.ascontiguousarray(x, dtype=np.float32), xp)
    return xp


# ---- the product -------------------------------------------------------------------------------------------------

@njit(**JIT)
def _rows(xp, w, r0, r1, out, cfg, bpanel):
    """out[:, r0:r1] = the products of xp's parts with w[r0:r1] (the module docstring's loops). xp (P, NB, K/32,
    16, 32) uint16 (P = 3 parts, or 1), w (R, K) uint16 bf16 with K % 32 == 0, r1 - r0 a multiple of 32 and at
    most ROWS, out (NB * 16, R') float32 with R' >= R, R' % 16 == 0 and 64-byte aligned (every tile row on a cache
    line), bpanel (ROWS / 32, kc / 32, 2, 16, 32) uint16: a panel of kc k's (KC; the tests take others)."""
    P, NB = xp.shape[0], xp.shape[1]
    R, K = w.shape
    kt = K // 32  # tiles per token block and part
    ost, wst = out.shape[1] * 4, K * 2  # row strides in bytes
    xa, wa, oa, ba = xp.ctypes.data, w.ctypes.data, out.ctypes.data, bpanel.ctypes.data
    part = NB * kt * 1024  # bytes between the parts of one tile
    kc = bpanel.shape[1] * 32  # k's a panel
    _config(cfg.ctypes.data)
    for k0 in range(0, K, kc):
        nk = (min(K, k0 + kc) - k0) // 32
        # this panel of the block's weights as B tiles: (row pair, 32 k's, half, 16 pairs of k, 16 rows x 2)
        for r in range(r0, r1, 32):
            for h in range(2):
                for c in range(nk):
                    _transpose16(wa + (r + h * 16) * wst + (k0 + c * 32) * 2, wst,
                                 ba + ((((r - r0) >> 5) * (kc // 32) + c) * 2 + h) * 1024)
        for j in range(0, NB, 2):
            xq = xa + (j * kt + k0 // 32) * 1024  # part 0 of the first 32 k's of tokens j*16 ..
            for r in range(r0, r1, 32):
                c0 = oa + j * 16 * ost + r * 4  # out[j*16:, r:]: tmm0 (tokens j*16.., rows r..), tmm1 (rows r+16..)
                c2 = c0 + 16 * ost              # tmm2, tmm3: the next 16 tokens
                if k0 == 0:
                    _zero0()
                    _zero1()
                    _zero2()
                    _zero3()
                else:
                    _load0(c0, ost)
                    _load1(c0 + 64, ost)
                    _load2(c2, ost)
                    _load3(c2 + 64, ost)
                bq = ba + ((r - r0) >> 5) * (kc // 32) * 2048
                for c in range(nk):
                    _load6(bq + c * 2048, 64)
                    _load7(bq + c * 2048 + 1024, 64)
                    for p in range(P):  # hi, mid, lo (hi alone for one part)
                        a = xq + p * part + c * 1024
                        _load4(a, 64)
                        _load5(a + kt * 1024, 64)
                        _dot046()
                        _dot147()
                        _dot256()
                        _dot357()
                _store0(c0, ost)
                _store1(c0 + 64, ost)
                _store2(c2, ost)
                _store3(c2 + 64, ost)
    _release()


def usable(K: int, R: int) -> bool:
    """Whether a product by a bf16 weight (R, K) goes to the tiles: AMX here, K in whole tiles, at least one
    32-row block of weights."""
    return K % 32 == 0 and R >= 32 and available()


def rows_per_item(rows: int, workers: int) -> int:
    """Weight rows a work item of product: ROWS, or fewer (a multiple of 32, at least 32) where that leaves some of
    `workers` threads with fewer than two items. On 16 threads the 1B shape's wq and wo (2048 rows) made 8 items
    of 256 and wk, wv 2; its prefill 128 on AMX ran at 2.8x its one-thread rate (device run, session 51). The
    items' sizes do not change a product's bits: every output's sum runs over k in order whoever computes it."""
    return max(32, min(ROWS, rows // (2 * max(1, workers)) // 32 * 32))


@njit(parallel=True, **JIT)
def _items(xp, w, Rt, step, out, cfg, panels):
    """_rows for the items of `step` weight rows of w[:Rt], shared by Numba's threads, each thread with its own B
    panel (panels[thread id])."""
    for i in prange(-(-Rt // step)):
        r0 = i * step
        _rows(xp, w, r0, min(Rt, r0 + step), out, cfg, panels[numba.get_thread_id()])


def product(x2: np.ndarray, xp: np.ndarray, w: np.ndarray, workers: "int | None" = None) -> tuple:
    """out (N, R) = x2 (N, K) @ w.T for w (R, K) bf16 bits (uint16), with xp = split_bf16x3(x2) (3 parts, or 1):
    rows in blocks of 32 on the tiles, in items of rows_per_item(R, workers) rows (workers: Numba's thread count
    unless given) shared by Numba's threads in one parallel region; a last R % 32 rows are left to the caller
    (returned columns not written: the second value says from where).
    Until session 61 the items went to the Python pool of runtime.threads.each_block, a closure a work item
    called under the GIL: on 2 threads (Emerald Rapids, 128 tokens, best of 15) 8192 x 2048 took 6.37 ms that way
    against 4.42 in one region (8.84 on one thread), 2048 x 2048 1.30 against 1.12, 2048 x 8192 5.62 against 5.01."""
    if not available():  # without the permission (and the asm parser) the first tile instruction kills the process
        raise RuntimeError("kernels.amx.product: no AMX-BF16 tiles here (amx.available() is False)")
    N = x2.shape[0]
    R = w.shape[0]
    w = np.ascontiguousarray(w)  # _rows steps through rows by address (a copy only for a strided view)
    Rt = R - R % 32
    Rp = -(-R // 16) * 16  # output rows 64-byte aligned
    out = aligned((xp.shape[1] * 16, Rp), np.float32)  # (NB * 16, Rp): token rows padded to whole tiles
    n = numba.get_num_threads()
    if Rt:
        _items(xp, w, Rt, rows_per_item(Rt, n if workers is None else workers), out, _CONFIG, _panels(n))
    return out[:N, :R], Rt


_kept = threading.local()


def _panels(n: int) -> np.ndarray:
    """A buffer for a block's B panel for each of the n threads of a parallel region (1 MiB each), kept between
    calls (grown for more). One set per Python thread that starts regions: two threads' products at once (two
    models on two threads) run as two teams whose thread ids both start at 0."""
    buf = getattr(_kept, "panels", None)
    if buf is None or buf.shape[0] < n:
        buf = _kept.panels = aligned((n, ROWS // 32, KC // 32, 2, 16, 32), np.uint16)
    return buf
