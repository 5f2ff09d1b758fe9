"""Driving the engine in tests: building it small, stepping it, checking it is idle."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class Drained:
    """What `drain` saw: final outputs, and the step at which each request first produced a token."""

    finals: dict = field(default_factory=dict)
    first_token_step: dict = field(default_factory=dict)
    num_steps: int = 0


def drain(engine, on_step: Optional[Callable[[object], None]] = None, max_steps: int = 5000) -> Drained:
    """Step `engine` until it has no unfinished request.

    Checks the streaming contract on the way: for each request the deltas of
    its outputs concatenate exactly to its final token ids and text, and only
    the last output is finished. `on_step(engine)` runs after every step.
    """
    seen = Drained()
    delta_ids: dict[str, list[int]] = {}
    delta_text: dict[str, str] = {}
    while engine.has_unfinished_requests():
        assert seen.num_steps < max_steps, "engine made no progress"
        for out in engine.step():
            rid = out.request_id
            assert rid not in seen.finals, f"output for {rid} after its final output"
            seen.first_token_step.setdefault(rid, seen.num_steps)
            delta_ids.setdefault(rid, []).extend(out.outputs[0].delta_token_ids)
            delta_text[rid] = delta_text.get(rid, "") + out.outputs[0].delta_text
            if out.finished:
                assert delta_ids[rid] == out.outputs[0].token_ids, rid
                assert delta_text[rid] == out.outputs[0].text, rid
                seen.finals[rid] = out
        seen.num_steps += 1
        if on_step is not None:
            on_step(engine)
    return seen
