"""Teacher export: the stored top-k log-probabilities are the model's, and an interrupted export resumes,
keeping the complete records and dropping a record cut short."""

from __future__ import annotations

import json

import numpy as np
import pytest

import llama_ref
from llama_ref.errors import InputError
from llama_ref.generation.sampling import log_softmax
from llama_ref.generation.teacher import (TeacherFileError, check_teacher_input, export_teacher, read_teacher)

PROMPTS = ["the theme", "hello there, how are you?", "x", "a longer line with several words in it"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from test_cli import write_tiny_gguf

    return llama_ref.load(write_tiny_gguf(tmp_path_factory.mktemp("teacher") / "tiny.gguf"))


def test_records_hold_the_models_top_k(model, tmp_path):
    out = tmp_path / "t.bin"
    summary = export_teacher(model, PROMPTS, out, top_k=5, dtype="float32")
    assert summary["records"] == 4 and summary["skipped"] == 0
    header, records = read_teacher(out)
    assert header["top_k"] == 5 and header["prompts"] == 4
    assert [r.index for r in records] == [0, 1, 2, 3]
    for text, r in zip(PROMPTS, records):
        ids = model.tokenizer.encode(text)
        assert r.ids.tolist() == ids
        logp = log_softmax(model.logits(ids))  # (T, V)
        best = np.argsort(-logp, axis=-1, kind="stable")[:, :5]
        assert np.array_equal(r.top_ids, best)
        assert np.allclose(r.top_logprobs, np.take_along_axis(logp, best, axis=-1), atol=1e-6)
    # float16 halves the log-probabilities' size and keeps about three significant digits.
    small = tmp_path / "t16.bin"
    export_teacher(model, PROMPTS, small, top_k=5)
    assert small.stat().st_size < out.stat().st_size
    _, records16 = read_teacher(small)
    assert np.allclose(records16[1].top_logprobs, records[1].top_logprobs, rtol=2e-3)


def test_resume_keeps_records_and_drops_a_partial_one(model, tmp_path, monkeypatch):
    full = tmp_path / "full.bin"
    export_teacher(model, PROMPTS, full, top_k=3)
    data = full.read_bytes()
    # Interrupted in the middle of writing the third record: keep 2 whole records and part of the next.
    _, records = read_teacher(full)
    two = tmp_path / "two.bin"
    head_and_two = len(data) - sum(_record_size(r) for r in records[2:])
    two.write_bytes(data[:head_and_two + 11])
    header, kept = read_teacher(two)
    assert len(kept) == 2  # the partial trailing record is not a record
    calls = []
    original = type(model).logits

    def counting_logits(self, ids, **kw):
        calls.append(len(ids))
        return original(self, ids, **kw)

    monkeypatch.setattr(type(model), "logits", counting_logits)
    summary = export_teacher(model, PROMPTS, two, top_k=3)
    assert summary["skipped"] == 2 and len(calls) == 2  # only the prompts not yet written are run
    assert two.read_bytes() == data


def _record_size(r) -> int:
    T, k = r.top_ids.shape
    return 4 + 8 + 4 * T + 4 * T * k + r.top_logprobs.dtype.itemsize * T * k + 4


def test_resume_refuses_other_settings(model, tmp_path):
    out = tmp_path / "t.bin"
    export_teacher(model, PROMPTS, out, top_k=3)
    with pytest.raises(TeacherFileError, match="top_k"):
        export_teacher(model, PROMPTS, out, top_k=4)
    with pytest.raises(TeacherFileError, match="prompts"):
        export_teacher(model, PROMPTS[:3], out, top_k=3)
    export_teacher(model, PROMPTS[:1], out, top_k=4, resume=False)  # a restart overwrites
    assert read_teacher(out)[0]["top_k"] == 4


def test_inputs_text_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\nsecond line\n", encoding="utf-8")
    assert check_teacher_input(txt) == ["first", "second line"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"text": "a\nb"}) + "\n" + json.dumps("plain") + "\n", encoding="utf-8")
    assert check_teacher_input(jl) == ["a\nb", "plain"]
    jl.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(InputError, match=r"p.jsonl:2"):
        check_teacher_input(jl)
    with pytest.raises(InputError, match="no such"):
        check_teacher_input(tmp_path / "missing.txt")


def test_long_prompt_refused_before_writing(model, tmp_path):
    out = tmp_path / "t.bin"
    with pytest.raises(InputError, match="context window"):
        export_teacher(model, ["ok", "y" * 300], out, top_k=2)
    assert not out.exists()
    export_teacher(model, ["ok", "y" * 300], out, top_k=2, truncate=True)
    assert read_teacher(out)[1][1].ids.size == model.args.max_seq_len


def test_cli_teacher(cli, tmp_path):
    from test_cli import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "m.gguf")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": p}) for p in PROMPTS) + "\n", encoding="utf-8")
    done = cli("teacher", prompts, "-o", tmp_path / "o.bin", "-m", gguf, "-k", 4, "--json", "-q")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["records"] == 4
    assert len(read_teacher(tmp_path / "o.bin")[1]) == 4
    again = cli("teacher", prompts, "-o", tmp_path / "o.bin", "-m", gguf, "-k", 4, "--json", "-q")
    assert json.loads(again.stdout)["skipped"] == 4
    bad = cli("teacher", tmp_path / "none.jsonl", "-o", tmp_path / "x.bin", "-m", gguf)
    assert bad.returncode == 2 and "none.jsonl" in bad.stderr and not (tmp_path / "x.bin").exists()
