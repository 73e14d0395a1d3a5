"""One layer's ggml-mode attention for a decode step (one query) at S cached keys, over the two cache layouts:

    plain  KVCache(fp16=False): float32 (B, S, KVH, HD) as computed; kernels/ggml_ops.attention rounds it to
           fp16 and transposes it head-major at every call (the whole cache, keys and values)
    fp16   KVCache(fp16=True): each position rounded once when stored, head-major; attention reads it as it lies

    python benchmarks/ggml_attention_cache.py [--keys 600 2000] [--rounds 5] [--calls 200]

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, nargs="+", default=[600])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    a = ap.parse_args()
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
