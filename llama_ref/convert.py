"""`llama-ref convert SRC DST --to {meta,hf,gguf-f32,gguf-f16}`: between checkpoint formats, atomically.

The output is written under a temporary name beside DST (".DST.partial-<pid>") and renamed to DST only
once every byte is written, so an interrupted or failed conversion never leaves a plausible but broken
checkpoint under the final name. The tokenizer travels with the weights: tokenizer files are copied from a
checkpoint directory; from a GGUF file its tokenizer keys go into the output GGUF, or into a tokenizer-only
`tokenizer_gguf.json` inside a Meta/HF output directory (which llama_ref.load reads).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from .weights.common import WeightsError
from .weights.directory import TOKENIZER_SIDECAR, detect_format, load_directory, read_tokenizer_sidecar

TARGETS = ("meta", "hf", "gguf-f32", "gguf-f16")
DTYPES = ("bf16", "f16", "f32")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", TOKENIZER_SIDECAR)


def read_source(src: Path, progress: bool = False):
    """(format, args, weights, extras) of any checkpoint. GGUF matrices are dequantized to float32;
    16-bit Meta/HF matrices stay 16-bit."""
    kind = detect_format(src)
    if kind == "gguf":
        from .weights.gguf import load_gguf

        args, weights, extras = load_gguf(src, progress=progress)
        extras["tokenizer_meta"] = {k: v for k, v in extras["metadata"].items() if k.startswith("tokenizer.")}
        return kind, args, weights, extras
    args, weights, extras = load_directory(src, keep="stored", progress=progress, tokenizer=False, mmap=True)
    if (src / TOKENIZER_SIDECAR).is_file():
        extras["tokenizer_meta"] = read_tokenizer_sidecar(src)
    return kind, args, weights, extras


def _default_dtype(weights: dict) -> str:
    """The source's own matrix precision when it is one 16/32-bit float type; float32 otherwise."""
    from .weights.writers import weight_format

    kinds = {weight_format(w) for name, w in weights.items() if not name.endswith("norm.weight")}
    return kinds.pop() if len(kinds) == 1 and "quantized" not in kinds else "f32"


def convert(src: "str | Path", dst: "str | Path", to: str, dtype: Optional[str] = None,
            progress: bool = False) -> Path:
    """Convert checkpoint `src` to format `to` at `dst`. Returns dst."""
    src, dst = Path(src), Path(dst)
    _check_request(dst, to, dtype)
    kind, args, weights, extras = read_source(src, progress=progress)
    if not to.startswith("gguf") and extras.get("freq_divisors") is not None:
        args = args.replace(rope_scaling=_scaling_from_divisors(args, extras["freq_divisors"], src))
    copy_from = src if kind != "gguf" else None
    return write_checkpoint(args, weights, dst, to, dtype, tokenizer_meta=extras.get("tokenizer_meta"),
                            freq_divisors=extras.get("freq_divisors"), copy_tokenizer_from=copy_from,
                            progress=progress)


def _check_request(dst: Path, to: str, dtype: Optional[str]) -> None:
    if to not in TARGETS:
        raise WeightsError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    if dtype is not None and dtype not in DTYPES:
        raise WeightsError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if to.startswith("gguf") and dtype is not None and dtype != to[5:]:
        raise WeightsError(f"--to {to} fixes the dtype to {to[5:]}; --dtype {dtype} contradicts it")
    if dst.exists():
        raise WeightsError(f"{dst}: already exists; remove it or choose another name")
    if not dst.parent.is_dir():
        raise WeightsError(f"{dst.parent}: output folder does not exist")


def write_checkpoint(args, weights: dict, dst: "str | Path", to: str, dtype: Optional[str] = None, *,
                     tokenizer_meta: Optional[dict] = None, freq_divisors=None,
                     copy_tokenizer_from: Optional[Path] = None, progress: bool = False) -> Path:
    """Write loaded weights (canonical layout) as format `to` at `dst`, atomically. Returns dst."""
    from .weights import writers

    dst = Path(dst)
    _check_request(dst, to, dtype)
    out = to[5:] if to.startswith("gguf") else (dtype or _default_dtype(weights))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(weights), desc=f"writing {dst.name}", unit="tensor", leave=False)
    tick = bar.update if bar is not None else None
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    try:
        if to == "meta":
            writers.write_meta(tmp, args, weights, out, on_tensor=tick)
        elif to == "hf":
            writers.write_hf(tmp, args, weights, out, on_tensor=tick)
        else:
            writers.write_gguf(tmp, args, weights, out, metadata=tokenizer_meta, freq_divisors=freq_divisors,
                               on_tensor=tick)
        if tmp.is_dir():
            _carry_tokenizer(tmp, tokenizer_meta, copy_tokenizer_from)
        # The one step that makes the output visible: a rename within the folder is atomic.
        os.rename(tmp, dst)
    except BaseException:
        # Interrupted (Ctrl-C included) or failed: remove the partial output; DST never appeared.
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    finally:
        if bar is not None:
            bar.close()
    return dst


def _scaling_from_divisors(args, divisors, src: Path):
    """The Llama 3.1 rope_scaling that gives a GGUF's rope_freqs divisors (Meta and HF files state the
    scaling as numbers, not as a tensor). Tries Meta's published constants with the factor read off."""
    import numpy as np

    from .config import RopeScaling
    from .weights.writers import llama3_rope_divisors

    guess = RopeScaling("llama3", float(np.max(divisors)), 1.0, 4.0, 8192)
    again = llama3_rope_divisors(args.replace(rope_scaling=guess))
    if again is None or not np.allclose(again, divisors, rtol=1e-5, atol=0):
        raise WeightsError(f"{src}: its rope_freqs tensor matches no Llama 3 rope scaling; cannot write it "
                           f"as a config")
    return guess


def _carry_tokenizer(tmp: Path, tokenizer_meta: Optional[dict], src_dir: Optional[Path]) -> None:
    import json

    if src_dir is not None:
        for name in TOKENIZER_FILES:
            if (src_dir / name).is_file():
                shutil.copyfile(src_dir / name, tmp / name)
    elif tokenizer_meta:
        (tmp / TOKENIZER_SIDECAR).write_text(json.dumps(tokenizer_meta, ensure_ascii=False), encoding="utf-8")
