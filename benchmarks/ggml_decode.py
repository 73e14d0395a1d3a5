"""Decode and prefill speed in arithmetic="ggml" beside arithmetic="exact" and llama.cpp, on the same GGUFs.

    python benchmarks/ggml_decode.py [--threads 2] [--rounds 3] [--formats q8_0 q4_0 q4_1 q5_0 q5_1]
                                     [--prefill 512] [--decode 32] [--decode-prompt 64]
                                     [--shape llama-3.2-1b --formats q8_0 q4_0 q4_k ...]

The GGUFs are the default model requantized by tests/fixtures/make_llamacpp_logits.py (the files the
fidelity fixture was made from), written once into --work; the K-quant formats (q4_k_m, q5_k_m, q6_k) are
llama.cpp's own quantizations of it with their usual fallbacks (its rows of 576 values are not whole
256-value super-blocks, so most matrices fall back to Q5_0 / Q5_1 / Q8_0: tests/fixtures/
make_llamacpp_kquant_logits.py's default files, which need llama-cpp-python to make).
--shape takes instead the GGUFs of benchmarks/shapes.py's checkpoint of that shape (seeded random weights, the
official sizes; built there when missing, shapes.quantized_gguf): q8_0 .. q5_1 every matrix in the one format,
q4_k / q5_k llama.cpp's Q4_K_M / Q5_K_M mixtures, q6_k llama.cpp's Q6_K.
Each configuration runs in a fresh process (benchmarks/run.py's children: one llama_ref load + measure,
or llama-cpp-python with use_mmap=False), all with the same thread count; every round runs every
configuration once, so each round's ratios compare runs made minutes apart on this shared machine, and the
table keeps each configuration's best round. Roofline: the weights' bytes read once per token at the read bandwidth
measured in the same round (run.py's bandwidth child) over as many bytes as the file holds: a file that fits the
last-level cache stays there between steps, and a probe of 512 MiB alone put the default model's decode at 88-138%
of its "roofline" on an Emerald Rapids guest with 300 MiB of L3 (session 61). With one thread, the table also gives
decode and prefill per CPU second of the process (run._measure: on a shared machine, the rate on a core of its own,
time spent waiting for a core not counted). Writes the JSON (--out) and a Markdown table beside it (.md), with the
load average before each round: on a shared machine the ratios of one round are what can be compared.
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
    extra = {"max_seq_len": spec["max_seq_len"]} if spec.get("max_seq_len") else {}
    load_s, prefill, step = bench.load_llama_ref(spec["path"], backend="numba", arithmetic=spec["arithmetic"],
                                                 weights="packed", **extra)
    ids = np.load(spec["ids"])
    prefill(ids[:4])  # compile or load the kernels
    step(1, 4)
    bench.warm_one_thread(step, 1, 4)
    return {"load_s": load_s, **bench._measure(spec, ids, prefill, step)}


CHILDREN = {"ggml": child_ggml, "llama_cpp": bench.child_llama_cpp, "bandwidth": bench.child_bandwidth}
THREAD_ENV = ("LLAMA_REF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS")
KQUANTS = ("q4_k_m", "q5_k_m", "q6_k")  # made by llama.cpp's quantizer (make_llamacpp_kquant_logits.py)


def run_child(python: str, spec: dict, env: dict, script: "Path | None" = None) -> dict:
    """One configuration in a fresh process: `script` (this one by default) --child spec; its last stdout line is
    the JSON result, or {"error": the end of what it printed}."""
    cmd = [python, str(script or Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fixture_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "fixtures" / f"{name}.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def kquant_gguf(src: Path, work: Path, kind: str, cpp_python: "str | None") -> Path:
    """The default model (GGUF src) quantized by llama.cpp to `kind` (KQUANTS), through an F32 GGUF."""
    f32 = work / "smollm2-f32.gguf"
    if not f32.exists():
        subprocess.run([sys.executable, "-m", "llama_ref.tools.cli", "convert", str(src), str(f32), "--to",
                        "gguf-f32"], check=True, cwd=ROOT)
    dst = work / f"smollm2-{kind}.gguf"
    if cpp_python is None:
        raise SystemExit(f"{kind}: making the file needs llama-cpp-python (LLAMA_CPP_PYTHON)")
    script = ROOT / "tests" / "fixtures" / "make_llamacpp_kquant_logits.py"
    code = ("import importlib.util, sys; s = importlib.util.spec_from_file_location('k', sys.argv[1]); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "m.quantize(sys.argv[2], sys.argv[3], m.DEFAULT_FTYPES[sys.argv[4]], pure=False)")
    subprocess.run([cpp_python, "-c", code, str(script), str(f32), str(dst), kind], check=True)
    return dst


def ggufs(work: Path, formats: list[str], cpp_python: "str | None" = None) -> dict:
    script = _fixture_script("make_llamacpp_logits")
    sys.path.insert(0, str(ROOT))
    from llama_ref import DEFAULT_MODEL
    from llama_ref.weights.fetch import fetch

    src = Path(fetch(DEFAULT_MODEL, progress=False))
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind in formats:
        path = work / f"smollm2-{kind}.gguf"
        if not path.exists():
            if kind in KQUANTS:
                kquant_gguf(src, work, kind, cpp_python)
            else:
                script.quantized_gguf(src, path, kind)
        out[kind] = path
    return out


def shape_ggufs(shape: str, formats: list[str]) -> dict:
    """The GGUFs of benchmarks/shapes.py's checkpoint of `shape` in each format, made when missing."""
    import shapes

    files = shapes.build(shape, ("F16",) + tuple(f.upper() for f in formats))
    if isinstance(files, str):
        raise SystemExit(files)  # not enough memory or disk to build them
    return {f: files[f.upper()] for f in formats if f.upper() in files}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--formats", nargs="+", default=["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"],
                    help=f"also {', '.join(KQUANTS)} (llama.cpp's quantizations of the default model)")
    ap.add_argument("--decode", type=int, default=32, help="decode steps per run")
    ap.add_argument("--decode-prompt", type=int, default=64, help="prompt length before decoding")
    ap.add_argument("--prefill", type=int, nargs="*", default=[512], help="prefill lengths to time")
    ap.add_argument("--repeats", type=int, default=2, help="prefill runs per length, the best kept")
    ap.add_argument("--compare-threads", type=int, help="also run every configuration at this thread count, "
                    "right after its --threads run (the table compares the two within each round)")
    ap.add_argument("--engines", nargs="+", default=["ggml", "exact", "llama.cpp"], help="which of the three to run")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help='an extra arithmetic="ggml" configuration run with these environment variables (e.g. '
                    "spin:GOMP_SPINCOUNT=300000, or PYTHONPATH=another source tree)")
    ap.add_argument("--prefill-only", action="store_true",
                    help="time prefill alone (ggml and llama.cpp; the children's decode cut to one step)")
    ap.add_argument("--shape", help="the GGUFs of benchmarks/shapes.py's checkpoint of this shape (e.g. "
                    "llama-3.2-1b; formats q8_0 q4_0 q4_1 q5_0 q5_1 q4_k q5_k q6_k) instead of the default model's")
    ap.add_argument("--work", type=Path, default=Path("/tmp/llama_ref_ggml_bench"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "ggml_decode.json")
    ap.add_argument("--render", type=Path, metavar="JSON", help="write the .md again from a run's .json")
    a = ap.parse_args(argv)
    if a.render:
        report = json.loads(a.render.read_text())
        a.render.with_suffix(".md").write_text(table(report) + "\n")
        return
    if a.child:
        spec = json.loads(a.child)
        print(json.dumps(CHILDREN[spec["kind"]](spec)))
        return
    # set on the project's machines, they slow NumPy's BLAS (the exact prefill's products): gone from every child,
    # as benchmarks/run.py and shapes.py do, and the report says which were set
    unset = [k for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if os.environ.pop(k, None) is not None]
    cpp = bench.find_python("llama_cpp", [sys.executable, os.environ.get("LLAMA_CPP_PYTHON"),
                                          "/tmp/llamacpp-venv/bin/python"])
    files = shape_ggufs(a.shape, a.formats) if a.shape else ggufs(a.work, a.formats, cpp)
    a.work.mkdir(parents=True, exist_ok=True)
    ids = a.work / "ids.npy"
    # enough ids for the longest prefill and for the decode prompt with its steps (600 was fixed: a longer
    # --decode-prompt gave llama.cpp a 600-token prompt and failed ours)
    need = max(a.prefill + [a.decode_prompt + a.decode]) + 1
    np.save(ids, np.random.default_rng(0).integers(100, 40000, size=max(600, need)))
    env = dict(os.environ, **{v: str(max(a.threads, a.compare_threads or 1)) for v in THREAD_ENV})
    common = {"ids": str(ids), "threads": a.threads, "prefill": a.prefill, "repeats": a.repeats, "decode": a.decode,
              "decode_prompt": a.decode_prompt}
    if a.shape:  # the shape's own context (Llama 3.2: 131072) would size the cache past what is timed
        common.update(shape=a.shape, max_seq_len=max(a.prefill + [a.decode_prompt + a.decode]) + 16)
    if a.prefill_only:
        common.update(decode=1, decode_prompt=1, prefill_only=True)
    engines = [("ggml", {"kind": "ggml", "arithmetic": "ggml"}, sys.executable, {}),
               ("exact", {"kind": "ggml", "arithmetic": "exact"}, sys.executable, {}),
               ("llama.cpp", {"kind": "llama_cpp"}, cpp, {})]
    engines = [e for e in engines if e[0] in a.engines and e[2] is not None
               and not (a.prefill_only and e[0] == "exact")]
    for variant in a.variant:  # "name:KEY=VALUE,KEY=VALUE": arithmetic="ggml" with its own environment
        name, _, assignments = variant.partition(":")
        engines.append((f"ggml {name}", {"kind": "ggml", "arithmetic": "ggml"}, sys.executable,
                        dict(kv.split("=", 1) for kv in assignments.split(",") if kv)))
    counts = [a.threads] + ([a.compare_threads] if a.compare_threads else [])
    rounds = []
    for r in range(a.rounds):
        # the 512 MiB probe, and one over each file's own size (run.child_bandwidth): its roofline
        sizes = sorted({probe_mib(p) for p in files.values()})
        result = {"load_average": os.getloadavg(),
                  "bandwidth": run_child(sys.executable, {"kind": "bandwidth", "sizes_mib": sizes}, env)}
        for kind, path in files.items():
            for name, spec, python, extra in engines:
                # --compare-threads: the same configuration again at that count right after (same round, the
                # machine's load as alike as it gets), kept as "<format> <engine> @<count>"
                for n in counts:
                    key = f"{kind} {name}" + (f" @{n}" if n != a.threads else "")
                    env_n = dict(env, **extra, **{v: str(n) for v in THREAD_ENV})
                    res = run_child(python, {**common, **spec, "threads": n, "path": str(path)}, env_n)
                    result[key] = res
                    print(f"round {r} {key}: " + ", ".join(f"{k} {v:.3g}" for k, v in res.items()
                                                           if isinstance(v, float)), flush=True)
        rounds.append(result)
        # written after every round: a run stopped early keeps the rounds it finished
        report = {"machine": bench.machine_info(a.threads), "threads": a.threads, "rounds": rounds,
                  "compare_threads": a.compare_threads, "engines": [e[0] for e in engines],
                  "variants": {e[0]: e[3] for e in engines if e[3]},
                  "ggml_integer_code": integer_code(),
                  "formats": {k: {"path": str(p), "bytes": p.stat().st_size} for k, p in files.items()},
                  "settings": common, "load_average": os.getloadavg(), "unset_env": unset}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(report, indent=1))
        a.out.with_suffix(".md").write_text(table(report) + "\n")
    if rounds:
        print(table(report))
    else:  # --rounds 0: the GGUFs made, nothing measured
        print("files in " + ", ".join(str(p) for p in files.values()))


def integer_code() -> str:
    """The integer instructions arithmetic="ggml" runs here (kernels/ggml_simd.py): vnni, avx2 or portable, and
    "+ 512-bit prefill tiles" where simd_default() takes them (simd=3)."""
    from llama_ref.kernels import ggml_simd

    simd = ggml_simd.simd_default()
    return ("portable" if not simd else ggml_simd.BEST) + (" + 512-bit prefill tiles" if simd == 3 else "")



def _cell(value: float, spec: str, unit: str = "") -> str:
    """A table cell; '-' for an engine the run left out (--engines), whose rate reads 0."""
    return f"{value:{spec}}{unit}" if value else "-"

def _best(report: dict, kind: str, name: str, key: str) -> float:
    return max((r.get(f"{kind} {name}", {}).get(key, 0) for r in report["rounds"]), default=0)


def _best_ratio(report: dict, kind: str, name: str, key: str) -> float:
    """The best over rounds of (name's speed / llama.cpp's speed in the same round)."""
    return max((r[f"{kind} {name}"].get(key, 0) / r[f"{kind} llama.cpp"][key] for r in report["rounds"]
                if r.get(f"{kind} llama.cpp", {}).get(key) and f"{kind} {name}" in r), default=0)


def _ratio_range(report: dict, kind: str, name: str, key: str) -> str:
    """The lowest and highest over rounds of (name's speed / llama.cpp's in the same round)."""
    r = [x[f"{kind} {name}"].get(key, 0) / x[f"{kind} llama.cpp"][key] for x in report["rounds"]
         if x.get(f"{kind} llama.cpp", {}).get(key) and f"{kind} {name}" in x]
    return f"{min(r):.2f}-{max(r):.2f}" if r else "-"


def _within_rounds(report: dict, key: str, over: str, field: str) -> str:
    """key's field / over's field in each round where both ran: 'median (lowest-highest)'."""
    r = [x[key][field] / x[over][field] for x in report["rounds"]
         if x.get(key, {}).get(field) and x.get(over, {}).get(field)]
    return f"{np.median(r):.2f}x ({min(r):.2f}-{max(r):.2f})" if r else "-"


def threads_rows(report: dict) -> list[str]:
    """--compare-threads / --variant: decode of every engine at each thread count; each count's rate over the
    first count's, and each engine's over llama.cpp's at the same count, within each round."""
    base, other = report["threads"], report.get("compare_threads")
    counts = [base] + ([other] if other else [])
    lines = ["", f"Decode at {' and '.join(map(str, counts))} threads (each configuration's runs one after the "
             "other in each round). Ratios within a round: median (range) over rounds.", "",
             "| format | engine | threads | decode tok/s (best) | per CPU s (best) | over " + f"{base} thread(s) "
             "| over llama.cpp (same threads) |", "|---|---|---|---|---|---|---|"]
    for kind in report["formats"]:
        for engine in report.get("engines", ["ggml", "exact", "llama.cpp"]):
            for n in counts:
                at = f" @{n}" if n != base else ""
                key = f"{kind} {engine}{at}"
                if not any(key in r for r in report["rounds"]):
                    continue
                lines.append(f"| {kind} | {engine} | {n} | {_best(report, kind, engine + at, 'decode'):.2f} "
                             f"| {_best(report, kind, engine + at, 'decode_cpu'):.2f} "
                             f"| {_within_rounds(report, key, f'{kind} {engine}', 'decode') if at else ''} "
                             f"| {_within_rounds(report, key, f'{kind} llama.cpp{at}', 'decode')} |")
    for name, env in report.get("variants", {}).items():
        lines.append(f"\n{name}: {', '.join(f'{k}={v}' for k, v in env.items())}")
    return lines


def fewer_threads_rows(report: dict) -> list[str]:
    """The rounds whose llama_ref decode ran some steps on fewer threads than given (llama_ref/runtime/threads.py,
    StepThreads: a step runs on fewer while fewer have been faster), with their steps per count."""
    lines = []
    for i, r in enumerate(report["rounds"]):
        for key, result in r.items():
            used = result.get("decode_threads") if isinstance(result, dict) else None
            if used and any(int(n) < report["threads"] for n in used):
                counts = ", ".join(f"{k} on {n}" for n, k in sorted(used.items(), key=lambda x: -int(x[0])))
                lines.append(f"- round {i}, {key}: decode steps {counts} thread(s)")
    if lines:
        lines = ["", "Decode steps that ran on fewer threads than given (StepThreads, llama_ref/runtime/threads.py):",
                 ""] + lines
    return lines


def prefill_rows(report: dict) -> list[str]:
    """--prefill-only: each prefill length's speed, wall and per CPU second (one thread), ggml / llama.cpp."""
    lines = []
    keys = [k for k in report["rounds"][0].get(f"{next(iter(report['formats']))} ggml", {}) if k.startswith("prefill_")]
    for key in keys:
        lines += [f"| format | {key.replace('_', ' ')}: ggml | llama.cpp | ggml / llama.cpp | its range over rounds |",
                  "|---|---|---|---|---|"]
        lines += [f"| {kind} | {_best(report, kind, 'ggml', key):.1f} | {_best(report, kind, 'llama.cpp', key):.1f} "
                  f"| {_best_ratio(report, kind, 'ggml', key):.2f}x | {_ratio_range(report, kind, 'ggml', key)} |"
                  for kind in report["formats"]] + [""]
    return lines + ["Tokens/s (_cpu: per CPU second of the process). Ratios within a round; the best shown."]


def table(report: dict) -> str:
    """Best round per configuration; ratios to llama.cpp within each round, the best round's shown."""
    m = report["machine"]
    loads = ", ".join(f"{r['load_average'][0]:.1f}" for r in report["rounds"] if "load_average" in r)
    model = report["settings"].get("shape")
    model = f"{model} shape (seeded random weights, benchmarks/shapes.py)" if model else "the default model"
    lines = [f"{model} on {m.get('cpu', '?')}, {report['threads']} threads per engine, numba {m.get('numba', '?')}, "
             f"ggml integer code {report.get('ggml_integer_code', '?')}; load average before each round: "
             f"{loads or '?'}; {len(report['rounds'])} rounds, best of each."
             + (f" OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset by the script: {report['unset_env'] or 'none were set'}."
                if "unset_env" in report else ""), ""]
    if report["settings"].get("prefill_only"):
        return "\n".join(lines + prefill_rows(report))
    pre = [k for k in report["rounds"][0].get(f"{next(iter(report['formats']))} ggml", {})
           if k.startswith("prefill_") and not k.endswith("_cpu")]
    head = ("| format | decode ggml | exact | llama.cpp | ggml / llama.cpp | exact / llama.cpp | ggml % of roofline "
            "| each round's % of its own probe |")
    sep = "|---|---|---|---|---|---|---|---|"
    for key in pre:
        head += f" {key.replace('_', ' ')} ggml | exact | llama.cpp | ggml / llama.cpp | exact / llama.cpp |"
        sep += "---|---|---|---|---|"
    lines += [head, sep]
    for kind, f in report["formats"].items():
        roof = max((read_rate(r["bandwidth"], f["bytes"]) or 0) * 1e9 / f["bytes"] for r in report["rounds"])
        best = {n: _best(report, kind, n, "decode") for n in ("ggml", "exact", "llama.cpp")}
        row = (f"| {kind} | {_cell(best['ggml'], '.1f')} | {_cell(best['exact'], '.1f')} | {best['llama.cpp']:.1f} "
               f"| {_cell(_best_ratio(report, kind, 'ggml', 'decode'), '.2f', 'x')} "
               f"| {_cell(_best_ratio(report, kind, 'exact', 'decode'), '.2f', 'x')} "
               f"| {_cell(100 * best['ggml'] / roof, '.0f', '%')} | {_round_roofline(report, kind, f['bytes'])} |")
        for key in pre:
            row += (f" {_cell(_best(report, kind, 'ggml', key), '.0f')} "
                    f"| {_cell(_best(report, kind, 'exact', key), '.0f')} "
                    f"| {_best(report, kind, 'llama.cpp', key):.0f} "
                    f"| {_cell(_best_ratio(report, kind, 'ggml', key), '.2f', 'x')} "
                    f"| {_cell(_best_ratio(report, kind, 'exact', key), '.2f', 'x')} |")
        lines.append(row)
    if report["threads"] == 1:  # one thread: CPU time is the time a core of its own would take
        for key in ["decode_cpu"] + [f"{k}_cpu" for k in pre]:
            if not any(key in r.get(f"{kind} ggml", {}) for r in report["rounds"] for kind in report["formats"]):
                continue  # a report from before prefill was timed in CPU seconds
            what = key[:-4].replace("_", " ")
            # decode's roofline per CPU second: the probe's bytes read per CPU second (on a shared machine the
            # wall-clock probe, and so the wall-clock roofline, is whatever share of a core it got)
            roof = key == "decode_cpu" and all(r["bandwidth"].get("read_gb_s_cpu") for r in report["rounds"])
            lines += ["", f"| format | {what} per CPU second: ggml | exact | llama.cpp | ggml / llama.cpp "
                          "| its range over rounds | exact / llama.cpp |" + (" ggml % of roofline per CPU s |"
                                                                          if roof else ""),
                      "|---|---|---|---|---|---|---|" + ("---|" if roof else "")]
            for kind, f in report["formats"].items():
                best = {n: _best(report, kind, n, key) for n in ("ggml", "exact", "llama.cpp")}
                cell = ""
                if roof:
                    bound = max(r["bandwidth"]["read_gb_s_cpu"] for r in report["rounds"]) * 1e9 / f["bytes"]
                    cell = f" {100 * best['ggml'] / bound:.0f}% |"
                lines.append(f"| {kind} | {best['ggml']:.1f} | {_cell(best['exact'], '.1f')} | {best['llama.cpp']:.1f} "
                             f"| {_best_ratio(report, kind, 'ggml', key):.2f}x "
                             f"| {_ratio_range(report, kind, 'ggml', key)} "
                             f"| {_cell(_best_ratio(report, kind, 'exact', key), '.2f', 'x')} |" + cell)
    lines += fewer_threads_rows(report)
    if report.get("compare_threads") or report.get("variants"):
        lines += threads_rows(report)
    lines += ["", "Speeds in tokens/s. Roofline: the GGUF's bytes read once per token at the read bandwidth "
              "measured in the same run (best round) over the file's own size (where the run has that probe, "
              "else over 512 MiB); each round's: that round's decode against that round's probe "
              "(on a shared machine the probe itself moves from round to round). Ratios: the best round's; with one "
              "thread, also the range over rounds."]
    probes = [r.get("bandwidth", {}) for r in report["rounds"]]
    if any(p.get("at_size_gb_s") for p in probes):
        lines += ["", "Read probes per round (GB/s, all threads): " + "; ".join(
            f"round {i}: 512 MiB {p.get('read_gb_s', 0):.1f}, " + ", ".join(
                f"{mib} MiB {v:.1f}" for mib, v in sorted(p.get("at_size_gb_s", {}).items(), key=lambda kv: int(kv[0])))
            for i, p in enumerate(probes)) + "."]
    return "\n".join(lines + [""] + report.get("notes", []))  # notes: what a person adds to the .json by hand



def probe_mib(path) -> int:
    """The size (MiB, rounded up) over which a file's read bandwidth is probed: its own."""
    return _mib(Path(path).stat().st_size)


def _mib(nbytes: int) -> int:
    return -(-nbytes // 2**20)


def read_rate(bandwidth: dict, nbytes: int) -> "float | None":
    """A round's read bandwidth (GB/s) for a file of nbytes: the probe over the file's own size where the round
    has one (a working set that fits the last-level cache is read from there, step after step), else the 512 MiB
    probe (reports from before session 61)."""
    at = bandwidth.get("at_size_gb_s", {}).get(str(_mib(nbytes)))
    return at if at else bandwidth.get("read_gb_s")


def _round_roofline(report: dict, kind: str, nbytes: int) -> str:
    """Each round's ggml decode as a percentage of the roofline of the bandwidth probe of the same round, in round
    order ("-" where a round has no decode or no probe)."""
    cells = []
    for r in report["rounds"]:
        decode, probe = r.get(f"{kind} ggml", {}).get("decode"), read_rate(r.get("bandwidth", {}), nbytes)
        cells.append(f"{100 * decode * nbytes / (probe * 1e9):.0f}%" if decode and probe else "-")
    return " / ".join(cells)


if __name__ == "__main__":
    main()
