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

import functools
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

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
    steps = "fewer while faster" if adapting() else "fixed"
    return (f"{n} thread{'s' if n != 1 else ''} ({physical_cores()} physical cores, {len(_cpus())} logical "
            f"CPUs); BLAS {blas}; {numba_part}; decode steps' Numba threads: {steps}; "
            f"GOMP_SPINCOUNT {os.environ.get('GOMP_SPINCOUNT', 'unset')}")


def set_threads(n: int) -> int:
    """Use n threads for NumPy's BLAS and for the Numba kernels, for the rest of the process.

    Without a call, load() sets default_threads() (the physical cores, or the environment's count). On a
    machine busy with other work fewer threads can be faster: BLAS threads spin while they wait for a core
    another process holds. (The numba backend's one-token steps find that out themselves: StepThreads below.)
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


def adapting() -> bool:
    """Whether the numba backend's one-token steps may run on fewer threads than set (StepThreads below): yes,
    unless $LLAMA_REF_ADAPT_THREADS is 0."""
    return os.environ.get("LLAMA_REF_ADAPT_THREADS", "1").strip() != "0"


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


class StepThreads:
    """How many of Numba's threads a model's one-token steps run on: the count in force, or fewer while fewer
    have been faster.

    A decode step is a few parallel regions a layer (kernels/ggml_step.py: 5; 150 a token on the default model),
    each ending at a barrier where the threads wait for the last one. While something else holds one of the
    cores, the thread that shares it runs in turns with it, and each barrier waits for its turn. Here (2 vCPUs):
    the 1B shape's Q5_0 decode (arithmetic="ggml", 24 steps) ran at 17.8 tokens/s on 2 threads on a quiet
    machine; beside one busy process at 4.8 on 2 threads and 7.0 on 1 (llama.cpp, same file: 9.0 quiet, 2.9 and
    4.6); in a spell when the host gave the two vCPUs' time to other guests (17-32% steal), the default model's
    Q4_0 decode ran at 26-35 tokens/s on 2 threads and 44-78 on 1, alternated. The count is a matter of speed
    only: every kernel computes the same values at any count (tests/test_ggml_step.py, test_exact_step.py, and
    test_step_threads.py for whole steps at changing counts).

    So each step is timed, with the CPU time its calling thread got and the process's other threads' from its start
    to the next step's (see started: their time in a step may reach the total only after it). Two windows in a row
    (steps at the count adding up to WINDOW seconds each) whose threads held their cores for less than HELD of their
    time (quiet: 0.9-1.0 here; 0.3-0.55 in the cases above) say that something else holds one: the next step runs on
    one thread fewer, and if it took at most MARGIN of the recent steps' time, the steps go on at that count.
    Windows, not steps: the process's CPU time holds another thread's running time only as of that thread's last
    scheduler tick (Linux brings only the calling thread's up to date), so over one 2.3 ms step of the default model
    (2 threads, Emerald Rapids guest, session 62) the hold read 0.50 and ~1.35 in turns on a quiet machine; two
    0.50s in a row sent the steps to one thread, whose first step loads that count's compiled code (~70-80 ms): in 6
    of 24 decode runs of session 61's benchmark. Over a window the error is a tick or so in WINDOW.

    Below the count in force, UP steps in a row at one thread more are tried every so often, as the core may be free
    again; each must win. A probe that loses doubles the wait before the next in its direction (FIRST to LAST steps;
    a win resets it): a quiet machine pays for next to none, a busy one for a few. Tries of more threads wait
    longer: while the host was busy, a step on two threads after a run on one took 0.2-0.34 s here (the idle vCPU
    woken), 20 steps' time. A count's first step is not judged (it may load that count's compiled code). NumPy's
    BLAS threads keep set_threads' count: the numpy backend's steps are not timed.
    """

    HELD = 0.75
    WINDOW = 0.05  # seconds: a tick (1-10 ms: Linux's HZ 1000 .. 100) off the other threads' time is <= 10%
    MARGIN = 0.9
    UP = 3
    FIRST, LAST = {-1: 8, 1: 16}, {-1: 64, 1: 256}  # steps between tries of fewer (-1) and more (+1) threads

    def __init__(self):
        self._start(0)
        self.steps = Counter()  # steps run at each count
        self.pending = None  # the last step (n, seconds, its caller's CPU seconds, the other threads' before it)

    def started(self, others: float) -> None:
        """A step begins, the process's other threads having had `others` CPU seconds so far: the step before it
        is recorded now, with its calling thread's CPU time and the other threads' from its start to this one's.
        Linux adds a running thread's time to the process total at its scheduler ticks and when it stops running:
        after a step Numba's threads spin a while, then sleep, so with a pause between steps (a sampler: ~0.5 ms
        a token) their time in the step came in only after it ended. Counted at the step's end, the hold read
        0.55-0.77 a window on a quiet machine (the default model, the CLI's sampling preset, 2 threads) and the
        steps tried one thread, its first step loading that count's code (~70-80 ms)."""
        if self.pending is not None:
            n, seconds, own, before = self.pending
            self.pending = None
            self.record(n, seconds, own + max(0.0, others - before))

    def _start(self, most: int) -> None:
        self.most = most  # the count in force when the steps began; a new one starts afresh
        self.count = most  # what the steps run on
        self.recent = None  # seconds of a step at `count`, smoothed
        self.slow = 0  # windows in a row at `count` whose threads held their cores less than HELD of the time
        self.window, self.window_cpu = 0.0, 0.0  # seconds and CPU seconds of the steps at `count` since a window closed
        self.probe = 0  # -1 or +1 while steps try count + probe ...
        self.left = 0  # ... and how many more of them must win
        self.wait = {-1: 0, 1: 0}  # steps at `count` before the next probe in each direction ...
        self.interval = dict(self.FIRST)  # ... and after the next loss
        self.seen = set()

    def choose(self, most: int) -> int:
        """The thread count for the next step, `most` being the count in force."""
        if most != self.most:
            self._start(most)
        if not self.probe and self.recent is not None:
            if self.count < most and self.wait[1] <= 0:
                self.probe, self.left = 1, self.UP
            elif self.count > 1 and self.slow >= 2 and self.wait[-1] <= 0:
                self.probe, self.left = -1, 1
        return self.count + self.probe

    def record(self, n: int, seconds: float, cpu_seconds: float) -> None:
        """A step ran on n threads for `seconds`, and the process got `cpu_seconds` of CPU time meanwhile."""
        self.steps[n] += 1
        first, d = n not in self.seen, self.probe
        self.seen.add(n)
        if first:
            return  # not judged; a probe runs again
        if n == self.count:
            self.recent = seconds if self.recent is None else 0.75 * self.recent + 0.25 * seconds
            self.window, self.window_cpu = self.window + seconds, self.window_cpu + cpu_seconds
            if self.window >= self.WINDOW:  # a window closes: did the threads hold their cores?
                self.slow = self.slow + 1 if self.window_cpu / (self.window * n) < self.HELD else 0
                self.window, self.window_cpu = 0.0, 0.0
            self.wait = {k: w - 1 for k, w in self.wait.items()}
        elif not d or n != self.count + d or self.recent is None:
            return  # not a count this chooser picked (another thread's step, or a count set meanwhile)
        elif seconds <= self.MARGIN * self.recent:
            self.left -= 1
            if self.left == 0:  # won: go on at n
                self.count, self.recent, self.slow, self.probe = n, seconds, 0, 0
                self.window, self.window_cpu = 0.0, 0.0
                self.interval[d] = self.wait[d] = self.FIRST[d]
                self.wait[-d] = self.interval[-d]
        else:  # lost
            self.interval[d] = min(2 * self.interval[d], self.LAST[d])
            self.wait[d], self.probe = self.interval[d], 0


_stepping = threading.local()  # .on while this thread runs a timed step (a step inside one is not timed again)


def adapts_threads(forward):
    """Transformer.forward, with its one-token calls on the numba backend run on the thread count the model's
    StepThreads chooses (the count in force is restored after the call)."""

    @functools.wraps(forward)
    def run(model, tokens, *args, **kwargs):
        if (not getattr(model.ops, "__name__", "").startswith("llama_ref.kernels")  # the numba backend, any variant
                or getattr(_stepping, "on", False)
                or _last_length(tokens) != 1 or not adapting()):
            return forward(model, tokens, *args, **kwargs)
        import numba

        most = numba.get_num_threads()
        if most == 1:
            return forward(model, tokens, *args, **kwargs)
        choice = getattr(model, "step_threads", None)
        if choice is None:  # an object made without Transformer.__init__
            return forward(model, tokens, *args, **kwargs)
        own0 = time.thread_time()
        others = time.process_time() - own0  # the other threads' CPU time so far
        choice.started(others)
        n = choice.choose(most)
        if n != most:  # (a set_num_threads costs ~10 us in a decode step, its code and data cold after the step)
            numba.set_num_threads(n)
        _stepping.on = True
        t0 = time.perf_counter()
        try:
            out = forward(model, tokens, *args, **kwargs)
        finally:
            _stepping.on = False
            if n != most:
                numba.set_num_threads(most)
        choice.pending = (n, time.perf_counter() - t0, time.thread_time() - own0, others)
        return out

    return run


def _last_length(tokens) -> int:
    """T of a call's (T,) or (B, T) tokens; -1 for anything else (forward() then says what is wrong)."""
    try:
        shape = np.shape(tokens)
    except ValueError:  # ragged lists
        return -1
    return shape[-1] if len(shape) in (1, 2) else -1
