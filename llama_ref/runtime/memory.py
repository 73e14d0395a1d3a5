"""How llama_ref keeps the memory of its temporaries: freed arrays stay with the process for the next call.

A forward pass allocates and frees its temporaries (a 512-token prefill of the 1B shape: 4-16 MiB arrays,
hundreds of them). With glibc's defaults, arrays over 128 KiB are mapped afresh and handed back on free, and
the heap's top is handed back past 128 KiB; its thresholds grow with what is freed, but a forward pass's peak
still runs over them. Memory handed back is zeroed page by page by the kernel when asked for again, on every
call. llama.cpp allocates its compute buffer once; keep_freed_memory() asks glibc for the same effect: arrays up
to 32 MiB (M_MMAP_THRESHOLD's largest value on 64-bit) come from the heap, and up to 512 MiB of freed heap stays
mapped (M_TRIM_THRESHOLD). What the process holds is then at most its peak, kept.

Measured at the 1B shape (2 threads, Intel Sapphire Rapids; the first 512-token prefill after a 128-token one,
then two more; three alternated pairs of processes): arithmetic="bf16" 438-470 against 362-430 tok/s on the
first, 531-549 against 449-516 later; exact mode the same within the host's noise (248-256 against 246-256 on
the first, with the AMX panels of 192 k's it had then). arithmetic="ggml", in benchmarks/ggml_decode.py's
rounds (best of two calls, results/ggml_prefill_1b_k_keep_memory_s49.md): Q5_K_M 182-188 against 174-175
tok/s, Q6_K 186-192 against 172-183. Peak RSS the same (2670 and 2690 MiB in bf16 and exact mode).

Process-wide: set once, at the first llama_ref.load(), on Linux with glibc only; LLAMA_REF_KEEP_MEMORY=0 leaves
the allocator as it was.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 512 << 20
_done = {}


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once). -> whether they are set."""
    if "ok" not in _done:
        ok = False
        if os.environ.get("LLAMA_REF_KEEP_MEMORY", "") != "0" and platform.system() == "Linux" \
                and platform.libc_ver()[0] == "glibc":
            try:
                mallopt = ctypes.CDLL("libc.so.6").mallopt
                mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
                ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
            except (OSError, AttributeError):
                ok = False
        _done["ok"] = ok
    return _done["ok"]
