"""Scheduler, block manager and adapter pool: pure bookkeeping, tested with fakes on any CPU."""

import random
import threading
import time

import pytest

from multilora.config import EngineConfig
from multilora.engine.block_manager import BlockManager
from multilora.engine.scheduler import Scheduler
from multilora.engine.sequence import Sequence, SequenceStatus
from multilora.errors import QueueFullError
from multilora.lora.adapter_pool import AdapterPool
from multilora.lora.request import LoRARequest
from multilora.sampling_params import SamplingParams

LORAS = {name: LoRARequest(name, i + 1, f"/adapters/{name}") for i, name in enumerate("abcde")}


def make_scheduler(num_slots=2, num_blocks=64, budget=64, max_num_seqs=16, **config):
    config = EngineConfig(model="fake", block_size=4, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs,
                          enable_lora=True, max_loras=num_slots, **config)
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


def test_the_next_waiting_requests_adapter_is_written_before_it_starts():
    scheduler = make_scheduler(num_slots=2, max_num_seqs=1)
    pool = scheduler.adapter_pool
    first, second = make_seq("a0", "a"), make_seq("b0", "b")
    scheduler.add(first)
    scheduler.add(second)
    assert [s.request_id for s in run_step(scheduler).seqs] == ["a0"]     # one seat
    assert pool.take_pending_writes() == [(0, "a"), (1, "b")]            # "b" written a step ahead
    assert second.first_scheduled_time is None and first.first_scheduled_time >= first.arrival_time
    scheduler.finish(first, "length")
    assert [s.request_id for s in run_step(scheduler).seqs] == ["b0"]
    assert pool.take_pending_writes() == []                              # found in its slot: no write
    assert (pool.counters.prefetches, pool.counters.hits, pool.counters.misses) == (1, 1, 1)
    assert (scheduler.num_steps, scheduler.num_step_adapters) == (2, 2)


def test_a_rare_adapter_behind_a_stream_of_popular_ones_starts_within_the_bound():
    """Two slots, a steady stream for "a" and "b" (4-step requests), one request for "e" among them:
    at the head of the queue it waits at most one request's steps (docs/limits.md), prefetch or not."""
    scheduler = make_scheduler(num_slots=2, num_blocks=512, budget=256, max_num_seqs=32)
    rare, head_steps = None, 0
    for step in range(60):
        for adapter in "ab":
            scheduler.add(make_seq(f"{adapter}{step}", adapter))
        if step == 10:
            rare = make_seq("rare", "e")
            scheduler.add(rare)
        if rare is not None and scheduler.waiting and scheduler.waiting[0] is rare:
            head_steps += 1
        run_step(scheduler)
        for seq in list(scheduler.running):
            if len(seq.output_token_ids) >= 4:
                scheduler.finish(seq, "length")
        if rare is not None and rare.first_scheduled_time is not None:
            break
    assert rare.status is SequenceStatus.RUNNING and head_steps <= 4


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


# ---- the bounded waiting queue (docs/limits.md) ------------------------------------


def test_a_full_waiting_queue_refuses_new_requests_at_once():
    scheduler = make_scheduler(max_waiting_requests=2, max_num_seqs=1)
    scheduler.add(make_seq("r0"))
    scheduler.add(make_seq("r1"))
    with pytest.raises(QueueFullError) as info:
        scheduler.add(make_seq("r2"))
    assert info.value.code == "UNAVAILABLE"
    assert "2 requests are already waiting (max_waiting_requests 2)" in str(info.value)
    assert [s.request_id for s in scheduler.waiting] == ["r0", "r1"]
    run_step(scheduler)                                  # r0 starts: room for one more
    scheduler.add(make_seq("r2"))
    assert [s.request_id for s in scheduler.waiting] == ["r1", "r2"]


def test_unbounded_queue_when_max_waiting_requests_is_none():
    scheduler = make_scheduler(max_waiting_requests=None)
    for i in range(3000):
        scheduler.add(make_seq(f"r{i}"))
    assert len(scheduler.waiting) == 3000


def test_a_request_waiting_too_long_ends_and_holds_nothing():
    scheduler = make_scheduler(num_slots=1, max_queue_wait_s=5.0)
    scheduler.add(make_seq("a0", "a"))
    run_step(scheduler)                                  # "a" holds the only slot
    late, fresh = make_seq("b0", "b"), make_seq("c0", "c")
    late.arrival_time -= 10                              # it has waited 10 s for a slot
    scheduler.add(late)
    scheduler.add(fresh)
    batch = run_step(scheduler)
    [(seq, error)] = batch.expired
    assert seq is late and error.code == "UNAVAILABLE"
    assert str(error).startswith("the request waited 10.0 s in the queue without starting (max_queue_wait_s 5)")
    assert late.status is SequenceStatus.FINISHED and late.finish_reason == "abort"
    assert [s.request_id for s in scheduler.waiting] == ["c0"]
    assert [s.request_id for s in batch.seqs] == ["a0"]
    assert scheduler.adapter_pool.num_holds == 1         # a0's only
    assert run_step(scheduler).expired == []


def test_a_preempted_request_is_never_expired():
    scheduler = make_scheduler(num_blocks=4, max_queue_wait_s=1.0)
    first, second = make_seq("x", prompt_len=7), make_seq("y", prompt_len=7)
    scheduler.add(first)
    scheduler.add(second)
    for _ in range(3):
        run_step(scheduler)                              # the third step preempts y
    assert second.num_preemptions == 1
    second.arrival_time -= 100
    assert run_step(scheduler).expired == []
    assert second.status is not SequenceStatus.FINISHED


def test_expiry_is_off_by_default():
    scheduler = make_scheduler(num_slots=1)
    scheduler.add(make_seq("a0", "a"))
    run_step(scheduler)
    old = make_seq("b0", "b")
    old.arrival_time -= 10**6
    scheduler.add(old)
    assert run_step(scheduler).expired == []


# ---- fairness under a popularity-skewed stream ----------------------------------------

REQUEST_STEPS = 4   # each request: one prefill step and three decode steps


def run_skewed_stream(seed: int, num_steps: int = 200):
    """Two slots, five adapters with skewed popularity (half the requests for "a"), about one arrival a step.

    Returns, per request: (arrival step, admission step, requests waiting ahead of it on arrival),
    and per request the steps it spent at the head of the waiting queue.
    """
    rng = random.Random(seed)
    scheduler = make_scheduler(num_slots=2, num_blocks=512, budget=256, max_num_seqs=32)
    record, head_steps = {}, {}
    for step in range(num_steps):
        arrivals = rng.choice([0, 1, 1, 2]) if step < num_steps - 60 else 0      # then let the queue drain
        for _ in range(arrivals):
            adapter = rng.choices("abcde", [0.5, 0.3, 0.1, 0.06, 0.04])[0]
            seq = Sequence(f"r{len(record)}", None, list(range(6)), SamplingParams(max_tokens=REQUEST_STEPS),
                           LORAS[adapter], adapter)
            record[seq.request_id] = [step, None, len(scheduler.waiting)]
            scheduler.add(seq)
        if scheduler.waiting:
            head = scheduler.waiting[0].request_id
            head_steps[head] = head_steps.get(head, 0) + 1
        for seq in run_step(scheduler).seqs:
            if record[seq.request_id][1] is None:
                record[seq.request_id][1] = step
        for seq in list(scheduler.running):
            if len(seq.output_token_ids) >= REQUEST_STEPS:
                scheduler.finish(seq, "length")
    assert not scheduler.has_unfinished()
    return record, head_steps


@pytest.mark.parametrize("seed", range(4))
def test_no_request_waits_beyond_the_bound_under_skewed_popularity(seed):
    # The bound: at the head of the queue a request waits at most REQUEST_STEPS steps (no later request
    # may take a slot before it, so a held slot frees once its holders finish), hence a request with
    # k requests ahead of it on arrival starts within (k + 1) * REQUEST_STEPS steps.
    record, head_steps = run_skewed_stream(seed)
    assert len(record) > 100
    assert max(head_steps.values()) <= REQUEST_STEPS
    for request_id, (arrived, admitted, ahead) in record.items():
        assert admitted is not None, request_id
        assert admitted - arrived <= (ahead + 1) * REQUEST_STEPS, (request_id, arrived, admitted, ahead)


def test_prefill_steps_and_tokens_are_counted_apart_from_decode():
    """Steps holding rows of several tokens (prompt chunks) and their tokens: the counters behind
    multilora:prefill_steps_total and prefill_tokens_total."""
    scheduler = make_scheduler(budget=8)
    scheduler.add(make_seq("a", prompt_len=6))
    scheduler.add(make_seq("b", prompt_len=6))
    batches = [run_step(scheduler).num_new_tokens for _ in range(3)]
    assert batches == [[6, 2], [1, 4], [1, 1]]      # b's prompt in two chunks beside a's decode
    assert (scheduler.num_steps, scheduler.num_prefill_steps, scheduler.num_prefill_tokens) == (3, 2, 12)
