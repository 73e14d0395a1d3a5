"""The machine code of arithmetic="ggml"'s prefill tiles (kernels/ggml_simd.py) on AVX2: what LLVM made of the
IR, checked where speed depends on it and no test of values can see it. The values themselves are
tests/test_ggml_kernels.py's (bit for bit against the NumPy specification and llama.cpp).

Numba compiles for the host CPU, so on one with AVX-512 the same AVX2 branch (simd=2) gets 32 vector
registers and AVX-512's instructions: LLVM then fuses a vpmaddwd with the add after it into vpdpwssd (AVX-512
VNNI), and unrolls a short loop into its enclosing one (a K-quant tile's passes over a super-block in one
body). The tests count either form (maddwd), and a loop of several passes as its passes (passes).
"""

from __future__ import annotations

import re

import pytest

from llama_ref.kernels import ggml_simd

pytestmark = pytest.mark.skipif(not ggml_simd.HAS_AVX2, reason="the AVX2 tiles are emitted only on an AVX2 CPU")


def tile_asm(kind: str, rows: int, acts: int, simd: int = 2) -> str:
    """The assembly of one call of ggml_simd's `kind` tile of rows x acts, AVX2 branch (simd=2; 1 the VNNI one)."""
    from numba import njit, types

    tile = ggml_simd.make_dot(kind, rows, acts)

    @njit
    def run(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost):
        tile(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, simd)
    run.compile((types.int64,) * 13)
    return run.inspect_asm(run.signatures[0])


def maddwd(names: list[str]) -> int:
    """vpmaddwd's in a loop body: AVX2's, or AVX-512 VNNI's vpdpwssd (the same product of words, added on)."""
    return names.count("vpmaddwd") + names.count("vpdpwssd")


def fp16_loads(names: list[str]) -> int:
    """fp16 to float32 conversions in a loop body: F16C's vcvtph2ps, or where the CPU has AVX512-FP16 (Sapphire
    Rapids) the forms LLVM picks there, vcvtph2psx and the scalar vcvtsh2ss: one instruction a scale either way."""
    return sum(names.count(name) for name in ("vcvtph2ps", "vcvtph2psx", "vcvtsh2ss"))


def stack_traffic(body: list[str]) -> tuple[list[str], list[str]]:
    """A loop body's stack accesses split in two: spills (slots the loop itself writes: a store and its reloads,
    each pass) and loop invariants (slots only read in the loop, written before it: one L1 load each, mostly folded
    into the instruction that uses them). Only %rsp counts: LLVM may use %rbp as a general register."""
    slot = re.compile(r"(-?\d*)\(%rsp\)")
    written = set()
    for ins in body:
        parts = ins.split(None, 1)
        last = parts[1].rsplit(",", 1)[-1].strip() if len(parts) > 1 else ""
        if slot.fullmatch(last) and not ins.startswith(("cmp", "test", "vptest", "prefetch")):
            written.add(last)
    spills = [ins for ins in body if any(m.group(0) in written for m in slot.finditer(ins))]
    invariants = [ins for ins in body if slot.search(ins) and ins not in spills]
    return spills, invariants


def passes(body: list[str], per_pass: int) -> int:
    """How many passes of per_pass vpmaddubsw a loop body holds (0 if not a whole number of them)."""
    n = sum(ins.startswith("vpmaddubsw") for ins in body)
    return n // per_pass if n % per_pass == 0 else 0


def block_loops(asm: str) -> list[list[str]]:
    """The instructions of each loop body: a basic block that jumps back to its own label."""
    loops, label, body = [], None, []
    for line in asm.splitlines():
        if not line.startswith("\t") and line.endswith(":"):
            label, body = line[:-1], []
        elif line.startswith("\t") and not line.startswith("\t.") and not line.startswith("\t#"):
            # an encoding pseudo-prefix is not the instruction: LLVM writes "{vex} vpdpwssd" where a CPU with
            # AVX-VNNI takes the VEX form of AVX-512 VNNI's instruction (Emerald Rapids, registers below 16)
            body.append(re.sub(r"^\{e?vex\}\s*", "", line.strip()))
            parts = line.split()
            if parts[0].startswith("j") and len(parts) > 1 and parts[1] == label:
                loops.append(list(body))  # a copy: code after the loop's jump is not the loop's
    return loops


@pytest.mark.parametrize("kind", ["q8_0"])  # also Q5_0's (int8 values q - 16)
def test_prefill_tile_keeps_its_accumulators_in_registers(kind):
    """A 4 x 4 prefill tile runs as passes of 4 rows x 2 activations (ggml_simd.SPLIT_ACTS): 8 accumulators
    and the block's values fit AVX2's 16 ymm registers. As one pass of 16 accumulators, LLVM spilled 30 to 60
    stack loads and stores a block (Q8_0: 60 of 199 instructions). (Q4_1 / Q5_1 still spill some: their 8 float
    sums of the mins share the same registers.)"""
    loops = [body for body in block_loops(tile_asm(kind, 4, 4)) if "vpmaddubsw" in " ".join(body)]
    assert loops, "no block loop found"
    for body in loops:
        stack = [ins for ins in body if "(%rsp)" in ins or "(%rbp)" in ins]
        assert len(stack) <= 6, (len(stack), len(body))
        # 8 products of weight row by activation a block: one fma each
        assert sum(ins.startswith("vfmadd") for ins in body) == 8, body


def test_q8_0_prefill_takes_its_scales_from_a_table():
    """An AVX2 prefill tile makes every (row, activation) pair's d_w d_x before its block loop, 8 blocks a vmulps
    (ggml_simd._pair_products: 8 of them for a pass of 4 rows x 2 activations, LLVM may unroll), and its block
    loop takes each as one broadcast from memory, with no multiply: there vpsignb, vmulps and the fma share Zen 3's
    pipes FP0 / FP1 (2048 x 2048 by 512 rows, one thread: 1.10x)."""
    loops = block_loops(tile_asm("q8_0", 4, 4))
    products = [body for body in loops if "vpmaddubsw" in " ".join(body)]
    tables = [[ins.split()[0] for ins in body] for body in loops if "vpmaddubsw" not in " ".join(body)]
    assert products and tables
    for body in products:
        names = [ins.split()[0] for ins in body]
        # a broadcast load, or with AVX-512 the same load folded into the fma as an embedded broadcast ({1to8})
        broadcasts = names.count("vbroadcastss") + sum("{1to8}" in ins for ins in body if ins.startswith("vfmadd"))
        assert "vmulps" not in names and "vmulss" not in names and broadcasts == 8, names
    assert any(names.count("vmulps") and names.count("vmulps") % 8 == 0 for names in tables), tables  # (unrolled)


def test_q4_k_8row_tile_keeps_its_sums_in_registers():
    """Repacked Q4_K's prefill tile (kernels/ggml_kquants._define_q4_kx8_tile, 8 rows by ACTS8 activation rows)
    loops over the pairs of sub-blocks of a super-block: per sub-block 8 vpmaddubsw per activation row (4 values
    of the 8 rows by the activation's 4 bytes broadcast), one vpmaddwd by the scales per activation row, and its
    int16 and int32 sums in registers. Written out as one block of 8 sub-blocks, LLVM kept all 64 unpacked
    vectors on the stack (326 stack loads and stores a super-block). The nibbles come apart with constant
    shifts: a loop over single sub-blocks shifted by a variable amount had every vector widened to words and
    narrowed back (vpmovwb), and ran an in-cache decode at 0.45x."""
    from numba import njit, types

    from llama_ref.kernels import ggml_kquants

    acts, tile = ggml_kquants.ACTS8, ggml_kquants._q4x8_A

    @njit
    def run(w, x, xst, xd, bs, xds, bss, nb, out, ost):
        tile(w, x, xst, xd, bs, xds, bss, nb, out, ost, 2)
    run.compile((types.int64,) * 10)
    loops = [body for body in block_loops(run.inspect_asm(run.signatures[0]))
             if sum(ins.startswith("vpmaddubsw") for ins in body) == 16 * acts]
    assert len(loops) == 1, [len(body) for body in block_loops(run.inspect_asm(run.signatures[0]))]
    names = [ins.split()[0] for ins in loops[0]]
    assert maddwd(names) == 2 * acts, names
    assert not any(name.startswith(("vpmovwb", "vpackuswb")) for name in names), names
    stack = [ins for ins in loops[0] if "(%rsp)" in ins or "(%rbp)" in ins]
    # 32 vector registers (AVX-512) hold it all; AVX2's 16 do not: 18 stack refs of 251 instructions on Zen 3,
    # and still the fastest count of activation rows there (one thread, 2048 x 8192 by 128 rows, ns per block
    # pair: 4 rows 0.376-0.387, 3 rows 0.404-0.406, 2 rows 0.433-0.443; session 51)
    assert len(stack) <= (6 if ggml_simd.HAS_AVX512BW else 20), (len(stack), len(loops[0]))


@pytest.mark.skipif(not (ggml_simd.HAS_AVX512BW and ggml_simd.BEST == "vnni"), reason="AVX-512 BW with VNNI only")
def test_q4_k_8row_decode_tile_takes_two_steps_a_zmm_multiply():
    """On AVX-512 the repacked Q4_K decode tile's best code (simd 1) multiplies two steps of 4 values at once: per
    pass (a pair of sub-blocks) 8 vpmaddubsw on zmm registers, none on ymm, nothing on the stack.
    AVX2's code (simd 2) takes 16 on ymm (test above); in-cache 1.02-1.14x its rate on 2 threads."""
    from numba import njit, types

    from llama_ref.kernels import ggml_kquants

    tile = ggml_kquants._q4x8_1

    @njit
    def run(w, x, xst, xd, bs, xds, bss, nb, out, ost):
        tile(w, x, xst, xd, bs, xds, bss, nb, out, ost, 1)
    run.compile((types.int64,) * 10)
    loops = [body for body in block_loops(run.inspect_asm(run.signatures[0]))
             if any(ins.startswith("vpmaddubsw") for ins in body)]
    assert len(loops) == 1, [len(body) for body in loops]
    multiplies = [ins for ins in loops[0] if ins.startswith("vpmaddubsw")]
    n = passes(loops[0], 8)  # LLVM may unroll the 4 passes of a super-block into one body
    assert n and all("%zmm" in ins for ins in multiplies), multiplies
    stack = [ins for ins in loops[0] if "(%rsp)" in ins or "(%rbp)" in ins]
    assert len(stack) <= 6, (len(stack), len(loops[0]))


def grouped_tile_loops(tile) -> list[list[str]]:
    """The loop bodies of a K-quant prefill tile by a group of activation rows (kernels/ggml_kquants.
    _kquant_gtile's intrinsic), AVX2 branch."""
    from numba import njit, types

    @njit
    def run(w, x, nb, out, ost, acc, part):
        tile(w, x, nb, out, ost, acc, part, 2)
    run.compile((types.int64,) * 7)
    return block_loops(run.inspect_asm(run.signatures[0]))


def test_q6_k_prefill_tile_loops_over_pairs_of_chunks():
    """The Q6_K prefill tile (kernels/ggml_kquants._define_q6_k_gtile, 1 row by GROUP activation rows) loops over
    a super-block's 4 pairs of 32-value chunks: 2 x GROUP vpmaddubsw a pass and GROUP vpmaddwd, one per activation
    row for both chunks (the row unpacked and woven by unpack_q6_k; two a row before session 58), few spills.
    Unrolled whole by LLVM (before _unseen's bound), the super-block kept 68 stack loads and stores."""
    from llama_ref.kernels import ggml_kquants

    acts = ggml_kquants.GROUP
    loops = [body for body in grouped_tile_loops(ggml_kquants._q6_G) if passes(body, 2 * acts)]
    assert len(loops) == 1, [len(body) for body in grouped_tile_loops(ggml_kquants._q6_G)]
    names, n = [ins.split()[0] for ins in loops[0]], passes(loops[0], 2 * acts)
    assert n == 1 and maddwd(names) == acts, names
    spills, invariants = stack_traffic(loops[0])
    assert len(spills) <= 6 and len(invariants) <= 8, (spills, invariants, len(loops[0]))


def test_q5_k_prefill_tile_loops_over_pairs_of_sub_blocks():
    """The Q5_K prefill tile (kernels/ggml_kquants._define_q5_k_gtile) loops over a super-block's 4 pairs of
    sub-blocks: 2 x GROUP vpmaddubsw a pass and GROUP vpmaddwd, one per activation row for both sub-blocks (their
    words woven: unpack_q5_k, group_acts; two vpmaddwd a row before session 33), nothing on the stack (none when
    written). Its 8 sub-blocks written out in one block (the 1 x ACTS tile before it) made 107 stack loads and
    stores a super-block, in 419 instructions."""
    from llama_ref.kernels import ggml_kquants

    acts = ggml_kquants.GROUP
    loops = [body for body in grouped_tile_loops(ggml_kquants._q5_G) if passes(body, 2 * acts)]
    assert len(loops) == 1, [len(body) for body in grouped_tile_loops(ggml_kquants._q5_G)]
    names, n = [ins.split()[0] for ins in loops[0]], passes(loops[0], 2 * acts)
    # one a row a pass; with AVX-512 the 4 passes in one body take the super-block's mins there too, at most
    # one more a row (two a row a pass, unwoven, would be 2 * n * acts)
    assert n * acts <= maddwd(names) <= (n + (n > 1)) * acts, names
    # Few spills; on Sapphire Rapids LLVM also leaves 8 loop invariants (gf2p8affineqb's matrices, masks) on the
    # stack, read as memory operands (2 spills and 8 such reads in 208 instructions there; 6 in all on Zen 4)
    spills, invariants = stack_traffic(loops[0])
    assert len(spills) <= 6 and len(invariants) <= 8, (spills, invariants, len(loops[0]))


def test_q4_k_8row_decode_tile_asks_for_the_weights_ahead():
    """The repacked Q4_K tile of one activation row (a decode: 8 rows x 1, kernels/ggml_kquants._q4x8_1) asks for
    each super-block's 1248 bytes Q4X8_AHEAD on (20 prefetches a super-block): streamed rows without them ran
    0.78-1.04x the 1 x 1 tile on qs / head, with them 1.14-1.35x. The prefill tile (ACTS8 rows) reads rows
    already in cache and asks for none."""
    from numba import njit, types

    from llama_ref.kernels import ggml_kquants

    for tile, wanted in ((ggml_kquants._q4x8_1, -(-ggml_kquants.Q4X8_BYTES // 64)), (ggml_kquants._q4x8_A, 0)):
        @njit
        def run(w, x, xst, xd, bs, xds, bss, nb, out, ost):
            tile(w, x, xst, xd, bs, xds, bss, nb, out, ost, 2)
        run.compile((types.int64,) * 10)
        asm = run.inspect_asm(run.signatures[0])
        names = [line.split()[0] for line in asm.splitlines() if line.startswith("\t") and not line.startswith("\t.")]
        assert names.count("prefetcht0") == wanted, (names.count("prefetcht0"), wanted)


@pytest.mark.skipif(not ggml_simd.HAS_VNNI512, reason="the CPU has no AVX-512 VNNI")
def test_q4_k_16row_decode_tile_asks_for_both_groups_ahead():
    """The repacked Q4_K tile of two groups (16 rows, kernels/ggml_kquants._q4x16_1: a decode with simd 3) asks for
    each group's super-block Q4X8_AHEAD on, as the 8-row tile does (40 prefetches a super-block, in its outer loop):
    streamed from memory it read 12.9-13.7 GB/s with them and 10.5-11.2 without (one thread, session 65). The
    prefill's 16-row tile (ACTS8 rows) asks for none."""
    from numba import njit, types

    from llama_ref.kernels import ggml_kquants

    for tile, wanted in ((ggml_kquants._q4x16_1, 2 * -(-ggml_kquants.Q4X8_BYTES // 64)), (ggml_kquants._q4x16_A, 0)):
        @njit
        def run(w, x, xst, xd, bs, xds, bss, nb, out, ost):
            tile(w, x, xst, xd, bs, xds, bss, nb, out, ost)
        run.compile((types.int64,) * 10)
        asm = run.inspect_asm(run.signatures[0])
        names = [line.split()[0] for line in asm.splitlines() if line.startswith("\t") and not line.startswith("\t.")]
        assert names.count("prefetcht0") == wanted, (names.count("prefetcht0"), wanted)


@pytest.mark.parametrize("five", [True, False], ids=["q5_k", "q6_k"])
def test_q5_k_q6_k_decode_tiles_ask_for_the_weights_into_l2(five):
    """The Q5_K / Q6_K tiles of one activation row (a decode) ask for each super-block of the row ahead into L2
    (prefetcht1: a line a prefetch, 176 / 210 bytes -> 3 / 4 of them); into L1 (prefetcht0) the lines in flight
    were fewer and the 1B shape's Q5_K_M decode read 58% of the roofline where it reads 62-68% so
    (benchmarks/results/ggml_decode_1b_k_spr_2thread_s48_decode.md). The tiles of several activation rows (a
    prefill's) ask for none."""
    from numba import njit, types

    from llama_ref.kernels import ggml_kquants as kq

    lines = -(-(kq.Q5_BYTES if five else kq.Q6_BYTES) // 64)
    tiles = ((kq._q5_11, lines), (kq._q5_1A, 0)) if five else ((kq._q6_11, lines), (kq._q6_1A, 0))
    for tile, wanted in tiles:
        for simd in (1, 3):  # 3: Q6_K's 512-bit decode tile on an AVX-512 VNNI CPU (elsewhere the same as 1)
            @njit
            def run(w, ws, x, xst, xd, bs, xds, bss, nb, out, ost):
                tile(w, ws, x, xst, xd, bs, xds, bss, nb, out, ost, simd)
            run.compile((types.int64,) * 11)
            asm = run.inspect_asm(run.signatures[0])
            names = [line.split()[0] for line in asm.splitlines()
                     if line.startswith("\t") and not line.startswith("\t.")]
            assert (names.count("prefetcht1"), names.count("prefetcht0")) == (wanted, 0), (simd, names)


@pytest.mark.skipif(not ggml_simd.HAS_VNNI512, reason="the CPU has no AVX-512 VNNI")
def test_q6_k_decode_tile_takes_two_chunks_a_zmm_vector():
    """Q6_K's decode tile on 512-bit registers (kernels/ggml_kquants._define_q6_k_decode512, simd 3): one loop over the
    super-blocks, 4 zmm vpmaddubsw a super-block and 4 zmm multiplies by the scales (vpmaddwd, or vpdpwssd where
    LLVM folds the add into it) (two 32-value chunks each, where the AVX2 tile takes 8 of each on ymm), one float fma
    a super-block; nothing on the stack."""
    from numba import njit, types

    from llama_ref.kernels import ggml_kquants as kq

    @njit
    def run(w, ws, x, xst, xd, bs, xds, bss, nb, out, ost):
        kq._q6_11(w, ws, x, xst, xd, bs, xds, bss, nb, out, ost, 3)
    run.compile((types.int64,) * 11)
    loops = block_loops(run.inspect_asm(run.signatures[0]))
    assert len(loops) == 1, [len(body) for body in loops]
    zmm = [ins.split()[0] for ins in loops[0] if "%zmm" in ins]
    assert zmm.count("vpmaddubsw") == 4 and zmm.count("vpmaddwd") + zmm.count("vpdpwssd") == 4, loops[0]
    assert [ins.split()[0] for ins in loops[0]].count("vfmadd231ps") == 1, loops[0]
    assert not [ins for ins in loops[0] if "(%rsp)" in ins], loops[0]


@pytest.mark.parametrize("kind, prefetches", [("q4_1h", 2), ("q5_1c", 2)])
def test_q4_1_q5_1_decode_tiles_read_fp16_pairs(kind, prefetches):
    """The decode tiles of Q4_1 / Q5_1 (one row by one activation row) read a block's d and m as one fp16 pair
    (vcvtph2ps, the 4 bytes llama.cpp streams; float32 d and m took 8) and ask for two streams ahead, the quants and
    the pairs (the old tile asked for three: quants, d, m). Their loops take two blocks an iteration
    (ggml_simd._close_pair_loop): the two streams asked for once, the two blocks' pairs in one load and one
    conversion (ggml_simd._pair_scales); nothing on the stack. Q5_1's fifth bits are spread to bytes as
    q5_fifth_bits_instructions says."""
    loops = block_loops(tile_asm(kind, 1, 1))
    assert len(loops) == 1, [len(body) for body in loops]
    names = [ins.split()[0] for ins in loops[0]]
    assert fp16_loads(names) == 1 and names.count("prefetcht0") == prefetches, names
    # only the stack pointer's offsets count: LLVM may use %rbp as a general register
    assert not [ins for ins in loops[0] if "(%rsp)" in ins], loops[0]
    if kind == "q5_1c":
        q5_fifth_bits_instructions(names, 2)
        # 39 with GFNI and masks; 52 with one conversion for the two blocks and llama.cpp's AVX2 spread of the fifth
        # bits (Zen 3, session 51: two register copies of LLVM's loop rotation among them), 46 with them "shifted"
        # (session 54)
        assert len(loops[0]) <= (42 if ggml_simd.HAS_GFNI_MASKS else 48), len(loops[0])


@pytest.mark.parametrize("kind", ["q4_1h", "q5_1c", "q5_0c"])
def test_avx2_nibbles_take_a_broadcast_and_a_variable_shift(kind):
    """Without GFNI (ggml_simd.HAS_GFNI_MASKS false), the AVX2 decode tiles spread a block's 16 nibble bytes by a
    vbroadcasti128 from memory, one vpsrlvd (the upper half's words shifted by 4) and an and: no vpsrlw and no
    vinserti128, which Zen 3 runs on one pipe only (ggml_simd._weight_values). Two blocks an iteration."""
    if ggml_simd.HAS_GFNI_MASKS:
        pytest.skip("this CPU spreads nibbles with GFNI (vgf2p8affineqb)")
    loops = block_loops(tile_asm(kind, 4, 1))
    assert len(loops) == 1, [len(body) for body in loops]
    names = [ins.split()[0] for ins in loops[0]]
    assert names.count("vpsrlvd") == 8 and names.count("vbroadcasti128") == 8, names
    assert "vinserti128" not in names and "vpsrlw" not in names, names


def q5_fifth_bits_instructions(names: list[str], blocks: int) -> None:
    """A Q5 decode loop's spread of the nibbles and fifth bits of `blocks` blocks (ggml_simd.q5_values): with GFNI
    and AVX-512 BW (ggml_simd.HAS_GFNI_MASKS) a vgf2p8affineqb a block for both nibble halves, the fifth bits as a
    mask (kmovd) and one masked vpaddb; else, the bits held "shifted" (ggml_simd.Q5_BIT_ORDER), a vpsllvd a block to
    put each value's bit at the top of its byte and a vpblendvb to take it, where llama.cpp's AVX2 form spread them
    with a vpshufb, an and, a compare and an andnot."""
    if ggml_simd.HAS_GFNI_MASKS:
        for name in ("vgf2p8affineqb", "kmovd", "vpaddb", "vbroadcasti128"):
            assert names.count(name) == blocks, (name, names)
        assert "vpshufb" not in names and "vinserti128" not in names, names
    else:
        assert ggml_simd.Q5_BIT_ORDER == "shifted"
        for name in ("vpsllvd", "vpblendvb", "vpsrlvd", "vbroadcasti128"):
            assert names.count(name) == blocks, (name, names)
        assert "vpshufb" not in names and "vpcmpeqb" not in names, names


def test_q5_0_decode_tile_reads_the_files_blocks():
    """The Q5_0 decode tile (one row by one activation row, kind "q5_0c") reads a block as the file holds it, two
    blocks an iteration: the two fp16 d in one load (through a general register, then vmovd: a 2-byte load into a
    vector register is vpinsrw, which keeps the rest of its register, and LLVM once chose the accumulator for it,
    chaining every block to the last) and one conversion, the fifth bits spread as q5_fifth_bits_instructions says,
    two streams asked for ahead (the blocks, the scales), nothing on the stack. The AVX2 branch (simd=2) then
    takes ggml's sign trick (two vpsignb) before vpmaddubsw + vpmaddwd, as llama.cpp's AVX2
    ggml_vec_dot_q5_0_q8_0; the VNNI one (simd=1) the values q 0..31 unsigned into vpdpbusd, less a second
    vpdpbusd of 16 times x (-16 sum(x), the same integers), where x + 128 against the signed q - 16 took an xor, a
    vpdpbusd, a shift and a subtraction."""
    loops = block_loops(tile_asm("q5_0c", 1, 1))
    assert len(loops) == 1, [len(body) for body in loops]
    names = [ins.split()[0] for ins in loops[0]]
    assert fp16_loads(names) == 1 and names.count("prefetcht0") == 2, names
    q5_fifth_bits_instructions(names, 2)
    assert names.count("vpsignb") == 4, names
    assert names.count("vpmaddubsw") == 2 and names.count("vpmaddwd") == 2, names
    assert "vpinsrw" not in names and names.count("vmovd") + names.count("vmovw") == 1, names
    # nothing on the stack (%rbp serves as a general register here: only the stack pointer's offsets count)
    assert not [ins for ins in loops[0] if "(%rsp)" in ins], loops[0]
    if ggml_simd.HAS_VNNI:
        loops = block_loops(tile_asm("q5_0c", 1, 1, simd=1))
        assert len(loops) == 1, [len(body) for body in loops]
        names = [ins.split()[0] for ins in loops[0]]
        dp = [ins for ins in loops[0] if "vpdpbusd" in ins]  # "{vex} vpdpbusd" on AVX-512 CPUs
        assert len(dp) == 4 and "vpslld" not in names, loops[0]
        q5_fifth_bits_instructions(names, 2)
        assert len(loops[0]) <= (45 if ggml_simd.HAS_GFNI_MASKS else 57), len(loops[0])


@pytest.mark.parametrize("kind, conversions", [("q5_0c", 1), ("q5_1c", 2), ("q4_1h", 2)])
def test_4row_decode_tile_takes_its_scales_as_broadcasts_from_memory(kind, conversions):
    """A decode's 4-row tile of fp16 scales (Q5_0, Q5_1, Q4_1; ggml_simd._tile_scales) converts the 4 rows' scales of
    its two blocks 8 fp16 at a time (Q5_0's 8 d in one vcvtph2ps, the d, m pairs in two), multiplies and stores them
    on the stack once, and each of the 8 fma (4 rows, 2 blocks) takes its d_w d_x from there as a broadcast (AVX-512's
    {1to8} operand, or a vbroadcastss load): none broadcast from a register (a shuffle each, where the products
    stayed in registers), and no 512-bit register in the loop (LLVM's one zmm conversion of 16 fp16 shut half the
    vector ports and made the Q5_1 tile 1.2x slower). With mins (Q5_1, Q4_1) the four rows' m_w are shuffled out of
    the conversions into one 4-lane vector a block (two vpermps at most): two 4-lane fmas, no scalar fma."""
    loops = block_loops(tile_asm(kind, 4, 1, simd=1 if ggml_simd.HAS_VNNI else 2))
    assert len(loops) == 1, [len(body) for body in loops]
    body = loops[0]
    names = [ins.split()[0] for ins in body]
    assert fp16_loads(names) == conversions, body
    from_memory = [ins for ins in body if ins.startswith("vfmadd") and "{1to8}" in ins]
    loaded = [ins for ins in body if ins.startswith("vbroadcastss") and "(" in ins and "ymm" in ins]
    assert len(from_memory) + len(loaded) == 8, body
    from_registers = [ins for ins in body if ins.startswith("vbroadcastss") and "(" not in ins]
    assert not from_registers, from_registers
    shuffles = [ins for ins in body if ins.startswith("vpermps") and "(" not in ins]
    assert len(shuffles) <= (2 if kind != "q5_0c" else 0), shuffles
    assert not [ins for ins in body if "zmm" in ins], body
    if kind != "q5_0c":  # the mins: a 4-lane fma a block
        mins = [ins for ins in body if ins.startswith("vfmadd") and "xmm" in ins]
        assert len(mins) == 2 and not [name for name in names if name.startswith("vfmadd") and name.endswith("ss")], \
            body


def test_wide_tile_takes_two_activation_rows_a_zmm_vector():
    """simd=3 on a CPU with AVX-512 VNNI (ggml_simd.HAS_VNNI512): the 4 x 4 prefill tile of Q8_0 holds the pairs
    (row, activation a) and (row, a + 1) in one 512-bit vector: 8 zmm vpdpbusd, vcvtdq2ps, vmulps and vfmadd a block
    (and 4 for the rows' -128 sum(w)), where the 8-lane tile takes 16 ymm of each; nothing on the stack. Measured on
    a Sapphire Rapids Xeon (session 37, one thread, in process): 1.19-1.43x the 8-lane tile's rate on the default
    model's and the 1B shape's products by 128-512 rows."""
    from numba import njit, types

    if not ggml_simd.HAS_VNNI512:
        pytest.skip("the CPU has no AVX-512 VNNI")
    tile = ggml_simd.make_dot("q8_0", 4, 4)

    @njit
    def run(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost):
        tile(w, ws, wd, wm, wds, x, xst, xd, xs, xds, nb, out, ost, 3)  # a constant: one branch remains
    run.compile((types.int64,) * 13)
    loops = block_loops(run.inspect_asm(run.signatures[0]))
    assert len(loops) == 1, [len(body) for body in loops]
    zmm = [ins.split()[0] for ins in loops[0] if "%zmm" in ins]
    for name, count in (("vpdpbusd", 8), ("vcvtdq2ps", 8), ("vmulps", 8), ("vfmadd231ps", 8)):
        assert zmm.count(name) == count, (name, loops[0])
    assert not [ins for ins in loops[0] if "(%rsp)" in ins], loops[0]


@pytest.mark.parametrize("kind", ["q5_0x8", "q5_1x8", "q4_1x8"])
def test_x8_decode_tile_reads_8_rows_on_their_side(kind):
    """The 8-row decode tile of the "x8" form (ggml_simd._define_x8), AVX2 branch: one loop over the blocks; per
    block the 8 rows' scales in one load and conversion (Q5_1: the d's and m's apart, two), multiplied by d_x in one
    vmulps, and no broadcast of a scale (the scales are a vector, lane r row r); the 8 lanes' products (8 vpmaddubsw,
    8 vpmaddwd, 8 conversions, 8 fmas, Q5_1 one more for the mins) on values from four 32-byte loads of nibbles (no
    vbroadcasti128 and no variable shift: a vpsrlw each) and the fifth bits of one vector shifted by an immediate per
    lane (7 vpslld, or a vpaddd for the shift by one) and read by 8 vpblendvb; the activation's 4 values of each lane a
    vpbroadcastd from memory. Q5_0 keeps ggml's sign trick (16 vpsignb). Q4_1: no fifth bits (no shift or blend
    for them), otherwise as Q5_1."""
    loops = block_loops(tile_asm(kind, 8, 1))
    assert len(loops) == 1, [len(body) for body in loops]
    body = loops[0]
    names = [ins.split()[0] for ins in body]
    signed = kind == "q5_0x8"
    assert fp16_loads(names) == (1 if signed else 2) and names.count("vmulps") == 1, body
    assert names.count("vpmaddubsw") == 8 and maddwd(names) == 8 and names.count("vcvtdq2ps") == 8, body
    assert len([n for n in names if n.startswith("vfmadd")]) == (8 if signed else 9), body
    fifth = kind != "q4_1x8"
    assert names.count("vpblendvb") == (8 if fifth else 0) and names.count("vpsrlw") == 4, body
    assert names.count("vpslld") + names.count("vpaddd") == (7 if fifth else 0), body
    assert not {"vbroadcasti128", "vpsllvd", "vpsrlvd", "vpshufb", "vpermps"} & set(names), body
    x_loads = [ins for ins in body if ins.startswith("vpbroadcastd") and "(" in ins]
    scale_splats = [ins for ins in body if ins.startswith("vbroadcastss") or "{1to8}" in ins]  # AVX-512's operand
    assert len(x_loads) == 8 and len(scale_splats) == (1 if signed else 2), body  # d_x (and s_x) of the block
    assert names.count("vpsignb") == (16 if signed else 0), body
    assert not [ins for ins in body if "zmm" in ins], body


@pytest.mark.skipif(not ggml_simd.HAS_VNNI512, reason="the CPU has no AVX-512 VNNI")
def test_x16_decode_tile_reads_16_rows_a_zmm_vector():
    """The 16-row decode tile of Q4_1's "x16" form (ggml_simd._define_x16), 512-bit branch: one loop over the blocks,
    every vector op on zmm registers; per block the 8 lanes' products of 16 rows, 8 vpdpbusd (the activation's 4
    values of a lane broadcast), 8 conversions and 9 fmas (8 lanes, the mins), on four 64-byte loads of nibbles (a
    vpsrlw each for the high ones) and one load of the 16 rows' fp16 pairs; nothing on the stack."""
    loops = block_loops(tile_asm("q4_1x16", 16, 1, 3))
    assert len(loops) == 1, [len(body) for body in loops]
    body = loops[0]
    zmm = [ins.split()[0] for ins in body if "%zmm" in ins]
    for name, count in (("vpdpbusd", 8), ("vcvtdq2ps", 8), ("vfmadd231ps", 9), ("vpsrlw", 4)):
        assert zmm.count(name) == count, (name, body)
    halves = ("vpmovdw", "vcvtph2ps", "vcvtph2psx")  # the 16 rows' fp16 d's (and m's): a ymm between the two
    assert not [ins for ins in body if "%ymm" in ins and ins.split()[0] not in halves], body
    assert not [ins for ins in body if "(%rsp)" in ins], body


@pytest.mark.skipif(not ggml_simd.HAS_VNNI512, reason="the CPU has no AVX-512 VNNI")
@pytest.mark.parametrize("kind", ["q8_0x16", "q5_0x16"])
def test_x16_decode_tile_starts_each_lane_from_its_offset(kind):
    """The 16-row decode tiles of Q8_0's "x16" form (q + 128) and Q5_0's (q 0..31), 512-bit branch: one loop over the
    blocks; per block 8 zmm vpdpbusd of the 16 rows' values (the activation's 4 values of a lane broadcast from
    memory), each starting from -128 (-16) sum(x) of its lane: one ymm vpdpbusd of the block's 32 values, stored once
    to the stack and each lane's start a vpbroadcastd from there (no vpermd a lane, no second vpdpbusd and vpsubd a
    lane); then 8 conversions and 8 fmas. Q5_0's fifth bits with no shift, vpmovb2m or and a lane
    (ggml_simd._define_x16: those and the vpermd took the one port that multiplies); nothing else on the stack."""
    loops = block_loops(tile_asm(kind, 16, 1, 3))
    assert len(loops) == 1, [len(body) for body in loops]
    body = loops[0]
    zmm = [ins.split()[0] for ins in body if "%zmm" in ins]
    for name, count in (("vpdpbusd", 8), ("vcvtdq2ps", 8), ("vfmadd231ps", 8)):
        assert zmm.count(name) == count, (name, body)
    assert zmm.count("vmovdqu64") == (8 if kind == "q8_0x16" else 5), body  # the values (Q5_0: nibbles, fifth bits)
    assert [ins.split()[0] for ins in body if "%ymm" in ins].count("vpdpbusd") == 1, body
    assert not [ins for ins in body if ins.split()[0] == "vpsubd" and "%zmm" in ins], body
    starts = [ins for ins in body if ins.startswith("vpbroadcastd") and "(" in ins]
    assert len(starts) == 8, body
    assert not {"vpermd", "vpmovb2m", "vpslld", "vpsllvd", "vpandq", "vpandd"} & set(zmm), body
    if kind == "q5_0x16" and ggml_simd.HAS_GFNI_MASKS:  # a lane's bit: one affine, then one ternlog with the nibble
        assert zmm.count("vgf2p8affineqb") == 8 and zmm.count("vpternlogd") == 8, body
    on_stack = [ins for ins in body if "(%rsp)" in ins]
    assert len(on_stack) == 1 and on_stack[0].startswith(("vmovdqa", "vmovdqu")) and "%ymm" in on_stack[0], body


@pytest.mark.skipif(not ggml_simd.HAS_VNNI512, reason="the CPU has no AVX-512 VNNI")
def test_q4_0_x16_tiles_need_no_transpose():
    """Q4_0's 16-row tiles on its "x16" form (ggml_simd._define_q4_0x16), 512-bit branch: one loop over the blocks;
    per block and activation row 8 zmm vpdpbusd (two chains, the activation's 4 values of a lane broadcast from
    memory), one conversion and one fma for all 16 rows; the nibbles apart once a block (4 vpsrlw) for every
    activation row; no shuffles (the form is already the lanes' order); nothing on the stack."""
    for acts in (1, 4):
        loops = block_loops(tile_asm("q4_0x16", 16, acts, 3))
        assert len(loops) == 1, [len(body) for body in loops]
        body = loops[0]
        zmm = [ins.split()[0] for ins in body if "%zmm" in ins]
        for name, count in (("vpdpbusd", 8 * acts), ("vcvtdq2ps", acts), ("vfmadd231ps", acts), ("vpsrlw", 4)):
            assert zmm.count(name) == count, (acts, name, body)
        assert not [ins for ins in body if ins.split()[0].startswith(("vperm", "vpshuf", "vshuf"))], body
        assert not [ins for ins in body if "(%rsp)" in ins], body
