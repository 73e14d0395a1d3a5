"""Llama 4 across ranks (llama_ref.runtime.parallel): the experts and the shared expert cut along their hidden
width (as Meta's fairscale layers cut them), the router on every rank, one all-reduce after the attention and
one after the feed-forward. Checked against one process with ranks simulated by threads and, when Open MPI and
mpi4py are there, under `mpirun -n 2` (tests/test_parallel.py's helpers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llama_ref.runtime.parallel import _open_source, local_args, rank_plan
from test_parallel import TOKENS, needs_mpi, run_worker, single_logits, threaded_logits

TINY = Path(__file__).parent / "data" / "tiny_ckpt"
SOURCES = {"meta": TINY / "llama4_meta", "hf": TINY / "llama4_hf", "gguf": TINY / "llama4cpp.gguf"}


@pytest.mark.parametrize("src, n", [("meta", 2), ("hf", 2), ("hf", 4), ("gguf", 2), ("gguf", 4)])
def test_threaded_ranks_match_one_process(src, n):
    """Within 1e-5 of one process (measured 3.3e-6), the same bits on every rank; 4 ranks over 2 KV heads
    keep a KV head each two ranks share."""
    want = single_logits(SOURCES[src])
    got = threaded_logits(SOURCES[src], n)
    for r in range(n):
        assert np.array_equal(got[r], got[0])
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5)


def test_hf_and_single_meta_files_are_read_stacked_tensor_by_stacked_tensor(monkeypatch):
    """Ranks reading an HF directory or one Meta file never load the whole model (the ordinary loader is
    not called): each source tensor, stacked experts included, is read once per rank, in turn, and only the
    rank's slices are kept."""
    import llama_ref.weights.directory as directory
    from llama_ref.weights.torch_zip import TorchTensor, read_torch_file

    want = {src: single_logits(SOURCES[src]) for src in ("hf", "meta")}

    def whole(*a, **k):
        raise AssertionError("the whole checkpoint was loaded")

    reads = []
    original = TorchTensor.read
    monkeypatch.setattr(directory, "load_directory", whole)
    key = lambda t: (t.storage.offset, t.storage_offset, t.shape)  # noqa: E731  (a tensor's place in the file)
    monkeypatch.setattr(TorchTensor, "read", lambda self: reads.append(key(self)) or original(self))
    for src in ("hf", "meta"):
        np.testing.assert_allclose(threaded_logits(SOURCES[src], 2)[0], want[src], rtol=0, atol=1e-5)
    tensors = [key(t) for t in read_torch_file(SOURCES["meta"] / "consolidated.00.pth").values()]
    assert sorted(reads) == sorted(tensors * 2)  # 2 ranks, each reading each tensor of the file once


def test_gguf_experts_are_read_as_views_of_their_stacked_tensors(monkeypatch):
    import llama_ref.weights.gguf as gguf_module

    want = single_logits(SOURCES["gguf"])
    monkeypatch.setattr(gguf_module, "load_gguf", lambda *a, **k: (_ for _ in ()).throw(AssertionError("whole")))
    got = threaded_logits(SOURCES["gguf"], 2)
    np.testing.assert_allclose(got[0], want, rtol=0, atol=1e-5)
    assert np.array_equal(got[0], got[1])


def test_rank_slices_tile_every_expert():
    args = _open_source(SOURCES["hf"])[0]
    for n in (2, 4):
        widths = {r: local_args(args, r, n, "x").llama4.expert_hidden_dim for r in range(n)}
        assert sum(widths.values()) == args.llama4.expert_hidden_dim
        for name in ("layers.1.feed_forward.experts.3.w1.weight", "layers.3.feed_forward.shared_expert.w2.weight"):
            slots = [rank_plan(args, r, n, "x")[name] for r in range(n)]
            axis = 1 if name.endswith("w2.weight") else 0
            assert [s[0] for s in slots] == [axis] * n
            assert slots[0][1] == 0 and slots[-1][2] == args.llama4.expert_hidden_dim
            assert all(a[2] == b[1] for a, b in zip(slots, slots[1:]))  # contiguous, no gap, no overlap
        assert rank_plan(args, 1, n, "x")["layers.1.feed_forward.router.weight"] is None  # every rank routes


@pytest.mark.slow
@needs_mpi
def test_mpi_ranks_match_one_process(tmp_path):
    sources = [SOURCES["hf"], SOURCES["gguf"]]
    got, ranks = run_worker(2, sources, tmp_path)
    for src, logits in zip(sources, got):
        np.testing.assert_allclose(logits, single_logits(src, TOKENS), rtol=0, atol=1e-5, err_msg=str(src))
    assert all(report["same_as_rank0"] for rank_reports in ranks for report in rank_reports)
