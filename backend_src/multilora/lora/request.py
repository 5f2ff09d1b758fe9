"""LoRARequest: which adapter a request wants (the vLLM-style public record)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter by name, stable int id and local PEFT directory.

    The same `lora_int_id` must always mean the same adapter files: the engine
    caches loaded adapters by it. A changed adapter needs a new id.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self):
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be >= 1, got {self.lora_int_id}")

    # vLLM-compatible aliases.
    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
