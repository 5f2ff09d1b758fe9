"""Failures inside the engine end the affected requests with an error, free what they held, and
the engine keeps serving (faults injected with monkeypatch)."""

import asyncio
import threading

import pytest

from helpers.engine_runs import OutputCollector, async_engine_config, assert_idle, greedy, make_llm
from helpers.zoo import SHORT_PROMPTS
from multilora import AsyncLLMEngine, LoRARequest
from multilora.errors import AdapterWriteError, InvalidRequestError, MultiLoRAError


@pytest.fixture()
def engine(tiny_zoo):
    engine = AsyncLLMEngine(async_engine_config(tiny_zoo))
    yield engine
    engine.shutdown()


def test_unexpected_error_while_preparing_ends_the_request(engine, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.engine, "make_sequence", broken)
    collector = OutputCollector()
    engine.add_request("a", "hi", greedy(4), None, collector)
    final = collector.final()
    assert type(final.error) is MultiLoRAError and final.error.code == "INTERNAL"


def test_failed_step_fails_in_flight_requests_and_the_engine_serves_on(tiny_zoo, engine, monkeypatch):
    runner = engine.engine.runner
    real_execute = runner.execute
    calls = []

    def fail_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(runner, "execute", fail_once)
    first = OutputCollector()
    engine.add_request("f1", SHORT_PROMPTS[0], greedy(6), tiny_zoo.lora_request("llama", "sql"), first)
    assert first.final().error.code == "INTERNAL"
    second = OutputCollector()
    engine.add_request("f2", SHORT_PROMPTS[0], greedy(6), tiny_zoo.lora_request("llama", "sql"), second)
    assert second.final().outputs[0].token_ids == tiny_zoo.reference("llama", "sql", SHORT_PROMPTS[0], 6)


def test_duplicate_request_id_is_refused_and_the_first_runs_on(tiny_zoo, engine):
    first, second = OutputCollector(), OutputCollector()
    engine.add_request("dup", SHORT_PROMPTS[2], greedy(6), None, first)
    engine.add_request("dup", SHORT_PROMPTS[2], greedy(6), None, second)
    assert isinstance(second.final().error, InvalidRequestError)
    assert first.final().outputs[0].token_ids == tiny_zoo.reference("llama", None, SHORT_PROMPTS[2], 6)


def test_leaving_the_async_iterator_early_aborts_the_request(engine):
    async def take_one():
        stream = engine.generate("early", SHORT_PROMPTS[0], greedy(100))
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(take_one())
    for _ in range(500):
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == stats.kv_blocks_used == 0:
            break
        threading.Event().wait(0.01)
    assert (stats.num_running, stats.kv_blocks_used) == (0, 0)


def test_failed_adapter_write_never_serves_stale_weights(tiny_zoo, monkeypatch):
    llm = make_llm(tiny_zoo, "llama", max_loras=2)
    runner = llm.llm_engine.runner
    real_write = runner.write_adapter
    calls = []

    def fail_first(slot, adapter):
        calls.append(slot)
        if len(calls) == 1:
            raise RuntimeError("injected copy failure")
        real_write(slot, adapter)

    monkeypatch.setattr(runner, "write_adapter", fail_first)
    lora = tiny_zoo.lora_request("llama", "code")
    (failed,) = llm.generate([SHORT_PROMPTS[1]], greedy(6), lora_request=lora)
    assert type(failed.error) is AdapterWriteError and failed.outputs[0].token_ids == []
    assert_idle(llm.llm_engine)                      # the failed write freed its slot and the request's blocks
    with pytest.raises(AdapterWriteError):           # remembered: no second write of the same version
        llm.generate([SHORT_PROMPTS[1]], greedy(6), lora_request=lora)
    (out,) = llm.generate([SHORT_PROMPTS[1]], greedy(6), lora_request=LoRARequest("code", 999, lora.lora_path))
    assert out.outputs[0].token_ids == tiny_zoo.reference("llama", "code", SHORT_PROMPTS[1], 6)


def test_stop_strings_wait_for_min_tokens(tiny_zoo):
    llm = make_llm(tiny_zoo, "llama")
    tokenizer = llm.get_tokenizer()
    (free,) = llm.generate([SHORT_PROMPTS[2]], greedy(8))
    first_token_text = tokenizer.decode(free.outputs[0].token_ids[:1])
    assert first_token_text.strip(), "the test needs a first token with visible text"
    stop = first_token_text.strip()
    (early,) = llm.generate([SHORT_PROMPTS[2]], greedy(8, stop=[stop]))
    assert len(early.outputs[0].token_ids) == 1 and early.outputs[0].finish_reason == "stop"
    (held,) = llm.generate([SHORT_PROMPTS[2]], greedy(8, stop=[stop], min_tokens=3))
    assert len(held.outputs[0].token_ids) >= 3
