"""How long loading one adapter takes beside a busy Python thread, at several GIL switch intervals.

An adapter load (file read, checks, host image) runs on a preparing thread while the engine and
output threads run Python: every torch call of the load releases the GIL and may wait up to the
switch interval to get it back. Llama-3-8B shapes, one rank-16 PEFT adapter in bf16 (84 MB), loaded
as the engine loads it (`load_adapter(..., dtype=bfloat16)`), then its host image built (what
`ModelRunner.stage_adapter` does, by an AdapterSlotWeights laid out as the model's), idle and beside
one thread spinning in pure Python. Prints a table last; writes $OUT/adapter_load.json (--out).
CPU only, a minute.

    PYTHONPATH=$PWD/backend_src:<dir with multilora_kernels -> kernels> python bench/bench_adapter_load.py
"""

from __future__ import annotations

import argparse
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


def slot_weights(config: dict, max_rank: int):
    """The AdapterSlotWeights (one slot) of the model of `config` as shapes only (meta device), as the
    tensor-parallel runner cuts adapters: the host image needs the layout, not the model."""
    from transformers import LlamaConfig

    from multilora.model.loader import build_skeleton

    model = build_skeleton(LlamaConfig(**config), torch.bfloat16, torch.device("meta"))
    return model.enable_lora(1, max_rank)


def main(argv=None) -> dict:
    from transformers import LlamaConfig

    from multilora.lora.adapter import LoRAModelSpec, load_adapter
    from multilora.lora.request import LoRARequest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", default="0.005,0.001,0.0002", help="switch intervals in seconds")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        directory = Path(work) / "adapter"
        write_adapter(directory, LLAMA3_8B, args.rank, seed=0)
        spec = LoRAModelSpec.from_hf_config(LlamaConfig(**LLAMA3_8B))
        request = LoRARequest("adapter", 1, str(directory))
        slots = slot_weights(LLAMA3_8B, args.rank)
        original = sys.getswitchinterval()
        rows = []
        try:
            for interval in (float(x) for x in args.intervals.split(",")):
                sys.setswitchinterval(interval)
                for busy in (False, True):
                    stop = threading.Event()
                    spinner = threading.Thread(target=_spin, args=(stop,)) if busy else None
                    if spinner:
                        spinner.start()
                    times, image_times = [], []
                    for _ in range(args.reps):
                        start = time.perf_counter()
                        adapter = load_adapter(request, spec, args.rank, dtype=torch.bfloat16)
                        loaded = time.perf_counter()
                        slots.host_image(adapter)
                        times.append(loaded - start)
                        image_times.append(time.perf_counter() - loaded)
                    stop.set()
                    if spinner:
                        spinner.join()
                    rows.append({"switch_interval_s": interval, "busy_thread": busy,
                                 "median_ms": 1e3 * statistics.median(times), "max_ms": 1e3 * max(times),
                                 "image_median_ms": 1e3 * statistics.median(image_times),
                                 "image_max_ms": 1e3 * max(image_times)})
        finally:
            sys.setswitchinterval(original)
    report = {"rank": args.rank, "torch_threads": torch.get_num_threads(), "rows": rows,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_load.json").write_text(json.dumps(report, indent=2))
    print(f"\nrank-{args.rank} adapter at Llama-3-8B shapes, {report['torch_threads']} torch threads")
    print(f"{'':>29} {'load_adapter':>19} {'host image':>19}")
    print(f"{'switch interval':>16} {'beside':>12} {'median ms':>10} {'max ms':>8} {'median ms':>10} {'max ms':>8}")
    for r in rows:
        print(f"{r['switch_interval_s'] * 1e3:>13.1f} ms {'busy thread' if r['busy_thread'] else 'nothing':>12} "
              f"{r['median_ms']:>10.0f} {r['max_ms']:>8.0f} {r['image_median_ms']:>10.0f} {r['image_max_ms']:>8.0f}")
    return report


if __name__ == "__main__":
    main()
