"""Rotary position embedding, with the rope scalings transformers supports (llama3, linear, ...)."""

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


class RotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        params = getattr(config, "rope_parameters", None) or {}
        rope_type = params.get("rope_type", "default")
        if rope_type == "default":
            dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            scaling = 1.0
        elif rope_type in ROPE_INIT_FUNCTIONS:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, None)   # on the default (model) device
        else:
            raise ValueError(f"rope type {rope_type!r} is not supported")
        if rope_type in ("dynamic", "longrope"):
            raise ValueError(f"rope type {rope_type!r} (position-dependent) is not supported")
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.attention_scaling = scaling

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim / 2]: the angles both halves of a head share (transformers repeats them)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        return (freqs.cos() * self.attention_scaling).to(dtype), (freqs.sin() * self.attention_scaling).to(dtype)
