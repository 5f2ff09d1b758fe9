"""ServerMetrics against a fake Triton metric API: what each event and stats snapshot records."""

from types import SimpleNamespace

import pytest

from fake_pb_utils import FakeMetricFamily
from model_dir import import_model_module
from multilora.lora.adapter_pool import AdapterEvent
from multilora.outputs import CompletionOutput, RequestMetrics, RequestOutput

server_metrics = import_model_module("server_metrics")
LABELS = {"model": "multilora", "version": "1"}


@pytest.fixture
def metrics():
    FakeMetricFamily.registry = {}
    return server_metrics.ServerMetrics(FakeMetricFamily, LABELS)


def values(name: str) -> dict[tuple, object]:
    family = FakeMetricFamily.registry[f"multilora:{name}"]
    return {tuple(sorted((k, v) for k, v in m.labels.items() if k not in LABELS)): m for m in family.metrics}


def stats(**overrides):
    base = dict(num_running=0, num_waiting=0, kv_blocks_total=100, kv_blocks_used=0, max_loras=2,
                running_adapters=[], waiting_adapters=[], resident_adapters=[], adapter_holds=0,
                adapter_pool_hits=0, adapter_pool_misses=0, adapter_loads=0, adapter_evictions=0,
                adapter_failed_loads=0, adapter_remembered_failures=0, adapter_failed_writes=0, adapter_prefetches=0,
                adapter_host_evictions=0, num_steps=0, num_step_adapters=0, num_prefill_steps=0,
                num_prefill_tokens=0)
    return SimpleNamespace(**(base | overrides))


def finished(token_ids, prompt_len=3, ttft=0.25, queued=0.125):
    return RequestOutput("r", "p", list(range(prompt_len)), [CompletionOutput(0, "x", token_ids, "length")], True,
                         metrics=RequestMetrics(arrival_time=100.0, first_token_time=100.0 + ttft,
                                                first_scheduled_time=100.0 + queued))


def test_finished_requests_count_per_adapter_and_outcome(metrics):
    metrics.record_finished("sql", finished([1, 2, 3, 4]), "length")
    metrics.record_finished("sql", finished([1, 2]), "length")
    metrics.record_finished(None, finished([1]), "stop")
    requests = values("requests_total")
    assert requests[(("lora_name", "sql"), ("outcome", "length"))].value == 2
    assert requests[(("lora_name", "(base)"), ("outcome", "stop"))].value == 1
    assert values("generation_tokens_total")[(("lora_name", "sql"),)].value == 6
    assert values("prompt_tokens_total")[(("lora_name", "sql"),)].value == 6
    ttft = values("time_to_first_token_seconds")[(("lora_name", "sql"),)]
    assert ttft.observations == [0.25, 0.25] and ttft.buckets == server_metrics.TTFT_BUCKETS
    assert values("request_queue_time_seconds")[()].observations == [0.125] * 3
    assert values("request_prefill_time_seconds")[()].observations == [0.125] * 3


def test_a_request_that_never_started_has_no_queue_time(metrics):
    out = finished([])
    out.metrics = RequestMetrics(arrival_time=100.0)        # expired in the queue
    metrics.record_finished("sql", out, "UNAVAILABLE")
    assert values("request_queue_time_seconds")[()].observations == []


def test_stats_set_gauges_and_advance_pool_counters_by_the_difference(metrics):
    metrics.update(stats(num_running=3, num_waiting=1, kv_blocks_used=25, adapter_holds=2,
                         resident_adapters=["a", "b"], adapter_pool_hits=5, adapter_loads=2))
    metrics.update(stats(adapter_pool_hits=7, adapter_loads=2, adapter_evictions=1))
    assert values("kv_cache_usage_perc")[()].value == 0.0           # the latest snapshot wins
    assert values("adapter_pool_hits_total")[()].value == 7          # cumulative, not 5 + 7
    assert values("adapter_loads_total")[()].value == 2
    assert values("adapter_evictions_total")[()].value == 1
    metrics.update(stats(adapter_pool_hits=7, adapter_failed_loads=1, adapter_remembered_failures=3))
    assert values("adapter_failed_loads_total")[()].value == 1
    assert values("adapter_remembered_failures_total")[()].value == 3
    assert values("adapter_failed_writes_total")[()].value == 0
    metrics.update(stats(num_running=3, kv_blocks_used=25, adapter_pool_hits=7, num_steps=10, num_step_adapters=25,
                         adapter_prefetches=2, adapter_host_evictions=1, num_prefill_steps=4, num_prefill_tokens=300))
    assert values("engine_steps_total")[()].value == 10
    assert values("prefill_steps_total")[()].value == 4
    assert values("prefill_tokens_total")[()].value == 300
    assert values("step_adapters_total")[()].value == 25
    assert values("adapter_prefetches_total")[()].value == 2
    assert values("adapter_host_evictions_total")[()].value == 1
    assert values("num_requests_running")[()].value == 3
    assert values("kv_cache_usage_perc")[()].value == 0.25


def test_lora_requests_info_has_one_current_label_set(metrics):
    metrics.update(stats(running_adapters=["sql", "chat", "sql"], waiting_adapters=["code"]))
    metrics.update(stats(running_adapters=["code"]))
    metrics.update(stats(running_adapters=["code"]))
    info = FakeMetricFamily.registry["multilora:lora_requests_info"].metrics
    current = [m.labels for m in info if m.value > 0]
    assert current == [{**LABELS, "running_lora_adapters": "code", "waiting_lora_adapters": "", "max_lora": "2"}]
    assert {m.labels["running_lora_adapters"] for m in info} == {"chat,sql", "code"}


def test_adapter_events_are_observed_by_kind(metrics):
    for kind, seconds in [("load", 0.125), ("upload", 0.002), ("gpu_eviction", 1e-5), ("host_eviction", 3e-4)]:
        metrics.record_adapter_event(AdapterEvent(kind, "sql", seconds))
    assert values("adapter_load_seconds")[()].observations == [0.125]
    assert values("adapter_upload_seconds")[()].observations == [0.002]
    evictions = values("adapter_eviction_seconds")
    assert evictions[(("from", "gpu_slot"),)].observations == [1e-5]
    assert evictions[(("from", "host_memory"),)].observations == [3e-4]
