"""What the engine returns: plain records, the same shape as vLLM's."""

from dataclasses import dataclass, field
from typing import Optional

from multilora.errors import MultiLoRAError
from multilora.lora.request import LoRARequest


@dataclass
class CompletionOutput:
    """One generated sequence so far.

    `text`/`token_ids` are cumulative; `delta_text`/`delta_token_ids` are what
    this output added since the previous one for the same request, so that the
    deltas of a stream concatenate exactly to the final `text`.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None  # "stop", "length" or "abort"
    stop_reason: Optional[str | int] = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """A request's times (time.time()): arrival is when the engine took it, before its adapter loaded."""

    arrival_time: float
    first_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    first_scheduled_time: Optional[float] = None     # first admitted to a step; None if it never was

    @property
    def time_in_queue(self) -> Optional[float]:
        """Arrival to first scheduled: preparing (tokenizing, loading the adapter) and waiting."""
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_in_prefill(self) -> Optional[float]:
        """First scheduled to first token: the prompt's prefill chunks."""
        if self.first_scheduled_time is None or self.first_token_time is None:
            return None
        return self.first_token_time - self.first_scheduled_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    lora_request: Optional[LoRARequest] = None
    metrics: Optional[RequestMetrics] = None
    # Set, with finished=True, when the request failed; outputs hold what was made before.
    error: Optional[MultiLoRAError] = None
