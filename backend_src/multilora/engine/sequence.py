"""Sequence: the engine's record of one request."""

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from multilora.lora.request import LoRARequest
from multilora.sampling_params import SamplingParams


# An output token whose id is still on the device: with async scheduling the next step is
# scheduled before the previous step's ids reach the host (the device feeds them to it).
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    lora_request: Optional[LoRARequest] = None
    adapter: Any = None                      # LoRAAdapter (CPU weights) when lora_request is set
    arrival_time: float = field(default_factory=time.time)
    first_scheduled_time: Optional[float] = None   # first admitted to a step (time.time(), as arrival_time)
    first_token_time: Optional[float] = None
    output_token_ids: list[int] = field(default_factory=list)   # the last one or two may be PLACEHOLDERs
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0             # tokens whose KV is in the cache
    finish_reason: Optional[str] = None
    num_preemptions: int = 0

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (called every step)."""
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len:end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - prompt_len]

    def token_at(self, index: int) -> int:
        prompt_len = len(self.prompt_token_ids)
        return self.prompt_token_ids[index] if index < prompt_len else self.output_token_ids[index - prompt_len]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def adapter_id(self) -> int:
        """0 for the base model."""
        return self.lora_request.lora_int_id if self.lora_request else 0

    @property
    def adapter_name(self) -> Optional[str]:
        return self.lora_request.lora_name if self.lora_request else None

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
