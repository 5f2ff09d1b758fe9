"""AdapterPool: remembered failures (negative cache with expiry), failed slot writes and loads one at a time,
on the CPU with fakes."""

import json
import shutil
import threading
import time

import pytest

from multilora.errors import AdapterFormatError, AdapterRangeError, AdapterScalingError, AdapterWriteError
from multilora.lora.adapter import load_adapter
from multilora.lora.adapter_pool import FAILURE_TTL_S, MAX_CONCURRENT_LOADS, AdapterPool
from multilora.lora.request import LoRARequest
from multilora.lora.resolver import AdapterResolver

A, B, C = (LoRARequest(name, i, f"/adapters/{name}") for i, name in enumerate("abc", start=1))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return Clock()


def counting_loader(fail_for=()):
    """load(request) -> a fake adapter; raises AdapterRangeError for names in `fail_for`; records every call."""
    calls = []

    def load(request):
        calls.append(request.lora_name)
        if request.lora_name in fail_for:
            raise AdapterRangeError(f"adapter '{request.lora_name}': weights too large")
        return f"adapter-{request.lora_name}"

    load.calls = calls
    return load


def test_failed_load_is_remembered_until_it_expires(clock):
    load = counting_loader(fail_for={"a"})
    pool = AdapterPool(2, 4, load, clock=clock)
    messages = set()
    for _ in range(5):
        with pytest.raises(AdapterRangeError) as info:
            pool.get(A)
        messages.add(str(info.value))
    assert load.calls == ["a"]                      # one load for five requests
    assert messages == {"adapter 'a': weights too large"}
    assert (pool.counters.failed_loads, pool.counters.remembered_failures) == (1, 4)
    clock.now += FAILURE_TTL_S + 1
    with pytest.raises(AdapterRangeError):
        pool.get(A)
    assert load.calls == ["a", "a"]                 # expired: loaded again


def test_a_new_version_is_loaded_at_once(clock):
    load = counting_loader(fail_for={"a"})
    pool = AdapterPool(2, 4, load, clock=clock)
    with pytest.raises(AdapterRangeError):
        pool.get(A)
    fixed = LoRARequest("a", 42, A.lora_path)       # the resolver gives changed files a new id
    load_fixed = counting_loader()
    pool._load = load_fixed
    assert pool.get(fixed) == "adapter-a"
    assert load_fixed.calls == ["a"]


def test_a_remembered_failure_raises_a_fresh_error_each_time(clock):
    pool = AdapterPool(2, 4, counting_loader(fail_for={"a"}), clock=clock)
    errors = []
    for _ in range(3):
        with pytest.raises(AdapterRangeError) as info:
            pool.get(A)
        errors.append(info.value)
    assert len({id(e) for e in errors}) == 3        # re-raising one object would grow its traceback for ever


def test_errors_that_are_not_the_adapters_fault_are_not_remembered(clock):
    calls = []

    def load(request):
        calls.append(1)
        raise OSError("disk hiccup")

    pool = AdapterPool(2, 4, load, clock=clock)
    for _ in range(2):
        with pytest.raises(OSError):
            pool.get(A)
    assert len(calls) == 2


def test_fail_write_frees_the_slot_and_remembers(clock):
    load = counting_loader()
    pool = AdapterPool(2, 4, load, clock=clock)
    slot_a = pool.acquire(A, pool.get(A))
    pool.acquire(A, pool.get(A))                    # two sequences hold it
    slot_b = pool.acquire(B, pool.get(B))
    assert [s for s, _ in pool.take_pending_writes()] == [slot_a, slot_b]
    error = AdapterWriteError("adapter 'a' could not be copied to the GPU")
    assert pool.fail_write(slot_a, error) == A.lora_int_id
    assert not pool.is_resident(A.lora_int_id) and pool.resident_adapter_names == ["b"]
    with pytest.raises(AdapterWriteError, match="could not be copied"):
        pool.get(A)                                 # new requests fail at once, without a load
    assert load.calls == ["a", "b"]
    pool.release(A.lora_int_id)                     # the failed sequences finish
    pool.release(A.lora_int_id)
    assert pool.num_holds == 1                      # b's
    # The freed slot is free, not evictable: C takes it without evicting b, and a is never "evicted".
    assert pool.can_acquire(C.lora_int_id)
    assert pool.acquire(C, pool.get(C)) == slot_a
    assert pool.counters.evictions == 0 and pool.counters.failed_writes == 1
    assert pool.take_pending_writes() == [(slot_a, "adapter-c")]


def test_remembered_failures_are_bounded(clock, monkeypatch):
    monkeypatch.setattr("multilora.lora.adapter_pool.MAX_REMEMBERED_FAILURES", 3)

    def load(request):
        raise AdapterFormatError(f"adapter '{request.lora_name}' is broken")

    pool = AdapterPool(2, 4, load, clock=clock)
    for i in range(10):
        with pytest.raises(AdapterFormatError):
            pool.get(LoRARequest(f"x{i}", 100 + i, "/x"))
    assert len(pool._failed) == 3 and list(pool._failed) == [107, 108, 109]


def test_a_fixed_adapter_is_a_new_version_and_loads_at_once(peft_adapters, spec, tmp_path, clock):
    """Resolver + pool + loader: a broken adapter costs one load; fixing its files gives a new id, loaded at once."""
    directory = shutil.copytree(peft_adapters["attn_r4"][0], tmp_path / "root" / "tenant")
    config_path = directory / "adapter_config.json"
    good = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**good, "lora_alpha": float("nan")}))
    resolver = AdapterResolver([tmp_path / "root"])
    pool = AdapterPool(2, 4, lambda request: load_adapter(request, spec, 16), clock=clock)
    for _ in range(3):
        with pytest.raises(AdapterScalingError):
            pool.get(resolver.resolve("tenant"))
    assert (pool.counters.failed_loads, pool.counters.remembered_failures) == (1, 2)
    config_path.write_text(json.dumps(good))            # the tenant fixes the adapter; no time passes
    adapter = pool.get(resolver.resolve("tenant"))
    assert adapter.name == "tenant" and pool.counters.loads == 1


# ---- timings, events and prefetch ---------------------------------------------------------

class Adapter:
    """A stand-in adapter that reports when its memory is freed."""

    def __init__(self, name, freed):
        self.name, self._freed = name, freed

    def __del__(self):
        self._freed.append(self.name)


def test_loads_uploads_and_evictions_are_counted_timed_and_reported():
    events, freed = [], []
    pool = AdapterPool(1, 2, lambda request: Adapter(request.lora_name, freed), on_event=events.append)
    for request in (A, B, C):                       # the third load drops "a" from host memory
        pool.get(request)
    assert freed == ["a"]                           # nothing else held it: freed as it was evicted
    assert [(e.kind, e.adapter_name) for e in events] == [("load", "a"), ("load", "b"), ("load", "c"),
                                                         ("host_eviction", "a")]
    pool.acquire(B, pool.get(B))
    pool.release(B.lora_int_id)
    pool.acquire(C, pool.get(C))                    # the one slot: "b" (unheld) is evicted
    pool.record_upload("c", 0.004)
    c = pool.counters
    assert (c.loads, c.host_evictions, c.evictions, c.uploads) == (3, 1, 1, 1)
    assert c.upload_seconds == 0.004
    assert c.load_seconds >= 0 and c.eviction_seconds >= 0 and c.host_eviction_seconds >= 0
    assert [e.kind for e in events[4:]] == ["gpu_eviction", "upload"]
    assert events[4].adapter_name == "b" and events[5].seconds == 0.004


def test_prefetch_fills_free_and_unwanted_slots_and_never_a_held_one():
    pool = AdapterPool(3, 8, counting_loader())
    D = LoRARequest("d", 4, "/adapters/d")
    pool.acquire(A, pool.get(A))                    # held by a running request
    pool.acquire(B, pool.get(B))
    pool.release(B.lora_int_id)                     # resident, unheld
    pool.take_pending_writes()
    # Waiting: c, b, d. "c" takes the free slot; "b" is resident already; "d" finds no slot:
    # "a" is held and "b" is wanted.
    assert pool.prefetch([(r, pool.get(r)) for r in (C, B, D)]) == 1
    assert pool.resident_adapter_names == ["a", "b", "c"]
    assert pool.take_pending_writes() == [(2, "adapter-c")]
    # Nobody holds "c": once only "d" waits, "b" (least recently used) is evicted for it, and "c" kept.
    assert pool.prefetch([(D, pool.get(D))]) == 1
    assert sorted(pool.resident_adapter_names) == ["a", "c", "d"]
    assert (pool.counters.prefetches, pool.counters.evictions, pool.num_holds) == (2, 1, 1)
    # Admission finds the prefetched adapter resident: a hit, no second write.
    pool.acquire(D, pool.get(D))
    assert pool.counters.hits == 1 and pool.take_pending_writes() == [(1, "adapter-d")]


def _overlap_loader(fail_for=()):
    """load(request) that sleeps a little and records the most loads it saw running at once."""
    lock, state = threading.Lock(), {"running": 0, "most": 0}

    def load(request):
        with lock:
            state["running"] += 1
            state["most"] = max(state["most"], state["running"])
        time.sleep(0.02)
        with lock:
            state["running"] -= 1
        if request.lora_name in fail_for:
            raise AdapterRangeError(f"adapter '{request.lora_name}': weights too large")
        return f"adapter-{request.lora_name}"

    load.state = state
    return load


def _get_all(pool, requests):
    errors = []

    def get(request):
        try:
            pool.get(request)
        except AdapterRangeError as error:
            errors.append(error)

    threads = [threading.Thread(target=get, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    return errors


@pytest.mark.parametrize("limit", [None, 2])
def test_loads_of_different_adapters_run_at_most_the_limit_at_once(limit):
    load = _overlap_loader()
    kwargs = {} if limit is None else {"max_concurrent_loads": limit}
    pool = AdapterPool(2, 16, load, **kwargs)
    requests = [LoRARequest(f"x{i}", 10 + i, f"/adapters/x{i}") for i in range(6)]
    assert _get_all(pool, requests) == []
    assert load.state["most"] == (MAX_CONCURRENT_LOADS if limit is None else limit) and MAX_CONCURRENT_LOADS == 1
    assert pool.counters.loads == 6
    # Each load's time is its own, not its wait behind the others: 6 loads of ~20 ms, one at a time.
    assert pool.counters.load_seconds < 6 * 0.02 * 3


def test_a_failed_load_lets_the_next_one_run():
    load = _overlap_loader(fail_for=("x0",))
    pool = AdapterPool(2, 16, load)
    requests = [LoRARequest(f"x{i}", 10 + i, f"/adapters/x{i}") for i in range(3)]
    errors = _get_all(pool, requests)
    assert len(errors) == 1 and "x0" in str(errors[0])
    assert pool.counters.loads == 2 and pool.counters.failed_loads == 1
    assert pool.get(requests[1]) == "adapter-x1"    # from host memory, no load
