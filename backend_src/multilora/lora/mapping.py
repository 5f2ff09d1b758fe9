"""The step's token-to-adapter mapping, visible to every LoRA layer during one forward pass.

The model runner builds it once per step and enters `lora_step(meta)`; the
model itself never sees adapters: each `LoRALinear` reads the active mapping.
`lora_step(None)` (or no `lora_step` at all) is a step where no row uses an
adapter: every LoRA layer runs its GEMM alone and launches no LoRA kernel, so
a CUDA graph captured under it costs exactly the base model.
"""

import contextlib
import enum
import threading
from typing import Iterable, Iterator, Optional

from multilora_kernels.lora import LoRAMeta

_active = threading.local()

# At most this many tokens per adapter on average, the expand runs one program per token. Measured on
# the H200 at 64 decode tokens, rank 16 (bench/RESULTS.md, 2026-12-02): over 32 adapters (2 tokens each)
# the per-token expand took 31 us per layer where slot tiles took 57; over 8 (8 each) 31 vs 25, one
# adapter 31 vs 22 (its tokens read an adapter's B over and over, where a tile reads it once).
PER_TOKEN_EXPAND_MAX_TOKENS = 4


class LoRAVariant(enum.Enum):
    """How a forward pass runs its LoRA kernels; a CUDA graph is captured per variant."""

    TILES = "tiles"            # the expand per slot tile of tokens: several tokens per adapter
    PER_TOKEN = "per_token"    # the expand per token: tokens spread over many adapters


def lora_variant(token_counts: Iterable[tuple[int, int]]) -> Optional[LoRAVariant]:
    """The variant for a forward pass given (adapter slot, tokens) pairs (slot -1 = base model); None
    when no token uses an adapter."""
    per_slot: dict[int, int] = {}
    for slot, tokens in token_counts:
        if slot >= 0:
            per_slot[slot] = per_slot.get(slot, 0) + tokens
    if not per_slot:
        return None
    spread = sum(per_slot.values()) <= PER_TOKEN_EXPAND_MAX_TOKENS * len(per_slot)
    return LoRAVariant.PER_TOKEN if spread else LoRAVariant.TILES


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
