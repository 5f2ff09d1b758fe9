"""The in-process target: multilora's AsyncLLMEngine, through its public streaming API (`generate`)."""

import asyncio
import threading
import time
import uuid
from pathlib import Path

from serving_driver import drive
from serving_report import RequestRecord
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
        self._load_windows: list[tuple[float, float]] = []
        self.engine = AsyncLLMEngine(EngineConfig(model=str(model_dir), **engine_args),
                                     on_adapter_loaded=self._loaded)
        self._sampler = _StepSampler(self.engine)

    def _loaded(self, name: str, seconds: float) -> None:
        now = time.monotonic()
        with self._lock:
            self._load_windows.append((now - seconds, now))

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
        except MultiLoRAError as error:
            record.error = f"{type(error).__name__}: {error}"
        record.end_s = time.monotonic()

    def load(self, requests: list[BenchRequest], concurrency, progress) -> tuple[list[RequestRecord], dict]:
        return asyncio.run(drive(requests, concurrency, self.run, time.monotonic(), progress)), {}

    # ---- measurements ----------------------------------------------------------------
    def begin(self) -> None:
        self._before = _counters(self.engine.stats())
        with self._lock:
            self._load_windows.clear()
        self._sampler.start()

    def end(self) -> dict:
        self._sampler.stop()
        after = _counters(self.engine.stats())
        with self._lock:
            windows = list(self._load_windows)
        delta = {key: after[key] - self._before[key] for key in after}
        delta.update(adapter_load_seconds_sum=sum(b - a for a, b in windows),
                     adapter_load_seconds_max=max((b - a for a, b in windows), default=0.0),
                     mean_distinct_adapters_per_step=self._sampler.mean_distinct,
                     mean_running_per_step=self._sampler.mean_running, steps_sampled=self._sampler.samples,
                     max_waiting=self._sampler.max_waiting)
        return {"stats": delta, "load_windows": windows}

    def close(self) -> None:
        self.engine.shutdown()


def _counters(stats) -> dict:
    return {"adapter_loads": stats.adapter_loads, "adapter_evictions": stats.adapter_evictions,
            "adapter_pool_hits": stats.adapter_pool_hits, "adapter_pool_misses": stats.adapter_pool_misses,
            "preemptions": stats.num_preemptions}


class _StepSampler:
    """Counts distinct running adapters once per EngineStats snapshot the engine thread publishes
    (once per loop turn, or every few tens of ms where the engine rate-limits its snapshots): the
    mean over snapshots taken while requests run estimates the mean over steps, unbiased as long
    as snapshot times do not depend on the adapter mix."""

    def __init__(self, engine):
        self._engine = engine
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        self.samples, self._distinct, self._running, self.max_waiting = 0, 0, 0, 0
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
            self._distinct += len(stats.running_adapters)
            self._running += stats.num_running
            self.max_waiting = max(self.max_waiting, stats.num_waiting)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean_distinct(self):
        return self._distinct / self.samples if self.samples else None

    @property
    def mean_running(self):
        return self._running / self.samples if self.samples else None
