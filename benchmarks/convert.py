"""Write a GGUF again with every matrix in another format (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).

The shipped SmolLM2 GGUF is Q4_1 (embedding Q8_0). The F32 file holds exactly its dequantized values, so
llama.cpp and llama_ref compare on the same numbers; the Q8_0 / Q4_0 files requantize those values with
gguf.quants (bit-exact with llama.cpp's quantizer); benchmarks/shapes.py rewrites its F16 files the same way
(every 2-D tensor in the one format: "pure", no llama.cpp mixture). Metadata and tokenizer are copied unchanged, except
general.file_type. The file appears only once complete (written to a temporary name, then renamed).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# llama_ftype values of llama.h, recorded in general.file_type
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}
CHUNK = 1 << 24  # values quantized at a time: gguf.quants' temporaries for a 1B embedding were several GB


def quantize_rows(values: np.ndarray, qtype) -> np.ndarray:
    """gguf.quants.quantize of values (rows, cols), CHUNK values at a time. Blocks never cross a row, so the
    bytes are those of one call."""
    import gguf

    step = max(1, CHUNK // values.shape[1])
    return np.concatenate([gguf.quants.quantize(values[r:r + step], qtype) for r in range(0, values.shape[0], step)])


def convert_gguf(src: "str | Path", dst: "str | Path", fmt: str) -> Path:
    """Copy GGUF `src` to `dst` with every 2-D tensor stored as `fmt` (one of FILE_TYPES)."""
    import gguf

    src, dst = Path(src), Path(dst)
    if fmt not in FILE_TYPES:
        raise ValueError(f"format must be one of {', '.join(FILE_TYPES)}, got {fmt!r}")
    qtype = getattr(gguf.GGMLQuantizationType, fmt)
    reader = gguf.GGUFReader(str(src), "r")
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_name(dst.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue  # written by the writer itself
        value = FILE_TYPES[fmt] if key == "general.file_type" else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # (rows, cols), row-major like PyTorch
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if len(shape) == 2 and fmt != "F32":
            writer.add_tensor(t.name, quantize_rows(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst
