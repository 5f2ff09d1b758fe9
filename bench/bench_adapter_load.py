"""How long loading one adapter takes beside busy threads, and what it does to an engine-like thread.

An adapter load (file read, checks, host image) runs on a preparing thread while the engine and
output threads keep the interpreter and the cores busy. Two costs meet there: every torch call of the
load releases the GIL and may wait up to the switch interval to get it back, and each torch op on
large tensors starts a team of intra-op threads as wide as the machine that waits for its slowest
member to be scheduled beside the busy threads. Llama-3-8B shapes, one rank-16 PEFT adapter in bf16
(84 MB), loaded as the engine loads it (`load_adapter(..., dtype=bfloat16)`), then its host image
built (`ModelRunner.stage_adapter`: pinned on a GPU), idle and beside busy threads, for each switch
interval (--intervals), each count of the loading thread's intra-op threads (--threads; the
engine's preparing threads use 1 on a GPU), and host images from torch's pinned cache (each rep's
image freed before the next) or fresh (kept, so each is a new page-locked allocation, as in a
server whose host cache holds up to max_cpu_loras adapters; --images):

- `--beside python` (the default on a CPU): one thread spinning in pure Python;
- `--beside engine` (the default on a GPU): that thread and one replaying a CUDA graph of ~6 ms of
  matmuls with ~0.5 ms of host Python per step, like the engine thread; its median step interval
  while loads run is reported beside its step alone.

Prints a table last; writes $OUT/adapter_load.json (--out). A minute.

    PYTHONPATH=$PWD/backend_src:<dir with multilora_kernels -> kernels> python bench/bench_adapter_load.py
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import LLAMA3_8B, write_adapter  # noqa: E402


def _spin(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(2000))      # pure Python: holds the GIL until the interpreter makes it switch


class EngineLikeThread:
    """Launches a step, runs ~0.5 ms of host Python while it runs, then waits for it, like the engine
    thread; records when each step ended and how long it took. `step`: (launch, wait), by default
    `cuda_graph_step()`."""

    def __init__(self, step=None):
        self._launch, self._wait = step or cuda_graph_step()
        self.steps: list[tuple[float, float]] = []     # (end, interval) in perf_counter seconds
        self.alone_ms: float | None = None             # its median step before any load
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-like")

    def _run(self) -> None:
        last = time.perf_counter()
        while not self._stop.is_set():
            self._launch()
            sum(range(20000))
            self._wait()
            now = time.perf_counter()
            self.steps.append((now, now - last))
            last = now

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def median_step_ms(self, spans: list[tuple[float, float]] | None = None) -> float | None:
        """Median interval of the steps that ended inside one of `spans`; without spans, of every step so far
        but the first few (called before any load: its step alone)."""
        steps = [d for end, d in (self.steps[5:] if spans is None else self.steps)
                 if spans is None or any(s <= end <= e for s, e in spans)]
        return 1e3 * statistics.median(steps) if steps else None


def cuda_graph_step():
    """(launch, wait) of a ~6 ms step on the GPU: a CUDA graph of 64-row matmuls at Llama-3-8B's MLP
    width, and a wait for the stream."""
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 14336, device="cuda", dtype=torch.bfloat16)
    x @ w                                   # cuBLAS initialised before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(200):
            x @ w

    return graph.replay, torch.cuda.current_stream().synchronize


@contextlib.contextmanager
def busy_threads(beside: str | None):
    """None: nothing beside the loads; "python" or "engine" (see the module's docstring)."""
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,)) if beside else None
    engine = EngineLikeThread() if beside == "engine" else None
    for t in (spinner, engine):
        if t is not None:
            t.start()
    if engine is not None:
        time.sleep(0.5)
        engine.alone_ms = engine.median_step_ms()      # before any load
    try:
        yield engine
    finally:
        stop.set()
        if spinner is not None:
            spinner.join()
        if engine is not None:
            engine.stop()


def slot_weights(config: dict, max_rank: int, device: str = "meta"):
    """The AdapterSlotWeights (one slot) of the model of `config`, laid out as the tensor-parallel runner
    cuts adapters; the model itself as shapes only (meta device). On "cuda" the slot lives on the
    GPU, so host images are pinned as the engine's are."""
    from transformers import LlamaConfig

    from multilora.lora.adapter_slot_weights import AdapterSlotWeights
    from multilora.model.loader import build_skeleton

    model = build_skeleton(LlamaConfig(**config), torch.bfloat16, torch.device("meta"))
    if device == "meta":
        return model.enable_lora(1, max_rank)
    return AdapterSlotWeights(model.lora_layers(), 1, max_rank, torch.bfloat16, torch.device(device))


@contextlib.contextmanager
def intra_op_threads(n: int):
    """The calling thread's torch intra-op threads for the block (0: leave torch's setting)."""
    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def main(argv=None) -> dict:
    from transformers import LlamaConfig

    from multilora.lora.adapter import LoRAModelSpec, load_adapter
    from multilora.lora.request import LoRARequest

    on_gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", default="0.0002", help="switch intervals in seconds (the engine sets 0.0002)")
    parser.add_argument("--threads", default="0,1", help="the loading thread's intra-op threads (0: torch's default)")
    parser.add_argument("--beside", choices=["python", "engine"], default="engine" if on_gpu else "python")
    parser.add_argument("--images", default="cached,fresh", help="cached: each image freed before the next; fresh: kept")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    if args.beside == "engine" and not on_gpu:
        parser.error("--beside engine needs a CUDA GPU")
    with tempfile.TemporaryDirectory() as work:
        directory = Path(work) / "adapter"
        write_adapter(directory, LLAMA3_8B, args.rank, seed=0)
        spec = LoRAModelSpec.from_hf_config(LlamaConfig(**LLAMA3_8B))
        request = LoRARequest("adapter", 1, str(directory))
        slots = slot_weights(LLAMA3_8B, args.rank, "cuda" if on_gpu else "meta")
        original = sys.getswitchinterval()
        rows = []
        try:
            for interval in (float(x) for x in args.intervals.split(",")):
                sys.setswitchinterval(interval)
                for threads, images, beside in itertools.product(
                        [int(x) for x in args.threads.split(",")], args.images.split(","), (None, args.beside)):
                    with busy_threads(beside) as engine, intra_op_threads(threads):
                        times, image_times, spans, kept = [], [], [], []
                        for _ in range(args.reps):
                            start = time.perf_counter()
                            adapter = load_adapter(request, spec, args.rank, dtype=torch.bfloat16)
                            loaded = time.perf_counter()
                            slots.host_image(adapter)
                            end = time.perf_counter()
                            times.append(loaded - start)
                            image_times.append(end - loaded)
                            spans.append((start, end))
                            if images == "fresh":
                                kept.append(adapter)
                            del adapter     # unless kept, its host image goes (back to torch's pinned cache)
                            time.sleep(0.03)
                        kept.clear()
                    rows.append({
                        "switch_interval_s": interval, "intra_op_threads": threads or torch.get_num_threads(),
                        "images": images, "beside": beside or "nothing",
                        "median_ms": 1e3 * statistics.median(times), "max_ms": 1e3 * max(times),
                        "image_median_ms": 1e3 * statistics.median(image_times),
                        "image_max_ms": 1e3 * max(image_times),
                        "engine_step_alone_ms": engine.alone_ms if engine else None,
                        "engine_step_during_loads_ms": engine.median_step_ms(spans) if engine else None,
                    })
        finally:
            sys.setswitchinterval(original)
    report = {"rank": args.rank, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "device": torch.cuda.get_device_name() if on_gpu else "cpu", "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_load.json").write_text(json.dumps(report, indent=2))
    print(f"\nrank-{args.rank} adapter at Llama-3-8B shapes; {report['device']}, {report['cpus']} CPUs, "
          f"torch's default {report['torch_threads']} intra-op threads")
    print(f"{'':>38} {'load_adapter':>19} {'host image':>19} {'engine-like step ms':>21}")
    print(f"{'interval':>8} {'threads':>7} {'images':>6} {'beside':>14} {'median ms':>10} {'max ms':>8} "
          f"{'median ms':>10} {'max ms':>8} {'alone':>10} {'loading':>10}")
    for r in rows:
        alone, during = (f"{v:.2f}" if v is not None else "-"
                         for v in (r["engine_step_alone_ms"], r["engine_step_during_loads_ms"]))
        print(f"{r['switch_interval_s'] * 1e3:>5.1f} ms {r['intra_op_threads']:>7} {r['images']:>6} {r['beside']:>14} "
              f"{r['median_ms']:>10.0f} {r['max_ms']:>8.0f} {r['image_median_ms']:>10.0f} "
              f"{r['image_max_ms']:>8.0f} {alone:>10} {during:>10}")
    return report


if __name__ == "__main__":
    main()
