"""Scheduler: picks what runs in the next step under the token, sequence, KV and adapter-slot budgets.

Every step mixes decode tokens and prefill chunks (chunked prefill). Running
sequences go first, oldest first; when the KV cache runs out, the newest running
sequence is preempted (its blocks are freed and it is recomputed later).
Waiting sequences are admitted first come, first served. A request whose adapter
cannot get a GPU slot waits, and later requests that would hold a slot wait
behind it, so a stream of requests for resident adapters cannot starve it;
base-model requests hold no slot and may pass. So, with KV blocks to spare, a
request at the head of the queue starts within the longest time a running
request takes to finish, and slot-needing requests start in the order they
joined (docs/limits.md states the bound). The adapters of the next waiting
requests are prefetched into slots nobody holds, so their copies overlap the
steps before they start.

The waiting queue is bounded (docs/limits.md): beyond `max_waiting_requests`
a new request is refused at once, and one that has not started within
`max_queue_wait_s` of its arrival is ended. Both are UNAVAILABLE: the server
is overloaded, and the client should retry later or elsewhere. A waiting
request holds no KV block and no adapter slot, so ending it frees nothing
but its place in the queue; a preempted one has already started and is
never expired.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Optional

from multilora.config import EngineConfig
from multilora.engine.block_manager import BlockManager
from multilora.engine.sequence import Sequence, SequenceStatus
from multilora.errors import QueueFullError, QueueTimeoutError
from multilora.lora.adapter_pool import AdapterPool


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]     # tokens each sequence computes this step
    # Ended this step without starting (max_queue_wait_s), each with its error; already finished.
    expired: list[tuple[Sequence, QueueTimeoutError]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


def check_queue_room(num_waiting: int, max_waiting_requests: Optional[int]) -> None:
    """Raises QueueFullError when a new request would wait beyond max_waiting_requests (None: unbounded)."""
    if max_waiting_requests is not None and num_waiting >= max_waiting_requests:
        raise QueueFullError(f"{num_waiting} requests are already waiting (max_waiting_requests "
                             f"{max_waiting_requests}); the server is overloaded: retry later or on another "
                             "instance")


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager, adapter_pool: AdapterPool):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_waiting_requests = config.max_waiting_requests
        self.max_queue_wait_s = config.max_queue_wait_s
        self.block_manager = block_manager
        self.adapter_pool = adapter_pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_steps = 0                    # non-empty steps scheduled
        self.num_step_adapters = 0            # their distinct adapters, summed (/ num_steps: the mean)
        # Of them, steps holding rows of several tokens (prompt chunks, or a preempted sequence's
        # recompute: what the model runner runs beside its decode graph), and those rows' tokens.
        self.num_prefill_steps = 0
        self.num_prefill_tokens = 0

    def add(self, seq: Sequence) -> None:
        """Queues a new request; raises QueueFullError when max_waiting_requests are already waiting."""
        check_queue_room(len(self.waiting), self.max_waiting_requests)
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [], self._expire_waiting())
        preemptions_before = self.num_preemptions
        budget = self._schedule_running(batch, self.max_num_batched_tokens)
        if self.num_preemptions == preemptions_before:   # no new work while memory is short
            self._schedule_waiting(batch, budget)
        if batch:
            self.num_steps += 1
            self.num_step_adapters += len({s.adapter_id for s in batch.seqs if s.adapter_id})
            prefill_tokens = sum(n for n in batch.num_new_tokens if n > 1)
            self.num_prefill_steps += prefill_tokens > 0
            self.num_prefill_tokens += prefill_tokens
        self._prefetch()
        return batch

    def _prefetch(self) -> None:
        """Offers the pool the adapters of the next waiting requests, as many requests as there are slots
        (a bounded look each step, however long the queue)."""
        candidates = [(seq.lora_request, seq.adapter) for seq in islice(self.waiting, self.adapter_pool.num_slots)
                      if seq.adapter_id]
        if candidates:
            self.adapter_pool.prefetch(candidates)

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue                       # preempted earlier in this loop
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.block_manager.can_grow(seq, num_new):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.grow(seq, num_new)
                batch.seqs.append(seq)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
        return budget

    def _schedule_waiting(self, batch: ScheduledBatch, budget: int) -> None:
        slot_blocked = False
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if seq.adapter_id:
                if slot_blocked or not self.adapter_pool.can_acquire(seq.adapter_id):
                    slot_blocked = True        # first come, first served for slots
                    continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.block_manager.can_grow(seq, num_new):
                break                          # first come, first served for KV blocks
            self.waiting.remove(seq)
            if seq.adapter_id:
                self.adapter_pool.acquire(seq.lora_request, seq.adapter)
            self.block_manager.grow(seq, num_new)
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.time()
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new

    def _expire_waiting(self) -> list[tuple[Sequence, QueueTimeoutError]]:
        """Ends the requests that have waited longer than max_queue_wait_s without starting.

        New requests queue in arrival order, so the scan stops at the first one
        that has not waited too long; preempted ones (at the front) are skipped.
        """
        if self.max_queue_wait_s is None:
            return []
        now, expired = time.time(), []
        for seq in self.waiting:
            if seq.num_preemptions:
                continue
            waited = now - seq.arrival_time
            if waited <= self.max_queue_wait_s:
                break
            expired.append((seq, QueueTimeoutError(
                f"the request waited {waited:.1f} s in the queue without starting (max_queue_wait_s "
                f"{self.max_queue_wait_s:g}); the server is overloaded: retry later or on another instance")))
        for seq, _ in expired:
            self.finish(seq, "abort")
        return expired

    def preempt(self, seq: Sequence) -> None:
        """Frees a running sequence's KV blocks and slot hold; it is recomputed when readmitted."""
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Removes a finished or aborted sequence and frees everything it holds."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _release(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        if seq.adapter_id:
            self.adapter_pool.release(seq.adapter_id)
