"""perf_analyzer with the shipped mixed-adapter input file, and the model's metrics on /metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path

from metrics_text import eventually, sample, samples
from triton_client import run_stream

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "client_examples" / "perf_analyzer.sh"
INPUTS = REPO / "client_examples" / "perf_analyzer_inputs.json"


def adapters_in_input_file() -> set[str]:
    rows = json.loads(INPUTS.read_text())["data"]
    return {row.get("lora_id", ["(base)"])[0] for row in rows}


def requests_by_adapter(metrics: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for labels, value in samples(metrics, "multilora:requests_total"):
        totals[labels["lora_name"]] = totals.get(labels["lora_name"], 0.0) + value
    return totals


def test_perf_analyzer_streams_mixed_adapters_without_errors(server):
    before = requests_by_adapter(server.metrics())
    env = {**os.environ, "PYTHON": sys.executable, "URL": server.grpc_url, "REQUESTS": "12", "CONCURRENCY": "4"}
    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=240)
    output = run.stdout + run.stderr
    assert "error while loading shared libraries" not in output, (
        f"perf_analyzer cannot start ({output.strip()}); it needs Debian's libb64-0d and the "
        "nvidia-cuda-runtime-cu12 wheel, which `make venv` installs")
    assert run.returncode == 0, output
    assert "error" not in output.lower(), output
    assert "Request concurrency: 4" in output

    after = requests_by_adapter(server.metrics())
    for adapter in adapters_in_input_file():
        assert after.get(adapter, 0) > before.get(adapter, 0), f"no requests counted for {adapter}"


def test_metrics_follow_requests_per_adapter(server):
    text = server.metrics()
    counted = {name: sample(text, "multilora:requests_total", lora_name=name, outcome="length")
               for name in ("upper", "reverse")}
    tokens = sample(text, "multilora:generation_tokens_total", lora_name="upper")
    ttft = sample(text, "multilora:time_to_first_token_seconds_count", lora_name="upper")
    queued = sample(text, "multilora:request_queue_time_seconds_count")

    requests = {f"{name}{i}": {"text_input": "Hello, world!", "lora_id": name, "stream": True, "max_tokens": 5,
                               "ignore_eos": True} for name in ("upper", "reverse") for i in range(2)}
    results = run_stream(server.grpc_url, requests)
    assert all(r.error is None for r in results.values())

    text = server.metrics()
    for name in ("upper", "reverse"):
        assert sample(text, "multilora:requests_total", lora_name=name, outcome="length") == counted[name] + 2
    assert sample(text, "multilora:generation_tokens_total", lora_name="upper") == tokens + 10
    assert sample(text, "multilora:time_to_first_token_seconds_count", lora_name="upper") == ttft + 2
    assert sample(text, "multilora:request_queue_time_seconds_count") >= queued + 4   # + any late perf_analyzer ones
    assert sample(text, "multilora:request_prefill_time_seconds_count") >= 4
    # Pool counters and gauges follow the engine's stats a moment later.
    eventually(lambda: sample(server.metrics(), "multilora:adapter_loads_total") >= 2, what="adapter loads")
    text = server.metrics()
    assert sample(text, "multilora:adapter_pool_misses_total") >= 2
    assert sample(text, "multilora:adapter_load_seconds_count") >= 2
    assert sample(text, "multilora:adapter_upload_seconds_count") >= 2          # each slot write, timed
    assert sample(text, "multilora:engine_steps_total") >= 5
    assert 0 < sample(text, "multilora:step_adapters_total") <= 2 * sample(text, "multilora:engine_steps_total")
    # Each of the 4 prompts ("Hello, world!": several tokens) was prefilled in some step.
    assert 1 <= sample(text, "multilora:prefill_steps_total") <= sample(text, "multilora:engine_steps_total")
    assert sample(text, "multilora:prefill_tokens_total") >= 4 * 2
    # vLLM's lora_requests_info: running and waiting adapters as labels, and max_lora.
    # The current label set holds when it became current; earlier ones hold 0.
    current = [labels for labels, value in samples(text, "multilora:lora_requests_info") if value > 0]
    assert len(current) == 1 and current[0]["max_lora"] == "2"
    assert {"running_lora_adapters", "waiting_lora_adapters"} <= set(current[0])
    for gauge in ("kv_cache_usage_perc", "num_requests_running", "num_requests_waiting", "adapter_holds"):
        assert samples(text, f"multilora:{gauge}"), gauge
