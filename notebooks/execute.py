"""Run the teaching notebooks top to bottom in a fresh kernel of this Python, as the tests do, and store them
with their outputs so that a reader browsing the repository sees every printed number and plot:

    python notebooks/execute.py                 # every notebook, in place
    python notebooks/execute.py 03_rope.ipynb   # some

Plots are stored as PNG by the kernel's inline backend (72 dpi: small files). tests/test_notebooks.py runs
them again with the same function and checks that the outputs still have the stored structure.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent


def execute(path: Path, budget_s: float = 600) -> nbformat.NotebookNode:
    """The notebook at `path`, executed cell by cell in a new kernel running this interpreter; raises
    nbclient's CellExecutionError naming the cell that failed, or TimeoutError past budget_s."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    with tempfile.TemporaryDirectory() as kernels:
        spec = Path(kernels) / "llama-ref-notebooks"
        spec.mkdir()
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "llama_ref notebooks", "language": "python"}))
        km = KernelManager(kernel_name=spec.name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]))
        client = NotebookClient(nb, km=km, timeout=int(budget_s), allow_errors=False,
                                resources={"metadata": {"path": str(path.parent)}})
        deadline = time.monotonic() + budget_s
        with client.setup_kernel():
            for index, cell in enumerate(nb.cells):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{path.name}: over its {budget_s:.0f} s budget before cell {index}")
                client.timeout = max(1, int(remaining))  # no cell may outlast what is left of the budget
                client.execute_cell(cell, index)
    return nb


def main(argv: list[str]) -> int:
    paths = [HERE / a for a in argv] or sorted(HERE.glob("*.ipynb"))
    os.environ.pop("MPLBACKEND", None)  # the inline backend, so plots become stored images
    for path in paths:
        start = time.monotonic()
        nb = execute(path)
        nb.metadata.pop("widgets", None)
        nbformat.write(nb, path)
        print(f"{path.name}: {time.monotonic() - start:.0f} s, {path.stat().st_size / 1024:.0f} KiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
