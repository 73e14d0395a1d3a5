"""Decode and prefill speed in arithmetic="ggml" beside arithmetic="exact" and llama.cpp, on the same GGUFs.

    python benchmarks/ggml_decode.py [--threads 2] [--rounds 3] [--formats q8_0 q4_0 q4_1 q5_0 q5_1]
                                     [--prefill 512] [--decode 32] [--decode-prompt 64]

The GGUFs are the default model requantized by tests/fixtures/make_llamacpp_logits.py (the files the
fidelity fixture was made from), written once into --work. Each configuration runs in a fresh process
(benchmarks/run.py's children: one llama_ref load + measure, or llama-cpp-python with use_mmap=False), all
with the same thread count; every round runs every configuration once, so each round's ratios compare
runs made minutes apart on this shared machine, and the table keeps each configuration's best round.
Roofline: the weights' bytes read once per token at the read bandwidth measured in the same round
(run.py's bandwidth child). Writes the JSON (--out) and a Markdown table beside it (.md), with the load
average before each round: on a shared machine the ratios of one round are what can be compared.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  (benchmarks/run.py: children, measurement, machine info)


def child_ggml(spec: dict) -> dict:
    """run.py's llama_ref child with the arithmetic as a load option."""
    load_s, prefill, step = bench.load_llama_ref(spec["path"], backend="numba", arithmetic=spec["arithmetic"],
                                                 weights="packed")
    ids = np.load(spec["ids"])
    prefill(ids[:4])  # compile or load the kernels
    step(1, 4)
    return {"load_s": load_s, **bench._measure(spec, ids, prefill, step)}


CHILDREN = {"ggml": child_ggml, "llama_cpp": bench.child_llama_cpp, "bandwidth": bench.child_bandwidth}


def run_child(python: str, spec: dict, env: dict) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ggufs(work: Path, formats: list[str]) -> dict:
    spec = importlib.util.spec_from_file_location("make_llamacpp_logits",
                                                  ROOT / "tests" / "fixtures" / "make_llamacpp_logits.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    sys.path.insert(0, str(ROOT))
    from llama_ref import DEFAULT_MODEL
    from llama_ref.weights.fetch import fetch

    src = Path(fetch(DEFAULT_MODEL, progress=False))
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind in formats:
        path = work / f"smollm2-{kind}.gguf"
        if not path.exists():
            script.quantized_gguf(src, path, kind)
        out[kind] = path
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formats", nargs="+", default=["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
    ap.add_argument("--decode", type=int, default=32, help="decode steps per run")
    ap.add_argument("--decode-prompt", type=int, default=64, help="prompt length before decoding")
    ap.add_argument("--prefill", type=int, nargs="*", default=[512], help="prefill lengths to time")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llama_ref_ggml_bench"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ggml_decode.json")
    a = ap.parse_args(argv)
    if a.child:
        spec = json.loads(a.child)
        print(json.dumps(CHILDREN[spec["kind"]](spec)))
        return
    files = ggufs(a.work, a.formats)
    ids = a.work / "ids.npy"
    np.save(ids, np.random.default_rng(0).integers(100, 40000, size=600))
    env = dict(os.environ, LLAMA_REF_THREADS=str(a.threads), OMP_NUM_THREADS=str(a.threads),
               OPENBLAS_NUM_THREADS=str(a.threads), NUMBA_NUM_THREADS=str(a.threads))
    cpp = bench.find_python("llama_cpp", [sys.executable, os.environ.get("LLAMA_CPP_PYTHON"),
                                          "/tmp/llamacpp-venv/bin/python"])
    common = {"ids": str(ids), "threads": a.threads, "prefill": a.prefill, "repeats": 2, "decode": a.decode,
              "decode_prompt": a.decode_prompt}
    rounds = []
    for r in range(a.rounds):
        result = {"load_average": os.getloadavg(), "bandwidth": run_child(sys.executable, {"kind": "bandwidth"}, env)}
        for kind, path in files.items():
            for name, spec, python in (("ggml", {"kind": "ggml", "arithmetic": "ggml"}, sys.executable),
                                       ("exact", {"kind": "ggml", "arithmetic": "exact"}, sys.executable),
                                       ("llama.cpp", {"kind": "llama_cpp"}, cpp)):
                if python is None:
                    continue
                res = run_child(python, {**common, **spec, "path": str(path)}, env)
                result[f"{kind} {name}"] = res
                print(f"round {r} {kind} {name}: " + ", ".join(f"{k} {v:.3g}" for k, v in res.items()
                                                               if isinstance(v, float)), flush=True)
        rounds.append(result)
    report = {"machine": bench.machine_info(a.threads), "threads": a.threads, "rounds": rounds,
              "formats": {k: {"path": str(p), "bytes": p.stat().st_size} for k, p in files.items()},
              "settings": common, "load_average": os.getloadavg()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    a.out.with_suffix(".md").write_text(table(report) + "\n")
    print(table(report))


def _best(report: dict, kind: str, name: str, key: str) -> float:
    return max((r.get(f"{kind} {name}", {}).get(key, 0) for r in report["rounds"]), default=0)


def _best_ratio(report: dict, kind: str, name: str, key: str) -> float:
    """The best over rounds of (name's speed / llama.cpp's speed in the same round)."""
    return max((r[f"{kind} {name}"].get(key, 0) / r[f"{kind} llama.cpp"][key] for r in report["rounds"]
                if r.get(f"{kind} llama.cpp", {}).get(key) and f"{kind} {name}" in r), default=0)


def table(report: dict) -> str:
    """Best round per configuration; ratios to llama.cpp within each round, the best round's shown."""
    m = report["machine"]
    loads = ", ".join(f"{r['load_average'][0]:.1f}" for r in report["rounds"] if "load_average" in r)
    lines = [f"{m.get('cpu', '?')}, {report['threads']} threads per engine, numba {m.get('numba', '?')}; "
             f"load average before each round: {loads or '?'}; {len(report['rounds'])} rounds, best of each.", ""]
    pre = [k for k in report["rounds"][0].get(f"{next(iter(report['formats']))} ggml", {}) if k.startswith("prefill_")]
    head = "| format | decode ggml | exact | llama.cpp | ggml / llama.cpp | exact / llama.cpp | ggml % of roofline |"
    sep = "|---|---|---|---|---|---|---|"
    for key in pre:
        head += f" {key.replace('_', ' ')} ggml | exact | llama.cpp | ggml / llama.cpp | exact / llama.cpp |"
        sep += "---|---|---|---|---|"
    lines += [head, sep]
    for kind, f in report["formats"].items():
        roof = max(r["bandwidth"].get("read_gb_s", 0) * 1e9 / f["bytes"] for r in report["rounds"])
        best = {n: _best(report, kind, n, "decode") for n in ("ggml", "exact", "llama.cpp")}
        row = (f"| {kind} | {best['ggml']:.1f} | {best['exact']:.1f} | {best['llama.cpp']:.1f} "
               f"| {_best_ratio(report, kind, 'ggml', 'decode'):.2f}x "
               f"| {_best_ratio(report, kind, 'exact', 'decode'):.2f}x "
               f"| {100 * best['ggml'] / roof:.0f}% |")
        for key in pre:
            row += (f" {_best(report, kind, 'ggml', key):.0f} | {_best(report, kind, 'exact', key):.0f} "
                    f"| {_best(report, kind, 'llama.cpp', key):.0f} | {_best_ratio(report, kind, 'ggml', key):.2f}x "
                    f"| {_best_ratio(report, kind, 'exact', key):.2f}x |")
        lines.append(row)
    if report["threads"] == 1:  # one thread: CPU time is the time a core of its own would take
        lines += ["", "| format | decode per CPU second: ggml | exact | llama.cpp | ggml / llama.cpp "
                      "| exact / llama.cpp |", "|---|---|---|---|---|---|"]
        for kind in report["formats"]:
            best = {n: _best(report, kind, n, "decode_cpu") for n in ("ggml", "exact", "llama.cpp")}
            lines.append(f"| {kind} | {best['ggml']:.1f} | {best['exact']:.1f} | {best['llama.cpp']:.1f} "
                         f"| {_best_ratio(report, kind, 'ggml', 'decode_cpu'):.2f}x "
                         f"| {_best_ratio(report, kind, 'exact', 'decode_cpu'):.2f}x |")
    lines += ["", "Speeds in tokens/s. Roofline: the GGUF's bytes read once per token at the read bandwidth "
              "measured in the same run (best round)."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
