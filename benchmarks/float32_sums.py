"""What load(..., sums=...) costs: prefill and decode of the default model, each sums against "blas".

    python benchmarks/float32_sums.py [--rounds 5] [--threads 2] [--backends numpy numba] [--clock cpu]
        [--sums blas apart blocked] [--checkpoint DIR --layers 4 --tokens 128 512]

The 200-token prompt of issue 21 (tests/data/float64_distance.json): its prefill (logits of the last
position, as generation asks for them, and of every position, as the float64-distance test does), one
decode step after it (best of 3 steps), and the prefill of its first 5, 8 and 15 tokens (--short: products
of fewer than 16 rows, which "apart" sums in float64). Every configuration runs once per round, interleaved with the
others; the report gives each one's best and median time over the rounds, and the ratios of both to the
first --sums, in the same run (the median is steadier under load: one quiet round makes a best). Wall
time (or --clock cpu); the BLAS library and thread counts (threadpoolctl) and the load average before and
after are printed, since this machine is shared. OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are removed from the
environment before NumPy loads, so OpenBLAS picks its kernels for the real CPU (the report says whether they
were set).

--packed: no model; the Numba backend's products on packed weights (F16, Q8_0, Q4_0 at the 1B shape), its own
against sums="apart" (which decodes them a tile at a time for kernels/sgemm.py with the apart columns).

--products: no model; kernels/sgemm.py's float32 product (the Numba backend's sums="apart" product) against
NumPy's OpenBLAS `x @ w.T` on the default model's and the Llama 3.2 1B shape's (N, K, R) (random float32), at
--threads (BLAS by threadpoolctl, ours on runtime.threads' pool); w cold from memory as in a forward pass
(each call takes the next of copies of w that hold 64 MiB or more together, twice the L3 of the EPYC here:
with w warm in cache, OpenBLAS and ours ranked differently on the 576-wide shapes); each configuration's best
call, the configurations interleaved call by call (order reversed every other call), minima over the rounds;
--clock as above (cpu: the per-CPU-second rate). `--products-apart` adds ours with the 8 apart columns (left
out while packing x, added in registers before the store), against ours without.

--sums apart-layers: "apart" with the output head left to the backend's own product, to split apart's cost
between the layers and the head (issue 21, session 31: the head's apart terms are ~10 ms of a NumPy prefill's
+90-150, and leaving them out took the distance from float64 from 0.91x to 0.98x transformers' (NumPy), 0.66x to
0.84x (Numba)).

--checkpoint: another model's first --layers layers instead (e.g. the Llama 3.2 1B shape's
~/.cache/llama_ref/bench/shapes/llama-3.2-1b/hf-bf16, K = 2048 and 8192), its weights in float32 and its
vocabulary cut to 512 rows (the output head is not what is measured); the prefill of each --tokens count
(random token ids: what a product costs does not depend on them), last logits only, and no decode step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

UNSET = [v for v in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if os.environ.pop(v, None) is not None]

import numpy as np  # noqa: E402  (after the environment is cleaned)

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backends", nargs="+", default=["numpy", "numba"])
    ap.add_argument("--sums", nargs="+", default=["blas", "apart", "blocked"],
                    choices=["blas", "apart", "blocked", "apart-layers"],
                    help="the first is the one the others are divided by; apart-layers: apart with the output "
                         "head left to the backend's own product (what the head's apart terms cost)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: this process's CPU time (all its threads), steadier than wall time on a busy "
                         "machine with --threads 1; with more threads it counts their spinning too")
    ap.add_argument("--checkpoint", help="a checkpoint whose first --layers layers are measured instead")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512], help="prompt lengths (--checkpoint)")
    ap.add_argument("--short", type=int, nargs="*", default=[5, 8, 15],
                    help="short prompts' lengths (the first tokens of the 200): products of fewer than 16 rows")
    ap.add_argument("--packed", action="store_true",
                    help="no model: the Numba backend's packed-weight products, its own against sums='apart'")
    ap.add_argument("--products", action="store_true", help="the products alone: kernels/sgemm against OpenBLAS")
    ap.add_argument("--products-apart", action="store_true", help="with --products: ours with apart columns too")
    ap.add_argument("--shapes", nargs="+", help="N,K,R of --products (default: the two models' shapes)")
    a = ap.parse_args()
    if a.products:
        return products(a)
    if a.packed:
        return packed(a)
    if a.checkpoint and "apart-layers" in a.sums:
        ap.error("--sums apart-layers is for the default model (--checkpoint cuts the output head to 512 rows)")

    from llama_ref.model.cache import KVCache
    from threadpoolctl import threadpool_info

    ids = json.loads((ROOT / "tests/data/float64_distance.json").read_text())["prompts"]["issue21_200"]
    if a.checkpoint:
        models = _first_layers(a)
    else:
        models = {(b, s): _load(b, s, a.threads) for b in a.backends for s in a.sums}
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    next_token = 28  # any id: the decode step's cost does not depend on it

    def prefill(model, last_only):
        cache = KVCache(model.args, 1, np.float32, capacity=len(ids) + 4)
        t = clock()
        model.forward(ids, 0, cache=cache, last_only=last_only)
        return clock() - t, cache

    def decode(model):
        _, cache = prefill(model, True)
        best = float("inf")
        for i in range(3):
            t = clock()
            model.forward([next_token], len(ids) + i, cache=cache, last_only=True)
            best = min(best, clock() - t)
        return best

    def short(T):  # a prompt of T tokens (the first of the 200): its products of T rows, summed in float64
        def run(model):
            cache = KVCache(model.args, 1, np.float32, capacity=T)
            t = clock()
            model.forward(ids[:T], 0, cache=cache)
            return clock() - t
        return run

    measures = {"prefill 200, last logits": lambda m: prefill(m, True)[0],
                "prefill 200, all logits": lambda m: prefill(m, False)[0],
                "decode step after 200": decode}
    measures.update({f"prefill {T}, all logits": short(T) for T in a.short})
    if a.checkpoint:
        rng = np.random.default_rng(0)
        prompts = {T: rng.integers(0, 512, T).tolist() for T in a.tokens}

        def prefill_of(T):
            def run(model):
                cache = KVCache(model.args, 1, np.float32, capacity=T)
                t = clock()
                model.forward(prompts[T], 0, cache=cache, last_only=True)
                return clock() - t
            return run
        measures = {f"prefill {T}, last logits": prefill_of(T) for T in a.tokens}
    for m in models.values():  # warm-up: Numba compilation, first-touch of the weights
        next(iter(measures.values()))(m)
    load_before = os.getloadavg()
    times: dict = {}  # (key, measure) -> [seconds, one per round]
    for r in range(a.rounds):
        # each round in another order of the models (rotated), so none always runs right after the same one
        order = list(models.items())
        order = order[r % len(order):] + order[:r % len(order)]
        for key, model in order:
            for name, fn in measures.items():
                times.setdefault((key, name), []).append(fn(model))
        print(f"round {r + 1}/{a.rounds} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    best = {k: min(v) for k, v in times.items()}
    median = {k: float(np.median(v)) for k, v in times.items()}

    blas = [(i["internal_api"], i["version"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()]
    print(f"BLAS / thread pools: {blas}; threads {a.threads}; rounds {a.rounds} (best and median of each); "
          f"{a.clock} time")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); "
          f"OPENBLAS_CORETYPE/L2_SIZE unset here: {UNSET or 'none were set'}")
    first = a.sums[0]
    for label, stat in (("best", best), ("median", median)):
        print(f"{label:8s} {'measure':28s} " + " ".join(f"{s + ' ms':>11s}" for s in a.sums)
              + " " + " ".join(f"{s + '/' + first:>15s}" for s in a.sums[1:]))
        for b in a.backends:
            for name in measures:
                ms = [stat[(b, s), name] for s in a.sums]
                print(f"{b:8s} {name:28s} " + " ".join(f"{t * 1e3:11.1f}" for t in ms)
                      + " " + " ".join(f"{t / ms[0]:15.2f}" for t in ms[1:]))


# (N, K, R): the default model's products (wq/wo 576 -> 576, wk/wv -> 192, w1/w3 -> 1536, w2 1536 -> 576, the
# output head -> 49152) at 64, 200 and 512 rows, and the Llama 3.2 1B shape's (wk/wv -> 512, wq/wo 2048,
# w1/w3 -> 8192, w2 8192 -> 2048) at 200 rows and at 512 (issue 13's prefill 512)
SHAPES = [(n, k, r) for n in (64, 200, 512) for k, r in ((576, 192), (576, 576), (576, 1536), (1536, 576))]
SHAPES += [(200, 576, 49152)]
SHAPES += [(n, k, r) for n in (200, 512) for k, r in ((2048, 512), (2048, 2048), (2048, 8192), (8192, 2048))]


def packed(a) -> None:
    """--packed: the Numba backend's products on packed weights (F16, Q8_0, Q4_0 of random float32 values, the
    1B shape's 2048 x 8192, 8192 x 2048, 2048 x 2048) at 128 and 512 rows, its own (tiles decoded for
    OpenBLAS) against sums="apart" (tiles decoded for kernels/sgemm.py with the apart columns), at --threads;
    each configuration's best of --rounds calls, interleaved (order reversed every other round); --clock."""
    from threadpoolctl import threadpool_info

    from llama_ref import kernels
    from llama_ref.model import ops
    from llama_ref.runtime import threads
    from llama_ref.weights.packed import F16Weight, Q4_0Weight, Q8_0Weight

    threads.apply_threads(a.threads)
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    rng = np.random.default_rng(0)
    summed = ops.with_sums(kernels, "apart")
    confs = {"own": kernels.linear, "apart": summed.linear}
    load_before = os.getloadavg()
    print(f"{'R x K, rows':>18s} " + " ".join(f"{f + ' own ms':>12s} {f + ' apart':>10s} {'ratio':>6s}"
                                               for f in ("f16", "q8_0", "q4_0")))
    for R, K in ((8192, 2048), (2048, 8192), (2048, 2048)):
        w = rng.standard_normal((R, K), dtype=np.float32) * np.float32(0.02)
        formats = {"f16": F16Weight(w.astype(np.float16).view(np.uint16), (R, K)), "q8_0": Q8_0Weight.quantize(w),
                   "q4_0": Q4_0Weight.quantize(w)}
        for N in (128, 512):
            x = rng.standard_normal((1, N, K), dtype=np.float32)
            x[..., 5] *= 30  # one column 30x the rest, as a prefill's activations hold
            cells = []
            for wq in formats.values():
                best = dict.fromkeys(confs, float("inf"))
                for r in range(a.rounds):
                    for name, f in (list(confs.items()) if r % 2 == 0 else list(confs.items())[::-1]):
                        t = clock()
                        f(x, wq)
                        best[name] = min(best[name], clock() - t)
                own, apart = best["own"], best["apart"]
                cells.append(f"{own * 1e3:12.1f} {apart * 1e3:10.1f} {apart / own:6.2f}")
            print(f"{f'{R} x {K}, {N}':>18s} " + " ".join(cells), flush=True)
    blas = [(i["internal_api"], i["version"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()]
    print(f"BLAS / thread pools: {blas}; threads {a.threads}; rounds {a.rounds} (best); {a.clock} time; "
          f"load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f} (1 min); "
          f"OPENBLAS_CORETYPE/L2_SIZE unset here: {UNSET or 'none were set'}")


def products(a) -> None:
    """--products: kernels/sgemm.sgemm against NumPy's x @ w.T, per shape and in sum over the shapes."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from llama_ref.kernels.sgemm import sgemm

    shapes = [tuple(int(v) for v in s.split(",")) for s in a.shapes] if a.shapes else SHAPES
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    rng = np.random.default_rng(0)
    n = a.threads
    with threadpool_limits(n):
        blas = [(i["internal_api"], i["version"], i.get("architecture"), i["num_threads"]) for i in threadpool_info()]
        confs = {"blas": lambda x, w, c, xa: x @ w.T, "sgemm": lambda x, w, c, xa: sgemm(x, w, threads=n)}
        if a.products_apart:
            confs["sgemm apart"] = lambda x, w, c, xa: sgemm(x, w, c, xa, threads=n)
        best: dict = {}
        load_before = os.getloadavg()
        for r in range(a.rounds):
            for N, K, R in shapes:
                x = rng.standard_normal((N, K), dtype=np.float32)
                x[:, rng.choice(K, 3, replace=False)] *= 25
                copies = max(2, -(-(64 << 20) // (R * K * 4)))  # w's copies, each call the next: cold
                ws = [rng.standard_normal((R, K), dtype=np.float32) for _ in range(copies)]
                cols = np.sort(np.argsort(-np.abs(x).max(axis=0))[:8]).astype(np.int64)
                xa = np.ascontiguousarray(x[:, cols])
                for f in confs.values():
                    f(x, ws[0], cols, xa)  # compiled, its buffers made
                calls = max(2, min(len(ws), int(3e8 / (2 * N * K * R))))  # more calls of the small ones
                for i in range(calls):
                    order = list(confs.items()) if i % 2 == 0 else list(confs.items())[::-1]
                    for j, (name, f) in enumerate(order):
                        w = ws[(i * len(confs) + j) % len(ws)]
                        t = clock()
                        f(x, w, cols, xa)
                        t = clock() - t
                        best[name, (N, K, R)] = min(best.get((name, (N, K, R)), t), t)
                del ws
            print(f"round {r + 1}/{a.rounds} done, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    print(f"BLAS / thread pools: {blas}; threads {n}; rounds {a.rounds} (minima); {a.clock} time")
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); "
          f"OPENBLAS_CORETYPE/L2_SIZE unset here: {UNSET or 'none were set'}")
    names = list(confs)
    print(f"{'N,K,R':>16s} {'blas ms':>9s} {'GFLOP/s':>8s} " + " ".join(f"{v + ' ms':>15s}" for v in names[1:])
          + " " + " ".join(f"{'blas/' + v:>17s}" for v in names[1:]) + ("  apart/sgemm" if a.products_apart else ""))
    groups = {"default model": [s for s in shapes if s[1] in (576, 1536) and s[2] != 49152],
              "output head": [s for s in shapes if s[2] == 49152], "1B shape": [s for s in shapes if s[1] >= 2048]}
    for s in shapes:
        b = best["blas", s]
        line = f"{','.join(map(str, s)):>16s} {b * 1e3:9.3f} {2 * s[0] * s[1] * s[2] / b / 1e9:8.1f} "
        line += " ".join(f"{best[v, s] * 1e3:15.3f}" for v in names[1:])
        line += " " + " ".join(f"{b / best[v, s]:17.3f}" for v in names[1:])
        if a.products_apart:
            line += f"  {best['sgemm apart', s] / best['sgemm', s]:11.3f}"
        print(line)
    for g, ss in groups.items():
        if ss:
            tb = sum(best["blas", s] for s in ss)
            print(f"{'sum ' + g:>16s} {tb * 1e3:9.3f} {'':8s} " + " ".join(f"{sum(best[v, s] for s in ss) * 1e3:15.3f}"
                                                                     for v in names[1:])
                  + " " + " ".join(f"{tb / sum(best[v, s] for s in ss):17.3f}" for v in names[1:]))
    print("blas/X > 1: X faster (per " + ("CPU second" if a.clock == "cpu" else "wall second") + ")")


def _load(backend: str, sums: str, threads: int):
    """The default model with these sums; "apart-layers": "apart", its output head by the backend's own linear."""
    import llama_ref
    from llama_ref.model.transformer import _resolve_backend

    model = llama_ref.load(llama_ref.DEFAULT_MODEL, backend=backend, sums=sums.split("-")[0], threads=threads)
    if sums == "apart-layers":  # model.ops is with_sums' own copy of the backend: patching it touches no other model
        own, summed, head = _resolve_backend(backend)[1].linear, model.ops.linear, model.weights["output.weight"]
        model.ops.linear = lambda x, w: own(x, w) if w is head else summed(x, w)
    return model


def _first_layers(a) -> dict:
    """{(backend, sums): model} of the checkpoint's first a.layers layers, float32, 512 vocabulary rows."""
    import llama_ref
    from llama_ref.model.ops import with_sums
    from llama_ref.model.transformer import _resolve_backend

    full = llama_ref.load(a.checkpoint, weights="packed", threads=a.threads)
    args = full.args.replace(n_layers=a.layers, vocab_size=512)
    keep = [k for k in full.weights if not k.startswith("layers.") or int(k.split(".")[1]) < a.layers]
    weights = {}
    for k in keep:
        w = full.weights[k]
        w = w if isinstance(w, np.ndarray) else w.to_float(np.float32)
        weights[k] = np.ascontiguousarray(w[:512] if k in ("tok_embeddings.weight", "output.weight") else w)
    del full
    return {(b, s): llama_ref.Transformer(args, weights, backend=_resolve_backend(b)[1] if s == "blas"
                                          else with_sums(_resolve_backend(b)[1], s))
            for b in a.backends for s in a.sums}


if __name__ == "__main__":
    main()
