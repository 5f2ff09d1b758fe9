"""Isolation inside a step (issue 9): a request whose logits turn non-finite (a NaN-producing adapter)
ends alone while its batch carries on; a temperature that underflows float32 samples greedily instead
of failing the batch; NaN left in the KV cache by earlier requests changes no later output."""

import pytest
import torch

from helpers.engine_runs import assert_idle, greedy, make_llm
from helpers.zoo import SHORT_PROMPTS
from multilora import SamplingParams
from multilora.errors import NonFiniteLogitsError


def poison_rows_of(llm, bad_params, from_token: int):
    """Makes the logits of requests sampled with `bad_params` NaN once they have `from_token` tokens."""
    runner = llm.llm_engine.runner
    sampler, drawn = runner.sampler, {"n": 0}

    def poisoned(logits, rows):
        logits = logits.clone()
        for i, row in enumerate(rows):
            if row.params is bad_params:
                drawn["n"] += 1
                if drawn["n"] > from_token:
                    logits[i] = float("nan")
        return sampler(logits, rows)

    runner.sampler = poisoned


def test_non_finite_logits_end_that_request_alone(tiny_zoo):
    llm = make_llm(tiny_zoo, "llama")
    lora = tiny_zoo.lora_request("llama", "chat")
    prompts = [SHORT_PROMPTS[0], SHORT_PROMPTS[1], SHORT_PROMPTS[2]]
    bad = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
    params = [greedy(8), bad, SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=3, ignore_eos=True)]
    clean = llm.generate(prompts, params, lora_request=[None, lora, lora])
    poison_rows_of(llm, bad, from_token=2)
    outs = llm.generate(prompts, params, lora_request=[None, lora, lora])
    failed = outs[1]
    assert failed.finished and isinstance(failed.error, NonFiniteLogitsError)
    assert failed.error.code == "INTERNAL" and "non-finite" in str(failed.error) and "'chat'" in str(failed.error)
    assert len(failed.outputs[0].token_ids) == 2         # what it made before its logits broke
    for i in (0, 2):
        assert outs[i].error is None and outs[i].outputs[0].token_ids == clean[i].outputs[0].token_ids
    assert_idle(llm.llm_engine)
    again = llm.generate(prompts[:1], params[:1])        # the engine serves on as before
    assert again[0].outputs[0].token_ids == clean[0].outputs[0].token_ids


def test_a_temperature_that_underflows_float32_is_greedy_and_fails_nobody(tiny_zoo):
    llm = make_llm(tiny_zoo, "llama")
    prompts = [SHORT_PROMPTS[0], SHORT_PROMPTS[1]]
    tiny = SamplingParams(max_tokens=6, temperature=1e-300, ignore_eos=True)
    other = SamplingParams(max_tokens=6, temperature=0.9, seed=4, ignore_eos=True)
    expected = llm.generate(prompts, [greedy(6), other])
    outs = llm.generate(prompts, [tiny, other])
    assert [o.error for o in outs] == [None, None]
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in expected]
    assert_idle(llm.llm_engine)


@pytest.mark.parametrize("chunk", [512, 5])      # whole prompts, and chunks that read the cache back
def test_nan_left_in_the_kv_cache_changes_no_output(tiny_zoo, chunk):
    prompts = list(SHORT_PROMPTS[:4])             # contexts that end mid-block (blocks of 4 tokens)
    params = [greedy(7), SamplingParams(max_tokens=7, temperature=0.8, top_p=0.9, seed=2, ignore_eos=True)] * 2
    llm = make_llm(tiny_zoo, "llama", max_num_batched_tokens=chunk, num_kv_blocks=64)
    clean = llm.generate(prompts, params)
    for cache in llm.llm_engine.runner.kv_caches:
        cache.fill_(float("nan"))                  # what a NaN-producing request leaves in freed blocks
    poisoned = llm.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in poisoned] == [o.outputs[0].token_ids for o in clean]
    assert all(o.error is None for o in poisoned)
