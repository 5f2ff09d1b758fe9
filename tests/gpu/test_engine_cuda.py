"""On a CUDA GPU: the Triton kernels and CUDA graphs give the HF + PEFT tokens too (skipped elsewhere).

Run on a GPU machine with `pytest tests/gpu tests/engine`: tests/engine then
also runs on the GPU, since the engine picks CUDA when present.
"""

import pytest
import torch

from helpers.engine_runs import assert_idle, check_staggered_generate, greedy, make_llm
from helpers.zoo import ADAPTERS, SHORT_PROMPTS, long_prompt
from multilora.lora.mapping import LoRAVariant

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N = 10


def _requests():
    names = [None, *ADAPTERS]
    prompts = [*SHORT_PROMPTS, long_prompt(40, seed=1)]
    return [(p, names[i % len(names)]) for i, p in enumerate(prompts * 3)]


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda_graphs", "eager"])
def test_mixed_batch_on_gpu_matches_hf_peft(tiny_zoo, enforce_eager):
    llm = make_llm(tiny_zoo, "llama", device="cuda", max_loras=4, max_num_seqs=16, enforce_eager=enforce_eager)
    assert (llm.llm_engine.runner.decode_graphs is None) == enforce_eager
    assert llm.llm_engine.async_scheduling          # the default on a GPU
    requests = _requests()
    loras = [tiny_zoo.lora_request("llama", a) if a else None for _, a in requests]
    outs = llm.generate([p for p, _ in requests], greedy(N), lora_request=loras)
    for (prompt, adapter), out in zip(requests, outs):
        assert out.outputs[0].token_ids == tiny_zoo.reference("llama", adapter, prompt, N), (prompt, adapter)
    assert_idle(llm.llm_engine)


def test_graph_padding_rows_leave_real_sequences_alone(tiny_zoo):
    """Batch sizes between captured sizes (3, 5, 7...) are padded; results must not change."""
    llm = make_llm(tiny_zoo, "llama", device="cuda", max_loras=4, max_num_seqs=16)
    for size in (1, 3, 5, 7, 9):
        requests = _requests()[:size]
        loras = [tiny_zoo.lora_request("llama", a) if a else None for _, a in requests]
        outs = llm.generate([p for p, _ in requests], greedy(N), lora_request=loras)
        assert [o.outputs[0].token_ids for o in outs] == \
            [tiny_zoo.reference("llama", a, p, N) for p, a in requests]


def test_chunked_prefill_beside_graph_decode_rows_on_gpu(tiny_zoo):
    """Mixed steps: the prefill chunk runs eagerly, the decode rows replay their graph (with or without LoRA)."""
    llm = make_llm(tiny_zoo, "llama", device="cuda", max_loras=4, max_num_seqs=16, max_num_batched_tokens=12)
    requests = [(SHORT_PROMPTS[0], None), (SHORT_PROMPTS[1], "sql"), (long_prompt(40, seed=3), "code"),
                (long_prompt(30, seed=4), None)]
    loras = [tiny_zoo.lora_request("llama", a) if a else None for _, a in requests]
    outs = llm.generate([p for p, _ in requests], greedy(N), lora_request=loras)
    assert [o.outputs[0].token_ids for o in outs] == [tiny_zoo.reference("llama", a, p, N) for p, a in requests]
    runner = llm.llm_engine.runner
    assert set(runner.decode_graphs.lora_variants) == {None, *LoRAVariant}
    assert runner.inputs._decode_host.is_pinned() and runner.inputs._table_host.is_pinned()
    assert_idle(llm.llm_engine)


@pytest.mark.parametrize("async_scheduling", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda_graphs", "eager"])
def test_scheduling_modes_on_gpu_match_hf_peft(tiny_zoo, enforce_eager, async_scheduling):
    """Async: sampled ids feed the next step from the device (pinned copies, events). With chunked prefill
    and preemption; each request ends at its own step."""
    llm = make_llm(tiny_zoo, "llama", device="cuda", max_loras=4, max_num_seqs=16, enforce_eager=enforce_eager,
                   async_scheduling=async_scheduling, max_num_batched_tokens=16, num_kv_blocks=40)
    assert llm.llm_engine.async_scheduling is async_scheduling
    check_staggered_generate(llm, tiny_zoo, _requests(), N)
