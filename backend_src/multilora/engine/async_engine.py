"""AsyncLLMEngine: the engine for servers.

One background thread owns the LLMEngine: it drains an inbound queue (add,
abort, shutdown) and calls `step()`; nothing else touches scheduler state.
Request validation and adapter loading (disk reads) run on a small worker pool
before a request reaches that thread, so a slow adapter load never stalls
decoding. Each request's outputs go to its `on_output` callback, called from
the engine thread; exactly one of them has `finished=True`.
"""

import asyncio
import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable, Optional

from multilora.config import EngineConfig
from multilora.engine.llm_engine import EngineStats, LLMEngine
from multilora.errors import EngineStoppedError, MultiLoRAError, RequestCancelledError
from multilora.lora.request import LoRARequest
from multilora.outputs import CompletionOutput, RequestOutput
from multilora.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

OutputCallback = Callable[[RequestOutput], None]


def error_output(request_id: str, error: MultiLoRAError, lora_request=None) -> RequestOutput:
    reason = "abort" if isinstance(error, RequestCancelledError) else None
    return RequestOutput(request_id, None, [], [CompletionOutput(0, "", [], reason)], True, lora_request,
                         error=error)


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, on_adapter_loaded: Optional[Callable[[str, float], None]] = None):
        self.engine = LLMEngine(config, on_adapter_loaded)
        self.tokenizer = self.engine.tokenizer
        self._inbox: queue.Queue = queue.Queue()
        self._callbacks: dict[str, OutputCallback] = {}     # engine thread only
        self._pending: dict[str, OutputCallback] = {}       # submitted, still being prepared
        self._lock = threading.Lock()
        self._stopped = False
        self._stats = self.engine.stats()
        self._prepare_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="multilora-prepare")
        self._thread = threading.Thread(target=self._run, name="multilora-engine", daemon=True)
        self._thread.start()

    # ---- public API (any thread) ----------------------------------------
    def add_request(self, request_id: str, prompt, params: SamplingParams,
                    lora_request: Optional[LoRARequest] = None, on_output: OutputCallback = None) -> None:
        with self._lock:
            if self._stopped:
                raise EngineStoppedError("the engine is shutting down; retry on another instance")
            self._pending[request_id] = on_output
        self._prepare_pool.submit(self._prepare, request_id, prompt, params, lora_request, on_output)

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def generate(self, request_id: str, prompt, params: SamplingParams,
                       lora_request: Optional[LoRARequest] = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs; raises its error, if any, after the last one."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self.add_request(request_id, prompt, params, lora_request,
                         lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        try:
            while True:
                out = await outputs.get()
                if out.error is not None:
                    raise out.error
                yield out
                if out.finished:
                    return
        except asyncio.CancelledError:
            self.abort(request_id)
            raise

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self) -> None:
        """Aborts every request still in flight (each gets its final output), then stops the thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        self._prepare_pool.shutdown(wait=True)
        self._inbox.put(("shutdown", None))
        self._thread.join()

    # ---- preparation (worker threads) -----------------------------------
    def _prepare(self, request_id, prompt, params, lora_request, on_output) -> None:
        try:
            seq = self.engine.make_sequence(request_id, prompt, params, lora_request)
        except MultiLoRAError as error:
            with self._lock:
                self._pending.pop(request_id, None)
            _deliver(on_output, error_output(request_id, error, lora_request))
            return
        self._inbox.put(("add", (seq, on_output)))

    # ---- engine thread --------------------------------------------------
    def _run(self) -> None:
        running = True
        while running:
            block = not self.engine.has_unfinished_requests()
            running = self._drain_inbox(block)
            if running and self.engine.has_unfinished_requests():
                self._step()
            self._stats = self.engine.stats()
        for request_id in list(self._callbacks):
            self._abort(request_id, "the server is shutting down")
        logger.info("Engine thread stopped")

    def _drain_inbox(self, block: bool) -> bool:
        while True:
            try:
                kind, item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "shutdown":
                return False
            if kind == "add":
                self._add(*item)
            else:
                self._abort(item, "the request was cancelled")

    def _add(self, seq, on_output) -> None:
        with self._lock:
            cancelled = self._pending.pop(seq.request_id, None) is None
        if cancelled:
            _deliver(on_output, error_output(seq.request_id, RequestCancelledError("the request was cancelled")))
            return
        try:
            self.engine.add_sequence(seq)
        except MultiLoRAError as error:
            _deliver(on_output, error_output(seq.request_id, error, seq.lora_request))
            return
        self._callbacks[seq.request_id] = on_output

    def _abort(self, request_id: str, why: str) -> None:
        with self._lock:
            pending = self._pending.pop(request_id, None) is not None
        if pending:
            return      # still being prepared: _add sees it gone and answers CANCELLED
        callback = self._callbacks.pop(request_id, None)
        final = self.engine.abort_request(request_id)
        if callback is not None and final is not None:
            final.error = RequestCancelledError(why)
            _deliver(callback, final)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:       # an engine bug: fail the requests in flight, keep serving
            logger.exception("Engine step failed; failing %d in-flight requests", len(self._callbacks))
            for request_id in list(self._callbacks):
                callback = self._callbacks.pop(request_id)
                self.engine.abort_request(request_id)
                _deliver(callback, error_output(request_id, MultiLoRAError("internal engine error; see server log")))
            return
        for out in outputs:
            callback = self._callbacks.pop(out.request_id) if out.finished else self._callbacks.get(out.request_id)
            _deliver(callback, out)


def _deliver(callback: Optional[OutputCallback], out: RequestOutput) -> None:
    if callback is None:
        return
    try:
        callback(out)
    except Exception:
        logger.exception("Output callback for request %s failed", out.request_id)
