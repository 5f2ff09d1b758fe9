"""bench/bench_adapter_load.py: one interval, one load each way; the report has its rows (never a time checked)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_adapter_load  # noqa: E402


def test_reports_each_thread_count_idle_and_beside_a_busy_thread(tmp_path):
    before, threads = sys.getswitchinterval(), torch.get_num_threads()
    report = bench_adapter_load.main(["--intervals", "0.0002", "--threads", "0,2", "--images", "fresh", "--reps", "2",
                                      "--beside", "python", "--out", str(tmp_path)])
    assert (tmp_path / "adapter_load.json").is_file()
    assert [(r["intra_op_threads"], r["images"], r["beside"]) for r in report["rows"]] == [
        (threads, "fresh", "nothing"), (threads, "fresh", "python"), (2, "fresh", "nothing"), (2, "fresh", "python")]
    assert all(r["max_ms"] >= r["median_ms"] > 0 and r["image_max_ms"] >= r["image_median_ms"] > 0
               for r in report["rows"])
    assert all(r["engine_step_alone_ms"] is None for r in report["rows"])     # no GPU engine beside
    # The process's settings are given back (Python keeps the interval in whole microseconds).
    assert abs(sys.getswitchinterval() - before) <= 1e-6
    assert torch.get_num_threads() == threads


def test_engine_like_thread_reports_its_step_alone_and_during_spans():
    import time

    engine = bench_adapter_load.EngineLikeThread((lambda: time.sleep(0.004), lambda: None))
    engine.start()
    time.sleep(0.3)
    engine.alone_ms = engine.median_step_ms()
    start = time.perf_counter()
    time.sleep(0.1)
    spans = [(start, time.perf_counter())]
    engine.stop()
    assert engine.alone_ms >= 4                                  # each step sleeps 4 ms
    assert engine.median_step_ms(spans) >= 4
    assert engine.median_step_ms([(0.0, 1e-9)]) is None           # no step ended in that span
