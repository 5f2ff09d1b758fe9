"""What concurrent adapter loads do beside a thread doing an engine step's host work, and how fast they load.

The engine's preparing threads load adapters (file read, checks, pinned host image) in the engine's
process. Each load holds the GIL for part of its time, so several at once compete with the engine
thread for it. This bench runs N loader threads (--loaders, e.g. 0,1,2,4) that load rank-16 PEFT
adapters at Llama-3-8B shapes in a loop, as the engine loads them (`load_adapter(..., bfloat16)`, then
the host image), one intra-op thread each as on a GPU, beside a thread doing a decode step's host work
(100 small torch ops and Python bookkeeping for 64 rows, the switch interval the engine sets), and
reports that thread's step time against its time alone and the loads finished. On a machine with fewer
cores than N + 1 the loaders also compete for cores. Why the engine loads one adapter at a time
(multilora.lora.adapter_pool.MAX_CONCURRENT_LOADS). `--workers W`: each run also once with the loads
read in W load worker processes (multilora.engine.load_workers, `adapter_load_workers`), the loader
threads only waiting for them and taking their images. Prints a table; writes $OUT/concurrent_loads.json.

    PYTHONPATH=$PWD/backend_src:<dir with multilora_kernels -> kernels> python bench/bench_concurrent_loads.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_adapter_load import intra_op_threads, slot_weights  # noqa: E402
from bench_engine import LLAMA3_8B, write_adapter  # noqa: E402

SWITCH_INTERVAL_S = 0.0002      # what AsyncLLMEngine sets


def host_step(x: torch.Tensor) -> int:
    """An engine step's host work in miniature: small torch ops, then Python over 64 rows."""
    for _ in range(100):
        x + 1
    rows = [{"id": i, "tokens": list(range(8))} for i in range(64)]
    return sum(len(r["tokens"]) for r in rows)


def measure(loaders: int, load_one, seconds: float) -> dict:
    stop, done = threading.Event(), [0]

    def loader(index: int) -> None:
        while not stop.is_set():
            load_one(index)
            done[0] += 1

    threads = [threading.Thread(target=loader, args=(i,), daemon=True) for i in range(loaders)]
    for t in threads:
        t.start()
    time.sleep(0.3)                     # the loaders under way
    x, steps, loads_before = torch.randn(64, 64), 0, done[0]
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        host_step(x)
        steps += 1
    wall = time.perf_counter() - start
    loads = done[0] - loads_before
    stop.set()
    for t in threads:
        t.join()
    return {"loaders": loaders, "step_ms": wall / steps * 1e3, "loads": loads, "loads_per_s": loads / wall}


def worker_rows(args, counts: list[int], requests, slots) -> list[dict]:
    """The runs of `counts` loader threads whose loads run in `args.workers` load worker processes."""
    from transformers import LlamaConfig

    from multilora.engine.load_workers import AdapterLoadWorkers

    workers = AdapterLoadWorkers(LlamaConfig(**LLAMA3_8B), torch.bfloat16, args.rank, args.workers,
                                 (slots.header_bytes, slots.row_bytes))
    try:
        def load_one(index: int) -> None:
            slots.adopt_image(*workers.load(requests[index]))

        load_one(0)                             # the workers started and warm
        return [{**measure(n, load_one, args.seconds), "workers": args.workers} for n in counts]
    finally:
        workers.shutdown()


def main(argv=None) -> list[dict]:
    from transformers import LlamaConfig

    from multilora.lora.adapter import LoRAModelSpec, load_adapter
    from multilora.lora.request import LoRARequest

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loaders", default="0,1,2,4", help="loader threads beside the step thread, one run each")
    p.add_argument("--seconds", type=float, default=3.0, help="each run's measured time")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--workers", type=int, default=0, help="also load through this many load worker processes")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args(argv)
    counts = [int(n) for n in args.loaders.split(",")]
    original = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        with tempfile.TemporaryDirectory() as work, intra_op_threads(1):   # one each, as on a GPU
            spec = LoRAModelSpec.from_hf_config(LlamaConfig(**LLAMA3_8B))
            slots = slot_weights(LLAMA3_8B, args.rank)
            requests = []
            for i in range(max(counts + [1])):  # one adapter per loader: no two threads read one file
                directory = Path(work) / f"adapter{i}"
                write_adapter(directory, LLAMA3_8B, args.rank, seed=i)
                requests.append(LoRARequest(f"adapter{i}", i + 1, str(directory)))

            def load_one(index: int) -> None:
                slots.host_image(load_adapter(requests[index], spec, args.rank, dtype=torch.bfloat16))

            load_one(0)                         # imports and one-time caches outside the timing
            rows = [{**measure(n, load_one, args.seconds), "workers": 0} for n in counts]
            if args.workers:
                rows += worker_rows(args, [n for n in counts if n], requests, slots)
    finally:
        sys.setswitchinterval(original)
    alone = next((r["step_ms"] for r in rows if r["loaders"] == 0), None)
    for r in rows:
        r["step_over_alone"] = r["step_ms"] / alone if alone else None
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "concurrent_loads.json").write_text(json.dumps(
        {"cpus": os.cpu_count(), "rank": args.rank, "seconds": args.seconds, "rows": rows}, indent=1))
    print(f"rank-{args.rank} adapters at Llama-3-8B shapes, {os.cpu_count()} CPUs, {args.seconds:.0f} s a row")
    print(f"{'loaders':>7} {'workers':>7} {'host step ms':>12} {'x alone':>8} {'loads':>6} {'loads/s':>8}")
    for r in rows:
        ratio = f"{r['step_over_alone']:.2f}" if r["step_over_alone"] else "-"
        print(f"{r['loaders']:>7} {r['workers']:>7} {r['step_ms']:>12.2f} {ratio:>8} {r['loads']:>6} "
              f"{r['loads_per_s']:>8.1f}")
    return rows


if __name__ == "__main__":
    main()
