"""Run by tests/test_parallel.py under `mpirun -n N`: loads checkpoints with parallel="mpi" and writes what
every rank computed, for the test to compare with one process.

    python tests/mpi_worker.py OUT_DIR TOKENS SRC [SRC ...]

For each SRC (index i) rank 0 writes OUT_DIR/logits_{i}.npy: the logits of TOKENS (comma-separated ids)
run as a prefill of all but the last 3 tokens followed by 3 one-token decode steps, and OUT_DIR/ranks.json:
per rank and SRC, whether its logits are bitwise rank 0's, its resident memory (VmRSS after the imports,
after loading, the peak VmHWM) and the bytes of the weights it keeps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def memory_kib() -> dict:
    """VmRSS and VmHWM of this process, in KiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def main() -> None:
    out_dir, tokens, sources = Path(sys.argv[1]), [int(t) for t in sys.argv[2].split(",")], sys.argv[3:]
    import llama_ref
    from llama_ref.runtime.parallel import describe, mpi_world

    comm = mpi_world()
    reports = []
    for i, src in enumerate(sources):
        before = memory_kib()
        model = llama_ref.load(src, parallel="mpi")
        loaded = memory_kib()
        prefill = model.forward(tokens[:-3], 0)
        steps = [model.forward([t], len(tokens) - 3 + j) for j, t in enumerate(tokens[-3:])]
        logits = np.concatenate([prefill, *steps])
        rank0 = comm.bcast(logits if comm.Get_rank() == 0 else None, root=0)
        reports.append({"src": src, "rank": comm.Get_rank(), "same_as_rank0": bool(np.array_equal(logits, rank0)),
                        "rss_before_kib": before["VmRSS"], "rss_loaded_kib": loaded["VmRSS"],
                        "peak_loaded_kib": loaded["VmHWM"], "weight_bytes": describe(model).weight_bytes,
                        "local_heads": model.args.n_heads, "local_kv_heads": model.args.n_kv_heads})
        if comm.Get_rank() == 0:
            np.save(out_dir / f"logits_{i}.npy", logits)
        del model
    gathered = comm.gather(reports, root=0)
    if comm.Get_rank() == 0:
        (out_dir / "ranks.json").write_text(json.dumps(gathered, indent=1))


if __name__ == "__main__":
    main()
