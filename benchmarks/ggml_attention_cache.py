"""One layer's ggml-mode attention for a decode step (one query) at S cached keys, over the two cache layouts:

    plain  KVCache(fp16=False): float32 (B, S, KVH, HD) as computed; kernels/ggml_ops.attention rounds it to
           fp16 and transposes it head-major at every call (the whole cache, keys and values)
    fp16   KVCache(fp16=True): each position rounded once when stored, head-major; attention reads it as it lies

    python benchmarks/ggml_attention_cache.py [--keys 600 2000] [--rounds 5] [--calls 200]
    python benchmarks/ggml_attention_cache.py --gguf MODEL.gguf [--prompt 512] [--steps 32] [--rounds 5]

--gguf: whole decode steps instead, in one process: the model loaded once (arithmetic="ggml", Numba), a prompt of
--prompt tokens prefilled into a cache of each layout, then each round decodes --steps tokens from there on each,
alternating step by step (the same positions rewritten every round); the median and 10th percentile of the CPU
time per step of the calling thread (NUMBA_NUM_THREADS=1).

Shape of the default model (SmolLM2-135M: 9 query heads, 3 KV heads, head size 64) unless --heads/--kv-heads/
--head-dim. Times are CPU seconds of the calling thread (time.thread_time) per call, best round of --rounds, the
layouts interleaved within each round (a shared machine); also the wall time, and the load average.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from llama_ref.kernels import ggml_ops
from llama_ref.model.cache import KVCache
from llama_ref.model.config import ModelArgs


def decode(a) -> None:
    import llama_ref

    model = llama_ref.load(a.gguf, arithmetic="ggml", backend="numba")
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, model.args.vocab_size, a.prompt)
    steps = rng.integers(0, model.args.vocab_size, a.steps)
    caches = {name: KVCache(model.args, 1, np.float32, capacity=a.prompt + a.steps, fp16=name == "fp16")
              for name in ("plain", "fp16")}
    logits = {name: model.forward(prompt, 0, cache=c, last_only=True) for name, c in caches.items()}
    assert np.array_equal(logits["plain"], logits["fp16"])
    print(f"load average {os.getloadavg()}; {a.gguf}: decode steps {a.prompt} .. {a.prompt + a.steps - 1}, "
          f"CPU ms per step over {a.rounds} rounds")
    times = {name: [] for name in caches}
    for _ in range(a.rounds):
        out = {name: [] for name in caches}
        for i in range(a.steps):
            for name, c in caches.items():  # alternating step by step: the two see the same machine
                c0 = time.thread_time()
                out[name].append(model.forward(steps[i:i + 1], a.prompt + i, cache=c))
                times[name].append(time.thread_time() - c0)
        assert all(np.array_equal(x, y) for x, y in zip(out["plain"], out["fp16"]))
    med = {name: np.median(t) for name, t in times.items()}
    low = {name: np.percentile(t, 10) for name, t in times.items()}
    print("| prompt | plain CPU ms/step median (10th pct) | fp16 | plain/fp16 median (10th pct) |")
    print("|---:|---:|---:|---:|")
    print(f"| {a.prompt} | {med['plain'] * 1e3:.2f} ({low['plain'] * 1e3:.2f}) | {med['fp16'] * 1e3:.2f} "
          f"({low['fp16'] * 1e3:.2f}) | {med['plain'] / med['fp16']:.3f}x ({low['plain'] / low['fp16']:.3f}x) |")
    print(f"load average after {os.getloadavg()}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", help="whole decode steps of this model instead (see above)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--keys", type=int, nargs="+", default=[600])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    a = ap.parse_args()
    if a.gguf:
        return decode(a)
    H, KVH, HD = a.heads, a.kv_heads, a.head_dim
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()}; H={H} KVH={KVH} HD={HD}; us per call, best of {a.rounds} rounds")
    print("| keys | plain CPU us | fp16 CPU us | plain/fp16 | plain wall us | fp16 wall us |")
    print("|---:|---:|---:|---:|---:|---:|")
    for S in a.keys:
        args = ModelArgs(dim=H * HD, n_layers=1, n_heads=H, n_kv_heads=KVH, vocab_size=16, max_seq_len=S)
        caches = {name: KVCache(args, 1, np.float32, capacity=S, fp16=name == "fp16") for name in ("plain", "fp16")}
        k = rng.standard_normal((1, S, KVH, HD), np.float32)
        v = rng.standard_normal((1, S, KVH, HD), np.float32)
        q = rng.standard_normal((1, 1, H, HD), np.float32)
        kv = {name: c.update(0, 0, k, v) for name, c in caches.items()}  # (B, S, KVH, HD) as the forward pass sees
        outs = {name: ggml_ops.attention(q, *kv[name], S - 1) for name in caches}  # compiles
        assert np.array_equal(outs["plain"], outs["fp16"])
        best = {name: (np.inf, np.inf) for name in caches}
        for _ in range(a.rounds):
            for name in caches:
                keys, values = kv[name]
                c0, w0 = time.thread_time(), time.perf_counter()
                for _ in range(a.calls):
                    ggml_ops.attention(q, keys, values, S - 1)
                cpu, wall = (time.thread_time() - c0) / a.calls, (time.perf_counter() - w0) / a.calls
                best[name] = (min(best[name][0], cpu), min(best[name][1], wall))
        p, f = best["plain"], best["fp16"]
        cells = [f"{p[0] * 1e6:.0f}", f"{f[0] * 1e6:.0f}", f"{p[0] / f[0]:.2f}x"]
        cells += [f"{p[1] * 1e6:.0f}", f"{f[1] * 1e6:.0f}"]
        print(f"| {S} | " + " | ".join(cells) + " |")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
