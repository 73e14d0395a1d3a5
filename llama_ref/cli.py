"""The llama-ref command line."""

from __future__ import annotations

import argparse
import sys
import time

from .fetch import DEFAULT_MODEL

EXAMPLES = """examples:
  llama-ref generate "The capital of France is"
  llama-ref generate --chat "What is the capital of France?" -n 64
  llama-ref generate --model path/to/model.gguf --temperature 0.8 --seed 1 "Once upon a time"
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llama-ref", description="A readable NumPy reference of Llama models.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"GGUF file, model directory or name "
                                                                 f"(default: {DEFAULT_MODEL})")
    g.add_argument("-n", "--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    g.add_argument("-t", "--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("-s", "--seed", type=int, default=None, help="random seed for sampling")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--backend", choices=["numpy", "numba"], default="numpy")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as e:
        # Every error llama_ref raises on bad input is a ValueError/RuntimeError subclass with a message
        # naming the file or argument; the user gets that one line, not a traceback.
        print(f"llama-ref: error: {e}", file=sys.stderr)
        return 2
    return 0


def _generate(args) -> int:
    from . import load
    from .generation import generate_ids
    from .model import InputError
    from .tokenizer import render_chat

    if args.max_new_tokens < 0:
        raise InputError("--max-new-tokens must be >= 0")
    if not args.prompt:
        raise InputError("the prompt is empty")
    model = load(args.model, backend=args.backend, progress=True)
    tok = model.tokenizer
    if args.chat:
        if not tok.chat_template:
            raise InputError(f"{model.source}: the model has no chat template")
        text = render_chat(tok.chat_template, [{"role": "user", "content": args.prompt}])
        prompt_ids = tok.encode(text, allow_special=True)
    else:
        prompt_ids = tok.encode(args.prompt)
        sys.stdout.write(args.prompt)
    stream = tok.stream_decoder()
    start = time.perf_counter()
    n = 0
    first = None
    for token, _ in generate_ids(model, prompt_ids, args.max_new_tokens, args.temperature, args.seed,
                                 tok.stop_ids if args.chat else {tok.eos_id}):
        n += 1
        first = first or time.perf_counter()
        if token in tok.stop_ids and args.chat:
            break
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()
    sys.stdout.write(stream.flush() + "\n")
    end = time.perf_counter()
    decode_rate = (n - 1) / (end - first) if n > 1 else float("nan")
    print(f"[{len(prompt_ids)} prompt tokens in {(first or end) - start:.2f} s, {n} new tokens, "
          f"{decode_rate:.1f} tok/s decode, backend {model.backend_name}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
