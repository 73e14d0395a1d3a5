"""A float32 matrix product of our own, out (N, R) = x (N, K) @ w (R, K).T, for sums="apart" (issue 21).

Why not NumPy's BLAS: load(..., sums="apart") (model/ops.linear_apart) sums 8 columns of x apart and adds them
last. Through BLAS that takes a copy of x with those columns zeroed, and a second pass over the (N, R) output
adding the 8 terms. Here both come for free: packing x's panels copies anyway (the apart columns are zeroed on
the way), and the 8 terms are added to each register tile right before it is stored.

The bits (fixed, whatever the blocking or thread count): K is cut in blocks of KB = 64 k's from k = 0; each
block's chain is one fused multiply-add chain in increasing k, acc = fma(x[n, k], w[r, k], acc) from acc = +0,
and the output is the sum of the blocks' chains in block order, ((c0 + c1) + c2) + ... in float32. Between
K panels (whole blocks) the total waits in `out` or `part` (float32 both ways: exact), so the panel width,
the tile an output falls in, and the split of w's rows over threads never change a bit. Blocks, not one
chain over K: one chain of 576 or 1536 terms put the default model's logits 1.27x further from float64 than
transformers' float32 (its BLAS sums in shorter chains); the blocks' adds take the FP add units, beside the
fused multiply-adds. With apart columns (cols, x_apart (N, 8)), x[:, cols] counts as zero in those chains,
and the 8 apart terms are then added as ops.linear_apart's NumPy specification adds them last, summed by
themselves: p01 = fma(xa1, wa1, xa0 * wa0) (the first product rounded, the second fused), p23, p45, p67
alike, out = total + ((p01 + p23) + (p45 + p67)).

The layout (BLIS's loops; Goto's blocking): w's rows in blocks of NC, K in panels of KC, x's rows in blocks of
MC; both operands packed per panel: w into (NC / 16, kc, 16) (16 rows side by side, one k after the other),
x into (MC / 6, kc, 6). The micro-kernel (LLVM vector IR, AVX2 + FMA: 8 float32 lanes) keeps a 6 x 16 tile
of out in 12 ymm registers; per k: two loads of w's 16 values, 6 broadcasts of x, 12 fused multiply-adds.
With AVX-512 (WIDE, by default on Intel's cores) the same code in 16 lanes keeps an 8 x 32 tile in 16 zmm
registers, w packed 32 rows side by side and x 8: twice the multiply-adds a cycle on a core that issues
512-bit ones on two ports. Each output's chain is the same either way (one lane of one register), so are
the bits. On an Intel Sapphire Rapids (2 threads, session 45) the default model's products went from 0.37x
OpenBLAS's speed to 0.64x, the 1B shape's to 0.74-1.0x, and the Numba backend's sums="apart" prefill of 200
tokens from 1.11-1.23x the time of sums="blas" to 0.93-1.03x (benchmarks/results/float32_sums_spr_s45.txt).
Its w micro-panel (kc x 16) stays in L1/L2 while it runs down the x block (MC x kc, in L2). Each micro-panel
of w is packed right before its first use (in cache then) and the next one's cache lines prefetched; packing
transposes 8 x 8 blocks in registers. Edges: x's last rows take a tile of fewer rows (1-5), w's last rows go
through a 6 x 16 scratch tile. Measured against NumPy's OpenBLAS: benchmarks/float32_sums.py --products,
benchmarks/results/float32_sums_*_s31.txt.

Numba's on-disk cache checks a kernel against its own file only: this one inlines ggml_simd.prefetch, so after
editing kernels/ggml_simd.py delete kernels/__pycache__/sgemm*.nbi and *.nbc too (see _common.py).
"""

from __future__ import annotations

import threading

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ._common import JIT
from .ggml_simd import HOST_IS_ZEN, prefetch

F32, I64 = ir.FloatType(), ir.IntType(64)
MR, NR = 6, 16  # the register tile: 6 rows of x by 16 rows of w (two 8-lane vectors)
# ... and with 512-bit vectors (wide): 8 rows of x by 32 of w, two 16-lane vectors a row (16 of the 32 registers)
MR_WIDE, NR_WIDE = 8, 32
# K panel, rounded to whole blocks of KB: the default model's 576 in one. 256 (a w micro-panel of 16 KiB, in
# L1) cost 5-10 % on its 576-wide products with w cold from memory, as in a forward pass (3 panels: the partial
# sums stored and loaded twice more); at 640 the micro-panel (36 KiB) is read from L2, which keeps up.
KC = 640
KB = 64  # k's a chain: each block's chain from +0, then added to the total (the bits: module docstring)
MC = 216  # x rows a block: 216 x 576 x 4 = 486 KiB (L2 512 KiB); 108 and 144 measured no faster (a multiple of 6 and 8)
NC = 1536  # w rows a block (fewer where `part` would pass CP)
PF = 1  # prefetch w's next micro-panel
CP = 4 << 20  # bytes of partial sums a thread keeps apart from out (part)
APART = 8  # apart columns the micro-kernel adds (ops.APART)


def _host_wide() -> "tuple[bool, bool]":
    """(whether this CPU has AVX-512F, whether sgemm takes its 512-bit tiles by default). Intel's AVX-512 cores
    issue 512-bit fused multiply-adds on two ports, twice the lanes of 256-bit ones a cycle; AMD's Zen 4 splits
    each into two 256-bit halves (not measured here; ggml_simd.host_prefers_512 measured its 512-bit integer
    tiles slower there), so it keeps the 256-bit tiles. LLAMA_REF_SGEMM_WIDE=0 / 1 overrides (same bits)."""
    import os

    from llvmlite import binding

    has = "+avx512f" in binding.get_host_cpu_features().flatten().split(",")
    forced = os.environ.get("LLAMA_REF_SGEMM_WIDE", "")
    if forced in ("0", "1"):
        return has, has and forced == "1"
    return has, has and not HOST_IS_ZEN


HAS_AVX512, WIDE = _host_wide()


def _declare(module, name, ret, args):
    fn = module.globals.get(name)
    return fn if fn is not None else ir.Function(module, ir.FunctionType(ret, args), name)


def _define_tile(module, mr, lanes=8):
    """void f(ap, bp, kc, cin, ldin, load, c, ldc, xa, wa, apart, pc, pld): the mr x nr tile (nr = 2 lanes: 16,
    or 32 wide) at byte address c (rows ldc bytes apart) = the sums of the module docstring over kc k's of ap
    (kc, MR or MR_WIDE; its first mr columns) and bp (kc, nr), in blocks of KB k's (kc: a multiple of KB but
    for K's last panel), each block's chain added to the total; the total before them: the tile at cin (rows
    ldin apart) if load, else the first block's chain; then, if apart, + the 8 apart terms of xa (mr, 8) and
    wa (8, nr). pc: the tile the next call reads or writes (rows pld apart), prefetched. All i64 (addresses
    and strides in bytes)."""
    nr, mrp = 2 * lanes, MR_WIDE if lanes == 16 else MR  # the tile's w rows; x's packed rows a k (ap's stride)
    name = f"llama_ref_sgemm_{mr}x{nr}"
    fn = module.globals.get(name)
    if fn is not None:
        return fn
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 13), name)
    fn.linkage = "internal"
    ap, bp, kc, cin, ldin, load, c, ldc, xa, wa, apart, pc, pld = fn.args
    v8 = ir.VectorType(F32, lanes)  # (8 lanes, or 16 where wide)
    i32 = ir.IntType(32)
    fma = _declare(module, f"llvm.fma.v{lanes}f32", v8, [v8] * 3)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    zero8 = ir.Constant(v8, [0.0] * lanes)
    half = 4 * lanes  # bytes of a vector: the tile row's second one starts there
    names = ("entry", "terms", "copyin", "outer", "inner", "whole", "after", "first", "addto", "next", "done")
    entry, terms, copyin, outer, inner, whole, after, first, addto, next_, done = (fn.append_basic_block(n)
                                                                                   for n in names)

    def vload(b, addr):
        return b.load(b.inttoptr(addr, ir.PointerType(v8)), align=4)

    def splat(b, addr):
        s = b.load(b.inttoptr(addr, ir.PointerType(F32)), align=4)
        v = b.insert_element(ir.Constant(v8, ir.Undefined), s, ir.Constant(i32, 0))
        return b.shuffle_vector(v, ir.Constant(v8, ir.Undefined), ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))

    def addr(b, base, ld, i, h):  # row i, half h of the tile at base
        return b.add(b.add(base, b.mul(c64(i), ld)), c64(half * h))

    def slot(b, arr, j):
        return b.gep(arr, [ir.Constant(i32, 0), ir.Constant(i32, j)])

    b = ir.IRBuilder(entry)
    # On the stack (L1): the running total (12 accumulators of the chain are all the registers there are
    # beside w's two vectors and a broadcast), and the apart terms' sums, made before the chain, added after it
    total = b.alloca(ir.ArrayType(v8, mr * 2))
    sums = b.alloca(ir.ArrayType(v8, mr * 2))
    i8p = ir.PointerType(ir.IntType(8))
    pf = _declare(module, "llvm.prefetch.p0", ir.VoidType(), [i8p, i32, i32, i32])
    for i in range(mr):  # the next tile's outputs (its first and last value: one or two cache lines a row)
        row = b.add(pc, b.mul(c64(i), pld))
        for off in (0, 4 * nr - 4):
            b.call(pf, [b.inttoptr(b.add(row, c64(off)), i8p), ir.Constant(i32, 1), ir.Constant(i32, 3),
                        ir.Constant(i32, 1)])
    with_terms = b.icmp_signed("!=", apart, c64(0))
    loaded = b.icmp_signed("!=", load, c64(0))
    b.cbranch(with_terms, terms, copyin)

    # The 8 apart terms of each output, summed by themselves while no accumulator is live (with the 12 of
    # the chain, their 8 columns of w and the broadcasts spilled to the stack: +6-12 % on a 576-wide product,
    # one round)
    b = ir.IRBuilder(terms)
    for h in range(2):
        ws = [vload(b, b.add(wa, c64(4 * nr * j + half * h))) for j in range(APART)]
        for i in range(mr):
            xs = [splat(b, b.add(xa, c64(4 * (APART * i + j)))) for j in range(APART)]
            pairs = [b.call(fma, [xs[j + 1], ws[j + 1], b.fmul(xs[j], ws[j])]) for j in range(0, APART, 2)]
            b.store(b.fadd(b.fadd(pairs[0], pairs[1]), b.fadd(pairs[2], pairs[3])), slot(b, sums, 2 * i + h))
    b.branch(copyin)

    b = ir.IRBuilder(copyin)  # the total so far (K's earlier panels), if any
    for i in range(mr):
        for h in range(2):
            v = b.select(loaded, vload(b, addr(b, cin, ldin, i, h)), zero8)
            b.store(v, slot(b, total, 2 * i + h))
    b.branch(outer)

    b = ir.IRBuilder(outer)  # a block of KB k's: kb .. kend - 1
    kb = b.phi(I64)
    kend = b.select(b.icmp_signed("<", b.add(kb, c64(KB)), kc), b.add(kb, c64(KB)), kc)
    b.cbranch(b.icmp_signed("==", b.sub(kend, kb), c64(KB)), whole, inner)

    def step(b, k, accs):  # acc = fma(x[k], w[k], acc) for the tile's mr x nr
        bk = b.add(bp, b.mul(k, c64(nr * 4)))
        w0, w1 = vload(b, bk), vload(b, b.add(bk, c64(half)))
        ak = b.add(ap, b.mul(k, c64(mrp * 4)))
        new = []
        for i in range(mr):
            xi = splat(b, b.add(ak, c64(4 * i)))
            new += [b.call(fma, [xi, w0, accs[2 * i]]), b.call(fma, [xi, w1, accs[2 * i + 1]])]
        return new

    # the block's chain from +0: a whole block 4 k's a turn (one k a turn, LLVM left the loop's counting
    # beside each k's 12 fused multiply-adds and the block cost ~8 %), K's last partial block one at a time
    ends = []
    for blk, unroll in ((whole, 4), (inner, 1)):
        b = ir.IRBuilder(blk)
        k = b.phi(I64)
        accs = [b.phi(v8) for _ in range(mr * 2)]
        new = accs
        for u in range(unroll):
            new = step(b, b.add(k, c64(u)), new)
        k1 = b.add(k, c64(unroll))
        b.cbranch(b.icmp_signed("<", k1, kend), blk, after)
        k.add_incoming(kb, outer)
        k.add_incoming(k1, blk)
        for p, v in zip(accs, new):
            p.add_incoming(zero8, outer)
            p.add_incoming(v, blk)
        ends.append(new)

    b = ir.IRBuilder(after)  # K's first block: the total; any other: added to it
    new = []
    for j in range(mr * 2):
        p = b.phi(v8)
        p.add_incoming(ends[0][j], whole)
        p.add_incoming(ends[1][j], inner)
        new.append(p)
    is_first = b.and_(b.icmp_signed("==", kb, c64(0)), b.not_(loaded))
    b.cbranch(is_first, first, addto)
    b = ir.IRBuilder(first)
    for j in range(mr * 2):
        b.store(new[j], slot(b, total, j))
    b.branch(next_)
    b = ir.IRBuilder(addto)
    for j in range(mr * 2):
        b.store(b.fadd(b.load(slot(b, total, j)), new[j]), slot(b, total, j))
    b.branch(next_)

    b = ir.IRBuilder(next_)
    kb1 = b.add(kb, c64(KB))
    b.cbranch(b.icmp_signed("<", kb1, kc), outer, done)
    kb.add_incoming(c64(0), copyin)
    kb.add_incoming(kb1, next_)

    b = ir.IRBuilder(done)  # the total, plus the apart terms' sums if any, to c
    for i in range(mr):
        for h in range(2):
            v = b.load(slot(b, total, 2 * i + h))
            v = b.select(with_terms, b.fadd(v, b.load(slot(b, sums, 2 * i + h))), v)
            b.store(v, b.inttoptr(addr(b, c, ldc, i, h), ir.PointerType(v8)), align=4)
    b.ret_void()
    return fn


@intrinsic
def _tile(typingctx, ap, bp, kc, cin, ldin, load, c, ldc, xa, wa, apart, pc, pld, case):
    """The micro-kernel (see _define_tile) for case = rows (1 .. 6 rows of x by 16 of w, 8-lane vectors) or
    16 + rows (1 .. 8 rows by 32, 16-lane vectors: wide): all arguments int64."""
    sig = types.void(*([types.int64] * 14))

    def codegen(context, builder, signature, args):
        fn = builder.function
        after = fn.append_basic_block("tile_done")
        switch = builder.switch(args[13], after)
        for lanes, rows, base in ((8, MR, 0), (16, MR_WIDE, 16)):
            for mr in range(1, rows + 1):
                block = fn.append_basic_block(f"tile_{base + mr}")
                switch.add_case(ir.Constant(I64, base + mr), block)
                with builder.goto_block(block):
                    builder.call(_define_tile(builder.module, mr, lanes), args[:13])
                    builder.branch(after)
        builder.position_at_end(after)
        return context.get_dummy_value()
    return sig, codegen


def _define_pack(module, rows):
    """void f(src, ld, dst, n8): `rows` (16 or 32: w's, 6 or 8: x's) rows from byte address src (ld bytes apart) -> dst,
    8 k's at a time for n8 times: dst[k * rows + j] = src row j, value k. 8 x 8 transposes (unpack, shuffle,
    then 128-bit halves: 24 shuffles for 64 values), where a scalar copy made a load and a store of each value
    (2-5x slower). For 6 rows, rows 6 and 7 of the transpose repeat row 5 and each k stores 8 values: the
    2 extra are overwritten by the next k's, the last k's by whatever dst holds next (the caller leaves room
    for 2 floats after the last, and writes what follows afterwards)."""
    name = f"llama_ref_sgemm_pack{rows}"
    fn = module.globals.get(name)
    if fn is not None:
        return fn
    fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64] * 4), name)
    fn.linkage = "internal"
    src, ld, dst, n8 = fn.args
    v8 = ir.VectorType(F32, 8)
    c64 = lambda v: ir.Constant(I64, v)  # noqa: E731
    entry, loop, done = (fn.append_basic_block(n) for n in ("entry", "loop", "done"))
    b = ir.IRBuilder(entry)
    b.cbranch(b.icmp_signed(">", n8, c64(0)), loop, done)
    b = ir.IRBuilder(loop)
    i = b.phi(I64)

    def shuf(u, v, idx):
        return b.shuffle_vector(u, v, ir.Constant(ir.VectorType(ir.IntType(32), 8), idx))

    lo, hi = [0, 8, 1, 9, 4, 12, 5, 13], [2, 10, 3, 11, 6, 14, 7, 15]
    even, odd = [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]
    low128, high128 = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    for half in range((rows + 7) // 8):  # rows 0-7, then 8-15
        loaded = [b.load(b.inttoptr(b.add(b.add(src, b.mul(c64(8 * half + j), ld)), b.mul(i, c64(32))),
                                    ir.PointerType(v8)), align=4) for j in range(min(8, rows))]
        r = loaded + [loaded[-1]] * (8 - len(loaded))
        t = [shuf(r[j], r[j + 1], idx) for j in range(0, 8, 2) for idx in (lo, hi)]  # t0 t1 | t2 t3 | ..
        q = []  # q[c]: values c and 4 + c of 4 rows
        for g in (0, 4):
            q += [shuf(t[g], t[g + 2], even), shuf(t[g], t[g + 2], odd), shuf(t[g + 1], t[g + 3], even),
                  shuf(t[g + 1], t[g + 3], odd)]
        cols = [shuf(q[c], q[4 + c], low128) for c in range(4)] + [shuf(q[c], q[4 + c], high128) for c in range(4)]
        base = b.add(dst, b.add(b.mul(i, c64(8 * rows * 4)), c64(32 * half)))
        for k in range(8):
            b.store(cols[k], b.inttoptr(b.add(base, c64(rows * 4 * k)), ir.PointerType(v8)), align=4)
    i1 = b.add(i, c64(1))
    b.cbranch(b.icmp_signed("<", i1, n8), loop, done)
    i.add_incoming(c64(0), entry)
    i.add_incoming(i1, loop)
    b = ir.IRBuilder(done)
    b.ret_void()
    return fn


@intrinsic
def _pack_rows(typingctx, src, ld, dst, n8, rows):
    """_define_pack's packing of `rows` rows (NR, MR, NR_WIDE or MR_WIDE) as an intrinsic: all int64."""
    sig = types.void(*([types.int64] * 5))

    def codegen(context, builder, signature, args):
        fn = builder.function
        after = fn.append_basic_block("pack_done")
        switch = builder.switch(args[4], after)
        for rows in sorted({NR, MR, NR_WIDE, MR_WIDE}):
            block = fn.append_basic_block(f"pack_{rows}")
            switch.add_case(ir.Constant(I64, rows), block)
            with builder.goto_block(block):
                builder.call(_define_pack(builder.module, rows), args[:4])
                builder.branch(after)
        builder.position_at_end(after)
        return context.get_dummy_value()
    return sig, codegen


@njit(**JIT)
def _pack(src, n0, n1, k0, kc, dst, width, cols):
    """dst[(t * kc + k) * width + i] = src[n0 + width t + i, k0 + k], zero past row n1 and in the columns cols:
    width NR (NR_WIDE) packs a micro-panel of w's rows (no cols), MR (MR_WIDE) a block of x's (its apart columns
    zeroed). A whole tile's k's 8 at a time by _pack_rows, the rest value by value; x's dst holds 8 floats more
    than the packed values (6 rows write 2 past their last)."""
    nt = (n1 - n0 + width - 1) // width
    K = src.shape[1]
    k8 = kc // 8 * 8
    for t in range(nt):
        base = t * kc * width
        n = n0 + t * width
        full = n + width <= n1
        if full:
            at, to = src.ctypes.data + (n * K + k0) * 4, dst.ctypes.data + base * 4
            _pack_rows(at, K * 4, to, k8 // 8, width)
        for k in range(k8 if full else 0, kc):
            for i in range(width):
                dst[base + k * width + i] = src[n + i, k0 + k] if n + i < n1 else 0
        for j in range(cols.shape[0]):
            c = cols[j] - k0
            if 0 <= c < kc:
                for i in range(width):
                    dst[base + c * width + i] = 0


@njit(**JIT)
def _gemm_rows(x, w, out, r0, r1, cols, x_apart, KC, MC, NC, PF, CP, work, wide):
    """out[:, r0:r1] = x @ w[r0:r1].T in the sums the module docstring fixes; with cols (m,) = APART columns,
    x[:, cols] left out of them and x_apart @ w[r0:r1, cols].T added last; m = 0: a plain product. KC, MC,
    NC: the blocking (the module's constants of those names), PF: prefetch w's next micro-panel, CP: the
    most bytes of partial sums kept apart from out; they change the time, never the bits. work (float32):
    the packed panels and partial sums. wide: 512-bit tiles (MR_WIDE x NR_WIDE), else 256-bit (MR x NR); the same
    bits. Returns 0, or (nothing done) the floats work must hold."""
    mr, nr = (MR_WIDE, NR_WIDE) if wide else (MR, NR)  # the tile: x's rows, w's rows
    case = 16 if wide else 0  # _tile's cases: rows, + 16 for the wide tiles
    MC = max(mr, MC // mr * mr)  # whole tiles an x block: part's tiles are found by n // mr
    N, K = x.shape
    R = out.shape[1]
    apart = cols.shape[0] == APART
    panels = (K + KC - 1) // KC  # K in about equal panels of whole blocks of KB (but the last), none narrow
    step = ((K + panels - 1) // panels + KB - 1) // KB * KB
    panels = (K + step - 1) // step
    # Between K panels the partial sums wait in `part`, tile after tile ((N / 6, 6, 16) per 16 rows of w), not
    # in out: a tile of out has its 6 rows R floats apart, which for R a multiple of 1024 (the 1B shape's 2048,
    # 8192) fall in one set of L1 and few of L2, and a column of tiles evicted itself (~10 % of the time).
    NT = (N + mr - 1) // mr
    nc = min(NC, r1 - r0)
    if panels > 1 and CP > 0:  # w's rows a block cut down so that part stays within CP bytes
        nc = max(nr, min(nc, CP // (NT * mr * nr * 4) * nr))
    sizes = (NT * mr * ((nc + nr - 1) // nr) * nr if panels > 1 and CP > 0 else 0,  # part
             ((min(MC, N) + mr - 1) // mr) * mr * step + 8,  # ap (_pack6 writes 2 floats past its last)
             ((nc + nr - 1) // nr) * nr * step,  # bp
             mr * nr,  # tile: an edge tile's outputs (fewer than 6 x 16 in out)
             NT * mr * APART,  # xa: x_apart, padded to whole tiles (N', 8)
             ((nc + nr - 1) // nr) * APART * nr)  # wa: (nc' / 16, 8, 16)
    need = 0
    for v in sizes:
        need += (v + 15) // 16 * 16  # each on a 64-byte line of its own
    if work.shape[0] < need:
        return need
    views = []
    at = 0
    for v in sizes:
        views.append(work[at:at + v])
        at += (v + 15) // 16 * 16
    part, ap, bp, tile, xa, wa = views
    xa[:] = 0
    wa[:] = 0
    if apart:
        for n in range(N):
            for j in range(APART):
                xa[n * APART + j] = x_apart[n, j]
    xa0, ap0, bp0, wa0, p0 = xa.ctypes.data, ap.ctypes.data, bp.ctypes.data, wa.ctypes.data, part.ctypes.data
    t0, o0, w0 = tile.ctypes.data, out.ctypes.data, w.ctypes.data
    ldc, ldp, TB = R * 4, nr * 4, mr * nr * 4  # out's and part's row strides, part's tile (bytes)
    for rb in range(r0, r1, nc):
        rb1 = min(r1, rb + nc)
        for k0 in range(0, K, step):
            kc = min(step, K - k0)
            first, final = k0 == 0, k0 + kc == K
            last = 1 if apart and final else 0
            load = 0 if first else 1
            via = part.shape[0] > 0  # partial sums in part (else in out)
            for nb in range(0, N, MC):
                nb1 = min(N, nb + MC)
                _pack(x, nb, nb1, k0, kc, ap, mr, cols)
                for t in range((rb1 - rb + nr - 1) // nr):
                    r = rb + t * nr
                    bt = bp0 + t * kc * nr * 4
                    if nb == 0:  # packed right before its first use, while x's first block runs: in L1 then
                        _pack(w, r, min(r + nr, rb1), k0, kc, bp[t * kc * nr:], nr, cols[:0])
                        for j in range(cols.shape[0] if apart else 0):  # w's apart columns in this panel:
                            c = cols[j] - k0  # 16 values side by side in the panel just packed (a gather
                            if 0 <= c < kc:  # from w's rows beforehand read 8 lines a row from memory)
                                for jj in range(nr):
                                    wa[(t * APART + j) * nr + jj] = bp[(t * kc + c) * nr + jj]
                    wt = wa0 + t * APART * nr * 4
                    S = (nb1 - nb + mr - 1) // mr
                    ahead = PF and nb == 0 and r + 2 * nr <= rb1  # the next micro-panel's w from memory
                    lines = (kc * 4 + 63) // 64 + 1
                    full = r + nr <= rb1
                    for s in range(S):
                        n = nb + s * mr
                        if ahead:  # its cache lines shared out over this column's tiles, 16 rows a line
                            for line in range(s, lines, S):
                                for j in range(nr):
                                    prefetch(w0 + ((r + nr + j) * K + k0) * 4 + line * 64)
                        rows = min(mr, nb1 - n)
                        at = ap0 + s * kc * mr * 4
                        xt = xa0 + n * APART * 4
                        # the next tile: down the column, else the top of the next one
                        n2, r2 = (n + mr, r) if n + mr < nb1 else (nb, r + nr)
                        pt = p0 + ((t * NT + n // mr)) * TB  # this tile in part, and the next
                        pn = p0 + (((r2 - rb) // nr) * NT + n2 // mr) * TB
                        o, on = o0 + (n * R + r) * 4, o0 + (n2 * R + r2) * 4
                        src, lds = (pt, ldp) if via else (o, ldc)
                        if via and not final:
                            _tile(at, bt, kc, src, lds, load, pt, ldp, xt, wt, last, pn, ldp, case + rows)
                        elif full:
                            pc, pld = (pn, ldp) if via else (on, ldc)
                            _tile(at, bt, kc, src, lds, load, o, ldc, xt, wt, last, pc, pld, case + rows)
                        else:  # w's last rows: through `tile`, only the outputs that exist copied in and out
                            if not via:
                                for i in range(rows):
                                    for j in range(rb1 - r):
                                        tile[i * nr + j] = out[n + i, r + j]
                                src, lds = t0, nr * 4
                            _tile(at, bt, kc, src, lds, load, t0, nr * 4, xt, wt, last, t0, nr * 4, case + rows)
                            for i in range(rows):
                                for j in range(rb1 - r):
                                    out[n + i, r + j] = tile[i * nr + j]
    return 0


_NO_COLS = np.zeros(0, np.int64)
_NO_APART = np.zeros((0, APART), np.float32)


def sgemm(x: np.ndarray, w: np.ndarray, cols=None, x_apart=None, threads: int = 1, blocking=None,
          wide: "bool | None" = None) -> np.ndarray:
    """out (N, R) = x (N, K) @ w (R, K).T, float32 C-contiguous both, in the fixed sums of the module
    docstring; with cols (8,) int64 and x_apart (N, 8): x's columns cols left out, x_apart's terms added last.
    `threads` > 1: w's rows shared out in blocks (runtime.threads.each_block); wide: the 512-bit tiles (None:
    WIDE, this CPU's choice); the same bits either way."""
    N, K = x.shape
    R = w.shape[0]
    blocking = (KC, MC, NC, PF, CP) if blocking is None else blocking
    wide = WIDE if wide is None else bool(wide)
    if wide and not HAS_AVX512:
        raise ValueError("sgemm: wide=True needs AVX-512F, which this CPU does not have")
    blocking = (*blocking, wide)
    out = np.empty((N, R), np.float32)
    if cols is None:
        cols, x_apart = _NO_COLS, _NO_APART
    if N == 0 or R == 0:
        return out
    if K == 0:
        out[:] = 0
        return out
    if threads <= 1:
        _rows(x, w, out, 0, R, cols, x_apart, blocking)
        return out
    from llama_ref.runtime import threads as th

    step = -(-R // threads)
    nr = NR_WIDE if wide else NR
    step = -(-step // nr) * nr  # whole tiles a block
    th.each_block(R, step, lambda r0, r1: _rows(x, w, out, r0, r1, cols, x_apart, blocking), threads)
    return out


_WORK = threading.local()  # each thread's work array, kept: bounded (CP + NC and MC panels), reused


def _rows(x, w, out, r0, r1, cols, x_apart, blocking) -> None:
    """_gemm_rows with this thread's work array, grown (once) where it is too small. A new array each call
    made the kernel's first touch of its pages (page faults) cost ~0.1-0.3 ms a product of the default model."""
    work = getattr(_WORK, "array", None)
    if work is None:
        work = _WORK.array = np.empty(0, np.float32)
    *sizes, wide = blocking
    need = _gemm_rows(x, w, out, r0, r1, cols, x_apart, *sizes, work, wide)
    if need:
        _WORK.array = np.empty(need, np.float32)
        _gemm_rows(x, w, out, r0, r1, cols, x_apart, *sizes, _WORK.array, wide)
