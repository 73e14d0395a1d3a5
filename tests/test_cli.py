"""The llama-ref command line: its stdout, stderr and exit code, through the `cli` fixture (tests/conftest.py):
main(argv) in the test's process in the fast tier, and again as a user runs it, a subprocess, in the slow tier.
test_the_installed_commands_run starts the console script and `python -m llama_ref` in the fast tier too.

Most tests use a tiny random model written to a GGUF file with its own byte-level tokenizer and a ChatML
template, so a run takes a second; the CLI's outputs are checked against the library called directly.
One test scores a text with the real default model against transformers' perplexity.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from llama_ref.tools.cli import CLI_SAMPLING
from cli_run import run_cli
from tiny import file_backed, random_weights, tiny_args
from gguf_files import byte_level_tokens, write_llama_gguf

DATA = Path(__file__).parent / "data"
SPEED_LINE = re.compile(r"\d+ new tokens, (nan|[\d.]+) tok/s")  # the line a run ends with, on stderr
RATE = re.compile(r"[\d.]+ tok/s")
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_tiny_gguf(path: Path, seed: int = 0, context_length: int = 128) -> Path:
    """A 2-layer random Llama with a byte-level BPE vocabulary (3 specials, 256 bytes, 2 merges)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + byte_level_tokens() + ["Ġt", "he"]
    args = tiny_args(vocab_size=len(tokens), max_seq_len=context_length)
    return write_llama_gguf(path, args, random_weights(args, seed, scale=1.0), {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
        "tokenizer.ggml.merges": ["Ġ t", "h e"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
    })


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return llama_ref.load(tiny_gguf)


# ---- generate -----------------------------------------------------------------------------------------

def test_generate_json_equals_library(cli, tiny_gguf, tiny):
    flags = dict(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.3,
                 seed=7)
    done = cli("generate", "-m", tiny_gguf, "--json", "-q", "--top-logprobs", 3, "--ignore-eos",
               "-n", 12, "--temp", 0.9, "--top-k", 50, "--top-p", 0.9, "--min-p", 0.01,
               "--repetition-penalty", 1.3, "--seed", 7, "the theme")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    expected = tiny.generate("the theme", stop_ids=[], top_logprobs=3, **flags)
    assert out["ids"] == expected.ids and len(out["ids"]) == 12
    assert out["text"] == expected.text == tiny.tokenizer.decode(expected.ids)
    assert out["finish_reason"] == "length"
    assert out["prompt_ids"] == tiny.tokenizer.encode("the theme")
    assert np.allclose(out["logprobs"], expected.logprobs)
    assert [len(t) for t in out["top_logprobs"]] == [3] * 12
    # Each alternative carries its token's text and bytes beside its id, as OpenAI's logprobs do.
    for step, want in zip(out["top_logprobs"], expected.top_logprobs):
        assert [(a["id"], a["token"], bytes(a["bytes"])) for a in step] == [
            (i, tiny.tokenizer.decode([i]), tiny.tokenizer.decode_bytes([i])) for i, _ in want]
        assert np.allclose([a["logprob"] for a in step], [lp for _, lp in want])


# The two ways a user starts the command, as child processes in the fast tier too (the `cli` fixture's in-process
# runs call main(argv) directly; an error exit through the console script is test_model_errors's).
@pytest.mark.parametrize("launcher", ["llama-ref", "python -m llama_ref"])
def test_the_installed_commands_run(tiny_gguf, tiny, launcher):
    if launcher == "llama-ref":
        exe = shutil.which("llama-ref")
        if exe is None:
            pytest.skip("the llama-ref console script is not on PATH (pip install -e .)")
        command = [exe]
    else:
        command = [sys.executable, "-m", "llama_ref"]
    done = run_cli("generate", "-m", tiny_gguf, "--json", "-q", "-n", 6, "--ignore-eos", "--temp", 0, "hello",
                   launcher=command)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ids"] == tiny.generate("hello", max_new_tokens=6, stop_ids=[]).ids


def test_in_process_runs_leave_the_process_as_they_found_it(tiny_gguf, monkeypatch, tmp_path):
    # The fast tier's CLI runs share their process with the tests after them: what a run sets (-t's thread counts,
    # an environment variable, the streams, argv) must be put back, and an error must not escape as an exception.
    import llama_ref.runtime.threads as threads
    from threadpoolctl import threadpool_info

    from cli_run import run_cli_in_process

    def blas():  # and Numba's count, where it is imported
        numba = sys.modules.get("numba")
        return (sorted(p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"),
                numba and numba.get_num_threads())

    monkeypatch.chdir(tmp_path)
    threads.set_threads(2)
    before = (threads._chosen, blas(), dict(os.environ), os.getcwd(), sys.argv[:], sys.stdin, sys.stdout,
              sys.stderr, signal.getsignal(signal.SIGINT))
    done = run_cli_in_process("generate", "-m", tiny_gguf, "-t", 1, "-q", "-n", 2, "--temp", 0, "hi",
                              env={"LLAMA_REF_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert (threads._chosen, blas(), dict(os.environ), os.getcwd(), sys.argv[:], sys.stdin, sys.stdout,
            sys.stderr, signal.getsignal(signal.SIGINT)) == before
    bad = run_cli_in_process("generate", "-m", tiny_gguf, "-t", 0, "hi")
    assert bad.returncode == 2 and bad.stderr.startswith("llama-ref: error: threads must be")
    assert run_cli_in_process("--no-such-flag").returncode == 2  # argparse's SystemExit, as a status


@pytest.mark.slow  # a CLI subprocess or more: seconds on 2 cores
def test_generate_with_mmap_and_packed_weights_gives_the_same_text(cli, tiny_gguf, tiny):
    # --mmap leaves the float32 tensors mapped from the file; --weights packed keeps them as stored; the
    # numba backend reads them: none of it may change what is generated.
    done = cli("generate", "-m", tiny_gguf, "--mmap", "--weights", "packed", "--backend", "numba", "-q",
               "--json", "-n", 8, "--ignore-eos", "--temp", 0, "hello")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ids"] == tiny.generate("hello", max_new_tokens=8, stop_ids=[]).ids
    wq = "layers.0.attention.wq.weight"
    assert file_backed(llama_ref.load(tiny_gguf, mmap=True).weights[wq]) and not file_backed(tiny.weights[wq])


def test_generate_streams_text_and_reports_speed(cli, tiny_gguf, tiny):
    done = cli("generate", "-m", tiny_gguf, "-n", 10, "--ignore-eos", "--temp", 0, "hello")
    assert done.returncode == 0, done.stderr
    expected = tiny.generate("hello", max_new_tokens=10, stop_ids=[])
    assert done.stdout == "hello" + expected.text + "\n"
    assert SPEED_LINE.search(done.stderr).group(0).startswith("10 new tokens")


def test_generate_stop_string_and_chat_flag(cli, tiny_gguf, tiny):
    full = tiny.generate("abc", max_new_tokens=12, stop_ids=[])
    stop = full.text[4:6]  # two characters from the middle of the greedy text
    done = cli("generate", "-m", tiny_gguf, "--json", "-q", "-n", 12, "--ignore-eos", "--stop", stop,
               "--temp", 0, "abc")
    out = json.loads(done.stdout)
    assert out["finish_reason"] == "stop" and out["stop"] == stop
    assert out["text"] == full.text[:full.text.find(stop)]
    done = cli("generate", "-m", tiny_gguf, "--json", "-q", "-n", 5, "--chat", "--system", "S", "--temp", 0,
               "hi")
    out = json.loads(done.stdout)
    assert out["ids"] == tiny.chat("hi", system="S", max_new_tokens=5).ids
    assert tiny.tokenizer.decode(out["prompt_ids"]) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# ---- chat ---------------------------------------------------------------------------------------------

def test_chat_through_stdin_keeps_history_and_obeys_commands(cli, tiny_gguf, tiny):
    script = "hello\nand then?\n/reset\nagain\n/system Be brief.\nhi\n/exit\nnever read\n"
    done = cli("chat", "-m", tiny_gguf, "--json", "-q", "-n", 6, "--seed", 3, "--temp", 0.8, stdin=script)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(answers) == 4  # /exit ends the session before "never read"
    kw = dict(CLI_SAMPLING, max_new_tokens=6, seed=3, temperature=0.8)  # the CLI's defaults for the rest
    first = tiny.chat([{"role": "user", "content": "hello"}], **kw)
    second = tiny.chat([{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.text},
                        {"role": "user", "content": "and then?"}], **kw)
    third = tiny.chat("again", **kw)  # after /reset the history is gone
    fourth = tiny.chat("hi", system="Be brief.", **kw)
    assert [a["ids"] for a in answers] == [first.ids, second.ids, third.ids, fourth.ids]
    assert "[conversation reset]" in done.stderr


def test_chat_plain_output_and_eof(cli, tiny_gguf, tiny):
    done = cli("chat", "-m", tiny_gguf, "-n", 5, "--temp", 0, stdin="hello\n")  # ends at end of input
    assert done.returncode == 0, done.stderr
    assert done.stdout == tiny.chat("hello", max_new_tokens=5).text + "\n"
    assert SPEED_LINE.search(done.stderr)


@pytest.mark.slow  # a CLI subprocess or more: seconds on 2 cores
def test_ctrl_c_stops_the_answer_not_the_session(tmp_path):
    # A long window and no end-of-text stop make an answer that runs until it is interrupted.
    model = write_tiny_gguf(tmp_path / "long.gguf", context_length=1 << 16)
    # SIGINT back to its default in the child: a runner started in the background (`cmd &`) ignores SIGINT,
    # the child would inherit that, and Python then never turns Ctrl-C into KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "llama_ref.tools.cli", "chat", "-m", str(model), "-q",
                             "--ignore-eos", "-n", "60000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write("tell me everything\n")
        proc.stdin.flush()
        assert proc.stdout.read(1)  # the answer has started streaming
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        proc.stdin.write("/reset\n/exit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "finish: interrupted" in err  # the answer stopped ...
    assert "[conversation reset]" in err  # ... and the session went on to the next commands


# ---- score --------------------------------------------------------------------------------------------

def test_score_json_equals_library(cli, tiny_gguf, tiny, tmp_path):
    text = "the heathen thought the theatre had the thing.\n"
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    done = cli("score", str(path), "-m", tiny_gguf, "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    expected = tiny.score(text)
    assert out["n_tokens"] == expected.n_tokens == len(tiny.tokenizer.encode(text)) - 1
    assert out["perplexity"] == pytest.approx(expected.perplexity, rel=1e-12)
    assert RATE.search(done.stderr)
    plain = cli("score", "-", "-m", tiny_gguf, "-q", stdin=text)
    assert plain.stdout.startswith(f"perplexity {expected.perplexity:.4f} over {expected.n_tokens} tokens")


@pytest.mark.slow
def test_score_matches_transformers_perplexity(default_model_path, tmp_path):
    # The oracle: transformers' perplexity of the same GGUF (tests/fixtures/make_perplexity_reference.py).
    ref = json.loads((DATA / "smollm2_perplexity.json").read_text(encoding="utf-8"))
    path = tmp_path / "text.txt"
    path.write_text(ref["text"], encoding="utf-8")
    done = run_cli("score", str(path), "-m", default_model_path, "--json", "-q")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["n_tokens"] == ref["n_tokens"]
    assert out["perplexity"] == pytest.approx(ref["perplexity_float64"], rel=1e-3)


# ---- fetch and help -----------------------------------------------------------------------------------

def test_fetch_prints_the_cached_path(default_model_path):
    done = run_cli("fetch", "--json", "-q")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert Path(out["path"]) == Path(default_model_path) and out["bytes"] == os.path.getsize(default_model_path)
    listed = json.loads(run_cli("fetch", "--list", "--json").stdout)
    assert llama_ref.DEFAULT_MODEL in [m["name"] for m in listed]


def test_help_has_examples_and_the_library_flags(cli):
    top = cli("--help")
    assert top.returncode == 0
    for command in ("generate", "chat", "score", "fetch", "teacher"):
        assert command in top.stdout
    assert "examples:" in top.stdout
    gen = cli("generate", "--help").stdout
    import inspect

    # Every keyword of model.generate has its flag, spelled the same with dashes.
    for name in inspect.signature(llama_ref.Transformer.generate).parameters:
        if name in ("self", "prompt", "add_bos", "allow_special"):
            continue
        flag = {"stop_ids": "--stop-id", "images": "--image"}.get(name, "--" + name.replace("_", "-"))
        assert flag in gen, flag
    assert "/reset" in cli("chat", "--help").stdout


# ---- bad input: exit code 2 and one line naming the problem ---------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["generate", "-m", "no/such/model.gguf", "hi"], "no/such/model.gguf"),
    (["generate", "-m", "{tiny}", "--temp", "-1", "hi"], "temperature"),
    (["generate", "-m", "{tiny}", "-t", "0", "hi"], "threads must be a positive integer"),
    (["generate", "-m", "{tiny}", "-c", "100000", "hi"], "longer than the model's 128"),
    (["generate", "-m", "{tiny}", "-p", "a", "b"], "give the prompt once"),
    (["generate", "-m", "{tiny}", "--top-p", "0", "hi"], "top_p"),
    (["generate", "-m", "{tiny}", "-n", "-3", "hi"], "max_new_tokens"),
    (["generate", "-m", "{tiny}", "--stop-id", "99999", "hi"], None),  # an unused stop id is harmless
    (["generate", "-m", "{tiny}", "x" * 200], "context window"),
    (["generate", "-m", "{tiny}", ""], "prompt is empty"),
    (["generate", "--no-such-flag", "hi"], "--no-such-flag"),
    (["score", "-m", "{tiny}", "{missing}"], "missing.txt"),
    (["score", "-m", "{tiny}", "{empty}"], "empty"),
    (["chat", "-m", "{tiny}", "--top-k", "-2"], "top_k"),
    (["fetch", "no-such-model"], "no-such-model"),
])
def test_bad_input_exits_2_with_one_line(cli, tiny_gguf, tmp_path, argv, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = [a.format(tiny=tiny_gguf, missing=tmp_path / "missing.txt", empty=empty) for a in argv]
    done = cli(*argv, "-q" if argv[0] != "fetch" and "--no-such-flag" not in argv else "--json",
               stdin="hello\n")
    if needle is None:
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_truncate_flag_keeps_the_end_of_a_long_prompt(cli, tiny_gguf, tiny):
    prompt = "x" * 200  # 200 byte tokens, window 128
    done = cli("generate", "-m", tiny_gguf, "--json", "-q", "-n", 4, "--truncate", "--ignore-eos", "--temp", 0,
               prompt)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["prompt_ids"] == tiny.tokenizer.encode(prompt)[-(128 - 4):]
    assert len(out["ids"]) == 4
