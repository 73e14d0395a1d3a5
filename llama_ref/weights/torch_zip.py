"""PyTorch checkpoint files (torch.save's zip format) read without PyTorch, safely.

A .pth file is a zip archive holding `<prefix>/data.pkl` (a pickle of the state dict) and one entry
`<prefix>/data/<key>` of raw little-endian bytes per storage. Unpickling normally imports and calls
whatever the pickle names, which is how a hostile checkpoint runs code. Here the unpickler knows a fixed
list of globals (the ones a tensor state dict needs) and maps each to a harmless stand-in of our own;
anything else is refused when the pickle first names it, before any call happens.

Tensors come back lazy (`TorchTensor`): the storage bytes are read from the file only when asked, either as
an owned copy (`read`) or as a read-only memory map (`view`), so a loader decides what stays in memory.
"""

from __future__ import annotations

import io
import lzma
import math
import pickle
import pickletools
import reprlib
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import WeightsError, checked_shape, pread_into

# Storage classes torch.save names -> (numpy dtype of the raw elements, dtype name). bfloat16 is read as
# its raw uint16 bits (see weights.bf16).
STORAGE_DTYPES = {
    "BFloat16Storage": (np.dtype("<u2"), "bfloat16"),
    "HalfStorage": (np.dtype("<f2"), "float16"),
    "FloatStorage": (np.dtype("<f4"), "float32"),
}
# data.pkl holds one small record per tensor (~200 bytes): tens of KB for a real model, a few hundred KB
# for the ~1,100 tensors of Llama 3 405B. 64 MiB is a generous bound that still keeps a hostile archive
# from inflating an entry to GBs (a 4 MB file could otherwise make us inflate 4 GB).
MAX_PICKLE_BYTES = 64 * 2 ** 20
# ... and ~30 opcodes per tensor (~35K for Llama 3 405B). Bytes alone do not bound what unpickling allocates:
# one byte (EMPTY_LIST) makes a 56-byte object. Each opcode makes at most one object, so 2**20 of them
# bound the objects to ~100 MB, whatever the pickle is made of.
MAX_PICKLE_OPCODES = 2 ** 20


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for torch.BFloat16Storage & co: only remembers the element type."""
    torch_name: str


@dataclass(frozen=True)
class Storage:
    """One storage of the archive: raw elements at a byte offset of the .pth file."""
    path: Path
    key: str
    dtype: np.dtype
    dtype_name: str
    numel: int
    offset: int  # byte offset of the first element within the .pth file


@dataclass(frozen=True)
class TorchTensor:
    """A tensor of the checkpoint, not yet read: a strided window onto one storage."""
    storage: Storage
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype_name(self) -> str:
        return self.storage.dtype_name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def _is_contiguous(self) -> bool:
        expected, step = [], 1
        for n in reversed(self.shape):
            expected.append(step)
            step *= n
        return all(s == e or n == 1 for s, e, n in zip(self.stride, reversed(expected), self.shape))

    def read(self) -> np.ndarray:
        """An owned, C-contiguous copy of the tensor's elements (bf16 as uint16 bits)."""
        st, item = self.storage, self.storage.dtype.itemsize
        if self._is_contiguous():
            # The common case: read exactly the tensor's bytes, straight into the array that is kept.
            out = np.empty(self.shape, dtype=st.dtype)
            pread_into(st.path, st.offset + self.storage_offset * item, out)
            return out
        whole = np.empty(st.numel, dtype=st.dtype)
        pread_into(st.path, st.offset, whole)
        return self._strided(whole).copy()

    def view(self) -> np.ndarray:
        """A read-only memory map of the tensor (no copy when contiguous)."""
        st = self.storage
        if st.numel == 0:
            return np.empty(self.shape, dtype=st.dtype)  # nothing to map (and numpy cannot map 0 bytes)
        mm = np.memmap(st.path, dtype=st.dtype, mode="r", offset=st.offset, shape=(st.numel,))
        return self._strided(mm)

    def _strided(self, flat: np.ndarray) -> np.ndarray:
        item = flat.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            flat[self.storage_offset:], shape=self.shape, strides=tuple(s * item for s in self.stride),
            writeable=False)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a state dict; every global outside the allowed list is refused before it can run."""

    def __init__(self, file, path: Path, entries: dict):
        super().__init__(file)
        self.path = path
        self.entries = entries  # storage key -> (byte offset in the file, byte count), from the zip

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return _ordered_dict
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor_v2
        if module == "torch._utils" and name == "_rebuild_tensor":
            return self._rebuild_tensor
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name.endswith("Storage"):
            raise WeightsError(f"{self.path}: tensors of storage type torch.{name} are not supported "
                               f"(only {', '.join('torch.' + n for n in STORAGE_DTYPES)})")
        raise WeightsError(f"{self.path}: refused to unpickle: the file asks for {module}.{name}, which a "
                           f"tensor checkpoint never needs (a damaged or malicious file); nothing was run")

    def persistent_load(self, pid):
        # torch.save writes each storage as ('storage', storage_type, key, location, numel).
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise WeightsError(f"{self.path}: unexpected persistent id {reprlib.repr(pid)} in data.pkl")
        _, kind, key, _location, numel = pid
        entry = self.entries.get(key) if isinstance(key, str) else None
        if entry is None or type(numel) is not int:
            raise WeightsError(f"{self.path}: storage {reprlib.repr(key)} is referenced but missing from the "
                               f"archive, or has no element count")
        offset, nbytes = entry
        dtype, dtype_name = STORAGE_DTYPES[kind.torch_name]
        if nbytes != int(numel) * dtype.itemsize:
            raise WeightsError(f"{self.path}: storage {key} holds {nbytes} bytes, the pickle says "
                               f"{numel} x {dtype_name}")
        return Storage(self.path, str(key), dtype, dtype_name, int(numel), offset)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        return self._rebuild_tensor(storage, storage_offset, size, stride)

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        if not isinstance(storage, Storage):
            raise WeightsError(f"{self.path}: tensor without a storage in data.pkl")
        where, name = str(self.path), f"in storage {storage.key}"  # its name is not known yet
        size, stride = checked_shape(size, where, name, "size"), checked_shape(stride, where, name, "stride")
        if len(size) != len(stride) or type(storage_offset) is not int:
            raise WeightsError(f"{where}: malformed tensor {name} (size {size}, stride {stride}, offset "
                               f"{reprlib.repr(storage_offset)})")
        # A tensor never has more elements than its storage. Strides of 0 (broadcasting) could otherwise
        # make a few stored bytes stand for a tensor of any size, allocated in full when it is read.
        numel = math.prod(size)
        if numel > storage.numel:
            raise WeightsError(f"{where}: tensor {name} of size {size} has more elements than its storage "
                               f"({storage.numel})")
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if numel and (storage_offset < 0 or last >= storage.numel):
            raise WeightsError(f"{where}: tensor {name} of size {size} runs past its storage of {storage.numel}")
        return TorchTensor(storage, storage_offset, size, stride)


class _StateDict(dict):
    """Stand-in for collections.OrderedDict: a dict that also takes attributes, because a pickled
    module.state_dict() sets `_metadata` on it (pickle's BUILD step)."""


def _ordered_dict(*args):
    return _StateDict(*args)


def _local_data_offset(f, info: zipfile.ZipInfo) -> int:
    """Byte offset of an entry's data: after its local header, whose name/extra lengths may differ from
    the central directory's."""
    f.seek(info.header_offset)
    header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _read_entry(zf: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    """An archive entry read whole, refused past `limit` bytes: by its declared size first, and by what it
    really inflates to (the declared size is not trusted: at most limit + 1 bytes are ever decompressed)."""
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise WeightsError(f"{path}: {name} says it holds {info.file_size} bytes; more than {limit} is no "
                           f"real checkpoint's")
    with zf.open(info) as fp:
        data = fp.read(limit + 1)
    if len(data) > limit:
        raise WeightsError(f"{path}: {name} inflates to more than {limit} bytes; no real checkpoint's does")
    return data


def _check_pickle_sizes(pickled: bytes, path: Path) -> None:
    """Walk the opcodes once (pickletools, which allocates nothing beyond the data) before unpickling.

    CPython's unpickler trusts two numbers in the pickle: a byte string's declared length (it allocates
    that much, then reads: a 4-byte length is 4 GB) and a memo index (it grows the memo table to twice the
    index). So every length must fit in the data, which genops checks as it reads each argument, and every
    memo index must be one a pickler could have written: they count up from 0, one per stored object.
    The opcodes are counted too (MAX_PICKLE_OPCODES).
    """
    for count, (op, arg, _) in enumerate(pickletools.genops(io.BytesIO(pickled))):
        if count >= MAX_PICKLE_OPCODES:
            raise WeightsError(f"{path}: data.pkl has more than {MAX_PICKLE_OPCODES} opcodes; no real "
                               f"checkpoint's has")
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= arg <= count:
            raise WeightsError(f"{path}: damaged data.pkl (memo index {arg} at opcode {count})")


def read_torch_file(path: "str | Path") -> dict[str, TorchTensor]:
    """The state dict of a torch.save zip file: name -> TorchTensor. Nothing from the file is executed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: file not found")
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as raw:
            names = zf.namelist()
            pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise WeightsError(f"{path}: not a PyTorch checkpoint (no <name>/data.pkl in the archive)")
            prefix = pkl[0][: -len("data.pkl")]
            order = f"{prefix}byteorder"
            if order in names and _read_entry(zf, order, 64, path).strip() != b"little":
                raise WeightsError(f"{path}: big-endian checkpoints are not supported")
            # Locate every storage's bytes in the file (torch stores them uncompressed).
            entries = {}
            for info in zf.infolist():
                if not info.filename.startswith(f"{prefix}data/"):
                    continue
                if info.compress_type != zipfile.ZIP_STORED:
                    raise WeightsError(f"{path}: storage {info.filename} is compressed; torch never does that")
                offset = _local_data_offset(raw, info)
                if offset + info.file_size > size:
                    raise WeightsError(f"{path}: truncated: storage {info.filename} runs past the end of the file")
                entries[info.filename[len(f"{prefix}data/"):]] = (offset, info.file_size)
            pickled = _read_entry(zf, pkl[0], MAX_PICKLE_BYTES, path)
            _check_pickle_sizes(pickled, path)
            state = _RestrictedUnpickler(io.BytesIO(pickled), path, entries).load()
    except WeightsError:
        raise
    except (zipfile.BadZipFile, zlib.error, lzma.LZMAError, NotImplementedError, RuntimeError) as e:
        # RuntimeError: an encrypted entry; NotImplementedError: an unknown compression method.
        raise WeightsError(f"{path}: truncated or not a PyTorch zip checkpoint ({e})") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError,
            KeyError, struct.error, OSError, OverflowError, RecursionError) as e:
        raise WeightsError(f"{path}: damaged data.pkl ({type(e).__name__}: {reprlib.repr(str(e))})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, TorchTensor):
            raise WeightsError(f"{path}: entry {reprlib.repr(name)} is not a tensor")
    return state
