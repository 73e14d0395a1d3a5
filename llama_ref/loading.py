"""llama_ref.load: from a path or a short name to a ready model with its tokenizer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .weights.fetch import MODELS, fetch
from .model.transformer import Transformer
from .weights.common import WeightsError


def load(path_or_name: "str | Path", *, backend: str = "numpy", arithmetic: str = "exact", dtype=np.float32,
         progress: bool = False, weights: "str | None" = None, quantize: "str | None" = None,
         mmap: bool = False, verify: bool = False, max_seq_len: "int | None" = None,
         parallel: "str | None" = None, tensor_parallel: "int | None" = None,
         threads: "int | None" = None, sums: "str | None" = None) -> Transformer:
    """Load a Llama model from a GGUF file, a checkpoint directory, or a fetchable name.

    backend: "numpy" (the reference) or "numba" (the same computation, compiled).
    arithmetic: "exact" (default): quantized weights are widened to float32 and multiplied with float32
        activations. "ggml": llama.cpp's CPU arithmetic (llama_ref.model.ggml, the specification): the
        activations are quantized to 8-bit blocks and multiplied in integers, with an fp16 KV cache and
        ggml's own softmax, RMSNorm, RoPE and SiLU; logits equal llama.cpp's token-at-a-time decode bit for
        bit on Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 GGUFs (docs/verification.md). Keeps weights packed; float32 only.
        "bf16": a bf16 engine's matrix products (llama_ref.model.bf16, the specification): each product's
        activations rounded to bfloat16, times the bf16 weights exactly, summed in float32; all else as
        "exact". Where the CPU has AMX, a bf16 prefill then takes one pass over the tiles instead of exact
        mode's three. Needs every matrix stored bf16 (kept packed); float32 only; sums "blas".
    dtype: the computation dtype, float32 (default) or float64 (to measure rounding error).
    weights: "float32" dequantizes every matrix at load; "packed" keeps 16-bit and quantized GGUF matrices
        in their stored blocks (llama_ref.weights.packed), converted one matrix at a time or in the kernels.
        None (default): "packed" for Meta / Hugging Face directories (bf16 stays 16-bit in memory),
        "float32" for GGUF files.
    quantize: None, or "int8" | "q8_0" | "q4_0" | "q4_1" to quantize the float matrices after loading.
    mmap: keep weights stored as is (float32, or 16-bit when packed) as read-only maps of the file instead
        of reading them into memory: loading is instant and pages are shared with the OS cache, but decode
        streams its weights from the page cache, which was ~20% slower for float32 on the machines measured
        (benchmarks/results). Quantized blocks are always repacked into owned memory.
    verify: before loading, hash the checkpoint's files and check them against its manifest (the
        checksums.sha256 or FILE.sha256 that `llama-ref convert` writes, Meta's checklist.chk, or the
        pinned sha256 of a fetched model); WeightsError names the first file that does not match, or says
        that there is no manifest to check against. Reads every byte once more (in 1 MiB chunks).
    max_seq_len: a context window shorter than the model's (less KV-cache memory, prompts truncated or
        refused sooner); None keeps the model's own. A longer one is refused: RoPE was not trained there.
    parallel: "mpi" to run under `mpirun -n N`: each rank reads and keeps only its slice of every matrix
        (Meta's model-parallel split, llama_ref.runtime.parallel) and the ranks compute every forward pass
        together; tensor_parallel=K makes groups of K ranks, each a whole model (data parallel across
        groups). The logits are the single-process ones up to float rounding of the sums.
    sums: how float32 matrix products are summed. "apart": the 8 columns of the input with its largest
        entries summed by themselves and added last (model.ops.linear_apart), for products of 16 rows or
        more, and a prompt's products of fewer rows summed in float64 (model.ops.linear_float64_sums):
        float32 logits closer to float64 than transformers' float32 on every prompt of the default model
        measured, prefill 200 at 0.93-1.03x the time of "blas" (Numba: its own float32 product,
        kernels/sgemm.py, on AVX-512; 0.96-1.03x on AVX2) and 1.03-1.35x (NumPy), and of a 5-15-token
        prompt 1.5-2.3x (benchmarks/float32_sums.py); decode steps keep the backend's own product.
        "blas": as NumPy's BLAS sums them, in chains of up to a few hundred inputs (OpenBLAS: 288 of 576).
        "blocked": the 8 largest columns apart and chains of 96 inputs added pairwise
        (model.ops.linear_blocked): closer still, prefill 1.2-1.55x slower (docs/verification.md, 2b).
        None (default): "apart" for arithmetic="exact" in one process, "blas" where "apart" is not
        implemented (arithmetic="ggml", parallel, vision checkpoints), which refuse "apart" and "blocked".
    threads: threads for BLAS and the Numba kernels alike, for the whole process (runtime.threads). None:
        the count set earlier in this process, else $LLAMA_REF_THREADS (or OMP_/OPENBLAS_/NUMBA_NUM_THREADS),
        else the physical cores. On the numba backend it is the most a one-token step uses: the step moves to
        fewer while fewer have been faster (another process holding a core; runtime.threads.StepThreads, off
        with $LLAMA_REF_ADAPT_THREADS=0), which changes no value.
    """
    if parallel is None or threads is not None:  # MPI ranks keep the count their launcher gave each
        from .runtime.threads import apply_threads

        apply_threads(threads)
    from .runtime.memory import keep_freed_memory

    keep_freed_memory()  # a forward pass's temporaries reuse freed memory (runtime/memory.py)
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or max_seq_len < 1):
        raise WeightsError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
    if weights is not None and weights not in ("float32", "packed"):
        raise WeightsError(f"weights must be 'float32' or 'packed', got {weights!r}")
    if arithmetic not in ("exact", "ggml", "bf16"):
        raise WeightsError(f"arithmetic must be 'exact', 'ggml' or 'bf16', got {arithmetic!r}")
    if sums is not None and sums not in ("blas", "apart", "blocked"):
        raise WeightsError(f"sums must be 'apart', 'blocked' or 'blas', got {sums!r}")
    if sums in ("apart", "blocked") and (arithmetic == "ggml" or parallel is not None):
        raise WeightsError(f"sums={sums!r} is implemented for arithmetic='exact' in one process only")
    if arithmetic == "ggml":
        from .model.ggml import check_options
        weights = check_options(weights=weights, dtype=dtype, parallel=parallel)
    if arithmetic == "bf16":
        from .model.bf16 import check_options
        weights = check_options(weights=weights, dtype=dtype, parallel=parallel, sums=sums)
    if quantize is not None:
        from .weights.packed import QUANTIZERS
        if quantize not in QUANTIZERS:
            raise WeightsError(f"quantize must be one of {', '.join(QUANTIZERS)}, got {quantize!r}")
    source = str(path_or_name)
    path = Path(source).expanduser()
    if not path.exists():
        models = sorted(name for name, spec in MODELS.items() if spec.kind == "model")
        if source.lower() in models:
            path = fetch(source, progress=progress)
        elif source.lower() in MODELS:
            raise WeightsError(f"{source}: this name is a {MODELS[source.lower()].kind} file, not a model "
                               f"(models: {', '.join(models)})")
        else:
            raise WeightsError(f"{source}: no such file or directory, and not a known model name "
                               f"({', '.join(models)})")
    if verify:
        from .weights.checksums import verify as verify_checksums
        verify_checksums(path)
    if path.is_dir():
        from .vision.load import is_vision_checkpoint, load_vision
        if is_vision_checkpoint(path):  # Llama 3.2 Vision: an image encoder and cross-attention (llama_ref.vision)
            if arithmetic != "exact":
                raise WeightsError(f"{path}: arithmetic={arithmetic!r} is not implemented for vision checkpoints")
            if sums not in (None, "blas"):
                raise WeightsError(f"{path}: sums={sums!r} is not implemented for vision checkpoints")
            return load_vision(path, backend=backend, dtype=dtype, progress=progress, weights=weights,
                               quantize=quantize, mmap=mmap, max_seq_len=max_seq_len, parallel=parallel)
    if parallel is not None:
        from .runtime.parallel import load_parallel, parallel_options

        parallel_options(parallel, quantize=quantize, mmap=mmap, weights=weights)
        return load_parallel(path, tensor_parallel=tensor_parallel, backend=backend, dtype=dtype,
                             keep="float32" if weights == "float32" else "stored", progress=progress,
                             max_seq_len=max_seq_len, quantize=quantize)
    if path.is_file() and path.suffix == ".gguf" or path.is_file() and _is_gguf(path):
        from .text.tokenizer import tokenizer_from_gguf
        from .weights.gguf import load_gguf

        args, tensors, extras = load_gguf(path, progress=progress, packed=weights == "packed", mmap=mmap)
        tokenizer = tokenizer_from_gguf(extras["metadata"], where=str(path))
    elif path.is_dir():
        # Meta (params.json + consolidated.NN.pth) or Hugging Face (config.json + safetensors).
        from .weights.directory import load_directory

        args, tensors, extras = load_directory(path, keep="float32" if weights == "float32" else "stored",
                                               progress=progress, mmap=mmap)
        tokenizer = extras["tokenizer"]
    else:
        raise WeightsError(f"{path}: not a recognised checkpoint (expected a .gguf file or a Meta / "
                           f"Hugging Face checkpoint directory)")
    if tokenizer is not None and tokenizer.vocab_size > args.vocab_size:
        raise WeightsError(f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{args.vocab_size} embeddings")
    if quantize is not None:
        from .weights.packed import quantize_weights
        tensors = quantize_weights(tensors, quantize, where=str(path))
    if max_seq_len is not None:
        if max_seq_len > args.max_seq_len:
            raise WeightsError(f"{path}: a context of {max_seq_len} tokens is longer than the model's "
                               f"{args.max_seq_len}")
        args = args.replace(max_seq_len=max_seq_len)
    name = backend
    if arithmetic == "ggml":
        from .model.ggml import backend_for
        backend = backend_for(backend, tensors, where=str(path))
    if arithmetic == "bf16":
        from .model.bf16 import backend_for
        backend = backend_for(backend, tensors, where=str(path), n_layers=args.n_layers, llama4=args.llama4)
    if sums is None:  # the default: the closest float32 sums where they are implemented
        sums = "apart" if arithmetic == "exact" else "blas"
    if sums != "blas":
        from .model.ops import with_sums
        from .model.transformer import _resolve_backend
        backend = with_sums(_resolve_backend(backend)[1], sums)
    model = Transformer(args, tensors, backend=backend, dtype=dtype, freq_divisors=extras.get("freq_divisors"))
    model.backend_name, model.arithmetic = name, arithmetic
    model.tokenizer = tokenizer
    model.source = path
    return model


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"
