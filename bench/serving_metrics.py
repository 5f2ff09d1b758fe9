"""The Triton server target's engine figures, read from the server's Prometheus /metrics."""

import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from serving_report import step_stats

METRICS_POLL_S = 0.25


def metric_samples(text: str, name: str) -> list[tuple[dict, float]]:
    return [(s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name]


def metric_sum(text: str, name: str) -> float:
    return sum(v for _, v in metric_samples(text, name))


_POOL = {"adapter_loads": "multilora:adapter_loads_total", "adapter_uploads": "multilora:adapter_upload_seconds_count",
         "adapter_prefetches": "multilora:adapter_prefetches_total",
         "adapter_evictions": "multilora:adapter_evictions_total",
         "adapter_host_evictions": "multilora:adapter_host_evictions_total",
         "adapter_pool_hits": "multilora:adapter_pool_hits_total",
         "adapter_pool_misses": "multilora:adapter_pool_misses_total",
         "steps": "multilora:engine_steps_total", "step_adapters": "multilora:step_adapters_total",
         "prefill_steps": "multilora:prefill_steps_total", "prefill_tokens": "multilora:prefill_tokens_total"}
# The histograms the report summarizes: key -> (name, labels).
_HISTOGRAMS = {"load": ("multilora:adapter_load_seconds", {}), "upload": ("multilora:adapter_upload_seconds", {}),
               "gpu_eviction": ("multilora:adapter_eviction_seconds", {"from": "gpu_slot"}),
               "host_eviction": ("multilora:adapter_eviction_seconds", {"from": "host_memory"}),
               "queue_wait": ("multilora:request_queue_time_seconds", {})}


def histogram(text: str, name: str, labels: dict) -> dict:
    """{"count", "sum", "buckets": {upper bound: cumulative count}} of one histogram, summed over other labels."""
    out = {"count": 0.0, "sum": 0.0, "buckets": {}}
    for sample_labels, value in metric_samples(text, name + "_bucket"):
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            le = float(sample_labels["le"])
            out["buckets"][le] = out["buckets"].get(le, 0.0) + value
    for key in ("count", "sum"):
        out[key] = sum(v for sl, v in metric_samples(text, f"{name}_{key}")
                       if all(sl.get(k) == v2 for k, v2 in labels.items()))
    return out


def histogram_dist(before: dict, after: dict) -> dict:
    """What was observed between two readings: count, sum, mean, and p50/p99/max as the upper bound
    of the bucket they fall in (a histogram keeps no more)."""
    count, total = after["count"] - before["count"], after["sum"] - before["sum"]
    cumulative = sorted((le, n - before["buckets"].get(le, 0.0)) for le, n in after["buckets"].items())
    bound = lambda q: next((le for le, n in cumulative if n >= q * count), None) if count else None
    return {"count": int(count), "sum": total, "mean": total / count if count else None, "p50": bound(0.5),
            "p99": bound(0.99), "max": bound(1.0), "from_buckets": True}


class MetricsWatcher:
    """Reads /metrics at the start and end of a run (pool counters, engine steps and the adapters they
    batched, timing histograms) and polls it in between: waiting requests, and when the adapter-load
    counter moves (= the windows in which adapters loaded)."""

    def __init__(self, server):         # a serving_triton.TritonServer
        self._server = server
        self._stop = threading.Event()

    def begin(self) -> None:
        text = self._server.metrics()
        self._before, self._before_histograms = self._pool(text), self._histograms(text)
        self.max_waiting, self.windows = 0, []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pool(self, text: str) -> dict:
        return {key: metric_sum(text, name) for key, name in _POOL.items()}

    def _histograms(self, text: str) -> dict:
        return {key: histogram(text, name, labels) for key, (name, labels) in _HISTOGRAMS.items()}

    def _run(self) -> None:
        loads, last_t = self._before["adapter_loads"], time.monotonic()
        while not self._stop.wait(METRICS_POLL_S):
            try:
                text = self._server.metrics()
            except OSError:
                continue
            now = time.monotonic()
            self.max_waiting = max(self.max_waiting, int(metric_sum(text, "multilora:num_requests_waiting")))
            new_loads = metric_sum(text, "multilora:adapter_loads_total")
            if new_loads > loads:
                self.windows.append((last_t, now))
            loads, last_t = new_loads, now

    def end(self) -> dict:
        self._stop.set()
        self._thread.join()
        text = self._server.metrics()
        after, histograms = self._pool(text), self._histograms(text)
        stats = {key: int(after[key] - self._before[key]) for key in after}
        timings = {key: histogram_dist(self._before_histograms[key], h) for key, h in histograms.items()}
        stats.update(**step_stats(stats), queue_wait_s=timings.pop("queue_wait"),
                     adapter_timings_s={k: v for k, v in timings.items() if v["count"]},
                     max_waiting=self.max_waiting)
        return {"stats": stats, "load_windows": self.windows}
