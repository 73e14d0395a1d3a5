"""Tensor parallelism across MPI ranks (Open MPI + mpi4py), cut exactly where Meta's fairscale layers cut.

Meta saved its big models model-parallel: consolidated.00.pth .. consolidated.NN.pth, shard r the slice of
every matrix that GPU r computed. With `llama_ref.load(path, parallel="mpi")` under `mpirun -n N`, rank r
keeps only its slice, and the forward pass in model.py runs on slices:

    wq, wk, wv   ColumnParallelLinear: rank r computes query heads r*H/N .. (r+1)*H/N - 1 and the KV heads
                 they read (its KV cache holds only those)
    w1, w3       ColumnParallelLinear: FFN columns part(F, r, N)
    wo, w2       RowParallelLinear: the matching input columns. Each rank's product is one term of the full
                 output's sum over heads / FFN columns: model.py adds the terms with an all-reduce
    tok_embeddings  rows part(V, r, N) (Llama 3's VocabParallelEmbedding) or, read from Llama 2's shards,
                 columns part(D, r, N) (ParallelEmbedding). A rank's lookup is the full vector, zero outside
                 its part, and the same all-reduce completes it
    output       rows part(V, r, N): each rank the logits of its slice of the vocabulary, all-gathered so
                 every rank holds all of them to sample from
    norms        a copy on every rank

part(n, r, N) = n*r//N .. n*(r+1)//N - 1 is fairscale's even split whenever N divides n. The all-reduce
gathers every rank's term and adds them in rank order, so every rank holds the same bits and a run with N
ranks is reproducible; the tokens sampled from those logits are then rank 0's, broadcast to the others.

Rank r reads only its part of each tensor: from consolidated.r.pth when the checkpoint has N shards, from
the shards that overlap its part when it has another count (re-slicing), and from a merged Meta file, a
Hugging Face directory or a GGUF file only the rows or columns it keeps. N must divide the attention heads.

In one process model.parallel is SINGLE, whose all_reduce, all_gather and bcast return their argument:
choosing parallelism never changes what is computed, only where (up to float rounding of the sums).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import LlamaRefError


class ParallelError(LlamaRefError, ValueError):
    """A parallel run that cannot work: ranks that do not divide the heads, no MPI, a rank that failed."""


def part(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rank `rank`'s contiguous range lo .. hi-1 of n items split over `size` ranks."""
    return n * rank // size, n * (rank + 1) // size


# ---- communication -----------------------------------------------------------------------------------

class Single:
    """One process: every collective is the identity."""

    rank, size = 0, 1

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        return x

    def all_gather(self, x: np.ndarray) -> np.ndarray:
        return x

    def bcast(self, obj):
        return obj

    def __repr__(self) -> str:
        return "Single()"


SINGLE = Single()


class MPIGroup:
    """The ranks of one MPI communicator that hold the slices of one model.

    bytes_sent counts what this rank put on the wire (its own terms and logit slices), for the benchmark.
    """

    def __init__(self, comm, gather_widths: "list[int] | None" = None):
        self.comm = comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.gather_widths = gather_widths  # each rank's width of the last axis that all_gather joins
        self.bytes_sent = 0
        self.collectives = 0

    def all_reduce(self, x: np.ndarray) -> np.ndarray:
        """The sum over ranks of x, added in rank order (identical bits on every rank)."""
        x = np.ascontiguousarray(x)
        terms = np.empty((self.size, *x.shape), x.dtype)  # (N, ...)
        self.comm.Allgather(x, terms)
        self._count(x.nbytes)
        out = terms[0].copy()
        for term in terms[1:]:
            out += term
        return out

    def all_gather(self, x: np.ndarray) -> np.ndarray:
        """Every rank's x joined along the last axis, in rank order (each rank's width from gather_widths)."""
        x = np.ascontiguousarray(x)
        lead = x.shape[:-1]
        widths = self.gather_widths or [x.shape[-1]] * self.size
        counts = [math.prod(lead) * w for w in widths]
        flat = np.empty(sum(counts), x.dtype)
        self.comm.Allgatherv(x.reshape(-1), [flat, counts])
        self._count(x.nbytes)
        pieces = np.split(flat, np.cumsum(counts)[:-1])
        return np.concatenate([p.reshape(*lead, w) for p, w in zip(pieces, widths)], axis=-1)

    def bcast(self, obj):
        """Rank 0's obj on every rank."""
        self.collectives += 1
        return self.comm.bcast(obj, root=0)

    def _count(self, nbytes: int) -> None:
        self.collectives += 1
        self.bytes_sent += nbytes

    def __repr__(self) -> str:
        return f"MPIGroup(rank {self.rank} of {self.size})"


def mpi_world():
    """mpi4py's MPI.COMM_WORLD, or a ParallelError that says what to install."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise ParallelError(f"parallel='mpi' needs mpi4py and an MPI library ({e}): apt-get install "
                            f"openmpi-bin libopenmpi-dev, then pip install 'llama_ref[mpi]'") from None
    return MPI.COMM_WORLD


def abort(message: str, code: int = 2) -> None:
    """Print `message` (prefixed with this rank) and end every rank of the job: the others would otherwise
    wait forever in their next collective for this one."""
    comm = mpi_world()
    print(f"llama-ref rank {comm.Get_rank()} of {comm.Get_size()}: {message}", file=sys.stderr, flush=True)
    comm.Abort(code)


def say_why_when_stopped(rank: int, size: int) -> None:
    """When mpirun ends this rank (SIGTERM, SIGINT) because another rank failed or the job was stopped,
    print one line saying so before exiting, even while this rank is blocked inside a collective.

    Python runs signal handlers only between bytecodes of the main thread, which a collective blocks; the
    signal's wake-up byte is read by a helper thread instead (MPI calls release the GIL).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def on_signal(signum, frame):  # runs only if the main thread gets back to Python first
        pass

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def wait():
        got = os.read(read_fd, 1)
        name = signal.Signals(got[0]).name if got else "?"
        print(f"llama-ref rank {rank} of {size}: stopped by mpirun ({name}): another rank failed or the job "
              f"was interrupted; see the error above", file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=wait, name="llama-ref-mpi-signal", daemon=True).start()


# ---- which part of each tensor a rank keeps -----------------------------------------------------------

def head_ranges(args, rank: int, size: int, where: str):
    """(query heads lo, hi), (KV heads lo, hi) of rank `rank`; ParallelError when the ranks do not fit."""
    H, KVH = args.n_heads, args.kv_heads
    if H % size:
        raise ParallelError(f"{where}: {size} ranks do not divide the model's {H} attention heads (n_heads); "
                            f"use a number of ranks that divides {H}")
    local, group = H // size, H // KVH  # query heads per rank; query heads per KV head
    q = (rank * local, (rank + 1) * local)
    if KVH % size == 0:
        kv = part(KVH, rank, size)
    elif group % local == 0:
        k = q[0] // group  # every query head of this rank reads this one KV head: the rank keeps a copy
        kv = (k, k + 1)
    else:
        raise ParallelError(f"{where}: {size} ranks split the {H} query heads across the {KVH} KV heads "
                            f"unevenly (n_kv_heads); use a number of ranks that divides {KVH} or is a "
                            f"multiple of it that divides {H}")
    return q, kv


def rank_plan(args, rank: int, size: int, where: str, embedding_axis: int = 0) -> dict:
    """name -> (axis, lo, hi) of the part rank `rank` keeps, or None for a whole copy."""
    (q0, q1), (k0, k1) = head_ranges(args, rank, size, where)
    HD, F, V = args.head_dim, args.ffn_hidden_dim, args.vocab_size
    f0, f1 = part(F, rank, size)
    emb = part(V if embedding_axis == 0 else args.dim, rank, size)
    plan = {"tok_embeddings.weight": (embedding_axis, *emb), "norm.weight": None,
            "output.weight": (0, *part(V, rank, size))}
    if args.llama4 is not None:  # Llama 4's experts and shared expert: cut along their hidden width, like w1/w3/w2
        m = args.llama4
        e0, e1 = part(m.expert_hidden_dim, rank, size)
        for i in m.moe_layers:
            p = f"layers.{i}.feed_forward."
            plan[p + "router.weight"] = None  # every rank routes every token, the same way
            for name in ("shared_expert", *(f"experts.{e}" for e in range(m.n_experts))):
                plan.update({f"{p}{name}.w1.weight": (0, e0, e1), f"{p}{name}.w3.weight": (0, e0, e1),
                             f"{p}{name}.w2.weight": (1, e0, e1)})
    for i in range(args.n_layers):
        p = f"layers.{i}."
        plan.update({
            p + "attention_norm.weight": None, p + "ffn_norm.weight": None,
            p + "attention.wq.weight": (0, q0 * HD, q1 * HD),
            p + "attention.wk.weight": (0, k0 * HD, k1 * HD),
            p + "attention.wv.weight": (0, k0 * HD, k1 * HD),
            p + "attention.wo.weight": (1, q0 * HD, q1 * HD),
            p + "feed_forward.w1.weight": (0, f0, f1),
            p + "feed_forward.w3.weight": (0, f0, f1),
            p + "feed_forward.w2.weight": (1, f0, f1),
        })
    return plan


def local_args(args, rank: int, size: int, where: str):
    """The config of rank `rank`'s slice: its heads and FFN columns (the vocabulary stays whole)."""
    (q0, q1), (k0, k1) = head_ranges(args, rank, size, where)
    f0, f1 = part(args.ffn_hidden_dim, rank, size)
    llama4 = args.llama4
    if llama4 is not None:
        from dataclasses import replace

        e0, e1 = part(llama4.expert_hidden_dim, rank, size)
        llama4 = replace(llama4, expert_hidden_dim=e1 - e0)
    return args.replace(n_heads=q1 - q0, n_kv_heads=k1 - k0, head_dim_override=args.head_dim,
                        hidden_dim=f1 - f0, llama4=llama4)


class EmbeddingPart:
    """A rank's part of the embedding table: vocabulary rows lo..hi-1 (axis 0) or columns lo..hi-1 of every
    row (axis 1). Looked up, it gives full-width rows that are zero outside the part; the all-reduce after
    the lookup in model.py adds the ranks' parts into the whole rows."""

    format = None  # not a format the Numba kernels read: they call rows() like the NumPy reference
    ndim = 2

    def __init__(self, table, axis: int, lo: int, hi: int, shape: tuple[int, int]):
        self.table, self.axis, self.lo, self.hi, self.shape = table, axis, lo, hi, tuple(shape)

    @property
    def nbytes(self) -> int:
        return int(self.table.nbytes)

    def rows(self, ids, dtype=np.float32) -> np.ndarray:
        from ..model import ops

        ids = np.asarray(ids)
        out = np.zeros((*ids.shape, self.shape[1]), dtype)  # (..., D)
        if self.axis == 0:
            mine = (ids >= self.lo) & (ids < self.hi)
            if mine.any():
                out[mine] = ops.embedding(ids[mine] - self.lo, self.table, dtype)
        else:
            out[..., self.lo:self.hi] = ops.embedding(ids, self.table, dtype)
        return out

    def __repr__(self) -> str:
        return f"EmbeddingPart(axis {self.axis}, {self.lo}..{self.hi - 1} of {self.shape})"


# ---- reading only a rank's part ----------------------------------------------------------------------

def _index(ndim: int, axis: int, lo: int, hi: int) -> tuple:
    idx = [slice(None)] * ndim
    idx[axis] = slice(lo, hi)
    return tuple(idx)


COLUMN_CHUNK_BYTES = 64 * 2 ** 20  # rows read at a time when a rank keeps columns of a matrix


def _file_span(tensor):
    """(path, byte offset of the first element, dtype) of a C-contiguous tensor stored in a file, else None."""
    from ..weights.safetensors_file import SafeTensor
    from ..weights.torch_zip import TorchTensor

    if isinstance(tensor, TorchTensor) and tensor._is_contiguous():
        st = tensor.storage
        return st.path, st.offset + tensor.storage_offset * st.dtype.itemsize, st.dtype
    if isinstance(tensor, SafeTensor):
        return tensor.path, tensor.offset, tensor.dtype
    return None


def read_block(tensor, axis, lo, hi) -> np.ndarray:
    """Elements lo..hi-1 along `axis` of a lazy tensor (TorchTensor / SafeTensor) as an owned array, read
    with pread: rows as one read of their bytes; columns of a matrix from rows read COLUMN_CHUNK_BYTES at a
    time (only the kept columns stay). A whole tensor is read whole."""
    if axis is None or (lo, hi) == (0, tensor.shape[axis]):
        return tensor.read()
    from ..weights.common import pread_into

    span = _file_span(tensor)
    if span is None or axis > 1:  # not stored contiguously: copy the block out of a memory map
        view = tensor.view()
        return np.array(view[_index(len(tensor.shape), axis, lo, hi)])
    path, base, dtype = span
    shape = tuple(tensor.shape)
    row_bytes = math.prod(shape[1:]) * dtype.itemsize
    if axis == 0:
        out = np.empty((hi - lo, *shape[1:]), dtype)
        pread_into(path, base + lo * row_bytes, out)
        return out
    rows = shape[0]
    out = np.empty((rows, hi - lo), dtype)
    step = max(1, min(rows, COLUMN_CHUNK_BYTES // max(row_bytes, 1)))
    buf = np.empty((step, shape[1]), dtype)
    for r0 in range(0, rows, step):
        n = min(step, rows - r0)
        pread_into(path, base + r0 * row_bytes, buf[:n])
        out[r0:r0 + n] = buf[:n, lo:hi]
    return out


class _Whole:
    """A tensor stored whole in one file."""

    def __init__(self, tensor):
        self.tensor, self.shape, self.dtype_name = tensor, tuple(tensor.shape), tensor.dtype_name

    def block(self, axis, lo, hi, rank):
        return read_block(self.tensor, axis, lo, hi)


class _InMemory:
    """A tensor already read whole (Llama 4: its experts are cut out of stacked tensors by weights.llama4)."""

    dtype_name = "float32"

    def __init__(self, array):
        self.array, self.shape = array, tuple(array.shape)

    def block(self, axis, lo, hi, rank):
        return self.array if axis is None else np.ascontiguousarray(self.array[_index(self.array.ndim, axis, lo, hi)])


class _Planned:
    """A canonical Llama 4 tensor cut out of a source tensor (weights.llama4's plan: an expert of a stacked
    tensor, a part of a fused one). The sources are read one at a time through a one-entry cache, in source
    order, so a rank holds at most one stacked tensor beside the slices it keeps."""

    def __init__(self, cache: dict, sources: dict, source: str, fn, shape: tuple):
        self.cache, self.sources, self.source, self.fn, self.shape = cache, sources, source, fn, shape
        self.dtype_name = sources[source].dtype_name

    def block(self, axis, lo, hi, rank):
        if self.cache.get("name") != self.source:
            self.cache.clear()  # the previous source's array goes before the next is read
            self.cache.update(name=self.source, raw=self.sources[self.source].read())
        raw = self.cache["raw"] if self.fn is None else self.fn(self.cache["raw"])
        return np.ascontiguousarray(raw if axis is None else raw[_index(raw.ndim, axis, lo, hi)])


def _open_llama4(path: Path, kind: str):
    """A Llama 4 checkpoint for the ranks. An HF directory or a single Meta file is planned like
    weights.llama4 loads it and each rank reads the stacked tensors one at a time, keeping its slices; a GGUF
    file's experts are views of its stacked tensors, read a block of rows at a time like any GGUF tensor.
    Meta's model-parallel shards are read whole (in float32) through the ordinary loader, each rank then
    keeping its slice (a rank's peak memory while loading is then the whole model's, not its share)."""
    from ..weights import llama4 as l4
    from ..weights.meta import shard_paths

    if kind == "hf" or (kind == "meta" and len(shard_paths(path)) == 1):
        args, sources, plan = (l4.open_llama4_hf if kind == "hf" else l4.open_llama4_meta)(path)
        l4.check_plan(plan, sources, args)
        want, cache = l4.expected_shapes(args), {}
        order = sorted(plan.items.items(), key=lambda item: item[1][0])  # each source read once
        tensors = {name: _Planned(cache, sources, source, fn, want[name]) for name, (source, _, fn) in order
                   if not (args.tie_word_embeddings and name == "output.weight")}
        return args, tensors, {}, {"format": kind}
    if kind == "gguf":  # each expert a 2-D view of its stacked tensor, dequantized a block of rows at a time
        from ..model.config import from_gguf_metadata
        from ..weights.common import check_weights
        from ..weights.gguf import dequantize, gguf_metadata, open_gguf
        from ..weights.gguf_llama4 import check_tensor_types, llama4_tensors, slice_tensor

        reader = open_gguf(path)
        meta = gguf_metadata(reader)
        args = from_gguf_metadata(meta, where=str(path),
                                  has_output_tensor=any(t.name == "output.weight" for t in reader.tensors))
        check_tensor_types(args, reader.tensors, str(path))
        tensors, extras = {}, {"format": kind, "metadata": meta}
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                extras["freq_divisors"] = dequantize(t).reshape(-1)
                continue
            for name, piece in llama4_tensors(args, t):
                tensors[name] = _GGUFTensor(t if piece is None else slice_tensor(t, piece))
        lazy = dict(tensors)
        if args.tie_word_embeddings and "tok_embeddings.weight" in lazy:
            lazy["output.weight"] = lazy["tok_embeddings.weight"]
        check_weights(args, lazy, str(path))
        return args, tensors, {}, extras
    if kind == "gguf":
        from ..weights.gguf import load_gguf
        args, weights, extras = load_gguf(path)
    else:
        from ..weights.directory import load_directory
        args, weights, extras = load_directory(path, keep="float32", tokenizer=False)
    tensors = {n: _InMemory(np.asarray(w, np.float32)) for n, w in weights.items()
               if not (args.tie_word_embeddings and n == "output.weight")}
    out = {"format": kind}
    if extras.get("freq_divisors") is not None:
        out["freq_divisors"] = extras["freq_divisors"]
    if kind == "gguf":
        out["metadata"] = extras["metadata"]
    return args, tensors, {}, out


class _Pieces:
    """A tensor stored as model-parallel pieces along `split` (Meta's shards); None: a copy in each."""

    def __init__(self, pieces, split, shape):
        self.pieces, self.split, self.shape = pieces, split, tuple(shape)
        self.dtype_name = pieces[0].dtype_name

    def block(self, axis, lo, hi, rank):
        if self.split is None:  # replicated: read this rank's own shard's copy (or any, past the count)
            return read_block(self.pieces[rank % len(self.pieces)], axis, lo, hi)
        if axis == self.split:  # the pieces that overlap lo..hi-1: just this rank's shard when counts match
            out, start = [], 0
            for t in self.pieces:
                n = t.shape[axis]
                a, b = max(lo, start), min(hi, start + n)
                if a < b:
                    out.append(read_block(t, axis, a - start, b - start))
                start += n
            return out[0] if len(out) == 1 else np.concatenate(out, axis=axis)
        whole = None if axis is None else (lo, hi)
        parts = [read_block(t, axis, *whole) if whole else t.read() for t in self.pieces]
        return np.concatenate(parts, axis=self.split)


class _GGUFTensor:
    """A GGUF tensor, dequantized to float32 one block of rows (or columns) at a time."""

    dtype_name = "float32"
    CHUNK_ROWS = 256

    def __init__(self, tensor):
        self.tensor = tensor
        self.shape = tuple(int(n) for n in reversed(tensor.shape))

    def _rows(self, r0: int, r1: int) -> np.ndarray:
        from ..weights.gguf import dequantize

        t = self.tensor
        dims = [int(n) for n in t.shape]
        dims[-1] = r1 - r0 if len(dims) > 1 else dims[-1]
        data = t.data[r0:r1] if len(dims) > 1 else t.data
        return dequantize(t._replace(data=np.array(data), shape=np.array(dims, dtype=np.uint64)))

    def block(self, axis, lo, hi, rank):
        if len(self.shape) == 1:
            return self._rows(0, 1)
        if axis == 0:
            return self._rows(lo, hi)
        rows = self.shape[0]
        out = np.empty((rows, self.shape[1] if axis is None else hi - lo), np.float32)
        for r0 in range(0, rows, self.CHUNK_ROWS):
            r1 = min(rows, r0 + self.CHUNK_ROWS)
            out[r0:r1] = self._rows(r0, r1) if axis is None else self._rows(r0, r1)[:, lo:hi]
        return out


def _open_source(path: Path):
    """(args, {name: lazy}, transforms, extras) of any checkpoint, from its headers; nothing is read yet."""
    from ..weights.directory import detect_format

    kind = detect_format(path)
    transforms, extras = {}, {"format": kind}
    if kind != "gguf":
        from ..weights.llama4 import is_llama4_directory
        if is_llama4_directory(path, kind):
            return _open_llama4(path, kind)
    if kind == "meta":
        from ..weights.meta import open_meta

        ckpt = open_meta(path)
        tensors = {n: _Pieces([s[n] for s in ckpt.shards], ckpt.joined[n][1], ckpt.joined[n][0])
                   for n in ckpt.names}
        extras.update(shards=len(ckpt.paths), files=ckpt.paths, dtype="/".join(sorted(ckpt.dtypes)))
        return ckpt.args, tensors, transforms, extras
    if kind == "hf":
        from ..weights.common import permute_hf_to_meta
        from ..weights.hf import open_hf

        args, lazy = open_hf(path)
        tensors = {n: _Whole(t) for n, t in lazy.items() if not (args.tie_word_embeddings and n == "output.weight")}
        for n in tensors:
            if n.endswith(("attention.wq.weight", "attention.wk.weight")):
                # HF's per-head row order, undone per head: a rank's rows are whole heads.
                transforms[n] = lambda raw: permute_hf_to_meta(raw, raw.shape[0] // args.head_dim)
        return args, tensors, transforms, extras
    from ..model.config import from_gguf_metadata
    from ..weights.common import WeightsError, check_weights
    from ..weights.gguf import dequantize, gguf_metadata, gguf_name_to_meta, open_gguf

    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    if meta.get("general.architecture") == "llama4":
        return _open_llama4(path, kind)
    args = from_gguf_metadata(meta, where=str(path), has_output_tensor="output.weight" in names)
    tensors = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            extras["freq_divisors"] = dequantize(t).reshape(-1)
            continue
        name = gguf_name_to_meta(t.name)
        if name is None:
            raise WeightsError(f"{path}: unexpected tensor {t.name} for a Llama model")
        tensors[name] = _GGUFTensor(t)
    lazy = dict(tensors)
    if args.tie_word_embeddings and "tok_embeddings.weight" in lazy:
        lazy["output.weight"] = lazy["tok_embeddings.weight"]
    check_weights(args, lazy, str(path))
    extras["metadata"] = meta
    return args, tensors, transforms, extras


def load_rank_weights(path: Path, rank: int, size: int, keep: str = "stored", progress: bool = False,
                      quantize: "str | None" = None):
    """(full args, rank's args, rank's weights, extras): rank `rank` of `size` reads only its part.

    quantize: quantize each slice as it is read (llama_ref.weights.packed); q8_0 / q4_0 / q4_1 blocks are those of
    one process wherever a slice starts at a multiple of 32 columns, int8's per-row scales are per slice."""
    from ..weights.keep import finish

    path = Path(path)
    args, tensors, transforms, extras = _open_source(path)
    where = str(path)
    # Llama 2's shards split the embedding by columns; read with as many ranks as shards, a rank keeps its
    # shard's columns. Otherwise (and always on re-slicing) a rank keeps rows of the vocabulary.
    emb = tensors.get("tok_embeddings.weight")
    embedding_axis = 1 if (isinstance(emb, _Pieces) and emb.split == 1 and len(emb.pieces) == size
                           and not args.tie_word_embeddings) else 0
    plan = rank_plan(args, rank, size, where, embedding_axis)
    mine = local_args(args, rank, size, where)
    names = list(tensors)
    if progress:
        from tqdm import tqdm
        names = tqdm(names, desc=f"loading {path.name} (rank {rank} of {size})", unit="tensor", leave=False)
    weights: dict = {}
    for name in names:
        slot = plan[name]
        axis, lo, hi = slot if slot is not None else (None, 0, 0)
        raw = tensors[name].block(axis, lo, hi, rank)
        if name in transforms:
            raw = transforms[name](raw)
        kept = finish(raw, tensors[name].dtype_name, "float32" if extras["format"] == "gguf" else keep, name)
        if quantize is not None:
            from ..weights.packed import quantize_weights
            kept = quantize_weights({name: kept}, quantize, where=where)[name]
        weights[name] = kept
        del raw
    table = weights["tok_embeddings.weight"]
    e_axis, e_lo, e_hi = plan["tok_embeddings.weight"]
    if args.tie_word_embeddings:
        weights["output.weight"] = table  # the same vocabulary rows: part(V) on both
    if size > 1:  # one rank keeps the whole table, looked up as in one process
        weights["tok_embeddings.weight"] = EmbeddingPart(table, e_axis, e_lo, e_hi, (args.vocab_size, args.dim))
    extras["vocab_widths"] = [b - a for a, b in (part(args.vocab_size, r, size) for r in range(size))]
    return args, mine, weights, extras


def load_parallel(path: Path, *, comm=None, tensor_parallel: "int | None" = None, backend="numpy",
                  dtype=np.float32, keep: str = "stored", progress: bool = False, max_seq_len=None,
                  quantize: "str | None" = None):
    """The model slice of this MPI rank. Ranks form groups of `tensor_parallel` consecutive ranks (all of
    them by default), each group one copy of the model split across its ranks; model.parallel is this rank's
    group, model.world all ranks, model.data_parallel (group index, group count)."""
    from ..model.transformer import Transformer
    from ..weights.common import WeightsError
    from ..weights.directory import directory_tokenizer

    world = comm if comm is not None else mpi_world()
    size, rank = world.Get_size(), world.Get_rank()
    tp = size if tensor_parallel is None else tensor_parallel
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1 or size % tp:
        raise ParallelError(f"tensor_parallel must be a positive integer dividing the {size} ranks, got {tp!r}")
    color = rank // tp
    group_comm = world.Split(color, rank) if tp != size else world
    args, mine, weights, extras = load_rank_weights(path, group_comm.Get_rank(), tp, keep=keep,
                                                    progress=progress, quantize=quantize)
    if max_seq_len is not None:
        if max_seq_len > args.max_seq_len:
            raise WeightsError(f"{path}: a context of {max_seq_len} tokens is longer than the model's "
                               f"{args.max_seq_len}")
        args, mine = args.replace(max_seq_len=max_seq_len), mine.replace(max_seq_len=max_seq_len)
    model = Transformer(mine, weights, backend=backend, dtype=dtype, freq_divisors=extras.get("freq_divisors"))
    # A copy on one rank computes exactly as one process does (the same arrays, so the same bits).
    model.parallel = MPIGroup(group_comm, gather_widths=extras["vocab_widths"]) if tp > 1 else SINGLE
    model.world = MPIGroup(world)
    model.data_parallel = (color, size // tp)
    model.full_args = args
    if extras["format"] == "gguf":
        from ..text.tokenizer import tokenizer_from_gguf
        model.tokenizer = tokenizer_from_gguf(extras["metadata"], where=str(path))
    else:
        model.tokenizer = directory_tokenizer(Path(path))
    if model.tokenizer is not None and model.tokenizer.vocab_size > args.vocab_size:
        raise WeightsError(f"{path}: tokenizer has {model.tokenizer.vocab_size} tokens but the model only "
                           f"{args.vocab_size} embeddings")
    model.source = Path(path)
    return model


def describe(model) -> SimpleNamespace:
    """Rank, group and bytes of this rank's slice (for logs and the benchmark)."""
    nbytes = sum(int(getattr(w, "nbytes", 0)) for n, w in model.weights.items()
                 if not (n == "output.weight" and model.full_args.tie_word_embeddings))
    return SimpleNamespace(rank=model.parallel.rank, size=model.parallel.size, weight_bytes=nbytes)


def parallel_options(parallel, *, quantize=None, mmap=False, weights=None) -> None:
    """The load() options a parallel run takes; ParallelError naming any other. (GGUF slices are always
    dequantized to float32, whatever `weights` asks.)"""
    if parallel != "mpi":
        raise ParallelError(f"parallel must be None or 'mpi', got {parallel!r}")
    if mmap:
        raise ParallelError("mmap is not supported with parallel='mpi' (each rank reads its slice into memory)")


def run_rank(args, run) -> int:
    """The command line on one MPI rank: rank 0 prints, the others compute quietly. A rank that fails
    ends the whole job (every other rank would wait for it in its next collective), saying so."""
    comm = mpi_world()
    rank, size = comm.Get_rank(), comm.Get_size()
    say_why_when_stopped(rank, size)
    if rank != 0:
        args.quiet = True
        sys.stdout = open(os.devnull, "w")
    try:
        code = run(args)
    except BaseException:  # a bug (run() reports bad input itself): its traceback, then the job ends
        import traceback
        traceback.print_exc()
        code = 1
    if code:
        abort(f"failed (status {code}, see the error above); ending every rank of the job", code)
    return code


def map_in_order(model, items, compute):
    """(item, compute(item)) for every item, in order.

    In one process, one after another. Across MPI ranks with data-parallel groups (load(tensor_parallel=K):
    G = ranks / K model copies), copy g computes items g, g + G, g + 2G, ... (all K ranks of the copy
    together), and world rank 0 receives every result and yields them in order; the other ranks yield
    nothing. The groups advance in rounds of G items, so world rank 0 holds at most G results at a time.
    """
    world = getattr(model, "world", None)
    if world is None:
        for item in items:
            yield item, compute(item)
        return
    g, G = model.data_parallel
    per_group = world.size // G
    items = list(items)
    for start in range(0, len(items), G):
        mine = start + g
        result = compute(items[mine]) if mine < len(items) else None
        results = world.comm.gather(result if model.parallel.rank == 0 else None, root=0)
        if world.rank == 0:
            for k in range(min(G, len(items) - start)):
                yield items[start + k], results[k * per_group]  # group k's rank 0 is world rank k * K
