"""benchmarks/shapes.py: rounds merge to the best rate of each configuration, and a report that merges runs
divides each row by the peer of its own run. Rendered from the committed 1B results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import shapes  # noqa: E402  (benchmarks/shapes.py)


def test_rounds_keep_the_best_rate_of_each_measure():
    failed = {"engine": "llama.cpp", "format": "f16", "error": "crashed (exit 1)"}
    first = {"engine": "llama.cpp", "format": "f16", "prefill_128": 30.0, "decode": 2.0, "decode_cpu": 4.0,
             "load_s": 9.0}
    second = {"engine": "llama.cpp", "format": "f16", "prefill_128": 25.0, "decode": 3.0, "decode_cpu": 3.5,
              "load_s": 5.0}
    kept = shapes.merge_rounds(shapes.merge_rounds(shapes.merge_rounds(None, failed), first), second)
    assert (kept["prefill_128"], kept["decode"], kept["decode_cpu"]) == (30.0, 3.0, 4.0)
    assert kept["load_s"] == 5.0 and kept["rounds"] == 2  # the rest from the round with the best decode
    assert shapes.merge_rounds(kept, failed) is kept  # a later failure does not replace a result
    assert shapes.merge_rounds(None, failed)["error"] == failed["error"]
    # a child's decode_threads (steps per thread count, a dict) is its round's, not a rate to take the best of
    ours = [{"engine": "llama_ref numba", "format": "f16", "decode": d, "decode_threads": {"2": n}} for d, n in
            ((12.0, 128), (12.5, 120))]
    assert shapes.merge_rounds(shapes.merge_rounds(None, ours[0]), ours[1])["decode_threads"] == {"2": 120}


def test_a_merged_report_divides_by_the_peer_of_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "CACHE", tmp_path / "no-files")  # no GGUF to read: no roofline column values
    report = json.loads((BENCH / "results" / "shapes-llama-3.2-1b.json").read_text())
    rows = [{"engine": "llama_ref numba", "format": "bf16", "run": 1, "decode": 3.0, "decode_cpu": 6.0,
             "peak_rss_mib": 1.0},
            {"engine": "llama.cpp", "format": "bf16", "run": 1, "decode": 2.0, "decode_cpu": 4.0, "peak_rss_mib": 1.0},
            {"engine": "llama_ref numba", "format": "bf16", "run": 2, "decode": 5.0, "peak_rss_mib": 1.0},
            {"engine": "llama.cpp", "format": "bf16", "run": 2, "decode": 10.0, "peak_rss_mib": 1.0}]
    report.update(rows=rows, sweep=[], runs={})
    report["machine"]["load_average"] = [7.0, 7.0, 7.0]
    shapes.write_report(report, tmp_path / "out")
    text = (tmp_path / "out.md").read_text()
    table = [line.split("|") for line in text.splitlines() if line.startswith("| llama_ref")]
    assert [cells[8].strip() for cells in table] == ["1.50x", "0.50x"]  # 3 / 2 and 5 / 10, never 3 / 10
    assert table[0][11].strip() == "1.50x" and table[1][11].strip() == ""  # per CPU s: 6 / 4; run 2 has none
    assert "compare the per-CPU-s columns" in text  # a load above the core count is called out


def test_prefill_per_cpu_second_is_reported_beside_the_wall_clock_ratios(tmp_path, monkeypatch):
    monkeypatch.setattr(shapes, "CACHE", tmp_path / "no-files")
    report = json.loads((BENCH / "results" / "shapes-llama-3.2-1b.json").read_text())
    rows = [{"engine": "llama_ref numba", "format": "bf16", "decode": 3.0, "prefill_512": 20.0,
             "prefill_512_cpu": 30.0, "peak_rss_mib": 1.0},
            {"engine": "llama.cpp", "format": "f16", "decode": 2.0, "prefill_512": 40.0, "prefill_512_cpu": 24.0,
             "peak_rss_mib": 1.0}]
    report.update(rows=rows, sweep=[], runs={})
    report["args"]["prefill"] = [512]
    shapes.write_report(report, tmp_path / "out")
    text = (tmp_path / "out.md").read_text()
    assert "Prefill 512, llama_ref numba bf16: 0.50x llama.cpp F16." in text  # wall clock: 20 / 40
    assert ("Prefill 512 per CPU s (tok per CPU s): llama_ref numba bf16 30.0, llama.cpp f16 24.0; "
            "llama_ref numba bf16: 1.25x llama.cpp F16.") in text  # 30 / 24


def test_the_roofline_share_is_also_given_per_cpu_second(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setattr(shapes, "CACHE", folder)
    monkeypatch.setattr(shapes.bench, "bytes_per_token", lambda path, position: 2 * 10**9)
    (folder / "llama-3.2-1b").mkdir(parents=True)
    (folder / "llama-3.2-1b" / "BF16.gguf").write_bytes(b"")
    report = json.loads((BENCH / "results" / "shapes-llama-3.2-1b.json").read_text())
    report.update(rows=[{"engine": "llama.cpp", "format": "bf16", "decode": 2.0, "decode_cpu": 5.0,
                         "peak_rss_mib": 1.0}], sweep=[], runs={}, bandwidth_gb_s=8.0, bandwidth_gb_s_cpu=20.0)
    shapes.write_report(report, tmp_path / "out")
    text = (tmp_path / "out.md").read_text()
    row = next(line.split("|") for line in text.splitlines() if line.startswith("| llama.cpp"))
    assert row[-9].strip() == "50% / 50%"  # 2 x 2 GB / 8 GB/s and 5 x 2 GB / 20 GB per CPU s
    assert "20.0 GB per CPU s" in text


def test_prefill_ratios_compare_rows_of_the_same_run():
    rows = [{"engine": "llama_ref numba", "format": "bf16", "run": 1, "decode": 1.0, "prefill_512": 30.0},
            {"engine": "llama.cpp", "format": "f16", "run": 1, "decode": 1.0, "prefill_512": 20.0},
            {"engine": "llama_ref numba", "format": "bf16", "run": 2, "decode": 1.0, "prefill_512": 10.0},
            {"engine": "llama.cpp", "format": "f16", "run": 2, "decode": 1.0, "prefill_512": 40.0}]
    notes = [n for run in (1, 2) for n in shapes.prefill_notes([r for r in rows if r["run"] == run], [512],
                                                               f"Run {run}, ")]
    assert notes == ["Run 1, Prefill 512, llama_ref numba bf16: 1.50x llama.cpp F16.",
                     "Run 2, Prefill 512, llama_ref numba bf16: 0.25x llama.cpp F16."]
