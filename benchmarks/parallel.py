"""Tensor parallelism on one machine: 1, 2 and 4 MPI ranks (Open MPI + mpi4py), memory and speed per rank.

A random bf16 Llama (GQA, default ~207M parameters, 415 MB) is written once under --work as Meta shards
for 1, 2 and 4 ranks (`convert --shards` layout) and as one file. For each N, `mpirun -n N` loads it with
parallel="mpi" (each rank its own consolidated.r.pth, and again re-slicing the single file) and reports
per rank:
  baseline    RSS after importing llama_ref and mpi4py, before loading
  peak load   peak RSS (VmHWM) once load() has returned
  kept        bytes of the weights this rank keeps (its slice)
  ratio       (peak load - baseline) / (all weights / N); the target is <= 1.10
then, after a warm-up, a prefill of --prefill tokens and --decode one-token steps (greedy) on --backend,
timed on rank 0, with the bytes each rank put into the collectives per decoded token (its own terms and
logits; it receives N - 1 times as much). BLAS and Numba threads per rank: cores // N (at least 1).

    python benchmarks/parallel.py [--work DIR] [--ranks 1 2 4] [--json out.json] [--md out.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys, time
from mpi4py import MPI
import numpy as np
import llama_ref
from llama_ref.runtime.parallel import describe

def status_mib(key):
    for line in open('/proc/self/status'):
        if line.startswith(key + ':'):
            return int(line.split()[1]) / 1024

src, prefill, decode, backend = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
comm = MPI.COMM_WORLD
if backend == 'numba':
    import llama_ref.kernels  # imported by load(); part of the process, not of the weights
baseline = status_mib('VmRSS')
t0 = time.perf_counter()
model = llama_ref.load(src, parallel='mpi', backend=backend)
load_s = time.perf_counter() - t0
peak = status_mib('VmHWM')
kept = describe(model).weight_bytes
ids = list(np.random.default_rng(0).integers(0, model.args.vocab_size, prefill))
model.forward(ids, 0)  # warm up (the Numba kernels compile, or load from their cache, on first use)
model.forward(ids[:1], prefill)
comm.Barrier()
t0 = time.perf_counter()
logits = model.forward(ids, 0, last_only=True)
prefill_s = time.perf_counter() - t0
sent0 = getattr(model.parallel, 'bytes_sent', 0)
calls0 = getattr(model.parallel, 'collectives', 0)
token = int(logits[-1].argmax())
comm.Barrier()
t0 = time.perf_counter()
for i in range(decode):
    token = int(model.forward([token], prefill + i)[-1].argmax())
decode_s = time.perf_counter() - t0
sent = (getattr(model.parallel, 'bytes_sent', 0) - sent0) / decode
calls = (getattr(model.parallel, 'collectives', 0) - calls0) / decode
row = dict(rank=comm.Get_rank(), baseline_mib=baseline, peak_load_mib=peak, kept_mib=kept / 2**20,
           load_s=load_s, prefill_s=prefill_s, decode_s=decode_s, sent_per_token=sent, collectives_per_token=calls,
           last_token=token, peak_after_mib=status_mib('VmHWM'))
rows = comm.gather(row, root=0)
if comm.Get_rank() == 0:
    print(json.dumps(rows))
"""


def make_checkpoints(work: Path, ranks: list[int], args_kw: dict) -> dict:
    import numpy as np

    from llama_ref.model.config import ModelArgs
    from llama_ref.weights.common import expected_shapes
    from llama_ref.weights.writers import write_meta

    args = ModelArgs(**args_kw)
    paths = {n: work / f"meta{n}" for n in sorted(set(ranks) | {1})}
    if all((p / "params.json").exists() for p in paths.values()):
        return {"args": args, "paths": paths}
    rng = np.random.default_rng(0)
    weights = {}
    for name, shape in expected_shapes(args).items():
        if name.endswith("norm.weight"):
            weights[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            weights[name] = (rng.standard_normal(shape, dtype=np.float32) * (0.5 / np.sqrt(shape[-1])))
    for n, p in paths.items():
        if not (p / "params.json").exists():
            write_meta(p, args, weights, "bf16", shards=n)
    return {"args": args, "paths": paths}


def run(n: int, src: Path, prefill: int, decode: int, backend: str) -> list:
    cores = len(os.sched_getaffinity(0))
    threads = str(max(1, cores // n))
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OPENBLAS_NUM_THREADS=threads, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads,
               NUMBA_NUM_THREADS=threads, OMPI_MCA_mpi_yield_when_idle="1")  # a waiting rank yields its core
    cmd = ["mpirun", "-n", str(n), "--oversubscribe", "--bind-to", "none", sys.executable, "-c", CHILD, str(src),
           str(prefill), str(decode), backend]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd[:6])} failed:\n{done.stderr[-3000:]}")
    # The JSON line of rank 0 (Numba may leave terminal escape codes in front of it).
    line = next(line for line in reversed(done.stdout.splitlines()) if "[{" in line)
    return json.JSONDecoder().raw_decode(line[line.index("[{"):])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llama_ref_parallel_bench"))
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--backend", choices=["numpy", "numba"], default="numba")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    opts = ap.parse_args()
    opts.work.mkdir(parents=True, exist_ok=True)
    made = make_checkpoints(opts.work, opts.ranks, dict(
        dim=opts.dim, n_layers=opts.layers, n_heads=16, n_kv_heads=8, vocab_size=opts.vocab, multiple_of=256,
        max_seq_len=1024, rope_theta=500000.0))
    args = made["args"]
    total_mib = 2 * args.param_count() / 2**20
    results = []
    for n in opts.ranks:
        for layout, src in (("own shard", made["paths"][n]), ("re-sliced file", made["paths"][1])):
            if n == 1 and layout == "re-sliced file":
                continue
            rows = run(n, src, opts.prefill, opts.decode, opts.backend)
            results.append({"ranks": n, "layout": layout, "rows": rows})
            r0 = rows[0]
            worst = max((r["peak_load_mib"] - r["baseline_mib"]) / (total_mib / n) for r in rows)
            print(f"{n} ranks, {layout}: decode {opts.decode / r0['decode_s']:.1f} tok/s, prefill "
                  f"{opts.prefill / r0['prefill_s']:.1f} tok/s, sent {r0['sent_per_token'] / 1024:.1f} KiB/token/rank, "
                  f"peak load - baseline <= {worst:.3f} x weights/N, baseline {r0['baseline_mib']:.0f} MiB",
                  flush=True)
    summary = {"params": args.param_count(), "weights_mib": total_mib, "dim": args.dim, "layers": args.n_layers,
               "heads": args.n_heads, "kv_heads": args.kv_heads, "vocab": args.vocab_size,
               "prefill": opts.prefill, "decode": opts.decode, "backend": opts.backend,
               "cores": len(os.sched_getaffinity(0)),
               "results": results}
    if opts.json:
        opts.json.write_text(json.dumps(summary, indent=1) + "\n")
    if opts.md:
        lines = [f"Random bf16 Llama: {args.param_count() / 1e6:.0f}M parameters ({total_mib:.0f} MiB), dim "
                 f"{args.dim}, {args.n_layers} layers, {args.n_heads} heads / {args.kv_heads} KV heads, vocabulary "
                 f"{args.vocab_size}; {summary['cores']} cores, backend {opts.backend}, "
                 f"BLAS/Numba threads per rank = cores / N; prefill "
                 f"{opts.prefill} tokens, {opts.decode} greedy decode steps.", "",
                 "| ranks | weights read from | decode tok/s | prefill tok/s | sent per token per rank | "
                 "collectives per token | kept per rank (MiB) | peak load - baseline (MiB) | / (weights / N) | "
                 "baseline RSS (MiB) |",
                 "|---|---|---|---|---|---|---|---|---|---|"]
        for res in results:
            rows, n = res["rows"], res["ranks"]
            r0 = rows[0]
            grow = max(r["peak_load_mib"] - r["baseline_mib"] for r in rows)
            lines.append(f"| {n} | {res['layout']} | {opts.decode / r0['decode_s']:.1f} | "
                         f"{opts.prefill / r0['prefill_s']:.1f} | {r0['sent_per_token'] / 1024:.1f} KiB | "
                         f"{r0['collectives_per_token']:.0f} | {max(r['kept_mib'] for r in rows):.1f} | {grow:.1f} | "
                         f"{grow / (total_mib / n):.3f} | {max(r['baseline_mib'] for r in rows):.0f} |")
        opts.md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
