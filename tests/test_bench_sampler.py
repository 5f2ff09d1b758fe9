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
    ranking = sampler["ranking"]
    assert set(ranking) == {"1", "2", "4", "8", "16"}      # JSON keys
    assert all(r["same_values"] and r["ms"] > 0 for r in ranking.values())


def test_split_topk_gives_one_topks_values_and_their_ids():
    import torch

    spec = importlib.util.spec_from_file_location("_bench_sampler_split", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    gen = torch.Generator().manual_seed(0)
    for logits in (torch.randn(4, 5003, generator=gen), torch.randint(0, 40, (4, 5003), generator=gen).float()):
        want = logits.topk(306).values
        for splits in (1, 2, 4, 8, 16):
            values, ids = bench.split_topk(logits, 306, splits)
            assert torch.equal(values, want), splits
            assert torch.equal(logits.gather(1, ids), values) and ids.max() < 5003
            assert all(len(set(row)) == 306 for row in ids.tolist())      # distinct ids, none padding
