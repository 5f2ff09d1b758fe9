"""bench/bench_allreduce.py --tiny: two gloo ranks on the CPU; the report has every collective of a decode step.

Values checked, never times: the figures are for GPUs, this only keeps the benchmark working.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_allreduce  # noqa: E402


def test_tiny_run_reports_each_collective_per_batch(tmp_path):
    report = bench_allreduce.main(["--tiny", "--batch", "1,8", "--out", str(tmp_path)])
    assert (tmp_path / "bench_allreduce.json").is_file()
    assert (report["tensor_parallel_size"], report["layers"], report["vocab_per_rank"]) == (2, 2, 512)
    assert [row["batch"] for row in report["rows"]] == [1, 8]
    for row in report["rows"]:
        assert row["all_reduce_in_graph_us"] is None          # no CUDA graphs on the CPU
        parts = 2 * 2 * row["all_reduce_us"] + row["logits_gather_us"] + row["ids_broadcast_us"]
        assert row["collectives_per_decode_step_us"] == parts > 0
