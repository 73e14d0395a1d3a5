"""Weights kept in their stored format: 16-bit floats, int8 with per-row scales, and GGUF quantized blocks.

A packed weight is a matrix (rows, cols) that is never expanded for the whole model at once. The NumPy
reference (`ops.linear`, `ops.embedding`) asks it for floats one matrix or a few rows at a time through
`.to_float(dtype)` and `.rows(ids, dtype)`; the Numba kernels read the arrays its `kernel_args()` names
and convert in registers.

GGUF block layouts in the file (one block covers `block_size` consecutive values of a row; fp16 scales little-endian):
    Q8_0  34 bytes / 32 values:  d fp16 | 32 x int8 q          value = d * q
    Q4_0  18 bytes / 32 values:  d fp16 | 16 bytes of nibbles   value = d * (q - 8)
    Q4_1  20 bytes / 32 values:  d fp16 | m fp16 | 16 bytes     value = d * q + m
          byte j holds value j in its low nibble and value j + 16 in its high nibble.
    Q4_K, Q5_K, Q6_K: 256-value super-blocks with 6- or 8-bit sub-block scales (see each class); at load
          Q4_K is regrouped into the Q4_1 layout the kernels read; Q5_K and Q6_K stay as the file has them.
Every dequantization below matches `gguf.quants.dequantize` bit for bit (tests/test_kernels.py checks).
"""

from __future__ import annotations

import numpy as np

from .common import WeightsError

# fp16 bit pattern -> float32, every one of the 65536 values: exact, and a table small enough for L2.
FP16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
FP16_TO_F32.flags.writeable = False


def _readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view: weights are never written, and one array type keeps Numba's compiled variants few."""
    a = np.asarray(a).view()
    a.flags.writeable = False
    return a


def _fp16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 stored as two uint8 columns (..., 2) -> float32 (...)."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


class PackedWeight:
    """A (rows, cols) matrix stored in a compact format. Subclasses define `_dequantize(data)`."""

    format: str = ""           # "f16", "bf16", "int8", "q8_0", ... : what the kernels dispatch on
    bits_per_weight: float = 0

    def __init__(self, data: np.ndarray, shape: tuple[int, int]):
        self.data = _readonly(data)
        self.shape = (int(shape[0]), int(shape[1]))

    def kernel_args(self) -> tuple:
        """The arrays the Numba kernels for this format take (kernels/linear.py), in their argument order."""
        return (self.data,)  # 16-bit formats: the stored bits themselves

    # ---- what NumPy code sees ---------------------------------------------------------------------
    ndim = 2

    @property
    def dtype(self) -> str:
        """The storage format (not a NumPy dtype: these values only become floats on request)."""
        return self.format

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes) + sum(int(a.nbytes) for a in self._extra_arrays())

    def _extra_arrays(self) -> list:
        return []

    def to_float(self, dtype=np.float32) -> np.ndarray:
        """The whole matrix as floats. (rows, cols)."""
        return self._dequantize(self.data).astype(dtype, copy=False).reshape(self.shape)

    def rows(self, ids, dtype=np.float32) -> np.ndarray:
        """Rows `ids` (any integer shape) as floats: ids (...,) -> (..., cols). Only those rows are decoded."""
        ids = np.asarray(ids)
        flat = ids.reshape(-1)  # (N,)
        out = self._dequantize_rows(flat).astype(dtype, copy=False)  # (N, cols)
        return out.reshape(*ids.shape, self.shape[1])

    def _dequantize_rows(self, flat_ids: np.ndarray) -> np.ndarray:
        return self._dequantize(self.data[flat_ids]).reshape(len(flat_ids), self.shape[1])

    def _dequantize(self, data: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, {self.nbytes / 2**20:.1f} MiB)"


# ---- 16-bit floats --------------------------------------------------------------------------------------

class F16Weight(PackedWeight):
    """IEEE half precision, stored as its uint16 bit patterns. data (rows, cols) uint16."""
    format, bits_per_weight = "f16", 16

    def _dequantize(self, data):
        return data.view(np.float16).astype(np.float32)


class BF16Weight(PackedWeight):
    """bfloat16: the top 16 bits of a float32. data (rows, cols) uint16."""
    format, bits_per_weight = "bf16", 16

    def _dequantize(self, data):
        return (data.astype(np.uint32) << 16).view(np.float32)


# ---- int8 with one scale per row ------------------------------------------------------------------------

class Int8Weight(PackedWeight):
    """Symmetric int8 per output row: value = scale[row] * q. data (rows, cols) int8, scale (rows,) float32."""
    format, bits_per_weight = "int8", 8

    def kernel_args(self):
        return self.data, self.scale  # int8 (rows, cols), float32 scale per row

    def __init__(self, data, scale, shape):
        super().__init__(data, shape)
        self.scale = _readonly(np.asarray(scale, dtype=np.float32))

    def _extra_arrays(self):
        return [self.scale]

    def to_float(self, dtype=np.float32):
        return (self.data.astype(np.float32) * self.scale[:, None]).astype(dtype, copy=False)

    def _dequantize_rows(self, flat_ids):
        return self.data[flat_ids].astype(np.float32) * self.scale[flat_ids][:, None]

    @classmethod
    def quantize(cls, w: np.ndarray) -> "Int8Weight":
        """Round each row to int8 with scale max|row| / 127 (a zero row keeps scale 0)."""
        w = np.asarray(w, dtype=np.float32)
        scale = np.abs(w).max(axis=1) / np.float32(127)  # (rows,)
        inv = np.divide(1, scale, out=np.zeros_like(scale), where=scale != 0)
        q = np.clip(np.rint(w * inv[:, None]), -127, 127).astype(np.int8)  # (rows, cols)
        return cls(q, scale, w.shape)


# ---- GGUF blocks ----------------------------------------------------------------------------------------

class GGUFBlockWeight(PackedWeight):
    """Rows of GGUF blocks, split at load into arrays that the kernels stream (K-quants: see their classes).

    Q8_0, Q4_0 and Q4_1 are split once at load into their parts ("struct of arrays") so that a kernel
    streams a row's quants contiguously: `qs` (rows, quant bytes of the row), the file's bytes in the file's
    order, and one float32 array (rows, blocks) per fp16 field of the block header (`d`, and `m` for Q4_1),
    widened once here (exactly: every fp16 is a float32) because decoding fp16 scales in the kernels cost
    more time than the wider scales cost in bandwidth (Q4_1: 24 bytes per 32 values in memory, 20 on file).
    `raw_blocks()` puts the file's bytes back together, bit for bit.
    """
    block_size: int = 32
    type_size: int = 0
    ggml_type: str = ""
    fields: tuple = ()  # fp16 fields that head each block, in file order (K-quants split their blocks themselves)

    def __init__(self, data, shape):
        rows, cols = int(shape[0]), int(shape[1])
        if cols % self.block_size:
            raise WeightsError(f"{self.format}: row length {cols} is not a multiple of the block size "
                               f"{self.block_size}")
        nb = cols // self.block_size
        raw = np.asarray(data).view(np.uint8).reshape(rows, nb, self.type_size)  # (rows, blocks, bytes)
        self.shape = (rows, cols)
        h = 2 * len(self.fields)
        for i, name in enumerate(self.fields):
            setattr(self, name, _readonly(_fp16(raw[:, :, 2 * i:2 * i + 2])))  # (rows, blocks) float32
        self.qs = _readonly(np.ascontiguousarray(raw[:, :, h:]).reshape(rows, nb * (self.type_size - h)))
        self.data = self.qs

    def _extra_arrays(self):
        return [getattr(self, name) for name in self.fields]

    def _quants(self, sel) -> np.ndarray:
        """The quant bytes of rows sel, row by row, as the file has them (raw_blocks)."""
        return self.qs[sel]

    def raw_blocks(self, ids=None) -> np.ndarray:
        """The blocks of rows `ids` (all rows if None) exactly as the GGUF file stores them. (n, row bytes)."""
        sel = slice(None) if ids is None else ids
        parts = [getattr(self, name)[sel].astype(np.float16)[:, :, None].view(np.uint8)  # (n, nb, 2) exact
                 for name in self.fields]
        qs = self._quants(sel)
        parts.append(qs.reshape(qs.shape[0], -1, self.type_size - 2 * len(self.fields)))  # (n, nb, quant bytes)
        return np.concatenate(parts, axis=2).reshape(qs.shape[0], -1)

    def to_float(self, dtype=np.float32):
        return self._dequantize(self.raw_blocks()).astype(dtype, copy=False).reshape(self.shape)

    def _dequantize_rows(self, flat_ids):
        return self._dequantize(self.raw_blocks(flat_ids)).reshape(len(flat_ids), self.shape[1])

    def _dequantize(self, data):
        blocks = data.reshape(-1, self.type_size)  # (n_blocks, type_size)
        return self._dequantize_blocks(blocks)  # (n_blocks, block_size)

    def _dequantize_blocks(self, blocks):
        raise NotImplementedError

    @classmethod
    def quantize(cls, w: np.ndarray) -> "GGUFBlockWeight":
        """Quantize a float matrix with ggml's own rounding (gguf.quants is bit-exact with ggml-quants.c)."""
        import gguf

        w = np.ascontiguousarray(w, dtype=np.float32)
        qtype = getattr(gguf.GGMLQuantizationType, cls.ggml_type)
        return cls(gguf.quants.quantize(w, qtype), w.shape)


class _HeldInGroups(GGUFBlockWeight):
    """A block weight whose quant bytes arithmetic="ggml" may hold in a form for its decode tiles that sees 8 or 16
    rows at once (x8_form(group)): block b of rows G g .. G g + G - 1 (G = group) is the G Q bytes at (g nb + b) G Q (Q:
    the quant bytes of a row's block), byte 4 G j + 4 r + k row r's quant byte 4 j + k, XOR _flip. One copy: asking
    for qs (or x8_form()) moves the bytes held into that form; raw_blocks() reads either without moving them
    (_quants)."""
    _x8 = None  # the quant bytes in the "x8" (or "x16") form while they are held so (then _row_qs is None) ...
    _group = 8  # ... in groups of this many rows
    _flip = 0  # ... each byte XOR this

    def _grouped(self, a: np.ndarray, into: bool, group: int) -> np.ndarray:
        out = _x8_rows(a, 0, into, group, self.type_size - 2 * len(self.fields))
        if self._flip:
            np.bitwise_xor(out, np.uint8(self._flip), out=out)
        return out

    def _row_bytes(self):
        if self._x8 is not None:  # back to rows: the x8 form let go (what a kernel holds of it stays its)
            self._row_qs, self._x8 = _readonly(self._grouped(self._x8, False, self._group)), None
        return self._row_qs

    def _hold_rows(self, value):
        self._row_qs, self._x8 = value, None

    qs = property(_row_bytes, _hold_rows, doc="(rows, quant bytes of a row) uint8: each row's, the file's bytes")
    data = property(lambda self: self._row_qs if self._x8 is None else self._x8, _hold_rows)

    def x8_form(self, group: int = 8) -> np.ndarray:
        """The quant bytes (rows, quant bytes of a row) in the "x8" form, or with group=16 the "x16" form (see the
        class), held so from now on."""
        if self._x8 is not None and self._group != group:
            self._row_bytes()
        if self._x8 is None:
            self._x8, self._row_qs = _readonly(self._grouped(self._row_qs, True, group)), None
            self._group = group
        return self._x8

    def _quants(self, sel) -> np.ndarray:
        if self._x8 is None:
            return self._row_qs[sel]
        rows = np.arange(self.shape[0])[sel].reshape(-1)  # only the groups that hold them, back to rows
        return _x8_pick(self._x8, rows, lambda a: self._grouped(a, False, self._group), self._group)


class Q8_0Weight(_HeldInGroups):
    """Q8_0: fp16 d | 32 int8 q; value j = d * q. The quants are held row by row (qs), or for arithmetic="ggml"'s
    16-row decode tiles on AVX-512 VNNI hosts (kernels/ggml_simd._define_x16) in the "x16" form (x8_form(16);
    _HeldInGroups): block b of rows 16g .. 16g + 15 the 512 bytes at (g nb + b) 512, byte 64j + 4r + k row r's
    q of value 4j + k plus 128 (its bits XOR 0x80: the unsigned side of vpdpbusd)."""
    format, ggml_type, block_size, type_size, bits_per_weight = "q8_0", "Q8_0", 32, 34, 8.5
    fields = ("d",)
    _flip = 0x80

    def kernel_args(self):
        return self.qs, self.d, self.d, False  # the Q8/Q4 kernels' (qs, d, m, has_min): no offsets here

    def _dequantize_blocks(self, b):
        d = _fp16(b[:, 0:2])[:, None]  # (n, 1)
        q = b[:, 2:].view(np.int8).astype(np.float32)  # (n, 32)
        return q * d


class Q4_0Weight(_HeldInGroups):
    """Q4_0: fp16 d | 16 bytes of nibbles; value j = d * (q - 8). The nibbles are held row by row (qs), or for
    arithmetic="ggml"'s 16-row tiles on AVX-512 VNNI hosts (kernels/ggml_simd._define_q4_0x16) in the "x16" form
    (x8_form(16); _HeldInGroups), as Q4_1's: block b of rows 16g .. 16g + 15 the 256 bytes at (g nb + b) 256, byte
    64j + 4r + k row r's nibble byte 4j + k."""
    format, ggml_type, block_size, type_size, bits_per_weight = "q4_0", "Q4_0", 32, 18, 4.5
    fields = ("d",)

    def kernel_args(self):
        return self.qs, self.d, self.d, False  # (qs, d, m, has_min): no offsets; the -8 is in the kernel

    def _dequantize_blocks(self, b):
        d = _fp16(b[:, 0:2])[:, None]  # (n, 1)
        q = _nibbles(b[:, 2:]).astype(np.int8) - np.int8(8)  # (n, 32)
        return d * q.astype(np.float32)


class Q4_1Weight(_HeldInGroups):
    """Q4_1: fp16 d, m | 16 bytes of nibbles; value j = d * q + m. The nibbles are held row by row (qs, as exact mode
    and the specification read them), or for arithmetic="ggml"'s 8-row decode tiles (kernels/ggml_simd._define_x8)
    in the "x8" form (x8_form(); the rows in groups of 8; _HeldInGroups): block b of rows 8g .. 8g + 7 is the 128
    bytes at (g nb + b) 128, 4 vectors of 32 bytes, byte 32j + 4r + k row r's nibble byte 4j + k (its values 4j + k
    and 16 + 4j + k). Or in the "x16" form (x8_form(16)), the same for groups of 16 rows (AVX-512 VNNI's 16-row
    decode tiles, kernels/ggml_simd._define_x16): block b of rows 16g .. 16g + 15 the 256 bytes at (g nb + b) 256,
    byte 64j + 4r + k row r's nibble byte 4j + k."""
    format, ggml_type, block_size, type_size, bits_per_weight = "q4_1", "Q4_1", 32, 20, 5.0
    fields = ("d", "m")

    def kernel_args(self):
        return self.qs, self.d, self.m, True  # (qs, d, m, has_min)

    def _dequantize_blocks(self, b):
        d = _fp16(b[:, 0:2])[:, None]  # (n, 1)
        m = _fp16(b[:, 2:4])[:, None]  # (n, 1)
        q = _nibbles(b[:, 4:]).astype(np.float32)  # (n, 32)
        return d * q + m


BLOCKS_PER_PIECE = 1 << 14  # blocks unpacked at a time on load (Q5_0 / Q5_1): 512 KiB of values

# The orders a Q5 block's 32 fifth bits can be held in (the 4 bytes before its nibbles, a little-endian word):
# "file": value v's bit at bit v, as GGUF stores them; "shifted": value 4j + b's bit at bit 8b + 7 - j, so that the word
# copied into 8 lanes of 32 bits, lane j shifted left by j (one AVX2 vpsllvd), has each value's bit at the top of that
# value's byte, where one vpblendvb reads it (kernels/ggml_simd.q5_values; llama.cpp's bytes_from_bits_32 takes a
# vpshufb, an and, a compare and an andnot). The same 32 bits in another order: the same 4 bytes a block.
# "x8" (a weight whose rows come in groups of 8): the "shifted" bits, and each 8 rows' blocks side by side, as the AVX2
# 8-row decode tiles read them (kernels/ggml_simd._define_x8): block b of rows 8g .. 8g + 7 is the 160 bytes at
# (g nb + b) 160 (so rows 8g .. still start at byte 8g nb 20), 4 vectors of 32 bytes of nibbles (byte 32j + 4r + k is
# row r's nibble byte 4j + k: its values 4j + k and 16 + 4j + k), then the 8 rows' words of fifth bits. The 8 rows'
# scales of block b side by side too (q5_scales_in_order). The same bytes, moved.
# "x16" (rows in groups of 16): the same for 16 rows, as AVX-512 VNNI's 16-row decode tiles read them
# (kernels/ggml_simd._define_x16): block b of rows 16g .. 16g + 15 the 320 bytes at (g nb + b) 320, 4 vectors of 64
# bytes of nibbles (byte 64j + 4r + k row r's nibble byte 4j + k), then the 16 rows' words of fifth bits (shifted).
Q5_BIT_ORDERS = ("file", "shifted", "x8", "x16")
_GROUPS = {"x8": 8, "x16": 16}  # the orders that group rows, and how many
_SHIFTED_AT = np.array([8 * (v % 4) + 7 - v // 4 for v in range(32)])  # value v's bit -> its place in "shifted"


def _bit_tables(dest: np.ndarray) -> np.ndarray:
    """(4, 256) uint32: for byte k of a word and each of its values, its bits 8k + i moved to bits dest[8k + i]."""
    bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.uint32)  # (256, 8): byte value -> its bits
    return np.stack([(bits << dest[8 * k:8 * k + 8].astype(np.uint32)).sum(axis=1, dtype=np.uint32)
                     for k in range(4)])


_TO_SHIFTED, _TO_FILE = _bit_tables(_SHIFTED_AT), _bit_tables(np.argsort(_SHIFTED_AT))


def _x8_groups(a: np.ndarray, per_row: int, group: int = 8) -> int:
    """Groups of `group` rows of a (rows, ...) array of per_row bytes a row, taken at a time: ~BLOCKS_PER_PIECE
    blocks."""
    if a.ndim != 2 or a.shape[0] % group:
        raise ValueError(f"the form 'x{group}' needs (rows, blocks) with rows in groups of {group}, not {a.shape}")
    return max(1, BLOCKS_PER_PIECE * 20 // (group * per_row))


def _x8_pick(held: np.ndarray, rows: np.ndarray, back, group: int = 8) -> np.ndarray:
    """Rows `rows` (1-D) of an array (rows, width) held in the "x8" form (or "x16": group 16): only the groups of
    rows that hold them are taken out of it, by back (the groups' array -> row by row). -> (len(rows), width)."""
    groups = np.unique(rows // group)
    part = held.reshape(-1, group, held.shape[1])[groups].reshape(group * groups.size, -1)
    return back(part)[group * np.searchsorted(groups, rows // group) + rows % group]


def _x8_rows(blocks: np.ndarray, head: int, into: bool, group: int = 8, body: int = 16) -> np.ndarray:
    """Blocks (rows, nb * (head + body)) of `head` bytes of fifth bits (Q5: 4; Q4_1, Q8_0: 0) and `body` of quants
    (16 of nibbles; Q8_0 32), rows in groups of 8 (or 16), into (True) or out of (False) the "x8" form
    (Q5_BIT_ORDERS, _HeldInGroups; "x16"): a group's block the rows' quants as body / 4 vectors of 4 * group bytes,
    then their heads. In pieces of ~BLOCKS_PER_PIECE blocks."""
    rows, width = blocks.shape
    quants, words = body * group, body // 4  # quant bytes a group's block; words a row's block
    nb, at, size = width // (head + body), _x8_groups(blocks, width, group), head + body
    out = np.empty_like(blocks)
    src, dst = (a.reshape(rows // group, group * width) for a in (blocks, out))  # one row per group
    for g in range(0, rows // group, at):
        piece = src[g:g + at]
        n = piece.shape[0]
        if into:  # (n, G r, nb, head | body) -> (n, nb, [words j, G r, 4 k] quants | [G r, head] heads)
            p = piece.reshape(n, group, nb, size)
            parts = [p[..., head:].reshape(n, group, nb, words, 4).transpose(0, 2, 3, 1, 4).reshape(n, nb, quants),
                     p[..., :head].transpose(0, 2, 1, 3).reshape(n, nb, group * head)]
            dst[g:g + n] = np.concatenate(parts, 2).reshape(n, -1)
        else:
            p = piece.reshape(n, nb, group * size)
            parts = [p[..., quants:].reshape(n, nb, group, head).transpose(0, 2, 1, 3),
                     p[..., :quants].reshape(n, nb, words, group, 4).transpose(0, 3, 1, 2, 4).reshape(n, group, nb,
                                                                                                        body)]
            dst[g:g + n] = np.concatenate(parts, 3).reshape(n, -1)
    return out


def q5_scales_in_order(scales: np.ndarray, order: str, was: str) -> np.ndarray:
    """A Q5 weight's scales (rows, nb) (fp16 bits, or fp16 pairs as uint32; kernels/ggml.py also puts Q4_1's fp16
    pairs in "x8" or "x16" order with it) as the blocks in `order` want them (a copy where they move; else scales
    itself): "x8" has the 8 scales of rows 8g .. 8g + 7 of block b side by side, (rows / 8, nb, 8) viewed as
    (rows, nb), "x16" the 16 of rows 16g .. 16g + 15; the other orders row by row."""
    if _GROUPS.get(order) == _GROUPS.get(was):
        return scales
    if order in _GROUPS and was in _GROUPS:
        return q5_scales_in_order(q5_scales_in_order(scales, "file", was), order, "file")
    rows, nb = scales.shape
    g = _GROUPS.get(order) or _GROUPS[was]
    _x8_groups(scales, nb, g)
    if order in _GROUPS:
        return np.ascontiguousarray(scales.reshape(rows // g, g, nb).transpose(0, 2, 1)).reshape(rows, nb)
    return np.ascontiguousarray(scales.reshape(rows // g, nb, g).transpose(0, 2, 1)).reshape(rows, nb)


def q5_bits_in_order(blocks: np.ndarray, order: str, was: str = "file") -> np.ndarray:
    """Q5 blocks without their header (..., 20) uint8 (fifth bits, then nibbles), fifth bits held in order `was` ->
    a copy with them in `order` (Q5_BIT_ORDERS); the nibbles as they were. In pieces of BLOCKS_PER_PIECE blocks.
    "x8" and "x16" (from or to) take (rows, nb * 20) with rows in groups of 8 (16) and move the nibbles too."""
    if order not in Q5_BIT_ORDERS or was not in Q5_BIT_ORDERS:
        raise ValueError(f"Q5 fifth-bit order must be one of {Q5_BIT_ORDERS}, not {order!r} / {was!r}")
    if was in _GROUPS and order != was:
        return q5_bits_in_order(_x8_rows(blocks, 4, False, _GROUPS[was]), order, "shifted")
    if order in _GROUPS and was != order:
        return _x8_rows(q5_bits_in_order(blocks, "shifted", was), 4, True, _GROUPS[order])
    out = np.array(blocks, copy=True)
    if order == was:
        return out
    tables = _TO_SHIFTED if order == "shifted" else _TO_FILE
    flat = out.reshape(-1, 20)  # (n, 20), a view of out
    for s in range(0, flat.shape[0], BLOCKS_PER_PIECE):
        head = flat[s:s + BLOCKS_PER_PIECE, :4]  # (p, 4) the word's bytes, little-endian
        word = tables[0][head[:, 0]] | tables[1][head[:, 1]] | tables[2][head[:, 2]] | tables[3][head[:, 3]]
        flat[s:s + BLOCKS_PER_PIECE, :4] = word.astype("<u4")[:, None].view(np.uint8)
    return out


class _Q5Weight(GGUFBlockWeight):
    """Q5_0 and Q5_1: the fields (d; Q5_1 also m, fp16) | qh, 4 bytes | 16 bytes of nibbles laid out as Q4_0's.
    Value j of a block has q = nibble | (bit j of qh, little-endian) << 4; Q5_0: d * (q - 16), Q5_1: d * q + m.

    Held in one of two forms, each the file's integers and fp16 scales, so either gives back the file's bytes
    (raw_blocks()):
    - as loaded, the file's: file_form() = (blocks (rows, nb * 20), each block's qh then nibbles; scales (rows,
      nb), its fp16 d as uint16 bits (Q5_0) or its fp16 pair d | m << 16 as uint32 (Q5_1), the block's first bytes
      read little-endian). 22 / 24 bytes a block, as the file; arithmetic="ggml"'s kernels read these (kernels/
      ggml.py _weight_args), as llama.cpp does. file_form(order) gives qh's bits in another order
      (Q5_BIT_ORDERS: the AVX2 tiles read "shifted"), or "x8", each 8 rows' blocks (and scales) side by side for
      the 8-row decode tiles: the blocks held are then replaced by that order's, still one copy.
    - exact mode's: `qs` one byte per value in value order (Q5_0: the int8 bytes of q - 16; Q5_1: q), read as the Q8
      kernels read Q8_0 (Q5_0) or Q5_K (Q5_1), and float32 `d` (and `m`): 36 / 40 bytes a block, the price of
      reading 5-bit values without shuffling bits there. Made on first use (qs, d, m, kernel_args(), data), and the
      file's form is let go then (what a kernel already holds of it stays its); file_form() makes it again from
      them if asked. A weight one mode reads is held once.
    """
    offset = 0  # 16 for Q5_0

    def __init__(self, data, shape):
        rows, cols = int(shape[0]), int(shape[1])
        if cols % 32:
            raise WeightsError(f"{self.format}: row length {cols} is not a multiple of the block size 32")
        raw = np.asarray(data).view(np.uint8).reshape(rows, cols // 32, self.type_size)  # (rows, blocks, bytes)
        self.shape = (rows, cols)
        self._exact = None  # (qs, d, m or None) once made
        self._hold_file_form(raw)

    def _hold_file_form(self, raw) -> None:
        """Keep the blocks raw (rows, blocks, type_size) of the file as file_form() gives them (copies: a GGUF tensor
        arrives as a view of the file's memory map)."""
        rows, nb, h = raw.shape[0], raw.shape[1], 2 * len(self.fields)
        scale_type = np.uint16 if h == 2 else np.uint32
        self._scales16 = _readonly(np.ascontiguousarray(raw[:, :, :h]).view(scale_type).reshape(rows, nb))
        self._blocks = _readonly(np.ascontiguousarray(raw[:, :, h:]).reshape(rows, nb * 20))
        self._order = "file"  # of the fifth bits in _blocks (Q5_BIT_ORDERS)

    def file_form(self, order: str = "file") -> tuple:
        """(blocks (rows, nb * 20) uint8, scales (rows, nb) uint16 / uint32): see the class. order: of each block's
        fifth bits (Q5_BIT_ORDERS); the blocks held are put in it (one copy held either way)."""
        if self._blocks is None:
            self._hold_file_form(self.raw_blocks().reshape(self.shape[0], -1, self.type_size))
        if order != self._order:
            blocks = _readonly(q5_bits_in_order(self._blocks, order, self._order))
            if order in _GROUPS or self._order in _GROUPS:  # the scales move with the rows
                self._scales16 = _readonly(q5_scales_in_order(self._scales16, order, self._order))
            self._blocks, self._order = blocks, order
        return self._blocks, self._scales16

    def _file_blocks(self, sel=slice(None)) -> tuple:
        """(blocks, scales) held, rows sel, as the file has them (the fifth bits in its order, row by row)."""
        if self._order not in _GROUPS:
            blocks = self._blocks[sel]
            return (blocks if self._order == "file" else q5_bits_in_order(blocks, "file", self._order),
                    self._scales16[sel])
        rows, order = np.arange(self.shape[0])[sel].reshape(-1), self._order
        return (_x8_pick(self._blocks, rows, lambda a: q5_bits_in_order(a, "file", order), _GROUPS[order]),
                _x8_pick(self._scales16, rows, lambda a: q5_scales_in_order(a, "file", order), _GROUPS[order]))

    def _unpacked(self) -> tuple:
        """(qs, d, m or None): exact mode's form, made from the file's on first use, which is then let go."""
        if self._exact is None:
            if self._order in _GROUPS:
                self.file_form("shifted")  # row by row again
            rows, cols = self.shape
            nb, h = cols // 32, 2 * len(self.fields)
            head = self._scales16.reshape(rows, nb, 1).view(np.uint8)  # (rows, nb, h): the file's fp16 fields
            fields = [_readonly(_fp16(head[:, :, 2 * i:2 * i + 2])) for i in range(len(self.fields))]
            qs = _readonly(self._values(self._blocks.reshape(rows * nb, 20), self._order).reshape(rows, cols))
            self._exact = (qs, fields[0], fields[1] if h == 4 else None)
            self._blocks = self._scales16 = None
        return self._exact

    qs = property(lambda self: self._unpacked()[0], doc="(rows, cols) uint8: one byte per value (Q5_0: q - 16)")
    data = qs
    d = property(lambda self: self._unpacked()[1], doc="(rows, blocks) float32: each block's d")

    def _values(self, b, order="file"):
        """(n, 20) bytes qh | nibbles, qh's bits in `order` (Q5_BIT_ORDERS) -> (n, 32) uint8: q, or for Q5_0 the int8
        bytes of q - 16 (q - 16 mod 256).

        In pieces of BLOCKS_PER_PIECE blocks, so that the temporaries stay small (whole, a 1B model's embedding
        made 1 GB of them): a piece's bits are put in the file's order on its own."""
        out = np.empty((b.shape[0], 32), np.uint8)
        for s in range(0, b.shape[0], BLOCKS_PER_PIECE):
            piece = q5_bits_in_order(b[s:s + BLOCKS_PER_PIECE], "file", order)  # (p, 20)
            high = np.unpackbits(np.ascontiguousarray(piece[:, :4]), axis=1, bitorder="little")  # (p, 32): bit j
            out[s:s + BLOCKS_PER_PIECE] = (_nibbles(piece[:, 4:]) | (high << np.uint8(4))) - np.uint8(self.offset)
        return out

    def kernel_args(self):
        qs, d, m = self._unpacked()
        return (qs, d, m, True) if m is not None else (qs, d, d, False)

    @property
    def nbytes(self) -> int:
        held = [self._blocks, self._scales16] + list(self._exact or ())
        return sum(int(a.nbytes) for a in held if a is not None)

    def raw_blocks(self, ids=None) -> np.ndarray:
        sel = slice(None) if ids is None else ids
        h = 2 * len(self.fields)
        if self._blocks is not None:  # the file's form: its bytes as they are
            blocks, scales = self._file_blocks(sel)
            n = blocks.shape[0]
            head = scales.reshape(n, -1, 1).view(np.uint8)  # (n, nb, h)
            return np.concatenate([head, blocks.reshape(n, -1, 20)], axis=2).reshape(n, -1)
        qs = self.qs[sel]
        n, nb = qs.shape[0], self.shape[1] // 32
        q = (qs.view(np.int8) + np.int8(self.offset)).view(np.uint8).reshape(n, nb, 32)  # 0..31
        qh = (((q >> np.uint8(4)) & np.uint8(1)).astype(np.uint32) << np.arange(32, dtype=np.uint32)).sum(
            axis=2, dtype=np.uint32).astype("<u4")[:, :, None].view(np.uint8)  # (n, nb, 4)
        low = q & np.uint8(15)
        nibbles = low[:, :, :16] | (low[:, :, 16:] << np.uint8(4))  # (n, nb, 16)
        fields = self._exact[1:1 + h // 2]
        parts = [f[sel].astype(np.float16)[:, :, None].view(np.uint8) for f in fields]
        return np.concatenate(parts + [qh, nibbles], axis=2).reshape(n, -1)

    def _dequantize_blocks(self, b):
        d = _fp16(b[:, 0:2])[:, None]  # (n, 1)
        q = self._values(b[:, 2 * len(self.fields):]).view(np.int8).astype(np.float32)  # (n, 32)
        if self.fields == ("d", "m"):
            return d * q + _fp16(b[:, 2:4])[:, None]
        return d * q


class Q5_0Weight(_Q5Weight):
    format, ggml_type, block_size, type_size, bits_per_weight = "q5_0", "Q5_0", 32, 22, 5.5
    fields, offset = ("d",), 16


class Q5_1Weight(_Q5Weight):
    format, ggml_type, block_size, type_size, bits_per_weight = "q5_1", "Q5_1", 32, 24, 6.0
    fields = ("d", "m")

    m = property(lambda self: self._unpacked()[2], doc="(rows, blocks) float32: each block's m")


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) bytes -> (n, 32) values: the 16 low nibbles, then the 16 high nibbles."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


# K-quants: a 256-value super-block in sub-blocks, each with its own 6-bit (Q4_K/Q5_K) or 8-bit (Q6_K) scale.
QK_K = 256


def kquant_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins. (n, 12) -> (n, 8), (n, 8).

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 mins 0-3; scales/mins 4-7 take their low
    4 bits from bytes 8-11 and their top 2 bits from the spare top bits of bytes 0-3 / 4-7.
    """
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]  # (n, 4) each
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _kquant_scale_and_min(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block scale d*sc[j] and offset dmin*mn[j] of Q4_K/Q5_K blocks (both lay out d | dmin | 12
    bytes of 6-bit scales first). b (n, bytes) -> two (n, 8, 1) float32 arrays."""
    d, dmin = _fp16(b[:, 0:2]), _fp16(b[:, 2:4])  # (n,)
    sc, mn = kquant_scales(b[:, 4:16])  # (n, 8)
    scale = (d[:, None] * sc.astype(np.float32))[:, :, None]  # (n, 8, 1)
    minimum = (dmin[:, None] * mn.astype(np.float32))[:, :, None]  # (n, 8, 1)
    return scale, minimum


def _kquant_rows(weight, data, shape) -> tuple[int, int, np.ndarray]:
    """Check a K-quant matrix's shape, set weight.shape, and view its bytes as (rows, blocks, type_size)."""
    rows, cols = int(shape[0]), int(shape[1])
    if cols % QK_K:
        raise WeightsError(f"{weight.format}: row length {cols} is not a multiple of the block size {QK_K}")
    weight.shape = (rows, cols)
    return rows, cols, np.asarray(data).view(np.uint8).reshape(rows, cols // QK_K, weight.type_size)


class _KQuantWithMin(GGUFBlockWeight):
    """Q4_K and Q5_K: d fp16 | dmin fp16 | 12 bytes of 6-bit scales and mins | the quants.

    Sub-block j (32 values) = d * sc[j] * q - dmin * mn[j]. exact mode's kernels (kernels/linear.py) read it
    as Q4_1 / Q8_0 with offsets: the quants one sub-block at a time, the scale d*sc[j] of each sub-block in `d`
    and its offset -dmin*mn[j] in `m`, float32 exactly as gguf.quants computes them (and d*q + (-o) is bit for
    bit d*q - o). Subclasses say where the quants sit in a block (`_quants`, `_file_quants`) and how they
    keep them (each class).
    """

    def _dequantize_blocks(self, b):
        n = b.shape[0]
        scale, minimum = _kquant_scale_and_min(b)  # (n, 8, 1) each
        q = self._quants(b).reshape(n, 8, 32).astype(np.float32)  # (n, 8 sub-blocks, 32)
        return (scale * q - minimum).reshape(n, QK_K)


class Q4_KWeight(_KQuantWithMin):
    """144 bytes / 256 values: d fp16 | dmin fp16 | 12 bytes scales | 128 bytes nibbles.

    Each 32-byte group of nibbles holds two sub-blocks, the low nibbles first. Kept in one of two forms, each
    holding the file's integers and fp16 scales, so either gives back the file's bytes (raw_blocks()):
    - as loaded: `qs` (rows, blocks * 128) in the Q4_1 layout (see GGUFBlockWeight: every sub-block as 16
      bytes holding values j and j + 16) and `head` (rows, blocks, 16), the file's header bytes of each
      super-block; 0.56 bytes per value, as the file.
    - `x8`, the copy of 8 rows interleaved that arithmetic="ggml"'s kernels read when rows % 8 == 0 (as
      llama.cpp repacks them: kernels/ggml_kquants.repack_q4_k, 0.61 bytes per value). Those kernels make it on
      first use and hand it to hold_x8(), which drops qs and head: in ggml mode a weight is held once.
      raw_blocks(ids) (rows(): the embedding's lookups) then unpacks only those rows from it; reading `qs` or
      `head` (exact mode or the NumPy specification on the same object) unpacks them all and keeps them.
    exact mode's kernels also ask for float32 scales and offsets per sub-block (`d`, `m`: 0.25 bytes per
    value), made by kernel_args() on first use and kept (nbytes counts what is held).
    """
    format, ggml_type, block_size, type_size, bits_per_weight = "q4_k", "Q4_K", QK_K, 144, 4.5

    def __init__(self, data, shape):
        rows, cols, raw = _kquant_rows(self, data, shape)  # raw (rows, blocks, 144)
        blocks = raw.reshape(-1, self.type_size)  # (rows * blocks, 144)
        self._head = _readonly(np.ascontiguousarray(raw[:, :, :16]))  # (rows, blocks, 16) d | dmin | scales
        self._qs = _readonly(self._kernel_layout(self._quants(blocks)).reshape(rows, -1))  # (rows, blocks * 128)
        self._scales = None  # (d, m) for exact mode's kernels, made by kernel_args() when asked
        self.x8 = None  # the ggml kernels' 8-row copy once they have made it (hold_x8)

    def hold_x8(self, x8: np.ndarray) -> None:
        """Keep x8 (kernels/ggml_kquants.repack_q4_k of this weight) in place of qs and head."""
        self.x8 = _readonly(x8)
        self._qs = self._head = None

    def _unpacked(self, ids) -> tuple:
        """qs and head of rows ids (an int array) from x8 (kernels/ggml_kquants.unpack_q4_kx8)."""
        from ..kernels.ggml_kquants import unpack_q4_kx8  # x8 exists only where those kernels made it

        return unpack_q4_kx8(self.x8, ids)

    def _originals(self) -> tuple:
        """(qs, head), unpacked from x8 and kept if the ggml kernels dropped them."""
        if self._qs is None:
            qs, head = self._unpacked(np.arange(self.shape[0]))
            self._qs, self._head = _readonly(qs), _readonly(head)
        return self._qs, self._head

    qs = property(lambda self: self._originals()[0], doc="(rows, blocks * 128): the quants, Q4_1's layout")
    head = property(lambda self: self._originals()[1], doc="(rows, blocks, 16): the file's header bytes")
    data = qs

    @property
    def d(self) -> np.ndarray:
        return self.kernel_args()[1]

    @property
    def m(self) -> np.ndarray:
        return self.kernel_args()[2]

    def kernel_args(self):
        """exact mode's (qs, d, m, has_min): the Q4_1 kernels' arrays."""
        if self._scales is None:
            rows = self.shape[0]
            with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN scales stay what gguf makes of them
                scale, minimum = _kquant_scale_and_min(self.head.reshape(-1, 16))  # (rows * blocks, 8, 1) each
            self._scales = (_readonly(scale.reshape(rows, -1)), _readonly(np.negative(minimum).reshape(rows, -1)))
        return self.qs, self._scales[0], self._scales[1], True

    @property
    def nbytes(self) -> int:
        held = [self._qs, self._head, self.x8] + list(self._scales or ())
        return sum(int(a.nbytes) for a in held if a is not None)

    def raw_blocks(self, ids=None) -> np.ndarray:
        sel = slice(None) if ids is None else ids
        if self._qs is not None:
            qs, head = self._qs[sel], self._head[sel]
        else:  # only x8: unpack just these rows (an embedding's lookups), keep nothing
            qs, head = self._unpacked(np.arange(self.shape[0])[sel].reshape(-1))
        n, nb = qs.shape[0], self.shape[1] // QK_K
        values = self._kernel_values(qs.reshape(n * nb, -1))  # (n*nb, 256)
        quants = self._file_quants(values).reshape(n, nb, -1)  # (n, blocks, 128)
        return np.concatenate([head, quants], axis=2).reshape(n, nb * self.type_size)

    @staticmethod
    def _quants(b):
        """Blocks (n, 144) -> the values q, 0..15, in order (n, 256)."""
        qs = b[:, 16:].reshape(-1, 4, 1, 32)  # (n, 4 groups, 1, 32)
        return ((qs >> np.array([0, 4], np.uint8).reshape(2, 1)) & np.uint8(15)).reshape(-1, QK_K)

    @staticmethod
    def _file_quants(values):
        v = values.reshape(-1, 4, 2, 32)  # (n, groups, low/high sub-block, 32)
        return (v[:, :, 0] | (v[:, :, 1] << np.uint8(4))).reshape(-1, 128)

    @staticmethod
    def _kernel_layout(values):
        v = values.reshape(-1, 8, 32)  # (n, sub-blocks, 32)
        return v[:, :, :16] | (v[:, :, 16:] << np.uint8(4))  # (n, 8, 16)

    @staticmethod
    def _kernel_values(qs):
        v = qs.reshape(-1, 8, 16)
        return np.concatenate([v & np.uint8(15), v >> np.uint8(4)], axis=2).reshape(-1, QK_K)


class Q5_KWeight(_KQuantWithMin):
    """176 bytes / 256 values: d | dmin | 12 bytes scales | 32 bytes high bits | 128 bytes nibbles.

    Like Q4_K with a fifth bit per value: bit j of qh[i] is the high bit of value i of sub-block j. Kept at
    its true width: `blocks` (rows, blocks * 176) holds the file's bytes as they are (5.5 bits per value),
    and arithmetic="ggml"'s kernels (kernels/ggml_kquants.py) unpack the five bits in registers as llama.cpp
    does; `head` is a view of each block's 16 header bytes. kernels/linear.py's kernels (arithmetic="exact")
    read Q5_K as Q8_0 with offsets instead, one byte per value (q, 0..31) and float32 scales and offsets per
    sub-block: kernel_args() makes those on first use and keeps them (nbytes counts them once they exist).
    """
    format, ggml_type, block_size, type_size, bits_per_weight = "q5_k", "Q5_K", QK_K, 176, 5.5

    def __init__(self, data, shape):
        rows, cols, raw = _kquant_rows(self, data, shape)  # raw (rows, blocks, 176)
        # (rows, nb * 176): the file's bytes, copied (a GGUF tensor arrives as a view of the file's memory map)
        self.blocks = _readonly(np.array(raw.reshape(rows, -1), copy=True))
        self.data = self.blocks
        self._unpacked = None  # (qs, d, m, True) for kernels/linear.py, made by kernel_args() when asked

    @property
    def head(self) -> np.ndarray:
        """(rows, blocks, 16): d fp16 | dmin fp16 | 12 bytes of 6-bit scales and mins, a view of `blocks`."""
        return self.blocks.reshape(self.shape[0], -1, self.type_size)[:, :, :16]

    def kernel_args(self):
        if self._unpacked is None:
            rows = self.shape[0]
            blocks = self.blocks.reshape(-1, self.type_size)  # (rows * blocks, 176)
            with np.errstate(invalid="ignore", over="ignore"):  # inf/NaN scales stay what gguf makes of them
                scale, minimum = _kquant_scale_and_min(blocks)  # (rows * blocks, 8, 1) each
            self._unpacked = (_readonly(self._quants(blocks).reshape(rows, -1)), _readonly(scale.reshape(rows, -1)),
                              _readonly(np.negative(minimum).reshape(rows, -1)), True)
        return self._unpacked

    def _extra_arrays(self):
        return list(self._unpacked[:3]) if self._unpacked is not None else []

    def raw_blocks(self, ids=None) -> np.ndarray:
        return self.blocks if ids is None else self.blocks[ids]

    @staticmethod
    def values(b):
        """Blocks (n, 176) -> the values q, 0..31, uint8, in order (n, 256)."""
        qh = b[:, 16:48].reshape(-1, 1, 32)  # (n, 1, 32)
        low = Q4_KWeight._quants(b[:, 32:])  # the nibbles sit as in Q4_K, 32 bytes later
        high = (qh >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & np.uint8(1)  # (n, 8, 32)
        return low | (high.reshape(-1, QK_K) << np.uint8(4))

    _quants = values  # what _KQuantWithMin's dequantization calls


class Q6_KWeight(GGUFBlockWeight):
    """210 bytes / 256 values: 128 bytes low nibbles | 64 bytes 2-bit highs | 16 int8 scales | d fp16.

    Value = d * scale[sub-block of 16] * (q - 32), q six bits; see ggml's dequantize_row_q6_K for the order.
    Kept at its true width: `blocks` (rows, blocks * 210) holds the file's bytes as they are (6.5625 bits per
    value), and arithmetic="ggml"'s kernels (kernels/ggml_kquants.py) unpack the six bits in registers as
    llama.cpp does. kernels/linear.py's Q6_K kernels (arithmetic="exact") read one int8 per value (q - 32)
    and a float32 scale per 16 values instead: kernel_args() decodes those on first use and keeps them
    (1.25 bytes per value more; nbytes counts them once they exist).
    """
    format, ggml_type, block_size, type_size, bits_per_weight = "q6_k", "Q6_K", QK_K, 210, 6.5625

    def __init__(self, data, shape):
        rows, cols, raw = _kquant_rows(self, data, shape)  # raw (rows, blocks, 210)
        # (rows, nb * 210): the file's bytes, copied (a GGUF tensor arrives as a view of the file's memory map;
        # the weights live in memory the process owns, as the other formats' arrays do)
        self.blocks = _readonly(np.array(raw.reshape(rows, -1), copy=True))
        self.data = self.blocks
        self._unpacked = None  # (qs, d) for kernels/linear.py, made by kernel_args() when asked

    def kernel_args(self):
        """(qs (rows, cols) int8 bytes q - 32, d (rows, cols / 16) float32 d * scale): kernels/linear.py's."""
        if self._unpacked is None:
            rows, cols = self.shape
            blocks = self.blocks.reshape(-1, self.type_size)  # (rows * blocks, 210)
            with np.errstate(invalid="ignore", over="ignore"):
                d = self._scales(blocks).reshape(rows, -1)  # (rows, sub-blocks of 16)
            self._unpacked = (_readonly(self._quants(blocks).view(np.uint8).reshape(rows, cols)), _readonly(d))
        return self._unpacked

    def _extra_arrays(self):
        return list(self._unpacked) if self._unpacked is not None else []

    @staticmethod
    def _scales(b):
        """Blocks (n, 210) -> d * scale of each 16-value sub-block, (n, 16) float32."""
        return _fp16(b[:, 208:210])[:, None] * b[:, 192:208].view(np.int8).astype(np.float32)

    @staticmethod
    def _quants(b):
        """Blocks (n, 210) -> the values q - 32, int8, in order (n, 256)."""
        return Q6_KWeight.values(b).astype(np.int8) - np.int8(32)

    @staticmethod
    def values(b):
        """Blocks (n, 210) -> the six-bit values q, 0..63, uint8, in order (n, 256): value 32k + l of each
        128-value half takes nibble (k >= 2) of ql byte l + 32 (k % 2) and bits 2k, 2k + 1 of qh byte l."""
        lo = (b[:, 0:128].reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)) & np.uint8(15)
        hi = (b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)) & np.uint8(3)
        return lo.reshape(-1, QK_K) | (hi.reshape(-1, QK_K) << np.uint8(4))

    def raw_blocks(self, ids=None) -> np.ndarray:
        return self.blocks if ids is None else self.blocks[ids]

    def _dequantize_blocks(self, b):
        n = b.shape[0]
        scale = self._scales(b).reshape(n, 16, 1)  # (n, 16, 1)
        q = self._quants(b).reshape(n, 16, 16).astype(np.float32)  # (n, 16 sub-blocks, 16)
        return (scale * q).reshape(n, QK_K)


BLOCK_TYPES = {cls.ggml_type: cls for cls in (Q8_0Weight, Q4_0Weight, Q4_1Weight, Q5_0Weight, Q5_1Weight,
                                              Q4_KWeight, Q5_KWeight,
                                              Q6_KWeight)}
QUANTIZERS = {"int8": Int8Weight, "q8_0": Q8_0Weight, "q4_0": Q4_0Weight, "q4_1": Q4_1Weight}


def from_gguf_tensor(tensor):
    """A GGUF tensor kept in its stored format: a packed weight, or a float32 array for F32 tensors.

    Returns None for types we do not pack (the caller then dequantizes to float32).
    """
    rows_cols = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest axis first
    kind = tensor.tensor_type.name
    if len(rows_cols) != 2:
        return None
    if kind == "F16":
        return F16Weight(np.asarray(tensor.data).view(np.uint16).reshape(rows_cols), rows_cols)
    if kind == "BF16":
        return BF16Weight(np.asarray(tensor.data).view(np.uint16).reshape(rows_cols), rows_cols)
    if kind in BLOCK_TYPES:
        return BLOCK_TYPES[kind](np.asarray(tensor.data), rows_cols)
    return None


def quantize_weights(weights: dict, kind: str, where: str = "quantize") -> dict:
    """Quantize every float matrix of a weights dict to `kind` (int8, q8_0, q4_0, q4_1); norms stay float.

    Matrices whose rows do not split into whole blocks stay as they are. Tied tensors stay tied.
    """
    if kind not in QUANTIZERS:
        raise WeightsError(f"{where}: quantize must be one of {', '.join(QUANTIZERS)}, got {kind!r}")
    cls = QUANTIZERS[kind]
    done: dict[int, object] = {}  # id(original) -> quantized, so tied embeddings are quantized once
    out = {}
    for name, w in weights.items():
        if getattr(w, "ndim", 0) != 2:
            out[name] = w
            continue
        if id(w) not in done:
            dense = w if isinstance(w, np.ndarray) else w.to_float(np.float32)
            block = getattr(cls, "block_size", 1)
            done[id(w)] = cls.quantize(dense) if dense.shape[1] % block == 0 else w
        out[name] = done[id(w)]
    return out
