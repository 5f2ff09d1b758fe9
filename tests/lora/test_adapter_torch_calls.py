"""An adapter load and its host image build make a few torch calls, whatever the number of tensors:
each call beside the engine's busy threads is one more wait for the GIL (issue 8)."""

import sys
from pathlib import Path

import torch
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from bench_adapter_load import slot_weights  # noqa: E402
from count_adapter_load_ops import TopLevelOps  # noqa: E402
from bench_engine import LLAMA3_8B, write_adapter  # noqa: E402
from multilora.lora.adapter import LoRAModelSpec, load_adapter  # noqa: E402
from multilora.lora.request import LoRARequest  # noqa: E402

TINY = {**LLAMA3_8B, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6,
        "num_attention_heads": 4, "num_key_value_heads": 2}


def test_load_and_host_image_make_a_few_torch_calls_for_84_tensors(tmp_path):
    write_adapter(tmp_path, TINY, 8, seed=0)          # 6 layers x 7 modules x (A, B)
    spec = LoRAModelSpec.from_hf_config(LlamaConfig(**TINY))
    load, build = TopLevelOps(), TopLevelOps()
    with load:
        adapter = load_adapter(LoRARequest("tiny", 1, str(tmp_path)), spec, 8, dtype=torch.float32)
    slots = slot_weights(TINY, 8)
    with build:
        image = slots.host_image(adapter)
    # Per group of same-shaped tensors (5 here: ~8 to read, 3 to convert), not per tensor: ~10 per tensor before.
    assert sum(load.ops.values()) <= 80, load.ops
    assert sum(build.ops.values()) <= 30, build.ops
    assert len(adapter.weights) == 42 and all(a.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
                                              for a, b, _ in adapter.weights.values())
    assert image.numel() == slots.header_bytes + 8 * slots.row_bytes
