"""The Triton server target's engine figures, read from the server's Prometheus /metrics."""

import threading
import time

from prometheus_client.parser import text_string_to_metric_families

METRICS_POLL_S = 0.25


def metric_samples(text: str, name: str) -> list[tuple[dict, float]]:
    return [(s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == name]


def metric_sum(text: str, name: str) -> float:
    return sum(v for _, v in metric_samples(text, name))


_POOL = {"adapter_loads": "multilora:adapter_loads_total", "adapter_evictions": "multilora:adapter_evictions_total",
         "adapter_pool_hits": "multilora:adapter_pool_hits_total",
         "adapter_pool_misses": "multilora:adapter_pool_misses_total",
         "adapter_load_seconds_sum": "multilora:adapter_load_seconds_sum"}


class MetricsWatcher:
    """Polls /metrics: distinct running adapters (vLLM's lora_requests_info labels), waiting
    requests, and when the adapter-load counter moves (= the windows in which adapters loaded)."""

    def __init__(self, server):         # a serving_triton.TritonServer
        self._server = server
        self._stop = threading.Event()

    def begin(self) -> None:
        self._before = self._pool(self._server.metrics())
        self.samples, self._distinct, self.max_waiting, self.windows = 0, 0, 0, []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pool(self, text: str) -> dict:
        return {key: metric_sum(text, name) for key, name in _POOL.items()}

    def _run(self) -> None:
        loads, last_t = self._before["adapter_loads"], time.monotonic()
        while not self._stop.wait(METRICS_POLL_S):
            try:
                text = self._server.metrics()
            except OSError:
                continue
            now = time.monotonic()
            running = metric_sum(text, "multilora:num_requests_running")
            self.max_waiting = max(self.max_waiting, int(metric_sum(text, "multilora:num_requests_waiting")))
            current = [labels for labels, value in metric_samples(text, "multilora:lora_requests_info") if value > 0]
            if running and current:
                names = current[0].get("running_lora_adapters", "")
                self.samples += 1
                self._distinct += len([n for n in names.split(",") if n])
            new_loads = metric_sum(text, "multilora:adapter_loads_total")
            if new_loads > loads:
                self.windows.append((last_t, now))
            loads, last_t = new_loads, now

    def end(self) -> dict:
        self._stop.set()
        self._thread.join()
        after = self._pool(self._server.metrics())
        stats = {key: after[key] - self._before[key] for key in after}
        stats.update({key: int(v) for key, v in stats.items() if key != "adapter_load_seconds_sum"})
        stats.update(mean_distinct_adapters_per_step=self._distinct / self.samples if self.samples else None,
                     distinct_sampled_every_s=METRICS_POLL_S, steps_sampled=self.samples,
                     max_waiting=self.max_waiting)
        return {"stats": stats, "load_windows": self.windows}
