"""multilora's GPU kernels (imported as `multilora_kernels`); each ships with its pure-torch `*_ref` twin.

This package imports only torch, triton and the standard library.
"""

from .lora import (
    LoRAMeta,
    build_lora_meta,
    lora_expand,
    lora_expand_ref,
    lora_shrink,
    lora_shrink_ref,
)

__all__ = [
    "LoRAMeta",
    "build_lora_meta",
    "lora_expand",
    "lora_expand_ref",
    "lora_shrink",
    "lora_shrink_ref",
]
