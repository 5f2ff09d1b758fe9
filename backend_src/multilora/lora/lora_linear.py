"""LoRALinear: a linear layer of one or more output slices, plus stacked per-slot LoRA weights.

A fused projection (q/k/v, or gate/up) is one GEMM over the slices' weights
stacked at load; adapters still name the HF modules (q_proj, ...), and each
module is one slice (`LoRATarget`). For S adapter slots, rank R and n slices:

    lora_a [S, n, R, in]     the slices' A stacked
    lora_b [S, out, R]       slice i's B in the rows of slice i's output columns
    lora_scales [S, n]       float32

An adapter of smaller rank, or one that leaves a slice out, is zero there, so
ranks and targets mix freely in one batch. The output is `x @ W.T + b` plus, for
each token t with adapter slot s >= 0, each slice's `scale * (x @ A_i.T) @ B_i.T`:
one shrink and one expand launch per layer whatever n is. Without a mapping
(`lora_step(None)`, a step where no row uses an adapter) it is the GEMM alone.
`forward_deferred` leaves a decode step's expand to the kernel that reads the
output next (a `LoRADelta`: residual add + RMSNorm, SiLU-and-mul add it as they read).

Under tensor parallelism the layer is this rank's part (`shard`, multilora.tensor_parallel):
its sizes are the local ones, and `LoRATarget.shard_lora` cuts an adapter's full A/B to fit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from multilora.lora.mapping import active_lora_meta
from multilora.tensor_parallel import LinearShard
from multilora_kernels.lora import lora_shrink
from multilora_kernels.lora_delta import LoRADelta, readers_add_delta

# Steps of at most this many tokens (decode) may leave the expand to the output's reader
# (`forward_deferred`): there the expand is a launch of a few us for a few KB of B per token, which
# the reading kernel adds for the cost of loading those KB (bench/RESULTS.md, 2026-12-03: 32 adapters
# base + 2.20 -> + 1.93 ms a step). Larger steps would re-read each adapter's B per token in the
# reader, where the expand's slot tiles read it once.
DEFERRED_EXPAND_MAX_TOKENS = 128


class LoRALinear(nn.Module):
    """`weight` [sum(slices), in] (and `bias`), the slices' HF weights stacked in `slice_names` order."""

    def __init__(self, in_features: int, slices: tuple[int, ...], slice_names: tuple[str, ...], bias: bool,
                 shard: LinearShard | None = None):
        super().__init__()
        assert len(slices) == len(slice_names) >= 1, f"slices {slices} vs names {slice_names}"
        self.in_features, self.slices, self.slice_names = in_features, tuple(slices), tuple(slice_names)
        self.shard = shard or LinearShard.whole(in_features, self.slices)
        assert tuple(s.size for s in self.shard.outputs) == self.slices and self.shard.input.size == in_features, (
            f"shard {self.shard} does not fit in {in_features}, slices {self.slices}")
        self.out_features = sum(slices)
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features))
        self.bias = nn.Parameter(torch.empty(self.out_features)) if bias else None
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.lora_scales: torch.Tensor | None = None

    def slice_rows(self, index: int) -> slice:
        """Rows of `weight` (and columns of the output) that slice `index` owns."""
        start = sum(self.slices[:index])
        return slice(start, start + self.slices[index])

    def attach_lora(self, lora_a: torch.Tensor, lora_b: torch.Tensor, lora_scales: torch.Tensor) -> None:
        """Points the layer at its per-slot weights (views into the slot buffer; any strides)."""
        num_slots, rank = lora_b.shape[0], lora_b.shape[2]
        assert lora_a.shape == (num_slots, len(self.slices), rank, self.in_features), tuple(lora_a.shape)
        assert lora_b.shape == (num_slots, self.out_features, rank), tuple(lora_b.shape)
        assert lora_scales.shape == (num_slots, len(self.slices)), tuple(lora_scales.shape)
        self.lora_a, self.lora_b, self.lora_scales = lora_a, lora_b, lora_scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, delta = self._forward(x)
        if delta is not None:
            delta.apply(y)
        return y

    def forward_deferred(self, x: torch.Tensor) -> tuple[torch.Tensor, LoRADelta | None]:
        """(y, delta): `forward(x)` is y plus `delta` (None: nothing to add), for a caller that hands
        the delta to the kernel reading y. The expand is deferred only in decode-sized steps on the
        Triton kernels' path and with the whole layer on this device (no all-reduce in between);
        otherwise it is applied here and delta is None."""
        y, delta = self._forward(x)
        if delta is not None and not self._defers_expand(x):
            delta.apply(y)
            delta = None
        return y, delta

    def _defers_expand(self, x: torch.Tensor) -> bool:
        return (x.shape[0] <= DEFERRED_EXPAND_MAX_TOKENS and readers_add_delta(x) and self.shard.input.is_whole
                and all(s.is_whole for s in self.shard.outputs))

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, LoRADelta | None]:
        meta = active_lora_meta() if self.lora_a is not None else None
        if meta is None:
            return self._base(x), None
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # In a decode graph the shrink (latency-bound, a few us) runs beside the base GEMM
            # (bandwidth-bound) as a parallel branch; the expand joins both. Each fork waits for all
            # earlier work, so the shrink's buffer is never reused while the main stream reads it.
            main, side = torch.cuda.current_stream(), _side_stream(x.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                buf = lora_shrink(x, self.lora_a, meta)
            y = self._base(x)
            main.wait_stream(side)
        else:
            y = self._base(x)
            buf = lora_shrink(x, self.lora_a, meta)
        return y, LoRADelta(buf, self.lora_b, self.lora_scales, meta, self.slices)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias if self.shard.adds_bias else None)


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


@dataclass(frozen=True)
class LoRATarget:
    """One HF module an adapter may target (q_proj, ...): slice `index` of `layer`.

    `enable_lora(num_slots, max_rank)` turns LoRA on for the whole model at once
    (one slot buffer for every layer); it may be called once per target.
    """

    layer: LoRALinear
    index: int
    enable: Callable[[int, int], object]

    @property
    def rows(self) -> slice:
        return self.layer.slice_rows(self.index)

    @property
    def in_features(self) -> int:
        return self.layer.in_features

    @property
    def out_features(self) -> int:
        return self.layer.slices[self.index]

    def shard_lora(self, lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the module's full A [r, in] and B [out, r] (both whole on one device)."""
        return self.layer.shard.lora(self.index, lora_a, lora_b)

    def enable_lora(self, num_slots: int, max_rank: int) -> None:
        self.enable(num_slots, max_rank)
