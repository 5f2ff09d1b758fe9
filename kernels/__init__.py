"""multilora's GPU kernels (imported as `multilora_kernels`); each ships with its pure-torch `*_ref` twin.

This package imports only torch, triton and the standard library. Its names load
lazily: transformers imports any importable top-level `kernels` package while
probing for the Hugging Face one, and with the repository root on sys.path that
is this directory; it should not pull in triton for a probe.
"""

import importlib

_LORA_NAMES = ("LoRAMeta", "build_lora_meta", "lora_expand", "lora_expand_ref", "lora_shrink", "lora_shrink_ref")
__all__ = list(_LORA_NAMES)


def __getattr__(name: str):
    if name in _LORA_NAMES:
        return getattr(importlib.import_module(f"{__name__}.lora"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
