"""AdapterPool: which adapter lives in which GPU slot, plus a host LRU of loaded adapters.

Pure bookkeeping: the pool never touches a device. Weights reach a slot when
the engine drains `take_pending_writes()` and hands them to the model runner.
An adapter whose slot is held by a running sequence is never evicted.
"""

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Optional

from multilora.lora.request import LoRARequest

logger = logging.getLogger(__name__)


@dataclass
class AdapterPoolCounters:
    hits: int = 0        # acquire() found the adapter already in a slot
    misses: int = 0      # acquire() had to write it into a slot
    loads: int = 0       # adapter files read from disk
    evictions: int = 0   # an adapter pushed out of a slot for another


class AdapterPool:
    def __init__(self, num_slots: int, host_capacity: int, load: Callable[[LoRARequest], object],
                 on_loaded: Optional[Callable[[str, float], None]] = None):
        self.num_slots = num_slots
        self.host_capacity = host_capacity
        self._load = load
        self._on_loaded = on_loaded
        self.counters = AdapterPoolCounters()
        # Host side: adapter_id -> loaded adapter (LRU order), and loads in flight.
        self._lock = threading.Lock()
        self._host: OrderedDict[int, object] = OrderedDict()
        self._loading: dict[int, Future] = {}
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
            self._slot_lru[adapter_id] = None    # evictable, least recently used first

    def slot_of(self, adapter_id: int) -> int:
        return self._slot_of[adapter_id]

    def take_pending_writes(self) -> list[tuple[int, object]]:
        writes, self._pending_writes = self._pending_writes, []
        return writes

    def requeue_writes(self, writes: list[tuple[int, object]]) -> None:
        """Puts back writes that failed, ahead of newer ones (which must win on the same slot)."""
        self._pending_writes = writes + self._pending_writes

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
