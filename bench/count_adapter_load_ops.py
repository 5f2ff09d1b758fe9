"""How many aten ops one adapter load makes, and one host image build: each is one more GIL wait.

An adapter load runs on a preparing thread beside the engine's threads, and every torch call
releases the GIL and waits up to the switch interval to get it back, so the load's time beside
busy threads follows its number of torch calls. Llama-3-8B shapes, one rank-16 bf16 adapter,
loaded as the engine loads it (`load_adapter(..., dtype=bfloat16)`), then its host image built
by an AdapterSlotWeights laid out as the model's (bench_adapter_load.slot_weights). Counts
aten ops with torch.profiler: all of them (nested ones too) and those called from Python.

    PYTHONPATH=$PWD/backend_src:<dir with multilora_kernels -> kernels> python bench/count_adapter_load_ops.py
"""

from __future__ import annotations

import collections
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_adapter_load import slot_weights  # noqa: E402
from bench_engine import LLAMA3_8B, write_adapter  # noqa: E402


class TopLevelOps(TorchDispatchMode):
    """Counts the ops that reach the dispatcher from Python (an op's own sub-ops are not seen)."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _count(fn) -> tuple[int, int, list]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    aten = collections.Counter(e.name for e in prof.events() if e.name.startswith("aten::"))
    top = TopLevelOps()
    with top:
        fn()
    return sum(aten.values()), sum(top.ops.values()), aten.most_common(12)


def main() -> None:
    from transformers import LlamaConfig

    from multilora.lora.adapter import LoRAModelSpec, load_adapter
    from multilora.lora.request import LoRARequest

    rank = 16
    with tempfile.TemporaryDirectory() as work:
        directory = Path(work) / "adapter"
        write_adapter(directory, LLAMA3_8B, rank, seed=0)
        spec = LoRAModelSpec.from_hf_config(LlamaConfig(**LLAMA3_8B))
        request = LoRARequest("adapter", 1, str(directory))
        load = lambda: load_adapter(request, spec, rank, dtype=torch.bfloat16)  # noqa: E731
        adapter = load()
        slots = slot_weights(LLAMA3_8B, rank)
        build = lambda: slots._images.clear() or slots.host_image(adapter)  # noqa: E731
        for what, fn in (("load_adapter", load), ("host image", build)):
            total, top, common = _count(fn)
            print(f"{what}: {total} aten ops in all, {top} called from Python; most: {common}")


if __name__ == "__main__":
    main()
