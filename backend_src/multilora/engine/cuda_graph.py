"""DecodeGraphs: CUDA graphs of the decode step, per batch size of a ladder and LoRA variant.

A decode step (one new token per sequence) launches thousands of small kernels;
replaying a captured graph removes the per-launch host cost. The graphs capture
the model runner's `decode_forward(n, lora)`, which reads the step inputs'
persistent device buffers; the StepInputBuilder pads a batch up to the captured
size with rows that write their K/V into a scratch block and use no adapter.
A step in which no row uses an adapter replays the graph captured without LoRA,
so it launches no LoRA kernel; with adapters, the LoRA mapping is built inside
the graph from the buffered adapter slots, and the variant (multilora.lora.mapping.
LoRAVariant: the expand per slot tile or per token) is the step's own.
"""

import logging
from typing import Callable, Optional

import torch

from multilora.lora.mapping import LoRAVariant

logger = logging.getLogger(__name__)

# (batch size, LoRA variant or None) -> hidden states [n, hidden]
DecodeForward = Callable[[int, Optional[LoRAVariant]], torch.Tensor]


def batch_size_ladder(max_batch: int) -> list[int]:
    sizes = [n for n in (1, 2, 4, 8) if n < max_batch] + list(range(16, max_batch, 16))
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, forward: DecodeForward, max_batch: int, with_lora: bool):
        self.forward = forward
        self.sizes = batch_size_ladder(max_batch)
        self.lora_variants: tuple[Optional[LoRAVariant], ...] = (None, *LoRAVariant) if with_lora else (None,)
        self.replays: dict[tuple[int, Optional[LoRAVariant]], Callable[[], torch.Tensor]] = {}
        self._capture_all()

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def size_for(self, n: int) -> int:
        """The smallest captured batch size >= n."""
        return next(s for s in self.sizes if s >= n)

    def run(self, size: int, lora: Optional[LoRAVariant]) -> torch.Tensor:
        """Replays the graph of a captured `size` and variant; returns its hidden states [size, hidden]."""
        return self.replays[(size, lora)]()

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for size in reversed(self.sizes):            # largest first, so smaller graphs reuse its memory
            for lora in self.lora_variants:
                self.replays[(size, lora)], pool = self._capture(size, lora, pool)
        logger.info("Captured CUDA graphs of the decode step for batch sizes %s (%s)", self.sizes,
                    ", ".join("no LoRA" if v is None else f"LoRA {v.value}" for v in self.lora_variants))

    def _capture(self, size: int, lora: Optional[LoRAVariant], pool):
        """Returns (a replay returning the graph's output, the memory pool for the next capture)."""
        self.forward(size, lora)                # warm-up: compiles Triton kernels outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            hidden = self.forward(size, lora)
        torch.cuda.synchronize()

        def replay() -> torch.Tensor:
            graph.replay()
            return hidden

        return replay, graph.pool()
