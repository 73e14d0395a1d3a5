"""`llama-ref chat` and the KV cache kept across turns.

- The library: a chat turn (or any prompt of one row) whose ids extend what the model's own cache holds
  prefills only the new ids, from the common prefix on, for the jinja (ChatML), Llama 3 and Llama 2 formats,
  and gives the tokens a fresh prefill gives (logits within the chunked-vs-full bound of test_properties).
- The command line through stdin: the same reuse, /help, /save and /load with one-line errors on bad files.
- The command line in a real terminal (a pty): line editing with readline (arrows, Ctrl-A/E), history across
  sessions (Up, Ctrl-R), /help, Ctrl-C at the prompt and during an answer.
"""

from __future__ import annotations

import fcntl
import json
import lzma
import os
import pty
import re
import select
import signal
import struct
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from tiny import random_weights, tiny_args
from llama_ref.tools.cli import CHAT_HELP, CLI_SAMPLING
from llama_ref.text.conversation import ConversationError, load_conversation, save_conversation
from llama_ref.errors import LlamaRefError
from llama_ref.generation.generate import chat_prompt_ids
from llama_ref.model.transformer import Transformer
from test_cli import write_tiny_gguf

DATA = Path(__file__).parent / "data"


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("chat") / "tiny.gguf", context_length=512)


# ---- the library: only the new ids are prefilled, and nothing else changes -------------------------------

def _llama3_tokenizer():
    try:
        return llama_ref.text.tokenizer.Llama3Tokenizer.from_file(llama_ref.fetch("llama3-tokenizer", progress=False))
    except llama_ref.FetchError as e:
        pytest.skip(f"the Llama 3 tokenizer.model could not be fetched from PyPI: {e}")


def _llama2_tokenizer():
    from llama_ref.text.tokenizer import SentencePieceTokenizer

    return SentencePieceTokenizer(lzma.decompress((DATA / "tokenizers" / "llama2-tokenizer.model.xz").read_bytes()))


def _model_pair(fmt: str, tiny_gguf: Path):
    """Two identical float64 models with a tokenizer of the format: one keeps its cache, one never does."""
    if fmt == "jinja":
        return [llama_ref.load(tiny_gguf, dtype=np.float64) for _ in range(2)]
    tokenizer = _llama3_tokenizer() if fmt == "llama3" else _llama2_tokenizer()
    args = tiny_args(vocab_size=tokenizer.vocab_size, max_seq_len=512)
    models = [Transformer(args, random_weights(args, 5), dtype=np.float64) for _ in range(2)]
    for m in models:
        m.tokenizer = tokenizer
    return models


class ForwardLog:
    """Records (start_pos, number of tokens) of every forward call of a model."""

    def __init__(self, model):
        self.calls, self._forward = [], model.forward
        model.forward = self

    def __call__(self, tokens, start_pos=0, **kw):
        self.calls.append((start_pos, np.asarray(tokens).shape[-1]))
        return self._forward(tokens, start_pos, **kw)


@pytest.mark.slow  # a CLI subprocess or more: seconds on 2 cores
@pytest.mark.parametrize("fmt", ["jinja", "llama3", "llama2"])
def test_each_chat_turn_prefills_only_its_new_tokens(fmt, tiny_gguf):
    kept, fresh = _model_pair(fmt, tiny_gguf)
    log = ForwardLog(kept)
    messages = []
    # Greedy, then sampled; the third turn ends at a stop id (a token the fresh model would give later), which
    # is not part of the answer: the next turn's prompt renders the end of that turn its own way.
    turns = [("Hello there", dict(max_new_tokens=6)), ("And then?", dict(max_new_tokens=5, temperature=0.9, seed=4)),
             ("Go on", dict(max_new_tokens=8)), ("Last one", dict(max_new_tokens=6))]
    previous = None  # the answer of the turn before
    for n, (text, kw) in enumerate(turns):
        messages.append({"role": "user", "content": text})
        fresh.reset()
        want = fresh.chat(messages, **kw)
        if n == 2:
            at = next((i for i in range(1, len(want.ids)) if want.ids[i] not in want.ids[:i]), len(want.ids) - 1)
            kw = dict(kw, stop_ids=[want.ids[at]])
            fresh.reset()
            want = fresh.chat(messages, **kw)
            assert want.finish_reason == "stop" and len(want.ids) == at
        held = list(kept.cache.ids) if kept.cache is not None else []
        log.calls.clear()
        got = kept.chat(messages, **kw)
        prompt = chat_prompt_ids(kept, messages)
        assert got.prompt_ids == prompt == want.prompt_ids
        # Exactly the common prefix with what the cache held is reused, and the first forward call starts there.
        assert got.cached_tokens == min(common_prefix(held, prompt), len(prompt) - 1)
        assert log.calls[0] == (got.cached_tokens, len(prompt) - got.cached_tokens)
        assert want.cached_tokens == 0
        if n > 0:  # the earlier turns, and the answers as far as they re-encode the same, were not fed again
            assert got.cached_tokens >= len(previous.prompt_ids)
        # The same tokens as a fresh prefill; logits differ by rounding only (chunked vs full prefill, float64).
        assert got.ids == want.ids and got.text == want.text and got.finish_reason == want.finish_reason
        np.testing.assert_allclose(got.logprobs, want.logprobs, rtol=0, atol=1e-10)
        messages.append({"role": "assistant", "content": got.text})
        previous = got


def test_prompt_reuse_rewinds_and_leaves_batches_alone():
    from tiny import tiny_model

    model, fresh = tiny_model(seed=2), tiny_model(seed=2)
    first = model.generate([5, 6, 7, 8, 9, 10], max_new_tokens=4, stop_ids=[])
    assert first.cached_tokens == 0
    # The cache holds the prompt and every generated token that was fed back (all but the last).
    assert model.cache.ids == first.prompt_ids + first.ids[:-1]
    # A prompt that diverges at position 3: positions 3.. are recomputed (the cache rewinds).
    g = model.generate([5, 6, 7, 1, 2], max_new_tokens=5, stop_ids=[])
    assert g.cached_tokens == 3 and g.ids == fresh.generate([5, 6, 7, 1, 2], max_new_tokens=5, stop_ids=[]).ids
    # The same prompt again: all but its last token are reused.
    again = model.generate([5, 6, 7, 1, 2], max_new_tokens=5, stop_ids=[])
    assert again.cached_tokens == 4 and again.ids == g.ids
    # A batch runs in caches of its own and leaves the model's cache as it was.
    held = list(model.cache.ids)
    model.generate([[5, 6, 7], [1, 2]], max_new_tokens=3, stop_ids=[])
    assert model.cache.ids == held
    # forward() at start_pos 0 starts a new cache; nothing is reused from the old one.
    model.forward([5, 6], 0)
    assert model.generate([5, 6, 7, 1, 2], max_new_tokens=2, stop_ids=[]).cached_tokens == 2
    # While a generation (another thread's, a stream not finished) holds the cache, others use their own.
    held = list(model.cache.ids)
    with model.cache_lock:
        other = model.generate([5, 6, 7, 1, 2, 3], max_new_tokens=4, stop_ids=[])
    assert other.cached_tokens == 0 and model.cache.ids == held
    assert model.generate([5, 6, 7, 1, 2, 3], max_new_tokens=4, stop_ids=[]).ids == other.ids


# ---- the command line through stdin -----------------------------------------------------------------------

def test_cli_second_turn_reuses_the_cache_and_answers_as_a_fresh_prefill(cli, tiny_gguf):
    script = "hello\nand then?\nthe third\n"
    done = cli("chat", "-m", tiny_gguf, "--json", "-q", "-n", 6, "--temp", 0, stdin=script)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    fresh, kept = llama_ref.load(tiny_gguf), llama_ref.load(tiny_gguf)
    kw = dict(CLI_SAMPLING, max_new_tokens=6, temperature=0)
    messages = []
    for n, (text, out) in enumerate(zip(["hello", "and then?", "the third"], answers)):
        messages.append({"role": "user", "content": text})
        fresh.reset()
        want = fresh.chat(messages, **kw)
        assert out["ids"] == want.ids and out["prompt_ids"] == want.prompt_ids
        assert out["cached_tokens"] == kept.chat(messages, **kw).cached_tokens  # as the library reuses
        if n:
            assert out["cached_tokens"] >= len(answers[n - 1]["prompt_ids"])  # the turns before, at least
        else:
            assert out["cached_tokens"] == 0
        messages.append({"role": "assistant", "content": want.text})
    # The speed line says how much was reused.
    plain = cli("chat", "-m", tiny_gguf, "-n", 4, "--temp", 0, stdin="hello\nmore\n")
    lines = [line for line in plain.stderr.splitlines() if "prompt tokens" in line]
    assert len(lines) == 2 and lines[0].startswith(f"[{len(answers[0]['prompt_ids'])} prompt tokens in ")
    assert re.match(r"\[\d+ prompt tokens \(\d+ cached\) in ", lines[1])


def test_help_and_unknown_commands(cli, tiny_gguf):
    done = cli("chat", "-m", tiny_gguf, "-q", stdin="/help\n/nope\n")
    assert done.returncode == 0 and done.stdout == ""
    assert CHAT_HELP in done.stderr and "/save FILE" in CHAT_HELP and "/load FILE" in CHAT_HELP
    assert "[unknown command /nope; /help lists the commands]" in done.stderr
    assert "/help" in cli("chat", "--help").stdout


def test_save_and_load_a_conversation(cli, tiny_gguf, tmp_path):
    saved = tmp_path / "talk.json"
    kw = dict(CLI_SAMPLING, max_new_tokens=5, temperature=0)
    script = f"/system Be brief.\nhello\n/save {saved}\n/reset\n/load {saved}\nand then?\n/save {saved}\n"
    done = cli("chat", "-m", tiny_gguf, "--json", "-q", "-n", 5, "--temp", 0, stdin=script)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    model = llama_ref.load(tiny_gguf)
    first = model.chat("hello", system="Be brief.", **kw)
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first.text}]
    second = model.chat(history + [{"role": "user", "content": "and then?"}], system="Be brief.", **kw)
    assert [a["ids"] for a in answers] == [first.ids, second.ids]  # the loaded conversation went on
    assert f"[saved 2 messages to {saved}]" in done.stderr
    assert f"[loaded 2 messages and a system prompt from {saved}]" in done.stderr
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["system"] == "Be brief." and data["messages"] == history + [
        {"role": "user", "content": "and then?"}, {"role": "assistant", "content": second.text}]
    assert load_conversation(saved) == ("Be brief.", data["messages"])
    # An OpenAI-style message list reads too.
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"role": "system", "content": "S"}] + history), encoding="utf-8")
    assert load_conversation(listed) == ("S", history)
    assert save_conversation(tmp_path / "none.json", None, [])
    assert load_conversation(tmp_path / "none.json") == (None, [])


BAD_FILES = [
    ("missing.json", None, "no such conversation file"),
    ("dir", "<dir>", "is a directory"),
    ("notjson.json", b"{'system': 1", "not JSON (Expecting property name"),
    ("latin1.json", b'{"messages": ["\xe9"]}', "not UTF-8 text"),
    ("number.json", b"42", "got a int"),
    ("nomessages.json", b'{"system": "s"}', "no 'messages' list"),
    ("extra.json", b'{"messages": [], "temperature": 1}', "unknown key 'temperature'"),
    ("roles.json", b'{"messages": [{"role": "assistant", "content": "a"}]}',
     "message 1: role 'assistant' where 'user'"),
    ("content.json", b'{"messages": [{"role": "user", "content": 3}]}', "message 1: content must be a string"),
    ("open.json", b'{"messages": [{"role": "user", "content": "q"}]}', "ends with the assistant's answer"),
    ("surrogate.json", b'{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": ""}]}',
     "not UTF-8 text"),
    ("version.json", b'{"format": "llama_ref.chat", "version": 9, "messages": []}', "version 9"),
]


def test_bad_conversation_files_are_one_line_errors_and_the_session_goes_on(cli, tiny_gguf, tmp_path):
    script = []
    for name, content, _ in BAD_FILES:
        path = tmp_path / name
        if content == "<dir>":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        script.append(f"/load {path}\n")
    script += ["/load\n", f"/save {tmp_path / 'no' / 'such' / 'dir.json'}\n", "hello\n"]
    done = cli("chat", "-m", tiny_gguf, "--json", "-q", "-n", 3, "--temp", 0, stdin="".join(script))
    assert done.returncode == 0, done.stderr
    errors = done.stderr.splitlines()
    assert len(errors) == len(BAD_FILES) + 2
    for line, (name, _, needle) in zip(errors, BAD_FILES):
        assert line.startswith(f"[error: {tmp_path / name}: ") and needle in line, line
    assert errors[-2] == "[/load needs a file name: /load FILE]"
    assert errors[-1].startswith(f"[error: {tmp_path / 'no' / 'such' / 'dir.json'}: cannot write there")
    assert len(done.stdout.splitlines()) == 1  # and the next message was answered
    for name, content, needle in BAD_FILES:
        with pytest.raises(ConversationError, match=re.escape(needle)) as e:
            load_conversation(tmp_path / name)
        assert isinstance(e.value, LlamaRefError)


# ---- the command line in a real terminal ------------------------------------------------------------------

class Terminal:
    """`llama-ref ARGS` on a pseudo-terminal: keys go in as a user types them, output is read as shown."""

    def __init__(self, *argv, cache: Path):
        env = dict(os.environ, TERM="xterm", INPUTRC=os.devnull, LLAMA_REF_CACHE=str(cache), COLUMNS="200")
        pid, fd = pty.fork()
        if pid == 0:  # the child: a new session whose controlling terminal is the pty
            try:
                # Ctrl-C must reach Python as SIGINT even when the test runner ignores it (started with `&`).
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
                os.execve(sys.executable, [sys.executable, "-m", "llama_ref.tools.cli", *map(str, argv)], env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.out, self.at = pid, fd, b"", 0

    def send(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def _read(self, deadline: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            raise EOFError
        self.out += data
        return True

    def expect(self, pattern: bytes, timeout: float = 120) -> re.Match:
        """Wait for `pattern` (a regex) in the output after the previous match."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern, re.S).search(self.out, self.at)
            if found:
                self.at = found.end()
                return found
            try:
                if not self._read(deadline) and time.monotonic() >= deadline:
                    raise AssertionError(f"{pattern!r} not shown within {timeout} s; the terminal showed "
                                         f"{self.out[self.at:][-2000:]!r}; {self._state()}")
            except EOFError:
                raise AssertionError(f"{pattern!r} not shown before the program ended; it showed "
                                     f"{self.out[self.at:][-2000:]!r}") from None

    def interrupt_prompt(self) -> None:
        """Ctrl-C at the prompt, until a new prompt shows. CPython's readline looks at signals only when
        they interrupt its wait for a key: a SIGINT that lands while it handles the keys before is acted on
        at the next one, as a person typing Ctrl-C twice would see."""
        for _ in range(20):
            self.send(CTRL_C)
            try:
                self.expect(rb"> ", timeout=3)
                return
            except AssertionError:
                continue
        raise AssertionError(f"Ctrl-C at the prompt gave no new prompt; {self._state()}")

    def _state(self) -> str:
        """What the program is doing, for a failure message."""
        try:
            cmd = Path(f"/proc/{self.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            wchan = Path(f"/proc/{self.pid}/wchan").read_text()
            return f"pid {self.pid} runs {cmd[:200]!r}, waiting in {wchan!r}"
        except OSError:
            return f"pid {self.pid}"

    def answer(self, line: str) -> dict:
        """Type a line at the prompt and return the --json answer printed for it."""
        self.expect(rb"> ")
        self.send(line)
        return json.loads(self.expect(rb"\n(\{\"text\".*?\})\r?\n").group(1))

    def wait(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                self._read(deadline)
        except EOFError:
            pass
        for _ in range(int(timeout * 10)):
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, signal.SIGKILL)
        raise AssertionError(f"still running; it showed {self.out[-2000:]!r}")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _user_text(model, out: dict) -> str:
    """The last user message in an answer's prompt (ChatML), as the model got it."""
    text = model.tokenizer.decode(out["prompt_ids"])
    return text.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


LEFT, UP, CTRL_A, CTRL_E, CTRL_R, CTRL_C = "\x1b[D", "\x1b[A", "\x01", "\x05", "\x12", "\x03"


@pytest.mark.slow  # a CLI subprocess or more: seconds on 2 cores
def test_terminal_line_editing_history_help_and_ctrl_c_at_the_prompt(tiny_gguf, tmp_path):
    model = llama_ref.load(tiny_gguf)
    saved = tmp_path / "talk.json"
    term = Terminal("chat", "-m", tiny_gguf, "--json", "-q", "-n", 3, "--temp", 0, cache=tmp_path / "cache")
    try:
        # "wrld", three steps left, "o": the model gets "world", not escape codes.
        first = term.answer(f"wrld{LEFT * 3}o\r")
        assert _user_text(model, first) == "world"
        assert first["prompt_ids"] == chat_prompt_ids(model, [{"role": "user", "content": "world"}])
        # Ctrl-A to the start, Ctrl-E to the end.
        second = term.answer(f"b{CTRL_A}a{CTRL_E}c\r")
        assert _user_text(model, second) == "abc" and second["cached_tokens"] >= len(first["prompt_ids"])
        # Up twice recalls "world" from this session's history.
        third = term.answer(f"{UP}{UP}\r")
        assert _user_text(model, third) == "world"
        term.expect(rb"> ")
        term.send("/help\r")
        term.expect(re.escape(CHAT_HELP.splitlines()[-1].encode()))
        # Ctrl-C at the prompt drops the line being typed, and the session goes on.
        term.expect(rb"> ")
        term.send("never sent")
        term.expect(rb"never sent")
        term.interrupt_prompt()
        term.send(f"/save {saved}\r")
        term.expect(rb"\[saved 6 messages")
        term.expect(rb"> ")
        term.send("/exit\r")
        assert term.wait() == 0
    finally:
        term.kill()
    assert [m["content"] for m in json.loads(saved.read_text(encoding="utf-8"))["messages"][::2]] == [
        "world", "abc", "world"]
    history = (tmp_path / "cache" / "chat_history").read_text(encoding="utf-8")
    assert "abc" in history and "never sent" not in history

    # A new session finds the history: Ctrl-R searches it.
    term = Terminal("chat", "-m", tiny_gguf, "--json", "-q", "-n", 3, "--temp", 0, cache=tmp_path / "cache")
    try:
        assert _user_text(model, term.answer(f"{CTRL_R}ab\r")) == "abc"
        term.expect(rb"> ")
        term.send("\x04")  # Ctrl-D leaves
        assert term.wait() == 0
    finally:
        term.kill()
    # --no-history: the file is neither read nor written.
    before = (tmp_path / "cache" / "chat_history").read_text(encoding="utf-8")
    term = Terminal("chat", "-m", tiny_gguf, "--json", "-q", "-n", 3, "--temp", 0, "--no-history",
                    cache=tmp_path / "cache")
    try:
        out = term.answer(f"{UP}fresh\r")  # no earlier line to recall
        assert _user_text(model, out) == "fresh"
        term.expect(rb"> ")
        term.send("/exit\r")
        assert term.wait() == 0
    finally:
        term.kill()
    assert (tmp_path / "cache" / "chat_history").read_text(encoding="utf-8") == before


def test_terminal_ctrl_c_stops_an_answer_and_the_session_goes_on(tmp_path):
    # A long window and no end-of-text stop make an answer that runs until it is interrupted.
    long = write_tiny_gguf(tmp_path / "long.gguf", context_length=1 << 16)
    term = Terminal("chat", "-m", long, "-q", "--ignore-eos", "-n", 60000, cache=tmp_path / "cache")
    try:
        term.expect(rb"> ")
        term.send("tell me everything\r")
        term.expect(rb"tell me everything\r\n.")  # the answer has started
        term.send(CTRL_C)
        term.expect(rb"finish: interrupted")
        term.expect(rb"> ")
        term.send("/help\r")
        term.expect(rb"/load FILE")
        term.expect(rb"> ")
        term.send("/exit\r")
        assert term.wait() == 0
    finally:
        term.kill()
