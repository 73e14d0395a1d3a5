"""Llama 3.2 Vision image preprocessing (llama_ref.vision.preprocess) against Meta's and Hugging Face's.

Fixtures (tests/fixtures/make_vision_preprocess_cases.py, run once in the oracle venv): Meta's own
VariableSizeImageTransform and transformers' MllamaImageProcessorPil on 14 committed images (crops of
scikit-image's photographs and odd files: 1x1, 2000x12, 9x1500, grey, grey+alpha, RGBA, 16-bit grey and RGB
PNG, palette PNG and GIF) and two big mosaics built from them, for four (tile_size, max_num_chunks) settings.

Tolerance: none. The tiles must have the same sha256 over their float32 bytes as Meta's: the same uint8
pixels (Pillow's decoder and bilinear resize, the same version) then the same float32 operations in the same
order give the same bits, so any difference is a bug, not rounding. Hugging Face's tiles are bit-identical to
Meta's on every image without transparency; with an alpha channel HF composites onto white where Meta (and
llama_ref) drop alpha, and the test checks that llama_ref on the white-composited picture gives HF's bits.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from llama_ref.errors import LlamaRefError
from llama_ref.vision.preprocess import (ImageError, ImageTiles, aspect_ratio_id, best_arrangement,
                                         check_image_count, load_image, preprocess_image, resized_size,
                                         tile_arrangements)

DATA = Path(__file__).parent / "data" / "vision"
IMAGES = DATA / "images"
CASES = json.loads((DATA / "preprocess_cases.json").read_text())
ARRANGEMENTS = json.loads((DATA / "arrangements.json").read_text())
HAS_ALPHA = {"coffee_rgba.png", "grey_alpha.png"}


def source(name: str):
    """The committed file, or the mosaic the fixture built from one (a decoded photograph tiled)."""
    if name in CASES["mosaics"]:
        src, (rh, rw) = CASES["mosaics"][name]
        return np.tile(np.asarray(Image.open(IMAGES / src).convert("RGB")), (rh, rw, 1))
    return IMAGES / name


def sha(tiles: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tiles, np.float32).tobytes()).hexdigest()


def case_id(c: dict) -> str:
    return f"{c['image']}-{c['tile_size']}x{c['max_num_chunks']}"


@pytest.mark.parametrize("case", CASES["cases"], ids=case_id)
def test_tiles_equal_metas_and_hfs(case):
    meta, hf = case["meta"], case["hf"]
    out = preprocess_image(source(case["image"]), tile_size=case["tile_size"],
                           max_num_chunks=case["max_num_chunks"])
    # Meta: the same shape, aspect ratio and bits
    assert list(out.tiles.shape) == meta["shape"]
    assert out.tiles.dtype == np.float32
    assert list(out.aspect_ratio) == meta["aspect_ratio"]
    assert out.num_tiles == meta["shape"][0]
    flat = out.tiles.reshape(-1)
    samples = flat[np.array(case["sample_index"]) % flat.size]
    np.testing.assert_array_equal(samples, np.array(meta["samples"], np.float32))
    assert sha(out.tiles) == meta["sha256"]

    # HF: the same id, mask and tile count, and (without transparency) the same bits
    tiles, mask = out.padded()
    assert out.aspect_ratio_id == hf["aspect_ratio_id"]
    assert mask.tolist() == hf["aspect_ratio_mask"]
    assert out.num_tiles == hf["num_tiles"]
    assert not tiles[out.num_tiles:].any()
    if case["image"] in HAS_ALPHA:
        # HF's convert_to_rgb composites onto white; Meta's convert("RGB") drops alpha. Same bits after the
        # same composite, and a real difference without it.
        assert hf["max_abs_diff_vs_meta"] > 1.0 and sha(out.tiles) != hf["sha256"]
        rgba = Image.open(source(case["image"])).convert("RGBA")
        white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba)
        out = preprocess_image(white, tile_size=case["tile_size"], max_num_chunks=case["max_num_chunks"])
    else:
        assert hf["max_abs_diff_vs_meta"] == 0.0
    assert sha(out.tiles) == hf["sha256"]


def test_arrangements_and_sizes_equal_metas():
    """300 image sizes (log-uniform up to 6000 pixels a side, plus edge cases) for three settings: the tile
    arrangement is Meta's (and HF's); the resized size is Meta's, except where Meta's comes out 0 pixels (its
    resize then raises) and llama_ref keeps 1 like HF."""
    cols = ARRANGEMENTS["columns"]
    zero_sides = 0
    for row in ARRANGEMENTS["rows"]:
        r = dict(zip(cols, row))
        tiles = best_arrangement(r["width"], r["height"], tile_size=r["tile_size"],
                                 max_num_chunks=r["max_num_chunks"])
        assert tiles == (r["meta_w_tiles"], r["meta_h_tiles"]) == (r["hf_w_tiles"], r["hf_h_tiles"]), r
        size = resized_size(r["width"], r["height"], tiles[0] * r["tile_size"], tiles[1] * r["tile_size"],
                            r["tile_size"])
        assert size == (max(r["meta_new_w"], 1), max(r["meta_new_h"], 1)) == (r["hf_new_w"], r["hf_new_h"]), r
        zero_sides += min(r["meta_new_w"], r["meta_new_h"]) == 0
    assert zero_sides > 0  # the table does exercise the 0-pixel case


def test_meta_order_of_arrangements():
    # find_supported_resolutions' docstring example for max_num_chunks=4, as (first, second) factor pairs
    assert tile_arrangements(4) == [(1, 4), (2, 2), (1, 1), (4, 1), (1, 3), (3, 1), (1, 2), (2, 1)]


def test_aspect_ratio_ids_are_hfs_numbering():
    # transformers' get_all_supported_aspect_ratios(4) order, 1-based
    order = [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1)]
    assert [aspect_ratio_id(h, w, 4) for h, w in order] == list(range(1, 9))


# ---- properties of the arrangement, over sizes --------------------------------------------------------------

def exact_best(width: int, height: int, tile: int, max_chunks: int) -> tuple[int, int]:
    """Meta's rule in exact rational arithmetic: the smallest scale >= 1 if any, else the largest; then the
    smallest canvas; then Meta's listing order."""
    arr = tile_arrangements(max_chunks)
    scales = [min(Fraction(a * tile, width), Fraction(b * tile, height)) for a, b in arr]
    ups = [s for s in scales if s >= 1]
    chosen = min(ups) if ups else max(scales)
    return arr[min((a * b, i) for i, ((a, b), s) in enumerate(zip(arr, scales)) if s == chosen)[1]]


sizes = st.integers(1, 12000)
settings_ = st.tuples(st.sampled_from([14, 32, 224, 448, 560]), st.integers(1, 12))


def check_arrangement(width: int, height: int, setting: tuple) -> None:
    tile, chunks = setting
    w_tiles, h_tiles = best_arrangement(width, height, tile_size=tile, max_num_chunks=chunks)
    cw, ch = w_tiles * tile, h_tiles * tile
    assert 1 <= w_tiles * h_tiles <= chunks
    # float32 scales (Meta's) choose what exact arithmetic chooses
    assert (w_tiles, h_tiles) == exact_best(width, height, tile, chunks)
    # a transposed picture gets the transposed arrangement
    assert best_arrangement(height, width, tile_size=tile, max_num_chunks=chunks) == (h_tiles, w_tiles)
    # never shrink when some canvas holds the whole picture
    if any(a * tile >= width and b * tile >= height for a, b in tile_arrangements(chunks)):
        assert cw >= width and ch >= height
    new_w, new_h = resized_size(width, height, cw, ch, tile)
    assert 1 <= new_w <= cw and 1 <= new_h <= ch
    # no distortion: one side is the limit, the other is the picture's aspect ratio rounded down (or 1).
    # Meta rounds through a float product (width * (th / height)) and can lose one more pixel: 95 x 95 on
    # 14-pixel tiles becomes 13 x 14.
    tw, th = min(max(width, tile), cw), min(max(height, tile), ch)
    if new_h == th:
        assert max(width * th // height - 1, 1) <= new_w <= max(width * th // height, 1)
    else:
        assert new_w == tw
        assert max(height * tw // width - 1, 1) <= new_h <= max(height * tw // width, 1)
    # upscaling stops at one tile side
    if width <= tile and height <= tile:
        assert max(new_w, new_h) <= tile


# Hypothesis' own work per example (~15 ms on 2 shared cores: 4.7 s for 300) dwarfs the checks' (<0.1 ms): the
# fast tier draws 60 examples, the full suite 300 more.
@settings(max_examples=60, deadline=None)
@given(sizes, sizes, settings_)
def test_arrangement_properties(width, height, setting):
    check_arrangement(width, height, setting)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(sizes, sizes, settings_)
def test_arrangement_properties_many(width, height, setting):
    check_arrangement(width, height, setting)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.sampled_from([(16, 4), (28, 6), (40, 2)]))
def test_tiles_are_the_canvas_cut_row_by_row(width, height, setting):
    """Put back together, the tiles are the normalised canvas: the picture top left, black padding after."""
    tile, chunks = setting
    rng = np.random.default_rng(width * 1000 + height)
    out = preprocess_image(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), tile_size=tile,
                           max_num_chunks=chunks)
    h_tiles, w_tiles = out.aspect_ratio
    canvas = out.tiles.reshape(h_tiles, w_tiles, 3, tile, tile).transpose(2, 0, 3, 1, 4)
    canvas = canvas.reshape(3, h_tiles * tile, w_tiles * tile)                             # [3, H, W]
    black = (0 - np.array([0.48145466, 0.4578275, 0.40821073], np.float32)) / np.array(
        [0.26862954, 0.26130258, 0.27577711], np.float32)
    new_w, new_h = out.resized
    pad = canvas.copy()
    pad[:, :new_h, :new_w] = black[:, None, None]
    np.testing.assert_array_equal(pad, np.broadcast_to(black[:, None, None], pad.shape))
    assert out.num_tiles == h_tiles * w_tiles == out.tiles.shape[0]


# ---- inputs ------------------------------------------------------------------------------------------------

def test_path_pil_and_array_give_the_same_tiles():
    path = IMAGES / "chelsea.png"
    img = Image.open(path)
    arr = np.asarray(img.convert("RGB"))
    a = preprocess_image(path, tile_size=112, max_num_chunks=4)
    b = preprocess_image(img, tile_size=112, max_num_chunks=4)
    c = preprocess_image(arr, tile_size=112, max_num_chunks=4)
    d = preprocess_image(str(path), tile_size=112, max_num_chunks=4)
    for x in (b, c, d):
        np.testing.assert_array_equal(a.tiles, x.tiles)


def test_arrays_of_grey_and_rgba_convert_as_meta():
    grey = np.asarray(Image.open(IMAGES / "camera_grey.png"))
    assert grey.ndim == 2
    np.testing.assert_array_equal(np.asarray(load_image(grey)), np.repeat(grey[..., None], 3, axis=2))
    np.testing.assert_array_equal(np.asarray(load_image(grey[..., None])), np.asarray(load_image(grey)))
    rgba = np.asarray(Image.open(IMAGES / "coffee_rgba.png"))
    assert rgba.shape[2] == 4 and rgba[..., 3].min() == 0
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), rgba[..., :3])  # alpha dropped


@pytest.mark.parametrize("mode", ["1", "L", "P", "CMYK", "YCbCr", "HSV", "I", "F", "LA", "PA", "RGBX", "I;16"])
def test_every_pillow_mode_converts_as_metas(mode):
    img = Image.new(mode, (5, 4)) if mode in ("HSV", "PA", "I;16") else Image.open(IMAGES / "chelsea.png").convert(mode)
    out = load_image(img)
    assert out.mode == "RGB" and out.size == img.size
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img.convert("RGB")))  # Meta's conversion


def test_unconvertible_mode_is_named():
    with pytest.raises(ImageError, match="my picture: Pillow cannot convert its La pixels to RGB"):
        load_image(Image.new("La", (3, 3)), name="my picture")


def test_padded_tiles_and_mask():
    out = preprocess_image(IMAGES / "coffee.jpg", tile_size=32, max_num_chunks=8)
    tiles, mask = out.padded()
    assert tiles.shape == (8, 3, 32, 32) and mask.shape == (8,)
    assert mask.tolist() == [1] * out.num_tiles + [0] * (8 - out.num_tiles)
    np.testing.assert_array_equal(tiles[:out.num_tiles], out.tiles)
    tiles12, mask12 = out.padded(12)
    assert tiles12.shape[0] == 12 and mask12.sum() == out.num_tiles
    with pytest.raises(ImageError, match="max_num_chunks=2"):
        out.padded(2)
    assert isinstance(out, ImageTiles)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8),
                                 np.zeros((2, 4, 4, 3), np.uint8), np.zeros((0, 4, 3), np.uint8), 3.5])
def test_bad_in_memory_images_are_refused(bad):
    with pytest.raises(ImageError, match="photo"):
        load_image(bad, name="photo")


# ---- bad files ---------------------------------------------------------------------------------------------

def raises_naming(path: Path, match: str):
    with pytest.raises(ImageError) as e:
        preprocess_image(path, tile_size=32, max_num_chunks=4)
    assert str(path) in str(e.value) and isinstance(e.value, LlamaRefError)
    assert e.match(match)


def test_missing_file_and_directory(tmp_path):
    raises_naming(tmp_path / "nope.png", "cannot read")
    raises_naming(tmp_path, "directory")


def test_empty_and_non_image_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    raises_naming(tmp_path / "empty.jpg", "empty")
    (tmp_path / "notes.png").write_text("these are not pixels\n" * 20)
    raises_naming(tmp_path / "notes.png", "not an image")


@pytest.mark.parametrize("name", ["chelsea.png", "coffee.jpg", "rocket_tall.jpg", "grey16.png"])
@pytest.mark.parametrize("keep", [0.3, 0.9])
def test_truncated_files(tmp_path, name, keep):
    data = (IMAGES / name).read_bytes()
    bad = tmp_path / f"cut_{name}"
    bad.write_bytes(data[:int(len(data) * keep)])
    raises_naming(bad, "truncated|corrupt")


def test_truncated_pil_image_opened_by_the_caller(tmp_path):
    """A PIL image the caller opened lazily is decoded here: a truncated one names its file."""
    bad = tmp_path / "cut.jpg"
    bad.write_bytes((IMAGES / "coffee.jpg").read_bytes()[:5000])
    with pytest.raises(ImageError, match="cut.jpg: corrupt or truncated"):
        preprocess_image(Image.open(bad), tile_size=32, max_num_chunks=4)


def test_corrupt_png_stream(tmp_path):
    data = bytearray((IMAGES / "chelsea.png").read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 10:start + 200] = bytes(190)  # zeros inside the deflate stream
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(bytes(data))
    raises_naming(bad, "corrupt|truncated")


def test_decompression_bomb_costs_nothing(tmp_path):
    """A PNG header claiming 100000 x 100000 pixels (30 GB decoded) is refused from its header."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    body = zlib.compress(b"\x00" * 1000)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    raises_naming(bomb, "too large")
    # below Pillow's own cap, above ours: refused from the header all the same
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    raises_naming(bomb, "9000 x 9000 = 81000000 pixels, more than")
    # the cap is an argument
    with pytest.raises(ImageError, match="more than the 100"):
        load_image(IMAGES / "chelsea.png", max_pixels=100)


def test_formats_needing_external_programs_are_refused(tmp_path):
    eps = tmp_path / "picture.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    raises_naming(eps, "not an image")


def test_too_many_images():
    check_image_count(1, 1)
    with pytest.raises(ImageError, match="3 images given, the model takes at most 2"):
        check_image_count(3, 2, what="chat message 2")


@pytest.mark.parametrize("tile, chunks", [(0, 4), (28, 0), (28, 65), (20000, 1), (4096, 8)])
def test_bad_settings(tile, chunks):
    with pytest.raises(ImageError, match="tile_size"):
        preprocess_image(IMAGES / "one_pixel.png", tile_size=tile, max_num_chunks=chunks)


def test_animated_gif_reads_its_first_frame():
    first = np.asarray(Image.open(IMAGES / "palette_anim.gif").convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(IMAGES / "palette_anim.gif")), first)


SMALL_FILES = ["one_pixel.png", "palette.png", "grey_alpha.png", "palette_anim.gif", "tall_9x1500.png",
               "rocket_tall.jpg", "grey16.png"]


DAMAGE = (st.sampled_from(SMALL_FILES), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                                min_size=1, max_size=8), st.floats(0.05, 1))


def check_damaged_file(tmp_path_factory, name: str, flips: list, keep: float) -> None:
    """Bytes changed anywhere and the end cut off: either a picture comes back or an ImageError naming the file,
    never another exception (a corrupt chunk, a bad palette index, a decoder's own complaint)."""
    data = bytearray((IMAGES / name).read_bytes())
    for where, value in flips:
        data[int(where * len(data))] = value
    path = tmp_path_factory.mktemp("damaged") / name
    path.write_bytes(bytes(data[:max(1, int(len(data) * keep))]))
    try:
        img = load_image(path)
    except ImageError as e:
        assert str(path) in str(e)
    else:
        assert img.mode == "RGB" and img.size[0] * img.size[1] >= 1


# ~25 ms an example on 2 shared cores (a file written and decoded; 3.8 s for 150): the fast tier draws 40, the full
# suite 150 more.
@settings(max_examples=40, deadline=None)
@given(*DAMAGE)
def test_damaged_files_give_image_errors_or_images(tmp_path_factory, name, flips, keep):
    check_damaged_file(tmp_path_factory, name, flips, keep)


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(*DAMAGE)
def test_damaged_files_give_image_errors_or_images_many(tmp_path_factory, name, flips, keep):
    check_damaged_file(tmp_path_factory, name, flips, keep)
