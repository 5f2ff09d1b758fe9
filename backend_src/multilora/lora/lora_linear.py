"""LoRALinear: a linear layer plus stacked per-slot LoRA weights.

`lora_a[s]` is [max_rank, in] and `lora_b[s]` is [out, max_rank]; an adapter of
smaller rank is zero-padded, so ranks mix freely in one batch. The output is
`x @ W.T + b` plus, for each token t with slot s >= 0, `scale[s] * (x[t] @ A[s].T) @ B[s].T`.
"""

import torch
from torch import nn

from multilora.lora.mapping import active_lora_meta
from multilora_kernels.lora import lora_expand, lora_shrink


class LoRALinear(nn.Linear):
    """Keeps nn.Linear's parameter names, so checkpoints load unchanged."""

    def enable_lora(self, num_slots: int, max_rank: int) -> None:
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, self.in_features, **factory), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, self.out_features, max_rank, **factory), persistent=False)
        self.register_buffer("lora_scales", torch.zeros(num_slots, dtype=torch.float32, device=self.weight.device),
                             persistent=False)

    @property
    def has_lora(self) -> bool:
        return hasattr(self, "lora_a")

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scale: float) -> None:
        """Writes one adapter's weights for this layer into `slot` (None: the adapter does not touch it)."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        self.lora_scales[slot] = 0.0
        if a is not None:
            rank = a.shape[0]
            self.lora_a[slot, :rank].copy_(a)
            self.lora_b[slot, :, :rank].copy_(b)
            self.lora_scales[slot] = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        meta = active_lora_meta() if self.has_lora else None
        if meta is not None:
            buf = lora_shrink(x, self.lora_a, meta)
            lora_expand(y, buf, self.lora_b, self.lora_scales, meta)
        return y
