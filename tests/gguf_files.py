"""Tiny Llama GGUF files for tests, written with gguf.GGUFWriter: intact, quantized, or damaged on purpose.

The tensor names come from llama_ref's own Meta -> GGUF table (the one `llama-ref convert` writes with), and
metadata values are typed as that writer types them, so a test file is laid out as a converted model is.
Unlike `llama_ref.weights.writers.write_gguf`, this writer can also break a file: another architecture, a
tensor left out, a tensor of the wrong shape, or raw quantized blocks that gguf-py cannot make itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from llama_ref.model.config import ModelArgs
from llama_ref.text.tokenizer import _gpt2_byte_decoder
from llama_ref.weights.gguf import META_TO_GGUF
from llama_ref.weights.writers import _gguf_name, _gguf_value_type, add_hyperparameters


def byte_level_tokens() -> list[str]:
    """GPT-2's printable stand-in character for each byte 0..255: the single-byte tokens of a byte-level BPE."""
    chars = {b: ch for ch, b in _gpt2_byte_decoder().items()}
    return [chars[b] for b in range(256)]


def write_llama_gguf(path: Path, args: ModelArgs, weights: dict, metadata: Optional[dict] = None, *,
                    architecture: str = "llama", drop: str = "", reshape: str = "",
                    raw: Optional[dict] = None) -> Path:
    """A Llama GGUF at `path` holding `args` and `weights` (Meta names, float32).

    metadata: further keys in the order given (the tokenizer.* keys, llama.vocab_size, ...).
    architecture: general.architecture, and the prefix of every hyperparameter key.
    drop: a Meta tensor name left out of the file; reshape: one written without its last column.
    raw: Meta name -> (data, GGMLQuantizationType or None) for a tensor stored as that data instead: raw
        quantized blocks, or float16 values (None: the type follows the data's dtype).
    A tied output matrix is not stored, as llama.cpp does not store it.
    """
    import gguf

    w = gguf.GGUFWriter(str(path), architecture)
    add_hyperparameters(w, args)
    for key, value in (metadata or {}).items():
        w.add_key_value(key, value, *_gguf_value_type(value))
    for name, value in weights.items():
        if name == drop or (name == "output.weight" and args.tie_word_embeddings):
            continue
        gname = _gguf_name(name, META_TO_GGUF)
        if raw and name in raw:
            data, qtype = raw[name]
            w.add_tensor(gname, data, raw_dtype=qtype)
        else:
            w.add_tensor(gname, value[..., :-1] if name == reshape else value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
