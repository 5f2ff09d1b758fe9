"""bench/bench_host_stalls.py on a CPU: one small adapter per rank; the report has its rows (no time checked)."""

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_host_stalls  # noqa: E402


def test_reports_every_phase_and_leaves_the_collector_as_it_was(tmp_path):
    report = bench_host_stalls.main(["--ranks", "4,2", "--reps", "1", "--out", str(tmp_path)])
    assert (tmp_path / "host_stalls_registered.json").is_file()
    phases = [row["phase"] for row in report["rows"]]
    assert phases == ["r4 load", "r2 load", "r4 free", "r2 free", "collect", "collect after freeze"]
    assert all(row["ms"] >= 0 and row["step_max_ms"] >= 0 for row in report["rows"])
    assert report["step_alone_ms"] >= 4                     # the CPU stand-in step sleeps 4 ms
    assert gc.get_freeze_count() == 0
