"""The Triton model `multilora`: a thin, decoupled adapter over multilora.AsyncLLMEngine.

execute() parses each request and submits it; the engine thread hands every
output to a queue; one sender thread turns outputs into responses, watches
for client cancellation and updates the metrics. Each request gets exactly
one response flagged final; an error goes to its own request only, with the
Triton error code its type names (multilora.errors). The sender also reports
health to scripts/serve.py and drains on its request (launcher_link.py).
This is the only file that imports triton_python_backend_utils.
"""

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import triton_python_backend_utils as pb_utils
from io_tensors import parse_request, response_arrays  # this directory
from launcher_link import LauncherLink
from multilora import AsyncLLMEngine, EngineConfig, SamplingParams
from multilora.errors import EngineStoppedError, MultiLoRAError
from multilora.lora.resolver import AdapterResolver
from server_metrics import REFUSED_LABEL, ServerMetrics
from serving_config import load_serving_config

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
POLL_S = 0.05             # longest wait for an output before the sender looks around
CANCEL_CHECK_S = 0.2      # how often in-flight requests are asked whether the client cancelled
STATS_EVERY_S = 0.5       # how often gauges and pool counters are refreshed
HEALTH_EVERY_S = 1.0      # how often health goes to scripts/serve.py (it restarts on a stale report)
SHUTTING_DOWN = "the server is shutting down; retry on another instance"
logger = logging.getLogger("multilora.triton")


class _TritonLogHandler(logging.Handler):
    """Library `logging` records into the Triton server's log."""

    def emit(self, record):
        log = (pb_utils.Logger.log_error if record.levelno >= logging.ERROR else
               pb_utils.Logger.log_warn if record.levelno >= logging.WARNING else pb_utils.Logger.log_info)
        log(f"[{record.name}] {self.format(record)}")


def triton_error(error: Exception) -> "pb_utils.TritonError":
    """The one mapping from our errors to Triton error codes (each error type names its code)."""
    if not isinstance(error, MultiLoRAError):
        logger.error("internal error", exc_info=error)
        return pb_utils.TritonError("internal error; see the server log", pb_utils.TritonError.INTERNAL)
    return pb_utils.TritonError(str(error), getattr(pb_utils.TritonError, error.code, pb_utils.TritonError.INTERNAL))


class _Stream:
    """One in-flight request, owned by the sender thread."""

    __slots__ = ("sender", "parsed", "cancelled")

    def __init__(self, sender, parsed):
        self.sender, self.parsed, self.cancelled = sender, parsed, False


class TritonPythonModel:
    def initialize(self, args):
        root = logging.getLogger("multilora")
        root.addHandler(_TritonLogHandler())
        root.setLevel(logging.INFO)
        config = load_serving_config(args["model_repository"])
        self._resolver = AdapterResolver(config.adapter_roots, config.registry, config.hub_cache_dir)
        self._metrics = ServerMetrics(pb_utils.MetricFamily,
                                      {"model": args["model_name"], "version": args["model_version"]})
        self._outbox: queue.Queue = queue.Queue()
        self._engine = AsyncLLMEngine(EngineConfig.from_dict(config.engine),
                                      on_adapter_event=lambda event: self._outbox.put(("adapter", None, event)))
        self._streams: dict[str, _Stream] = {}
        self._link = LauncherLink.from_environment()
        self._link.exit_with_parent()
        self._draining = False      # set once by the sender thread; read by execute()
        self._drainer: Optional[threading.Thread] = None
        self._failure_logged = False
        # Adapter names are resolved off Triton's execute thread: a hub entry may download.
        self._resolve_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="multilora-resolve")
        self._sender = threading.Thread(target=self._send_loop, name="multilora-sender", daemon=True)
        self._sender.start()
        logger.info("serving %s; adapters from %s", config.engine.get("model"), config.adapter_roots)

    # ---- requests in --------------------------------------------------------

    def execute(self, requests):
        for request in requests:
            self._submit(request)
        return None  # decoupled: responses go through each request's sender

    def _submit(self, request):
        sender = request.get_response_sender()
        try:
            if self._draining:
                raise EngineStoppedError(SHUTTING_DOWN)
            parsed = parse_request({t.name(): t.as_numpy() for t in request.inputs()}, self._engine.request_limits)
            params = SamplingParams(**parsed.sampling)
        except Exception as e:  # a request's own fault: answer it alone
            sender.send(pb_utils.InferenceResponse(error=triton_error(e)), flags=FINAL)
            # Counted by the sender thread: python_backend's Metric is not thread-safe (see _handle).
            self._outbox.put(("refused", None, getattr(e, "code", "INTERNAL")))
            return
        request_id = uuid.uuid4().hex
        # Queued before add_request, so the sender knows the stream before its first output.
        self._outbox.put(("new", request_id, _Stream(sender, parsed)))
        self._resolve_pool.submit(self._start, request_id, parsed, params)

    def _start(self, request_id, parsed, params):
        try:
            lora = self._resolver.resolve(parsed.adapter_name) if parsed.adapter_name else None
            self._engine.add_request(request_id, parsed.prompt, params, lora,
                                     on_output=lambda out: self._outbox.put(("out", request_id, out)))
        except Exception as e:
            self._outbox.put(("fail", request_id, e))

    # ---- responses out (sender thread) --------------------------------------

    def _send_loop(self):
        next_cancel_check = next_stats = next_health = 0.0
        while True:
            try:
                item = self._outbox.get(timeout=POLL_S)
            except queue.Empty:
                item = None
            if item is not None and item[0] == "stop":
                return
            try:
                if item is not None:
                    self._handle(*item)
                now = time.monotonic()
                if now >= next_cancel_check:
                    next_cancel_check = now + CANCEL_CHECK_S
                    self._check_cancelled()
                    self._check_drain()
                if now >= next_stats:
                    next_stats = now + STATS_EVERY_S
                    self._metrics.update(self._engine.stats())
                if now >= next_health:
                    next_health = now + HEALTH_EVERY_S
                    self._report_health()
            except Exception:  # never let one bad response stop every stream
                logger.exception("sender: failed handling %s", item[0] if item else "a periodic check")

    def _handle(self, kind, request_id, payload):
        # Every metric call is made here, on the sender thread: python_backend's stub-side Metric drops the
        # GIL and rewrites its shared-memory message on each call, so two threads counting into one metric
        # hand tritonserver a freed message and it segfaults (docs/serving.md, known issues).
        if kind == "new":
            self._streams[request_id] = payload
        elif kind == "adapter":
            self._metrics.record_adapter_event(payload)
        elif kind == "refused":
            self._metrics.record_finished(REFUSED_LABEL, None, payload)
        elif kind == "fail":
            stream = self._streams.pop(request_id)
            self._send(stream, pb_utils.InferenceResponse(error=triton_error(payload)), FINAL)
            self._metrics.record_finished(REFUSED_LABEL, None, getattr(payload, "code", "INTERNAL"))
        elif request_id in self._streams:
            self._on_output(request_id, payload)

    def _on_output(self, request_id, out):
        stream = self._streams[request_id]
        final = out.finished or out.error is not None
        if stream.cancelled and not final:
            self._engine.abort(request_id)  # again: the first abort may have passed it while it was resolved
            return
        if out.error is not None:
            response = pb_utils.InferenceResponse(error=triton_error(out.error))
        elif final or (stream.parsed.stream and out.outputs[0].delta_token_ids):
            try:
                arrays = response_arrays(stream.parsed, out, final=final)
                response = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(k, v) for k, v in arrays.items()])
            except Exception as e:  # a response we cannot build still ends its request
                response, final = pb_utils.InferenceResponse(error=triton_error(e)), True
                if not out.finished:
                    self._engine.abort(request_id)
        else:
            return  # non-streaming requests answer once; an empty delta says nothing
        if final:
            # Counted before the final response leaves: a client that reads /metrics once answered
            # sees its request there (recorded after the send, a fast scrape could miss it).
            del self._streams[request_id]
            self._record(stream, out)
        self._send(stream, response, FINAL if final else 0)

    def _record(self, stream, out):
        outcome = out.error.code if out.error is not None else out.outputs[0].finish_reason
        if stream.cancelled and out.error is not None:
            outcome = "abort"
        self._metrics.record_finished(out.lora_request.lora_name if out.lora_request else None, out, outcome)

    def _send(self, stream, response, flags):
        try:
            stream.sender.send(response, flags=flags)
        except Exception as e:  # the client may be gone; its request is over either way
            logger.info("could not send a response: %s", e)

    def _check_cancelled(self):
        for request_id, stream in self._streams.items():
            if not stream.cancelled and stream.sender.is_cancelled():
                stream.cancelled = True
                self._engine.abort(request_id)  # its final output (CANCELLED) frees KV blocks and adapter

    # ---- supervision (sender thread) -----------------------------------------

    def _check_drain(self):
        """On the launcher's request: refuse new requests, then end the unfinished ones at its deadline."""
        abort_at = self._link.drain_deadline()
        if abort_at is None:
            return
        if not self._draining:
            self._draining = True
            logger.info("draining: %d requests unanswered; the rest end in %.0f s", len(self._streams),
                        max(0.0, abort_at - time.time()))
            self._report_health()
        if self._drainer is None and time.time() >= abort_at:
            logger.info("drain deadline: ending %d unfinished requests", len(self._streams))
            # Off this thread: the engine's final outputs come back through this thread's queue.
            self._drainer = threading.Thread(target=self._engine.shutdown, name="multilora-drain", daemon=True)
            self._drainer.start()

    def _report_health(self):
        alive = self._engine.is_alive
        if not alive and self._engine.failure and not self._failure_logged:
            self._failure_logged = True
            logger.error("not ready: the engine thread died (%s); new requests get UNAVAILABLE%s",
                         self._engine.failure, "; scripts/serve.py restarts the server" if self._link.active else "")
        self._link.report(alive, self._engine.failure, len(self._streams), self._draining)

    def is_ready(self):
        """Readiness for Triton servers that ask the model (Python backend 26.03 and later)."""
        return self._engine.is_alive and not self._draining

    def finalize(self):
        """Abort what is still running (Triton has already waited for in-flight requests), then stop."""
        self._resolve_pool.shutdown(wait=True)
        if self._drainer is not None:
            self._drainer.join()
        self._engine.shutdown()  # every unfinished request gets its final (aborted) output first
        self._outbox.put(("stop", None, None))
        self._sender.join(timeout=30)
        self._metrics.close()
