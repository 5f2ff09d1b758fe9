"""ModelRunner: the one owner of the device: model weights, KV cache, adapter slot weights.

Each step it turns the scheduled batch into flat tensors (token ids, positions,
slot mapping, block tables, the token-to-adapter-slot mapping), runs the model,
and samples one token for every sequence whose prompt is fully computed.
"""

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch

from multilora.config import EngineConfig
from multilora.engine.cuda_graph import DecodeGraphs
from multilora.engine.scheduler import ScheduledBatch
from multilora.lora.mapping import lora_step
from multilora.model.attention import AttentionMetadata
from multilora.model.loader import build_model
from multilora.sampler import Sampler, SampleRow
from multilora_kernels.lora import build_lora_meta

logger = logging.getLogger(__name__)

_ACTIVATION_RESERVE_BYTES = 2 << 30    # headroom on the GPU for activations and logits


def resolve_device(config: EngineConfig) -> torch.device:
    """The engine's device, with an index for CUDA (torch.cuda.set_device needs one)."""
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(config: EngineConfig, hf_config, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if device.type == "cpu":
        return torch.float32                       # half precision is slow and inexact on CPUs
    checkpoint = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(checkpoint, str):
        checkpoint = getattr(torch, checkpoint, None)
    return checkpoint if checkpoint in (torch.float16, torch.bfloat16) else torch.bfloat16


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, max_model_len: int):
        self.config = config
        self.device = resolve_device(config)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)    # weights, KV cache and CUDA graphs all on this GPU
        self.dtype = resolve_dtype(config, hf_config, self.device)
        torch.manual_seed(config.seed)
        self.model = build_model(hf_config, config.model, self.dtype, self.device, config.load_format)
        self.lora_layers = self.model.lora_layers() if config.enable_lora else {}
        for layer in self.lora_layers.values():
            layer.enable_lora(config.max_loras, config.max_lora_rank)
        self.num_kv_blocks = self._measure_kv_blocks(hf_config, max_model_len)
        self.kv_caches = self._allocate_kv_caches(hf_config)
        self.sampler = Sampler()
        self.decode_graphs = None
        if self.device.type == "cuda" and not config.enforce_eager:
            self.decode_graphs = DecodeGraphs(
                self.model, self.kv_caches, max_batch=min(config.max_num_seqs, 256),
                max_blocks_per_seq=-(-max_model_len // config.block_size), scratch_block=self.num_kv_blocks,
                block_size=config.block_size, num_lora_slots=config.max_loras if self.lora_layers else None)

    # ---- start-up -------------------------------------------------------
    def _kv_shape(self, hf_config, num_blocks: int) -> tuple[int, ...]:
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        return (2, num_blocks, self.config.block_size, hf_config.num_key_value_heads, head_dim)

    def _measure_kv_blocks(self, hf_config, max_model_len: int) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        block_bytes = hf_config.num_hidden_layers * torch.Size(self._kv_shape(hf_config, 1)).numel() * self.dtype.itemsize
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - (1 - self.config.gpu_memory_utilization) * total - _ACTIVATION_RESERVE_BYTES
        else:
            budget = self.config.cpu_kv_cache_gib * (1 << 30)
        # Never more than every sequence at full length needs.
        most = self.config.max_num_seqs * -(-max_model_len // self.config.block_size)
        blocks = min(int(budget // block_bytes), most)
        if blocks < 1:
            raise ValueError("no memory left for the KV cache; raise gpu_memory_utilization, set num_kv_blocks, "
                             "or use a smaller model")
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", blocks, self.config.block_size,
                    blocks * block_bytes / (1 << 30))
        return blocks

    def _allocate_kv_caches(self, hf_config) -> list[torch.Tensor]:
        # One block more than the block manager hands out: the scratch block that padded
        # rows of a CUDA-graph batch write into.
        shape = self._kv_shape(hf_config, self.num_kv_blocks + 1)
        return [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(hf_config.num_hidden_layers)]

    # ---- adapters -------------------------------------------------------
    def write_adapter(self, slot: int, adapter) -> None:
        """Copies a loaded adapter's weights into GPU slot `slot` of every LoRA layer."""
        for key, layer in self.lora_layers.items():
            weights = adapter.weights.get(key)
            if weights is None:
                layer.set_slot(slot, None, None, 0.0)
            else:
                a, b, scaling = weights
                layer.set_slot(slot, a.to(self.device, self.dtype), b.to(self.device, self.dtype), scaling)

    # ---- one step -------------------------------------------------------
    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, adapter_slots: list[int],
                sample_rows: list[Optional[SampleRow]]) -> list[Optional[int]]:
        """Runs the batch; returns the sampled token per sequence (None where no row was asked)."""
        step = self._prepare(batch, adapter_slots)
        graphs = self.decode_graphs
        if graphs is not None and not step.query_lens and len(step.input_ids) <= graphs.max_batch:
            hidden = graphs.run(step.input_ids, step.positions, step.slot_mapping, step.decode_tables,
                                step.decode_lens, step.token_slots)
        else:
            hidden = self._run_eager(step, adapter_slots)
        wanted = [i for i, row in enumerate(sample_rows) if row is not None]
        result: list[Optional[int]] = [None] * len(sample_rows)
        if wanted:
            rows = self._tensor([step.last_index[i] for i in wanted], torch.long)
            logits = self.model.compute_logits(hidden[rows])
            for i, token in zip(wanted, self.sampler(logits, [sample_rows[i] for i in wanted]).tolist()):
                result[i] = token
        return result

    def _prepare(self, batch: ScheduledBatch, adapter_slots: list[int]) -> "_StepInputs":
        """Flattens the batch: prefill chunks first, then single-token (decode) sequences."""
        step = _StepInputs()
        bs = self.config.block_size
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] == 1)
        for i in order:
            seq, num_new = batch.seqs[i], batch.num_new_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            step.input_ids.extend(seq.token_slice(start, end))
            step.positions.extend(range(start, end))
            step.slot_mapping.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
            step.token_slots.extend([adapter_slots[i]] * num_new)
            step.last_index[i] = len(step.input_ids) - 1
            table = seq.block_table[:-(-end // bs)]
            if num_new == 1:
                step.decode_tables.append(table)
                step.decode_lens.append(end)
            else:
                step.prefill_tables.append(table)
                step.context_lens.append(end)
                step.query_lens.append(num_new)
        return step

    def _run_eager(self, step: "_StepInputs", adapter_slots: list[int]) -> torch.Tensor:
        meta = AttentionMetadata(self._tensor(step.slot_mapping, torch.long), step.query_lens, step.context_lens,
                                 [self._tensor(t, torch.long) for t in step.prefill_tables],
                                 num_prefill_tokens=sum(step.query_lens))
        if step.decode_tables:
            width = max(len(t) for t in step.decode_tables)
            padded = [t + [0] * (width - len(t)) for t in step.decode_tables]
            meta.decode_block_tables = self._tensor(padded, torch.int32)
            meta.decode_context_lens = self._tensor(step.decode_lens, torch.int32)
        lora_meta = None
        if self.lora_layers and any(s >= 0 for s in adapter_slots):
            lora_meta = build_lora_meta(self._tensor(step.token_slots, torch.int32), self.config.max_loras)
        with lora_step(lora_meta):
            return self.model(self._tensor(step.input_ids, torch.long), self._tensor(step.positions, torch.long),
                              self.kv_caches, meta)

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)


@dataclass
class _StepInputs:
    """One step's flattened inputs, as host lists."""

    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    token_slots: list[int] = field(default_factory=list)
    last_index: dict[int, int] = field(default_factory=dict)     # batch index -> row of its last token
    query_lens: list[int] = field(default_factory=list)          # prefill sequences
    context_lens: list[int] = field(default_factory=list)
    prefill_tables: list[list[int]] = field(default_factory=list)
    decode_tables: list[list[int]] = field(default_factory=list)  # decode sequences
    decode_lens: list[int] = field(default_factory=list)
