"""Scheduler, block manager and adapter pool: pure bookkeeping, tested with fakes on any CPU."""

import threading
import time

from multilora.config import EngineConfig
from multilora.engine.block_manager import BlockManager
from multilora.engine.scheduler import Scheduler
from multilora.engine.sequence import Sequence
from multilora.lora.adapter_pool import AdapterPool
from multilora.lora.request import LoRARequest
from multilora.sampling_params import SamplingParams

LORAS = {name: LoRARequest(name, i + 1, f"/adapters/{name}") for i, name in enumerate("abcde")}


def make_scheduler(num_slots=2, num_blocks=64, budget=64, max_num_seqs=16):
    config = EngineConfig(model="fake", block_size=4, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                          enable_lora=True, max_loras=num_slots)
    pool = AdapterPool(num_slots, 8, load=lambda request: request.lora_name)
    return Scheduler(config, BlockManager(num_blocks, 4), pool)


def make_seq(request_id, adapter=None, prompt_len=6):
    lora = LORAS[adapter] if adapter else None
    return Sequence(request_id, None, list(range(prompt_len)), SamplingParams(max_tokens=4), lora, adapter)


def run_step(scheduler):
    """Schedules one step and pretends the model ran it, appending a token to sequences that sampled."""
    batch = scheduler.schedule()
    for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
        seq.num_computed_tokens += num_new
        if seq.num_computed_tokens == seq.num_tokens:
            seq.output_token_ids.append(0)
    return batch


def test_never_more_distinct_adapters_in_a_step_than_slots():
    scheduler = make_scheduler(num_slots=2)
    for i, adapter in enumerate("abcabcde"):
        scheduler.add(make_seq(f"r{i}", adapter))
    while scheduler.has_unfinished():
        batch = run_step(scheduler)
        assert len({s.adapter_id for s in batch.seqs if s.adapter_id}) <= 2
        for seq in list(scheduler.running):
            if len(seq.output_token_ids) >= 2:
                scheduler.finish(seq, "length")
    assert scheduler.adapter_pool.num_holds == 0
    assert scheduler.block_manager.num_used_blocks == 0


def test_waiting_adapter_is_not_starved_by_requests_for_resident_ones():
    scheduler = make_scheduler(num_slots=1)
    scheduler.add(make_seq("a0", "a"))
    run_step(scheduler)                                  # "a" takes the only slot
    scheduler.add(make_seq("b0", "b"))                   # waits for the slot
    for step in range(20):                               # a stream of requests for resident "a"
        scheduler.add(make_seq(f"a{step + 1}", "a"))
        run_step(scheduler)
        for seq in list(scheduler.running):
            if len(seq.output_token_ids) >= 2:
                scheduler.finish(seq, "length")
        if any(s.request_id == "b0" for s in scheduler.running):
            break
    else:
        raise AssertionError("the request for adapter 'b' never got a slot")


def test_base_requests_pass_a_request_waiting_for_a_slot():
    scheduler = make_scheduler(num_slots=1)
    scheduler.add(make_seq("a0", "a"))
    scheduler.add(make_seq("b0", "b"))
    scheduler.add(make_seq("base", None))
    batch = run_step(scheduler)
    assert [s.request_id for s in batch.seqs] == ["a0", "base"]


def test_held_adapter_is_never_evicted_and_preemption_frees_blocks():
    scheduler = make_scheduler(num_slots=2, num_blocks=4, budget=64)
    first, second = make_seq("x", "a", prompt_len=7), make_seq("y", "b", prompt_len=7)
    scheduler.add(first)
    scheduler.add(second)
    run_step(scheduler)                                  # both prefilled: 2 + 2 blocks
    pool = scheduler.adapter_pool
    assert pool.is_resident(1) and pool.is_resident(2)
    run_step(scheduler)                                  # 8 tokens each: still 2 blocks
    run_step(scheduler)                                  # both need a third block: the newest is preempted
    assert second.num_preemptions == 1 and second.block_table == []
    assert first.num_preemptions == 0 and len(first.block_table) == 3
    assert pool.num_holds == 1
    pool.acquire(LORAS["c"], "c")                        # evicts the unheld "b", never the held "a"
    assert pool.is_resident(1) and pool.is_resident(3) and not pool.is_resident(2)


def test_adapter_read_from_disk_once_under_concurrent_requests():
    calls = []

    def slow_load(request):
        calls.append(request.lora_name)
        time.sleep(0.2)
        return object()

    pool = AdapterPool(2, 4, slow_load)
    results = []
    threads = [threading.Thread(target=lambda: results.append(pool.get(LORAS["a"]))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["a"]
    assert len({id(r) for r in results}) == 1
    assert pool.counters.loads == 1


def test_failed_load_is_not_cached():
    attempts = []

    def failing_load(request):
        attempts.append(1)
        raise FileNotFoundError("gone")

    pool = AdapterPool(1, 4, failing_load)
    for _ in range(2):
        try:
            pool.get(LORAS["a"])
        except FileNotFoundError:
            pass
    assert len(attempts) == 2
