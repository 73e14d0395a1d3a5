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

import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import WeightsError, pread_into

# Storage classes torch.save names -> (numpy dtype of the raw elements, dtype name). bfloat16 is read as
# its raw uint16 bits (see weights.bf16).
STORAGE_DTYPES = {
    "BFloat16Storage": (np.dtype("<u2"), "bfloat16"),
    "HalfStorage": (np.dtype("<f2"), "float16"),
    "FloatStorage": (np.dtype("<f4"), "float32"),
}


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
        return int(np.prod(self.shape, dtype=np.int64))

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
            raise WeightsError(f"{self.path}: unexpected persistent id {pid!r} in data.pkl")
        _, kind, key, _location, numel = pid
        entry = self.entries.get(str(key))
        if entry is None:
            raise WeightsError(f"{self.path}: storage {key} is referenced but missing from the archive")
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
        size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
        if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
            raise WeightsError(f"{self.path}: malformed tensor (size {size}, stride {stride})")
        last = int(storage_offset) + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0
        if int(storage_offset) < 0 or last >= max(storage.numel, 1) and all(size):
            raise WeightsError(f"{self.path}: tensor of size {size} runs past its storage of {storage.numel}")
        return TorchTensor(storage, int(storage_offset), size, stride)


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
            if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() != b"little":
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
            with zf.open(pkl[0]) as fp:
                state = _RestrictedUnpickler(fp, path, entries).load()
    except WeightsError:
        raise
    except zipfile.BadZipFile as e:
        raise WeightsError(f"{path}: truncated or not a PyTorch zip checkpoint ({e})") from None
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError,
            KeyError, struct.error, OSError) as e:
        raise WeightsError(f"{path}: damaged data.pkl ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, TorchTensor):
            raise WeightsError(f"{path}: entry {name!r} is not a tensor")
    return state
