"""bench/bench_concurrent_loads.py: no loader and one, briefly; the report has its rows (never a time checked)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_concurrent_loads  # noqa: E402


def test_reports_the_step_beside_each_loader_count(tmp_path):
    before, threads = sys.getswitchinterval(), torch.get_num_threads()
    rows = bench_concurrent_loads.main(["--loaders", "0,1", "--seconds", "0.5", "--out", str(tmp_path)])
    assert [r["loaders"] for r in rows] == [0, 1]
    assert rows[0]["loads"] == 0 and rows[0]["step_over_alone"] == 1.0
    assert all(r["step_ms"] > 0 for r in rows) and rows[1]["step_over_alone"] > 0
    assert json.loads((tmp_path / "concurrent_loads.json").read_text())["rows"] == rows
    assert abs(sys.getswitchinterval() - before) <= 1e-6 and torch.get_num_threads() == threads
