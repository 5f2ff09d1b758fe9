"""bench/bench_adapter_load.py: one interval, one load each way; the report has its rows (never a time checked)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_adapter_load  # noqa: E402


def test_reports_each_interval_idle_and_beside_a_busy_thread(tmp_path):
    before = sys.getswitchinterval()
    report = bench_adapter_load.main(["--intervals", "0.0002", "--reps", "1", "--out", str(tmp_path)])
    assert (tmp_path / "adapter_load.json").is_file()
    assert [(r["switch_interval_s"], r["busy_thread"]) for r in report["rows"]] == [(0.0002, False), (0.0002, True)]
    assert all(r["max_ms"] >= r["median_ms"] > 0 for r in report["rows"])
    # The process's setting is given back (Python keeps it in whole microseconds).
    assert abs(sys.getswitchinterval() - before) <= 1e-6
