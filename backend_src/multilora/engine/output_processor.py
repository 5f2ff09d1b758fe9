"""OutputProcessor: the engine's token events -> RequestOutputs, off the engine thread.

The engine thread only decides what needs no text (EOS, max_tokens, the
context limit) and emits a `TokenEvent` per request and step. The processor
owns everything textual: a streaming detokenizer per request, stop strings and
the output records. A stop string ends the request here, at once, and is
reported back so the engine frees it (vLLM V1's frontend does the same); tokens
the engine made for it in the meantime are dropped, so outputs are exactly
what a synchronous engine gives. `LLMEngine.step()` runs the processor inline;
`AsyncLLMEngine` runs it on its own output thread.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from multilora.detokenizer import IncrementalDetokenizer
from multilora.engine.sequence import Sequence
from multilora.errors import MultiLoRAError
from multilora.outputs import CompletionOutput, RequestMetrics, RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class TokenEvent:
    """What one step did to one request, as the engine thread sees it.

    Every sequence the engine takes ends with exactly one event that has a finish_reason.
    """

    seq: Sequence                       # read here for its fixed fields only (id, prompt, params, adapter, times)
    new_token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None     # "stop" (EOS), "length", "abort"
    error: Optional[MultiLoRAError] = None


@dataclass(frozen=True)
class EndedRequest:
    """A request the processor ended (stop string, or a failure of its own): the engine must free it."""

    request_id: str
    finish_reason: str
    stop_reason: Optional[str] = None


@dataclass
class _RequestState:
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    answered: bool = False              # its final output is out; waiting for the engine's finish event


class OutputProcessor:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._states: dict[Sequence, _RequestState] = {}

    @property
    def num_requests(self) -> int:
        return len(self._states)

    def process(self, events: list[TokenEvent]) -> tuple[list[RequestOutput], list[EndedRequest]]:
        """One output per event that still has something to say; the requests the engine must now free."""
        outputs, ended = [], []
        for event in events:
            try:
                out = self._process(event)
            except Exception:       # a detokenizer bug ends this request alone
                logger.exception("Building the output of request %s failed", event.seq.request_id)
                out = self._fail(event)
            if out is None:
                continue
            outputs.append(out)
            if out.finished and event.finish_reason is None:
                completion = out.outputs[0]
                ended.append(EndedRequest(out.request_id, completion.finish_reason, completion.stop_reason))
        return outputs, ended

    def _process(self, event: TokenEvent) -> Optional[RequestOutput]:
        seq = event.seq
        state = self._states.get(seq)
        if state is None:
            state = self._states[seq] = _RequestState(IncrementalDetokenizer(self.tokenizer, seq.params.stop))
        if event.finish_reason is not None:
            del self._states[seq]
        if state.answered:
            return None             # tokens made after its stop string, or the engine confirming it freed it
        new_ids, stop = [], None
        for token in event.new_token_ids:
            state.token_ids.append(token)
            new_ids.append(token)
            stop = state.detokenizer.append(token, check_stop=len(state.token_ids) >= seq.params.min_tokens)
            if stop is not None:
                break
        reason, stop_reason = event.finish_reason, None
        if reason != "stop" and stop is not None:     # EOS wins over a stop string in the same token
            reason, stop_reason = "stop", stop
        state.answered = reason is not None
        detokenizer = state.detokenizer
        return self._output(seq, detokenizer.text, state.token_ids, reason, stop_reason,
                            detokenizer.take_delta(finished=reason is not None), new_ids, event.error)

    def _fail(self, event: TokenEvent) -> Optional[RequestOutput]:
        state = self._states.pop(event.seq, None)
        if state is not None and state.answered:
            return None
        error = event.error or MultiLoRAError("internal error while building the output; see the server log")
        if event.finish_reason is None:        # still running in the engine: keep a state to drop its events
            self._states[event.seq] = _RequestState(IncrementalDetokenizer(self.tokenizer, []), answered=True)
        token_ids = state.token_ids if state is not None else []
        return self._output(event.seq, "", token_ids, "abort", None, "", [], error)

    @staticmethod
    def _output(seq: Sequence, text: str, token_ids: list[int], reason: Optional[str], stop_reason: Optional[str],
                delta_text: str, delta_ids: list[int], error: Optional[MultiLoRAError]) -> RequestOutput:
        finished = reason is not None
        completion = CompletionOutput(0, text, list(token_ids), reason, stop_reason, delta_text, delta_ids)
        metrics = RequestMetrics(seq.arrival_time, seq.first_token_time, time.time() if finished else None,
                                 seq.first_scheduled_time)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion], finished,
                             seq.lora_request, metrics, error=error)
