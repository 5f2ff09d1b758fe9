"""A LoRA layer's expand carried to the kernel that reads its output next: `LoRADelta` and its kernel arguments.

At decode (a few tokens per adapter) an expand is a launch of a few us for a few KB of B per token,
and the kernels that read a LoRA layer's output next (residual add + RMSNorm, SiLU-and-mul) read it
anyway. `LoRALinear.forward_deferred` hands them the expand undone, as a `LoRADelta`; each adds a
token's delta as it reads the token's row with `lora_delta_of_token` (kernels/lora.py: the per-token
expand's own sum, so the values are that expand's, bit for bit), from the arguments
`delta_kernel_args` lays out. Their torch twins `apply` it first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multilora_kernels import _launch
from multilora_kernels.lora import LoRAMeta, lora_expand, rank_block


@dataclass(frozen=True)
class LoRADelta:
    """A LoRA layer's expand not yet added into its output y (see `lora_expand` for the arguments)."""

    buf: torch.Tensor               # [P, T, n * R] float32, from lora_shrink
    lora_b: torch.Tensor            # [S, sum N_i, R]
    scales: torch.Tensor            # [S, n] float32
    meta: LoRAMeta
    slices: tuple[int, ...]         # the widths N_i

    def __post_init__(self):
        assert self.buf.dim() == 3 and self.scales.dim() == 2, (tuple(self.buf.shape), tuple(self.scales.shape))

    def apply(self, y: torch.Tensor) -> None:
        """`lora_expand` into y [T, sum N_i] now."""
        lora_expand(y, self.buf, self.lora_b, self.scales, self.meta, self.slices)


def readers_add_delta(t: torch.Tensor) -> bool:
    """Whether the kernels reading a LoRA layer's output on t's device add a `LoRADelta` as they read
    (the Triton kernels' path); their torch twins apply it first, so deferring it gains nothing there."""
    return _launch.use_triton(t)


def delta_kernel_args(delta: LoRADelta | None, like: torch.Tensor) -> tuple[tuple, dict]:
    """The arguments a consumer kernel takes for `lora_delta_of_token`, in its order (buf, B, scales,
    token slots, R, the eight strides), and its constexprs HAS_LORA, LORA_P, LORA_BLOCK_R. Without a delta
    (HAS_LORA False) placeholders: `like` for the pointers, zeros."""
    if delta is None:
        return (like, like, like, like) + (0,) * 9, dict(HAS_LORA=False, LORA_P=1, LORA_BLOCK_R=16)
    rank = delta.lora_b.shape[2]
    return ((delta.buf, delta.lora_b, delta.scales, delta.meta.token_slots, rank,
             *delta.buf.stride(), *delta.lora_b.stride(), *delta.scales.stride()),
            dict(HAS_LORA=True, LORA_P=delta.buf.shape[0], LORA_BLOCK_R=rank_block(rank)))
