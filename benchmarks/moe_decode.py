"""Decode speed of a Llama 4 mixture of experts against a dense model of the same active size.

A synthetic model with Llama 4 Scout's layer shape (dim 5120, 40 heads, 8 KV heads, 16 experts of width 8192
plus the shared expert, top-1; llama_ref.model.presets) but fewer layers and a small vocabulary, its weights random
bfloat16, is decoded token by token; so is a dense Llama with the same attention and one SwiGLU of width
2 x 8192 (the shared expert plus the one routed expert a token reads). If decode reads only the experts a token
is routed to, both move about the same bytes per token and run at about the same speed, although the MoE holds
~8x the parameters.

    python benchmarks/moe_decode.py --layers 1 --steps 16 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from llama_ref.model import presets
from llama_ref.model.llama4_config import Llama4Args, param_counts
from llama_ref.weights.common import expected_shapes
from llama_ref.weights.packed import BF16Weight
from llama_ref.weights.bf16 import float32_to_bf16_bits


def random_weights(shapes: dict, seed: int = 0) -> dict:
    """bf16 weights: one random block per shape, rolled differently for each tensor (fast, and no two alike)."""
    rng = np.random.default_rng(seed)
    blocks, out = {}, {}
    for k, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 1:
            out[name] = np.ones(shape, np.float32)
            continue
        if shape not in blocks:
            blocks[shape] = float32_to_bf16_bits(rng.standard_normal(shape, np.float32) / np.sqrt(shape[1]))
        out[name] = BF16Weight(np.roll(blocks[shape], k * 7919), shape)
    return out


def tokens_per_second(model, prompt: int, steps: int) -> float:
    ids = np.arange(prompt) % model.args.vocab_size
    logits = model.forward(ids, 0)
    pos, token = prompt, int(logits[-1].argmax())
    model.forward([token], pos)  # warm-up step (compiles kernels on a cold cache)
    pos += 1
    start = time.perf_counter()
    for _ in range(steps):
        token = int(model.forward([token], pos)[-1].argmax())
        pos += 1
    return steps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="numba")
    a = ap.parse_args()
    from llama_ref.model.transformer import Transformer
    from llama_ref.runtime.threads import set_threads

    set_threads(a.threads)
    scout = presets.get("llama-4-scout-17b-16e")
    m = scout.llama4
    moe_args = scout.replace(n_layers=a.layers, vocab_size=a.vocab, max_seq_len=4096,
                             llama4=Llama4Args(**{**m.__dict__, "moe_layers": tuple(range(a.layers)),
                                                  "nope_layers": tuple(i for i in m.nope_layers if i < a.layers)}))
    dense_args = moe_args.replace(llama4=None, hidden_dim=2 * m.expert_hidden_dim)
    results = {}
    for label, args, shapes in (("Llama 4 MoE (16 experts, top-1, shared)", moe_args, expected_shapes(moe_args)),
                                ("dense, same active size", dense_args, expected_shapes(dense_args))):
        model = Transformer(args, random_weights(shapes), backend=a.backend)
        total, active = param_counts(args) if args.llama4 else (args.param_count(),) * 2
        results[label] = (tokens_per_second(model, a.prompt, a.steps), total, active)
        del model
    print(f"{a.layers} layer(s) of Scout's shape, vocab {a.vocab}, bf16 weights, {a.backend}, {a.threads} threads")
    print(f"{'model':42s} {'params':>10s} {'active':>10s} {'decode tok/s':>13s}")
    for label, (speed, total, active) in results.items():
        print(f"{label:42s} {total / 1e9:9.2f}B {active / 1e9:9.2f}B {speed:13.2f}")


if __name__ == "__main__":
    main()
