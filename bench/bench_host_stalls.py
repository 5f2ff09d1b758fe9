"""What stalls an engine-like thread on the host: pinning, each phase of an adapter load, a full
garbage collection.

The engine thread launches each step and waits for it; whatever holds the GIL or a driver lock in
the meantime lengthens that step for every stream. Beside an engine-like thread (a CUDA graph of ~6
ms of matmuls and a little host Python per step on a GPU; a 4 ms sleep on a CPU), this times, and
reports the longest step that ended inside:

- `pin`: a fresh page-locked 84 MiB block (the size of a rank-16 Llama-3-8B host image), GPU only;
- per rank (--ranks), for --reps adapters at Llama-3-8B shapes: `load` (`load_adapter`: read and
  checks), `image` (its host image: fresh in the first round, from torch's pinned cache in the
  second, after the first round's were freed), `free` (dropping adapter and image);
- `collect`: a full `gc.collect()` before and after `frozen_heap.freeze_start_up_heap()`.

Pinned memory as the engine pins it (`--pinning registered`, engine/pinned_memory.py) or through
cudaHostAlloc (`--pinning driver`, torch's default); one mode per process. Prints a table last and
writes $OUT/host_stalls_<pinning>.json (--out). About a minute on a GPU.

    PYTHONPATH=$PWD/backend_src:<dir with multilora_kernels -> kernels> python bench/bench_host_stalls.py
    ... python bench/bench_host_stalls.py --pinning driver        # the same with torch's default pinning
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_adapter_load import EngineLikeThread, cuda_graph_step, slot_weights  # noqa: E402
from bench_engine import LLAMA3_8B, write_adapter  # noqa: E402

_IMAGE_BYTES = 84 << 20
_LATE_S = 0.012        # a step that ends this soon after a phase still waited on it


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pinning", choices=("registered", "driver"), default="registered")
    p.add_argument("--ranks", default="64,16", help="adapter ranks, comma-separated")
    p.add_argument("--reps", type=int, default=3, help="adapters per rank")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    return p.parse_args(argv)


class Phases:
    """Times phases beside the engine-like thread; each row: name, median ms, longest step inside."""

    def __init__(self, engine: EngineLikeThread):
        self.engine, self.spans = engine, {}

    def time(self, name: str, fn):
        start = time.perf_counter()
        result = fn()
        self.spans.setdefault(name, []).append((start, time.perf_counter()))
        time.sleep(0.05)                  # steps of their own between phases
        return result

    def rows(self) -> list[dict]:
        rows = []
        for name, spans in self.spans.items():
            inside = [d for s, e in spans for end, d in self.engine.steps if s <= end <= e + _LATE_S]
            rows.append({"phase": name, "ms": 1e3 * statistics.median(e - s for s, e in spans),
                         "step_max_ms": 1e3 * max(inside, default=0.0)})
        return rows


def _adapters(ranks: list[int], reps: int, directory: Path):
    from transformers import LlamaConfig

    from multilora.lora.adapter import LoRAModelSpec
    from multilora.lora.request import LoRARequest

    spec = LoRAModelSpec.from_hf_config(LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k != "architectures"}))
    requests = []
    for rank in ranks:
        for i in range(reps):
            path = directory / f"r{rank}-{i}"
            write_adapter(path, LLAMA3_8B, rank, seed=100 * rank + i)
            requests.append((rank, LoRARequest(path.name, len(requests) + 1, str(path))))
    return spec, requests


def measure(args) -> dict:
    from multilora.engine.frozen_heap import freeze_start_up_heap, unfreeze_heap
    from multilora.engine.pinned_memory import register_pinned_pages
    from multilora.lora.adapter import load_adapter

    on_gpu = torch.cuda.is_available()
    torch.set_num_threads(1)              # as the engine's preparing threads on a GPU
    if on_gpu and args.pinning == "registered":
        register_pinned_pages()
    ranks = [int(r) for r in args.ranks.split(",")]
    spec, requests = _adapters(ranks, args.reps, Path(tempfile.mkdtemp(prefix="host_stalls-")))
    print(f"{len(requests)} adapters written (ranks {args.ranks}); pinning {args.pinning}", flush=True)
    slots = slot_weights(LLAMA3_8B, max(ranks), "cuda" if on_gpu else "meta")
    engine = EngineLikeThread(cuda_graph_step() if on_gpu else (lambda: time.sleep(0.004), lambda: None))
    engine.start()
    time.sleep(0.5)
    engine.alone_ms = engine.median_step_ms()
    phases = Phases(engine)
    # Kept to the end, so that no image below takes one of these blocks from torch's pinned cache.
    pinned = [phases.time("pin", lambda: torch.empty(_IMAGE_BYTES, dtype=torch.uint8, pin_memory=True))
              for _ in range(args.reps if on_gpu else 0)]
    # First round: every image a fresh page-locked block (all kept, as a host cache keeps them), then
    # freed one by one; second round: each image from torch's pinned cache, freed at once.
    for images in ("fresh", "cached"):
        kept = []
        for rank, request in requests:
            held = [phases.time(f"r{rank} load", lambda: load_adapter(request, spec, max(ranks), dtype=torch.bfloat16))]
            if on_gpu:
                held.append(phases.time(f"r{rank} image {images}", lambda: slots.host_image(held[0])))
            kept.append((rank, held))
            if images == "cached":
                phases.time(f"r{rank} free", kept.pop()[1].clear)
        for rank, held in kept:
            phases.time(f"r{rank} free", held.clear)
        print(f"  loads with {images} images done", flush=True)
    for _ in range(3):
        phases.time("collect", gc.collect)
    freeze_start_up_heap()
    for _ in range(3):
        phases.time("collect after freeze", gc.collect)
    unfreeze_heap()
    engine.stop()
    del pinned
    return {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "pinning": args.pinning,
            "step_alone_ms": engine.alone_ms, "rows": phases.rows()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = measure(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"host_stalls_{args.pinning}.json").write_text(json.dumps(report, indent=1))
    print(f"{report['device']}, pinning {report['pinning']}, engine-like step alone {report['step_alone_ms']:.2f} ms")
    print(f"{'phase':<24} {'ms (median)':>12} {'longest step inside, ms':>24}")
    for row in report["rows"]:
        print(f"{row['phase']:<24} {row['ms']:>12.1f} {row['step_max_ms']:>24.1f}")
    return report


if __name__ == "__main__":
    main()
