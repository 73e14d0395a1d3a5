"""Peak resident memory while loading a Llama 3.2 Vision checkpoint, against the bytes of its weights.

The whole 11B Vision model (21.3 GB in bfloat16) does not fit this machine beside the others' work, so the
checkpoint written here is shape-faithful but has fewer layers: every tensor has the 11B Instruct shape
(text width 4096, vocabulary 128256, FFN 14336; encoder width 1280 with 4 x 1601-token tiles, its positional
tables, the 7680 -> 4096 projection), with 2 text layers, 1 cross-attention layer, 5 local encoder layers (the
5 intermediate features, so the projection keeps its 7680 inputs) and 1 global layer. Its tensors are zeros
(their bytes, not their values, decide memory). Written in Meta's format (params.json + consolidated.00.pth,
bf16), then loaded in a fresh process, which reports:
  baseline   RSS after importing llama_ref
  peak load  peak RSS (VmHWM) once the loader has returned
  kept       bytes of the weights as kept (16-bit matrices packed; norms, gates, embeddings added to activations
             widened to float32)
  ratio      (peak load - baseline) / kept; the target is <= 1.1
It also prints what the full 11B model needs in bfloat16 (parameter count x 2 bytes, from the preset).

    python benchmarks/vision_load_memory.py [--work DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys
from pathlib import Path

def status_mib(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) / 1024

import llama_ref
from llama_ref.weights.mllama import load_mllama
baseline = status_mib('VmRSS')
text, vision, weights, extras = load_mllama(Path(sys.argv[1]), "meta")
peak = status_mib('VmHWM')
kept = sum(w.nbytes for w in weights.values()) / 2**20
print(json.dumps(dict(baseline=baseline, peak_load=peak, rss_after_load=status_mib('VmRSS'), kept=kept)))
"""


def reduced_params() -> dict:
    from llama_ref.vision.config import PRESETS
    p = dict(PRESETS["llama-3.2-11b-vision-instruct"][0])
    p.update(n_layers=2, vision_num_cross_attention_layers=1,
             vision_encoder={"layers": 5, "global_layers": 1, "intermediate_layers": [0, 1, 2, 3, 4]})
    return p


def write_checkpoint(dst: Path) -> int:
    """params.json and a zero-filled consolidated.00.pth in bf16; returns the bytes of the weights."""
    from llama_ref.vision.config import from_params_json
    from llama_ref.weights.mllama import vision_shapes
    from llama_ref.weights.writers import write_torch_file

    dst.mkdir(parents=True, exist_ok=True)
    params = reduced_params()
    text, vision = from_params_json(params)
    tensors = []
    for name, shape in vision_shapes(text, vision).items():
        meta_name = name if name.startswith("vision_model.") else "text_model." + name
        tensors.append((meta_name, np.zeros(shape, np.uint16), "bf16"))  # zero pages: no memory until read
    (dst / "params.json").write_text(json.dumps(params, indent=1))
    write_torch_file(dst / "consolidated.00.pth", tensors)
    return sum(t.nbytes for _, t, _ in tensors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llama_ref_vision_mem"))
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    from llama_ref.vision.config import param_count, preset

    text, vision = preset("llama-3.2-11b-vision-instruct")
    full = param_count(text, vision)
    print(f"Llama 3.2 11B Vision: {full:,} parameters -> {full * 2 / 1e9:.2f} GB ({full * 2 / 2**30:.2f} GiB) "
          f"in bfloat16")
    path = a.work / "reduced-11b-vision"
    if not (path / "consolidated.00.pth").exists():
        on_disk = write_checkpoint(path)
    else:
        on_disk = (path / "consolidated.00.pth").stat().st_size
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(weights_bf16_mib=on_disk / 2**20, ratio=(r["peak_load"] - r["baseline"]) / r["kept"],
             ratio_to_bf16=(r["peak_load"] - r["baseline"]) / (on_disk / 2**20), full_params=full,
             full_bf16_bytes=full * 2)
    print(f"reduced checkpoint: weights {r['weights_bf16_mib']:.1f} MiB in bf16, kept {r['kept']:.1f} MiB, "
          f"baseline {r['baseline']:.1f} MiB, peak load {r['peak_load']:.1f} MiB, "
          f"ratio to kept {r['ratio']:.3f}, to the bf16 bytes {r['ratio_to_bf16']:.3f}")
    if a.json:
        a.json.write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
