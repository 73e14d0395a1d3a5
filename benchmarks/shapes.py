"""Speed at the sizes people run: Llama 3.2 1B, 3.2 3B and 3.1 8B shapes with seeded random weights.

    python benchmarks/shapes.py --shape llama-3.2-1b [--threads N] [--formats bf16 f16 q8_0 q4_0]
                                [--prefill 128 512 2048] [--decode 128] [--rounds R] [--sweep | --sweep-only]
                                [--sweep-prefill 128 512] [--sweep-decode 32]
                                [--peer-formats f16 bf16 ...] [--hf-dtypes bf16 f32] [--skip-peers] [--numpy]

Speed does not depend on the weights' values, so a checkpoint of the official shape (llama_ref.model.presets)
with random weights measures real sizes without downloading anything. It is built once and cached under
$LLAMA_REF_BENCH_CACHE/shapes/<shape> (default ~/.cache/llama_ref/bench/shapes):
  - hf-bf16/: Hugging Face safetensors in bfloat16, written by llama_ref's own writer (weights.writers);
  - F16.gguf: written by llama_ref's converter (write_checkpoint --to gguf-f16);
  - BF16.gguf, Q8_0.gguf, Q4_0.gguf (and Q4_1, Q5_0, Q5_1 when asked for, as benchmarks/ggml_decode.py
    --shape does): the F16 file rewritten per tensor with gguf.quants (benchmarks/convert.py, bit-exact with
    llama.cpp's quantizer);
  - Q4_K.gguf (Q4_K_M; Q5_K.gguf Q5_K_M and Q6_K.gguf when asked for): llama.cpp's own quantizer
    (llama-cpp-python), when that package is available. quantized_gguf() makes each.
Weights: normal, std 0.02 (norms 1), seeded per tensor name: activations stay finite through every layer.
The GGUF files carry a synthetic SentencePiece vocabulary of the model's size (byte pieces + placeholders):
the benchmark feeds token ids, never text.

Measured in one run, each configuration in its own process (its peak RSS is its own), with the same thread
count for everyone: llama_ref numba at each format (bf16 from the safetensors directory, the others from the
GGUF files), llama_ref numpy (bf16, with --numpy: the reference's long-context prefill), llama.cpp through
llama-cpp-python on the same GGUF file of each format, HF transformers float32 and bfloat16 on the
safetensors directory (a subprocess in the oracle venv). A configuration that does not fit in the memory
available now is skipped with a message; a peer that crashes is reported as crashed. --sweep adds a thread
sweep (1, 2, 4, ... all cores) of decode and prefill for llama_ref numba and llama.cpp at the run's 16-bit formats
(--sweep-only: the sweep alone), thread counts interleaved over --rounds (best kept). Its scaling column divides
each rate by the thread count x the one-thread rate; for decode, by the smaller of that and the read-bandwidth
roofline (the probe's all-thread bandwidth / bytes per token): past that bound more cores cannot help.

Writes results/shapes-<shape>.md/.json (and -threads.png with matplotlib) to results/scratch/, or to
results/ with --update-results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  the children, the measurement loop and the machine report are shared

CACHE = Path(os.environ.get("LLAMA_REF_BENCH_CACHE", Path.home() / ".cache" / "llama_ref" / "bench")) / "shapes"
SHAPES = ("llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b")
GGUF_FORMATS = ("F16", "BF16", "Q8_0", "Q4_0", "Q4_K")
LLAMA_REF_FORMATS = ("bf16", "f16", "q8_0", "q4_0")
PEER_FORMATS = ("f16", "bf16", "q8_0", "q4_0", "q4_k")
BF16_ARITHMETIC = "llama_ref numba, arithmetic=bf16"  # the engine name of --bf16-arithmetic's row
MAX_CONTEXT = 4096  # the context every engine is given: enough for the longest prefill measured
# The peers' interpreters: the first that imports the package (LLAMA_REF_LLAMA_CPP_PYTHON / LLAMA_REF_HF_PYTHON name
# another, e.g. benchmarks/device_threads.sh's python3, which holds both there).
LLAMA_CPP_PYTHON = [os.environ.get("LLAMA_REF_LLAMA_CPP_PYTHON"), "/tmp/llamacpp-venv/bin/python"]
HF_PYTHON = [os.environ.get("LLAMA_REF_HF_PYTHON"), "/tmp/oracle/bin/python", "/tmp/oracle-venv/bin/python"]


# ---- the checkpoint -----------------------------------------------------------------------------------------

def shape_args(shape: str):
    from llama_ref.model import presets

    return presets.get(shape)


def n_params(args) -> int:
    from llama_ref.weights.common import expected_shapes

    shapes = expected_shapes(args)
    if args.tie_word_embeddings:
        shapes = {k: v for k, v in shapes.items() if k != "output.weight"}
    return sum(int(np.prod(s)) for s in shapes.values())


class RandomWeights(dict):
    """The canonical tensors of a shape, made on first use from a seed and the tensor's name (so the same
    name gives the same values in every file), kept as bfloat16: one tensor at a time in float32."""

    def __init__(self, args, seed: int = 0):
        from llama_ref.weights.common import expected_shapes

        super().__init__()
        self.shapes, self.seed = expected_shapes(args), seed

    def __contains__(self, name):
        return name in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)

    def items(self):
        return ((name, self[name]) for name in self.shapes)

    def __getitem__(self, name):
        from llama_ref.weights.bf16 import float32_to_bf16_bits
        from llama_ref.weights.packed import BF16Weight

        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        values = rng.standard_normal(shape, dtype=np.float32)  # (out, in)
        values *= np.float32(0.02)
        return BF16Weight(float32_to_bf16_bits(values), shape)


def synthetic_vocabulary(n: int) -> dict:
    """GGUF tokenizer keys for a SentencePiece vocabulary of n pieces: unk, bos, eos, the 256 byte pieces
    (llama.cpp needs them), then placeholders. Enough for both engines to load; never used for text."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    tokens += [f"\u2581t{i}" for i in range(n - len(tokens))]
    types += [1] * (n - len(types))
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [float(-i) for i in range(n)], "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}


def free_bytes() -> tuple[int, int]:
    """(memory available now, disk free in the cache folder's file system)."""
    mem = 0
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            mem = int(line.split()[1]) * 1024
    CACHE.mkdir(parents=True, exist_ok=True)
    return mem, shutil.disk_usage(CACHE).free


# How each GGUF format is made from the shape's F16 file: rewritten per tensor by benchmarks/convert.py
# (gguf.quants, every matrix in the one format), or by llama.cpp's own quantizer (its usual mixture: Q4_K_M
# keeps some matrices in Q6_K, and a tied embedding (the output head) in Q6_K).
BY_CONVERT = ("BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
BY_LLAMA_CPP = {"Q4_K": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "Q5_K": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}
BYTES_PER_WEIGHT = {"hf": 2, "F16": 2, "BF16": 2, "Q8_0": 1.07, "Q4_0": 0.57, "Q4_1": 0.63, "Q5_0": 0.69,
                    "Q5_1": 0.75, "Q4_K": 0.6, "Q5_K": 0.7, "Q6_K": 0.83}  # disk estimates (with the mixtures)


def quantized_gguf(f16: Path, dst: Path, fmt: str) -> bool:
    """Write dst: the F16 GGUF f16 in format fmt (BY_CONVERT or BY_LLAMA_CPP). False, with a message, where
    llama.cpp's quantizer is needed and llama-cpp-python is not installed or fails."""
    if fmt in BY_CONVERT:
        sys.path.insert(0, str(HERE))
        from convert import convert_gguf

        convert_gguf(f16, dst, fmt)
        return True
    python = bench.find_python("llama_cpp", LLAMA_CPP_PYTHON)
    if python is None:
        print(f"  {fmt} not written: llama-cpp-python is not installed", file=sys.stderr)
        return False
    tmp = dst.with_name(dst.name + ".partial")
    code = ("import ctypes, sys, llama_cpp as c; p = c.llama_model_quantize_default_params(); "
            "p.ftype = getattr(c, sys.argv[3]); "
            "sys.exit(c.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))")
    done = subprocess.run([python, "-c", code, str(f16), str(tmp), BY_LLAMA_CPP[fmt]], capture_output=True, text=True)
    if done.returncode == 0 and tmp.exists():
        os.replace(tmp, dst)
        return True
    print(f"  {fmt} not written: {(done.stderr or '').strip()[-300:]}", file=sys.stderr)
    tmp.unlink(missing_ok=True)
    return False


def build(shape: str, formats=GGUF_FORMATS) -> "dict[str, Path] | str":
    """The cached files of a shape (built when missing); a message string when memory or disk is short."""
    from llama_ref.tools.convert import write_checkpoint

    args = shape_args(shape)
    params = n_params(args)
    folder = CACHE / shape
    folder.mkdir(parents=True, exist_ok=True)
    files = {"hf": folder / "hf-bf16", **{f: folder / f"{f}.gguf" for f in formats}}
    missing = [k for k, p in files.items() if not p.exists()]
    if not missing:
        return files
    mem, disk = free_bytes()
    # Disk: 2 bytes a weight for each 16-bit file, ~1.1 / 0.6 for Q8_0 / Q4_0 (+ Q4_K). Memory: one tensor at a
    # time in float32 with its 16-bit copies (the safetensors and F16 writers take them one by one), and, for a
    # file that convert.py writes, all of that file's tensors (gguf's writer holds them until the end).
    from llama_ref.weights.common import expected_shapes

    need_disk = int(params * sum(BYTES_PER_WEIGHT[k] for k in missing))
    largest = max(int(np.prod(s)) for s in expected_shapes(args).values())
    held = max([BYTES_PER_WEIGHT[k] for k in missing if k in BY_CONVERT], default=0)
    need_mem = int(params * held) + 12 * largest + 2 * 2**30
    if need_disk > disk or need_mem > mem:
        return (f"{shape}: skipped, building its files needs {need_mem / 2**30:.1f} GiB of memory and "
                f"{need_disk / 2**30:.1f} GiB of disk; {mem / 2**30:.1f} GiB and {disk / 2**30:.1f} GiB are free")
    weights = RandomWeights(args)
    if not files["hf"].exists():
        print(f"{shape}: writing {files['hf']} ({params / 1e9:.2f} B weights) ...", file=sys.stderr)
        write_checkpoint(args, weights, files["hf"], "hf", "bf16", checksums=False)
    if not files["F16"].exists():
        print(f"{shape}: writing {files['F16']} ...", file=sys.stderr)
        write_checkpoint(args, weights, files["F16"], "gguf-f16", tokenizer_meta=synthetic_vocabulary(args.vocab_size),
                         checksums=False)
    for fmt in formats:
        if fmt != "F16" and not files[fmt].exists():
            print(f"{shape}: writing {files[fmt]} ...", file=sys.stderr)
            if not quantized_gguf(files["F16"], files[fmt], fmt):
                del files[fmt]
    return files


# ---- the children (run in their own processes by run.run_child's protocol) --------------------------------

def child_llama_ref(spec: dict) -> dict:
    load_s, prefill, step = bench.load_llama_ref(spec["path"], backend=spec["backend"], weights="packed",
                                                 max_seq_len=MAX_CONTEXT, threads=spec["threads"],
                                                 arithmetic=spec.get("arithmetic", "exact"))
    ids = np.load(spec["ids"])
    prefill(ids[:16])  # compiles (or loads from Numba's cache) every kernel
    step(1, 16)
    from threadpoolctl import threadpool_info
    blas = max((p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"), default=None)
    from llama_ref.runtime.threads import describe
    policy = describe()  # after the first forward: Numba's threads have started
    out = bench._measure(spec, ids, prefill, step)
    return {"load_s": load_s, "blas_threads": blas, "policy": policy, **out}


def child_hf(spec: dict) -> dict:
    # This script's folder (benchmarks/: run.py, convert.py, parallel.py ...) shadows modules transformers imports.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    # A torchvision that does not match the venv's torch (its operators missing) breaks transformers' import of
    # every model class; the text models need none of it.
    sys.modules["torchvision"] = None
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    ids = np.load(spec["ids"])
    state = {}

    @torch.inference_mode()
    def prefill(tokens):
        out = model(torch.tensor(np.asarray(tokens)[None], dtype=torch.long), use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return out.logits[0, -1].float().numpy()

    @torch.inference_mode()
    def step(token, pos):
        out = model(torch.tensor([[int(token)]]), past_key_values=state["past"], use_cache=True)
        state["past"] = out.past_key_values
        return out.logits[0, -1].float().numpy()

    prefill(ids[:16])
    return {"load_s": load_s, "version": f"torch {torch.__version__}, transformers {transformers.__version__}",
            **bench._measure(spec, ids, prefill, step)}


CHILDREN = {"llama_ref": child_llama_ref, "hf": child_hf, "llama_cpp": bench.child_llama_cpp,
            "bandwidth": bench.child_bandwidth}


def run_child(python: str, spec: dict, env: dict, timeout: int = 3600) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t0 = time.perf_counter()
    try:
        # Run outside the repository: transformers takes the repository's kernels/ folder for the Hugging Face
        # `kernels` package and fails to import LlamaConfig.
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0 or not proc.stdout.strip():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        how = f"crashed (exit {proc.returncode})" if proc.returncode else "no result"
        return {"error": f"{how}: " + " | ".join(tail)}
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


# ---- the run ----------------------------------------------------------------------------------------------

def memory_needed(engine: str, fmt: str, params: int) -> int:
    """Bytes a configuration needs resident, roughly: its weights in memory + 1.5 GiB of working room."""
    per_weight = {"f32": 4, "bf16": 2, "f16": 2, "q8_0": 1.07, "q4_0": 0.57, "q4_k": 0.6}[fmt]
    if engine == "HF transformers":
        per_weight *= 1.1  # the loader's own copies
    return int(params * per_weight) + int(1.5 * 2**30)


def sweep_counts(cores: int) -> list[int]:
    counts, n = [], 1
    while n < cores:
        counts.append(n)
        n *= 2
    return counts + [cores]


def environment(threads: int) -> dict:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[k] = str(threads)
    return env


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, nargs="+", default=["llama-3.2-1b"])
    p.add_argument("--threads", type=int, default=None, help="default: llama_ref's policy (physical cores)")
    p.add_argument("--formats", nargs="*", default=list(LLAMA_REF_FORMATS))
    p.add_argument("--peer-formats", nargs="*", default=list(PEER_FORMATS))
    p.add_argument("--prefill", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--decode-prompt", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1, help="run every configuration this many times, interleaved")
    p.add_argument("--numpy", action="store_true", help="also llama_ref numpy (bf16): the reference's prefill")
    p.add_argument("--bf16-arithmetic", action="store_true",
                   help='also llama_ref numba on the bf16 checkpoint in arithmetic="bf16" (activations rounded '
                        'to bf16 in the products: one AMX pass where exact mode takes three)')
    p.add_argument("--sweep", action="store_true", help="thread sweep of decode and prefill")
    p.add_argument("--sweep-only", action="store_true", help="the thread sweep without the main table")
    p.add_argument("--sweep-prefill", type=int, nargs="+", default=[128], help="prefill lengths of the sweep")
    p.add_argument("--sweep-decode", type=int, default=32, help="decode steps of the sweep")
    p.add_argument("--sweep-rounds", type=int, default=None, help="rounds of the sweep (default: --rounds)")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--hf-dtypes", nargs="*", default=["bf16", "f32"], choices=["bf16", "f32"])
    p.add_argument("--build-only", action="store_true")
    p.add_argument("--update-results", action="store_true", help="write to benchmarks/results/ (else scratch/)")
    p.add_argument("--render", metavar="JSON", help="write the .md (and plot) again from a run's .json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.render:
        path = Path(a.render)
        write_report(json.loads(path.read_text()), path.with_name(path.name[:-len(".json")]))
        return
    if a.child:
        spec = json.loads(a.child)
        print(json.dumps(CHILDREN[spec["kind"]](spec)))
        return

    unset = [k for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if os.environ.pop(k, None) is not None]
    threads = a.threads
    if threads is None and not a.build_only:
        from llama_ref.runtime.threads import default_threads

        threads = default_threads()
    out_dir = bench.output_folder(a.update_results)
    # Only the GGUF files some configuration reads (F16 always: the others are written from it).
    wanted = {"F16"} | {f.upper() for f in a.peer_formats} | {f.upper() for f in a.formats if f != "bf16"}
    for shape in a.shape:
        files = build(shape, tuple(f for f in GGUF_FORMATS if f in wanted))
        if isinstance(files, str):
            print(files, file=sys.stderr)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"shapes-{shape}.md").write_text(f"# {shape}\n\n{files}\n")
            continue
        if a.build_only:
            continue
        report = measure(shape, files, a, threads, unset)
        write_report(report, out_dir / f"shapes-{shape}")
        print((out_dir / f"shapes-{shape}.md").read_text())


def measure(shape: str, files: dict, a, threads: int, unset: list) -> dict:
    import tempfile

    args = shape_args(shape)
    params = n_params(args)
    env = environment(threads)
    tmp = tempfile.mkdtemp()
    ids_path = Path(tmp) / "ids.npy"
    need = max(a.prefill + [a.decode_prompt + a.decode]) + 1
    rng = np.random.default_rng(1)
    np.save(ids_path, rng.integers(259, args.vocab_size, need).astype(np.int64))  # placeholder pieces
    base = {"ids": str(ids_path), "threads": threads, "prefill": a.prefill, "decode": a.decode,
            "decode_prompt": a.decode_prompt, "repeats": a.repeats}
    gguf = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K"}
    configs = []
    for fmt in a.formats:
        path = files["hf"] if fmt == "bf16" else files.get(gguf[fmt])
        if path is not None:
            configs.append(("llama_ref numba", fmt, {"kind": "llama_ref", "backend": "numba", "path": str(path)}))
    if a.bf16_arithmetic:  # the bf16 checkpoint once more in arithmetic="bf16" (model/bf16.py)
        configs.append((BF16_ARITHMETIC, "bf16", {"kind": "llama_ref", "backend": "numba", "arithmetic": "bf16",
                                                  "path": str(files["hf"])}))
    if a.numpy:
        # The reference converts each 16-bit matrix whole per call: a decode step takes seconds; 4 are enough.
        configs.append(("llama_ref numpy", "bf16", {"kind": "llama_ref", "backend": "numpy", "decode": 4,
                                                    "path": str(files["hf"])}))
    cpp = hf = None
    if not a.skip_peers:
        cpp = bench.find_python("llama_cpp", LLAMA_CPP_PYTHON)
        hf = None if a.skip_hf else bench.find_python("transformers", HF_PYTHON)
    for fmt in a.peer_formats if cpp else []:
        if gguf[fmt] in files:
            configs.append(("llama.cpp", fmt, {"kind": "llama_cpp", "path": str(files[gguf[fmt]]), "python": cpp}))
    for dtype in a.hf_dtypes if hf else []:
        configs.append(("HF transformers", dtype, {"kind": "hf", "path": str(files["hf"]), "dtype": dtype,
                                                   "python": hf}))
    report = {"shape": shape, "params": params, "machine": bench.machine_info(threads), "unset_env": unset,
              "policy": thread_policy(), "args": {k: v for k, v in vars(a).items() if k != "child"},
              "peers": {"llama.cpp": cpp, "transformers": hf}, "rows": [], "sweep": [], "cpu_flags": cpu_flags()}
    probe = run_child(sys.executable, {"kind": "bandwidth"}, env)
    report["bandwidth_gb_s"] = probe.get("read_gb_s")
    report["bandwidth_gb_s_cpu"] = probe.get("read_gb_s_cpu")
    # Rounds: every configuration once per round, in the same order, so that a burst of other work on the
    # machine slows one round of each engine rather than all of one engine; each rate is the best of rounds.
    best = {}
    for rnd in range(0 if a.sweep_only else a.rounds):
        for engine, fmt, spec in configs:
            row = {"engine": engine, "format": fmt}
            mem, _ = free_bytes()
            needed = memory_needed(engine, fmt, params)
            if needed > mem:
                row["skipped"] = f"needs ~{needed / 2**30:.1f} GiB, {mem / 2**30:.1f} GiB available"
            else:
                spec = {**base, **spec}
                print(f"{shape}: round {rnd + 1}: {engine} {fmt} ...", file=sys.stderr)
                row.update(run_child(spec.pop("python", sys.executable), spec, env))
                print(f"  {json.dumps(row)}", file=sys.stderr)
            best[(engine, fmt)] = merge_rounds(best.get((engine, fmt)), row)
    report["rows"] = list(best.values())
    if a.sweep or a.sweep_only:
        counts = sweep_counts(os.cpu_count() or 1)
        sweep_configs = [c for c in configs if c[0] in ("llama_ref numba", "llama.cpp") and c[1] in ("bf16", "f16")]
        swept = {}  # (engine, format, threads) -> the best of rounds
        # Rounds, and in each every thread count of every configuration: a burst of other work slows one
        # round of a configuration rather than one of its thread counts.
        for rnd in range(max(1, a.sweep_rounds or a.rounds)):
            for n in counts:
                for engine, fmt, spec in sweep_configs:
                    spec_n = {**base, **spec, "threads": n, "prefill": a.sweep_prefill, "decode": a.sweep_decode,
                              "repeats": 1}
                    print(f"{shape}: sweep round {rnd + 1}: {engine} {fmt} {n} threads ...", file=sys.stderr)
                    row = {"engine": engine, "format": fmt, "threads": n,
                           **run_child(spec_n.pop("python", sys.executable), spec_n, environment(n))}
                    print(f"  {json.dumps(row)}", file=sys.stderr)
                    key = (engine, fmt, n)
                    swept[key] = merge_rounds(swept.get(key), row)
        report["sweep"] = [swept[(e, f, n)] for e, f, _ in sweep_configs for n in counts if (e, f, n) in swept]
    shutil.rmtree(tmp, ignore_errors=True)
    return report


def merge_rounds(kept: "dict | None", row: dict) -> dict:
    """One configuration's result over rounds: every rate the best of its rounds, the rest from the round
    with the best decode; a round that failed counts only when none succeeded."""
    if kept is None or "decode" not in kept:
        return {**row, "rounds": 1} if "decode" in row or kept is None else kept
    if "decode" not in row:
        return kept
    merged = dict(row if row["decode"] > kept["decode"] else kept)
    for key in set(kept) | set(row):  # the rates (a child's decode_threads, a dict, stays its round's)
        if (key == "decode" or key.startswith(("prefill_", "decode_"))) and not isinstance(row.get(key), dict):
            merged[key] = max(kept.get(key, 0), row.get(key, 0))
    merged["rounds"] = kept.get("rounds", 1) + 1
    return merged


def thread_policy() -> str:
    from llama_ref.runtime.threads import describe

    return describe()


def decode_bytes(files: dict, fmt: str, args, position: int) -> int:
    """Bytes a decode step reads: the GGUF file's tensors (the stored format) + the float32 KV cache."""
    gguf = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_k": "Q4_K", "f32": "F16"}[fmt]
    path = files.get(gguf)
    if path is None:
        return 0
    key = (path, position)
    if key not in _decode_bytes:  # the reader parses the whole vocabulary: minutes on a loaded machine
        _decode_bytes[key] = bench.bytes_per_token(path, position)
    n = _decode_bytes[key]
    return n * 2 if fmt == "f32" else n  # HF float32: every weight twice the F16 file's bytes (roughly)


_decode_bytes: dict = {}  # decode_bytes' (path, position) -> bytes, once per process


def write_report(report: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_name(stem.name + ".json").write_text(json.dumps(report, indent=2))
    m, a, rows = report["machine"], report["args"], report["rows"]
    lengths = a["prefill"]
    blas = ", ".join(f"{b['internal_api']} {b['version']} ({b['architecture']}, {b['threading_layer']})"
                     for b in m["blas"])
    flags = report.get("cpu_flags", cpu_flags())  # the measuring machine's; older reports did not keep them
    policy = next((r["policy"] for r in rows if r.get("policy")), report["policy"])
    bw = report.get("bandwidth_gb_s")
    lines = [f"# {report['shape']} shape ({report['params'] / 1e9:.2f} B weights, seeded random) on {m['cpu']}",
             "", f"{m['threads']} threads of {m['cores']} logical cores; load average at start "
             f"{m['load_average'][0]:.1f}. BLAS: {blas}; numpy {m['numpy']}, numba {m['numba']}. "
             f"Thread policy (as a llama_ref child reports it): {policy}. "
             f"CPU flags (matrix/vector): {', '.join(flags) or 'none'}. "
             + (f"Read bandwidth {bw:.1f} GB/s (all threads"
                + (f"; {report['bandwidth_gb_s_cpu']:.1f} GB per CPU s" if report.get("bandwidth_gb_s_cpu") else "")
                + "). " if bw else "")
             + ("Per CPU s: decode steps per second of the process's CPU time (1 thread: the rate on a core of "
                "its own, time spent waiting for a core not counted). " if m["threads"] == 1 else ""),
             f"OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset by the script: {report['unset_env'] or 'none were set'}."
             + (f" The load average ({m['load_average'][0]:.1f}) exceeded the {m['cores']} cores at the start: other "
                "work took turns on them, so wall-clock rates (and their ratios and roofline %) vary from round to "
                "round; compare the per-CPU-s columns." if m["load_average"][0] > m["cores"] else ""),
             "", "| engine | format | " + " | ".join(f"prefill {n} tok/s" for n in lengths)
             + " | decode tok/s | % of roofline (wall / per CPU s) | vs llama.cpp same format (decode) "
             "| vs HF bf16 (decode) | decode tok per CPU s | vs llama.cpp (per CPU s) | vs HF bf16 (per CPU s) "
             "| load s | peak RSS MiB |",
             "|---|---|" + "---:|" * (len(lengths) + 9)]

    def peer(r, engine, fmt):
        """The row a ratio divides by: of the same run as r when the report merges runs."""
        found = [q for q in rows if q["engine"] == engine and q["format"] == fmt and "decode" in q and q is not r]
        return next((q for q in found if q.get("run") == r.get("run")), found[-1] if found else None)

    def ratio(r, q, key):
        return f"{r[key] / q[key]:.2f}x" if q and key in r and key in q else ""

    args = shape_args(report["shape"])
    files = {f: CACHE / report["shape"] / f"{f}.gguf" for f in GGUF_FORMATS}
    files = {k: v for k, v in files.items() if v.exists()}
    for r in rows:
        engine = r["engine"] + (f" (run {r['run']})" if r.get("run") else "")
        if "decode" not in r:
            why = r.get("skipped") or r.get("error", "no result")
            lines.append(f"| {engine} | {r['format']} | {why[:160]} |" + " |" * (len(lengths) + 8))
            continue
        nbytes = decode_bytes(files, r["format"], args, a["decode_prompt"] + a["decode"] // 2)
        row_bw = r.get("bandwidth_gb_s", bw)  # a merged report keeps each run's own probe
        roof = f"{100 * r['decode'] * nbytes / (row_bw * 1e9):.0f}%" if row_bw and nbytes else ""
        row_bw_cpu = r.get("bandwidth_gb_s_cpu", report.get("bandwidth_gb_s_cpu"))
        if roof and row_bw_cpu and "decode_cpu" in r:  # the same per CPU second: decode_cpu / the probe's
            roof += f" / {100 * r['decode_cpu'] * nbytes / (row_bw_cpu * 1e9):.0f}%"
        cpp = peer(r, "llama.cpp", r["format"]) if r["engine"] != "llama.cpp" else None
        hf16 = peer(r, "HF transformers", "bf16") if (r["engine"], r["format"]) != ("HF transformers", "bf16") else None
        pre = " | ".join(f"{r[f'prefill_{n}']:.1f}" if f"prefill_{n}" in r else "" for n in lengths)
        cpu = f"{r['decode_cpu']:.2f}" if "decode_cpu" in r else ""
        vs_cpp, vs_hf, cpu_cpp, cpu_hf = (ratio(r, cpp, "decode"), ratio(r, hf16, "decode"),
                                          ratio(r, cpp, "decode_cpu"), ratio(r, hf16, "decode_cpu"))
        lines.append(f"| {engine} | {r['format']} | {pre} | {r['decode']:.2f} | {roof} | {vs_cpp} | {vs_hf} "
                     f"| {cpu} | {cpu_cpp} | {cpu_hf} | {r.get('load_s', 0):.1f} | {r['peak_rss_mib']:.0f} |")
    notes = []
    # Ratios between rows of the same run (a report that merges runs measured each under its own load).
    for run in sorted({r.get("run") for r in rows}, key=lambda v: (v is not None, v)):
        notes += prefill_notes([r for r in rows if r.get("run") == run and "decode" in r], lengths,
                               f"Run {run}, " if run is not None else "")
    for run, about in sorted(report.get("runs", {}).items()):
        notes.append(f"Run {run}: {about}")
    notes += report.get("notes", [])  # what a merged report adds by hand (measurements outside this script)
    if notes:
        lines += [""] + notes
    if report["sweep"]:
        lines += sweep_table(report, files, args)
    lines += ["", f"Prefill: best of {a['repeats']} (token ids drawn at random, seed 1); decode: {a['decode']} "
              f"greedy steps after a {a['decode_prompt']}-token prompt, mean rate. Each configuration in its own "
              "process, one after the other. Roofline: read bandwidth / bytes of the stored weights + float32 KV "
              "cache per decoded token (HF float32: twice the F16 bytes); its per-CPU-s share: decode steps per CPU "
              "second x those bytes / the probe's bytes read per CPU second."]
    stem.with_name(stem.name + ".md").write_text("\n".join(lines) + "\n")
    plot_sweep(report, stem)


def sweep_table(report: dict, files: dict, args) -> list[str]:
    """The thread sweep's table: each rate, and its share of threads x the one-thread rate (for decode, of
    the smaller of that and the read-bandwidth roofline: bandwidth bounds decode whatever the cores)."""
    a = report["args"]
    lengths = a.get("sweep_prefill", [128])
    steps = a.get("sweep_decode", 32)
    rounds = max(1, a.get("sweep_rounds") or a.get("rounds", 1)) if "sweep_prefill" in a else 1  # earlier: once
    bw = report.get("bandwidth_gb_s")
    lines = ["", f"Thread sweep (decode {steps} steps after {a['decode_prompt']} tokens; best of {rounds} "
             "interleaved round(s)). Scaling: rate / (threads x the 1-thread rate); decode's divides by the smaller "
             "of that and the roofline (read bandwidth " + (f"{bw:.1f} GB/s" if bw else "unknown")
             + " / bytes per token; left out where it is below the 1-thread rate: a probe slowed by other work):",
             "",
             "| engine | format | threads | " + " | ".join(f"prefill {n} tok/s | scaling" for n in lengths)
             + " | decode tok/s | decode roofline tok/s | scaling |",
             "|---|---|---:|" + "---:|---:|" * len(lengths) + "---:|---:|---:|"]
    one = {}
    for r in report["sweep"]:
        if "decode" not in r:
            lines.append(f"| {r['engine']} | {r['format']} | {r['threads']} | {r.get('error', '')[:120]} |"
                         + " |" * (2 * len(lengths) + 2))
            continue
        base = one.setdefault((r["engine"], r["format"]), r if r["threads"] == 1 else None)
        cells = []
        for n in lengths:
            rate = r.get(f"prefill_{n}")
            first = base.get(f"prefill_{n}") if base else None
            cells += [f"{rate:.1f}" if rate else "", f"{rate / (r['threads'] * first):.2f}" if rate and first else ""]
        nbytes = decode_bytes(files, r["format"], args, a["decode_prompt"] + steps // 2) if bw else 0
        roof = bw * 1e9 / nbytes if nbytes else None
        bound = None
        if base:
            bound = r["threads"] * base["decode"]
            if roof and roof >= base["decode"]:
                bound = min(bound, roof)
        lines.append(f"| {r['engine']} | {r['format']} | {r['threads']} | " + " | ".join(cells)
                     + f" | {r['decode']:.2f} | {f'{roof:.2f}' if roof else ''} | "
                     + (f"{r['decode'] / bound:.2f}" if bound else "") + " |")
    return lines


def prefill_notes(rows: list, lengths: list, prefix: str) -> list[str]:
    """Notes on one run's rows: llama_ref numba's prefill against each peer's (wall clock, and per CPU s
    where the run has it), and the NumPy reference's longest prefill against its 512."""
    by = {(r["engine"], r["format"]): r for r in rows}
    notes = []
    for ours in (by.get(("llama_ref numba", "bf16")) or by.get(("llama_ref numba", "f16")),
                 by.get((BF16_ARITHMETIC, "bf16"))):
        if ours:
            notes += _prefill_ratios(ours, rows, by, lengths, prefix)
    npy = by.get(("llama_ref numpy", "bf16"))
    if npy and f"prefill_{max(lengths)}" in npy and "prefill_512" in npy:
        notes.append(f"{prefix}llama_ref numpy prefill {max(lengths)} / prefill 512: "
                     f"{npy[f'prefill_{max(lengths)}'] / npy['prefill_512']:.2f}x.")
    return notes


def _prefill_ratios(ours: dict, rows: list, by: dict, lengths: list, prefix: str) -> list[str]:
    """prefill_notes' lines for one of our rows: its prefill rate over each peer's, wall clock and per CPU s."""
    label = f"{ours['engine']} {ours['format']}"
    notes = []
    for n in lengths:
        if f"prefill_{n}" in ours:
            peers = [(name, by.get(key)) for name, key in (("llama.cpp F16", ("llama.cpp", "f16")),
                                                           ("llama.cpp BF16", ("llama.cpp", "bf16")),
                                                           ("HF bf16", ("HF transformers", "bf16")),
                                                           ("HF float32", ("HF transformers", "f32")))]
            got = [f"{ours[f'prefill_{n}'] / peer[f'prefill_{n}']:.2f}x {name}" for name, peer in peers
                   if peer and f"prefill_{n}" in peer]
            if got:
                notes.append(f"{prefix}Prefill {n}, {label}: " + ", ".join(got) + ".")
            # Per CPU second (run.py's prefill_N_cpu): on a loaded machine the wall-clock ratios above swing
            # with other work; with one thread these are the rates on a core of one's own.
            key = f"prefill_{n}_cpu"
            rates = [f"{r['engine']} {r['format']} {r[key]:.1f}" for r in rows if key in r]
            got = [f"{ours[key] / peer[key]:.2f}x {name}" for name, peer in peers if peer and key in peer]
            if key in ours and rates:
                notes.append(f"{prefix}Prefill {n} per CPU s (tok per CPU s): " + ", ".join(rates)
                             + f"; {label}: " + (", ".join(got) or "no peer") + ".")
    return notes


def cpu_flags() -> list[str]:
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
              "amx_bf16", "amx_tile", "amx_int8", "asimd", "sve", "bf16")
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def plot_sweep(report: dict, stem: Path) -> None:
    if not report["sweep"]:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no thread-sweep plot", file=sys.stderr)
        return
    first = report["args"].get("sweep_prefill", [128])[0]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for key in sorted({(r["engine"], r["format"]) for r in report["sweep"]}):
        pts = [r for r in report["sweep"] if (r["engine"], r["format"]) == key and "decode" in r]
        if not pts:
            continue
        t = [r["threads"] for r in pts]
        axes[0].plot(t, [r["decode"] for r in pts], "o-", label=" ".join(key))
        axes[1].plot(t, [r.get(f"prefill_{first}") for r in pts], "o-", label=" ".join(key))
    for ax, what in zip(axes, ("decode tok/s", f"prefill {first} tok/s")):
        ax.set_xlabel("threads")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['shape']}: thread sweep")
    fig.tight_layout()
    fig.savefig(stem.with_name(stem.name + "-threads.png"), dpi=110)


if __name__ == "__main__":
    main()
