"""The tests that compare one Numba thread with two, run where two exist.

Under pytest-xdist each worker gets its share of the cores (conftest: on CI's 2 cores, NUMBA_NUM_THREADS=1 a
worker), so the tests below, which take the counts {1, min(2, NUMBA_NUM_THREADS)}, run on one thread twice there,
and the fused steps' parallel twins (kernels/ggml_step._layers_parallel, the products' parallel loops) go
unchecked. Here a child pytest (-n 0: no workers) runs them with NUMBA_NUM_THREADS=2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

TWO_THREAD_TESTS = [
    "test_ggml_step.py::test_q8_0_and_q4_k_m_equal_the_lines",
    "test_ggml_step.py::test_more_shares_than_threads_ends_and_equals_the_lines",
    "test_ggml_step.py::test_the_compiled_step_can_be_kept_in_numbas_disk_cache",
    "test_exact_step.py::test_equals_the_lines",
    "test_ggml_q4k_decode.py::test_q4_k_model_decode_equals_numpy_backend",
]


def two_threads_env() -> dict:
    """This process's environment for a child on two Numba threads: not an xdist worker (whose conftest would share
    the cores out again), the tests folder importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(NUMBA_NUM_THREADS="2", OMP_NUM_THREADS="2", LLAMA_REF_THREADS="2",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    return env


@pytest.mark.slow
def test_the_one_and_two_thread_comparisons_on_two_threads():
    env = two_threads_env()
    check = subprocess.run([sys.executable, "-c", "import numba; print(numba.config.NUMBA_NUM_THREADS)"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert check.stdout.strip() == "2", check.stderr
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                           *TWO_THREAD_TESTS], cwd=HERE, env=env, capture_output=True, text=True, timeout=1500)
    tail = proc.stdout[-3000:]
    assert proc.returncode == 0, tail + proc.stderr[-2000:]
    assert " passed" in tail and "skipped" not in tail and "deselected" not in tail, tail
