"""AsyncLLMEngine: the server-facing interface (callbacks, async iterator, abort, shutdown)."""

import asyncio
import threading

import pytest

from helpers.engine_runs import OutputCollector, async_engine_config, greedy
from helpers.zoo import SHORT_PROMPTS
from multilora import AsyncLLMEngine
from multilora.errors import AdapterNotFoundError, EngineStoppedError, InvalidRequestError, RequestCancelledError
from multilora.lora.request import LoRARequest


@pytest.fixture(scope="module")
def engine(tiny_zoo):
    engine = AsyncLLMEngine(async_engine_config(tiny_zoo))
    yield engine
    engine.shutdown()


def test_threads_get_the_gil_back_quickly(engine):
    """A thread that released the GIL (every torch call does) waits at most this long for a busy one."""
    import sys

    assert sys.getswitchinterval() <= 0.0002


def test_the_start_up_heap_is_frozen_while_serving_and_collectable_after(tiny_zoo):
    """A full garbage collection holds the GIL over every tracked object (~0.25 s on the H200 host after
    start-up): while an engine serves, the start-up objects are out of its walk; after shutdown a dropped
    engine is collected again."""
    import gc
    import weakref

    engine = AsyncLLMEngine(async_engine_config(tiny_zoo, enable_lora=False))
    alive = weakref.ref(engine.engine)
    assert gc.get_freeze_count() > 10_000
    engine.shutdown()
    assert gc.get_freeze_count() == 0
    del engine
    gc.collect()
    assert alive() is None


def test_preparing_threads_run_torch_on_one_thread_only_on_a_gpu(tiny_zoo):
    """On a GPU an adapter load's copies would each start an intra-op team as wide as the machine beside
    the busy engine threads (bench/RESULTS.md, issue 8); on a CPU the engine keeps torch's setting."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = AsyncLLMEngine(async_engine_config(tiny_zoo))
        try:
            threads = engine._prepare_pool.submit(torch.get_num_threads).result()
            on_gpu = engine.engine.runner.on_gpu
        finally:
            engine.shutdown()
    finally:
        torch.set_num_threads(saved)
    assert threads == (1 if on_gpu else 2)


def test_streams_deltas_that_add_up_to_the_reference(tiny_zoo, engine):
    requests = [(SHORT_PROMPTS[0], "sql"), (SHORT_PROMPTS[2], None), (SHORT_PROMPTS[1], "code")]
    collectors = []
    for i, (prompt, adapter) in enumerate(requests):
        collector = OutputCollector()
        lora = tiny_zoo.lora_request("llama", adapter) if adapter else None
        engine.add_request(f"s{i}", prompt, greedy(8), lora, collector)
        collectors.append(collector)
    for (prompt, adapter), collector in zip(requests, collectors):
        final = collector.final()
        assert final.error is None
        assert final.outputs[0].token_ids == tiny_zoo.reference("llama", adapter, prompt, 8)
        assert collector.text_from_deltas == final.outputs[0].text
        assert sum(len(o.outputs[0].delta_token_ids) for o in collector.outputs) == 8
    assert engine.stats().adapter_holds == 0


def test_request_errors_arrive_as_a_final_output(engine):
    bad_adapter = OutputCollector()
    engine.add_request("e1", "hi", greedy(4), LoRARequest("nope", 999, "/nonexistent/adapter"), bad_adapter)
    empty = OutputCollector()
    engine.add_request("e2", "", greedy(4), None, empty)
    assert isinstance(bad_adapter.final().error, AdapterNotFoundError)
    assert isinstance(empty.final().error, InvalidRequestError)
    assert len(bad_adapter.outputs) == len(empty.outputs) == 1


def test_abort_frees_everything_and_answers_cancelled(tiny_zoo, engine):
    collector = OutputCollector()
    engine.add_request("long", SHORT_PROMPTS[0], greedy(100), tiny_zoo.lora_request("llama", "chat"), collector)
    while not collector.outputs:           # wait until it is running
        threading.Event().wait(0.01)
    engine.abort("long")
    final = collector.final()
    assert isinstance(final.error, RequestCancelledError)
    assert final.outputs[0].finish_reason == "abort"
    stats = _settled_stats(engine)
    assert (stats.kv_blocks_used, stats.adapter_holds, stats.num_running) == (0, 0, 0)


def test_async_iterator(tiny_zoo, engine):
    async def run():
        texts, last = [], None
        async for out in engine.generate("it", SHORT_PROMPTS[2], greedy(6), tiny_zoo.lora_request("llama", "kv")):
            texts.append(out.outputs[0].delta_text)
            last = out
        return "".join(texts), last

    text, last = asyncio.run(run())
    assert last.finished and text == last.outputs[0].text
    assert last.outputs[0].token_ids == tiny_zoo.reference("llama", "kv", SHORT_PROMPTS[2], 6)


def test_a_closed_event_loop_aborts_its_requests(tiny_zoo, engine, caplog):
    """A caller whose event loop closed mid-stream (a killed client task) leaves nothing running
    and no stream of callback errors in the log."""
    loop = asyncio.new_event_loop()

    async def first_output():
        stream = engine.generate("orphan", SHORT_PROMPTS[0], greedy(200), tiny_zoo.lora_request("llama", "sql"))
        return await stream.__anext__()     # the generator is left suspended, never closed

    assert not loop.run_until_complete(first_output()).finished
    loop.close()
    stats = _settled_stats(engine)
    assert (stats.num_running, stats.kv_blocks_used, stats.adapter_holds) == (0, 0, 0)
    assert "callback" not in caplog.text


def test_shutdown_gives_every_request_one_final_output(tiny_zoo):
    engine = AsyncLLMEngine(async_engine_config(tiny_zoo, enable_lora=False))
    collectors = [OutputCollector() for _ in range(3)]
    for i, collector in enumerate(collectors):
        engine.add_request(f"d{i}", SHORT_PROMPTS[i], greedy(1000), None, collector)
    engine.shutdown()
    for collector in collectors:
        assert collector.done.is_set()
        assert isinstance(collector.outputs[-1].error, EngineStoppedError)
    with pytest.raises(EngineStoppedError):
        engine.add_request("late", "hi", greedy(2), None, OutputCollector())


def _settled_stats(engine):
    # The stats snapshot is refreshed by the engine thread after each loop.
    for _ in range(200):
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        threading.Event().wait(0.01)
    return engine.stats()
