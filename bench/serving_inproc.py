"""The in-process target: multilora's AsyncLLMEngine, through its public streaming API (`generate`)."""

import asyncio
import threading
import time
import uuid
from pathlib import Path

from serving_device import thread_cpu_seconds
from serving_driver import drive
from serving_report import RequestRecord, step_stats, timing_dists
from serving_workload import BenchRequest, adapter_name

# How often the step sampler looks for a new EngineStats snapshot (the engine thread replaces
# it once per loop turn): well under a GPU decode step, and cheap enough not to slow the loop.
STATS_POLL_S = 0.002


class InprocTarget:
    name = "inproc"

    def __init__(self, model_dir: Path, adapter_root: Path, engine_args: dict):
        from multilora import AsyncLLMEngine, EngineConfig

        self._root = adapter_root
        self._lock = threading.Lock()
        self._events: list[tuple[str, float, float]] = []    # (kind, seconds, monotonic time reported)
        self.engine = AsyncLLMEngine(EngineConfig(model=str(model_dir), **engine_args),
                                     on_adapter_event=self._adapter_event)
        self._sampler = _StepSampler(self.engine)

    def _adapter_event(self, event) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append((event.kind, event.seconds, now))

    def lora_request(self, adapter_index):
        from multilora import LoRARequest

        if adapter_index is None:
            return None
        name = adapter_name(adapter_index)
        return LoRARequest(name, adapter_index + 1, str(self._root / name))

    async def run(self, req: BenchRequest, record: RequestRecord) -> None:
        from multilora import SamplingParams
        from multilora.errors import MultiLoRAError

        params = SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
        try:
            async for out in self.engine.generate(f"r{req.index}-{uuid.uuid4().hex[:8]}", req.prompt_ids, params,
                                                  self.lora_request(req.adapter_index)):
                record.on_tokens(time.monotonic(), len(out.outputs[0].delta_token_ids))
                m = out.metrics
                if out.finished and m is not None and m.first_scheduled_time is not None:
                    record.arrival_t, record.queue_s, record.prefill_s = m.arrival_time, m.time_in_queue, m.time_in_prefill
                    record.service_s = m.finished_time - m.first_scheduled_time
        except MultiLoRAError as error:
            record.error = f"{type(error).__name__}: {error}"
        record.end_s = time.monotonic()

    def load(self, requests: list[BenchRequest], concurrency, progress) -> tuple[list[RequestRecord], dict]:
        return asyncio.run(drive(requests, concurrency, self.run, time.monotonic(), progress)), {}

    # ---- measurements ----------------------------------------------------------------
    def begin(self) -> None:
        self._before = _counters(self.engine.stats())
        self._cpu_before, self._began = thread_cpu_seconds(), time.monotonic()
        with self._lock:
            self._events.clear()
        self._sampler.start()

    def end(self) -> dict:
        self._sampler.stop()
        after = _counters(self._idle_stats())
        with self._lock:
            events = list(self._events)
        delta = {key: after[key] - self._before[key] for key in after}
        cpu = thread_cpu_seconds()
        delta["thread_cpu_s"] = {name: round(sec - self._cpu_before.get(name, 0.0), 3) for name, sec in cpu.items()}
        delta["wall_s"] = round(time.monotonic() - self._began, 3)
        delta.update(**step_stats(delta), adapter_timings_s=timing_dists([(k, s) for k, s, _ in events]),
                     mean_running_per_step=self._sampler.mean_running, max_waiting=self._sampler.max_waiting)
        # Cold windows: an adapter read from disk, or copied to the GPU (reported when the device
        # finished it, so the window ends up to a step late).
        windows = [(t - s, t) for k, s, t in events if k in ("load", "upload")]
        return {"stats": delta, "load_windows": windows}

    def _idle_stats(self, timeout_s: float = 5.0):
        """The engine's snapshot once it has seen its last request finish (it refreshes it going idle)."""
        deadline = time.monotonic() + timeout_s
        stats = self.engine.stats()
        while (stats.num_running or stats.num_waiting) and time.monotonic() < deadline:
            time.sleep(STATS_POLL_S)
            stats = self.engine.stats()
        return stats

    def close(self) -> None:
        self.engine.shutdown()


def _counters(stats) -> dict:
    return {"adapter_loads": stats.adapter_loads, "adapter_uploads": stats.adapter_uploads,
            "adapter_prefetches": stats.adapter_prefetches, "adapter_evictions": stats.adapter_evictions,
            "adapter_host_evictions": stats.adapter_host_evictions, "adapter_pool_hits": stats.adapter_pool_hits,
            "adapter_pool_misses": stats.adapter_pool_misses, "preemptions": stats.num_preemptions,
            "steps": stats.num_steps, "step_adapters": stats.num_step_adapters,
            "prefill_steps": stats.num_prefill_steps, "prefill_tokens": stats.num_prefill_tokens}


class _StepSampler:
    """Running and waiting requests, once per EngineStats snapshot the engine thread publishes (once
    per loop turn, or every few tens of ms where the engine rate-limits its snapshots): the mean
    running and the most waiting seen (a snapshot may miss a short peak)."""

    def __init__(self, engine):
        self._engine = engine
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        self.samples, self._running, self.max_waiting = 0, 0, 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="bench-step-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = None
        while not self._stop.wait(STATS_POLL_S):
            stats = self._engine.stats()
            if stats is last or stats.num_running == 0:
                continue
            last = stats
            self.samples += 1
            self._running += stats.num_running
            self.max_waiting = max(self.max_waiting, stats.num_waiting)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean_running(self):
        return self._running / self.samples if self.samples else None
