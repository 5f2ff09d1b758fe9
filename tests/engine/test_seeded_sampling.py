"""A seeded request gives the same tokens whatever else is in the batch, and across preemption."""

from helpers.engine_runs import assert_idle, make_llm
from helpers.zoo import SHORT_PROMPTS
from multilora import SamplingParams


def sampled(seed, **kwargs):
    return SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True, **kwargs)


def test_same_seed_same_tokens_alone_in_a_batch_and_under_preemption(tiny_zoo):
    llm = make_llm(tiny_zoo, "llama")
    lora = tiny_zoo.lora_request("llama", "chat")
    (alone,) = llm.generate([SHORT_PROMPTS[0]], sampled(7), lora_request=lora)
    others = [SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True)] * 3
    batch = llm.generate([SHORT_PROMPTS[2], SHORT_PROMPTS[0], SHORT_PROMPTS[1], SHORT_PROMPTS[3]],
                         [others[0], sampled(7), others[1], others[2]], lora_request=[None, lora, None, lora])
    assert batch[1].outputs[0].token_ids == alone.outputs[0].token_ids
    squeezed = make_llm(tiny_zoo, "llama", num_kv_blocks=12, block_size=4)    # forces preemption
    outs = squeezed.generate([SHORT_PROMPTS[1], SHORT_PROMPTS[0], SHORT_PROMPTS[2]],
                             [others[0], sampled(7), others[1]], lora_request=[None, lora, None])
    assert squeezed.llm_engine.stats().num_preemptions > 0
    assert outs[1].outputs[0].token_ids == alone.outputs[0].token_ids
    (other_seed,) = llm.generate([SHORT_PROMPTS[0]], sampled(8), lora_request=lora)
    assert other_seed.outputs[0].token_ids != alone.outputs[0].token_ids
    assert_idle(llm.llm_engine)


def test_seeded_tokens_are_those_of_the_per_row_sampler(tiny_zoo):
    import torch
    from helpers.per_row_sampler import PerRowSampler

    prompts = [SHORT_PROMPTS[0], SHORT_PROMPTS[1], SHORT_PROMPTS[2]]
    params = [sampled(7), sampled(11, min_tokens=4), SamplingParams(max_tokens=10, temperature=0.6, top_k=3, seed=5)]
    batched = make_llm(tiny_zoo, "llama").generate(prompts, params)
    per_row = make_llm(tiny_zoo, "llama")
    reference = PerRowSampler()
    per_row.llm_engine.runner.sampler = lambda logits, rows: torch.tensor(reference(logits, rows))
    expected = per_row.generate(prompts, params)
    assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in expected]
