"""ModelRunner: the one owner of the device: model weights, KV cache, adapter slot weights.

Each step it turns the scheduled batch into flat tensors (token ids, positions,
slot mapping, block tables, the token-to-adapter-slot mapping), runs the model,
and samples one token for every sequence whose prompt is fully computed.
"""

import logging
from typing import Optional

import torch

from multilora.config import EngineConfig
from multilora.engine.scheduler import ScheduledBatch
from multilora.lora.mapping import lora_step
from multilora.model.attention import AttentionMetadata
from multilora.model.loader import build_model
from multilora.sampler import Sampler, SampleRow
from multilora_kernels.lora import build_lora_meta

logger = logging.getLogger(__name__)

_ACTIVATION_RESERVE_BYTES = 2 << 30    # headroom on the GPU for activations and logits


def resolve_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


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
        self.dtype = resolve_dtype(config, hf_config, self.device)
        torch.manual_seed(config.seed)
        self.model = build_model(hf_config, config.model, self.dtype, self.device, config.load_format)
        self.lora_layers = self.model.lora_layers() if config.enable_lora else {}
        for layer in self.lora_layers.values():
            layer.enable_lora(config.max_loras, config.max_lora_rank)
        self.num_kv_blocks = self._measure_kv_blocks(hf_config, max_model_len)
        self.kv_caches = self._allocate_kv_caches(hf_config)
        self.sampler = Sampler()

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
            raise ValueError("no memory left for the KV cache; lower gpu_memory_utilization use or the model size")
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", blocks, self.config.block_size,
                    blocks * block_bytes / (1 << 30))
        return blocks

    def _allocate_kv_caches(self, hf_config) -> list[torch.Tensor]:
        shape = self._kv_shape(hf_config, self.num_kv_blocks)
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
        # Prefill chunks first, then single-token (decode) sequences, whose attention is batched.
        order = sorted(range(len(batch.seqs)), key=lambda i: batch.num_new_tokens[i] == 1)
        input_ids, positions, slot_mapping, token_slots, last_index = [], [], [], [], {}
        block_tables, context_lens, query_lens, decode_tables, decode_lens = [], [], [], [], []
        bs = self.config.block_size
        for i in order:
            seq, num_new = batch.seqs[i], batch.num_new_tokens[i]
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + num_new
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slot_mapping.extend(seq.block_table[p // bs] * bs + p % bs for p in range(start, end))
            token_slots.extend([adapter_slots[i]] * num_new)
            last_index[i] = len(input_ids) - 1
            table = seq.block_table[:-(-end // bs)]
            if num_new == 1:
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                block_tables.append(self._tensor(table, torch.long))
                context_lens.append(end)
                query_lens.append(num_new)
        meta = AttentionMetadata(self._tensor(slot_mapping, torch.long), query_lens, context_lens, block_tables,
                                 num_prefill_tokens=sum(query_lens))
        if decode_tables:
            width = max(len(t) for t in decode_tables)
            meta.decode_block_tables = self._tensor([t + [0] * (width - len(t)) for t in decode_tables], torch.long)
            meta.decode_context_lens = self._tensor(decode_lens, torch.long)
        lora_meta = None
        if self.lora_layers and any(s >= 0 for s in adapter_slots):
            lora_meta = build_lora_meta(self._tensor(token_slots, torch.int32), self.config.max_loras)
        with lora_step(lora_meta):
            hidden = self.model(self._tensor(input_ids, torch.long), self._tensor(positions, torch.long),
                                self.kv_caches, meta)
        wanted = [i for i, row in enumerate(sample_rows) if row is not None]
        result: list[Optional[int]] = [None] * len(sample_rows)
        if wanted:
            logits = self.model.compute_logits(hidden[self._tensor([last_index[i] for i in wanted], torch.long)])
            for i, token in zip(wanted, self.sampler(logits, [sample_rows[i] for i in wanted])):
                result[i] = token
        return result

    def _tensor(self, values, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)
