"""From a picture to the tiles Llama 3.2 Vision reads, as Meta's reference does it.

Meta's llama-models, models/llama3/multimodal/image_transform.py (VariableSizeImageTransform), in six steps:

1. list every tile arrangement (w_tiles, h_tiles) with at most `max_num_chunks` tiles;
2. pick the canvas (w_tiles * tile_size, h_tiles * tile_size) the image fits best: the smallest upscale if
   any canvas needs no downscaling, else the least downscaling; ties go to the smallest canvas;
3. resize without distortion to fit that canvas (Pillow, bilinear with its antialiasing), upscaling only as
   far as one tile side;
4. pad right and bottom with black to the whole canvas;
5. scale to [0, 1] and normalise with CLIP's mean and standard deviation;
6. cut the canvas into tiles, row by row.

The result is bit for bit Meta's (float32, the same operations in the same order; tests/test_vision_preprocess.py
checks checksums of Meta's and Hugging Face's outputs). Two places differ from Meta on purpose, where Meta's
code fails or where it decides nothing:
- an image so wide (or tall) that its short side would round to 0 pixels is given 1 pixel, as Hugging Face's
  MllamaImageProcessor does (Meta's code asks Pillow for a 0-pixel image and raises);
- decoding: `load_image` only opens common raster formats and refuses images above MAX_PIXELS before
  decoding them.
EXIF orientation tags are not applied (neither reference applies them: a phone photo stored sideways reaches
the model sideways). Colour conversion is Meta's `image.convert("RGB")` (models/llama3/chat_format.py): an
alpha channel is dropped, not composited. Hugging Face's processor composites RGBA onto white instead, so for
images with transparency the two references differ and this module follows Meta.

The comparison with Hugging Face is with transformers' Pillow processor (MllamaImageProcessorPil, used when
torchvision is absent). Its torchvision-backed MllamaImageProcessor resizes with torch's antialiased bilinear
instead and rescales and normalises in one step: measured on the test photographs (transformers 5.24, torch
2.13) it is up to 2.4e-7 away everywhere (float rounding) and one uint8 level (0.0150 after normalisation) away
on up to 0.21% of the values of a resized image; the tile arrangement, ids and masks are the same.

Aspect-ratio ids are numbered as Hugging Face's Mllama numbers them (1-based, 0 for a missing image), which is
how its checkpoints index their tile-position embeddings; Meta's model takes (h_tiles, w_tiles) directly.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from ..errors import LlamaRefError

# CLIP's normalisation, as Meta's transform (and Llama 3.2 Vision's preprocessor_config.json) give it.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# Decoding a file whose header claims more pixels than this is refused before any pixel is decoded, so a
# "decompression bomb" (a few KB of PNG that inflates to gigabytes) costs nothing. 64 Mpixel is an 8192 x 8192
# image, well above any camera photo's use here: the largest canvas of Llama 3.2 Vision is 2240 x 2240.
MAX_PIXELS = 1 << 26

# The most tiles an image may be cut into (the released models take 4); bounds the arrangement search.
MAX_CHUNKS = 64

# Formats Pillow opens itself. Others it knows (EPS needs Ghostscript, an external program) are refused.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM", "ICO", "TGA")

ImageSource = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray]  # noqa: F821


class ImageError(LlamaRefError, ValueError):
    """An image that cannot be read or used: the message names the file or argument."""


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # Pillow is a dependency; this only happens in a broken install
        raise ImageError("reading images needs Pillow: pip install Pillow") from e
    return Image


# ---- decoding ----------------------------------------------------------------------------------------------

def load_image(src: ImageSource, *, max_pixels: int = MAX_PIXELS, name: str = "image"):
    """An RGB PIL.Image from a file path, a PIL.Image or a uint8 array ([H, W], [H, W, 1|3|4]).

    Colours convert as Meta's chat format does: `Image.convert("RGB")` (grey spreads to three channels,
    a palette is looked up, alpha is dropped, 16-bit grey is clipped to 255). Errors name the file (or
    `name` for an in-memory image)."""
    Image = _pil()
    if isinstance(src, (str, os.PathLike)):
        return _decode_file(Path(src), max_pixels)
    if isinstance(src, Image.Image):
        name = getattr(src, "filename", "") or name  # an image opened from a file and not yet decoded
        _check_pixels(src.size, max_pixels, name)
        try:
            src.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})") from e
        return _to_rgb(src, name)
    if isinstance(src, np.ndarray):
        return _from_array(src, max_pixels, name)
    raise ImageError(f"{name}: expected a file path, a PIL.Image or a numpy array, got {type(src).__name__}")


def _to_rgb(im, name: str):
    """Meta's image.convert("RGB"); the few modes Pillow cannot convert (premultiplied "La") are named."""
    if im.mode == "RGB":
        return im
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise ImageError(f"{name}: Pillow cannot convert its {im.mode} pixels to RGB ({e})") from e


def _check_pixels(size: tuple[int, int], max_pixels: int, name: str) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{name}: image has no pixels ({w} x {h})")
    if w * h > max_pixels:
        raise ImageError(f"{name}: image is {w} x {h} = {w * h} pixels, more than the {max_pixels} this reads "
                         "(max_pixels=...); shrink it first")


def _decode_file(path: Path, max_pixels: int):
    Image = _pil()
    if path.is_dir():
        raise ImageError(f"{path}: is a directory, not an image file")
    try:
        f = open(path, "rb")  # read by Pillow as it decodes: a huge file is not loaded whole
    except OSError as e:
        raise ImageError(f"{path}: cannot read image file: {e.strerror or e}") from e
    try:
        with f:
            if not f.read(1):
                raise ImageError(f"{path}: empty file, not an image")
            f.seek(0)
            # Image.open reads only the header: the size check below comes before any pixel is decoded.
            # Pillow's own warning for big headers is ours to give (MAX_PIXELS is below its threshold).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                im = Image.open(f, formats=FORMATS)
            with im:
                _check_pixels(im.size, max_pixels, str(path))
                im.load()  # decode now, inside the try: a truncated file fails here
                return _to_rgb(im, str(path))
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own cap, checked in Image.open for huge headers
        raise ImageError(f"{path}: image too large to decode safely, more than {max_pixels} pixels ({e})") from e
    except Image.UnidentifiedImageError as e:
        raise ImageError(f"{path}: not an image Pillow can read (formats read: {', '.join(FORMATS)})") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        # Pillow reports a truncated or corrupt stream as OSError ("image file is truncated"), SyntaxError
        # (bad chunk) or ValueError / EOFError from a decoder.
        raise ImageError(f"{path}: corrupt or truncated image ({type(e).__name__}: {e})") from e


def _from_array(a: np.ndarray, max_pixels: int, name: str):
    Image = _pil()
    if a.dtype != np.uint8:
        raise ImageError(f"{name}: image arrays must be uint8 (0-255), got {a.dtype}; for floats in [0, 1] "
                         "pass (a * 255).round().astype(np.uint8)")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"{name}: image arrays are [H, W] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA); "
                         f"got shape {a.shape}")
    _check_pixels((a.shape[1], a.shape[0]), max_pixels, name)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(a)), name)  # uint8 [H, W] / [..., 3] / [..., 4]: L, RGB, RGBA


def check_image_count(n: int, max_images: int, what: str = "prompt") -> None:
    """Refuse more images than a model takes (Meta recommends one image per prompt)."""
    if n > max_images:
        raise ImageError(f"{what}: {n} images given, the model takes at most {max_images}")


# ---- the tile arrangement ----------------------------------------------------------------------------------

def tile_arrangements(max_num_chunks: int) -> list[tuple[int, int]]:
    """Every (w_tiles, h_tiles) with w_tiles * h_tiles <= max_num_chunks, in the order Meta's
    find_supported_resolutions lists them (it decides ties between equally good canvases): by tile count from
    the most, grouped by the ratio first met."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for n in range(max_num_chunks, 0, -1):
        for a in sorted(d for d in range(1, n + 1) if n % d == 0):
            by_ratio.setdefault(a / (n // a), []).append((a, n // a))
    return [pair for pairs in by_ratio.values() for pair in pairs]


def best_arrangement(width: int, height: int, *, tile_size: int, max_num_chunks: int) -> tuple[int, int]:
    """(w_tiles, h_tiles) of the canvas Meta's get_best_fit chooses for a width x height image.

    Scale factors are float32, as Meta computes them (an int64 tensor divided by an int): the equality test
    that gathers tied canvases must see the same numbers."""
    arrangements = np.array(tile_arrangements(max_num_chunks), dtype=np.int64)  # [K, 2] (w_tiles, h_tiles)
    canvas = arrangements * tile_size                                            # [K, 2] pixels
    scale_w = canvas[:, 0].astype(np.float32) / np.float32(width)                # [K]
    scale_h = canvas[:, 1].astype(np.float32) / np.float32(height)               # [K]
    scales = np.where(scale_w > scale_h, scale_h, scale_w)  # the limiting side: no distortion
    upscales = scales[scales >= 1]
    # Smallest upscale if any canvas holds the whole image, else the least downscaling.
    chosen = upscales.min() if upscales.size else scales[scales < 1].max()
    tied = canvas[scales == chosen]                          # [T, 2]
    best = tied[np.argmin(tied[:, 0] * tied[:, 1])]          # least padding; first in Meta's order on a tie
    return int(best[0]) // tile_size, int(best[1]) // tile_size


def resized_size(width: int, height: int, canvas_w: int, canvas_h: int, tile_size: int) -> tuple[int, int]:
    """(new_width, new_height): the largest size within the canvas with the image's aspect ratio, upscaling at
    most to one tile side (Meta's resize_without_distortion with max_upscaling_size = tile_size)."""
    target_w = min(max(width, tile_size), canvas_w)
    target_h = min(max(height, tile_size), canvas_h)
    scale_w, scale_h = target_w / width, target_h / height  # Python floats, as Meta's
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.floor(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.floor(width * scale_h), target_w), target_h
    # Meta's code would ask for 0 pixels here and fail; Hugging Face keeps 1.
    return max(new_w, 1), max(new_h, 1)


def aspect_ratio_id(h_tiles: int, w_tiles: int, max_num_chunks: int) -> int:
    """Hugging Face Mllama's id of an arrangement: 1 + its index in [(h, w) for h in 1.. for w in 1..
    with h * w <= max_num_chunks]; 0 is kept for "no image"."""
    pairs = [(h, w) for h in range(1, max_num_chunks + 1) for w in range(1, max_num_chunks + 1)
             if h * w <= max_num_chunks]
    return pairs.index((h_tiles, w_tiles)) + 1


# ---- the whole transform -----------------------------------------------------------------------------------

@dataclass
class ImageTiles:
    """One image, ready for the vision encoder.

    tiles            float32 [num_tiles, 3, tile_size, tile_size], row by row across the canvas
    aspect_ratio     (h_tiles, w_tiles), as Meta's transform returns it
    aspect_ratio_id  Hugging Face's number for that arrangement (see aspect_ratio_id)
    num_tiles        h_tiles * w_tiles
    max_num_chunks   the most tiles the model takes (the length `padded` pads to)
    resized          (width, height) of the picture on the canvas, before padding
    """
    tiles: np.ndarray
    aspect_ratio: tuple[int, int]
    aspect_ratio_id: int
    num_tiles: int
    max_num_chunks: int
    resized: tuple[int, int]

    def padded(self, max_num_chunks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(tiles [max_num_chunks, 3, T, T] with zero tiles after the real ones, mask [max_num_chunks] int64: 1
        for a real tile). Meta's _stack_images pads with zeros the same way; the mask is Hugging Face's
        aspect_ratio_mask."""
        m = self.max_num_chunks if max_num_chunks is None else max_num_chunks
        if m < self.num_tiles:
            raise ImageError(f"max_num_chunks={m} is less than this image's {self.num_tiles} tiles")
        out = np.zeros((m,) + self.tiles.shape[1:], dtype=np.float32)  # [M, 3, T, T]
        out[:self.num_tiles] = self.tiles
        mask = np.zeros(m, dtype=np.int64)
        mask[:self.num_tiles] = 1
        return out, mask


def preprocess_image(image: ImageSource, *, tile_size: int, max_num_chunks: int,
                     name: str = "image") -> ImageTiles:
    """Meta's VariableSizeImageTransform(size=tile_size)(image, max_num_chunks), as NumPy."""
    if not (1 <= tile_size and 1 <= max_num_chunks <= MAX_CHUNKS and tile_size ** 2 * max_num_chunks <= MAX_PIXELS):
        # Bounds on what a config can ask for: the released models use 560-pixel tiles, at most 4 of them.
        raise ImageError(f"tile_size ({tile_size}) and max_num_chunks ({max_num_chunks}) must be positive, with "
                         f"at most {MAX_CHUNKS} tiles and {MAX_PIXELS} pixels on the largest canvas")
    Image = _pil()
    img = load_image(image, name=name)                        # RGB, width x height
    width, height = img.size

    # 1-2. The canvas: w_tiles x h_tiles tiles.
    w_tiles, h_tiles = best_arrangement(width, height, tile_size=tile_size, max_num_chunks=max_num_chunks)
    canvas_w, canvas_h = w_tiles * tile_size, h_tiles * tile_size

    # 3. Resize without distortion. torchvision's resize of a PIL image is Pillow's bilinear filter (which
    #    widens its support when shrinking: antialiased); it leaves an image of the right size untouched.
    new_w, new_h = resized_size(width, height, canvas_w, canvas_h, tile_size)
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.BILINEAR)

    # 4. Pad with black, right and bottom.
    pixels = np.zeros((canvas_h, canvas_w, 3), dtype=np.uint8)  # [H, W, 3]
    pixels[:new_h, :new_w] = np.asarray(img, dtype=np.uint8)

    # 5. To [0, 1], then normalise per channel; float32 throughout, as torchvision's ToTensor and Normalize.
    x = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)      # [3, H, W]
    x = (x - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]

    # 6. Tiles, row by row: [3, h, T, w, T] -> [h, w, 3, T, T] -> [h * w, 3, T, T].
    x = x.reshape(3, h_tiles, tile_size, w_tiles, tile_size).transpose(1, 3, 0, 2, 4)
    tiles = np.ascontiguousarray(x.reshape(h_tiles * w_tiles, 3, tile_size, tile_size))

    return ImageTiles(tiles=tiles, aspect_ratio=(h_tiles, w_tiles),
                      aspect_ratio_id=aspect_ratio_id(h_tiles, w_tiles, max_num_chunks),
                      num_tiles=h_tiles * w_tiles, max_num_chunks=max_num_chunks, resized=(new_w, new_h))
