"""async_scheduling=True: step N+1 is scheduled and launched before step N's ids reach the host.

Its sampled ids feed the next step from the device (placeholders on the host),
tokens of requests that ended meanwhile are dropped, and every output stays
exactly what the synchronous engine gives.
"""

import random

import pytest

from helpers.engine_runs import (OutputCollector, StepTracker, assert_idle, async_engine_config,
                                 check_staggered_generate, greedy, make_llm)
from helpers.zoo import ADAPTERS, SHORT_PROMPTS, long_prompt
from multilora import AsyncLLMEngine, SamplingParams
from multilora.engine.sequence import PLACEHOLDER

N = 8


def _requests():
    pairs = [(p, a) for p in [*SHORT_PROMPTS, long_prompt(30, seed=5)] for a in (None, *ADAPTERS)]
    random.Random(1).shuffle(pairs)
    return pairs


@pytest.mark.parametrize("squeeze", [{}, dict(num_kv_blocks=20, max_num_batched_tokens=16, max_num_seqs=6)],
                         ids=["plain", "preemption_and_chunked_prefill"])
def test_outputs_match_the_reference(tiny_zoo, squeeze):
    llm = make_llm(tiny_zoo, "llama", async_scheduling=True, **squeeze)
    # Different lengths: requests end at different steps, while the next step is already launched.
    check_staggered_generate(llm, tiny_zoo, _requests(), N)
    if squeeze:
        assert llm.llm_engine.stats().num_preemptions > 0


def test_placeholders_stand_for_ids_still_on_the_device(tiny_zoo):
    engine = make_llm(tiny_zoo, "llama", async_scheduling=True).llm_engine
    engine.add_request("a", SHORT_PROMPTS[0], greedy(N))
    tracker = StepTracker(engine)
    tracker.step()                     # prefill launched, nothing back yet
    seq = engine.requests["a"]
    assert seq.output_token_ids == [PLACEHOLDER] and not tracker.first_token_step
    tracker.step()                     # first token back, second launched
    assert seq.output_token_ids[-1] == PLACEHOLDER and seq.output_token_ids[0] >= 0
    tracker.drain()
    assert tracker.finals["a"].outputs[0].token_ids == tiny_zoo.reference("llama", None, SHORT_PROMPTS[0], N)
    assert PLACEHOLDER not in seq.output_token_ids
    assert_idle(engine)


def test_eos_and_stop_strings_drop_the_token_launched_after_them(tiny_zoo):
    sync, overlapped = make_llm(tiny_zoo, "llama"), make_llm(tiny_zoo, "llama", async_scheduling=True)
    free = sync.generate([SHORT_PROMPTS[2]], greedy(N))[0].outputs[0].token_ids
    stop_text = sync.get_tokenizer().decode(free[2:3]).strip()
    params = [SamplingParams(max_tokens=N, temperature=0.0, stop=[stop_text] if stop_text else []),
              SamplingParams(max_tokens=N, temperature=1.0, seed=3, min_tokens=2)]   # may end at EOS
    for p in params:
        want = sync.generate([SHORT_PROMPTS[2]], p)[0].outputs[0]
        got = overlapped.generate([SHORT_PROMPTS[2]], p)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.text, want.finish_reason, want.stop_reason)
    assert_idle(overlapped.llm_engine)


def test_seeded_sampling_and_abort_in_flight(tiny_zoo):
    sync, overlapped = make_llm(tiny_zoo, "llama"), make_llm(tiny_zoo, "llama", async_scheduling=True)
    params = SamplingParams(max_tokens=N, temperature=1.0, top_p=0.9, seed=11, ignore_eos=True)
    lora = tiny_zoo.lora_request("llama", "chat")
    assert overlapped.generate([SHORT_PROMPTS[1]], params, lora_request=lora)[0].outputs[0].token_ids == \
        sync.generate([SHORT_PROMPTS[1]], params, lora_request=lora)[0].outputs[0].token_ids
    engine = overlapped.llm_engine
    engine.add_request("x", SHORT_PROMPTS[0], greedy(N))
    engine.add_request("y", SHORT_PROMPTS[3], greedy(N), lora)
    tracker = StepTracker(engine)
    for _ in range(3):
        tracker.step()
    final = engine.abort_request("x")      # its next token is on the GPU: it is dropped
    assert final.finished and final.outputs[0].finish_reason == "abort"
    tracker.drain()
    assert set(tracker.finals) == {"y"}
    assert tracker.finals["y"].outputs[0].token_ids == tiny_zoo.reference("llama", "chat", SHORT_PROMPTS[3], N)
    assert_idle(engine)


def test_async_engine_with_async_scheduling(tiny_zoo):
    engine = AsyncLLMEngine(async_engine_config(tiny_zoo, async_scheduling=True))
    try:
        collectors = [OutputCollector() for _ in range(3)]
        for i, collector in enumerate(collectors):
            engine.add_request(f"o{i}", SHORT_PROMPTS[i], greedy(N), None, collector)
        for i, collector in enumerate(collectors):
            final = collector.final()
            assert final.outputs[0].token_ids == tiny_zoo.reference("llama", None, SHORT_PROMPTS[i], N)
            assert collector.text_from_deltas == final.outputs[0].text
    finally:
        engine.shutdown()


def test_off_by_default_on_cpu(tiny_zoo):
    """On a CPU the host runs the model itself: nothing to overlap, so steps stay synchronous."""
    assert make_llm(tiny_zoo, "llama", device="cpu").llm_engine.async_scheduling is False
