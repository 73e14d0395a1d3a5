"""Checkpoint directories: tell Meta's layout from Hugging Face's and load either, with its tokenizer."""

from __future__ import annotations

from pathlib import Path

from .common import WeightsError

# The tokenizer.* metadata of a GGUF file as JSON: `llama-ref convert` writes it next to weights converted
# from GGUF, so the converted directory keeps the exact vocabulary, merges and chat template of the original.
TOKENIZER_SIDECAR = "tokenizer_gguf.json"


def detect_format(path: "str | Path") -> str:
    """'gguf', 'meta' or 'hf' for a checkpoint path; WeightsError when it is none of them."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as f:
            if f.read(4) == b"GGUF":
                return "gguf"
        raise WeightsError(f"{path}: not a GGUF file, and not a checkpoint directory")
    if not path.is_dir():
        raise WeightsError(f"{path}: no such file or directory")
    if (path / "params.json").exists() or any(path.glob("consolidated.*.pth")):
        return "meta"
    if (path / "config.json").exists():
        return "hf"
    raise WeightsError(f"{path}: neither a Meta checkpoint (params.json + consolidated.NN.pth) nor a "
                       f"Hugging Face one (config.json + model.safetensors)")


def directory_tokenizer(path: Path):
    """The directory's tokenizer, or None when it has none this package can read."""
    from ..text import tokenizer as tok

    if (path / TOKENIZER_SIDECAR).is_file():
        return tok.tokenizer_from_gguf(read_tokenizer_sidecar(path), where=str(path / TOKENIZER_SIDECAR))
    from ..text.tokenizer_export import source_tokenizer_model

    source = source_tokenizer_model(path)
    if source is not None:
        # A tokenizer.json that convert built from this tokenizer.model: the original is read instead (Meta's
        # chat formats and Code Llama infilling come with its tokenizer classes), with the config's template.
        found = tok.tokenizer_from_file(path / "tokenizer.model", llama3_version=source.get("llama3_version"))
        found.chat_template = tok._read_json(path / "tokenizer_config.json").get("chat_template") or None
        return found
    from_dir = getattr(tok, "tokenizer_from_dir", None)  # tokenizer.model / tokenizer.json readers
    if from_dir is None or not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return None  # weights only (e.g. a test checkpoint): the model still runs on token ids
    return from_dir(path)


def read_tokenizer_sidecar(path: Path) -> dict:
    """The GGUF tokenizer metadata saved beside converted weights ({key: value})."""
    import json

    try:
        meta = json.loads((path / TOKENIZER_SIDECAR).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path / TOKENIZER_SIDECAR}: unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise WeightsError(f"{path / TOKENIZER_SIDECAR}: expected a JSON object")
    return meta


def load_directory(path: "str | Path", keep: str = "stored", progress: bool = False, tokenizer: bool = True,
                   mmap: bool = False):
    """(args, weights, extras) of a Meta or HF directory; extras["tokenizer"] is its tokenizer or None.

    mmap: leave stored-precision tensors memory-mapped instead of reading them into memory."""
    path = Path(path)
    kind = detect_format(path)
    from .mllama import is_mllama_directory
    if is_mllama_directory(path, kind):
        raise WeightsError(f"{path}: a Llama 3.2 Vision checkpoint: llama_ref.load (and generate, chat) read it "
                           f"as a VisionModel; this tool handles text models only")
    from .llama4 import is_llama4_directory, load_llama4_hf, load_llama4_meta
    if is_llama4_directory(path, kind):  # Llama 4: expert tensors and their own names (weights.llama4)
        args, weights, extras = (load_llama4_meta if kind == "meta" else load_llama4_hf)(path, keep, progress)
    elif kind == "meta":
        from .meta import load_meta
        args, weights, extras = load_meta(path, keep=keep, progress=progress, mmap=mmap)
    elif kind == "hf":
        from .hf import load_hf
        args, weights, extras = load_hf(path, keep=keep, progress=progress, mmap=mmap)
    else:
        raise WeightsError(f"{path}: a GGUF file, not a directory")
    extras["tokenizer"] = directory_tokenizer(path) if tokenizer else None
    return args, weights, extras
