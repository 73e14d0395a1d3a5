"""Load on `llama-ref serve` (issue 15): concurrent streaming clients on the default model, 127.0.0.1 only.

    python benchmarks/serve_load.py [--clients 8] [--tokens 64] [--requests 500] [--backend numpy]

The server runs as its own process (`llama-ref serve`), so the clients' Python does not share its GIL.
  1. one client: streamed completions, one after another; decode tok/s
  2. N clients at once: aggregate decode tok/s, and the ratio to one client
     (1 and 2 alternate for --rounds rounds and the best of each is kept: the machine may be shared)
  3. --requests short greedy requests from N clients, a random fifth of them abandoned mid-stream: every
     answer that completes must equal that prompt's answer alone (nothing lost, nothing mixed up);
     the server's resident memory (RSS) before and after.
"Decode tok/s" counts the tokens after each stream's first one, over the time from the first stream's
first token to the last stream's end, so prefill is left out of both the single and the concurrent rates.
Every loop is bounded by a request count; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import threading
import time

import httpx

MODEL = ["?"]  # the served model's name, as /v1/models gives it
PROMPTS = ["Once upon a time", "The history of Rome", "A recipe for bread:", "Dear diary, today",
           "The best way to learn Python is", "In the year 2100,", "My favourite animal is", "Water boils when"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def stream(url: str, prompt: str, tokens: int, abandon_after: int = -1) -> dict:
    """One streamed greedy completion; returns its text and its first and last chunk times."""
    body = {"model": MODEL[0], "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    text, chunks, first, last = [], 0, None, None
    with httpx.Client(timeout=600) as http, http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            piece = json.loads(line[6:])["choices"][0]["text"]
            if piece:
                now = time.perf_counter()
                first, last = first or now, now
                text.append(piece)
                chunks += 1
                if chunks == abandon_after:
                    return {"abandoned": True}
    return {"text": "".join(text), "first": first, "last": last, "abandoned": False}


def decode_rate(results: list[dict], tokens: int) -> float:
    start = min(r["first"] for r in results)
    end = max(r["last"] for r in results)
    return len(results) * (tokens - 1) / (end - start)


def run_clients(n: int, job) -> list:
    out = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, job(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64, help="tokens per request in the throughput phases")
    p.add_argument("--requests", type=int, default=500, help="requests in the disconnect phase")
    p.add_argument("--short-tokens", type=int, default=12, help="tokens per request in the disconnect phase")
    p.add_argument("--backend", default="numpy")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the throughput phases (best kept)")
    args = p.parse_args()
    rng = random.Random(args.seed)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "llama_ref.tools.cli", "serve", args.model, "--port", str(port),
                               "--max-batch", str(args.clients), "--max-queue", str(4 * args.clients),
                               "--backend", args.backend, "-q"])
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        MODEL[0] = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        stream(url, PROMPTS[0], 4)  # warm-up
        print(f"server pid {server.pid}, backend {args.backend}, {args.clients} clients, "
              f"{args.tokens} tokens per request")

        # The machine is shared: each round measures one client then N, and the best of each is kept.
        ones, aggs = [], []
        for _ in range(args.rounds):
            single = [stream(url, PROMPTS[i], args.tokens) for i in range(2)]
            ones.append(sum(decode_rate([r], args.tokens) for r in single) / len(single))
            many = run_clients(args.clients, lambda i: stream(url, PROMPTS[i % len(PROMPTS)], args.tokens))
            aggs.append(decode_rate(many, args.tokens))
            print(f"  round: 1 client {ones[-1]:.1f}, {args.clients} clients {aggs[-1]:.1f} decode tok/s")
        one, agg = max(ones), max(aggs)
        print(f"1 client:  {one:6.1f} decode tok/s (best of {args.rounds})")
        print(f"{args.clients} clients: {agg:6.1f} decode tok/s aggregate (best of {args.rounds}) = "
              f"{agg / one:.2f}x one client")

        if args.requests <= 0:
            return 0
        expected = {q: stream(url, q, args.short_tokens)["text"] for q in PROMPTS}
        rss_before = rss_mib(server.pid)
        todo = list(range(args.requests))
        lock = threading.Lock()
        tally = {"ok": 0, "abandoned": 0, "wrong": 0, "failed": 0}
        rss_trace = []  # MiB after every 100 requests

        def worker(_):
            while True:
                with lock:
                    if not todo:
                        return
                    todo.pop()
                    prompt = rng.choice(PROMPTS)
                    leave = rng.randint(1, args.short_tokens - 1) if rng.random() < 0.2 else -1
                try:
                    r = stream(url, prompt, args.short_tokens, leave)
                    key = "abandoned" if r["abandoned"] else ("ok" if r["text"] == expected[prompt] else "wrong")
                except httpx.HTTPError:
                    key = "failed"
                with lock:
                    tally[key] += 1
                    if sum(tally.values()) % 100 == 0:
                        rss_trace.append(round(rss_mib(server.pid)))

        started = time.perf_counter()
        run_clients(args.clients, worker)
        elapsed = time.perf_counter() - started
        time.sleep(1.0)  # let the server drop the last abandoned rows
        rss_after = rss_mib(server.pid)
        metrics = httpx.get(url + "/metrics").text
        left = [line for line in metrics.splitlines()
                if line.startswith(("llama_ref_batch_rows", "llama_ref_queue_length", "llama_ref_cancelled_rows",
                                    "llama_ref_prompt_tokens", "llama_ref_batch_compactions"))]
        print(f"{args.requests} requests in {elapsed:.0f} s: {tally}")
        print(f"server RSS {rss_before:.0f} MiB before, {rss_after:.0f} MiB after (every 100 requests: "
              f"{rss_trace}); " + ", ".join(left))
        return 0 if tally["wrong"] == tally["failed"] == 0 else 1
    finally:
        server.terminate()
        server.wait(timeout=60)

if __name__ == "__main__":
    sys.exit(main())
