"""The teaching notebooks are stored executed (a reader browsing the repository sees every number and plot),
and they still run top to bottom on the current code, giving outputs of the stored structure.

Each notebook is executed by notebooks/execute.py's own function (the one that stored it) in a fresh
Jupyter kernel of this session's Python, under a time budget. A cell that raises (an API that changed, an
assert in the notebook that no longer holds) fails the test with the notebook and cell named; a cell whose
outputs change kind (a plot that is no longer drawn, a print that disappeared) fails it too. Values are not
compared: some cells time things live.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
sys.path.insert(0, str(NOTEBOOK_DIR))  # notebooks/execute.py
# nbformat, nbclient and notebooks/execute.py are imported by the tests that use them: every xdist worker imports
# every test module, and the fast tier runs none of these.

pytestmark = pytest.mark.slow  # each notebook runs 7-25 s; the fast tier checks the code they call

# A hang guard, not a speed target: each notebook takes well under a minute on an idle 2-core machine, but
# the suite runs them beside other tests on the same two cores.
NOTEBOOK_BUDGET_S = 600
MAX_STORED_BYTES = 400_000  # per notebook, outputs and plots included


def structure(nb) -> list:
    """Per code cell, the kinds of output it gave (with the MIME types of rich ones); stderr is left out
    (progress bars and warnings come and go)."""
    out = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kinds = []
        for o in cell.get("outputs", []):
            if o.output_type == "stream":
                if o.name == "stdout":
                    kinds.append("stdout")
            else:
                kinds.append((o.output_type, tuple(sorted(o.get("data", {})))))
        out.append([k for i, k in enumerate(kinds) if i == 0 or kinds[i - 1] != k])  # stdout chunks merge
    return out


def test_notebooks_exist():
    assert len(NOTEBOOKS) >= 8, f"expected the notebook sequence in {NOTEBOOK_DIR}, found {len(NOTEBOOKS)}"


def test_readme_lists_every_notebook():
    readme = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in NOTEBOOKS if p.name not in readme]
    assert not missing, f"notebooks/README.md does not list {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_executed(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    unrun = [i for i, c in enumerate(code) if c.get("execution_count") is None]
    assert not unrun, f"{path.name}: code cells {unrun} were not run; store it with `python notebooks/execute.py`"
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{path.name}: run out of order"
    errors = [o.ename for c in code for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"{path.name}: stored with errors {errors}"
    assert path.stat().st_size < MAX_STORED_BYTES, f"{path.name}: {path.stat().st_size} bytes stored"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_gives_the_stored_outputs(path, default_model_path, monkeypatch):
    import nbformat
    from execute import execute
    from nbclient.exceptions import CellExecutionError

    # default_model_path: the default model is fetched (once, by the fixture) before the kernel needs it.
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the inline backend, which stored the plots
    # One thread per kernel: the suite already runs a worker per core (pytest -n 2), and a multi-threaded
    # BLAS or Numba pool on an oversubscribed machine makes each small decode-sized product many times slower.
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        monkeypatch.setenv(name, "1")
    try:
        ran = execute(path, NOTEBOOK_BUDGET_S)
    except CellExecutionError as e:
        pytest.fail(f"{path.name}: a cell failed:\n{e}", pytrace=False)
    except TimeoutError as e:
        pytest.fail(str(e), pytrace=False)
    stored = nbformat.read(path, as_version=4)
    for index, (got, want) in enumerate(zip(structure(ran), structure(stored))):
        assert got == want, f"{path.name}, code cell {index}: outputs {got}, stored {want}"
