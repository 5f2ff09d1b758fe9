"""LLM: the in-process batch API (vLLM's multi-LoRA workflow)."""

import itertools
import logging
from typing import Optional, Sequence as Seq, Union

from multilora.config import EngineConfig
from multilora.engine.llm_engine import LLMEngine
from multilora.lora.request import LoRARequest
from multilora.outputs import RequestOutput
from multilora.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = Union[str, list[int]]


class LLM:
    """`LLM(model=..., enable_lora=True, max_loras=4, ...)`: keyword arguments are EngineConfig fields."""

    def __init__(self, model: str, **kwargs):
        # A batch queues all its prompts at once by design: no waiting-queue bound unless asked for.
        kwargs.setdefault("max_waiting_requests", None)
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts: Union[Prompt, Seq[Prompt]], sampling_params: Optional[SamplingParams] = None,
                 lora_request: Union[None, LoRARequest, Seq[Optional[LoRARequest]]] = None) -> list[RequestOutput]:
        """Runs every prompt to completion; returns the final outputs in prompt order.

        Every request is validated (and its adapter loaded) before any runs, so a bad
        one raises its typed error and leaves the engine as it was.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        loras = lora_request if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(params_list) != len(prompts) or len(loras) != len(prompts):
            raise ValueError("sampling_params and lora_request lists must have one entry per prompt")
        engine = self.llm_engine
        seqs = [engine.make_sequence(f"llm-{next(self._ids)}", prompt, p, lora)
                for prompt, p, lora in zip(prompts, params_list, loras)]
        finals: dict[str, RequestOutput] = {}
        try:
            for seq in seqs:
                engine.add_sequence(seq)
            while len(finals) < len(seqs):
                assert engine.has_unfinished_requests(), "requests unfinished but none scheduled"
                for out in engine.step():
                    if out.finished:
                        finals[out.request_id] = out
                logger.debug("generate: %d/%d requests finished", len(finals), len(seqs))
        except BaseException:
            for seq in seqs:      # free what the unfinished ones hold, even on Ctrl-C
                if seq.request_id not in finals:
                    engine.abort_request(seq.request_id)
            raise
        return [finals[seq.request_id] for seq in seqs]
