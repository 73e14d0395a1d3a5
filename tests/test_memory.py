"""runtime/memory.py: load() asks glibc to keep freed memory for the next call; LLAMA_REF_KEEP_MEMORY=0 leaves the
allocator alone. Process-wide, so each case runs in a process of its own."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt's thresholds are glibc's")
PROBE = ("import llama_ref, llama_ref.runtime.memory as m; "
         "assert 'ok' not in m._done; "
         "llama_ref.load(llama_ref.DEFAULT_MODEL); "
         "print(m._done['ok'])")


def run(env_value):
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_REF_KEEP_MEMORY"}
    if env_value is not None:
        env["LLAMA_REF_KEEP_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@glibc
def test_load_sets_the_thresholds():
    assert run(None) == "True"


def test_switched_off_by_environment():
    assert run("0") == "False"
