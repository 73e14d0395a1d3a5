"""benchmarks/run.py labels its table from the arguments it ran with (not fixed 128/512 columns), and a
crashed peer shows as crashed. The report is rendered from the committed results with other arguments."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import run  # noqa: E402  (benchmarks/run.py)


# The plot (matplotlib, ~1.5 s of CPU to import and draw) in the slow tier; the fast tier renders the report as
# where matplotlib is not installed, which write_report supports by leaving the plot out.
@pytest.mark.parametrize("plot", [pytest.param(False, id="no-matplotlib"),
                                  pytest.param(True, id="with-plot", marks=pytest.mark.slow)])
def test_report_columns_and_notes_follow_the_arguments(tmp_path, monkeypatch, plot):
    if plot:
        pytest.importorskip("matplotlib")
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    report = json.loads((BENCH / "results" / "bench.json").read_text())
    report["args"].update(prefill=[64, 256], decode=32, decode_prompt=64, repeats=3)
    for row in report["rows"]:
        row.update({"prefill_64": 100.0, "prefill_256": 200.0})
    report["rows"].append({"engine": "llama.cpp", "format": "q4_k", "error": "crashed (exit code -11)"})
    run.write_report(report, tmp_path / "out")
    lines = (tmp_path / "out" / "bench.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| engine"))
    assert "prefill 64 tok/s | prefill 256 tok/s | decode tok/s" in header and "prefill 128" not in header
    table = [line for line in lines if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1  # every row has the header's columns
    assert any("error: crashed (exit code -11)" in line for line in table)
    assert any("Prefill of 256 tokens" in line for line in lines)
    assert any("decode: 32 greedy steps after a 64-token prompt" in line and "best of 3 repeats" in line
               for line in lines)
    assert json.loads((tmp_path / "out" / "bench.json").read_text())["args"]["decode_prompt"] == 64
    assert (tmp_path / "out" / "bench.png").exists() == plot


def test_ad_hoc_runs_do_not_overwrite_the_cited_results():
    assert run.output_folder(False) == BENCH / "results" / "scratch"
    assert run.output_folder(True) == BENCH / "results"


def test_generate_report_shows_a_crashed_peer_as_crashed():
    """benchmarks/generate.py's table from the committed results, llama.cpp failing in every round of one format:
    its cells say so, every row keeps the header's columns (the error's own " | " included)."""
    import generate  # noqa: E402  (benchmarks/generate.py)

    report = json.loads((BENCH / "results" / "generate_emr_2thread_s62.json").read_text())
    for r in report["rounds"]:
        r["q8_0"]["llama.cpp"] = {"error": "Traceback | Segmentation fault"}
    table = [line for line in generate.table(report).splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1
    q8 = next(line for line in table if line.startswith("| q8_0 | greedy |"))
    assert q8.split("|")[4].strip() == "crashed"
    assert sum("| q8_0 | llama.cpp failed: Traceback / Segmentation fault |" in line for line in table) == 1
    q4 = next(line for line in table if line.startswith("| q4_1 | cli |"))
    assert q4.split("|")[5].strip().endswith("x")  # both engines ran: their ratio
