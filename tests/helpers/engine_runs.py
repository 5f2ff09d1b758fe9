"""Driving the engine in tests: building it small, stepping it, checking it is idle."""

from __future__ import annotations

import threading
from typing import Callable, Optional

from multilora import LLM, SamplingParams

from .zoo import TinyZoo

# Small everything: a few KV blocks of 4 tokens, float32 to match the HF reference.
ENGINE_DEFAULTS = dict(
    enable_lora=True,
    dtype="float32",
    max_loras=4,
    max_lora_rank=16,
    max_cpu_loras=8,
    block_size=4,
    num_kv_blocks=256,
    max_num_seqs=32,
    max_num_batched_tokens=512,
    seed=0,
)


def make_llm(zoo: TinyZoo, kind: str, **overrides) -> LLM:
    return LLM(model=str(zoo.model_dir(kind)), **{**ENGINE_DEFAULTS, **overrides})


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    """Greedy decoding of exactly `max_tokens` tokens (eos ignored, like the reference)."""
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


def assert_idle(engine) -> None:
    """Nothing in flight, and every KV block and adapter hold returned."""
    stats = engine.stats()
    assert not engine.has_unfinished_requests()
    assert (stats.num_running, stats.num_waiting) == (0, 0), stats
    assert stats.kv_blocks_used == 0, stats
    assert stats.adapter_holds == 0, stats


def check_staggered_generate(llm: LLM, zoo: TinyZoo, requests: list[tuple[str, Optional[str]]], n: int) -> None:
    """Generates (prompt, adapter name or None) greedily with max_tokens n, n-1, n-2, ... in turn, so
    requests end at different steps, and checks each against HF + PEFT; the engine ends idle."""
    loras = [zoo.lora_request("llama", a) if a else None for _, a in requests]
    params = [greedy(n - i % 3) for i in range(len(requests))]
    outs = llm.generate([p for p, _ in requests], params, lora_request=loras)
    for (prompt, adapter), p, out in zip(requests, params, outs):
        assert out.outputs[0].token_ids == zoo.reference("llama", adapter, prompt, n)[:p.max_tokens], (prompt, adapter)
    assert_idle(llm.llm_engine)


class StepTracker:
    """Steps an engine and keeps what its outputs said, per request.

    Checks the streaming contract on the way: for each request the deltas of
    its outputs concatenate exactly to its final token ids and text, and
    nothing comes after its finished output. `on_step(engine)` runs after
    every step.
    """

    def __init__(self, engine, on_step: Optional[Callable[[object], None]] = None):
        self.engine, self.on_step = engine, on_step
        self.finals: dict = {}
        self.first_token_step: dict[str, int] = {}
        self.num_steps = 0
        self._delta_ids: dict[str, list[int]] = {}
        self._delta_text: dict[str, str] = {}

    def step(self) -> None:
        for out in self.engine.step():
            self._record(out)
        self.num_steps += 1
        if self.on_step is not None:
            self.on_step(self.engine)

    def drain(self, max_steps: int = 5000) -> "StepTracker":
        """Step until the engine has no unfinished request."""
        while self.engine.has_unfinished_requests():
            assert self.num_steps < max_steps, "engine made no progress"
            self.step()
        return self

    def _record(self, out) -> None:
        rid, completion = out.request_id, out.outputs[0]
        assert rid not in self.finals, f"output for {rid} after its final output"
        self.first_token_step.setdefault(rid, self.num_steps)
        self._delta_ids.setdefault(rid, []).extend(completion.delta_token_ids)
        self._delta_text[rid] = self._delta_text.get(rid, "") + completion.delta_text
        if out.finished:
            assert self._delta_ids[rid] == completion.token_ids, rid
            assert self._delta_text[rid] == completion.text, rid
            self.finals[rid] = out


def drain(engine, on_step: Optional[Callable[[object], None]] = None) -> StepTracker:
    """Step `engine` until it has no unfinished request; see StepTracker."""
    return StepTracker(engine, on_step).drain()


class OutputCollector:
    """An AsyncLLMEngine `on_output` callback that gathers one request's outputs and checks there is one final."""

    def __init__(self):
        self.outputs = []
        self.done = threading.Event()

    def __call__(self, out):
        assert not self.done.is_set(), "output after the final one"
        self.outputs.append(out)
        if out.finished:
            self.done.set()

    def final(self):
        assert self.done.wait(60), "no final output within 60 s"
        return self.outputs[-1]

    @property
    def text_from_deltas(self) -> str:
        return "".join(o.outputs[0].delta_text for o in self.outputs)


def async_engine_config(zoo: TinyZoo, kind: str = "llama", **overrides):
    """An EngineConfig for AsyncLLMEngine tests on a tiny zoo model."""
    from multilora import EngineConfig

    values = dict(enable_lora=True, max_loras=2, max_lora_rank=16, dtype="float32", block_size=4, num_kv_blocks=64)
    return EngineConfig(model=str(zoo.model_dir(kind)), **{**values, **overrides})
