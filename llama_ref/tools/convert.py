"""`llama-ref convert SRC DST --to {meta,hf,gguf-f32,gguf-f16}`: between checkpoint formats, atomically.

The output is written under a temporary name beside DST (".DST.partial-<host>-<pid>"), every file and
folder of it is fsync'ed, and only then is it renamed to DST (and the parent folder fsync'ed), so an
interrupted or failed conversion never leaves a plausible but broken checkpoint under the final name, and a
power cut after the rename cannot leave DST with holes. What is left of an interrupted run:

- an exception or Ctrl-C (KeyboardInterrupt) removes the partial output before it propagates;
- a run killed outright (SIGKILL, SIGTERM, a crash) cannot clean up after itself, so its partial output
  stays; the next convert to the same DST removes every partial of DST whose writer is gone. The writer is
  named in the partial's name: a partial written on this host (socket.gethostname()) by a pid that no
  longer exists is stale. A partial of another host (a shared filesystem) or of a live pid is left alone:
  that writer may still be running (a reused pid only delays the cleanup, it never removes live work).

Unless checksums=False (`--no-checksums`), the output carries a manifest of the sha256 of every file it
holds, in sha256sum's format (llama_ref.weights.checksums): DST/checksums.sha256 inside a directory, written before
the rename; DST.sha256 beside a GGUF file, renamed into place just after it (an interruption between the two
renames leaves a complete DST without its manifest, never a manifest without its file).

The tokenizer travels with the weights: tokenizer files are copied from a checkpoint directory; from a GGUF
file its tokenizer keys go into the output GGUF, or into a tokenizer-only `tokenizer_gguf.json` inside a
Meta/HF output directory (which llama_ref.load reads). An HF output also gets the tokenizer.json,
tokenizer_config.json and generation_config.json that transformers reads, and a Meta output the
tokenizer.model of a SentencePiece vocabulary (llama_ref.text.tokenizer_export); a GGUF output from a
directory with a Llama 3 or Llama 4 tiktoken tokenizer.model gets its vocabulary as tokenizer.* keys.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Optional

from ..weights.common import WeightsError
from ..weights.directory import TOKENIZER_SIDECAR, detect_format, load_directory, read_tokenizer_sidecar

TARGETS = ("meta", "hf", "gguf-f32", "gguf-f16")
DTYPES = ("bf16", "f16", "f32")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", TOKENIZER_SIDECAR)


def read_source(src: Path, progress: bool = False):
    """(format, args, weights, extras) of any checkpoint. GGUF matrices are dequantized to float32;
    16-bit Meta/HF matrices stay 16-bit."""
    kind = detect_format(src)
    if kind == "gguf":
        from ..weights.gguf import load_gguf

        args, weights, extras = load_gguf(src, progress=progress)
        extras["tokenizer_meta"] = {k: v for k, v in extras["metadata"].items() if k.startswith("tokenizer.")}
        return kind, args, weights, extras
    args, weights, extras = load_directory(src, keep="stored", progress=progress, tokenizer=False, mmap=True)
    if (src / TOKENIZER_SIDECAR).is_file():
        extras["tokenizer_meta"] = read_tokenizer_sidecar(src)
    return kind, args, weights, extras


def _default_dtype(weights: dict) -> str:
    """The source's own matrix precision when it is one 16/32-bit float type; float32 otherwise."""
    from ..weights.writers import weight_format

    kinds = {weight_format(w) for name, w in weights.items() if not name.endswith("norm.weight")}
    return kinds.pop() if len(kinds) == 1 and "quantized" not in kinds else "f32"


def convert(src: "str | Path", dst: "str | Path", to: str, dtype: Optional[str] = None,
            progress: bool = False, checksums: bool = True, shards: int = 1) -> Path:
    """Convert checkpoint `src` to format `to` at `dst`. Returns dst.

    shards: for --to meta, write that many model-parallel shards consolidated.00.pth .. (Meta's layout,
    for `mpirun -n N ... --parallel mpi` to read one each)."""
    src, dst = Path(src), Path(dst)
    _check_request(dst, to, dtype, shards)
    kind, args, weights, extras = read_source(src, progress=progress)
    if to.startswith("gguf") and kind != "gguf" and extras.get("tokenizer_meta") is None:
        extras["tokenizer_meta"] = _gguf_tokenizer_of(src)
    if not to.startswith("gguf") and extras.get("freq_divisors") is not None:
        args = args.replace(rope_scaling=_scaling_from_divisors(args, extras["freq_divisors"], src))
    copy_from = src if kind != "gguf" else None
    return write_checkpoint(args, weights, dst, to, dtype, tokenizer_meta=extras.get("tokenizer_meta"),
                            freq_divisors=extras.get("freq_divisors"), copy_tokenizer_from=copy_from,
                            progress=progress, checksums=checksums, shards=shards)


def _gguf_tokenizer_of(src: Path) -> Optional[dict]:
    """The tokenizer.* GGUF keys for a directory's Llama 3 / Llama 4 tiktoken tokenizer.model (llama.cpp
    cannot load a GGUF without a vocabulary); None when it has none. One that cannot be written is a warning:
    the weights are still right."""
    import warnings

    from ..text.tokenizer import TokenizerError, is_tiktoken_file, tokenizer_from_dir
    from ..text.tokenizer_export import gguf_metadata_from_tokenizer_model

    model = src / "tokenizer.model"
    if not (model.is_file() and is_tiktoken_file(model)):
        return None
    try:
        return gguf_metadata_from_tokenizer_model(model, tokenizer_from_dir(src))
    except TokenizerError as e:
        warnings.warn(f"the tokenizer was not written into the GGUF file: {e}", stacklevel=3)
        return None


def _check_request(dst: Path, to: str, dtype: Optional[str], shards: int = 1) -> None:
    if to not in TARGETS:
        raise WeightsError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise WeightsError(f"--shards must be a positive integer, got {shards!r}")
    if shards != 1 and to != "meta":
        raise WeightsError(f"--shards {shards}: only Meta's format (--to meta) is written as model-parallel shards")
    if dtype is not None and dtype not in DTYPES:
        raise WeightsError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if to.startswith("gguf") and dtype is not None and dtype != to[5:]:
        raise WeightsError(f"--to {to} fixes the dtype to {to[5:]}; --dtype {dtype} contradicts it")
    if dst.exists():
        raise WeightsError(f"{dst}: already exists; remove it or choose another name")
    if to.startswith("gguf") and _file_manifest(dst).exists():
        raise WeightsError(f"{_file_manifest(dst)}: already exists (the checksums of an earlier {dst.name}?); "
                           f"remove it or choose another name")
    if not dst.parent.is_dir():
        raise WeightsError(f"{dst.parent}: output folder does not exist")


def write_checkpoint(args, weights: dict, dst: "str | Path", to: str, dtype: Optional[str] = None, *,
                     tokenizer_meta: Optional[dict] = None, freq_divisors=None,
                     copy_tokenizer_from: Optional[Path] = None, progress: bool = False,
                     checksums: bool = True, shards: int = 1) -> Path:
    """Write loaded weights (canonical layout) as format `to` at `dst`, atomically, with a manifest of
    sha256 checksums unless checksums=False. Returns dst."""
    from ..weights import writers

    dst = Path(dst)
    _check_request(dst, to, dtype, shards)
    if shards != 1:
        if args.llama4 is not None:  # a count that cannot split this model fails before writing
            from ..weights.llama4 import shard_args
            shard_args(args, shards, f"--shards {shards}")
        else:
            writers.meta_shard_plans(args, shards)
    out = to[5:] if to.startswith("gguf") else (dtype or _default_dtype(weights))
    remove_stale_partials(dst)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(weights) * shards, desc=f"writing {dst.name}", unit="tensor", leave=False)
    tick = bar.update if bar is not None else None
    tmp = _partial_path(dst)
    manifest_tmp = None
    try:
        if to == "meta":
            writers.write_meta(tmp, args, weights, out, on_tensor=tick, shards=shards)
        elif to == "hf":
            writers.write_hf(tmp, args, weights, out, on_tensor=tick)
        else:
            writers.write_gguf(tmp, args, weights, out, metadata=tokenizer_meta, freq_divisors=freq_divisors,
                               on_tensor=tick)
        if tmp.is_dir():
            _carry_tokenizer(tmp, tokenizer_meta, copy_tokenizer_from, to, args.max_seq_len)
            if checksums:
                from ..weights.checksums import MANIFEST, checkpoint_files, manifest_for

                (tmp / MANIFEST).write_text(manifest_for(tmp, checkpoint_files(tmp)), encoding="utf-8")
        elif checksums:
            from ..weights.checksums import manifest_for

            manifest_tmp = _partial_path(_file_manifest(dst))
            manifest_tmp.write_text(manifest_for(dst.parent, [tmp], [dst.name]), encoding="utf-8")
        # Every byte on disk before the rename makes the output visible.
        _fsync_tree(tmp)
        if manifest_tmp is not None:
            _fsync_tree(manifest_tmp)
        if dst.exists():  # created by someone else while we wrote: never replace it
            raise WeightsError(f"{dst}: appeared while converting; the output was not written")
        # The one step that makes the output visible: a rename within the folder is atomic.
        os.rename(tmp, dst)
        if manifest_tmp is not None:
            os.rename(manifest_tmp, _file_manifest(dst))
        _fsync_dir(dst.parent)  # the renames themselves survive a power cut
    except BaseException:
        # Interrupted (Ctrl-C included) or failed: remove the partial output; DST never appeared.
        _remove(tmp)
        if manifest_tmp is not None:
            _remove(manifest_tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
    return dst


def _scaling_from_divisors(args, divisors, src: Path):
    """The Llama 3.1 rope_scaling that gives a GGUF's rope_freqs divisors (Meta and HF files state the
    scaling as numbers, not as a tensor). Tries Meta's published constants with the factor read off: Llama
    3.1's high_freq_factor 4, or Llama 4 Scout's 1 (llama4/args.py)."""
    import numpy as np

    from ..model.config import RopeScaling
    from ..weights.writers import llama3_rope_divisors

    for high in ((1.0, 4.0) if args.llama4 is not None else (4.0,)):
        guess = RopeScaling("llama3", float(np.max(divisors)), 1.0, high, 8192)
        again = llama3_rope_divisors(args.replace(rope_scaling=guess))
        if again is not None and np.allclose(again, divisors, rtol=1e-5, atol=0):
            return guess
    raise WeightsError(f"{src}: its rope_freqs tensor matches no Llama 3 rope scaling; cannot write it "
                       f"as a config")


def _carry_tokenizer(tmp: Path, tokenizer_meta: Optional[dict], src_dir: Optional[Path], to: str = "",
                     max_len: Optional[int] = None) -> None:
    """Copy the source directory's tokenizer files (or write a GGUF's tokenizer as the sidecar), then add
    what the target format's own tools read (llama_ref.text.tokenizer_export): for `hf` a tokenizer.json with
    tokenizer_config.json and generation_config.json, for `meta` a tokenizer.model where the vocabulary has
    one. A tokenizer that cannot be written in the target's form is a warning, not a failed conversion: the
    weights and the copied files are still right."""
    import json
    import warnings

    from ..text.tokenizer import TokenizerError
    from ..text.tokenizer_export import TOKENIZER_CONFIG, hf_tokenizer_files, meta_tokenizer_files

    if src_dir is not None:
        for name in TOKENIZER_FILES:
            if (src_dir / name).is_file():
                shutil.copyfile(src_dir / name, tmp / name)
    elif tokenizer_meta:
        (tmp / TOKENIZER_SIDECAR).write_text(json.dumps(tokenizer_meta, ensure_ascii=False), encoding="utf-8")
    try:
        if to == "hf":
            files = hf_tokenizer_files(tokenizer_meta, src_dir, max_len)
        elif to == "meta":
            files = meta_tokenizer_files(tokenizer_meta, src_dir)
        else:
            files = {}
    except TokenizerError as e:
        warnings.warn(f"the tokenizer was not written in {to} form: {e}", stacklevel=3)
        return
    for name, data in files.items():
        if name == TOKENIZER_CONFIG or not (tmp / name).exists():  # a source's config is rewritten (its class)
            target = tmp / name
            target.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    if to == "meta" and src_dir is not None:
        _keep_llama3_special_names(tmp, src_dir)


def _keep_llama3_special_names(tmp: Path, src_dir: Path) -> None:
    """A Llama 3 tiktoken tokenizer.model is read with 3.1's special-token names when params.json has the
    key use_scaled_rope (3.0's files lack it; tokenizer_from_dir). Our params.json writes the scaling out as
    rope_scaling instead, so the key is added, true exactly when the scaling is Llama 3's, to keep the
    names the source was read with (a 3.1 tokenizer would otherwise come back with 3.0's names)."""
    import json

    from ..text.tokenizer import _read_json, is_tiktoken_file
    from ..text.tokenizer_export import source_tokenizer_model

    model, params_path = tmp / "tokenizer.model", tmp / "params.json"
    if not (model.is_file() and params_path.is_file() and is_tiktoken_file(model)):
        return
    # The names the source was read with: as an HF output of ours records them, else by tokenizer_from_dir's
    # rule (no params.json: tokenizer_from_file's default, 3.1).
    source = source_tokenizer_model(src_dir)
    if source is not None:
        version = source.get("llama3_version") or "3.1"
    elif (src_dir / "params.json").is_file():
        version = "3.1" if "use_scaled_rope" in _read_json(src_dir / "params.json") else "3.0"
    else:
        version = "3.1"
    if version != "3.1":
        return
    params = json.loads(params_path.read_text(encoding="utf-8"))
    if "use_scaled_rope" not in params:
        params["use_scaled_rope"] = (params.get("rope_scaling") or {}).get("kind") == "llama3"
        params_path.write_text(json.dumps(params, indent=2) + "\n")


# ---- partial outputs: naming, fsync, removal --------------------------------------------------------------

_PARTIAL = ".partial-"


def _file_manifest(dst: Path) -> Path:
    """The checksum manifest beside a single-file output."""
    return dst.with_name(dst.name + ".sha256")


def _partial_path(final: Path) -> Path:
    """The hidden name a file or directory is written under until it is complete: ".NAME.partial-HOST-PID"."""
    return final.parent / f".{final.name}{_PARTIAL}{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process there; never guess
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def remove_stale_partials(dst: "str | Path") -> list[Path]:
    """Remove the partial outputs of DST (and of its manifest) whose writer was killed: written on this host
    by a pid that no longer exists. Best effort: one that cannot be removed stays. Returns what was removed."""
    dst = Path(dst)
    host = socket.gethostname()
    prefixes = (f".{dst.name}{_PARTIAL}", f".{dst.name}.sha256{_PARTIAL}")
    try:
        entries = list(os.scandir(dst.parent))
    except OSError:
        return []
    removed = []
    for entry in entries:
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None:
            continue
        writer_host, _, pid = entry.name[len(prefix):].rpartition("-")
        if not pid.isdigit() or writer_host not in (host, ""):  # "": named before the host was part of it
            continue
        if int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:
                _remove(Path(entry.path))
            except OSError:
                continue
            removed.append(Path(entry.path))
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a directory (the folder last)."""
    if not path.is_dir():
        _fsync_file(path)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_file(Path(root) / name)
        _fsync_dir(Path(root))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)  # write access: Windows' fsync (_commit) needs it
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """fsync a folder, so the names created or renamed in it are on disk; a no-op where folders cannot be
    opened (Windows) or fsync'ed (some filesystems answer EINVAL)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
