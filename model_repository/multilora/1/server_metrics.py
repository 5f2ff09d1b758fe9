"""The model's Prometheus metrics, served on the Triton server's /metrics.

Names follow vLLM's where one exists (`lora_requests_info` with its
running/waiting adapter labels and `max_lora`), under a `multilora:` prefix.
Triton's metric API is passed in (`pb_utils.MetricFamily`), keeping the Triton
server import in model.py and letting tests use a fake. Every call here is an
IPC round trip to the server, and python_backend's Metric is not thread-safe
(two threads in one metric crash the server), so one thread (model.py's
sender) makes them all.
"""

import time
from typing import Optional

BASE_MODEL_LABEL = "(base)"  # not a valid adapter name, so it cannot collide with one
# Requests refused before they reached the engine (unknown or malformed lora_id): one label,
# so that clients cannot create label sets without limit.
REFUSED_LABEL = "(refused)"
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
LOAD_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
UPLOAD_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]
EVICTION_BUCKETS = [1e-5, 1e-4, 1e-3, 0.01, 0.1, 1.0]
# EngineStats cumulative counters -> the counter that follows them (name without "_total", help).
_POOL_COUNTERS = {
    "adapter_pool_hits": ("adapter_pool_hits", "requests admitted whose adapter was already in a GPU slot"),
    "adapter_pool_misses": ("adapter_pool_misses", "requests admitted whose adapter had to be copied into a GPU slot"),
    "adapter_loads": ("adapter_loads", "adapters read from disk into host memory"),
    "adapter_prefetches": ("adapter_prefetches", "adapters copied into a free GPU slot ahead of the waiting "
                           "request that needs them, so that request's first step does not wait for the copy"),
    "adapter_evictions": ("adapter_evictions", "adapters pushed out of a GPU slot for another"),
    "adapter_host_evictions": ("adapter_host_evictions", "adapters dropped from host memory (max_cpu_loras) for "
                               "newer ones; a later request for one reads it from disk again"),
    "adapter_failed_loads": ("adapter_failed_loads", "adapter loads refused (bad files or numbers); each is "
                             "remembered for a while"),
    "adapter_remembered_failures": ("adapter_remembered_failures", "requests refused at once by a remembered "
                                    "failed load, without reloading"),
    "adapter_failed_writes": ("adapter_failed_writes", "adapters whose copy into a GPU slot failed (the log says why)"),
    "num_steps": ("engine_steps", "engine steps that ran a batch"),
    "num_step_adapters": ("step_adapters", "distinct adapters in each engine step, summed over steps: divided by "
                          "engine_steps_total, the mean number of adapters batched together"),
    "num_prefill_steps": ("prefill_steps", "engine steps that held prompt chunks (rows of several tokens) beside "
                          "their decode rows: such a step takes longer than a decode step"),
    "num_prefill_tokens": ("prefill_tokens", "tokens of prompt chunks computed, recomputed ones after a "
                           "preemption included"),
}
# AdapterEvent.kind -> (histogram attribute, extra labels, buckets).
_ADAPTER_EVENTS = {
    "load": ("_load_time", {}, LOAD_BUCKETS),
    "upload": ("_upload_time", {}, UPLOAD_BUCKETS),
    "gpu_eviction": ("_eviction_time", {"from": "gpu_slot"}, EVICTION_BUCKETS),
    "host_eviction": ("_eviction_time", {"from": "host_memory"}, EVICTION_BUCKETS),
}


class ServerMetrics:
    """Metric families plus the per-adapter and per-label-set metrics made on demand."""

    def __init__(self, family_cls, labels: dict[str, str]):
        self._family_cls, self._labels = family_cls, dict(labels)
        self._families = []  # a family must outlive its metrics: keep every one
        counter, gauge, histogram = family_cls.COUNTER, family_cls.GAUGE, family_cls.HISTOGRAM
        f = self._family
        self._requests = f("requests_total", "finished requests by adapter and outcome "
                           "(stop, length, abort, or the error code)", counter)
        self._prompt_tokens = f("prompt_tokens_total", "prompt tokens of finished requests, by adapter", counter)
        self._generation_tokens = f("generation_tokens_total", "generated tokens, by adapter", counter)
        self._ttft = f("time_to_first_token_seconds", "time to first token, by adapter", histogram)
        self._queue_time = f("request_queue_time_seconds", "time from a request's arrival to its first step: "
                             "loading its adapter, then waiting for a batch seat, KV blocks or an adapter slot",
                             histogram)
        self._prefill_time = f("request_prefill_time_seconds", "time from a request's first step to its first "
                               "token: its prompt's prefill", histogram)
        self._load_time = f("adapter_load_seconds", "time to load an adapter from disk into host memory: read, "
                            "checks, and its layout for the copy to the GPU", histogram)
        self._upload_time = f("adapter_upload_seconds", "time to copy an adapter from host memory into a GPU slot, "
                              "measured on the GPU; the copy runs beside decoding, on its own stream", histogram)
        self._eviction_time = f("adapter_eviction_seconds", "time to evict an adapter: from=gpu_slot frees its slot "
                                "(bookkeeping; the copy that replaces it is an upload), from=host_memory drops its "
                                "host copy", histogram)
        self._info = f("lora_requests_info", "running and waiting adapters (labels) and max_lora; "
                       "the current label set holds the time it became current, earlier ones 0", gauge)
        gauges = {
            "num_requests_running": "requests being generated",
            "num_requests_waiting": "requests waiting for a slot, KV blocks or an adapter slot",
            "kv_cache_usage_perc": "fraction of KV cache blocks in use (1 = full)",
            "adapter_holds": "adapter references held by unfinished requests",
            "resident_adapters": "adapters in GPU slots",
        }
        self._gauges = {key: f(key, text, gauge).Metric(labels=self._labels) for key, text in gauges.items()}
        self._pool = {key: f(name + "_total", text, counter).Metric(labels=self._labels)
                      for key, (name, text) in _POOL_COUNTERS.items()}
        self._pool_seen = dict.fromkeys(_POOL_COUNTERS, 0)
        self._queue_metric = self._queue_time.Metric(labels=self._labels, buckets=TTFT_BUCKETS)
        self._prefill_metric = self._prefill_time.Metric(labels=self._labels, buckets=TTFT_BUCKETS)
        self._event_metrics = {kind: getattr(self, attr).Metric(labels={**self._labels, **extra}, buckets=buckets)
                               for kind, (attr, extra, buckets) in _ADAPTER_EVENTS.items()}
        self._per_adapter: dict[tuple, object] = {}
        self._info_key: Optional[tuple] = None
        self._info_metrics: dict[tuple, object] = {}

    def _family(self, name: str, description: str, kind):
        family = self._family_cls(name=f"multilora:{name}", description=description, kind=kind)
        self._families.append(family)
        return family

    def _adapter_metric(self, family, adapter_name: Optional[str], buckets=None, **extra):
        labels = {**self._labels, "lora_name": adapter_name or BASE_MODEL_LABEL, **extra}
        key = (id(family), tuple(sorted(labels.items())))
        metric = self._per_adapter.get(key)
        if metric is None:
            kwargs = {"buckets": buckets} if buckets is not None else {}
            metric = self._per_adapter[key] = family.Metric(labels=labels, **kwargs)
        return metric

    # ---- events -----------------------------------------------------------------

    def record_finished(self, adapter_name: Optional[str], output, outcome: str):
        """A request's final output (a multilora RequestOutput) and how it ended."""
        self._adapter_metric(self._requests, adapter_name, outcome=outcome).increment(1)
        if output is None:      # refused before it reached the engine
            return
        generated = len(output.outputs[0].token_ids) if output.outputs else 0
        if output.prompt_token_ids:
            self._adapter_metric(self._prompt_tokens, adapter_name).increment(len(output.prompt_token_ids))
        if generated:
            self._adapter_metric(self._generation_tokens, adapter_name).increment(generated)
        m = output.metrics
        if m is not None and m.first_token_time is not None:
            ttft = max(0.0, m.first_token_time - m.arrival_time)
            self._adapter_metric(self._ttft, adapter_name, buckets=TTFT_BUCKETS).observe(ttft)
        if m is not None and m.time_in_queue is not None:
            self._queue_metric.observe(max(0.0, m.time_in_queue))
        if m is not None and m.time_in_prefill is not None:
            self._prefill_metric.observe(max(0.0, m.time_in_prefill))

    def record_adapter_event(self, event):
        """A multilora AdapterEvent: a timed load, upload or eviction."""
        self._event_metrics[event.kind].observe(event.seconds)

    def update(self, stats):
        """Gauges and pool counters from an EngineStats snapshot."""
        g = self._gauges
        g["num_requests_running"].set(stats.num_running)
        g["num_requests_waiting"].set(stats.num_waiting)
        g["kv_cache_usage_perc"].set(stats.kv_blocks_used / stats.kv_blocks_total if stats.kv_blocks_total else 0.0)
        g["adapter_holds"].set(stats.adapter_holds)
        g["resident_adapters"].set(len(stats.resident_adapters))
        for key, metric in self._pool.items():
            value = getattr(stats, key)
            if value > self._pool_seen[key]:  # Triton counters only go up: add what is new
                metric.increment(value - self._pool_seen[key])
                self._pool_seen[key] = value
        self._update_info(stats)

    def _update_info(self, stats):
        key = (",".join(sorted(set(stats.running_adapters))), ",".join(sorted(set(stats.waiting_adapters))),
               str(stats.max_loras))
        if key == self._info_key:
            return
        # As in vLLM, the current label set holds the time it became current. Triton
        # keeps a label set's sample for good once made, so earlier sets are reused
        # and set to 0: the one non-zero sample is the current one.
        if self._info_key is not None:
            self._info_metrics[self._info_key].set(0)
        metric = self._info_metrics.get(key)
        if metric is None:
            labels = dict(zip(("running_lora_adapters", "waiting_lora_adapters", "max_lora"), key))
            metric = self._info_metrics[key] = self._info.Metric(labels={**self._labels, **labels})
        metric.set(time.time())
        self._info_key = key

    def close(self):
        """Drop every metric before its family, as Triton's metric API requires."""
        self._info_metrics.clear()
        self._per_adapter.clear()
        self._gauges.clear()
        self._pool.clear()
        self._queue_metric = self._prefill_metric = None
        self._event_metrics.clear()
        self._families.clear()
