"""bench/serving.py's smoke configuration: the tiny preset, tens of adapters, seconds on a CPU.

It keeps the benchmark from rotting: the report has its shape and every request finished,
with the tokens it asked for. Times are never asserted.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SUMMARY_KEYS = {"requests", "finished", "errors", "unfinished", "short", "seconds", "output_tokens", "output_tok_s",
                "req_s", "steady_output_tok_s", "steady_req_s", "ttft_s", "tpot_s", "itl_warm_s", "itl_cold_s", "itl_cold_over_warm",
                "itl_warm_decode_s", "itl_cold_decode_s", "itl_cold_over_warm_decode",
                "distinct_adapters_requested", "queue_wait_s", "prefill_s", "service_s"}
DIST_KEYS = {"p50", "p90", "p99", "max", "mean", "count"}
ENGINE_KEYS = {"adapter_loads", "adapter_uploads", "adapter_prefetches", "adapter_evictions", "adapter_host_evictions",
               "adapter_pool_hits", "adapter_pool_misses", "mean_distinct_adapters_per_step", "engine_steps",
               "adapter_timings_s", "max_waiting", "prefill_step_share", "mean_prefill_tokens_per_prefill_step"}
COUNT_KEYS = ENGINE_KEYS - {"mean_distinct_adapters_per_step", "adapter_timings_s", "prefill_step_share",
                            "mean_prefill_tokens_per_prefill_step"}


def _serving():
    sys.path.insert(0, str(BENCH))
    import serving

    return serving


def _smoke(tmp_path: Path, target: str, *extra: str) -> list[dict]:
    args = ["--preset", "tiny", "--target", target, "--adapters", "20", "--requests", "24", "--concurrency", "4",
            "--prompt-len", "8:24", "--output-len", "3:10", "--base-share", "0.25", "--max-loras", "4",
            "--max-cpu-loras", "8", "--ranks", "8,16", "--work", str(tmp_path / "work"), "--out",
            str(tmp_path / "out"), "--label", "smoke", "--progress-every", "60", *extra]
    assert _serving().main(args) == 0
    report = json.loads((tmp_path / "out" / "smoke.json").read_text())
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "out" / "smoke.png").stat().st_size > 0
    return report["runs"]


def _check_run(run: dict, requests: int) -> None:
    s = run["summary"]
    assert SUMMARY_KEYS <= set(s)
    assert (s["requests"], s["finished"], s["errors"], s["unfinished"], s["short"]) == (requests, requests, 0, 0, 0)
    assert s["output_tokens"] > 0
    assert DIST_KEYS <= set(s["ttft_s"]) and s["ttft_s"]["count"] == requests
    engine = run["engine"]
    assert ENGINE_KEYS <= set(engine)
    assert all(engine[key] >= 0 for key in COUNT_KEYS), engine
    assert engine["adapter_loads"] >= 1 and engine["engine_steps"] >= 1
    assert 0 < engine["mean_distinct_adapters_per_step"] <= 4      # never more than max_loras
    # Every prompt (8-24 tokens) was prefilled in some step, in rows of several tokens.
    assert 0 < engine["prefill_step_share"] <= 1 and engine["mean_prefill_tokens_per_prefill_step"] > 1
    for kind, timing in engine["adapter_timings_s"].items():
        assert kind in ("load", "upload", "gpu_eviction", "host_eviction")
        assert timing["count"] >= 1 and timing["p50"] <= timing["p99"] <= timing["max"]
    assert "load" in engine["adapter_timings_s"] and "upload" in engine["adapter_timings_s"]
    assert len(run["cdf"]["ttft_s"]) == requests


def test_inproc_smoke_run_finishes_every_request(tmp_path):
    runs = _smoke(tmp_path, "inproc", "--save-records", "--decode-bound")
    assert len(runs) == 1
    run = runs[0]
    assert run["target"] == "inproc" and run["workload"]["num_adapters"] == 20
    _check_run(run, 24)
    cpu = run["engine"]["thread_cpu_s"]
    if sys.platform == "linux":     # read from /proc: the engine thread did the steps, within the process's total
        assert 0 < cpu["multilora-engine"] <= cpu["process"] and run["engine"]["wall_s"] > 0
    records = run["records"]
    assert all(r["tokens"] == r["output_len"] and r["error"] is None for r in records)
    # Zipf popularity and the base share reach the requests: some base, several adapters.
    adapters = [r["adapter"] for r in records]
    assert None in adapters and len({a for a in adapters if a}) >= 3
    for key in ("queue_wait_s", "prefill_s", "service_s"):     # one per request, from the engine's metrics
        assert run["summary"][key]["count"] == 24
    bound = run["summary"]["wait_bound"]
    assert bound["checked"] == 24 and bound["violations"] >= 0 and bound["longest_request_s"] > 0
    bound = run["decode_bound"]
    assert bound["rows"] == 4 and 1 <= bound["distinct_adapters"] <= 4 and bound["decode_tok_s"] is not None
    assert bound["batch_tok_s"] > 0


def test_poisson_run_at_a_fraction_of_the_closed_loop_rate(tmp_path):
    runs = _smoke(tmp_path, "inproc", "--rate-fraction", "0.8", "--requests", "16")
    closed, poisson = runs
    assert closed["workload"]["concurrency"] == 4 and closed["workload"]["rate"] is None
    assert poisson["workload"]["concurrency"] is None
    assert poisson["workload"]["rate"] == pytest.approx(0.8 * closed["summary"]["req_s"])
    _check_run(poisson, 16)


@pytest.mark.skipif(importlib.util.find_spec("pytriton") is None or importlib.util.find_spec("tritonclient") is None,
                    reason="needs nvidia-pytriton and tritonclient (make venv)")
def test_triton_smoke_run_finishes_every_request(tmp_path):
    runs = _smoke(tmp_path, "triton", "--client-procs", "2")
    assert runs[0]["target"] == "triton"
    _check_run(runs[0], 24)
    assert runs[0]["engine"]["stream_errors"] == 0


def test_hf_and_hf_peft_baselines_finish_one_batch(tmp_path):
    """Part B's references: transformers generate, and PEFT with mixed adapter_names (base rows too)."""
    runs = _smoke(tmp_path, "hf,hf-peft")
    assert [r["target"] for r in runs] == ["hf", "hf-peft"]
    for run in runs:
        s = run["summary"]
        assert (s["requests"], s["finished"], s["errors"], s["unfinished"]) == (4, 4, 0, 0)   # one batch
        assert s["output_tokens"] > 0
    assert runs[0]["engine"]["adapters_loaded_in_peft"] == 0
    assert runs[1]["engine"]["adapters_loaded_in_peft"] >= 1
