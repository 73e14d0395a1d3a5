"""Q5_0 / Q5_1 held in their file's 5 bits (weights/packed.py _Q5Weight) and arithmetic="ggml"'s products on them
(kernels/ggml.py: a decode's tiles spread the bits in registers, a prefill unpacks each tile's rows once to one byte
per value, ggml_simd.unpack_row), bit for bit against the NumPy specification (llama_ref/model/ggml.py) on every
integer path (use_simd 0 is the portable code; the portable default is also checked with LLAMA_REF_GGML_PORTABLE=1).
A weight that only ggml mode reads keeps no second copy; exact mode's one byte per value is made on demand.
"""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import numpy as np
import pytest

from llama_ref.model import ggml
from llama_ref.weights import packed
from llama_ref.weights.packed import Q5_BIT_ORDERS, Q5_0Weight, Q5_1Weight, q5_bits_in_order, q5_scales_in_order
from test_ggml_kernels import extreme_activations, raw_blocks, same_bits, unpacked_rows

TYPES = {"q5_0": Q5_0Weight, "q5_1": Q5_1Weight}


def kernels():
    from llama_ref.kernels import ggml as kernels_ggml
    return kernels_ggml


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_weight_holds_the_files_form_until_exact_mode_asks(kind):
    """As loaded, the weight holds the file's bytes split in two (its nbytes is the file's size) and the ggml
    kernels read exactly those arrays, the fifth bits put in the order this host's tiles read (ggml_simd.Q5_BIT_ORDER;
    still one copy); exact mode's qs, d (m) unpack on first use, equal to gguf's values, and the file's form is let
    go; raw_blocks() gives the file's bytes from either form, and file_form() makes it again."""
    cls = TYPES[kind]
    w = raw_blocks(kind, 13, 5, seed=3)
    raw = w.raw_blocks().reshape(13, 5, cls.type_size)
    h = 2 * len(cls.fields)
    assert w._exact is None and w.nbytes == 13 * 5 * cls.type_size
    blocks, scales = w.file_form()
    assert np.array_equal(blocks.reshape(13, 5, 20), raw[:, :, h:])
    assert np.array_equal(scales.reshape(13, 5, 1).view(np.uint8), raw[:, :, :h])
    k, qs, d, m = kernels()._weight_args(w)
    order = kernels().simd.Q5_BIT_ORDER
    held, held_scales = w.file_form(order)
    assert k == kernels().KIND[kind] and qs is held and d is held_scales is scales and m is d
    assert np.array_equal(qs, q5_bits_in_order(blocks, order)) and w.nbytes == 13 * 5 * cls.type_size
    assert np.array_equal(w.raw_blocks().reshape(13, 5, cls.type_size), raw)  # the file's bytes, either order
    x = np.random.default_rng(4).standard_normal((5, 160)).astype(np.float32)
    kernels().quantized_linear(x, w)  # a prefill
    kernels().quantized_linear(x[:1], w)  # a decode
    assert w._exact is None, "ggml mode made the one-byte copy"
    rows = w.rows(np.array([[3, 0], [12, 3]]))  # an embedding's lookups, from the file's form
    dense = gguf.quants.dequantize(raw.reshape(13, -1), gguf.GGMLQuantizationType[cls.ggml_type]).reshape(13, 160)
    assert same_bits(rows, dense[[[3, 0], [12, 3]]]) and w._exact is None
    # exact mode: one byte per value, float32 scales, made now; the file's form let go
    qs8, d8, m8, has_min = w.kernel_args()
    assert w._blocks is None and has_min == (kind == "q5_1")
    q = raw_values(raw[:, :, h:])  # (13, 5, 32) 0..31
    assert np.array_equal(qs8.reshape(13, 5, 32), (q - (16 if kind == "q5_0" else 0)).astype(np.uint8))
    assert same_bits(d8, raw[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32))
    if kind == "q5_1":
        assert same_bits(m8, raw[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32))
    assert w.nbytes == qs8.nbytes + d8.nbytes + (m8.nbytes if kind == "q5_1" else 0)
    assert np.array_equal(w.raw_blocks().reshape(13, 5, -1), raw) and same_bits(w.to_float(), dense)
    b2, s2 = w.file_form()  # made again from exact's form: the same bytes
    assert np.array_equal(b2, blocks) and np.array_equal(s2, scales)


def raw_values(b):
    """(..., 20) bytes qh | nibbles -> (..., 32) int values 0..31, bit by bit."""
    qh = b[..., :4].astype(np.uint32)
    bits = qh[..., 0] | qh[..., 1] << 8 | qh[..., 2] << 16 | qh[..., 3] << 24
    nib = np.concatenate([b[..., 4:] & 15, b[..., 4:] >> 4], axis=-1).astype(np.int64)
    high = (bits[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    return nib | (high.astype(np.int64) << 4)


def test_shifted_fifth_bits_put_each_values_bit_at_its_bytes_top():
    """Q5_BIT_ORDERS "shifted" as the AVX2 tiles read it (ggml_simd._shifted_fifth_bits), in NumPy: the word copied into
    8 lanes of 32 bits, lane j shifted left by j, has at the top of byte v (lane v // 4, byte v % 4) bit v of the file's
    word, for every v; going back gives the file's bytes, the nibbles untouched; another order is refused by name."""
    rng = np.random.default_rng(5)
    blocks = rng.integers(0, 256, (3, 7, 20), dtype=np.uint8)  # (rows, blocks, fifth bits | nibbles)
    blocks[0, 0, :4], blocks[0, 1, :4] = 0, 255
    shifted = q5_bits_in_order(blocks, "shifted")
    assert np.array_equal(shifted[..., 4:], blocks[..., 4:]) and not np.array_equal(shifted, blocks)
    word = shifted[..., :4].copy().view("<u4")[..., 0].astype(np.uint64)  # (3, 7)
    lanes = (word[..., None] << np.arange(8, dtype=np.uint64)) & np.uint64(0xFFFFFFFF)  # (3, 7, 8) vpsllvd
    top = (lanes[..., None] >> (8 * np.arange(4, dtype=np.uint64) + 7)) & np.uint64(1)  # (3, 7, 8, 4) bit 7 of byte
    bits = np.unpackbits(blocks[..., :4], axis=-1, bitorder="little")  # (3, 7, 32): bit v of the file's word
    assert np.array_equal(top.reshape(3, 7, 32), bits)
    assert np.array_equal(q5_bits_in_order(shifted, "file", "shifted"), blocks)
    assert np.array_equal(q5_bits_in_order(blocks, "file"), blocks)
    assert Q5_BIT_ORDERS == ("file", "shifted", "x8", "x16")
    with pytest.raises(ValueError, match="'spread'"):
        q5_bits_in_order(blocks, "spread")


def test_x8_form_by_hand(monkeypatch):
    """Q5_BIT_ORDERS "x8" as the 8-row decode tiles read it (ggml_simd._define_x8), byte by byte from its
    definition: block b of rows 8g .. 8g + 7 is the 160 bytes at (g nb + b) 160, byte 32j + 4r + k row r's nibble
    byte 4j + k, then row r's "shifted" word at 128 + 4r; the 8 rows' scales of a block side by side; back to the
    file's bytes and to "shifted"; the same in pieces of one group; rows not in groups of 8 refused by name."""
    rng = np.random.default_rng(7)
    rows, nb = 16, 3
    blocks = rng.integers(0, 256, (rows, nb * 20), dtype=np.uint8)
    x8 = q5_bits_in_order(blocks, "x8")
    shifted = q5_bits_in_order(blocks, "shifted").reshape(rows, nb, 20)
    held = x8.reshape(rows // 8, nb, 160)
    for g, b, r in np.ndindex(rows // 8, nb, 8):
        for j, k in np.ndindex(4, 4):
            assert held[g, b, 32 * j + 4 * r + k] == shifted[8 * g + r, b, 4 + 4 * j + k]
        assert np.array_equal(held[g, b, 128 + 4 * r:132 + 4 * r], shifted[8 * g + r, b, :4])
    assert np.array_equal(q5_bits_in_order(x8, "file", "x8"), blocks)
    assert np.array_equal(q5_bits_in_order(x8, "shifted", "x8"), shifted.reshape(rows, -1))
    scales = rng.integers(0, 1 << 16, (rows, nb), dtype=np.uint16)
    side = q5_scales_in_order(scales, "x8", "file").reshape(rows // 8, nb, 8)
    for g, b, r in np.ndindex(rows // 8, nb, 8):
        assert side[g, b, r] == scales[8 * g + r, b]
    assert np.array_equal(q5_scales_in_order(side.reshape(rows, nb), "file", "x8"), scales)
    assert q5_scales_in_order(scales, "shifted", "file") is scales  # rows stay where they are
    monkeypatch.setattr(packed, "BLOCKS_PER_PIECE", 1)
    assert np.array_equal(q5_bits_in_order(blocks, "x8"), x8)
    assert np.array_equal(q5_bits_in_order(x8, "file", "x8"), blocks)
    with pytest.raises(ValueError, match="groups of 8"):
        q5_bits_in_order(blocks[:12], "x8")


def test_x16_form_by_hand():
    """Q5_BIT_ORDERS "x16" as the 16-row decode tiles read it (ggml_simd._define_x16), byte by byte from its
    definition: block b of rows 16g .. 16g + 15 is the 320 bytes at (g nb + b) 320, byte 64j + 4r + k row r's nibble
    byte 4j + k, then row r's "shifted" word at 256 + 4r; the 16 rows' scales of a block side by side; back to the
    file's bytes, and from "x8"; rows not in groups of 16 refused by name."""
    rng = np.random.default_rng(8)
    rows, nb = 32, 3
    blocks = rng.integers(0, 256, (rows, nb * 20), dtype=np.uint8)
    x16 = q5_bits_in_order(blocks, "x16")
    shifted = q5_bits_in_order(blocks, "shifted").reshape(rows, nb, 20)
    held = x16.reshape(rows // 16, nb, 320)
    for g, b, r in np.ndindex(rows // 16, nb, 16):
        for j, k in np.ndindex(4, 4):
            assert held[g, b, 64 * j + 4 * r + k] == shifted[16 * g + r, b, 4 + 4 * j + k]
        assert np.array_equal(held[g, b, 256 + 4 * r:260 + 4 * r], shifted[16 * g + r, b, :4])
    assert np.array_equal(q5_bits_in_order(x16, "file", "x16"), blocks)
    assert np.array_equal(q5_bits_in_order(q5_bits_in_order(blocks, "x8"), "x16", "x8"), x16)
    scales = rng.integers(0, 1 << 16, (rows, nb), dtype=np.uint16)
    side = q5_scales_in_order(scales, "x16", "file").reshape(rows // 16, nb, 16)
    for g, b, r in np.ndindex(rows // 16, nb, 16):
        assert side[g, b, r] == scales[16 * g + r, b]
    assert np.array_equal(q5_scales_in_order(side.reshape(rows, nb), "file", "x16"), scales)
    assert np.array_equal(q5_scales_in_order(q5_scales_in_order(scales, "x8", "file"), "x16", "x8"),
                          side.reshape(rows, nb))
    with pytest.raises(ValueError, match="groups of 16"):
        q5_bits_in_order(blocks[:24], "x16")


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_weight_held_x8_keeps_the_files_values(kind):
    """A weight whose blocks are held in the "x8" form (what the kernels ask for where the tiles read "shifted" bits
    and the rows come in groups of 8; any host can ask): one copy, the file's bytes (raw_blocks, whole and by rows),
    rows, the file's form back on asking, and exact mode's values made from it. The kernels read exactly the arrays
    held, and on an AVX2 host without GFNI a 16-row weight is held so (its 8-row tiles' KIND)."""
    cls = TYPES[kind]
    w = raw_blocks(kind, 24, 5, seed=10)
    raw = w.raw_blocks().reshape(24, 5, cls.type_size)
    dense = gguf.quants.dequantize(raw.reshape(24, -1), gguf.GGMLQuantizationType[cls.ggml_type]).reshape(24, 160)
    blocks, scales = (a.copy() for a in w.file_form())
    held, side = w.file_form("x8")
    assert np.array_equal(held, q5_bits_in_order(blocks, "x8"))
    assert np.array_equal(side, q5_scales_in_order(scales, "x8", "file")) and w.nbytes == 24 * 5 * cls.type_size
    assert np.array_equal(w.raw_blocks().reshape(24, 5, -1), raw)
    assert np.array_equal(w.raw_blocks(np.array([17, 2, 3])).reshape(3, 5, -1), raw[[17, 2, 3]])
    assert same_bits(w.rows(np.array([[23, 0], [9, 9]])), dense[[[23, 0], [9, 9]]])
    back, back_scales = w.file_form()
    assert np.array_equal(back, blocks) and np.array_equal(back_scales, scales)
    w.file_form("x8")
    assert same_bits(w.to_float(), dense)  # exact mode's form, unpacked from the x8 blocks
    assert np.array_equal(w.qs.reshape(24, 5, 32), (raw_values(raw[:, :, 2 * len(cls.fields):])
                                                    - (16 if kind == "q5_0" else 0)).astype(np.uint8))
    w = raw_blocks(kind, 16, 2, seed=11)
    k, qs, d, _ = kernels()._weight_args(w)
    order = "x16" if kernels().X16_HOST else "x8" if kernels().simd.Q5_BIT_ORDER == "shifted" else \
        kernels().simd.Q5_BIT_ORDER  # (AVX-512 VNNI hosts with full-width vectors: the 16-row tiles' "x16")
    held, side = w.file_form(order)
    assert qs is held and d is side and k == kernels().KIND[kind + order if order in ("x8", "x16") else kind]


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_weight_held_shifted_keeps_the_files_values(kind):
    """A weight whose blocks the kernels asked for in "shifted" order (any host: file_form("shifted")) holds one copy,
    gives the file's bytes (raw_blocks), rows and exact mode's values as before, and the file's order back on asking."""
    cls = TYPES[kind]
    w = raw_blocks(kind, 9, 4, seed=6)
    raw = w.raw_blocks().reshape(9, 4, cls.type_size)
    dense = gguf.quants.dequantize(raw.reshape(9, -1), gguf.GGMLQuantizationType[cls.ggml_type]).reshape(9, 128)
    blocks, _ = w.file_form()
    blocks = blocks.copy()
    shifted, _ = w.file_form("shifted")
    assert np.array_equal(shifted, q5_bits_in_order(blocks, "shifted")) and w.nbytes == 9 * 4 * cls.type_size
    assert np.array_equal(w.raw_blocks().reshape(9, 4, -1), raw)
    assert np.array_equal(w.raw_blocks(np.array([7, 2])).reshape(2, 4, -1), raw[[7, 2]])
    assert same_bits(w.rows(np.array([[8, 1]])), dense[[[8, 1]]])
    assert np.array_equal(w.file_form()[0], blocks)
    w.file_form("shifted")
    assert same_bits(w.to_float(), dense)  # exact mode's form, unpacked from the shifted blocks
    assert np.array_equal(w.qs.reshape(9, 4, 32), (raw_values(raw[:, :, 2 * len(cls.fields):])
                                                   - (16 if kind == "q5_0" else 0)).astype(np.uint8))


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_compiled_embedding_reads_the_held_blocks(kind):
    """kernels/ggml.embedding of a Q5 table (_unpacked_rows): the specification's rows bit for bit, any id shape,
    from the blocks ggml mode holds (the exact form never made), extreme blocks too; another dtype keeps the
    specification's."""
    for pattern, rows in (("random", 11), ("min", 11), ("max", 11), ("random", 16), ("max", 24)):  # 16, 24: "x8"
        w = raw_blocks(kind, rows, 6, seed=9, pattern=pattern)
        spec_w = TYPES[kind](w.raw_blocks(), w.shape)
        for ids in (np.array([4]), np.array([[3, 0, 10], [7, 7, 1]]), np.array([rows - 1, 8 % rows])):
            got = kernels().embedding(ids, w, np.float32)
            assert got.shape == ids.shape + (192,) and same_bits(got, ggml.embedding(ids, spec_w, np.float32))
        assert w._exact is None
    wide = kernels().embedding(np.array([2]), w, np.float64)
    assert wide.dtype == np.float64 and same_bits(wide, ggml.embedding(np.array([2]), spec_w, np.float64))


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_unpack_row_is_one_byte_per_value(kind):
    """ggml_simd.unpack_row: a row of file blocks (fifth bits in the host's Q5_BIT_ORDER) -> the values a
    prefill's byte tiles read (Q5_0 int8 q - 16, Q5_1 q) and the fp16 scales as float32, exactly."""
    from numba import njit

    from llama_ref.kernels import ggml_simd

    @njit
    def unpack(blocks, scales, signed, qs, d, m):
        for r in range(blocks.shape[0]):
            ggml_simd.unpack_row(blocks[r].ctypes.data, scales[r].ctypes.data, scales.shape[1], signed,
                                 qs[r].ctypes.data, d[r].ctypes.data, m[r].ctypes.data)

    for pattern in ("random", "min", "max"):
        w = raw_blocks(kind, 7, 9, seed=8, pattern=pattern)
        blocks, scales = w.file_form(ggml_simd.Q5_BIT_ORDER)
        qs = np.zeros((7, 9 * 32), np.uint8)
        d, m = np.zeros((7, 9), np.float32), np.zeros((7, 9), np.float32)
        unpack(blocks, scales, ggml_simd.UNPACK_Q5_0 if kind == "q5_0" else ggml_simd.UNPACK_Q5_1, qs, d, m)
        assert np.array_equal(qs, w.qs) and same_bits(d, w.d)
        assert same_bits(m, w.m) if kind == "q5_1" else not m.any()


@pytest.mark.parametrize("kind", sorted(TYPES))
def test_unpack_row_reads_the_x8_form(kind):
    """ggml_simd.unpack_row of a row in the "x8" form (UNPACK_Q5_0X8 / UNPACK_Q5_1X8, at kernels/ggml._row_start's
    addresses: the row's words in its group's blocks) -> the same bytes and scales as the row itself, on any host."""
    from llama_ref.kernels import ggml_simd

    signed = kind == "q5_0"
    for pattern in ("random", "min", "max"):
        w = raw_blocks(kind, 16, 9, seed=12, pattern=pattern)
        blocks, scales = w.file_form("x8")
        qs, d, m = unpacked_rows(kind + "x8", blocks, scales,
                                 ggml_simd.UNPACK_Q5_0X8 if signed else ggml_simd.UNPACK_Q5_1X8)
        if ggml_simd.Q5_BIT_ORDER != "shifted":  # the x8 form's bits are "shifted": only such a host reads them
            continue
        assert np.array_equal(qs, w.qs) and same_bits(d, w.d)
        assert same_bits(m, w.m) if not signed else not m.any()


@pytest.mark.parametrize("kind", sorted(TYPES))
@pytest.mark.parametrize("use_simd", [0, 1, 2, 3])  # 3: the 512-bit prefill tiles
def test_products_on_the_files_form_equal_specification(kind, use_simd, monkeypatch):
    """Decode (one row, on the calling thread and in parallel) and prefill (activation rows in ACTS and not, row
    tiles of ROWS and not) from the file's form, blocks at the ends of the range by activations of magnitude 127, bit
    for bit the specification's. The specification runs first on a second weight of the same bytes, so the kernels'
    weight keeps only the file's form throughout. Where this host's tiles read "shifted" bits, the weights of 16 and
    40 rows are held in the "x8" form and run the 8-row decode tiles."""
    import numba

    from llama_ref.kernels import ggml_ops

    before = numba.get_num_threads()
    try:
        for pattern, rows, nb in (("random", 37, 5), ("max", 16, 3), ("min", 13, 2), ("random", 40, 48)):
            w = raw_blocks(kind, rows, nb, seed=rows, pattern=pattern)
            spec_w = TYPES[kind](w.raw_blocks(), w.shape)
            x8 = kernels()._weight_args(w)[0] in kernels().X8
            assert x8 == (rows % 8 == 0 and kernels().simd.Q5_BIT_ORDER == "shifted"), (rows, x8)
            for n in (1, 2, 5, 9):
                x = extreme_activations(n, 32 * nb, n) if pattern != "random" else \
                    np.random.default_rng(n).standard_normal((n, 32 * nb)).astype(np.float32)
                want = ggml.linear(x, spec_w)
                for threads in sorted({1, before}):
                    numba.set_num_threads(threads)
                    for limit in (1 << 62, 0):  # one row on the calling thread, and in a parallel region
                        monkeypatch.setattr(ggml_ops, "SERIAL_WEIGHTS", limit)
                        assert same_bits(kernels().quantized_linear(x, w, use_simd), want), (pattern, n, threads)
            assert w._exact is None
    finally:
        numba.set_num_threads(before)


def test_portable_default_equals_specification():
    """With LLAMA_REF_GGML_PORTABLE=1 the default integer code is the portable one (SIMD 0); the Q5 products from
    the file's form, decode and prefill, still equal the specification bit for bit."""
    code = """
import numpy as np, sys
sys.path.insert(0, 'tests')
from test_ggml_kernels import raw_blocks, same_bits
from llama_ref.kernels import ggml as k
from llama_ref.model import ggml
from llama_ref.weights.packed import Q5_0Weight, Q5_1Weight
assert k.SIMD == 0
for kind, cls, rows in (("q5_0", Q5_0Weight, 21), ("q5_1", Q5_1Weight, 21), ("q5_0", Q5_0Weight, 24),
                        ("q5_1", Q5_1Weight, 24)):  # 24 rows: the "x8" form where the host reads "shifted" bits
    w = raw_blocks(kind, rows, 4, seed=2)
    s = cls(w.raw_blocks(), w.shape)
    for n in (1, 6):
        x = np.random.default_rng(n).standard_normal((n, 128)).astype(np.float32)
        assert same_bits(k.quantized_linear(x, w), ggml.linear(x, s)), (kind, n)
print("ok")
"""
    env = dict(os.environ, LLAMA_REF_GGML_PORTABLE="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=root)
    assert out.stdout.strip() == "ok", out.stderr[-3000:]
