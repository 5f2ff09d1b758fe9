"""bench/bench_host_launch.py --tiny: the torch twins on the CPU; the report has every call of an eager layer.

Values checked, never times: the figures are for GPUs, this only keeps the benchmark working.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_host_launch  # noqa: E402


def test_tiny_run_reports_each_call_of_a_layer(tmp_path):
    report = bench_host_launch.main(["--tiny", "--tokens", "8", "--iters", "3", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "bench_host_launch.json").read_text()).keys() == report.keys()
    calls = {r["call"]: r for r in report["rows"]}
    # A layer: 4 projections, two norms, rotary + KV write, SiLU-and-mul; the torch op floor beside them.
    assert sum(r["per_layer"] for r in calls.values()) == 8 and calls["residual add + RMSNorm"]["per_layer"] == 2
    assert all(r["host_us"] > 0 and r["gpu_us"] is None for r in calls.values())    # no CUDA graphs on the CPU
    assert report["layer_host_us"] == sum(r["host_us"] * r["per_layer"] for r in calls.values())
    assert report["layer_gpu_us"] is None and report["tokens"] == 8
