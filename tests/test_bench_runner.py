"""The benchmark-suite runner: per-script status, peak memory of the child alone, and the summary."""

from __future__ import annotations

from pathlib import Path

from bench import run_all

BENCH = Path(__file__).resolve().parents[1] / "bench"

FAKE = """
import argparse, json
import numpy as np
parser = argparse.ArgumentParser()
parser.add_argument("--out")
args = parser.parse_args()
block = np.ones(64 * 2**20, dtype=np.uint8)  # 64 MiB, touched
json.dump({"what": "fake", "speedup": 1.5, "nested": {"p99_ms": 2.0, "label": "x"}}, open(args.out, "w"))
"""


def test_run_one_records_result_and_child_peak_memory(tmp_path: Path) -> None:
    script = tmp_path / "fake_bench.py"
    script.write_text(FAKE)
    record = run_all.run_one(script, "cpu", tmp_path, timeout=120, log_dir=tmp_path)
    assert record["exit_status"] == 0
    assert record["result"]["speedup"] == 1.5
    # The child's own high-water mark: at least the 64 MiB it touched, far below this (torch-loaded) parent.
    assert 64 <= record["peak_rss_mib"] < 400


def test_failing_script_is_recorded_with_its_log(tmp_path: Path) -> None:
    script = tmp_path / "broken_bench.py"
    script.write_text("import argparse\nargparse.ArgumentParser().add_argument('--out')\nraise SystemExit('boom')\n")
    record = run_all.run_one(script, "cpu", tmp_path, timeout=60, log_dir=tmp_path)
    assert record["exit_status"] == 1
    assert "boom" in record["log_tail"]
    assert "result" not in record


def test_summary_lifts_key_figures() -> None:
    suite = {
        "date": "2026-01-01",
        "device": "cpu",
        "machine": {"cpu": "x", "cores": 2},
        "benchmarks": {"fake": {"exit_status": 0, "seconds": 1.0, "peak_rss_mib": 70.0, "result": {"what": "fake", "speedup": 1.5, "nested": {"p99_ms": 2.0}}}},
    }
    text = run_all.summary_markdown(suite)
    assert "| fake | ok | 1.0 | 70.0 |" in text
    assert "`speedup`: 1.5" in text and "`nested.p99_ms`: 2.0" in text


def test_every_bench_script_is_either_run_or_excused() -> None:
    stems = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_")}  # __init__ is the package
    discovered = {p.stem for p in run_all.discover()}
    assert discovered | set(run_all.NOT_BENCHMARKS) == stems
    assert {"train_speed", "speedups"} <= discovered
