"""AsyncLLMEngine: the engine for servers.

One background thread owns the LLMEngine: it drains an inbound queue (add,
abort, ended, shutdown) and calls `step_events()`; nothing else touches
scheduler state. A second thread turns its token events into RequestOutputs
(detokenization, stop strings: the OutputProcessor) and calls the callbacks, so
text never costs the GPU a step; a stop string it finds goes back to the engine
thread as an "ended" message that frees the request. Request validation and
adapter loading (disk reads) run on a small worker pool before a request
reaches the engine thread, so a slow adapter load never stalls decoding. Each
request's outputs go to its `on_output` callback; exactly one of them has
`finished=True`, whatever happens: errors, aborts, engine failures and shutdown
all end a request through `_finish`, and everything the engine knows about is
delivered by the output thread, in the order the engine thread sent it.
"""

import asyncio
import logging
import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

import torch

from multilora.config import EngineConfig
from multilora.engine.frozen_heap import freeze_start_up_heap, unfreeze_heap
from multilora.engine.llm_engine import EngineStats, LLMEngine
from multilora.engine.output_processor import OutputProcessor
from multilora.engine.scheduler import check_queue_room
from multilora.errors import (EngineStoppedError, InvalidRequestError, MultiLoRAError, RequestCancelledError,
                             WorkerFailedError)
from multilora.lora.adapter_pool import AdapterEvent
from multilora.lora.request import LoRARequest
from multilora.outputs import CompletionOutput, RequestOutput
from multilora.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput], None]
_STATS_EVERY_S = 0.05
_IDLE_CHECK_S = 1.0       # idle, the engine thread still checks this often that its workers live
# The engine, output and preparing threads share one GIL, and every torch call releases it: a thread
# that released it waits up to the switch interval (Python's default 5 ms) for a busy thread to yield.
# An adapter load makes ~1000 such calls: beside one busy Python thread it took 0.9-2 s instead of
# 30 ms at 5 ms, 62-80 ms at 0.2 ms (bench/bench_adapter_load.py). The engine thread pays the same
# wait at each launch while the output thread detokenizes.
_SWITCH_INTERVAL_S = 0.0002
# On a GPU, each torch op of a preparing thread (an adapter's read, checks and host image copy ~100 MB)
# would start a team of intra-op threads as wide as the machine, beside engine, output and client
# threads that keep cores busy, and wait for its slowest member to be scheduled. On the H200 host (16
# cores), beside an engine-like thread and a Python thread, a rank-16 load took 474 ms and its host
# image 705 ms, against 82 and 27 ms idle, and the engine-like step grew from 6.5 to 8.0 ms meanwhile;
# with one intra-op thread 138 and 107 ms, the step 6.4 (bench/RESULTS.md, 2026-12-02). One intra-op
# thread each, as vLLM runs its GPU workers. torch keeps it as the default of threads whose first
# parallel op comes later; on a GPU the engine's own CPU math is small.
_PREPARE_INTRA_OP_THREADS = 1


def error_output(request_id: str, error: MultiLoRAError, lora_request=None) -> RequestOutput:
    return RequestOutput(request_id, None, [], [CompletionOutput(0, "", [], "abort")], True, lora_request,
                         error=error)


@dataclass
class _Request:
    on_output: OutputCallback
    lora_request: Optional[LoRARequest]
    cancelled: bool = False         # aborted before the engine took it: drop it when it arrives


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, on_adapter_event: Optional[Callable[[AdapterEvent], None]] = None):
        """`on_adapter_event`: each adapter load, upload and eviction, timed (called from engine threads)."""
        self.engine = LLMEngine(config, on_adapter_event)
        if sys.getswitchinterval() > _SWITCH_INTERVAL_S:    # process-wide; never made longer here
            sys.setswitchinterval(_SWITCH_INTERVAL_S)
        self.tokenizer = self.engine.tokenizer
        self.request_limits = self.engine.request_limits
        self._inbox: queue.Queue = queue.Queue()
        self._live: dict[str, _Request] = {}    # every request without its final output yet
        self._lock = threading.Lock()
        self._stopped = False
        self.failure: Optional[str] = None      # why the engine thread died, if it did (servers report it)
        self._stats = self.engine.stats()
        self._prepare_pool = ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="multilora-prepare",
            initializer=_limit_intra_op_threads if self.engine.runner.on_gpu else None)
        self._processor = OutputProcessor(self.tokenizer)
        self._outbox: queue.Queue = queue.Queue()     # engine thread -> output thread, in order
        self._output_thread = threading.Thread(target=self._run_outputs, name="multilora-outputs", daemon=True)
        self._thread = threading.Thread(target=self._run, name="multilora-engine", daemon=True)
        freeze_start_up_heap()        # before the threads start: see frozen_heap.py
        self._output_thread.start()
        self._thread.start()

    # ---- public API (any thread) ----------------------------------------
    def add_request(self, request_id: str, prompt, params: SamplingParams,
                    lora_request: Optional[LoRARequest] = None, on_output: OutputCallback = None) -> None:
        """Submits a request; its outputs, errors included, arrive through `on_output`."""
        with self._lock:
            if self._stopped:
                raise EngineStoppedError("the engine is shutting down; retry on another instance")
            # At once, before any preparing: every live request not running is waiting (or about to).
            check_queue_room(len(self._live) - self._stats.num_running, self.engine.config.max_waiting_requests)
            duplicate = request_id in self._live
            if not duplicate:
                self._live[request_id] = _Request(on_output, lora_request)
                self._prepare_pool.submit(self._prepare, request_id, prompt, params, lora_request, time.time())
        if duplicate:
            error = InvalidRequestError(f"request id {request_id!r} is already in use; send a unique id")
            _deliver(on_output, error_output(request_id, error, lora_request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def generate(self, request_id: str, prompt, params: SamplingParams,
                       lora_request: Optional[LoRARequest] = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs; raises its error, if any, after the last one.

        Leaving the loop early (break, cancellation) aborts the request.
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()

        def deliver(out: RequestOutput) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, out)
            except RuntimeError:        # the caller's event loop is closed: no one reads this request any more
                self.abort(request_id)

        self.add_request(request_id, prompt, params, lora_request, deliver)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                if out.error is not None:
                    raise out.error
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    def stats(self) -> EngineStats:
        return self._stats      # replaced, never mutated, by the engine thread

    @property
    def is_alive(self) -> bool:
        """Whether the engine thread still runs (False after shutdown or a failure; see `failure`)."""
        return self._thread.is_alive()

    def shutdown(self) -> None:
        """Ends every request still in flight (each gets its final output), then stops the thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._prepare_pool.shutdown(wait=True, cancel_futures=True)
        self._inbox.put(("shutdown", None))
        self._thread.join()
        self._output_thread.join()
        unfreeze_heap()

    # ---- preparation (worker threads) -----------------------------------
    def _prepare(self, request_id, prompt, params, lora_request, arrival_time) -> None:
        try:
            seq = self.engine.make_sequence(request_id, prompt, params, lora_request, arrival_time)
        except MultiLoRAError as error:
            self._finish(request_id, error_output(request_id, error, lora_request))
            return
        except Exception:
            logger.exception("Preparing request %s failed", request_id)
            self._finish(request_id, error_output(request_id, MultiLoRAError("internal error; see the server log"),
                                                  lora_request))
            return
        self._inbox.put(("add", seq))

    # ---- engine thread --------------------------------------------------
    def _run(self) -> None:
        try:
            device = self.engine.runner.device
            if device.type == "cuda":
                torch.cuda.set_device(device)     # Triton kernels and graphs launch on the current device
            running, next_stats = True, 0.0
            while running:
                running = self._drain_inbox(block=not self.engine.has_unfinished_requests())
                self.engine.check_health()      # a dead tensor-parallel worker stops the engine, busy or idle
                if running and self.engine.has_unfinished_requests():
                    self._step()
                # The snapshot walks every running request: refresh it a few times a second while
                # busy, not every step, and always before waiting idle.
                now = time.monotonic()
                if now >= next_stats or not self.engine.has_unfinished_requests():
                    self._stats, next_stats = self.engine.stats(), now + _STATS_EVERY_S
        except Exception as e:
            self.failure = f"{type(e).__name__}: {e}"
            logger.exception("The engine thread failed; no more requests are served")
            if isinstance(e, WorkerFailedError):
                self._end_all(e)            # the requests in flight say why they end
        finally:
            with self._lock:
                self._stopped = True
            self._end_all(EngineStoppedError("the server is shutting down; retry on another instance"))
            self._stats = self.engine.stats()
            self.engine.shutdown()
            self._outbox.put(None)          # the output thread ends what is left, then stops
            logger.info("Engine thread stopped")

    def _drain_inbox(self, block: bool) -> bool:
        while True:
            try:
                kind, item = self._inbox.get(block=block, timeout=_IDLE_CHECK_S if block else None)
            except queue.Empty:
                return True
            block = False
            if kind == "shutdown":
                return False
            if kind == "add":
                self._add(item)
            elif kind == "ended":
                self._end_stopped(item)
            else:
                self._abort(item, RequestCancelledError("the request was cancelled"))

    def _add(self, seq) -> None:
        with self._lock:
            request = self._live.get(seq.request_id)
        if request is None or request.cancelled:
            return      # aborted while being prepared: already answered, nothing allocated
        try:
            self.engine.add_sequence(seq)
        except MultiLoRAError as error:
            self._outbox.put(("final", seq.request_id, error_output(seq.request_id, error, seq.lora_request)))

    def _end_stopped(self, ended) -> None:
        """Frees a request a stop string ended: its final output is out; the processor drops its state."""
        event = self.engine.finish_ended(ended)
        if event is not None:
            self._outbox.put(("events", [event]))

    def _abort(self, request_id: str, error: MultiLoRAError) -> None:
        try:
            event = self.engine.abort_sequence(request_id, error)
        except Exception:       # scheduler state broken by an engine bug: still answer the client
            logger.exception("Aborting request %s failed", request_id)
            event = None
        if event is not None:
            self._outbox.put(("events", [event]))
            return
        # Not in the engine: still being prepared, or its final output is on its way (then that one wins).
        with self._lock:
            request = self._live.get(request_id)
            if request is not None:
                request.cancelled = True
        if request is not None:
            self._outbox.put(("final", request_id, error_output(request_id, error, request.lora_request)))

    def _step(self) -> None:
        try:
            events = self.engine.step_events()
        except WorkerFailedError:
            raise               # nothing can run any more: _run ends every request with it and stops
        except Exception:       # an engine bug: end the requests in flight, keep serving if we can
            logger.exception("Engine step failed; failing %d in-flight requests", len(self.engine.requests))
            self._end_all(MultiLoRAError("internal engine error; see the server log"))
            return
        if events:
            self._outbox.put(("events", events))

    def _end_all(self, error: MultiLoRAError) -> None:
        """Ends every live request with `error`."""
        with self._lock:
            request_ids = list(self._live)
        for request_id in request_ids:
            self._abort(request_id, error)

    # ---- output thread --------------------------------------------------
    def _run_outputs(self) -> None:
        """Turns the engine's token events into outputs, in the order the engine thread sent them."""
        stopping = False
        while not stopping:
            items = [self._outbox.get()]
            while not self._outbox.empty():     # batch what piled up while the last batch was delivered
                items.append(self._outbox.get_nowait())
            for item in items:
                if item is None:
                    stopping = True
                    continue
                try:
                    self._handle_output(item)
                except Exception:   # the output thread outlives any one request's failure
                    logger.exception("Delivering outputs failed")
        with self._lock:
            request_ids = list(self._live)
        for request_id in request_ids:      # nothing in the engine any more: end what is left
            self._finish(request_id, error_output(request_id, EngineStoppedError(
                "the server is shutting down; retry on another instance")))
        logger.info("Output thread stopped")

    def _handle_output(self, item) -> None:
        if item[0] == "final":
            self._finish(item[1], item[2])
            return
        outputs, ended = self._processor.process(item[1])
        for request in ended:
            self._inbox.put(("ended", request))
        for out in outputs:
            if out.finished:
                self._finish(out.request_id, out)
            else:
                with self._lock:
                    request = self._live.get(out.request_id)
                _deliver(request and request.on_output, out)

    def _finish(self, request_id: str, out: RequestOutput) -> None:
        """Delivers a request's final output, once: whoever removes it from `_live` answers."""
        with self._lock:
            request = self._live.pop(request_id, None)
        if request is not None:
            out.lora_request = out.lora_request or request.lora_request
            _deliver(request.on_output, out)


def _deliver(callback: Optional[OutputCallback], out: RequestOutput) -> None:
    if callback is None:
        return
    try:
        callback(out)
    except Exception:
        logger.exception("Output callback for request %s failed", out.request_id)


def _limit_intra_op_threads() -> None:
    torch.set_num_threads(_PREPARE_INTRA_OP_THREADS)
