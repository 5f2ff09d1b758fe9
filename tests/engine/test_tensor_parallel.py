"""tensor_parallel_size=2: the same greedy tokens as one device, and a dead worker ends every request with an
error, leaving no process behind. On the CPU (gloo) in CI; on two GPUs (NCCL, CUDA graphs with the all-reduces
inside) where a machine has them.

The tiny Llamas have 8 attention heads and 2 KV heads (split, one per rank) or 1 (replicated on both
ranks). Row-parallel all-reduces sum in another order than one device does, so tokens can agree
exactly only where no two logits nearly tie: the HF reference asserts that margin (zoo.MIN_MARGIN).
"""

import itertools
import os
import signal
import threading
import time

import pytest
import torch

from helpers.engine_runs import OutputCollector, assert_idle, async_engine_config, drain, greedy, make_llm
from helpers.zoo import SHORT_PROMPTS, long_prompt
from multilora import AsyncLLMEngine, LLM
from multilora.errors import EngineStoppedError, WorkerFailedError
from multilora.tensor_parallel import Shard, TensorParallel

N = 8
# Every pressure at once: 2 adapter slots for 3 adapters, 24 KV blocks (preemption), a 16-token step
# budget (the 40- and 57-token prompts are prefilled in chunks).
SQUEEZE = dict(max_loras=2, max_cpu_loras=4, num_kv_blocks=24, max_num_batched_tokens=16, max_num_seqs=6)
DEVICE = "cuda" if torch.cuda.device_count() >= 2 else "cpu"


def test_shards_split_heads_replicate_few_kv_heads_and_pad_the_vocabulary():
    assert [TensorParallel(r, 2).kv_heads(2) for r in range(2)] == [Shard(0, 1, 2), Shard(1, 1, 2)]
    assert [TensorParallel(r, 2).kv_heads(1) for r in range(2)] == [Shard(0, 1, 1)] * 2
    assert [TensorParallel(r, 4).kv_heads(2).start for r in range(4)] == [0, 0, 1, 1]
    assert [TensorParallel(r, 2).split(8, "heads") for r in range(2)] == [Shard(0, 4, 8), Shard(4, 4, 8)]
    last = TensorParallel(1, 2).vocab(301)           # 151 columns each; the last one is padding
    assert last == Shard(151, 151, 301) and last.index == slice(151, 301)
    with pytest.raises(ValueError, match="num_attention_heads .8. is not divisible by tensor_parallel_size 3"):
        TensorParallel(0, 3).split(8, "num_attention_heads")
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads 2"):
        TensorParallel(0, 3).kv_heads(2)


def test_a_model_that_cannot_be_split_is_refused_before_any_worker_starts(tiny_zoo):
    with pytest.raises(ValueError, match="not divisible by tensor_parallel_size 3"):
        make_llm(tiny_zoo, "llama-8h2kv", device="cpu", tensor_parallel_size=3)


def _requests():
    prompts = [long_prompt(40, seed=5), long_prompt(57, seed=4), *SHORT_PROMPTS, long_prompt(11, seed=2)]
    return list(zip(prompts, itertools.cycle(("chat", "code", None, "sql"))))


def _generate(llm: LLM, zoo, kind: str, requests) -> tuple[list[list[int]], int]:
    """The requests' tokens, and how many adapter writes the engine counted."""
    engine = llm.llm_engine
    for i, (prompt, adapter) in enumerate(requests):
        engine.add_request(f"r{i}", prompt, greedy(N - i % 3), adapter and zoo.lora_request(kind, adapter))
    finals = drain(engine).finals
    assert engine.stats().num_preemptions > 0 and engine.stats().adapter_evictions > 0, engine.stats()
    assert_idle(engine)
    return [finals[f"r{i}"].outputs[0].token_ids for i in range(len(requests))], engine.stats().adapter_uploads


@pytest.mark.parametrize("kind, async_scheduling", [("llama-8h2kv", True), ("llama-8h1kv", False)])
def test_two_ranks_give_the_greedy_tokens_of_one_device(tiny_zoo, kind, async_scheduling):
    """A mixed batch of the base model and three adapters, under preemption and chunked prefill."""
    requests = _requests()
    one, one_uploads = _generate(make_llm(tiny_zoo, kind, device=DEVICE, **SQUEEZE), tiny_zoo, kind, requests)
    llm = make_llm(tiny_zoo, kind, device=DEVICE, tensor_parallel_size=2, async_scheduling=async_scheduling,
                   **SQUEEZE)
    try:
        two, two_uploads = _generate(llm, tiny_zoo, kind, requests)
        _check_an_idle_engine_sees_its_dead_worker(llm.llm_engine)
    finally:
        llm.llm_engine.shutdown()
    assert two == one
    # Rank 0 reports its writes with its answers: on the CPU each is done by then; a GPU's may come later.
    assert two_uploads == one_uploads if DEVICE == "cpu" else 0 < two_uploads <= one_uploads
    for i, ((prompt, adapter), tokens) in enumerate(zip(requests, one)):
        assert tokens == tiny_zoo.reference(kind, adapter, prompt, N)[:N - i % 3], (prompt, adapter)


def _check_an_idle_engine_sees_its_dead_worker(engine) -> None:
    """Rank 0 killed between requests: the health check (the async engine's, every second) says so, the
    other worker is killed, and the next step fails with the same error."""
    runner = engine.runner
    os.kill(runner.worker_pids[0], signal.SIGKILL)
    with pytest.raises(WorkerFailedError):
        for _ in range(200):        # until the kernel has ended it
            engine.check_health()
            time.sleep(0.05)
    assert all(not p.is_alive() for p in runner._processes), runner.worker_pids
    engine.add_request("after", SHORT_PROMPTS[0], greedy(2))
    with pytest.raises(WorkerFailedError):
        engine.step()


def test_a_killed_worker_ends_every_request_with_an_error_and_leaves_no_process(tiny_zoo):
    kind = "llama-8h2kv"
    engine = AsyncLLMEngine(async_engine_config(tiny_zoo, kind, device=DEVICE, tensor_parallel_size=2,
                                                num_kv_blocks=256))
    runner = engine.engine.runner
    started = threading.Event()

    def collect(collector):
        return lambda out: (collector(out), started.set())

    try:
        collectors = [OutputCollector() for _ in range(6)]
        for i, collector in enumerate(collectors):
            lora = tiny_zoo.lora_request(kind, "sql") if i % 2 else None
            # Long enough that none can end between the first output and the kill.
            engine.add_request(f"k{i}", SHORT_PROMPTS[i % 4], greedy(100), lora, on_output=collect(collector))
        assert started.wait(60), "no output within 60 s"
        os.kill(runner.worker_pids[1], signal.SIGKILL)
        for collector in collectors:
            final = collector.final()
            assert isinstance(final.error, WorkerFailedError), final
            assert "tensor-parallel worker" in str(final.error)
        engine._thread.join(30)
        assert not engine.is_alive and "WorkerFailedError" in engine.failure
        assert all(not p.is_alive() for p in runner._processes), runner.worker_pids
        with pytest.raises(EngineStoppedError):
            engine.add_request("late", SHORT_PROMPTS[0], greedy(2), on_output=OutputCollector())
    finally:
        engine.shutdown()
