"""How llama_ref uses the machine: threads for the matrix products and kernels, and Numba's compile cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..errors import InputError


def set_threads(n: int) -> int:
    """Use n threads for NumPy's BLAS and for the Numba kernels, for the rest of the process.

    By default both use every core the process may run on. On a machine busy with other work that can be
    far slower than fewer threads: BLAS threads spin while they wait for a core another process holds.
    Returns the number of Numba threads set (at most the cores Numba was started with).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"threads must be a positive integer, got {n!r}")
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)  # called as a function, the limit stays for the process
    if "numba" in sys.modules:
        import numba

        n = min(n, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(n)
    else:  # read by Numba when it is first imported (the numba backend imports it lazily)
        os.environ["NUMBA_NUM_THREADS"] = str(n)
    return n


def compile_notice() -> "str | None":
    """A line to show before the numba backend's first use on this machine, when its kernels are not in
    Numba's on-disk cache yet (they then compile for several seconds); None when they are cached."""
    import importlib.util

    spec = importlib.util.find_spec("llama_ref.kernels")
    if spec is None or not spec.submodule_search_locations:
        return None
    cache = os.environ.get("NUMBA_CACHE_DIR")
    folder = Path(spec.submodule_search_locations[0])
    places = [Path(cache)] if cache else [folder / "__pycache__"]
    if any(any(p.rglob("*.nbi")) for p in places if p.is_dir()):
        return None
    return "[numba: compiling the kernels for this machine (once, about 10 s; cached afterwards)]"
