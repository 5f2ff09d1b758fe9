"""A failed adapter write (issue 9, item 1): it fails the requests that need that adapter, once, frees the slot,
and every other request runs on token-exact; the engine never retries the write at every step."""

import pytest

from helpers.engine_runs import StepTracker, assert_idle, greedy, make_llm
from helpers.zoo import SHORT_PROMPTS
from multilora.errors import AdapterWriteError


@pytest.fixture
def failing_code_writes(tiny_zoo, monkeypatch):
    """An engine whose runner raises (as an overflow would) whenever it writes adapter 'code'; -> (engine, writes)."""
    engine = make_llm(tiny_zoo, "llama", max_loras=2).llm_engine
    real_write = engine.runner.write_adapter
    writes = []

    def write(adapter_slot, adapter):
        writes.append(adapter.name)
        if adapter.name == "code":
            raise RuntimeError("value cannot be converted to type float without overflow")
        real_write(adapter_slot, adapter)

    monkeypatch.setattr(engine.runner, "write_adapter", write)
    return engine, writes


def test_failed_write_fails_only_its_requests_once(tiny_zoo, failing_code_writes):
    engine, writes = failing_code_writes
    code, sql = tiny_zoo.lora_request("llama", "code"), tiny_zoo.lora_request("llama", "sql")
    engine.add_request("base", SHORT_PROMPTS[0], greedy(8))
    engine.add_request("sql", SHORT_PROMPTS[1], greedy(8), sql)
    tracker = StepTracker(engine)
    tracker.step()
    tracker.step()                                      # base and sql are mid-stream when code arrives
    engine.add_request("code-1", SHORT_PROMPTS[2], greedy(8), code)
    engine.add_request("code-2", SHORT_PROMPTS[3], greedy(8), code)
    tracker.drain()

    for rid in ("code-1", "code-2"):
        final = tracker.finals[rid]
        assert type(final.error) is AdapterWriteError and final.error.code == "INTERNAL"
        assert "'code'" in str(final.error) and final.outputs[0].token_ids == []
    assert writes.count("code") == 1                    # one attempt for both requests, never requeued
    assert tracker.finals["base"].outputs[0].token_ids == tiny_zoo.reference("llama", None, SHORT_PROMPTS[0], 8)
    assert tracker.finals["sql"].outputs[0].token_ids == tiny_zoo.reference("llama", "sql", SHORT_PROMPTS[1], 8)
    assert_idle(engine)
    assert engine.stats().resident_adapters == ["sql"]  # the failed slot is free again
    assert engine.adapter_pool.counters.failed_writes == 1

    with pytest.raises(AdapterWriteError):               # remembered: a new request fails before queueing
        engine.add_request("code-3", SHORT_PROMPTS[2], greedy(8), code)
    assert writes.count("code") == 1
    engine.add_request("after", SHORT_PROMPTS[2], greedy(8), tiny_zoo.lora_request("llama", "chat"))
    after = StepTracker(engine).drain().finals["after"]  # the freed slot serves another adapter exactly
    assert after.outputs[0].token_ids == tiny_zoo.reference("llama", "chat", SHORT_PROMPTS[2], 8)
    assert_idle(engine)


def test_failed_write_also_ends_waiting_requests_for_that_adapter(tiny_zoo, failing_code_writes):
    engine, writes = failing_code_writes
    code = tiny_zoo.lora_request("llama", "code")
    engine.add_request("first", SHORT_PROMPTS[0], greedy(4), code)
    engine.add_request("second", SHORT_PROMPTS[1], greedy(4), code)
    # Admit one request per step, so the second is still waiting when the first one's write fails.
    engine.scheduler.max_num_seqs = 1
    tracker = StepTracker(engine)
    tracker.step()
    assert set(tracker.finals) == {"first", "second"}
    assert all(type(f.error) is AdapterWriteError for f in tracker.finals.values())
    assert writes == ["code"]
    assert_idle(engine)


def test_a_request_prepared_before_the_write_failed_does_not_write_again(tiny_zoo, failing_code_writes):
    # AsyncLLMEngine prepares (validates, loads the adapter) on worker threads, so a request for the
    # adapter can be prepared while its write is failing, and reach the engine thread afterwards.
    engine, writes = failing_code_writes
    code = tiny_zoo.lora_request("llama", "code")
    late = engine.make_sequence("late", SHORT_PROMPTS[1], greedy(4), code)
    engine.add_request("first", SHORT_PROMPTS[0], greedy(4), code)
    tracker = StepTracker(engine)
    tracker.step()
    assert type(tracker.finals["first"].error) is AdapterWriteError
    with pytest.raises(AdapterWriteError) as info:
        engine.add_sequence(late)
    assert "'code'" in str(info.value) and info.value.code == "INTERNAL"
    tracker.drain()
    assert writes == ["code"]                           # one write for both requests
    assert engine.adapter_pool.counters.failed_writes == 1
    assert_idle(engine)
