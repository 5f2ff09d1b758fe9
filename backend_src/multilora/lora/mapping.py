"""The step's token-to-adapter mapping, visible to every LoRA layer during one forward pass.

The model runner builds it once per step and enters `lora_step(meta)`; the
model itself never sees adapters: each `LoRALinear` reads the active mapping.
"""

import contextlib
import threading
from typing import Iterator, Optional

from multilora_kernels.lora import LoRAMeta

_active = threading.local()


@contextlib.contextmanager
def lora_step(meta: Optional[LoRAMeta]) -> Iterator[None]:
    previous = getattr(_active, "meta", None)
    _active.meta = meta
    try:
        yield
    finally:
        _active.meta = previous


def active_lora_meta() -> Optional[LoRAMeta]:
    return getattr(_active, "meta", None)
