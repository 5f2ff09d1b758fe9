"""DecodeGraphs: CUDA graphs of the decode step, one per batch size of a ladder.

A decode step (one new token per sequence) launches thousands of small kernels;
replaying a captured graph removes the per-launch host cost. Inputs live in
static buffers that each step overwrites; a batch is padded up to the next
captured size with rows that write their K/V into a scratch block and use no
adapter. The step's LoRA mapping is built inside the graph from the static
token-to-slot buffer, so it costs no extra host work either.
"""

import logging
from typing import Optional

import torch

from multilora.lora.mapping import lora_step
from multilora.model.attention import AttentionMetadata
from multilora_kernels.lora import build_lora_meta

logger = logging.getLogger(__name__)


def batch_size_ladder(max_batch: int) -> list[int]:
    sizes = [n for n in (1, 2, 4, 8) if n < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, kv_caches: list[torch.Tensor], max_batch: int, max_blocks_per_seq: int,
                 scratch_block: int, block_size: int, num_lora_slots: Optional[int]):
        self.model, self.kv_caches = model, kv_caches
        self.block_size, self.scratch_block = block_size, scratch_block
        self.num_lora_slots = num_lora_slots
        device = kv_caches[0].device
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(max_batch, **long)
        self.positions = torch.zeros(max_batch, **long)
        self.slot_mapping = torch.zeros(max_batch, **long)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.context_lens = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.token_slots = torch.zeros(max_batch, dtype=torch.int32, device=device)
        self.sizes = batch_size_ladder(max_batch)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._capture_all()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _reset_padding(self, start: int) -> None:
        """Rows from `start` on become harmless padding: scratch block, context of 1, no adapter."""
        self.input_ids[start:] = 0
        self.positions[start:] = 0
        self.slot_mapping[start:] = self.scratch_block * self.block_size
        self.block_tables[start:, 0] = self.scratch_block
        self.context_lens[start:] = 1
        self.token_slots[start:] = -1

    def _forward(self, n: int) -> torch.Tensor:
        meta = AttentionMetadata(self.slot_mapping[:n], [], [], [], num_prefill_tokens=0,
                                 decode_block_tables=self.block_tables[:n], decode_context_lens=self.context_lens[:n])
        lora_meta = build_lora_meta(self.token_slots[:n], self.num_lora_slots) if self.num_lora_slots else None
        with lora_step(lora_meta):
            return self.model(self.input_ids[:n], self.positions[:n], self.kv_caches, meta)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        self._reset_padding(0)
        pool = None
        for n in reversed(self.sizes):            # largest first, so smaller graphs reuse its memory
            self._forward(n)                       # warm-up: compiles Triton kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(n)
            pool = graph.pool()
            self.graphs[n] = (graph, hidden)
        torch.cuda.synchronize()
        logger.info("Captured CUDA graphs of the decode step for batch sizes %s", self.sizes)

    def run(self, input_ids: list[int], positions: list[int], slot_mapping: list[int],
            block_tables: list[list[int]], context_lens: list[int], token_slots: list[int]) -> torch.Tensor:
        """Replays the graph of the smallest captured size >= len(input_ids); returns hidden states [n, hidden]."""
        n = len(input_ids)
        size = next(s for s in self.sizes if s >= n)
        device = self.input_ids.device
        as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
        self.input_ids[:n].copy_(as_tensor(input_ids, torch.long))
        self.positions[:n].copy_(as_tensor(positions, torch.long))
        self.slot_mapping[:n].copy_(as_tensor(slot_mapping, torch.long))
        width = max(len(t) for t in block_tables)
        padded = [t + [self.scratch_block] * (width - len(t)) for t in block_tables]
        self.block_tables[:n, :width].copy_(as_tensor(padded, torch.int32))
        self.context_lens[:n].copy_(as_tensor(context_lens, torch.int32))
        self.token_slots[:n].copy_(as_tensor(token_slots, torch.int32))
        self._reset_padding(n)
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:n]
