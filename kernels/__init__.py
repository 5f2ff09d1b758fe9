"""multilora's GPU kernels (imported as `multilora_kernels`); each ships with its pure-torch `*_ref` twin.

This package imports only torch, triton and the standard library. Its names load
lazily: transformers imports any importable top-level `kernels` package while
probing for the Hugging Face one, and with the repository root on sys.path that
is this directory; it should not pull in triton for a probe.
"""

import importlib

_MODULE_OF = {
    **dict.fromkeys(("LoRAMeta", "build_lora_meta", "lora_expand", "lora_expand_ref", "lora_shrink",
                     "lora_shrink_ref"), "lora"),
    "LoRADelta": "lora_delta",
    **dict.fromkeys(("fused_add_rms_norm", "fused_add_rms_norm_ref"), "norm"),
    **dict.fromkeys(("rotary_kv_write", "rotary_kv_write_ref"), "rotary"),
    **dict.fromkeys(("silu_and_mul", "silu_and_mul_ref"), "activation"),
}
__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
