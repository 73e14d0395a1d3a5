"""GGUF files (llama.cpp's format): the header read and checked here, the tensors dequantized by `gguf`.

llama.cpp's converter permutes the q/k rows of Hugging Face checkpoints back into Meta's interleaved-pair
order before writing GGUF, so GGUF tensors are already in our canonical layout: only names change.
"""

from __future__ import annotations

import math
import mmap
import os
from pathlib import Path

import numpy as np

from ..model.config import ConfigError, from_gguf_metadata
from .common import WeightsError, check_weights, pread_into
from .packed import from_gguf_tensor as packed_from_gguf_tensor

# GGUF tensor name -> canonical (Meta) name. "{i}" is the layer index.
GGUF_TO_META = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.attention_norm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.attention.wq.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.attention.wk.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.attention.wv.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.attention.wo.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.ffn_norm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.feed_forward.w1.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.feed_forward.w2.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.feed_forward.w3.weight",
}
META_TO_GGUF = {v: k for k, v in GGUF_TO_META.items()}


def gguf_name_to_meta(name: str) -> "str | None":
    parts = name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3:
        _, idx, rest = parts
        template = GGUF_TO_META.get(f"blk.{{i}}.{rest}")
        return template.format(i=idx) if template else None
    return GGUF_TO_META.get(name)


# ---- reading a GGUF file's header ----------------------------------------------------------------------------
#
# The layout (little-endian): b"GGUF", u32 version (2 or 3), u64 tensor count, u64 key count; the metadata as
# (string key, u32 value type, value) with strings as (u64 length, UTF-8 bytes) and arrays as (u32 item type,
# u64 count, items); then per tensor (string name, u32 n_dims, u64 dims[n_dims] fastest axis first, u32 ggml
# type, u64 offset into the data section); padding to general.alignment; the data section.
#
# The header is read here rather than by gguf.GGUFReader because every count in it is untrusted: that
# reader walks a claimed 2^60-element array item by item, and accepts tensor offsets that alias another
# tensor. Here each count is checked against the bytes left in the file before any loop, each tensor's size
# against the data section, and the tensors' layout against llama.cpp's rule (back to back, in order), so a
# damaged or hostile file costs at most one pass over its own bytes and cannot load as other weights.
# The values are handed over as stored; whether they make a sensible config is config.py's question.

GGUF_MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS: ggml tensors have at most four axes
DEFAULT_ALIGNMENT = 32
STRING, ARRAY = 8, 9  # the two GGUF value types that are not fixed-size scalars
# Fixed-size value types -> little-endian numpy dtype (gguf.GGUFValueType numbering).
SCALAR_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",  # 7: bool
                 10: "<u8", 11: "<i8", 12: "<f8"}
BOOL = 7
# The fewest bytes a key/value pair and a tensor description can take: what each claimed count must leave room
# for before it is looped over.
MIN_KV_BYTES = 8 + 4 + 1  # an empty key, the value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # an empty name, n_dims = 0, the ggml type, the offset
# ggml types gguf.GGUFReader shows as typed arrays; every other type is shown as raw block bytes.
ELEMENT_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


class GGUFFile:
    """A GGUF file's header, checked against the file's size: `metadata` as plain Python values, and
    `tensors` as gguf.ReaderTensor tuples (name, tensor_type, shape, n_elements, n_bytes, data_offset, data)
    whose data are views of the file's read-only memory map. `field` is None: no caller needs gguf's parts."""

    def __init__(self, path: Path, version: int, alignment: int, data_offset: int, metadata: dict, tensors: list,
                 buf: "np.memmap | None" = None):
        self.path, self.version, self.alignment, self.data_offset = path, version, alignment, data_offset
        self.metadata, self.tensors, self._buf = metadata, tensors, buf

    def release(self, tensor) -> None:
        """Let go of the map's pages under a tensor that has been copied out (the file stays in the page cache).
        Without it every page read through the map counts in this process's memory until the map closes: a load
        that copies each tensor into its own layout peaked at twice the file (1B Q8_0: 2.7 GB for 1.3 GB).
        Harmless if something still views those bytes: a read-only map reads them back from the file."""
        m = getattr(self._buf, "_mmap", None)
        if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        first = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        m.madvise(mmap.MADV_DONTNEED, first, tensor.data_offset + tensor.n_bytes - first)


class _Cursor:
    """Reads the header front to back, refusing any read that would run past the end of the file."""

    def __init__(self, buf: np.ndarray, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, message: str) -> "WeightsError":
        return WeightsError(f"{self.path}: damaged GGUF file: {message}")

    def need(self, n: int, what: str) -> None:
        """n more bytes must be in the file: checked before reading them, or before a loop over a count."""
        left = self.buf.size - self.pos
        if n > left:
            raise self.fail(f"{what}: {n} bytes needed at offset {self.pos}, the file has {left} left")

    def take(self, n: int, what: str) -> np.ndarray:
        self.need(n, what)
        self.pos += n
        return self.buf[self.pos - n:self.pos]

    def number(self, dtype: str, what: str):
        raw = self.take(np.dtype(dtype).itemsize, what)
        return raw.view(dtype)[0].item()

    def string(self, what: str) -> str:
        n = self.number("<u8", f"the length of {what}")
        raw = self.take(n, what)
        try:
            return raw.tobytes().decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None


def _read_value(cur: _Cursor, vtype: int, key: str):
    """One metadata value as a Python value (int, float, bool, str, or a list of one of those)."""
    if vtype == STRING:
        return cur.string(f"the value of {key}")
    if vtype in SCALAR_DTYPES:
        return _scalars(cur, vtype, 1, key)[0]
    if vtype != ARRAY:
        raise cur.fail(f"metadata key {key} has unknown value type {vtype}")
    item_type = cur.number("<u4", f"the item type of {key}")
    count = cur.number("<u8", f"the length of {key}")
    if item_type == STRING:
        cur.need(count * 8, f"{key}, an array of {count} strings")  # each string has at least its length
        return _strings(cur, count, key)
    if item_type not in SCALAR_DTYPES:  # arrays of arrays included: llama.cpp does not read them either
        raise cur.fail(f"metadata key {key} is an array of unsupported item type {item_type}")
    return _scalars(cur, item_type, count, key)


def _strings(cur: _Cursor, count: int, key: str) -> list:
    """count strings, with cur.string's checks and messages, read from the bytes directly: a NumPy view and two
    messages per item made a Llama 3 vocabulary (128k tokens, 280k merges) take seconds to read."""
    buf, end, pos = memoryview(cur.buf), cur.buf.size, cur.pos
    out = []
    for i in range(count):
        n = int.from_bytes(buf[pos:pos + 8], "little") if end - pos >= 8 else None
        if n is None or n > end - pos - 8:
            cur.pos = pos
            cur.string(f"item {i} of {key}")  # raises cur's message for the read that fails
        try:
            out.append(str(buf[pos + 8:pos + 8 + n], "utf-8"))
        except UnicodeDecodeError:
            raise cur.fail(f"item {i} of {key} is not valid UTF-8") from None
        pos += 8 + n
    cur.pos = pos
    return out


def _scalars(cur: _Cursor, vtype: int, count: int, key: str) -> list:
    dtype = np.dtype(SCALAR_DTYPES[vtype])
    values = cur.take(count * dtype.itemsize, f"the value of {key}").view(dtype)
    if vtype == BOOL:
        if np.any(values > 1):
            raise cur.fail(f"metadata key {key} holds a bool that is neither 0 nor 1")
        return values.astype(bool).tolist()
    return values.tolist()


def _read_metadata(cur: _Cursor, count: int) -> dict:
    metadata = {}
    for i in range(count):
        key = cur.string(f"metadata key {i}")
        if key in metadata:
            raise cur.fail(f"metadata key {key} appears twice")
        metadata[key] = _read_value(cur, cur.number("<u4", f"the value type of {key}"), key)
    return metadata


def _read_tensor_info(cur: _Cursor, i: int) -> tuple:
    """(name, dims fastest axis first, raw ggml type, offset into the data section) of one tensor."""
    name = cur.string(f"the name of tensor {i}")
    n_dims = cur.number("<u4", f"tensor {name}: its number of dimensions")
    if n_dims > MAX_DIMS:
        raise cur.fail(f"tensor {name} claims {n_dims} dimensions (at most {MAX_DIMS})")
    dims = cur.take(8 * n_dims, f"tensor {name}: its dimensions").view("<u8").tolist()
    ggml_type = cur.number("<u4", f"tensor {name}: its type")
    offset = cur.number("<u8", f"tensor {name}: its offset")
    return name, dims, ggml_type, offset


def _alignment(cur: _Cursor, metadata: dict) -> int:
    """general.alignment: the tensor data alignment, a power of two (32 when the key is absent)."""
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment < 1 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment is {alignment!r}, not a power of two")
    return alignment


def _tensor(cur: _Cursor, info: tuple, data_offset: int, alignment: int):
    """A gguf.ReaderTensor viewing its bytes in the map, once its type, size and offset are checked."""
    import gguf

    name, dims, raw_type, offset = info
    try:
        ggml_type = gguf.GGMLQuantizationType(raw_type)
        block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name} has unknown ggml type {raw_type}") from None
    if any(d < 1 for d in dims):
        raise cur.fail(f"tensor {name} has shape {dims}: every dimension must be at least 1")
    if dims and dims[0] % block_size:
        raise cur.fail(f"tensor {name}: rows of {dims[0]} values do not split into {ggml_type.name} blocks "
                       f"of {block_size}")
    n_elements = math.prod(dims)  # Python ints: a product past 2^64 stays large instead of wrapping
    n_bytes = n_elements // block_size * type_size
    data_size = cur.buf.size - data_offset
    if offset % alignment:
        raise cur.fail(f"tensor {name}: offset {offset} is not a multiple of the alignment {alignment}")
    if n_bytes > data_size or offset > data_size - n_bytes:
        raise cur.fail(f"tensor {name}: {n_bytes} bytes at offset {offset} run past the end of the data "
                       f"section ({data_size} bytes; truncated file?)")
    start = data_offset + offset
    shape = tuple(reversed(dims))  # numpy order: slowest axis first
    raw = cur.buf[start:start + n_bytes]
    if ggml_type.name in ELEMENT_DTYPES:
        data = raw.view(ELEMENT_DTYPES[ggml_type.name]).reshape(shape)
    else:  # quantized (and BF16): the block bytes of each row, as gguf.GGUFReader shows them
        data = raw.reshape(gguf.quants.quant_shape_to_byte_shape(shape, ggml_type))
    return gguf.ReaderTensor(name=name, tensor_type=ggml_type, shape=np.array(dims, dtype=np.uint64),
                             n_elements=n_elements, n_bytes=n_bytes, data_offset=start, data=data, field=None)


def _check_layout(cur: _Cursor, tensors: list, data_offset: int, alignment: int) -> None:
    """The tensors lie back to back in the order the header lists them, each at the end of the one before
    rounded up to the alignment, and the file ends with the last one: llama.cpp refuses any other layout.
    A damaged offset, type or shape moves a tensor's start or changes its length, so it cannot go unnoticed
    by aliasing another tensor's bytes or by leaving bytes that nothing reads."""
    expected = 0  # where the next tensor must start, from the start of the data section
    for i, t in enumerate(tensors):
        offset = t.data_offset - data_offset
        if offset < expected:
            other = next((u.name for u in tensors[:i] if u.data_offset < t.data_offset + t.n_bytes
                          and t.data_offset < u.data_offset + u.n_bytes), tensors[i - 1].name)
            raise cur.fail(f"tensors {other} and {t.name} overlap in the data section")
        if offset > expected:
            raise cur.fail(f"tensor {t.name} starts at offset {offset}, {offset - expected} bytes after the end "
                           f"of the tensor before it (tensors must follow each other)")
        expected = -(-(offset + t.n_bytes) // alignment) * alignment
    unused = cur.buf.size - data_offset - expected
    if tensors and unused > 0:
        raise cur.fail(f"{unused} bytes at the end of the file follow the last tensor, {tensors[-1].name}")


def _read_gguf(path: Path, buf: np.ndarray) -> GGUFFile:
    cur = _Cursor(buf, path)
    cur.take(4, "the magic")  # checked by the caller
    version = cur.number("<u4", "the version")
    if version not in (2, 3):
        endian = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise cur.fail(f"GGUF version {version} is not supported (2, 3){endian}")
    n_tensors = cur.number("<u8", "the tensor count")
    n_keys = cur.number("<u8", "the metadata key count")
    cur.need(n_keys * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES,
             f"{n_keys} metadata keys and {n_tensors} tensor descriptions")
    metadata = _read_metadata(cur, n_keys)
    infos, names = [], set()
    for i in range(n_tensors):
        infos.append(_read_tensor_info(cur, i))
        if infos[-1][0] in names:
            raise cur.fail(f"tensor {infos[-1][0]} appears twice")
        names.add(infos[-1][0])
    alignment = _alignment(cur, metadata)
    data_offset = -(-cur.pos // alignment) * alignment  # the header, padded to the alignment
    if data_offset > buf.size and infos:
        raise cur.fail(f"the data section would start at {data_offset}, past the end of the file ({buf.size})")
    tensors = [_tensor(cur, info, data_offset, alignment) for info in infos]
    _check_layout(cur, tensors, data_offset, alignment)
    return GGUFFile(path, version, alignment, data_offset, metadata, tensors, buf)


def open_gguf(path: "str | Path") -> GGUFFile:
    """A GGUF file's header and tensors, every structural fault reported as a WeightsError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise WeightsError(f"{path}: not a GGUF file (magic {magic!r})")
    size = os.path.getsize(path)
    if size < 4 + 4 + 8 + 8:
        raise WeightsError(f"{path}: damaged GGUF file: {size} bytes is too short for a GGUF header")
    return _read_gguf(path, np.memmap(path, dtype=np.uint8, mode="r"))


def gguf_metadata(reader: GGUFFile) -> dict:
    """Metadata as plain Python values (lists stay lists; tokenizer arrays included), as stored."""
    return dict(reader.metadata)


def dequantize(tensor) -> np.ndarray:
    """A GGUF tensor as float32, shaped (rows, cols) like the PyTorch weight it came from."""
    import gguf

    try:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise WeightsError(f"tensor {tensor.name}: GGUF type {tensor.tensor_type.name} is not supported") from None
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest axis first
    return np.asarray(data, dtype=np.float32).reshape(shape)


def _read_owned(path: Path, tensor):
    """The tensor with its data read (pread) into an owned array instead of viewed through the map."""
    data = np.empty(tensor.data.shape, tensor.data.dtype)
    pread_into(path, tensor.data_offset, data)
    data.flags.writeable = False
    return tensor._replace(data=data)


def load_gguf(path: "str | Path", progress: bool = False, packed: bool = False, mmap: bool = False):
    """Read a Llama GGUF file. Returns (args, weights, extras); extras holds metadata and rope divisors.

    packed: keep 16-bit and quantized matrices in their stored blocks (llama_ref.weights.packed) instead of
    dequantizing them to float32 here.
    mmap: let tensors kept as stored (F32, and F16/BF16 when packed) stay views of the file's memory map;
    by default they are read into memory the process owns (see llama_ref.load).
    """
    path = Path(path)
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    if meta.get("general.architecture") == "llama4":  # experts and llama.cpp's fixed values: gguf_llama4
        from .gguf_llama4 import load_llama4_gguf
        return load_llama4_gguf(path, reader, meta, progress=progress, packed=packed, mmap=mmap)
    names = {t.name for t in reader.tensors}
    try:
        args = from_gguf_metadata(meta, where=str(path), has_output_tensor="output.weight" in names)
    except ConfigError:
        raise
    weights: dict = {}
    freq_divisors = None
    tensors = reader.tensors
    if progress:
        from tqdm import tqdm
        tensors = tqdm(tensors, desc=f"loading {path.name}", unit="tensor", leave=False)
    for t in tensors:
        if t.name == "rope_freqs.weight":
            freq_divisors = dequantize(t).reshape(-1)  # (HD/2,) Llama 3.1 scaling, precomputed
            continue
        name = gguf_name_to_meta(t.name)
        if name is None:
            raise WeightsError(f"{path}: unexpected tensor {t.name} for a Llama model")
        if not mmap and t.tensor_type.name in ("F32", "F16", "BF16"):
            t = _read_owned(path, t)  # the kept array would otherwise be a view of the map
        kept = packed_from_gguf_tensor(t) if packed else None
        weights[name] = kept if kept is not None else dequantize(t)
        if not mmap:
            reader.release(t)
    if args.tie_word_embeddings:
        weights["output.weight"] = weights.get("tok_embeddings.weight")
    if "tok_embeddings.weight" not in weights:
        raise WeightsError(f"{path}: tensor token_embd.weight is missing")
    check_weights(args, weights, str(path))
    if freq_divisors is not None and freq_divisors.shape != (args.head_dim // 2,):
        raise WeightsError(f"{path}: rope_freqs has {freq_divisors.size} values, expected {args.head_dim // 2}")
    return args, weights, {"metadata": meta, "freq_divisors": freq_divisors, "format": "gguf"}
