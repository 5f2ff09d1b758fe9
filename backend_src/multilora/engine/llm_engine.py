"""LLMEngine: the synchronous multi-LoRA engine. `step()` = schedule -> adapters resident -> run -> postprocess."""

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from transformers import AutoTokenizer, GenerationConfig

from multilora.config import EngineConfig
from multilora.detokenizer import IncrementalDetokenizer
from multilora.engine.block_manager import BlockManager
from multilora.engine.model_runner import ModelRunner
from multilora.engine.scheduler import Scheduler
from multilora.engine.sequence import Sequence, SequenceStatus
from multilora.errors import (AdapterError, AdapterWriteError, InvalidRequestError, MultiLoRAError,
                             NonFiniteLogitsError, PromptTooLongError)
from multilora.lora.adapter import LoRAModelSpec, load_adapter
from multilora.lora.adapter_pool import AdapterPool
from multilora.lora.request import LoRARequest
from multilora.model.loader import load_hf_config
from multilora.outputs import CompletionOutput, RequestMetrics, RequestOutput
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
    adapter_evictions: int = 0
    num_preemptions: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class LLMEngine:
    def __init__(self, config: EngineConfig, on_adapter_loaded=None):
        self.config = config
        self.hf_config = load_hf_config(config.model)
        self.max_model_len = config.max_model_len or self.hf_config.max_position_embeddings
        self.request_limits = config.request_limits(self.max_model_len)
        self.tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model)
        self.eos_token_ids = self._eos_token_ids()
        self.runner = ModelRunner(config, self.hf_config, self.max_model_len)
        self.lora_spec = LoRAModelSpec.from_hf_config(self.hf_config)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, config.block_size)
        # A sequence never grows past what the model or, alone, the KV cache holds.
        self.max_seq_len = min(self.max_model_len, self.runner.num_kv_blocks * config.block_size)
        self.adapter_pool = AdapterPool(config.max_loras, config.host_lora_capacity, self._load_adapter,
                                        on_adapter_loaded)
        self.scheduler = Scheduler(config, self.block_manager, self.adapter_pool)
        self.requests: dict[str, Sequence] = {}

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

    def _load_adapter(self, lora_request: LoRARequest):
        return load_adapter(lora_request, self.lora_spec, self.config.max_lora_rank)

    # ---- requests -------------------------------------------------------
    def make_sequence(self, request_id: str, prompt, params: SamplingParams,
                      lora_request: Optional[LoRARequest] = None) -> Sequence:
        """Validates a request and loads its adapter; allocates nothing. Safe to call from any thread."""
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
        return Sequence(request_id, prompt_text, token_ids, params, lora_request, adapter,
                        IncrementalDetokenizer(self.tokenizer, params.stop))

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
        self.scheduler.add(seq)                  # raises QueueFullError when the waiting queue is full
        self.requests[seq.request_id] = seq

    def add_request(self, request_id: str, prompt, params: SamplingParams,
                    lora_request: Optional[LoRARequest] = None) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, params, lora_request))

    def abort_request(self, request_id: str) -> Optional[RequestOutput]:
        """Frees the request's KV blocks and adapter hold at once; returns its final output."""
        seq = self.requests.pop(request_id, None)
        if seq is None:
            return None
        self.scheduler.finish(seq, "abort")
        return self._output(seq, [], seq.detokenizer.take_delta(finished=True))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step -------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        expired = [self._expired_output(seq, error) for seq, error in batch.expired]
        failed = self._write_adapters(batch)
        if not batch:
            return expired + failed
        adapter_slots = [self.adapter_pool.slot_of(s.adapter_id) if s.adapter_id else -1 for s in batch.seqs]
        rows = [self._sample_row(seq) if seq.num_computed_tokens + n == seq.num_tokens else None
                for seq, n in zip(batch.seqs, batch.num_new_tokens)]
        tokens = self.runner.execute(batch, adapter_slots, rows)
        outputs = expired + failed
        for seq, num_new, token in zip(batch.seqs, batch.num_new_tokens, tokens):
            seq.num_computed_tokens += num_new
            if token == FAILED:
                outputs.append(self._fail_sampling(seq))
            elif token is not None:
                outputs.append(self._append_token(seq, token))
        return outputs

    def _fail_sampling(self, seq: Sequence) -> RequestOutput:
        """The sampler gave up on this row (non-finite logits): this request ends alone, with an error."""
        adapter = f"adapter '{seq.adapter_name}'" if seq.adapter_name else "the base model"
        logger.warning("Request %s: non-finite logits (%s)", seq.request_id, adapter)
        self.scheduler.finish(seq, "abort")
        del self.requests[seq.request_id]
        out = self._output(seq, [], seq.detokenizer.take_delta(finished=True))
        out.error = NonFiniteLogitsError(f"the model produced non-finite logits for this request ({adapter}); "
                                         "retry, or report the prompt and adapter to the server's operator")
        return out

    def _expired_output(self, seq: Sequence, error: MultiLoRAError) -> RequestOutput:
        """The final output of a request the scheduler ended for waiting too long (it holds nothing)."""
        del self.requests[seq.request_id]
        out = self._output(seq, [], seq.detokenizer.take_delta(finished=True))
        out.error = error
        return out

    def _write_adapters(self, batch) -> list[RequestOutput]:
        """Writes adapters newly placed in slots; returns the final outputs of requests failed by a write.

        A failed write frees its slot (never served half-written) and ends, once, every request that needs
        that adapter, taking them out of `batch`; the pool remembers the failure, so it is not retried
        at every step.
        """
        failed = []
        for slot, adapter in self.adapter_pool.take_pending_writes():
            try:
                self.runner.write_adapter(slot, adapter)
            except Exception:
                logger.exception("Writing adapter '%s' into GPU slot %d failed", adapter.name, slot)
                error = AdapterWriteError(f"adapter '{adapter.name}' could not be copied to the GPU and is refused "
                                          "for now; retry later, or ask the operator to check the server log")
                adapter_id = self.adapter_pool.fail_write(slot, error)
                for seq in [s for s in self.requests.values() if s.adapter_id == adapter_id]:
                    if seq in batch.seqs:
                        i = batch.seqs.index(seq)
                        del batch.seqs[i], batch.num_new_tokens[i]
                    self.scheduler.finish(seq, "abort")
                    del self.requests[seq.request_id]
                    failed.append(self._output(seq, [], seq.detokenizer.take_delta(finished=True)))
                    failed[-1].error = error
        return failed

    def _sample_row(self, seq: Sequence) -> SampleRow:
        params = seq.params
        seed = None if params.seed is None else derive_step_seed(params.seed, len(seq.output_token_ids))
        banned = () if len(seq.output_token_ids) >= params.min_tokens else tuple(self.eos_token_ids)
        return SampleRow(params, seed, banned)

    def _append_token(self, seq: Sequence, token: int) -> RequestOutput:
        now = time.time()
        seq.first_token_time = seq.first_token_time or now
        seq.output_token_ids.append(token)
        params, generated = seq.params, len(seq.output_token_ids)
        stop_string = seq.detokenizer.append(token, check_stop=generated >= params.min_tokens)
        reason = None
        if token in self.eos_token_ids and not params.ignore_eos and generated >= params.min_tokens:
            reason, seq.stop_reason = "stop", None
        elif stop_string is not None:
            reason, seq.stop_reason = "stop", stop_string
        elif generated >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(seq, reason)
            del self.requests[seq.request_id]
        return self._output(seq, [token], seq.detokenizer.take_delta(finished=reason is not None))

    def _output(self, seq: Sequence, delta_ids: list[int], delta_text: str) -> RequestOutput:
        finished = seq.is_finished
        completion = CompletionOutput(0, seq.detokenizer.text, list(seq.output_token_ids), seq.finish_reason,
                                      seq.stop_reason, delta_text, delta_ids)
        metrics = RequestMetrics(seq.arrival_time, seq.first_token_time, time.time() if finished else None)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], finished,
                             seq.lora_request, metrics)

    # ---- state ----------------------------------------------------------
    def stats(self) -> EngineStats:
        pool, counters = self.adapter_pool, self.adapter_pool.counters
        names = lambda seqs: sorted({s.adapter_name for s in seqs if s.adapter_name})
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.block_manager.num_blocks, kv_blocks_used=self.block_manager.num_used_blocks,
            max_loras=self.config.max_loras, running_adapters=names(self.scheduler.running),
            waiting_adapters=names(self.scheduler.waiting), resident_adapters=pool.resident_adapter_names,
            adapter_holds=pool.num_holds, adapter_pool_hits=counters.hits, adapter_pool_misses=counters.misses,
            adapter_loads=counters.loads, adapter_evictions=counters.evictions,
            num_preemptions=self.scheduler.num_preemptions)
