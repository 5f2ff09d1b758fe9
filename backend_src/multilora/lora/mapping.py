"""The step's token-to-adapter mapping, visible to every LoRA layer during one forward pass.

The model runner builds it once per step and enters `lora_step(meta)`; the
model itself never sees adapters: each `LoRALinear` reads the active mapping.
`lora_step(None)` (or no `lora_step` at all) is a step where no row uses an
adapter: every LoRA layer runs its GEMM alone and launches no LoRA kernel, so
a CUDA graph captured under it costs exactly the base model.
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
