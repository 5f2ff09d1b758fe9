"""AdapterPool: which adapter lives in which GPU slot, plus a host LRU of loaded adapters.

Pure bookkeeping: the pool never touches a device. Weights reach a slot when
the engine drains `take_pending_writes()` and hands them to the model runner;
a write that fails is reported with `fail_write()`, which frees the slot.
An adapter whose slot is held by a running sequence is never evicted.

Failures are remembered: a load that raises an `AdapterError` (the adapter is
unservable) or a failed slot write is kept for `failure_ttl_s`, keyed by
adapter id, and later requests for that id get the same error at once instead
of another load. The resolver derives the id from the adapter's files, so a
fixed (changed) adapter has a new id and is loaded at once.
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
    evictions: int = 0   # an adapter pushed out of a slot for another
    failed_loads: int = 0            # loads that raised
    remembered_failures: int = 0     # get() answered with a remembered failure, without loading
    failed_writes: int = 0           # slot writes reported by fail_write()


# How long a failed load or write is remembered: long enough that a stream of requests for a broken
# adapter costs one load, short enough that an operator's fix under the same id is picked up soon.
FAILURE_TTL_S = 60.0
MAX_REMEMBERED_FAILURES = 1024
# Failures worth remembering: the adapter itself is unservable, or its slot write failed. Others
# (an adapter directory that vanished, a bug) are retried by the next request.
_REMEMBERED = (AdapterError, AdapterWriteError)


class AdapterPool:
    def __init__(self, num_slots: int, host_capacity: int, load: Callable[[LoRARequest], object],
                 on_loaded: Optional[Callable[[str, float], None]] = None, *,
                 failure_ttl_s: float = FAILURE_TTL_S, clock: Callable[[], float] = time.monotonic):
        self.num_slots = num_slots
        self.host_capacity = host_capacity
        self._load = load
        self._on_loaded = on_loaded
        self._failure_ttl_s = failure_ttl_s
        self._clock = clock
        self.counters = AdapterPoolCounters()
        # Host side: adapter_id -> loaded adapter (LRU order), and loads in flight.
        self._lock = threading.Lock()
        self._host: OrderedDict[int, object] = OrderedDict()
        self._loading: dict[int, Future] = {}
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
                return self._host[adapter_id]
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
            self._host[adapter_id] = adapter
            while len(self._host) > self.host_capacity:
                self._host.popitem(last=False)
        future.set_result(adapter)
        if self._on_loaded:
            self._on_loaded(lora_request.lora_name, seconds)
        return adapter

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
            slot = self._free_slot()
            self._slot_adapter[slot] = adapter_id
            self._slot_of[adapter_id] = slot
            self._slot_names[adapter_id] = lora_request.lora_name
            self._pending_writes.append((slot, adapter))
        self._holds[adapter_id] = self._holds.get(adapter_id, 0) + 1
        return self._slot_of[adapter_id]

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
        victim, _ = self._slot_lru.popitem(last=False)
        slot = self._slot_of.pop(victim)
        logger.info("Evicting adapter '%s' from GPU slot %d", self._slot_names.pop(victim), slot)
        self.counters.evictions += 1
        return slot
