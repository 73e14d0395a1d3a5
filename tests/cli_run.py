"""The llama-ref command line run two ways, with one result type (subprocess.CompletedProcess), so that one test body
checks both:

- run_cli: as a user runs it, `python -m llama_ref.tools.cli ARGS` in a child process. Each run starts Python and
  imports NumPy, Numba and llama_ref again: ~0.5 s of CPU, most of the CLI tests' cost.
- run_cli_in_process: main(argv) in this process, with stdin, stdout and stderr swapped for in-memory files that
  encode and decode as the child's pipes do; SystemExit becomes the return code and an uncaught exception a
  traceback on stderr and code 1, as the interpreter does. Warnings are printed to that stderr under the filters a
  child starts with. What a run may change in the process is put back after it: the thread counts
  (set_threads, threadpoolctl's BLAS limit, Numba's), the environment, SIGINT/SIGTERM handlers, the working
  directory and sys.argv.

The `cli` fixture (tests/conftest.py) gives a test the in-process runner in the fast tier and the subprocess one in
the slow tier. What only a child shows (bytes written below Python, e.g. by a C library; settings read once at
import, such as tqdm's TQDM_* variables; the console script and `python -m llama_ref`) is checked by the tests that
call run_cli directly.
"""

from __future__ import annotations

import builtins
import functools
import importlib
import io
import json
import locale
import os
import re
import signal
import subprocess
import sys
import traceback
import warnings

CLI_MODULE = "llama_ref.tools.cli"


def run_cli(*argv, stdin: "str | bytes" = "", timeout: float = 300, env: "dict | None" = None,
            launcher: "list | None" = None) -> subprocess.CompletedProcess:
    """The command in a child process. Text in and out when stdin is str, bytes when it is bytes (argv may then
    hold bytes too, as a shell passes $'\\xff'). launcher replaces `python -m llama_ref.tools.cli`."""
    text = not isinstance(stdin, bytes)
    launcher = launcher or [sys.executable, "-m", CLI_MODULE]
    args = [a if isinstance(a, bytes) else str(a) for a in argv]
    if not text:
        launcher, args = [os.fsencode(a) for a in launcher], [os.fsencode(a) for a in args]
    return subprocess.run([*launcher, *args], input=stdin, capture_output=True, text=text, timeout=timeout,
                          env=None if env is None else dict(os.environ, **env))


@functools.cache
def _child_settings() -> dict:
    """The stdio encodings and error handlers and the warnings filters a child `python` starts with here (they
    depend on the locale and on PYTHONIOENCODING/PYTHONWARNINGS; asked once per process, ~20 ms)."""
    code = ("import sys, json, warnings\n"
            "def pattern(p): return p if p is None or isinstance(p, str) else [p.pattern, p.flags]\n"
            "print(json.dumps(dict(stdio=[[s.encoding, s.errors] for s in (sys.stdin, sys.stdout, sys.stderr)],"
            " filters=[[a, pattern(m), c.__module__, c.__qualname__, pattern(n), l]"
            " for a, m, c, n, l in warnings.filters])))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         stdin=subprocess.DEVNULL).stdout
    return json.loads(out)


def _child_warning_filters() -> None:
    """Make warnings.filters (inside a catch_warnings block) those a child starts with: the same entries, each a
    regular expression or the plain string the interpreter's own defaults hold."""
    def pattern(p):
        return p if p is None or isinstance(p, str) else re.compile(*p)

    warnings.filters[:] = [
        (action, pattern(message), getattr(builtins, name) if module == "builtins" else
         getattr(importlib.import_module(module), name), pattern(where), lineno)
        for action, message, module, name, where, lineno in _child_settings()["filters"]]
    warnings._filters_mutated()  # the per-module "already warned" registries are stale now


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


class _ProcessState:
    """What an in-process run may change in this process, saved and put back."""

    def __init__(self):
        from threadpoolctl import threadpool_info

        import llama_ref.runtime.threads as threads

        self.threads = threads
        self.chosen = threads._chosen
        self.blas = {p["prefix"]: p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"}
        self.numba = sys.modules["numba"].get_num_threads() if "numba" in sys.modules else None
        self.environ = dict(os.environ)
        self.signals = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        self.cwd = os.getcwd()
        self.argv = sys.argv[:]
        self.stdio = (sys.stdin, sys.stdout, sys.stderr)

    def restore(self) -> None:
        from threadpoolctl import threadpool_limits

        sys.stdin, sys.stdout, sys.stderr = self.stdio
        sys.argv[:] = self.argv
        os.chdir(self.cwd)
        for s, handler in self.signals.items():
            if signal.getsignal(s) is not handler:
                signal.signal(s, handler)
        for key in set(os.environ) - set(self.environ):
            del os.environ[key]
        for key, value in self.environ.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        self.threads._chosen = self.chosen
        if self.blas:
            threadpool_limits(self.blas)  # {library prefix: n}, e.g. {"libscipy_openblas": 1}
        if "numba" in sys.modules:  # imported by the run, or before it
            numba = sys.modules["numba"]
            numba.set_num_threads(self.numba if self.numba is not None else numba.config.NUMBA_NUM_THREADS)


def _stream(data: bytes, which: int) -> io.TextIOWrapper:
    encoding, errors = _child_settings()["stdio"][which]
    # newline="\n": on POSIX Python's stdio neither translates nor splits at "\r" (as pylifecycle.c sets up)
    return io.TextIOWrapper(io.BytesIO(data), encoding=encoding, errors=errors, newline="\n")


def _as_subprocess_text(data: bytes) -> str:
    """What subprocess.run(text=True) makes of a pipe's bytes: the locale's encoding, universal newlines."""
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


def run_cli_in_process(*argv, stdin: "str | bytes" = "", timeout: float = 300, env: "dict | None" = None,
                       launcher: "list | None" = None) -> subprocess.CompletedProcess:
    """The command through main(argv) in this process, with run_cli's arguments and result (timeout and launcher
    are accepted and not used: nothing here can be killed, and there is one entry)."""
    from llama_ref.tools import cli

    text = not isinstance(stdin, bytes)
    args = [os.fsdecode(a) if isinstance(a, bytes) else str(a) for a in argv]  # as the child's sys.argv decodes
    # subprocess writes text input in the locale's encoding
    data = stdin.encode(locale.getpreferredencoding(False)) if text else stdin
    state = _ProcessState()
    stdout, stderr = _stream(b"", 1), _stream(b"", 2)
    try:
        os.environ.update(env or {})
        sys.stdin, sys.stdout, sys.stderr = _stream(data, 0), stdout, stderr
        sys.argv[:] = [cli.__file__, *args]
        with warnings.catch_warnings():
            _child_warning_filters()
            warnings.showwarning = _show_warning
            try:
                code = cli.main(args)
            except SystemExit as e:  # as the interpreter turns it into an exit status
                code = e.code
            except Exception:  # an uncaught exception: its traceback, status 1
                traceback.print_exc(file=stderr)
                code = 1
            if code is None:
                code = 0
            elif not isinstance(code, int):
                print(code, file=stderr)
                code = 1
        stdout.flush()
        stderr.flush()
    finally:
        state.restore()
    out, err = stdout.buffer.getvalue(), stderr.buffer.getvalue()
    if text:
        out, err = _as_subprocess_text(out), _as_subprocess_text(err)
    return subprocess.CompletedProcess([sys.executable, "-m", CLI_MODULE, *args], code, out, err)
