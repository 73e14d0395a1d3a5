"""Generation with sampling, end to end: llama_ref's generate() beside llama.cpp's own sampler chain, same GGUF.

    python benchmarks/generate.py [--formats q4_1 q8_0] [--threads 2] [--tokens 96] [--prompt 64] [--rounds 3]
                                  [--shape llama-3.2-1b --formats q4_k]

A decode benchmark (ggml_decode.py) times the forward pass; a user's tokens also go through the sampler, and on the
default model's 2.4 ms steps a sampler that sorted all 49152 tokens a token (until session 62) halved the rate.
Per sampling preset, each engine generates --tokens tokens after a prompt of --prompt tokens (stop ids off, so
every run makes them all), in a fresh process, and the rate is the tokens after the first over their time (the
prompt's prefill not counted). llama_ref runs arithmetic="ggml"; its row also gives its forward-only decode in
the same process, and the share of a token's time the rest of generate() (sampling, logprobs, text) takes.
Presets: greedy; the CLI's (llama_ref generate's defaults, llama.cpp's: T 0.8, top-k 40, top-p 0.95, min-p 0.05);
Meta's reference (T 0.6, top-p 0.9). The files are ggml_decode's (the default model requantized, or --shape's).
Writes the JSON (--out) and a Markdown table beside it; a peer that fails is reported with its error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import ggml_decode  # noqa: E402  (the GGUFs, run_child, the thread variables)
import run as bench  # noqa: E402  (find_python, machine_info)

PRESETS = {
    "greedy": dict(temperature=0.0),
    "cli": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "meta": dict(temperature=0.6, top_p=0.9),
}


def child_llama_ref(spec: dict) -> dict:
    import llama_ref

    model = llama_ref.load(spec["path"], backend="numba", arithmetic="ggml", threads=spec["threads"],
                           max_seq_len=spec["prompt"] + spec["tokens"] + 16)
    ids = [int(t) for t in np.load(spec["ids"])[:spec["prompt"]]]
    out = {}
    for name, params in PRESETS.items():
        model.generate(ids, max_new_tokens=4, stop_ids=[], seed=0, **params)  # compiles or loads the kernels
        model.reset()
        g = model.generate(ids, max_new_tokens=spec["tokens"], stop_ids=[], seed=0, **params)
        out[name] = (len(g.ids) - 1) / g.decode_seconds
    model.reset()
    model.forward(np.asarray([ids]), 0, last_only=True)
    t0 = time.perf_counter()
    for i in range(spec["tokens"] - 1):
        model.forward(np.asarray([[ids[i % len(ids)]]]), len(ids) + i, last_only=True)
    out["forward"] = (spec["tokens"] - 1) / (time.perf_counter() - t0)
    return out


def child_llama_cpp(spec: dict) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=spec["path"], n_ctx=spec["prompt"] + spec["tokens"] + 16, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], use_mmap=False, verbose=False, seed=0)
    ids = [int(t) for t in np.load(spec["ids"])[:spec["prompt"]]]
    out = {}
    for name, p in PRESETS.items():
        times = []
        tokens = llm.generate(ids, temp=p["temperature"], top_k=p.get("top_k", 0), top_p=p.get("top_p", 1.0),
                              min_p=p.get("min_p", 0.0), repeat_penalty=1.0, reset=True)
        for _ in range(spec["tokens"]):
            next(tokens)
            times.append(time.perf_counter())
        out[name] = (len(times) - 1) / (times[-1] - times[0])
    return out


CHILDREN = {"llama_ref": child_llama_ref, "llama_cpp": child_llama_cpp}


def table(report: dict) -> str:
    m = report["machine"]
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['threading_layer']}, {b['num_threads']} threads)"
                     for b in m.get("blas", [])) or "none found"
    lines = [f"{report['what']} on {m['cpu']}, {report['threads']} threads per engine, numba {m['numba']}, "
             f"BLAS {blas}; "
             f"{report['tokens']} tokens after a {report['prompt']}-token prompt; best of {len(report['rounds'])} "
             f"rounds; load average before each round: "
             + ", ".join(f"{r['load_average'][0]:.1f}" for r in report["rounds"]) + ".", "",
             "| format | preset | llama_ref tok/s | llama.cpp tok/s | llama_ref / llama.cpp | llama_ref forward only "
             "| generate's own share of a token |", "|---|---|---|---|---|---|---|"]
    for kind in report["formats"]:
        for preset in PRESETS:
            ours = [r[kind]["llama_ref"].get(preset) for r in report["rounds"] if "error" not in r[kind]["llama_ref"]]
            cpp = [r[kind]["llama.cpp"].get(preset) for r in report["rounds"]
                   if "llama.cpp" in r[kind] and "error" not in r[kind]["llama.cpp"]]
            fwd = [r[kind]["llama_ref"]["forward"] for r in report["rounds"] if "forward" in r[kind]["llama_ref"]]
            cpp_failed = any("error" in r[kind].get("llama.cpp", {}) for r in report["rounds"])
            best, peer = max(ours, default=None), max(cpp, default=None)
            lines.append(f"| {kind} | {preset} | {f'{best:.1f}' if best else 'crashed'} "
                         f"| {f'{peer:.1f}' if peer else ('crashed' if cpp_failed else '-')} "
                         f"| {f'{best / peer:.2f}x' if best and peer else '-'} "
                         f"| {f'{max(fwd):.1f}' if fwd else '-'} "
                         f"| {f'{100 * (1 - best / max(fwd)):.0f}%' if best and fwd else '-'} |")
        errors = {e: r[kind][e]["error"] for r in report["rounds"] for e in r[kind] if "error" in r[kind][e]}
        for engine, error in errors.items():  # (run_child joins the lines of what it printed with " | ")
            lines.append(f"| {kind} | {engine} failed: {error.replace('|', '/')} | | | | | |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["q4_1", "q8_0"])
    ap.add_argument("--shape", help="benchmarks/shapes.py's checkpoint of this shape instead of the default model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llama_ref_ggml_bench"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "scratch" / "generate.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        spec = json.loads(a.child)
        print(json.dumps(CHILDREN[spec["kind"]](spec)))
        return
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):  # as the other benchmarks: they slow NumPy's BLAS here
        os.environ.pop(k, None)
    cpp = bench.find_python("llama_cpp", [sys.executable, os.environ.get("LLAMA_CPP_PYTHON"),
                                          "/tmp/llamacpp-venv/bin/python"])
    files = ggml_decode.shape_ggufs(a.shape, a.formats) if a.shape else ggml_decode.ggufs(a.work, a.formats, cpp)
    a.work.mkdir(parents=True, exist_ok=True)
    ids = a.work / "generate_ids.npy"
    np.save(ids, np.random.default_rng(0).integers(100, 40000, size=a.prompt))
    env = dict(os.environ, **{v: str(a.threads) for v in ggml_decode.THREAD_ENV})
    common = {"ids": str(ids), "threads": a.threads, "tokens": a.tokens, "prompt": a.prompt}
    engines = [("llama_ref", sys.executable)] + ([("llama.cpp", cpp)] if cpp else [])
    rounds = []
    for r in range(a.rounds):
        result = {"load_average": os.getloadavg()}
        for kind, path in files.items():
            result[kind] = {}
            for name, python in engines:
                spec = {**common, "kind": name.replace(".", "_"), "path": str(path)}
                result[kind][name] = ggml_decode.run_child(python, spec, env, Path(__file__).resolve())
                print(f"round {r} {kind} {name}: {result[kind][name]}", flush=True)
        rounds.append(result)
    report = {"what": f"the {a.shape} shape" if a.shape else "the default model", "machine": bench.machine_info(
              a.threads), "threads": a.threads, "tokens": a.tokens, "prompt": a.prompt, "formats": list(files),
              "rounds": rounds}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1) + "\n")
    a.out.with_suffix(".md").write_text(table(report))
    print(table(report))


if __name__ == "__main__":
    main()
