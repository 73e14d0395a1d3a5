"""Loading GGUF tensors: the packed Q5 layouts against gguf's own dequantizer, and the map's pages let go."""

import gguf
import numpy as np
import pytest

from llama_ref.weights import packed
from llama_ref.weights.gguf import open_gguf
from llama_ref.weights.packed import Q5_0Weight, Q5_1Weight
from test_cli import write_tiny_gguf


def random_blocks(rng, rows: int, blocks: int, cls) -> np.ndarray:
    """(rows, blocks * type_size) bytes of random blocks whose fp16 fields are finite numbers."""
    raw = rng.integers(0, 256, (rows, blocks, cls.type_size), dtype=np.uint8)
    for i in range(len(cls.fields)):
        raw[:, :, 2 * i:2 * i + 2] = rng.normal(size=(rows, blocks, 1)).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("cls", [Q5_0Weight, Q5_1Weight])
@pytest.mark.parametrize("piece", [packed.BLOCKS_PER_PIECE, 7])
def test_q5_unpacked_in_pieces_as_gguf_dequantizes(cls, piece, monkeypatch):
    """The 5-bit values are unpacked a piece of blocks at a time; any piece size gives gguf's values and the
    file's bytes back (a piece of 7 blocks cuts rows and leaves a short last piece)."""
    monkeypatch.setattr(packed, "BLOCKS_PER_PIECE", piece)
    rng = np.random.default_rng(5)
    rows, blocks = 13, 6
    raw = random_blocks(rng, rows, blocks, cls)
    w = cls(raw, (rows, 32 * blocks))
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[cls.ggml_type]).reshape(rows, -1)
    np.testing.assert_array_equal(w.to_float(np.float32), want)
    np.testing.assert_array_equal(w.raw_blocks(), raw)


def test_released_pages_read_back_the_same_bytes(tmp_path):
    """load_gguf lets go of each tensor's pages once copied (GGUFFile.release); a view of them still reads the
    file's bytes afterwards."""
    reader = open_gguf(write_tiny_gguf(tmp_path / "tiny.gguf"))
    before = [np.array(t.data, copy=True) for t in reader.tensors]
    for t in reader.tensors:
        reader.release(t)
    for t, b in zip(reader.tensors, before):
        np.testing.assert_array_equal(t.data, b)
