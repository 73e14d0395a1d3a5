"""The command line in llama.cpp's dialect (issue 19): sampling defaults, -p/-f/-n/-s/-t/-c, --version, the
notices a long or truncated prompt gets, top_logprobs with their text, and the library calls behind them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from llama_ref.generation import generate as generation
from llama_ref.tools.cli import CLI_SAMPLING
from llama_ref.runtime.threads import compile_notice
from llama_ref.generation.sampling import log_softmax
from test_cli import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="module")
def tiny(tiny_gguf):
    return llama_ref.load(tiny_gguf)


def test_cli_samples_with_llama_cpp_defaults(cli, tiny_gguf, tiny):
    done = cli("generate", "-m", tiny_gguf, "--json", "-q", "-n", 10, "--ignore-eos", "-s", 11, "the theme")
    assert done.returncode == 0, done.stderr
    expected = tiny.generate("the theme", max_new_tokens=10, stop_ids=[], seed=11, **CLI_SAMPLING)
    assert json.loads(done.stdout)["ids"] == expected.ids
    assert CLI_SAMPLING == dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repetition_penalty=1.0)
    greedy = cli("generate", "-m", tiny_gguf, "--json", "-q", "-n", 10, "--ignore-eos", "--temp", 0, "the theme")
    assert json.loads(greedy.stdout)["ids"] == tiny.generate("the theme", max_new_tokens=10, stop_ids=[]).ids


def test_prompt_from_argument_option_file_and_stdin_alike(cli, tiny_gguf, tmp_path):
    (tmp_path / "p.txt").write_text("the theme", encoding="utf-8")
    common = ["generate", "-m", tiny_gguf, "--json", "-q", "--n-predict", 6, "--ignore-eos", "--temp", 0]
    outs = [cli(*common, "the theme"), cli(*common, "-p", "the theme"),
            cli(*common, "-f", tmp_path / "p.txt"), cli(*common, "-", stdin="the theme")]
    assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
    results = [json.loads(o.stdout) for o in outs]
    assert len({(tuple(r["prompt_ids"]), tuple(r["ids"])) for r in results}) == 1


def test_threads_and_context_flags(cli, tiny_gguf, tiny):
    # -t sets the BLAS threads of the process; -c a shorter window, which truncation then respects.
    code = ("import llama_ref.runtime.threads as r, threadpoolctl; r.set_threads(1); "
            "print(max(p['num_threads'] for p in threadpoolctl.threadpool_info()))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "1"
    done = cli("generate", "-m", tiny_gguf, "-t", 1, "-c", 32, "--json", "-q", "-n", 4, "--truncate",
               "--ignore-eos", "--temp", 0, "x" * 50)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["prompt_ids"] == tiny.tokenizer.encode("x" * 50)[-(32 - 4):]
    short = llama_ref.load(tiny_gguf, max_seq_len=32)
    assert short.args.max_seq_len == 32 and short.args.replace(max_seq_len=128) == tiny.args
    with pytest.raises(llama_ref.WeightsError, match="longer than the model's 128"):
        llama_ref.load(tiny_gguf, max_seq_len=129)


def test_truncation_is_announced_and_only_the_kept_prompt_echoed(cli, tiny_gguf, tiny):
    prompt = "ab" * 100  # 200 byte tokens, window 128
    done = cli("generate", "-m", tiny_gguf, "-n", 4, "--truncate", "--ignore-eos", "--temp", 0, prompt)
    assert done.returncode == 0, done.stderr
    assert "[prompt truncated: kept its last 124 of 200 tokens" in done.stderr
    kept = tiny.tokenizer.decode(tiny.tokenizer.encode(prompt)[-124:])
    g = tiny.generate(prompt, max_new_tokens=4, stop_ids=[], truncate=True)
    assert done.stdout == kept + g.text + "\n"


def test_long_prompt_is_announced(tiny_gguf, monkeypatch, capsys):
    from types import SimpleNamespace

    from llama_ref.tools import cli

    model = llama_ref.load(tiny_gguf)
    monkeypatch.setattr(cli, "LONG_PROMPT", 10)
    args = SimpleNamespace(quiet=False, truncate=False, max_new_tokens=4)
    assert cli._announce_prompt(model, "x" * 20, args) == "x" * 20
    assert "[prefilling 20 prompt tokens ...]" in capsys.readouterr().err
    cli._announce_prompt(model, "x" * 5, args)
    assert capsys.readouterr().err == ""


def test_score_in_chunks_equals_one_forward(tiny, monkeypatch):
    ids = [int(i) for i in (np.arange(100) * 7 + 3) % tiny.args.vocab_size]
    logp = log_softmax(tiny.logits(ids))
    want = -sum(logp[t - 1, ids[t]] for t in range(1, len(ids)))
    monkeypatch.setattr(generation, "SCORE_CHUNK", 7)  # boundaries everywhere; chunked prefill is exact to rounding
    got = tiny.score(ids, progress=True)
    assert got.n_tokens == 99 and got.nll == pytest.approx(want, rel=1e-6)
    monkeypatch.setattr(generation, "SCORE_CHUNK", 512)
    assert tiny.score(ids).nll == pytest.approx(want, rel=1e-6)


def test_score_shows_progress(cli, tiny_gguf, tmp_path):
    (tmp_path / "t.txt").write_text("the theme of the text " * 8, encoding="utf-8")
    done = cli("score", tmp_path / "t.txt", "-m", tiny_gguf)
    assert done.returncode == 0, done.stderr
    assert "scoring" in done.stderr  # tqdm's bar, on stderr
    assert "scoring" not in cli("score", tmp_path / "t.txt", "-m", tiny_gguf, "-q").stderr


def test_version_and_subcommand_help(cli):
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"llama-ref {llama_ref.__version__}"
    for command in ("generate", "chat", "score", "teacher", "fetch", "info", "convert", "tokenize"):
        text = cli(command, "--help").stdout
        assert "examples:" in text and f"llama-ref {command}" in text.split("examples:")[1], command


def test_compile_notice_only_with_a_cold_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert "compiling the kernels" in compile_notice()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "linear._mv-10.py311.nbi").write_bytes(b"")
    assert compile_notice() is None
