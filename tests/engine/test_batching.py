"""Batching does not change results: a request's output is the same alone, in a
mixed batch, next to requests of other lengths, and next to an aborted one.
"""

import pytest

from helpers.engine_runs import StepTracker, assert_idle, greedy, make_llm
from helpers.zoo import ADAPTERS, SHORT_PROMPTS, long_prompt

N = 10
# (prompt, adapter, max_tokens): different lengths so requests finish at different steps.
REQUESTS = [
    (SHORT_PROMPTS[0], "sql", 10),
    (SHORT_PROMPTS[1], None, 6),
    (SHORT_PROMPTS[2], "code", 8),
    (long_prompt(11, seed=2), "chat", 10),
    (SHORT_PROMPTS[3], "kv", 4),
    (SHORT_PROMPTS[0], None, 9),
]


def lora(zoo, adapter):
    return None if adapter is None else zoo.lora_request("llama", adapter)


@pytest.fixture(scope="module")
def llm(tiny_zoo):
    return make_llm(tiny_zoo, "llama", max_loras=4, max_num_seqs=8)


def test_mixed_batch_equals_each_request_alone(tiny_zoo, llm):
    batch = llm.generate([p for p, _, _ in REQUESTS], [greedy(n) for _, _, n in REQUESTS],
                         lora_request=[lora(tiny_zoo, a) for _, a, _ in REQUESTS])
    assert_idle(llm.llm_engine)
    for (prompt, adapter, n), out in zip(REQUESTS, batch):
        (alone,) = llm.generate([prompt], greedy(n), lora_request=lora(tiny_zoo, adapter))
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, (prompt, adapter)
        assert out.outputs[0].text == alone.outputs[0].text
        # Shorter requests stop early; what they made is the reference's prefix.
        assert out.outputs[0].token_ids == tiny_zoo.reference("llama", adapter, prompt, N)[:n]
    assert_idle(llm.llm_engine)


def test_one_adapter_shared_by_many_requests(tiny_zoo, llm):
    """The same adapter for a whole batch (one LoRARequest for all prompts)."""
    prompts = list(SHORT_PROMPTS)
    outs = llm.generate(prompts, greedy(N), lora_request=lora(tiny_zoo, "code"))
    assert [o.outputs[0].token_ids for o in outs] == [tiny_zoo.reference("llama", "code", p, N) for p in prompts]
    assert_idle(llm.llm_engine)


def test_abort_leaves_the_others_unchanged(tiny_zoo):
    engine = make_llm(tiny_zoo, "llama", max_loras=4, max_num_seqs=8).llm_engine
    for i, (prompt, adapter, n) in enumerate(REQUESTS):
        engine.add_request(f"a{i}", prompt, greedy(n), lora(tiny_zoo, adapter))
    tracker = StepTracker(engine)
    for _ in range(3):
        tracker.step()
    assert engine.stats().num_running > 0
    engine.abort_request("a2")  # running, with tokens made, its adapter held by no one else
    engine.abort_request("a3")
    assert "code" not in engine.stats().running_adapters

    finals = tracker.drain().finals
    assert set(finals) == {f"a{i}" for i in range(len(REQUESTS))} - {"a2", "a3"}
    for i, (prompt, adapter, n) in enumerate(REQUESTS):
        if f"a{i}" in finals:
            assert finals[f"a{i}"].outputs[0].token_ids == tiny_zoo.reference("llama", adapter, prompt, N)[:n]
    assert_idle(engine)


def test_abort_of_a_waiting_request(tiny_zoo):
    """A request aborted before it was ever scheduled frees its adapter hold too."""
    llm = make_llm(tiny_zoo, "llama", max_num_seqs=1)
    engine = llm.llm_engine
    engine.add_request("first", SHORT_PROMPTS[0], greedy(N), lora(tiny_zoo, "sql"))
    engine.add_request("second", SHORT_PROMPTS[1], greedy(N), lora(tiny_zoo, "chat"))
    tracker = StepTracker(engine)
    tracker.step()
    assert engine.stats().num_waiting == 1
    engine.abort_request("second")
    finals = tracker.drain().finals
    assert set(finals) == {"first"}
    assert finals["first"].outputs[0].token_ids == tiny_zoo.reference("llama", "sql", SHORT_PROMPTS[0], N)
    assert_idle(engine)


def test_stats_while_running(tiny_zoo):
    """While requests run, the stats show their blocks, holds and adapters; afterwards none."""
    engine = make_llm(tiny_zoo, "llama", max_loras=4).llm_engine
    for i, adapter in enumerate(("sql", "chat", None)):
        engine.add_request(f"s{i}", SHORT_PROMPTS[i], greedy(N), lora(tiny_zoo, adapter))
    tracker = StepTracker(engine)
    tracker.step()
    stats = engine.stats()
    assert stats.num_running + stats.num_waiting == 3
    assert stats.kv_blocks_used > 0
    assert stats.adapter_holds == 2
    assert set(stats.running_adapters) | set(stats.waiting_adapters) == {"sql", "chat"}
    assert set(stats.running_adapters) <= set(stats.resident_adapters) <= set(ADAPTERS)
    tracker.drain()
    assert len(tracker.finals) == 3
    assert_idle(engine)
