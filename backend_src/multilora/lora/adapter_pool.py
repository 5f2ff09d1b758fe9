"""AdapterPool: which adapter lives in which GPU slot, plus a host LRU of loaded adapters.

Pure bookkeeping: the pool never touches a device. Weights reach a slot when
the engine drains `take_pending_writes()` and hands them to the model runner;
a write that fails is reported with `fail_write()`, which frees the slot; the
runner times each upload on the device and the engine reports it with
`record_upload()`. An adapter whose slot is held by a running sequence is
never evicted. `prefetch()` places the adapters of the next waiting requests
in slots nobody holds, so their copies overlap the steps before they start.

Loads (disk -> host memory), uploads (host -> GPU slot) and evictions (GPU
slot, host LRU) are counted and timed in `counters`, and each is reported to
`on_event` as an `AdapterEvent` (the Triton model turns them into histograms).

Failures are remembered: a load that raises an `AdapterError` (the adapter is
unservable) or a failed slot write is kept for `failure_ttl_s`, keyed by
adapter id, and later requests for that id get the same error at once instead
of another load. The resolver derives the id from the adapter's files, so a
fixed (changed) adapter has a new id and is loaded at once.

Loads of different adapters run one at a time (`max_concurrent_loads`): a load is
CPU work in the engine's process (parse, check, copy into a pinned image) that
holds the GIL for part of its time, and beside the engine thread several at once
read no faster than one while slowing every step they overlap.
"""

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Optional

from multilora.errors import AdapterError, AdapterWriteError, MultiLoRAError
from multilora.lora.request import LoRARequest

logger = logging.getLogger(__name__)


@dataclass
class AdapterPoolCounters:
    hits: int = 0        # acquire() found the adapter already in a slot
    misses: int = 0      # acquire() had to write it into a slot
    loads: int = 0       # adapter files read from disk
    load_seconds: float = 0.0        # their time: read, validation, host image (AdapterEvent.LOAD)
    uploads: int = 0                 # adapters copied from host memory into a GPU slot
    upload_seconds: float = 0.0      # their time on the device (AdapterEvent.UPLOAD)
    prefetches: int = 0              # slots filled by prefetch() for a waiting request
    evictions: int = 0   # an adapter pushed out of a slot for another
    eviction_seconds: float = 0.0    # their time: bookkeeping only (the copy that replaces it is an upload)
    host_evictions: int = 0          # adapters dropped from the host LRU (max_cpu_loras) for newer ones
    host_eviction_seconds: float = 0.0   # their time: dropping the host copy (and its pinned image)
    failed_loads: int = 0            # loads that raised
    remembered_failures: int = 0     # get() answered with a remembered failure, without loading
    failed_writes: int = 0           # slot writes reported by fail_write()


@dataclass(frozen=True)
class AdapterEvent:
    """One timed pool event, as `on_event` receives it."""

    LOAD = "load"                    # disk -> host memory
    UPLOAD = "upload"                # host memory -> GPU slot
    GPU_EVICTION = "gpu_eviction"    # out of a GPU slot
    HOST_EVICTION = "host_eviction"  # out of the host LRU

    kind: str
    adapter_name: str
    seconds: float


# How long a failed load or write is remembered: long enough that a stream of requests for a broken
# adapter costs one load, short enough that an operator's fix under the same id is picked up soon.
FAILURE_TTL_S = 60.0
MAX_REMEMBERED_FAILURES = 1024
# Adapter reads at once. `python bench/bench_concurrent_loads.py` (bench/RESULTS.md, 2026-12-02, this project's
# 2-core development machine): beside a thread doing a decode step's host work, 1, 2 and 4 loaders of
# rank-16 Llama-3-8B adapters read 8.3, 11.3 and 11.6 adapters/s while that thread's step took 1.31x, 2.25x
# and 3.51x its time alone. On the H200 host, issue 8's part B with ~1.5 loads at a time took ~380 ms a
# load, one at a time 186 ms (2324 -> 2569 tok/s), and part C's time per token while adapters load fell
# from 2.3-2.6x the warm one to 1.73x. (engine/load_workers.py runs loads in processes instead.)
MAX_CONCURRENT_LOADS = 1
# Failures worth remembering: the adapter itself is unservable, or its slot write failed. Others
# (an adapter directory that vanished, a bug) are retried by the next request.
_REMEMBERED = (AdapterError, AdapterWriteError)


class AdapterPool:
    def __init__(self, num_slots: int, host_capacity: int, load: Callable[[LoRARequest], object],
                 on_event: Optional[Callable[[AdapterEvent], None]] = None, *,
                 failure_ttl_s: float = FAILURE_TTL_S, clock: Callable[[], float] = time.monotonic,
                 max_concurrent_loads: int = MAX_CONCURRENT_LOADS):
        assert max_concurrent_loads >= 1, max_concurrent_loads
        self.num_slots = num_slots
        self.host_capacity = host_capacity
        self._load = load
        self._on_event = on_event
        self._failure_ttl_s = failure_ttl_s
        self._clock = clock
        self.counters = AdapterPoolCounters()
        # Host side: adapter_id -> loaded adapter (LRU order), and loads in flight.
        self._lock = threading.Lock()
        self._host: OrderedDict[int, tuple[str, object]] = OrderedDict()   # id -> (name, adapter), LRU first
        self._loading: dict[int, Future] = {}
        self._reading = threading.BoundedSemaphore(max_concurrent_loads)   # taken for each load, outside _lock
        self._failed: OrderedDict[int, tuple[float, MultiLoRAError]] = OrderedDict()   # id -> (expiry, error)
        # GPU side (touched by the engine thread only).
        self._slot_adapter: list[Optional[int]] = [None] * num_slots
        self._slot_of: dict[int, int] = {}
        self._slot_names: dict[int, str] = {}
        self._holds: dict[int, int] = {}
        self._slot_lru: OrderedDict[int, None] = OrderedDict()   # resident, unheld adapter ids
        self._pending_writes: list[tuple[int, object]] = []

    # ---- host LRU -------------------------------------------------------
    def get(self, lora_request: LoRARequest):
        """Returns the loaded adapter, reading it from disk once even under concurrent calls."""
        adapter_id = lora_request.lora_int_id
        with self._lock:
            if adapter_id in self._host:
                self._host.move_to_end(adapter_id)
                return self._host[adapter_id][1]
            remembered = self._remembered_failure(adapter_id)
            if remembered is not None:
                self.counters.remembered_failures += 1
                raise remembered
            future = self._loading.get(adapter_id)
            owner = future is None
            if owner:
                future = self._loading[adapter_id] = Future()
        if not owner:
            return future.result()
        try:
            with self._reading:             # a load's own time, without its wait for an earlier one
                start = time.perf_counter()
                adapter = self._load(lora_request)
                seconds = time.perf_counter() - start
        except BaseException as error:
            with self._lock:
                del self._loading[adapter_id]
                self.counters.failed_loads += 1
                if isinstance(error, _REMEMBERED):
                    self._remember_failure(adapter_id, error)
            future.set_exception(error)
            raise
        with self._lock:
            del self._loading[adapter_id]
            self.counters.loads += 1
            self.counters.load_seconds += seconds
            self._host[adapter_id] = (lora_request.lora_name, adapter)
            evicted = self._evict_host()
        future.set_result(adapter)
        self._report(AdapterEvent.LOAD, lora_request.lora_name, seconds)
        for event in evicted:
            self._report(*event)
        return adapter

    def _evict_host(self) -> list[tuple[str, str, float]]:
        """Drops the least recently used host copies beyond host_capacity (lock held); returns their events.

        A request that still holds one keeps it alive; only the pool forgets it.
        """
        evicted = []
        while len(self._host) > self.host_capacity:
            start = time.perf_counter()
            _, (name, adapter) = self._host.popitem(last=False)
            del adapter                          # frees its memory here when nothing else holds it
            seconds = time.perf_counter() - start
            self.counters.host_evictions += 1
            self.counters.host_eviction_seconds += seconds
            evicted.append((AdapterEvent.HOST_EVICTION, name, seconds))
        return evicted

    def _report(self, kind: str, adapter_name: str, seconds: float) -> None:
        if self._on_event is not None:
            self._on_event(AdapterEvent(kind, adapter_name, seconds))

    def check_not_failed(self, adapter_id: int) -> None:
        """Raises the remembered failure of `adapter_id`, if any: a request prepared before its
        write failed must not trigger the write again."""
        with self._lock:
            remembered = self._remembered_failure(adapter_id)
            if remembered is not None:
                self.counters.remembered_failures += 1
        if remembered is not None:
            raise remembered

    # ---- GPU slots ------------------------------------------------------
    def is_resident(self, adapter_id: int) -> bool:
        return adapter_id in self._slot_of

    def can_acquire(self, adapter_id: int) -> bool:
        return adapter_id in self._slot_of or None in self._slot_adapter or bool(self._slot_lru)

    def acquire(self, lora_request: LoRARequest, adapter) -> int:
        """Holds a slot for the adapter (writing it there if needed); returns the slot."""
        adapter_id = lora_request.lora_int_id
        if adapter_id in self._slot_of:
            self.counters.hits += 1
            self._slot_lru.pop(adapter_id, None)
        else:
            self.counters.misses += 1
            self._place(self._free_slot(), lora_request, adapter)
        self._holds[adapter_id] = self._holds.get(adapter_id, 0) + 1
        return self._slot_of[adapter_id]

    def prefetch(self, candidates: list[tuple[LoRARequest, object]]) -> int:
        """Writes the adapters of the next waiting requests (in queue order) into slots no request holds.

        Their uploads then overlap the steps before those requests start, instead of delaying the
        step that admits them. Only a free slot or an unheld adapter that no candidate needs is taken;
        a prefetched adapter is held by nobody, so admission may still evict it (least recently used
        first, and it is the most recent). Returns how many adapters were placed.
        """
        wanted = {lora_request.lora_int_id for lora_request, _ in candidates}
        placed = 0
        for lora_request, adapter in candidates:
            if lora_request.lora_int_id in self._slot_of:
                continue
            if None in self._slot_adapter:
                slot = self._slot_adapter.index(None)
            else:
                victim = next((a for a in self._slot_lru if a not in wanted), None)
                if victim is None:
                    break
                slot = self._evict(victim)
            self._place(slot, lora_request, adapter)
            self._slot_lru[lora_request.lora_int_id] = None
            self.counters.prefetches += 1
            placed += 1
        return placed

    def record_upload(self, adapter_name: str, seconds: float) -> None:
        """An upload into a slot finished on the device after `seconds` (the model runner measures it)."""
        self.counters.uploads += 1
        self.counters.upload_seconds += seconds
        self._report(AdapterEvent.UPLOAD, adapter_name, seconds)

    def _place(self, slot: int, lora_request: LoRARequest, adapter) -> None:
        adapter_id = lora_request.lora_int_id
        self._slot_adapter[slot] = adapter_id
        self._slot_of[adapter_id] = slot
        self._slot_names[adapter_id] = lora_request.lora_name
        self._pending_writes.append((slot, adapter))

    def release(self, adapter_id: int) -> None:
        holds = self._holds[adapter_id] - 1
        if holds:
            self._holds[adapter_id] = holds
        else:
            del self._holds[adapter_id]
            if adapter_id in self._slot_of:      # not when its write failed and freed the slot
                self._slot_lru[adapter_id] = None    # evictable, least recently used first

    def slot_of(self, adapter_id: int) -> int:
        return self._slot_of[adapter_id]

    def take_pending_writes(self) -> list[tuple[int, object]]:
        writes, self._pending_writes = self._pending_writes, []
        return writes

    def fail_write(self, adapter_slot: int, error: MultiLoRAError) -> int:
        """The write into `adapter_slot` failed: frees the slot, drops the host copy, remembers `error`.

        Returns the id of the adapter that was to live there; the caller ends
        the sequences that need it (their holds are released as they finish),
        and until the failure expires `get()` raises `error` for that id.
        """
        adapter_id = self._slot_adapter[adapter_slot]
        assert adapter_id is not None, f"fail_write({adapter_slot}) on an empty slot"
        self._slot_adapter[adapter_slot] = None
        del self._slot_of[adapter_id]
        self._slot_names.pop(adapter_id, None)
        self._slot_lru.pop(adapter_id, None)
        self.counters.failed_writes += 1
        with self._lock:
            self._host.pop(adapter_id, None)
            self._remember_failure(adapter_id, error)
        return adapter_id

    # ---- remembered failures (lock held) ----------------------------------
    def _remember_failure(self, adapter_id: int, error: MultiLoRAError) -> None:
        now = self._clock()
        while self._failed and (next(iter(self._failed.values()))[0] <= now
                                or len(self._failed) >= MAX_REMEMBERED_FAILURES):
            self._failed.popitem(last=False)
        self._failed.pop(adapter_id, None)
        self._failed[adapter_id] = (now + self._failure_ttl_s, error)

    def _remembered_failure(self, adapter_id: int) -> Optional[MultiLoRAError]:
        """A fresh copy of the remembered error (re-raising one object would grow its traceback), or None."""
        entry = self._failed.get(adapter_id)
        if entry is None:
            return None
        expiry, error = entry
        if expiry <= self._clock():
            del self._failed[adapter_id]
            return None
        return type(error)(str(error))

    @property
    def num_holds(self) -> int:
        return sum(self._holds.values())

    @property
    def resident_adapter_names(self) -> list[str]:
        return [self._slot_names[a] for a in self._slot_adapter if a is not None]

    def _free_slot(self) -> int:
        if None in self._slot_adapter:
            return self._slot_adapter.index(None)
        assert self._slot_lru, "acquire() without can_acquire()"
        return self._evict(next(iter(self._slot_lru)))

    def _evict(self, victim: int) -> int:
        """Takes the slot of unheld adapter `victim`; returns it (its new adapter is written over it)."""
        start = time.perf_counter()
        del self._slot_lru[victim]
        slot = self._slot_of.pop(victim)
        name = self._slot_names.pop(victim)
        seconds = time.perf_counter() - start
        logger.info("Evicting adapter '%s' from GPU slot %d", name, slot)
        self.counters.evictions += 1
        self.counters.eviction_seconds += seconds
        self._report(AdapterEvent.GPU_EVICTION, name, seconds)
        return slot
