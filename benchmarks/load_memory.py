"""Peak resident memory while loading a checkpoint, against the bytes of the weights as kept.

The default model (SmolLM2-135M) is converted once into Meta and Hugging Face checkpoints in bf16 and f32
(a few hundred MB each) under --work. Each (checkpoint, weights mode) is then loaded in a fresh process,
which reports:
  baseline   RSS after importing llama_ref (before loading)
  peak load  peak RSS (VmHWM) once load() has returned
  kept       bytes of the weights as kept in memory (tied matrices counted once)
  ratio      (peak load - baseline) / kept; the target is <= 1.25
  after fwd  peak RSS after one 16-token forward pass (memory-mapped weights, mode "mmap", are then resident)
             (includes the pass's temporaries: one matrix widened to float32 at a time, logits, KV cache)

    python benchmarks/load_memory.py [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys
import numpy as np
import llama_ref
from llama_ref.weights.directory import load_directory

def status_mib(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) / 1024

def rss_mib():
    return status_mib('VmRSS')

def peak_mib():
    # VmHWM: the peak RSS of this process image (ru_maxrss would carry the parent's peak across exec).
    return status_mib('VmHWM')

path, keep, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "mmap"
baseline = rss_mib()
args, weights, extras = load_directory(path, keep=keep, tokenizer=False, mmap=mmap)
peak_load, rss_load = peak_mib(), rss_mib()
kept = sum({id(w): w.nbytes for w in weights.values()}.values()) / 2**20
model = llama_ref.Transformer(args, weights)
model.forward(np.arange(16) + 100)
print(json.dumps(dict(baseline=baseline, peak_load=peak_load, rss_after_load=rss_load, kept=kept,
                      kv=model.cache.nbytes / 2**20, peak_after_forward=peak_mib())))
"""


def prepare(work: Path) -> dict:
    """Meta/HF checkpoints of the default model, in bf16 and f32 (converted once, then reused)."""
    import llama_ref
    from llama_ref.tools.convert import convert

    src = llama_ref.fetch(llama_ref.DEFAULT_MODEL, progress=False)
    work.mkdir(parents=True, exist_ok=True)
    paths = {}
    for fmt in ("hf", "meta"):
        for dtype in ("bf16", "f32"):
            dst = work / f"smollm2-{fmt}-{dtype}"
            if not dst.exists():
                print(f"converting to {dst} ...", file=sys.stderr)
                convert(src, dst, fmt, dtype=dtype)
            paths[f"{fmt}-{dtype}"] = dst
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "llama_ref" / "bench-load")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rows = []
    for label, path in prepare(a.work).items():
        for keep, mode in (("stored", "read"), ("stored", "mmap"), ("float32", "read")):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), keep, mode], capture_output=True,
                                 text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(checkpoint=label, weights=keep, mode=mode,
                     on_disk=sum(p.stat().st_size for p in Path(path).iterdir()) / 2**20,
                     ratio=(r["peak_load"] - r["baseline"]) / r["kept"])
            rows.append(r)
            print(f"{label:10} {keep:8} {mode:5} kept {r['kept']:7.1f} MiB  baseline {r['baseline']:6.1f}  "
                  f"peak load {r['peak_load']:7.1f}  ratio {r['ratio']:.3f}  "
                  f"after fwd {r['peak_after_forward']:7.1f} (KV {r['kv']:.1f})", flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
