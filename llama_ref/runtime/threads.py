"""How llama_ref uses the machine: threads for the matrix products and kernels, and Numba's compile cache.

One thread policy for NumPy's BLAS and the Numba kernels together: both get the same count, by default the
physical cores this process may run on (hyper-thread siblings share one core's arithmetic units, and
decode is bound by memory anyway), or what the user asked for: load(..., threads=N), `llama-ref -t N`,
or $LLAMA_REF_THREADS / $OMP_NUM_THREADS / $OPENBLAS_NUM_THREADS / $NUMBA_NUM_THREADS when set. The two
pools take turns (a BLAS call, then a kernel, never both at once), so equal counts never put more running
threads than cores; what is left between turns is spinning: Numba's OpenMP threads are told to spin only
briefly (GOMP_SPINCOUNT, set below), and the kernels a decode step runs do not call BLAS at all.

Prefill's products with weights (kernels/linear.py: packed ones decoded a tile of rows at a time to float32,
float32 ones a block of rows per thread) do not alternate between the two pools at all: each_thread() runs
them on one pool of Python threads, each decoding its own tiles and multiplying them with a one-thread BLAS
call (NumPy and the Numba kernels release the GIL). Handing every tile from Numba's threads to OpenBLAS's
and back made a 2-thread prefill of the 1B shape half as fast here (6.4 against 13.1 tok/s, load ~5): the
idle pool's threads spin (OpenBLAS's for up to ~0.1 s after a call) on the cores the other one needs.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from ..errors import InputError

# Numba's OpenMP threads spin after a parallel region before they sleep; libgomp's default spin (~300000
# rounds, milliseconds) keeps both cores busy through the NumPy BLAS calls of a prefill and made them ~5x
# slower here. 30000 rounds still covers the gap between two kernels of a decode step. libgomp reads it when
# Numba first starts its threads, which set_threads() below may do (numba.set_num_threads), before any kernel
# module is imported: so it is set here, on import. A value set before (the user's) wins.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")


# Environment variables that state a thread count, in the order they are believed.
THREAD_VARIABLES = ("LLAMA_REF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS")
_chosen: "int | None" = None  # the count set_threads last set in this process


def _cpus() -> set:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Cores (not hyper-threads) among the CPUs this process may run on; the CPU count where Linux's
    topology files are missing."""
    cpus, cores = _cpus(), set()
    for cpu in cpus:
        try:
            siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text()
        except OSError:
            return max(1, len(cpus))
        cores.add(siblings.strip())
    return max(1, len(cores))


def default_threads() -> int:
    """The count to use when none was given: the first of THREAD_VARIABLES that is set to a positive
    integer, else the physical cores."""
    for var in THREAD_VARIABLES:
        value = os.environ.get(var, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return physical_cores()


def apply_threads(n: "int | None" = None) -> int:
    """What load() calls: n threads, or (None) the count set_threads set earlier in this process, or
    default_threads(). Returns the count set."""
    if n is None:
        n = _chosen if _chosen is not None else default_threads()
    return set_threads(n)


def describe() -> str:
    """The policy in force, as one line: '2 threads (2 physical cores, 2 logical); BLAS openblas 2; ...'."""
    from threadpoolctl import threadpool_info

    n = _chosen if _chosen is not None else default_threads()
    blas = ", ".join(f"{p.get('internal_api')} {p.get('num_threads')}" for p in threadpool_info()
                     if p.get("user_api") == "blas") or "none found"
    if "numba" in sys.modules:
        import numba

        try:
            layer = numba.threading_layer()
        except ValueError:  # no parallel region has run yet
            layer = f"{numba.config.THREADING_LAYER} (not started)"
        numba_part = f"Numba {numba.get_num_threads()} ({layer})"
    else:
        numba_part = f"Numba {os.environ.get('NUMBA_NUM_THREADS', 'not imported')}"
    return (f"{n} thread{'s' if n != 1 else ''} ({physical_cores()} physical cores, {len(_cpus())} logical "
            f"CPUs); BLAS {blas}; {numba_part}; GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}")


def set_threads(n: int) -> int:
    """Use n threads for NumPy's BLAS and for the Numba kernels, for the rest of the process.

    Without a call, load() sets default_threads() (the physical cores, or the environment's count). On a
    machine busy with other work fewer threads can be faster: BLAS threads spin while they wait for a core
    another process holds.
    Returns the number of Numba threads set (at most the cores Numba was started with).
    """
    global _chosen
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"threads must be a positive integer, got {n!r}")
    _chosen = n
    from threadpoolctl import threadpool_limits

    threadpool_limits(n)  # called as a function, the limit stays for the process
    if "numba" in sys.modules:
        import numba

        n = min(n, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(n)
    else:  # read by Numba when it is first imported (the numba backend imports it lazily)
        os.environ["NUMBA_NUM_THREADS"] = str(n)
    return n


def count() -> int:
    """The thread count in force: what set_threads last set in this process, else default_threads()."""
    return _chosen if _chosen is not None else default_threads()


_pool: "ThreadPoolExecutor | None" = None  # each_thread's helper threads, made on first use ...
_pool_size = 0  # ... and how many
_pool_lock = threading.Lock()  # one each_thread at a time: its BLAS limit is process-wide
_blas: list = []  # threadpoolctl's controllers of the BLAS libraries loaded, found on first use


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there, and work given to them would wait forever."""
    global _pool, _pool_size, _pool_lock
    _pool, _pool_size, _pool_lock = None, 0, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def each_thread(work, n: int) -> None:
    """Run work() on n threads at once, the calling one and n - 1 of a pool kept for the process, with
    BLAS limited to one thread meanwhile; return when every call has returned (raising the first error).

    work() must share its items out itself (each call takes the next item not yet taken) and spend its
    time in code that releases the GIL (NumPy's BLAS, the nogil Numba kernels). One thread per core and
    no BLAS thread besides them: nothing waits for a core, and nothing spins.
    """
    global _pool, _pool_size
    if n <= 1:
        work()
        return
    with _pool_lock:
        if _pool_size < n - 1:
            if _pool is not None:
                _pool.shutdown()
            _pool, _pool_size = ThreadPoolExecutor(n - 1, thread_name_prefix="llama_ref"), n - 1
        if not _blas:
            from threadpoolctl import ThreadpoolController

            _blas.extend(ThreadpoolController().select(user_api="blas").lib_controllers)
        before = [lib.num_threads for lib in _blas]
        for lib in _blas:
            lib.set_num_threads(1)  # a few microseconds; OpenBLAS keeps its threads, idle
        try:
            helpers = [_pool.submit(work) for _ in range(n - 1)]
            try:
                work()
            finally:
                wait(helpers)  # none may still write into the caller's arrays after this returns
            for done in helpers:
                done.result()
        finally:
            for lib, k in zip(_blas, before):
                lib.set_num_threads(k)


def each_block(total: int, step: int, block, n: int) -> None:
    """block(i0, i1) for every block of range(total), step at a time, on each_thread's threads (n, at most one
    per block): each takes the next block not yet taken (next() on the shared iterator is atomic under the GIL)."""
    starts = iter(range(0, total, step))

    def work():
        for i0 in starts:
            block(i0, min(total, i0 + step))

    each_thread(work, min(n, -(-total // step)))


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
