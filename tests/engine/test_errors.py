"""Bad requests and bad adapters: each raises its own typed error, allocates
nothing, and leaves the engine serving the requests already in flight.
"""

import itertools

import pytest

from multilora import LoRARequest, SamplingParams
from multilora.errors import (
    AdapterCorruptError,
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    AdapterTargetError,
    AdapterWeightsError,
    InvalidRequestError,
    PromptTooLongError,
)

from helpers.engine_runs import StepTracker, assert_idle, greedy, make_llm
from helpers.tiny_models import MAX_POSITION_EMBEDDINGS
from helpers.zoo import BROKEN_ADAPTERS, SHORT_PROMPTS, long_prompt

N = 8
GOOD_PROMPT, GOOD_ADAPTER = SHORT_PROMPTS[0], "sql"
_ids = itertools.count()

BROKEN = {
    "rank_too_high": AdapterRankError,
    "missing": AdapterNotFoundError,
    "other_base": AdapterShapeError,
    "bin_only": AdapterFormatError,
    "target_lm_head": AdapterTargetError,
    "target_embed_tokens": AdapterTargetError,
    "truncated": AdapterCorruptError,
    "nan": AdapterWeightsError,
}
assert set(BROKEN) == set(BROKEN_ADAPTERS)

# name: (prompt, SamplingParams fields, error, a word the message must contain)
BAD_REQUESTS = {
    "empty_text": ("", {}, InvalidRequestError, "empty"),
    "empty_ids": ([], {}, InvalidRequestError, "empty"),
    "longer_than_context": (long_prompt(MAX_POSITION_EMBEDDINGS + 20), {}, PromptTooLongError, "max_model_len"),
    "max_tokens_zero": (GOOD_PROMPT, {"max_tokens": 0}, InvalidRequestError, "max_tokens"),
    "max_tokens_negative": (GOOD_PROMPT, {"max_tokens": -3}, InvalidRequestError, "max_tokens"),
    "top_p_zero": (GOOD_PROMPT, {"top_p": 0.0}, InvalidRequestError, "top_p"),
    "top_p_above_one": (GOOD_PROMPT, {"top_p": 1.5}, InvalidRequestError, "top_p"),
    "temperature_negative": (GOOD_PROMPT, {"temperature": -0.5}, InvalidRequestError, "temperature"),
}


@pytest.fixture(scope="module")
def llm(tiny_zoo):
    return make_llm(tiny_zoo, "llama", max_loras=2, max_lora_rank=16, max_cpu_loras=4)


def broken_lora(tiny_zoo, case: str) -> LoRARequest:
    return LoRARequest(f"broken-{case}", 900 + BROKEN_ADAPTERS.index(case), str(tiny_zoo.broken_adapter_dir(case)))


def params_with(fields: dict) -> SamplingParams:
    """Valid params then set to bad values, so the engine's own check is what refuses them."""
    params = greedy(N)
    for key, value in fields.items():
        setattr(params, key, value)
    return params


def assert_rejected_while_serving(tiny_zoo, engine, submit_bad, error_type):
    """`submit_bad()` raises exactly `error_type` while a good request runs, which then finishes correctly."""
    good = f"good-{next(_ids)}"
    engine.add_request(good, GOOD_PROMPT, greedy(N), tiny_zoo.lora_request("llama", GOOD_ADAPTER))
    try:
        tracker = StepTracker(engine)
        tracker.step()
        blocks_before = engine.stats().kv_blocks_used
        with pytest.raises(error_type) as info:
            submit_bad()
        assert type(info.value) is error_type, repr(info.value)
        assert engine.stats().kv_blocks_used == blocks_before  # nothing allocated for the bad one
        tracker.drain()
    finally:
        engine.abort_request(good)  # a no-op once it finished; keeps the shared engine clean on failure
    assert set(tracker.finals) == {good}
    assert tracker.finals[good].outputs[0].token_ids == tiny_zoo.reference("llama", GOOD_ADAPTER, GOOD_PROMPT, N)
    assert_idle(engine)
    return info.value


@pytest.mark.parametrize("case", BROKEN_ADAPTERS)
def test_broken_adapter_is_refused(tiny_zoo, llm, case):
    engine, lora = llm.llm_engine, broken_lora(tiny_zoo, case)
    err = assert_rejected_while_serving(
        tiny_zoo, engine, lambda: engine.add_request("bad", GOOD_PROMPT, greedy(N), lora), BROKEN[case])
    assert lora.lora_name in str(err), "the message names the adapter"
    if case == "rank_too_high":
        assert "32" in str(err) and "16" in str(err), str(err)
    # Asked again, it fails the same way (a bad adapter is not cached as good).
    with pytest.raises(BROKEN[case]):
        engine.add_request("bad-again", GOOD_PROMPT, greedy(N), lora)
    assert_idle(engine)


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_refused(tiny_zoo, llm, case):
    prompt, fields, error_type, word = BAD_REQUESTS[case]
    engine = llm.llm_engine
    err = assert_rejected_while_serving(
        tiny_zoo, engine, lambda: engine.add_request("bad", prompt, params_with(fields), None), error_type)
    assert word in str(err), str(err)
    assert err.code == "INVALID_ARG"


@pytest.mark.parametrize("case", [c for c in BAD_REQUESTS if BAD_REQUESTS[c][1]])
def test_bad_sampling_params_are_refused_on_construction(case):
    _, fields, error_type, word = BAD_REQUESTS[case]
    with pytest.raises(error_type, match=word):
        SamplingParams(**{"max_tokens": N, **fields})


@pytest.mark.parametrize("case", ["nan", "bad_prompt"])
def test_generate_with_one_bad_request_runs_nothing(tiny_zoo, llm, case):
    """LLM.generate validates the whole batch first: one bad request, nothing runs."""
    good = tiny_zoo.lora_request("llama", GOOD_ADAPTER)
    if case == "nan":
        prompts, loras, error_type = [GOOD_PROMPT, GOOD_PROMPT], [good, broken_lora(tiny_zoo, "nan")], AdapterWeightsError
    else:
        prompts, loras, error_type = [GOOD_PROMPT, ""], [good, None], InvalidRequestError
    with pytest.raises(error_type):
        llm.generate(prompts, greedy(N), lora_request=loras)
    assert_idle(llm.llm_engine)
    (out,) = llm.generate([GOOD_PROMPT], greedy(N), lora_request=good)
    assert out.outputs[0].token_ids == tiny_zoo.reference("llama", GOOD_ADAPTER, GOOD_PROMPT, N)
    assert_idle(llm.llm_engine)


def test_error_codes_map_to_triton_codes(tiny_zoo, llm):
    """What the Triton model will send back: NOT_FOUND for a missing adapter, INVALID_ARG for a broken one."""
    engine = llm.llm_engine
    for case, code in (("missing", "NOT_FOUND"), ("truncated", "INVALID_ARG")):
        with pytest.raises(BROKEN[case]) as info:
            engine.add_request("x", GOOD_PROMPT, greedy(N), broken_lora(tiny_zoo, case))
        assert info.value.code == code
    assert_idle(engine)
