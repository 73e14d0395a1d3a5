"""`llama-ref info PATH`: what a checkpoint is, read from its headers only (no weights are loaded)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from ..model.config import ModelArgs
from ..weights.directory import detect_format


def _tensor_table(path: Path, kind: str):
    """(args, {name: (dtype name, numel, stored bytes)}) from headers; tied outputs counted once."""
    table = {}
    if kind == "gguf":
        from ..model.config import from_gguf_metadata
        from ..weights.gguf import gguf_metadata, open_gguf

        reader = open_gguf(path)
        names = {t.name for t in reader.tensors}
        args = from_gguf_metadata(gguf_metadata(reader), where=str(path), has_output_tensor="output.weight" in names)
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                continue  # not a parameter: Llama 3.1's rope scaling, precomputed
            table[t.name] = (t.tensor_type.name, int(t.n_elements), int(t.n_bytes))
        return args, table
    if kind == "meta":
        from ..weights.meta import IGNORED, read_meta_params, shard_paths
        from ..weights.torch_zip import read_torch_file

        paths = shard_paths(path)
        shards = [read_torch_file(p) for p in paths]
        args = read_meta_params(path, shards)
        seen = set()
        for k, shard in enumerate(shards):
            for name, t in shard.items():
                if name in IGNORED or (t.storage, t.storage_offset) in seen:
                    continue  # a tied output.weight shares the embedding's storage: count it once
                if k > 0 and name.endswith("norm.weight"):
                    continue  # norms are replicated on every shard
                seen.add((t.storage, t.storage_offset))
                dtype, numel, nbytes = table.get(name, (t.dtype_name, 0, 0))
                table[name] = (dtype, numel + t.numel, nbytes + t.numel * t.storage.dtype.itemsize)
        if "output.weight" in shards[0] and "output.weight" not in table:
            args = args.replace(tie_word_embeddings=True)
        return args, table
    from ..model.config import from_hf_config
    from ..weights.hf import read_hf_tensors

    args = from_hf_config(path / "config.json")
    for name, t in read_hf_tensors(path).items():
        table[name] = (t.dtype_name, t.numel, t.numel * t.dtype.itemsize)
    return args, table


def describe(path: "str | Path") -> str:
    """A human-readable report on a checkpoint."""
    path = Path(path)
    kind = detect_format(path)
    from ..weights.mllama import is_mllama_directory
    if is_mllama_directory(path, kind):
        return _describe_vision(path, kind)
    args, table = _tensor_table(path, kind)
    params = sum(n for _, n, _ in table.values())
    stored = sum(b for _, _, b in table.values())
    by_dtype = Counter()
    for dtype, numel, _ in table.values():
        by_dtype[dtype] += numel
    dtypes = ", ".join(f"{d} {n / params:.1%}" for d, n in by_dtype.most_common())
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    on_disk = sum(p.stat().st_size for p in files)
    kv_per_token = 2 * args.n_layers * args.kv_heads * args.head_dim * 4  # float32 K and V, every layer
    names = {"gguf": "GGUF (llama.cpp)", "meta": "Meta (params.json + consolidated.NN.pth)",
             "hf": "Hugging Face (config.json + safetensors)"}
    lines = [
        f"path:        {path}",
        f"format:      {names[kind]}"
        + (f", {len(list(path.glob('consolidated.*.pth')))} shard(s)" if kind == "meta" else ""),
        f"config:      {_config_line(args)}",
        f"parameters:  {params:,} ({params / 1e9:.3f} B; config implies {args.param_count():,})",
        *([f"llama 4:     {_llama4_line(args)}"] if args.llama4 is not None else []),
        f"dtype:       {dtypes}",
        f"on disk:     {_mib(on_disk)}",
        "memory:",
        f"  weights as stored (default load; GGUF needs weights='packed'): {_mib(stored)}",
        f"  weights as float32 (weights='float32'):                         {_mib(4 * params)}",
        f"  KV cache, float32: {_mib(kv_per_token * 1024)} per 1k tokens, "
        f"{_mib(kv_per_token * args.max_seq_len)} at the full context of {args.max_seq_len:,} tokens",
    ]
    if params != args.param_count():
        # info reads headers only; say so when they contradict the config instead of printing both quietly.
        lines.append(f"warning:     the tensors hold {params:,} parameters, the config implies "
                     f"{args.param_count():,}: this checkpoint will not load as it is")
    return "\n".join(lines)


def _describe_vision(path: Path, kind: str) -> str:
    """A Llama 3.2 Vision checkpoint, from its config: the text decoder, the encoder, the sizes."""
    from ..vision import config as vc

    text, vision = (vc.from_params_json(path / "params.json") if kind == "meta"
                    else vc.from_hf_config(path / "config.json"))
    params = vc.param_count(text, vision)
    on_disk = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return "\n".join([
        f"path:        {path}",
        f"format:      {'Meta (params.json + consolidated.NN.pth)' if kind == 'meta' else 'Hugging Face (Mllama)'}",
        "model:       Llama 3.2 Vision (image encoder + gated cross-attention, llama_ref.vision)",
        f"config:      {_config_line(text)}",
        f"vision:      tiles {vision.chunk_size} px (patch {vision.patch_size}), up to {vision.max_num_chunks} per "
        f"image; encoder width {vision.width}, {vision.layers} + {vision.global_layers} global layers, "
        f"{vision.heads} heads, features of layers {list(vision.intermediate_layers)}; cross-attention before "
        f"text layers {list(vision.cross_layers)}",
        f"parameters:  {params:,} ({params / 1e9:.3f} B, from the config)",
        f"on disk:     {_mib(on_disk)}",
        f"memory:      {_mib(2 * params)} in bfloat16, {_mib(4 * params)} as float32",
    ])


def _llama4_line(args) -> str:
    """Experts, NoPE layers, chunking and the parameters one token reads, of a Llama 4 config."""
    from ..model.llama4_config import param_counts

    m = args.llama4
    active = param_counts(args)[1]
    return (f"{m.n_experts} experts of width {m.expert_hidden_dim} (top-{m.top_k}, plus a shared one) in "
            f"{len(m.moe_layers)} of {args.n_layers} layers; NoPE layers {list(m.nope_layers)}; attention chunk "
            f"{m.attention_chunk_size}; QK norm {'on' if m.use_qk_norm else 'off'}; temperature tuning "
            f"{'on' if m.attn_temperature_tuning else 'off'}; active parameters {active:,} ({active / 1e9:.3f} B)")


def _config_line(args: ModelArgs) -> str:
    parts = [f"dim {args.dim}", f"layers {args.n_layers}", f"heads {args.n_heads}", f"kv_heads {args.kv_heads}",
             f"head_dim {args.head_dim}", f"ffn {args.ffn_hidden_dim}", f"vocab {args.vocab_size}",
             f"norm_eps {args.norm_eps:g}", f"rope_theta {args.rope_theta:g}", f"context {args.max_seq_len}"]
    if args.rope_scaling is not None:
        s = args.rope_scaling
        parts.append(f"rope_scaling {s.kind} x{s.factor:g}")
    if args.tie_word_embeddings:
        parts.append("tied embeddings")
    return ", ".join(parts)


def _mib(n: float) -> str:
    n = float(n)
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def checksum_report(path: "str | Path", out=None) -> list:
    """`info --checksum`: hash the checkpoint's files. With a manifest (or Meta's checklist.chk), print each
    listed file as OK / MISMATCH / MISSING and raise WeightsError naming the first bad one; without, print
    the sha256 of every file. Hashing reads 1 MiB at a time."""
    import sys

    from ..weights.checksums import check, checkpoint_files, checksum_lists, file_digest, require_ok

    out = out or sys.stdout
    path = Path(path)
    root = path if path.is_dir() else path.parent
    if not path.exists():
        from ..weights.common import WeightsError
        raise WeightsError(f"{path}: no such file or directory")
    if not checksum_lists(path):
        print("checksums:   no manifest to check against; the sha256 of each file:", file=out, flush=True)
        for f in checkpoint_files(path):
            print(f"  {file_digest(f)}  {f.relative_to(root).as_posix()}", file=out, flush=True)
        return []

    def show(r):
        name = r.path.relative_to(root).as_posix() if r.path.is_relative_to(root) else str(r.path)
        print(f"  {name}: {r.status} ({r.algorithm}, {r.source})", file=out, flush=True)

    print("checksums:", file=out, flush=True)
    return require_ok(check(path, on_file=show))  # the same verdict and message as load(verify=True)

