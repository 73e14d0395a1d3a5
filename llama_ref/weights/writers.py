"""Writers of Meta, Hugging Face and GGUF checkpoints from weights in the canonical layout.

Each writer fills a directory or file it is given; `llama_ref.tools.convert` gives it a temporary name and
renames it at the end, so a failed or interrupted conversion never leaves a checkpoint under the final name.
Llama 4's tensors and configs (stacked experts, llama.cpp's llama4 keys) come from writers_llama4.py.

Meta's .pth files are written without PyTorch: a zip archive (entries stored uncompressed, data aligned to
64 bytes as torch.save does) whose data.pkl is emitted opcode by opcode, naming only the globals that
weights.torch_zip accepts. torch.load(..., weights_only=True) reads the result.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..model.config import ModelArgs
from ..model.llama4_config import refuse_writing
from .bf16 import float32_to_bf16_bits
from .common import WeightsError, expected_shapes, permute_meta_to_hf

# Output dtype name -> (numpy dtype of the raw elements, torch storage class, safetensors code)
OUT_DTYPES = {
    "bf16": (np.dtype("<u2"), "BFloat16Storage", "BF16"),
    "f16": (np.dtype("<f2"), "HalfStorage", "F16"),
    "f32": (np.dtype("<f4"), "FloatStorage", "F32"),
}


def weight_format(w) -> str:
    """'bf16', 'f16' or 'f32' for a kept 16/32-bit weight; 'quantized' for anything else."""
    if isinstance(w, np.ndarray):
        return {"float16": "f16", "float32": "f32"}.get(w.dtype.name, "quantized")
    return {"bf16": "bf16", "f16": "f16"}.get(getattr(w, "format", ""), "quantized")


def raw_elements(w, out: str) -> np.ndarray:
    """Weight `w` (array or packed) as C-contiguous raw elements of dtype `out` (bf16 as uint16 bits)."""
    fmt = weight_format(w)
    if fmt == out == "bf16" or fmt == out == "f16":
        data = w.data if not isinstance(w, np.ndarray) else w
        return np.ascontiguousarray(data).view(OUT_DTYPES[out][0]).reshape(w.shape)
    x = np.asarray(w.to_float(np.float32) if not isinstance(w, np.ndarray) else w, dtype=np.float32)
    if out == "bf16":
        return float32_to_bf16_bits(x)
    return np.ascontiguousarray(x, dtype=OUT_DTYPES[out][0])


class _LazyRaw:
    """raw_elements(weights[name], out), made only when a writer copies it to the file: gguf's writer keeps every
    tensor it is given until the end, and a safetensors header needs every shape before the first byte, so a
    whole model made up front (16 GB at 8B in 16 bits) would sit in memory at once. The tensor is looked up
    then too: a mapping may make its values on access. heads: wq / wk go to HF's half-split RoPE row order."""

    def __init__(self, weights, name: str, shape: tuple, out: str, heads: "int | None" = None):
        self.weights, self.name, self.out, self.heads = weights, name, out, heads
        self.shape = tuple(shape)
        self.dtype = np.dtype(OUT_DTYPES[out][0])
        self.nbytes = int(np.prod(self.shape)) * self.dtype.itemsize

    def array(self) -> np.ndarray:
        raw = raw_elements(self.weights[self.name], self.out)
        if raw.shape != self.shape:
            raise WeightsError(f"cannot write: tensor {self.name} has shape {raw.shape}, expected {self.shape}")
        if self.heads is not None:
            raw = permute_meta_to_hf(raw, self.heads)
        return np.ascontiguousarray(raw)

    def tofile(self, f) -> None:
        self.array().tofile(f)


def canonical_items(args: ModelArgs, weights: dict) -> list[str]:
    """Tensor names in canonical order; a tied output matrix is not listed separately."""
    refuse_writing(args, "a checkpoint")
    names = list(expected_shapes(args))
    if args.tie_word_embeddings:
        names.remove("output.weight")
    missing = [n for n in names if n not in weights]
    if missing:
        raise WeightsError(f"cannot write: tensor {missing[0]} is missing")
    return names


# ---- Meta: params.json + consolidated.00.pth --------------------------------------------------------------

class _PickleWriter:
    """Just enough of pickle protocol 2 to write a state dict as torch.save does."""

    def __init__(self):
        self.out = bytearray(b"\x80\x02")  # PROTO 2

    def glob(self, module: str, name: str):
        self.out += b"c" + f"{module}\n{name}\n".encode()  # GLOBAL

    def string(self, s: str):
        b = s.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE

    def int(self, n: int):
        if -(2 ** 31) <= n < 2 ** 31:
            self.out += b"J" + struct.pack("<i", n)  # BININT
        else:
            b = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(b)]) + b  # LONG1

    def ints(self, values):
        self.out += b"("  # MARK
        for v in values:
            self.int(int(v))
        self.out += b"t"  # TUPLE

    def empty_ordered_dict(self):
        self.glob("collections", "OrderedDict")
        self.out += b")R"  # EMPTY_TUPLE, REDUCE

    def tensor(self, storage_class: str, key: str, numel: int, shape, stride):
        # torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)
        self.glob("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("  # MARK: the argument tuple
        self.out += b"("  # MARK: the persistent id ('storage', class, key, location, numel)
        self.string("storage")
        self.glob("torch", storage_class)
        self.string(key)
        self.string("cpu")
        self.int(numel)
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.int(0)
        self.ints(shape)
        self.ints(stride)
        self.out += b"\x89"  # NEWFALSE: requires_grad
        self.empty_ordered_dict()  # backward hooks
        self.out += b"tR"  # TUPLE, REDUCE


def write_torch_file(path: Path, tensors: list[tuple[str, np.ndarray, str]], archive: str = "consolidated",
                     on_tensor: Optional[Callable] = None) -> None:
    """torch.save's zip format. tensors: (name, raw elements, out dtype); arrays that are the same object
    share one storage (how Llama 3.2 stores its tied output matrix)."""
    pk = _PickleWriter()
    pk.empty_ordered_dict()
    pk.out += b"("  # MARK for SETITEMS
    keys: dict[int, str] = {}
    payloads = []
    for name, raw, out in tensors:
        key = keys.get(id(raw))
        if key is None:
            key = keys[id(raw)] = str(len(keys))
            payloads.append((key, raw))
        stride = [int(np.prod(raw.shape[i + 1:], dtype=np.int64)) for i in range(raw.ndim)]
        pk.string(name)
        pk.tensor(OUT_DTYPES[out][1], key, raw.size, raw.shape, stride)
    pk.out += b"u."  # SETITEMS, STOP
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(f"{archive}/data.pkl", bytes(pk.out))
        zf.writestr(f"{archive}/byteorder", b"little")
        for key, raw in payloads:
            info = zipfile.ZipInfo(f"{archive}/data/{key}", date_time=(1980, 1, 1, 0, 0, 0))
            # torch aligns every storage to 64 bytes with a padding extra field, so it can memory-map them.
            header_end = zf.fp.tell() + 30 + len(info.filename.encode())
            pad = (-(header_end + 4)) % 64
            info.extra = struct.pack("<HH", 0x4651, pad) + b"Z" * pad
            with zf.open(info, "w", force_zip64=raw.nbytes > 2 ** 31) as f:
                f.write(memoryview(np.ascontiguousarray(raw)).cast("B"))
            if on_tensor:
                on_tensor()
        zf.writestr(f"{archive}/version", b"3\n")


def write_meta(dst: Path, args: ModelArgs, weights: dict, out: str, on_tensor=None, shards: int = 1) -> None:
    """dst/params.json + dst/consolidated.00.pth .. consolidated.NN.pth (`shards` model-parallel shards, cut
    as Meta's fairscale layers cut them: see meta_shard_plans), every tensor in dtype `out`."""
    if args.llama4 is not None:  # router_DE, stacked experts (writers_llama4)
        from .writers_llama4 import meta_shard_tensors, meta_tensors

        plans = ([meta_tensors(args, weights, out, raw_elements)] if shards == 1 else
                 meta_shard_tensors(args, weights, out, raw_elements, shards))
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "params.json").write_text(json.dumps(args.to_params_json(), indent=2) + "\n")
        for k, items in enumerate(plans):
            write_torch_file(dst / f"consolidated.{k:02d}.pth", [(name, raw, out) for name, raw in items],
                             on_tensor=on_tensor)
        return
    plans = meta_shard_plans(args, shards)
    dst.mkdir(parents=True, exist_ok=True)
    params = args.to_params_json()
    (dst / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    names = canonical_items(args, weights)
    for k, plan in enumerate(plans):
        tensors = []
        for name in names:
            # Norms too are written in `out`, as Meta's own files do (bf16 norms widen exactly on load).
            raw = raw_elements(weights[name], out)
            if plan is not None and plan[name] is not None:
                axis, lo, hi = plan[name]
                raw = np.ascontiguousarray(raw[(slice(None),) * axis + (slice(lo, hi),)])
            tensors.append((name, raw, out))
        if args.tie_word_embeddings:
            # As in Meta's Llama 3.2 files: output.weight is the embedding's own storage.
            emb = next(t for t in tensors if t[0] == "tok_embeddings.weight")
            tensors.append(("output.weight", emb[1], emb[2]))
        write_torch_file(dst / f"consolidated.{k:02d}.pth", tensors, on_tensor=on_tensor)
        del tensors


def meta_shard_plans(args: ModelArgs, shards: int) -> list:
    """For each of `shards` model-parallel shards, name -> (axis, lo, hi) of its slice (None: a copy);
    [None] for one shard. fairscale's split: wq/wk/wv/w1/w3/output by rows, wo/w2 by columns, the embedding
    by vocabulary rows (Llama 3's VocabParallelEmbedding; by columns, Llama 2's ParallelEmbedding, when the
    shards divide the width but not the vocabulary). Each count must divide what it splits, as fairscale
    requires."""
    from ..runtime.parallel import rank_plan

    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise WeightsError(f"--shards must be a positive integer, got {shards!r}")
    if shards == 1:
        return [None]
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.kv_heads, "the FFN width": args.ffn_hidden_dim}
    for what, n in sizes.items():
        if n % shards:
            raise WeightsError(f"--shards {shards}: Meta's layout needs the shard count to divide {what} ({n})")
    if args.vocab_size % shards == 0:
        embedding_axis = 0
    elif args.dim % shards == 0 and not args.tie_word_embeddings:
        embedding_axis = 1
    else:
        raise WeightsError(f"--shards {shards}: Meta's layout needs the shard count to divide the vocabulary "
                           f"({args.vocab_size})")
    return [rank_plan(args, k, shards, "--shards", embedding_axis) for k in range(shards)]


# ---- Hugging Face: config.json + model.safetensors ----------------------------------------------------------

def hf_config(args: ModelArgs, out: str, transformers: str = "4+5") -> dict:
    """config.json for `args`. transformers "4": rope_theta and rope_scaling at the top level, as 4.x wrote
    them; "5": both inside rope_parameters, as 5.x writes them; "4+5" (default): both forms, which agree,
    so that either version reads the same RoPE (4.x ignores rope_parameters; 5.x reads either)."""
    refuse_writing(args, "a config.json")
    if transformers not in ("4", "5", "4+5"):
        raise WeightsError(f"transformers must be '4', '5' or '4+5', got {transformers!r}")
    dtype = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[out]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
        "num_hidden_layers": args.n_layers, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_word_embeddings,
    }
    if args.head_dim_override is not None:
        config["head_dim"] = args.head_dim_override
    s = args.rope_scaling
    scaling = None if s is None else {"rope_type": s.kind, "factor": s.factor}
    if s is not None and s.kind == "llama3":
        scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                       original_max_position_embeddings=s.original_max_position_embeddings)
    if "4" in transformers:
        config.update(rope_theta=args.rope_theta, rope_scaling=scaling, torch_dtype=dtype)
    if "5" in transformers:
        config.update(rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": args.rope_theta},
                      dtype=dtype)
    return config


def write_safetensors(path: Path, tensors: list[tuple[str, np.ndarray, str]], metadata=None, on_tensor=None):
    """One safetensors file: 8-byte header size, JSON header (padded to 8 bytes), then the data."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, raw, out in tensors:
        header[name] = {"dtype": OUT_DTYPES[out][2], "shape": list(raw.shape),
                        "data_offsets": [offset, offset + raw.nbytes]}
        offset += raw.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, raw, _ in tensors:
            data = raw.array() if isinstance(raw, _LazyRaw) else np.ascontiguousarray(raw)
            f.write(memoryview(data).cast("B"))
            del data  # before the next tensor is made
            if on_tensor:
                on_tensor()


def write_hf(dst: Path, args: ModelArgs, weights: dict, out: str, on_tensor=None,
             max_shard_bytes: int = 5 * 2 ** 30) -> None:
    """dst/config.json + model.safetensors (or model-0000k-of-0000n.safetensors and an index)."""
    from .hf import meta_name_to_hf

    dst.mkdir(parents=True, exist_ok=True)
    if args.llama4 is not None:  # Llama4ForCausalLM: stacked experts, q/k rows as they are (writers_llama4)
        from . import writers_llama4

        rope = {k: v for k, v in hf_config(args.replace(llama4=None), out).items()
                if k.startswith("rope_") or k in ("torch_dtype", "dtype")}
        config = writers_llama4.hf_config(args, out, rope)
        items = writers_llama4.hf_tensors(args, weights, out, raw_elements)
    else:
        config = hf_config(args, out)
        shapes = expected_shapes(args)
        items = []
        for name in canonical_items(args, weights):  # norms included, as HF's own files do
            # Back to HF's half-split RoPE row order (q with n_heads, k with n_kv_heads).
            heads = ((args.n_heads if ".wq." in name else args.kv_heads)
                     if name.endswith(("attention.wq.weight", "attention.wk.weight")) else None)
            items.append((meta_name_to_hf(name), _LazyRaw(weights, name, shapes[name], out, heads)))
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shards: list[list] = [[]]
    size = 0
    for hf_name, raw in items:
        if size + raw.nbytes > max_shard_bytes and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((hf_name, raw, out))
        size += raw.nbytes
    if len(shards) == 1:
        write_safetensors(dst / "model.safetensors", shards[0], {"format": "pt"}, on_tensor)
        return
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(dst / fname, shard, {"format": "pt"}, on_tensor)
        weight_map.update({n: fname for n, _, _ in shard})
        total += sum(r.nbytes for _, r, _ in shard)
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


# ---- GGUF ---------------------------------------------------------------------------------------------------

def llama3_rope_divisors(args: ModelArgs) -> Optional[np.ndarray]:
    """Llama 3.1 scaling as llama.cpp stores it: one divisor per frequency (the rope_freqs tensor)."""
    s = args.rope_scaling
    if s is None or s.kind != "llama3":
        return None
    from ..model.ops import rope_frequencies

    plain = rope_frequencies(args.replace(rope_scaling=None))
    return (plain / rope_frequencies(args)).astype(np.float32)  # (HD/2,)


def _gguf_value_type(value):
    """GGUF (type, array element type) for a metadata value as gguf_metadata returns it."""
    from gguf import GGUFValueType as V

    def scalar(v):
        if isinstance(v, bool):
            return V.BOOL
        if isinstance(v, int):
            return V.INT32 if v < 0 else V.UINT32
        if isinstance(v, float):
            return V.FLOAT32
        return V.STRING

    if isinstance(value, list):
        if not value:
            return V.ARRAY, V.INT32
        sub = scalar(value[0])
        if sub == V.UINT32:  # an id list: one signed type fits every element (token types, ...)
            sub = V.INT32
        return V.ARRAY, sub
    return scalar(value), None


def add_hyperparameters(w, args: ModelArgs) -> None:
    """The architecture keys that llama_ref reads back into ModelArgs (see config.from_gguf_metadata)."""
    refuse_writing(args, "GGUF metadata")
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_freq_base(args.rope_theta)
    if args.head_dim_override is not None:  # llama.cpp's keys for a head width other than dim / n_heads
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    if args.rope_scaling is not None and args.rope_scaling.kind == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(args.rope_scaling.factor)


def write_gguf(dst: Path, args: ModelArgs, weights: dict, out: str, metadata: Optional[dict] = None,
               freq_divisors=None, on_tensor=None) -> None:
    """A llama.cpp GGUF file with F32 or F16 matrices (norms always F32); the tokenizer.* keys of
    `metadata` are copied when the source had them."""
    import gguf

    from .gguf import META_TO_GGUF

    if out not in ("f32", "f16"):
        raise WeightsError(f"GGUF output must be f32 or f16, got {out}")
    if args.llama4 is not None:
        from . import writers_llama4

        writers_llama4.check_gguf_expressible(args)  # before the file exists
        w = gguf.GGUFWriter(str(dst), "llama4")
        writers_llama4.add_gguf_hyperparameters(w, args)
        items = writers_llama4.gguf_tensors(args, weights, out, raw_elements)
    else:
        w = gguf.GGUFWriter(str(dst), "llama")
        add_hyperparameters(w, args)
        w.add_rope_dimension_count(args.head_dim)
        shapes = expected_shapes(args)
        items = [(_gguf_name(name, META_TO_GGUF), _LazyRaw(weights, name, shapes[name], "f32" if name.endswith(
                  "norm.weight") else out)) for name in canonical_items(args, weights)]
    w.add_vocab_size(args.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if out == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    for key, value in (metadata or {}).items():
        if key.startswith("tokenizer."):
            w.add_key_value(key, value, *_gguf_value_type(value))
    divisors = freq_divisors if freq_divisors is not None else llama3_rope_divisors(args)
    if divisors is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(divisors, dtype=np.float32))
    for gname, raw in items:
        w.add_tensor(gname, raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if on_tensor:
        on_tensor()


def _gguf_name(name: str, table: dict) -> str:
    if name.startswith("layers."):
        _, i, rest = name.split(".", 2)
        return table[f"layers.{{i}}.{rest}"].format(i=i)
    return table[name]
