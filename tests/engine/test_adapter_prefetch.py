"""The engine with more adapters than GPU slots: prefetched and evicted adapters still give the HF + PEFT
tokens, every write is counted as an upload, and each request's times are in order (any device)."""

import torch

from helpers.engine_runs import assert_idle, greedy, make_llm
from helpers.zoo import ADAPTERS, SHORT_PROMPTS

N = 6


def test_prefetched_adapters_match_hf_peft_and_every_write_is_an_upload(tiny_zoo):
    # Two seats and three slots: while two requests run, the third slot takes the next waiting
    # request's adapter ahead of it; four adapters in three slots also force evictions.
    llm = make_llm(tiny_zoo, "llama", max_loras=3, max_num_seqs=2)
    names = list(ADAPTERS) * 2
    prompts = [SHORT_PROMPTS[i % len(SHORT_PROMPTS)] for i in range(len(names))]
    outs = llm.generate(prompts, greedy(N), lora_request=[tiny_zoo.lora_request("llama", a) for a in names])
    for prompt, adapter, out in zip(prompts, names, outs):
        assert out.outputs[0].token_ids == tiny_zoo.reference("llama", adapter, prompt, N), (prompt, adapter)
        m = out.metrics
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert m.time_in_queue >= 0 and m.time_in_prefill >= 0
    engine = llm.llm_engine
    assert_idle(engine)
    if engine.runner.device.type == "cuda":
        torch.cuda.synchronize()            # a prefetched copy no step waited for may still be queued
    stats = engine.stats()
    assert stats.adapter_prefetches >= 1 and stats.adapter_evictions >= 1
    assert stats.adapter_uploads == stats.adapter_pool_misses + stats.adapter_prefetches    # each write, once
    assert stats.adapter_upload_seconds > 0 and stats.adapter_loads == len(ADAPTERS)
    assert stats.adapter_pool_hits + stats.adapter_pool_misses == len(names)
    assert 0 < stats.num_step_adapters <= 2 * stats.num_steps       # never more than the two seats
