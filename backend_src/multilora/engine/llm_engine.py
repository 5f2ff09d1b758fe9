"""LLMEngine: the synchronous multi-LoRA engine.

`step_events()` = schedule -> adapters resident -> run -> token events; `step()`
adds the output processor inline (detokenize, stop strings, RequestOutputs).
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from transformers import AutoTokenizer, GenerationConfig

from multilora.config import EngineConfig
from multilora.engine.block_manager import BlockManager
from multilora.engine.model_runner import ModelRunner
from multilora.engine.output_processor import EndedRequest, OutputProcessor, TokenEvent
from multilora.engine.scheduler import ScheduledBatch, Scheduler
from multilora.engine.sequence import PLACEHOLDER, Sequence
from multilora.engine.step_inputs import SampledTokens
from multilora.engine.tp_runner import TensorParallelRunner
from multilora.errors import (AdapterError, AdapterWriteError, InvalidRequestError, MultiLoRAError,
                             NonFiniteLogitsError, PromptTooLongError, WorkerFailedError)
from multilora.lora.adapter import LoRAModelSpec, load_adapter
from multilora.lora.adapter_pool import MAX_CONCURRENT_LOADS, AdapterEvent, AdapterPool
from multilora.engine.load_workers import AdapterLoadWorkers
from multilora.lora.request import LoRARequest
from multilora.model.loader import load_hf_config
from multilora.outputs import RequestOutput
from multilora.sampler import FAILED, SampleRow, derive_step_seed
from multilora.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    max_loras: int
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    resident_adapters: list[str] = field(default_factory=list)
    adapter_holds: int = 0
    adapter_pool_hits: int = 0
    adapter_pool_misses: int = 0
    adapter_loads: int = 0
    adapter_load_seconds: float = 0.0       # disk read + validation + pinned host image, summed
    adapter_uploads: int = 0                # host memory -> GPU slot
    adapter_upload_seconds: float = 0.0     # measured on the device, summed
    adapter_prefetches: int = 0             # uploads made ahead for a waiting request
    adapter_evictions: int = 0              # out of a GPU slot
    adapter_eviction_seconds: float = 0.0
    adapter_host_evictions: int = 0         # out of the host LRU (max_cpu_loras)
    adapter_host_eviction_seconds: float = 0.0
    adapter_failed_loads: int = 0
    adapter_remembered_failures: int = 0
    adapter_failed_writes: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    num_step_adapters: int = 0              # distinct adapters per step, summed over num_steps
    num_prefill_steps: int = 0              # steps holding prompt chunks (rows of several tokens)
    num_prefill_tokens: int = 0             # those rows' tokens, summed

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass
class _InFlight:
    """A launched step whose sampled ids have not reached the host yet."""

    tokens: SampledTokens
    seqs: list[Sequence]            # sequence of each sampled row
    indices: list[int]              # the output index each row's id fills

    @property
    def sources(self) -> dict[Sequence, int]:
        return {seq: k for k, seq in enumerate(self.seqs)}


class LLMEngine:
    def __init__(self, config: EngineConfig, on_adapter_event: Optional[Callable[[AdapterEvent], None]] = None):
        self.config = config
        self.hf_config = load_hf_config(config.model)
        self.max_model_len = config.max_model_len or self.hf_config.max_position_embeddings
        self.request_limits = config.request_limits(self.max_model_len)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self.eos_token_ids = self._eos_token_ids()
        runner_class = ModelRunner if config.tensor_parallel_size == 1 else TensorParallelRunner
        self.runner = runner_class(config, self.hf_config, self.max_model_len)
        self.lora_spec = LoRAModelSpec.from_hf_config(self.hf_config)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.block_size)
        # A sequence never grows past what the model or, alone, the KV cache holds.
        self.max_seq_len = min(self.max_model_len, self.runner.num_kv_blocks * config.block_size)
        self.load_workers = self._start_load_workers()
        self.adapter_pool = AdapterPool(config.max_loras, config.host_lora_capacity, self._load_adapter,
                                        on_adapter_event, max_concurrent_loads=self.load_workers.num_workers
                                        if self.load_workers is not None else MAX_CONCURRENT_LOADS)
        self.scheduler = Scheduler(config, self.block_manager, self.adapter_pool)
        self.requests: dict[str, Sequence] = {}
        self.output_processor = OutputProcessor(self.tokenizer)     # used inline by step(); see AsyncLLMEngine
        # On a CPU there is no device to overlap with: the host runs the model itself.
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.runner.on_gpu)
        self._in_flight: Optional[_InFlight] = None     # async scheduling: the step the GPU is running

    def _eos_token_ids(self) -> frozenset[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        try:
            eos = GenerationConfig.from_pretrained(self.config.model).eos_token_id
        except OSError:
            eos = self.hf_config.eos_token_id
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        return frozenset(ids)

    def _start_load_workers(self) -> Optional[AdapterLoadWorkers]:
        workers = self.config.adapter_load_workers
        if not workers or not self.config.enable_lora or not isinstance(self.runner, ModelRunner):
            return None
        return AdapterLoadWorkers(self.hf_config, self.runner.dtype, self.config.max_lora_rank, workers,
                                  self.runner.adapter_slot_layout)

    def _load_adapter(self, lora_request: LoRARequest):
        # Runs on the thread that asked for the adapter, never the engine thread: it also builds the
        # adapter's pinned host image, so that placing it in a GPU slot later is one queued copy.
        if self.load_workers is not None:
            adapter, image = self.load_workers.load(lora_request)
            self.runner.adopt_image(adapter, image)
            logger.info("loaded LoRA adapter '%s' (id %d) in a load worker: rank %d, %.2f MiB", adapter.name,
                        adapter.adapter_id, adapter.rank, image.numel() / 2**20)
            return adapter
        adapter = load_adapter(lora_request, self.lora_spec, self.config.max_lora_rank, dtype=self.runner.dtype)
        self.runner.stage_adapter(adapter)
        return adapter

    # ---- requests -------------------------------------------------------
    def make_sequence(self, request_id: str, prompt, params: SamplingParams,
                      lora_request: Optional[LoRARequest] = None, arrival_time: Optional[float] = None) -> Sequence:
        """Validates a request and loads its adapter; allocates nothing. Safe to call from any thread.

        `arrival_time` (time.time()): when the request was accepted, if before this call (default: now).
        """
        arrival_time = arrival_time or time.time()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams")
        params.validate()
        self.request_limits.check_prompt(prompt)   # before tokenizing: an oversized prompt is refused at once
        self.request_limits.check_stop(params.stop)
        prompt_text, token_ids = self._tokenize(prompt)
        if len(token_ids) >= self.max_seq_len:
            raise PromptTooLongError(f"the prompt has {len(token_ids)} tokens; this server takes at most "
                                     f"{self.max_seq_len - 1} (max_model_len {self.max_model_len}, KV cache "
                                     f"{self.block_manager.num_blocks * self.config.block_size} tokens)")
        adapter = None
        if lora_request is not None:
            if not self.config.enable_lora:
                raise AdapterError(f"adapter '{lora_request.lora_name}' requested but LoRA is not enabled "
                                   "(start the engine with enable_lora=True)")
            adapter = self.adapter_pool.get(lora_request)
        return Sequence(request_id, prompt_text, token_ids, params, lora_request, adapter, arrival_time=arrival_time)

    def _tokenize(self, prompt) -> tuple[Optional[str], list[int]]:
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt) if prompt else []
            text = prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids, text = list(prompt), None
            vocab = self.hf_config.vocab_size
            if any(t < 0 or t >= vocab for t in token_ids):
                raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        else:
            raise InvalidRequestError("the prompt must be a string or a list of token ids")
        if not token_ids:
            raise InvalidRequestError("the prompt is empty; send at least one token")
        return text, token_ids

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise InvalidRequestError(f"request id {seq.request_id!r} is already in use")
        if seq.adapter_id:
            self.adapter_pool.check_not_failed(seq.adapter_id)
        self.scheduler.add(seq)                  # raises QueueFullError when the waiting queue is full
        self.requests[seq.request_id] = seq

    def add_request(self, request_id: str, prompt, params: SamplingParams,
                    lora_request: Optional[LoRARequest] = None) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, params, lora_request))

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Frees the request's KV blocks and adapter hold at once; returns its final output."""
        event = self.abort_sequence(request_id)
        return self._process([event])[0][0] if event is not None else None

    def abort_sequence(self, request_id: str, error: Optional[MultiLoRAError] = None) -> Optional[TokenEvent]:
        """Frees the request's KV blocks and adapter hold at once; returns its finish event (None if unknown)."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return TokenEvent(seq, [], "abort", error)

    def finish_ended(self, ended: EndedRequest) -> Optional[TokenEvent]:
        """Frees a request the output processor ended (a stop string); its finish event says no more."""
        seq = self.requests.pop(ended.request_id, None)
        if seq is None:
            return None         # the engine ended it meanwhile
        self.scheduler.finish(seq, ended.finish_reason)
        return TokenEvent(seq, [], ended.finish_reason)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def check_health(self) -> None:
        """Raises WorkerFailedError when a tensor-parallel worker has died (the engine can run nothing more)."""
        self.runner.check_health()

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers and the adapter load workers, if any."""
        self.runner.shutdown()
        if self.load_workers is not None:
            self.load_workers.shutdown()

    # ---- one step -------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step, with its outputs built inline (the in-process API)."""
        return self._process(self.step_events())[0]

    def step_events(self) -> list[TokenEvent]:
        """One step: schedule -> adapters resident -> launch -> token events (no text: see OutputProcessor).

        With async_scheduling the events are those of the step launched by the previous call: this
        step is scheduled and launched first, so the GPU never waits for the host between steps.
        """
        try:
            scheduled = self.scheduler.schedule()
            events = [self._end(seq, error) for seq, error in scheduled.expired]
            events += self._write_adapters(scheduled)
            self._record_uploads()
            launched = self._launch(scheduled)
            if self._in_flight is not None:
                events += self._resolve(self._in_flight)
            self._in_flight = launched
            if not self.async_scheduling and launched is not None:
                events += self._resolve(launched)
                self._in_flight = None
            return events
        except BaseException:
            self._in_flight = None      # the caller ends the requests in flight
            raise

    def _launch(self, scheduled: ScheduledBatch) -> Optional[_InFlight]:
        # A sequence whose last token is still in flight and ends it has nothing to compute.
        kept = [(s, n) for s, n in zip(scheduled.seqs, scheduled.num_new_tokens) if n > 0]
        if not kept:
            return None
        batch = ScheduledBatch([s for s, _ in kept], [n for _, n in kept])
        adapter_slots = [self.adapter_pool.slot_of(s.adapter_id) if s.adapter_id else -1 for s in batch.seqs]
        rows = [self._sample_row(seq) if seq.num_computed_tokens + n == seq.num_tokens else None
                for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        sources = self._in_flight.sources if self._in_flight is not None else None
        tokens = self.runner.execute(batch, adapter_slots, rows, sources)
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
        seqs = [batch.seqs[i] for i in tokens.order]
        indices = [len(seq.output_token_ids) for seq in seqs]
        if self.async_scheduling:
            # The next step is scheduled before this one's ids reach the host: a sequence that may
            # go on holds a placeholder for its new token, whose id the device feeds to that step.
            for seq in seqs:
                if not self._ends_by_length(seq, len(seq.output_token_ids) + 1):
                    seq.output_token_ids.append(PLACEHOLDER)
        return _InFlight(tokens, seqs, indices)

    def _resolve(self, launched: _InFlight) -> list[TokenEvent]:
        """The launched step's ids, now on the host, become token events."""
        events = []
        for seq, index, token in zip(launched.seqs, launched.indices, launched.tokens.values()):
            if seq.is_finished:
                continue            # aborted, or ended by a stop string, while its step ran
            events.append(self._fail_sampling(seq) if token == FAILED else self._append_token(seq, index, token))
        return events

    def _process(self, events: list[TokenEvent]) -> tuple[list[RequestOutput], list[EndedRequest]]:
        """Runs the output processor inline and frees the requests it ended."""
        outputs, ended = self.output_processor.process(events)
        confirmations = [e for e in map(self.finish_ended, ended) if e is not None]
        self.output_processor.process(confirmations)        # drops their states; no outputs
        return outputs, ended

    def _write_adapters(self, batch: ScheduledBatch) -> list[TokenEvent]:
        """Writes adapters newly placed in slots; returns the finish events of requests failed by a write.

        A failed write frees its slot (never served half-written) and ends, once, every request that needs
        that adapter, taking them out of `batch`; the pool remembers the failure, so it is not retried
        at every step.
        """
        failed = []
        for adapter_slot, adapter in self.adapter_pool.take_pending_writes():
            try:
                self.runner.write_adapter(adapter_slot, adapter)
            except WorkerFailedError:
                raise           # not this adapter's fault: nothing can run any more
            except Exception:
                logger.exception("Writing adapter '%s' into GPU adapter slot %d failed", adapter.name, adapter_slot)
                error = AdapterWriteError(f"adapter '{adapter.name}' could not be copied to the GPU and is refused "
                                          "for now; retry later, or ask the operator to check the server log")
                adapter_id = self.adapter_pool.fail_write(adapter_slot, error)
                for seq in [s for s in self.requests.values() if s.adapter_id == adapter_id]:
                    if seq in batch.seqs:
                        i = batch.seqs.index(seq)
                        del batch.seqs[i], batch.num_new_tokens[i]
                    failed.append(self._end(seq, error))
        return failed

    def _record_uploads(self) -> None:
        """Counts the adapter writes the device has completed (their time is known only then)."""
        for name, seconds in self.runner.finished_adapter_uploads():
            self.adapter_pool.record_upload(name, seconds)

    def _sample_row(self, seq: Sequence) -> SampleRow:
        params = seq.params
        seed = None if params.seed is None else derive_step_seed(params.seed, len(seq.output_token_ids))
        banned = () if len(seq.output_token_ids) >= params.min_tokens else tuple(self.eos_token_ids)
        return SampleRow(params, seed, banned)

    def _append_token(self, seq: Sequence, index: int, token: int) -> TokenEvent:
        """Output token `index` of `seq` is `token` (it replaces its placeholder, if any)."""
        seq.first_token_time = seq.first_token_time or time.time()
        outputs = seq.output_token_ids
        if index < len(outputs):
            outputs[index] = token
        else:
            outputs.append(token)
        params, generated = seq.params, index + 1
        reason = None
        if token in self.eos_token_ids and not params.ignore_eos and generated >= params.min_tokens:
            reason = "stop"
        elif self._ends_by_length(seq, generated):
            reason = "length"
        if reason is not None:
            del outputs[generated:]         # a placeholder for a token that will never be
            self.scheduler.finish(seq, reason)
            del self.requests[seq.request_id]
        return TokenEvent(seq, [token], reason)

    def _ends_by_length(self, seq: Sequence, generated: int) -> bool:
        return generated >= seq.params.max_tokens or len(seq.prompt_token_ids) + generated >= self.max_seq_len

    def _fail_sampling(self, seq: Sequence) -> TokenEvent:
        """The sampler gave up on this row (non-finite logits): this request ends alone, with an error."""
        adapter = f"adapter '{seq.adapter_name}'" if seq.adapter_name else "the base model"
        logger.warning("Request %s: non-finite logits (%s)", seq.request_id, adapter)
        return self._end(seq, NonFiniteLogitsError(
            f"the model produced non-finite logits for this request ({adapter}); "
            "retry, or report the prompt and adapter to the server's operator"))

    def _end(self, seq: Sequence, error: MultiLoRAError) -> TokenEvent:
        """Ends one request alone with `error`: frees what it holds (if the scheduler has not already);
        its event carries the error."""
        del self.requests[seq.request_id]
        if not seq.is_finished:
            self.scheduler.finish(seq, "abort")
        return TokenEvent(seq, [], "abort", error)

    # ---- state ----------------------------------------------------------
    def stats(self) -> EngineStats:
        self._record_uploads()
        pool, counters = self.adapter_pool, self.adapter_pool.counters
        names = lambda seqs: sorted({s.adapter_name for s in seqs if s.adapter_name})
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.block_manager.num_blocks, kv_blocks_used=self.block_manager.num_used_blocks,
            max_loras=self.config.max_loras, running_adapters=names(self.scheduler.running),
            waiting_adapters=names(self.scheduler.waiting), resident_adapters=pool.resident_adapter_names,
            adapter_holds=pool.num_holds, adapter_pool_hits=counters.hits, adapter_pool_misses=counters.misses,
            adapter_loads=counters.loads, adapter_load_seconds=counters.load_seconds,
            adapter_uploads=counters.uploads, adapter_upload_seconds=counters.upload_seconds,
            adapter_prefetches=counters.prefetches, adapter_evictions=counters.evictions,
            adapter_eviction_seconds=counters.eviction_seconds, adapter_host_evictions=counters.host_evictions,
            adapter_host_eviction_seconds=counters.host_eviction_seconds,
            adapter_failed_loads=counters.failed_loads, adapter_remembered_failures=counters.remembered_failures,
            adapter_failed_writes=counters.failed_writes, num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.scheduler.num_steps, num_step_adapters=self.scheduler.num_step_adapters,
            num_prefill_steps=self.scheduler.num_prefill_steps, num_prefill_tokens=self.scheduler.num_prefill_tokens)
