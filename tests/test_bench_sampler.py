"""bench/bench_sampler.py runs end to end (CPU smoke mode: tiny vocabulary)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_sampler.py"


def test_bench_smoke_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    spec = importlib.util.spec_from_file_location("_bench_sampler", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--device", "cpu", "--batch", "6", "--vocab", "300", "--warmup", "0", "--iters", "1"]) == 0
    report = json.loads((tmp_path / "sampler.json").read_text())
    sampler = report["sampler"]
    for name in ("previous", "current"):
        assert all(sampler[name][mode]["gpu_ms"] > 0 for mode in ("greedy", "sampled", "top_p_only"))
        assert sampler["implied_step_ratio"][name] > 0
    for mode in ("sampled", "top_p_only"):
        check = sampler["checks"][mode]
        assert check["seeded_rows"] == 3
        assert check["previous_as_per_row"] == check["current_as_per_row"] == check["current_as_previous"] == 3
    assert "sampled_unseeded" not in sampler["checks"]
