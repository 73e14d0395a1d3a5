#!/usr/bin/env bash
# Issue 13's thread scaling on a machine with more cores than this one: the device machine some tasks are lent
# (16 cores, 128 GiB, Python 3.12 with numpy, numba, torch and transformers, no package registry). One call:
#
#   here, once:   bash benchmarks/device_threads.sh prepare
#                 -> .device/site (git-ignored): gguf, diskcache and threadpoolctl (pure Python) and llama-cpp-python's package as
#                    built in /tmp/llamacpp-venv (ctypes over its own .so files, so any Python 3 can import it). 25 MB:
#                    the device carries 64 MiB. That venv, where it is missing (this CPU's flags named, not native:
#                    a native build crashed on AMX machines):
#                      python -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install numpy
#                      CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
#                        -DGGML_BMI2=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON
#                        -DGGML_AVX512_BF16=ON" /tmp/llamacpp-venv/bin/pip install --no-cache-dir llama-cpp-python==0.3.36
#   there:        run(command="bash benchmarks/device_threads.sh run", carry=[".device"], timeout_s=590)
#                 -> $OUT/shapes-llama-3.2-1b.md, .json, -threads.png, the log and amx_check.log
#
# What it measures (benchmarks/shapes.py): the Llama 3.2 1B shape (seeded random weights, built there: ~1-2 min),
# bf16, at every core: llama_ref numba, HF transformers bf16, llama.cpp BF16 (prefill 128 and 512, 32 decode
# steps); then the thread sweep (1, 2, 4, 8, all cores) of llama_ref numba and llama.cpp, decode and prefill 128,
# with its scaling column (rate / (threads x the one-thread rate), decode bounded by the read roofline).
# A peer that fails there (llama.cpp built for this machine's AVX-512 flags) is reported as crashed, not dropped.
# SWEEP_ONLY=1 skips the table at every core; SHAPES_ARGS adds shapes.py arguments (e.g. "--bf16-arithmetic
# --sweep-rounds 2"); SHAPE=llama-3.1-8b measures the 8B shape instead (16 GB per file:
# about twice as long to build; run it in a call of its own).
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
prepare)
    site=.device/site
    rm -rf .device && mkdir -p "$site"
    python -m pip download -q --no-deps --only-binary=:all: -d .device/wheels gguf==0.19.0 diskcache==5.6.3 threadpoolctl==3.6.0
    python -m pip install -q --no-deps --no-compile --target "$site" .device/wheels/*.whl
    rm -rf .device/wheels
    cpp=$(/tmp/llamacpp-venv/bin/python -c "import llama_cpp, os; print(os.path.dirname(llama_cpp.__file__))")
    cp -a "$cpp" "$site/"
    find "$site" -name __pycache__ -prune -exec rm -rf {} +
    du -sh .device
    ;;
run)
    [ -d .device/site ] || { echo "no .device/site: run 'bash benchmarks/device_threads.sh prepare' here first" >&2; exit 2; }
    out=${OUT:-/tmp/device_threads}
    mkdir -p "$out"
    export PYTHONPATH=$PWD/.device/site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
    python3 -m pip install -q --root-user-action=ignore --no-index --no-build-isolation --no-deps -e .
    python3 -c "import os, llama_ref.kernels, gguf, numba, threadpoolctl; assert llama_ref.__file__.startswith(os.getcwd()), \
llama_ref.__file__; print('llama_ref', llama_ref.__file__, 'numba', numba.__version__)"
    python3 -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)" || echo "llama_cpp does not import: no llama.cpp rows"
    # kernels/amx.py's items shrink with the thread count (rows_per_item): the same bits as one thread's, checked
    # here, where the tests' AMX cases can run (the machines the tests run on may have no AMX); its line comes back
    python3 - <<'EOF' 2>&1 | tee "$out/amx_check.log"
import os, numpy as np
from llama_ref.kernels import amx
from llama_ref.runtime import threads
if amx.available():
    rng, n = np.random.default_rng(0), os.cpu_count()
    w = (rng.standard_normal((2080, 2048), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    x = rng.standard_normal((100, 2048), dtype=np.float32)
    xp = amx.split_bf16x3(x)
    one, _ = amx.product(x, xp, w, lambda t, s, b: threads.each_block(t, s, b, 1))
    many, _ = amx.product(x, xp, w, lambda t, s, b: threads.each_block(t, s, b, n), n)
    print(f"AMX product on {n} threads, items of {amx.rows_per_item(2048, n)} rows: the bits of one thread's:",
          np.array_equal(one, many))
EOF
    nproc; grep -m1 "model name" /proc/cpuinfo || true; grep -m1 -o "avx512[a-z_0-9]*\|amx[a-z_0-9]*" /proc/cpuinfo | sort -u | tr '\n' ' '; echo
    export LLAMA_REF_BENCH_CACHE=${LLAMA_REF_BENCH_CACHE:-/tmp/llama_ref_bench}
    export LLAMA_REF_LLAMA_CPP_PYTHON=$(command -v python3) LLAMA_REF_HF_PYTHON=$(command -v python3)
    shape=${SHAPE:-llama-3.2-1b}
    table=(--sweep); [ -n "${SWEEP_ONLY:-}" ] && table=(--sweep-only)
    # OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: unset by shapes.py itself, and said so in its report
    status=0
    timeout "${LIMIT_S:-560}" python3 benchmarks/shapes.py --shape "$shape" --formats bf16 --peer-formats bf16 \
        --hf-dtypes bf16 --prefill 128 512 --decode 32 --decode-prompt 128 --rounds 1 "${table[@]}" \
        --sweep-prefill 128 --sweep-decode 32 ${SHAPES_ARGS:-} 2>&1 | tee "$out/device_threads.log" || status=$?
    cp benchmarks/results/scratch/shapes-"$shape"* "$out/" 2>/dev/null || true
    exit "$status"
    ;;
*)
    echo "usage: bash benchmarks/device_threads.sh prepare | run" >&2
    exit 2
    ;;
esac
