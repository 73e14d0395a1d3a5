"""Measure the differences reported in docs/verification.md. Run from the repository root:

    python docs/measure_verification.py            # every section (about 10 minutes on 2 busy cores)
    python docs/measure_verification.py hf meta    # some: hf, meta, perplexity, float64, formats

Prints one line per comparison: max and mean absolute difference of the logits, the relative difference
(max abs / max |reference logit|), argmax agreement and the largest KL(reference || ours) in nats.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

import llama_ref
from llama_ref.model.transformer import Transformer
from llama_ref.tools.verify import logits_diff

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def row(label: str, ours, ref) -> None:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    d = np.abs(ours - ref)
    lg = logits_diff(ours.reshape(-1, ours.shape[-1]), ref.reshape(-1, ref.shape[-1]))
    print(f"{label:<58} max abs {d.max():9.3g}  mean abs {d.mean():9.3g}  rel {d.max() / np.abs(ref).max():9.3g}"
          f"  argmax {int(lg.top1_agree.sum())}/{lg.top1_agree.size}  KL max {lg.kl.max():8.3g}", flush=True)


def hf_smollm2() -> None:
    """SmolLM2-135M-Instruct vs Hugging Face transformers, float32 eager (tests/data/smollm2_reference.npz)."""
    with np.load(DATA / "smollm2_reference.npz") as f:
        ref = {k: f[k] for k in f.files}
    for backend in ("numpy", "numba"):
        for dtype in (np.float32, np.float64):
            if backend == "numba" and dtype == np.float64:
                continue  # the kernels compute in float32; float64 falls through to NumPy
            model = llama_ref.load(llama_ref.DEFAULT_MODEL, backend=backend, dtype=dtype)
            for p in ("p0", "p1", "p2", "p3", "p4"):
                logits = model.forward(ref[f"{p}_ids"])  # (T, V)
                label = f"HF smollm2 {p} ({len(ref[f'{p}_ids'])} tok) {backend} {np.dtype(dtype).name}"
                if f"{p}_logits" in ref:
                    row(label + " full", logits, ref[f"{p}_logits"])
                else:
                    cols = logits[ref[f"{p}_cols_pos"]][:, ref["cols"]]
                    d = np.abs(cols - ref[f"{p}_logits_cols"])
                    top = np.take_along_axis(logits, ref[f"{p}_top_ids"], -1)
                    agree = int((np.argmax(logits, -1) == ref[f"{p}_argmax"]).sum())
                    worst = max(d.max(), np.abs(top - ref[f'{p}_top_logits']).max())
                    print(f"{label + ' cols/top64':<58} max abs {worst:9.3g}"
                          f"  mean abs {d.mean():9.3g}  argmax {agree}/{len(logits)}", flush=True)


def meta_tiny() -> None:
    """Tiny checkpoints vs Meta's llama-models reference code, float32 (tests/data/tiny_ckpt/reference.npz)."""
    ref = np.load(DATA / "tiny_ckpt" / "reference.npz")
    tokens = ref["tokens"]
    for name in ("llama31_bf16", "llama2_fp16", "llama32_tied"):
        for fmt in ("_meta", "_hf", ".gguf"):
            path = DATA / "tiny_ckpt" / f"{name}{fmt}"
            for dtype in (np.float32, np.float64):
                if fmt == ".gguf":  # the tiny GGUFs carry no tokenizer, so not through llama_ref.load
                    from llama_ref.weights.gguf import load_gguf
                    args, weights, extras = load_gguf(path)
                    model = Transformer(args, weights, dtype=dtype, freq_divisors=extras.get("freq_divisors"))
                else:
                    model = llama_ref.load(path, dtype=dtype)
                row(f"Meta llama-models {name}{fmt} {np.dtype(dtype).name}", model.forward(tokens), ref[f"{name}/full"])


def perplexity() -> None:
    """Perplexity of a text vs transformers (tests/data/smollm2_perplexity.json)."""
    ref = json.loads((DATA / "smollm2_perplexity.json").read_text(encoding="utf-8"))
    ids = np.array(ref["ids"])
    for dtype in (np.float32, np.float64):
        model = llama_ref.load(llama_ref.DEFAULT_MODEL, dtype=dtype)
        z = np.asarray(model.forward(ids[:-1]), np.float64)  # (T-1, V)
        z -= z.max(-1, keepdims=True)
        nll = -(z[np.arange(len(ids) - 1), ids[1:]] - np.log(np.exp(z).sum(-1)))
        ppl = float(np.exp(nll.mean()))
        print(f"perplexity {np.dtype(dtype).name}: {ppl:.6f} vs transformers {ref['perplexity_transformers']:.6f} "
              f"(rel {abs(ppl / ref['perplexity_transformers'] - 1):.3g}); max |token nll diff| "
              f"{np.abs(nll - np.array(ref['token_nll'])).max():.3g}", flush=True)


PROMPTS = {"5 tok": "The capital of France is",
           "33 tok": "Once upon a time, in a small village by the sea, there lived an old fisherman who told "
                     "stories to the children every evening about the storms he had seen."}


def float64_vs_float32() -> None:
    """float32 (NumPy and Numba) vs float64 NumPy, the same weights: pure rounding error."""
    formats(("gguf",))


def formats(kinds=("gguf", "q8_0", "int8", "q4_0", "q4_1")) -> None:
    """Each weight format: float32 arithmetic (NumPy, Numba kernels) vs float64 on the same weights, and
    the format's own quantization error (float64, requantized weights vs the GGUF's own weights)."""
    from llama_ref.weights.packed import quantize_weights

    base = llama_ref.load(llama_ref.DEFAULT_MODEL, weights="packed")
    for kind in kinds:
        weights = base.weights if kind == "gguf" else quantize_weights(base.weights, kind)
        for label, text in PROMPTS.items():
            ids = base.tokenizer.encode(text)
            exact = Transformer(base.args, weights, dtype=np.float64).forward(ids)
            for backend in ("numpy", "numba"):
                ours = Transformer(base.args, weights, dtype=np.float32, backend=backend).forward(ids)
                row(f"{kind} {label}: {backend} float32 vs numpy float64", ours, exact)
            if kind != "gguf":
                row(f"{kind} {label}: quantization (f64) vs GGUF Q4_1 weights (f64)", exact,
                    Transformer(base.args, base.weights, dtype=np.float64).forward(ids))


SECTIONS = {"hf": hf_smollm2, "meta": meta_tiny, "perplexity": perplexity, "float64": float64_vs_float32,
            "formats": formats}

if __name__ == "__main__":
    for name in sys.argv[1:] or ["hf", "meta", "perplexity", "formats"]:
        print(f"== {name}: {SECTIONS[name].__doc__.splitlines()[0]}")
        SECTIONS[name]()
