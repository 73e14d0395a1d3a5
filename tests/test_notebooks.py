"""The teaching notebooks run top to bottom on the current code, and are stored clean.

Each notebook in notebooks/ is executed in a fresh Jupyter kernel started with this session's Python, with
matplotlib's non-interactive Agg backend, under a time budget per notebook. A cell that raises (an API that
changed, an assert in the notebook that no longer holds) fails the test with the notebook and cell named.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# A hang guard, not a speed target: each notebook takes well under a minute on an idle 2-core machine, but
# the suite runs them beside other tests on the same two cores.
NOTEBOOK_BUDGET_S = 600
KERNEL_NAME = "llama-ref-test-python"


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 8, f"expected the notebook sequence in {NOTEBOOK_DIR}, found {len(NOTEBOOKS)}"


def test_readme_lists_every_notebook():
    readme = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in NOTEBOOKS if p.name not in readme]
    assert not missing, f"notebooks/README.md does not list {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them before committing"


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory):
    """A kernelspec that runs this very interpreter, whatever `python` means on PATH."""
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL_NAME
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "llama_ref tests", "language": "python",
    }))
    return root


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, kernel_spec_dir, default_model_path, monkeypatch):
    # default_model_path: the default model is fetched (once, by the fixture) before the kernel needs it.
    monkeypatch.setenv("MPLBACKEND", "Agg")  # the kernel inherits it: plots render off-screen
    # One thread per kernel: the suite already runs a worker per core (pytest -n 2), and a multi-threaded
    # BLAS or Numba pool on an oversubscribed machine makes each small decode-sized product many times slower.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name=KERNEL_NAME,
                       kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernel_spec_dir)]))
    client = NotebookClient(nb, km=km, timeout=NOTEBOOK_BUDGET_S, allow_errors=False,
                            resources={"metadata": {"path": str(path.parent)}})
    deadline = time.monotonic() + NOTEBOOK_BUDGET_S
    client.reset_execution_trackers()
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{path.name}: over its {NOTEBOOK_BUDGET_S} s budget before cell {index}")
            client.timeout = max(1, int(remaining))  # no cell may outlast what is left of the budget
            try:
                client.execute_cell(cell, index)
            except CellExecutionError as e:
                pytest.fail(f"{path.name}, cell {index} failed:\n{e}", pytrace=False)
    executed = [c for c in nb.cells if c.cell_type == "code"]
    assert executed and all(c.get("execution_count") for c in executed), f"{path.name}: not every cell ran"
    errors = [o for c in executed for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs {[(o['ename'], o['evalue']) for o in errors]}"
