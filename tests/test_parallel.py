"""Tensor and data parallelism across MPI ranks (llama_ref.runtime.parallel), checked against one process.

The tests marked `mpi` run `mpirun -n 2` and `mpirun -n 4 --oversubscribe` (Open MPI with mpi4py) and skip,
saying why, when either is missing; .ci/run installs both. The others check the slicing and the shard
writer in one process, with the ranks simulated by threads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from llama_ref.model.transformer import Transformer
from llama_ref.runtime.parallel import (EmbeddingPart, ParallelError, head_ranges, load_rank_weights, local_args, part,
                                rank_plan)
from llama_ref.weights.common import WeightsError, expected_shapes
from llama_ref.weights.writers import meta_shard_plans, write_hf, write_meta
from tiny import random_weights, tiny_args
from gguf_files import byte_level_tokens, write_llama_gguf

HERE = Path(__file__).parent
TINY = HERE / "data" / "tiny_ckpt"
TOKENS = [1, 17, 90, 5, 42, 7, 63, 88, 3, 11, 77, 31]


# Tests that start MPI ranks skip, saying why, where Open MPI or mpi4py is missing. The probe (a child process
# importing mpi4py, and `mpirun --version`) runs once per session, when the first such test is set up (the `mpi`
# fixture in conftest.py), not at import: every xdist worker imports every module, and the fast tier runs none.
needs_mpi = pytest.mark.usefixtures("mpi")


def mpirun(n: int, *argv, timeout: float = 240, check: bool = True, **popen) -> subprocess.CompletedProcess:
    """`mpirun -n n --oversubscribe python argv...`, as root too (Open MPI refuses root unless told)."""
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none")  # containers often forbid CMA (ptrace)
    cmd = ["mpirun", "-n", str(n), "--oversubscribe", sys.executable, *map(str, argv)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **popen)
    if check:
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done


# ---- checkpoints -------------------------------------------------------------------------------------

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def gqa_args(**overrides):
    """8 query heads over 4 KV heads: 2 and 4 ranks each hold whole KV heads (no copies)."""
    return tiny_args(**{"dim": 64, "n_heads": 8, "n_kv_heads": 4, "vocab_size": 96, **overrides})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict:
    """The same GQA model as one Meta file, Meta shards (2 and 4), HF safetensors, and a GGUF with a
    byte-level tokenizer (vocabulary 261, split unevenly) with its Meta shards written by convert."""
    root = tmp_path_factory.mktemp("parallel")
    args = gqa_args()
    w = random_weights(args, seed=3, scale=0.5)
    out = {}
    for n in (1, 2, 4):
        write_meta(root / f"meta{n}", args, w, "f32", shards=n)
        out[f"meta{n}"] = root / f"meta{n}"
    write_hf(root / "hf", args, w, "bf16")
    out["hf"] = root / "hf"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + byte_level_tokens() + ["Ġt", "he"]
    targs = gqa_args(vocab_size=len(tokens), max_seq_len=128)
    out["gguf"] = write_llama_gguf(root / "tok.gguf", targs, random_weights(targs, 0, scale=1.0), {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] * len(specials) + [1] * (len(tokens) - len(specials)),
        "tokenizer.ggml.merges": ["Ġ t", "h e"], "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML})
    from llama_ref.tools.convert import convert
    out["tok_meta2"] = convert(out["gguf"], root / "tok_meta2", "meta", shards=2)
    return out


def single_logits(src, tokens=TOKENS) -> np.ndarray:
    """One process: a prefill of all but the last 3 tokens, then 3 one-token steps (as mpi_worker.py)."""
    model = llama_ref.load(src)
    prefill = model.forward(tokens[:-3], 0)
    steps = [model.forward([t], len(tokens) - 3 + j) for j, t in enumerate(tokens[-3:])]
    return np.concatenate([prefill, *steps])


# ---- one process: the slices --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_rank_slices_tile_every_tensor(n):
    """The ranks' parts of each split tensor are disjoint and cover it; the replicated ones are whole."""
    args = gqa_args()
    shapes = expected_shapes(args)
    plans = [rank_plan(args, r, n, "test") for r in range(n)]
    for name, shape in shapes.items():
        slots = [p[name] for p in plans]
        if slots[0] is None:
            assert all(s is None for s in slots), name
            continue
        axis = slots[0][0]
        covered = np.zeros(shape[axis], int)
        for a, lo, hi in slots:
            assert a == axis
            covered[lo:hi] += 1
        assert (covered == 1).all() or name.endswith(("wk.weight", "wv.weight")) and n > args.kv_heads, name


def test_kv_heads_are_copied_when_ranks_outnumber_them():
    args = tiny_args(n_heads=4, n_kv_heads=2)  # 4 ranks: one query head each, two ranks per KV head
    assert [head_ranges(args, r, 4, "x") for r in range(4)] == [((0, 1), (0, 1)), ((1, 2), (0, 1)),
                                                                ((2, 3), (1, 2)), ((3, 4), (1, 2))]


@pytest.mark.parametrize("n, overrides, match", [
    (3, {}, "3 ranks do not divide the model's 8 attention heads"),
    (4, {"n_heads": 12, "n_kv_heads": 3, "dim": 96}, "unevenly"),
])
def test_ranks_that_do_not_fit_are_refused(n, overrides, match):
    with pytest.raises(ParallelError, match=match):
        rank_plan(gqa_args(**overrides), 0, n, "ckpt")


def test_uneven_parts_cover_the_vocabulary():
    assert [part(261, r, 4) for r in range(4)] == [(0, 65), (65, 130), (130, 195), (195, 261)]


class _Threads:
    """Collectives among threads: what MPIGroup does across processes, for tests without MPI."""

    def __init__(self, n):
        self.n, self.barrier, self.slots = n, threading.Barrier(n), [None] * n

    def group(self, rank):
        threads = self

        class Group:
            size = threads.n

            def _exchange(self, x):
                threads.slots[rank] = x
                threads.barrier.wait()
                got = list(threads.slots)
                threads.barrier.wait()
                return got

            def all_reduce(self, x):
                terms = self._exchange(x)
                out = terms[0].copy()
                for t in terms[1:]:
                    out += t
                return out

            def all_gather(self, x):
                return np.concatenate(self._exchange(x), axis=-1)

            def bcast(self, obj):
                return self._exchange(obj)[0]

        g = Group()
        g.rank = rank
        return g


def threaded_logits(src, n) -> list:
    """Every rank's logits with n ranks simulated by threads, each rank reading only its part of `src`."""
    threads, results, errors = _Threads(n), [None] * n, []

    def rank(r):
        try:
            _, mine, weights, extras = load_rank_weights(Path(src), r, n)
            model = Transformer(mine, weights, freq_divisors=extras.get("freq_divisors"))
            model.parallel = threads.group(r)
            prefill = model.forward(TOKENS[:-3], 0)
            steps = [model.forward([t], len(TOKENS) - 3 + j) for j, t in enumerate(TOKENS[-3:])]
            results[r] = np.concatenate([prefill, *steps])
        except BaseException as e:  # noqa: BLE001  (reported by the test)
            errors.append(e)
            threads.barrier.abort()

    workers = [threading.Thread(target=rank, args=(r,)) for r in range(n)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("src, n", [("meta2", 2), ("meta4", 4), ("meta1", 2), ("meta1", 4), ("meta4", 2),
                                    ("meta2", 4), ("hf", 4), ("gguf", 2), ("gguf", 4), ("tok_meta2", 2),
                                    (TINY / "llama31_bf16_mp2_meta", 2), (TINY / "llama31_bf16_mp2_meta", 4),
                                    (TINY / "llama2_fp16_mp2_meta", 2), (TINY / "llama32_tied_hf", 2)])
def test_threaded_ranks_match_one_process(ckpts, src, n):
    """Each source read as n slices (its own shard, or re-sliced from other shard counts and single files)
    gives the single-process logits within 1e-5 on every rank, and the same bits on every rank."""
    src = ckpts.get(src, src)
    want = single_logits(src)
    got = threaded_logits(src, n)
    for r in range(n):
        assert np.array_equal(got[r], got[0])
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5)


def test_rank_reads_only_its_own_shard(ckpts, monkeypatch):
    """With as many ranks as shards, rank r opens the tensors of consolidated.r.pth only."""
    from llama_ref.weights import torch_zip

    read = []
    original = torch_zip.TorchTensor.read
    monkeypatch.setattr(torch_zip.TorchTensor, "read", lambda self: read.append(self.storage.path.name)
                        or original(self))
    monkeypatch.setattr(torch_zip.TorchTensor, "view", lambda self: pytest.fail("a slice of a shard was mapped"))
    _, mine, weights, _ = load_rank_weights(ckpts["meta4"], 2, 4)
    assert set(read) == {"consolidated.02.pth"}
    assert mine.n_heads == 2 and mine.n_kv_heads == 1
    assert isinstance(weights["tok_embeddings.weight"], EmbeddingPart)


def test_local_args_are_the_slice():
    mine = local_args(gqa_args(), 1, 4, "x")
    assert (mine.n_heads, mine.kv_heads, mine.head_dim, mine.dim) == (2, 1, 8, 64)


# ---- convert --shards -----------------------------------------------------------------------------------

def test_meta_shards_are_fairscale_slices(ckpts):
    """Shard k of convert's output holds fairscale's k-th slice: the merged checkpoint is the original."""
    one = llama_ref.load(ckpts["meta1"])
    for n in (2, 4):
        merged = llama_ref.load(ckpts[f"meta{n}"])
        for name, w in one.weights.items():
            assert np.array_equal(np.asarray(w), np.asarray(merged.weights[name])), name
    from llama_ref.weights.torch_zip import read_torch_file

    shard = read_torch_file(ckpts["meta2"] / "consolidated.01.pth")
    assert shard["layers.0.attention.wk.weight"].shape == (2 * 8, 64)  # 2 of the 4 KV heads
    assert shard["layers.0.attention.wo.weight"].shape == (64, 4 * 8)
    assert shard["tok_embeddings.weight"].shape == (48, 64)  # Llama 3's vocabulary split


def test_shards_that_do_not_divide_are_refused(tmp_path):
    args = gqa_args()
    with pytest.raises(WeightsError, match="--shards 3: Meta's layout needs the shard count to divide n_heads"):
        meta_shard_plans(args, 3)
    with pytest.raises(WeightsError, match="--shards 16: .* n_kv_heads"):
        meta_shard_plans(gqa_args(n_heads=16, dim=128), 16)
    from llama_ref.tools.convert import convert

    with pytest.raises(WeightsError, match="only Meta's format"):
        convert(TINY / "llama31_bf16_meta", tmp_path / "x", "hf", shards=2)
    assert not (tmp_path / "x").exists()


# ---- across MPI ranks ---------------------------------------------------------------------------------------

def run_worker(n, sources, tmp_path):
    mpirun(n, HERE / "mpi_worker.py", tmp_path, ",".join(map(str, TOKENS)), *sources)
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    return [np.load(tmp_path / f"logits_{i}.npy") for i in range(len(sources))], ranks


@needs_mpi
@pytest.mark.parametrize("n", [2, 4])
def test_mpi_logits_match_one_process(ckpts, tmp_path, n):
    """Under mpirun, logits equal the single-process ones within 1e-5 (float32), the same bits on every
    rank: Meta shards read one per rank, re-sliced from other shard counts and single files, HF, GGUF, and
    the shards Meta's layout script wrote (tests/fixtures/make_tiny_checkpoints.py), KV heads split."""
    sources = [ckpts[f"meta{n}"], ckpts["meta1"], ckpts["meta4" if n == 2 else "meta2"], ckpts["hf"],
               ckpts["gguf"], TINY / "llama31_bf16_mp2_meta"]
    got, ranks = run_worker(n, sources, tmp_path)
    for src, logits in zip(sources, got):
        np.testing.assert_allclose(logits, single_logits(src), rtol=0, atol=1e-5, err_msg=str(src))
    for rank_reports in ranks:
        for report in rank_reports:
            assert report["same_as_rank0"], report
    assert [r[0]["local_heads"] for r in ranks] == [8 // n] * n
    assert [r[0]["local_kv_heads"] for r in ranks] == [4 // n] * n


def cli(*argv, timeout=120):
    return subprocess.run([sys.executable, "-m", "llama_ref.tools.cli", *map(str, argv)], capture_output=True,
                          text=True, timeout=timeout)


@needs_mpi
@pytest.mark.parametrize("n, src", [(2, "tok_meta2"), (4, "gguf")])
def test_mpi_generate_and_score_match_one_process(ckpts, tmp_path, n, src):
    """Greedy text (and sampled text with a seed) is the single-process text; a score agrees to 1e-6."""
    src = ckpts[src]
    for flags in (["--temp", "0"], ["--temp", "0.9", "--seed", "5"]):
        common = ["generate", "-m", src, "-q", "--json", "-n", 24, "--ignore-eos", *flags, "the theme"]
        one = cli(*common)
        assert one.returncode == 0, one.stderr
        many = mpirun(n, "-m", "llama_ref.tools.cli", *common, "--parallel", "mpi")
        assert json.loads(many.stdout)["ids"] == json.loads(one.stdout)["ids"]
        assert json.loads(many.stdout)["text"] == json.loads(one.stdout)["text"]
    text = tmp_path / "t.txt"
    text.write_text("the theme of the thesis: the heat, the height, the path there. " * 6)
    one = json.loads(cli("score", "-m", src, "-q", "--json", text).stdout)
    many = json.loads(mpirun(n, "-m", "llama_ref.tools.cli", "score", "-m", src, "-q", "--json", text,
                             "--parallel", "mpi").stdout)
    assert many["n_tokens"] == one["n_tokens"]
    assert many["perplexity"] == pytest.approx(one["perplexity"], rel=1e-6)


@needs_mpi
def test_mpi_ranks_that_do_not_divide_the_heads_fail_on_every_rank(ckpts):
    done = mpirun(3, "-m", "llama_ref.tools.cli", "generate", "-m", ckpts["meta1"], "-n", 2, "--parallel", "mpi",
                  "hello", check=False, timeout=120)
    assert done.returncode != 0
    assert "3 ranks do not divide the model's 8 attention heads" in done.stderr
    assert "ending every rank of the job" in done.stderr


def _prompts(path: Path, n: int, seed: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    words = ["the", "theme", "heat", "path", "there", "height", "a", "of"]
    path.write_text("\n".join(" ".join(rng.choice(words, rng.integers(3, 25))) for _ in range(n)) + "\n")
    return path


@needs_mpi
def test_mpi_teacher_data_parallel_writes_the_single_process_bytes(ckpts, tmp_path):
    """Two whole-model copies (--tensor-parallel 1) share the prompts out; one file, byte for byte the
    single-process one. Two ranks splitting one model write the same file as each other every time."""
    prompts = _prompts(tmp_path / "p.txt", 30)
    one, dp, tp, tp_again = (tmp_path / f"{name}.bin" for name in ("one", "dp", "tp", "tp_again"))
    # One thread everywhere: each rank takes its share of the cores (one here), and NumPy's BLAS may round a
    # product's last bit differently at another thread count, so "the same bytes" holds at the same threads.
    # And BLAS's sums on both sides: one process defaults to sums="apart", which MPI ranks do not implement.
    done = cli("teacher", prompts, "-m", ckpts["tok_meta2"], "-o", one, "-q", "--threads", "1", "--sums", "blas")
    assert done.returncode == 0, done.stderr
    common = ["-m", "llama_ref.tools.cli", "teacher", prompts, "-m", ckpts["tok_meta2"], "-q", "--parallel", "mpi",
              "--threads", "1"]
    mpirun(2, *common, "-o", dp, "--tensor-parallel", "1")
    assert dp.read_bytes() == one.read_bytes()
    mpirun(2, *common, "-o", tp)
    mpirun(4, *common, "-o", tp_again, "--tensor-parallel", "2")  # two copies, each split over two ranks
    assert tp.read_bytes() == tp_again.read_bytes()
    from llama_ref.generation.teacher import read_teacher

    (_, split), (_, whole) = read_teacher(tp), read_teacher(one)
    assert [r.index for r in split] == list(range(30))
    for a, b in zip(split, whole):  # float16 log-probabilities of logits within 1e-5
        np.testing.assert_allclose(a.top_logprobs.astype(float), b.top_logprobs.astype(float), atol=2e-2)


def _rank_pids(mpirun_pid: int, n: int, timeout: float = 60) -> dict:
    """World rank -> pid of the processes mpirun started (its children, by OMPI_COMM_WORLD_RANK)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = {}
        for pid in Path(f"/proc/{mpirun_pid}/task/{mpirun_pid}/children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for entry in env:
                if entry.startswith(b"OMPI_COMM_WORLD_RANK="):
                    ranks[int(entry.split(b"=")[1])] = int(pid)
        if len(ranks) == n:
            return ranks
        time.sleep(0.1)
    raise AssertionError("mpirun's ranks did not start")


@pytest.mark.slow
@needs_mpi
@pytest.mark.parametrize("victim", [0, 1])
def test_mpi_killed_rank_ends_the_job_and_the_export_resumes(ckpts, tmp_path, victim):
    """SIGKILL one rank mid-export: mpirun ends the job within seconds (no hang), the surviving rank says
    why, and running the command again resumes to the bytes of an uninterrupted run."""
    prompts = _prompts(tmp_path / "p.txt", 400, seed=victim)
    out, full = tmp_path / "out.bin", tmp_path / "full.bin"
    common = ["-m", "llama_ref.tools.cli", "teacher", prompts, "-m", ckpts["tok_meta2"], "-q", "--parallel", "mpi"]
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    job = subprocess.Popen(["mpirun", "-n", "2", sys.executable, *map(str, common), "-o", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ranks = _rank_pids(job.pid, 2)
        deadline = time.monotonic() + 120
        while not (out.exists() and out.stat().st_size > 1000) and job.poll() is None:
            assert time.monotonic() < deadline, "no record was written"
            time.sleep(0.05)
        assert job.poll() is None, "the export finished before a rank could be killed"
        os.kill(ranks[victim], signal.SIGKILL)
        _, stderr = job.communicate(timeout=60)  # a hang fails here
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert job.returncode != 0
    assert f"rank {victim} with PID" in stderr and "signal 9" in stderr, stderr
    assert f"llama-ref rank {1 - victim} of 2: stopped by mpirun" in stderr, stderr
    mpirun(2, *common, "-o", out)
    mpirun(2, *common, "-o", full)
    assert out.read_bytes() == full.read_bytes()


@needs_mpi
def test_mpi_score_shares_files_between_model_copies(ckpts, tmp_path):
    """Three files over two whole-model copies: each file's NLL is the single-process one exactly (at the same
    threads, one, as in test_mpi_teacher_data_parallel_writes_the_single_process_bytes)."""
    files = [_prompts(tmp_path / f"{i}.txt", 8 + 5 * i, seed=i) for i in range(3)]
    one = json.loads(cli("score", "-m", ckpts["tok_meta2"], "-q", "--json", "--threads", "1", "--sums", "blas",
                         *files).stdout)  # BLAS's sums, as the ranks' (one process defaults to "apart")
    many = json.loads(mpirun(2, "-m", "llama_ref.tools.cli", "score", "-m", ckpts["tok_meta2"], "-q", "--json", *files,
                             "--parallel", "mpi", "--tensor-parallel", "1", "--threads", "1").stdout)
    assert [f["nll"] for f in many["files"]] == [f["nll"] for f in one["files"]]
    assert many["perplexity"] == one["perplexity"] and many["n_tokens"] == one["n_tokens"]


def test_quantized_slices_are_one_process_blocks(ckpts):
    """q8_0 over slices that start at multiples of 32 columns: the single-process quantized logits."""
    src = ckpts["meta1"]
    model = llama_ref.load(src, quantize="q8_0")
    prefill = model.forward(TOKENS[:-3], 0)
    steps = [model.forward([t], len(TOKENS) - 3 + j) for j, t in enumerate(TOKENS[-3:])]
    want = np.concatenate([prefill, *steps])
    threads, results = _Threads(2), [None] * 2

    def rank(r):
        _, mine, weights, _ = load_rank_weights(Path(src), r, 2, quantize="q8_0")
        m = Transformer(mine, weights)
        m.parallel = threads.group(r)
        out = [m.forward(TOKENS[:-3], 0)] + [m.forward([t], len(TOKENS) - 3 + j) for j, t in enumerate(TOKENS[-3:])]
        results[r] = np.concatenate(out)

    workers = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    np.testing.assert_allclose(results[0], want, rtol=0, atol=1e-5)
    assert type(model.weights["layers.0.attention.wo.weight"]).__name__ == "Q8_0Weight"


@pytest.mark.slow
@needs_mpi
@pytest.mark.parametrize("layout", ["own shard", "re-sliced file"])
def test_mpi_rank_memory_is_its_share_of_the_weights(tmp_path_factory, tmp_path, layout):
    """Each of 2 ranks grows by at most 1/2 of the weights + 10% while loading (peak RSS, VmHWM, over the
    RSS after its imports) from a ~150 MB bf16 checkpoint: its own shard, or its rows / columns of one file."""
    root = tmp_path_factory.mktemp("memory")
    args = tiny_args(dim=768, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=16384, multiple_of=256)
    rng = np.random.default_rng(0)
    weights = {name: (rng.standard_normal(shape, dtype=np.float32) * 0.02 if len(shape) == 2
                      else np.ones(shape, np.float32)) for name, shape in expected_shapes(args).items()}
    src = root / "ckpt"
    write_meta(src, args, weights, "bf16", shards=2 if layout == "own shard" else 1)
    del weights
    _, ranks = run_worker(2, [src], tmp_path)
    share = 2 * args.param_count() / 2
    for (report,) in ranks:
        grown = (report["peak_loaded_kib"] - report["rss_before_kib"]) * 1024
        assert report["weight_bytes"] == pytest.approx(share, rel=0.01)
        assert grown <= 1.10 * share, (layout, report)


@pytest.mark.parametrize("axis, lo, hi", [(0, 3, 40), (1, 5, 29), (1, 0, 64)])
def test_read_block_reads_only_the_block(ckpts, monkeypatch, axis, lo, hi):
    """Rows or columns of a stored matrix, columns gathered a few rows at a time: the same elements as
    slicing the whole tensor."""
    import llama_ref.runtime.parallel as parallel
    from llama_ref.weights.safetensors_file import read_safetensors_header
    from llama_ref.weights.torch_zip import read_torch_file

    monkeypatch.setattr(parallel, "COLUMN_CHUNK_BYTES", 3 * 64 * 2)  # 3 rows of 64 bf16 values per read
    tensors = [read_safetensors_header(ckpts["hf"] / "model.safetensors")[0]["model.layers.0.mlp.down_proj.weight"],
               read_torch_file(ckpts["meta1"] / "consolidated.00.pth")["layers.0.attention.wo.weight"]]
    for t in tensors:
        want = t.read()[(slice(None),) * axis + (slice(lo, hi),)]
        np.testing.assert_array_equal(parallel.read_block(t, axis, lo, hi), want)
