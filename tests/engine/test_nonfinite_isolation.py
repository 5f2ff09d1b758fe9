"""A request whose logits turn non-finite (a NaN-producing adapter) ends alone; its batch carries on."""

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
