"""SamplingParams: defaults, normalisation, validation messages, vllm_backend JSON."""

import json
import math

import numpy as np
import pytest

from multilora.errors import InvalidRequestError
from multilora.sampling_params import SamplingParams


def test_vllm_defaults():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k) == (16, 1.0, 1.0, 0)
    assert (p.seed, p.stop, p.ignore_eos, p.min_tokens) == (None, [], False, 0)
    assert not p.greedy


def test_greedy():
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=0.7, top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy


def test_stop_normalised_to_a_fresh_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []
    mine = ["x"]
    p = SamplingParams(stop=mine)
    mine.append("y")
    assert p.stop == ["x"]


def test_numpy_scalars_become_python_values():
    p = SamplingParams(
        max_tokens=np.int32(8), temperature=np.float32(0.5), top_p=np.float32(0.75),
        top_k=np.int64(5), seed=np.uint64(2**64 - 1), min_tokens=np.int32(2), ignore_eos=np.bool_(True),
    )
    assert p.ignore_eos is True
    assert (p.max_tokens, p.top_k, p.seed, p.min_tokens) == (8, 5, 2**64 - 1, 2)
    assert type(p.max_tokens) is int and type(p.seed) is int and type(p.temperature) is float
    assert p.temperature == 0.5 and p.top_p == 0.75


@pytest.mark.parametrize("top_k", [-1, 0, 1, 50])
def test_top_k_accepted(top_k):
    assert SamplingParams(top_k=top_k).top_k == top_k


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"max_tokens": 0}, ["max_tokens", "[1, 2**31)", "0"]),
        ({"max_tokens": 2**31}, ["max_tokens", "[1, 2**31)", str(2**31)]),
        ({"max_tokens": 2**40}, ["max_tokens", str(2**40)]),
        ({"max_tokens": -3}, ["max_tokens", "-3"]),
        ({"max_tokens": 2.5}, ["max_tokens", "integer", "2.5"]),
        ({"max_tokens": True}, ["max_tokens", "True"]),
        ({"max_tokens": "16"}, ["max_tokens", "'16'"]),
        ({"temperature": -0.1}, ["temperature", ">= 0", "-0.1"]),
        ({"temperature": 10**400}, ["temperature", "finite", "characters)"]),
        ({"temperature": math.nan}, ["temperature", "nan"]),
        ({"temperature": math.inf}, ["temperature", "finite", "inf"]),
        ({"temperature": False}, ["temperature", "False"]),
        ({"top_p": 0.0}, ["top_p", "(0, 1]", "0.0"]),
        ({"top_p": 1.5}, ["top_p", "(0, 1]", "1.5"]),
        ({"top_p": math.nan}, ["top_p", "nan"]),
        ({"top_k": -2}, ["top_k", "-1", "-2"]),
        ({"top_k": 2**31}, ["top_k", "2**31", str(2**31)]),
        ({"top_k": 1.0}, ["top_k", "1.0"]),
        ({"top_k": True}, ["top_k", "True"]),
        ({"seed": -1}, ["seed", "2**64", "-1"]),
        ({"seed": 2**64}, ["seed", "2**64", str(2**64)]),
        ({"seed": 1.5}, ["seed", "1.5"]),
        ({"seed": True}, ["seed", "True"]),
        ({"min_tokens": -1}, ["min_tokens", "[0, max_tokens=16]", "-1"]),
        ({"min_tokens": 17}, ["min_tokens", "max_tokens=16", "17"]),
        ({"max_tokens": 4, "min_tokens": 5}, ["min_tokens", "max_tokens=4", "5"]),
        ({"min_tokens": True}, ["min_tokens", "True"]),
        ({"ignore_eos": "yes"}, ["ignore_eos", "'yes'"]),
        ({"ignore_eos": 1}, ["ignore_eos", "1"]),
        ({"stop": [""]}, ["stop", "non-empty", "''"]),
        ({"stop": ""}, ["stop", "non-empty"]),
        ({"stop": ["ok", 3]}, ["stop", "3"]),
        ({"stop": 5}, ["stop", "int"]),
    ],
)
def test_bad_values_are_refused_with_the_value_and_range(kwargs, words):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    for word in words:
        assert word in str(info.value)
    assert info.value.code == "INVALID_ARG"
    assert isinstance(info.value, ValueError)


def test_validate_catches_values_set_after_construction():
    p = SamplingParams()
    p.top_p = 2.0
    with pytest.raises(InvalidRequestError, match="top_p"):
        p.validate()


def test_boundaries_accepted():
    p = SamplingParams(max_tokens=1, min_tokens=1, temperature=0.0, top_p=1.0, seed=0)
    assert p.greedy and p.min_tokens == 1
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1
    assert SamplingParams(top_p=1e-6).top_p == 1e-6
    assert SamplingParams(max_tokens=2**31 - 1, top_k=2**31 - 1).max_tokens == 2**31 - 1



def test_values_past_float32_are_stored_as_its_limits():
    # 1e300 became inf in the sampler (NaN beside a banned token); 1e-300 became 0 (an empty nucleus).
    assert SamplingParams(temperature=1e300).temperature == float(np.finfo(np.float32).max)
    assert SamplingParams(top_p=1e-300).top_p == float(np.finfo(np.float32).tiny)
    assert SamplingParams(temperature=3e38, top_p=1e-30) == SamplingParams(temperature=3e38, top_p=1e-30)
    assert SamplingParams(temperature=3e38).temperature == 3e38 and SamplingParams(top_p=1e-30).top_p == 1e-30


def test_a_temperature_that_underflows_float32_is_greedy():
    # 1e-300 used to reach the sampler, round to 0 in float32 and fail every request in the step.
    assert SamplingParams(temperature=1e-300).greedy
    assert SamplingParams(temperature=1e-39).greedy
    assert not SamplingParams(temperature=1e-30).greedy
    assert SamplingParams.from_vllm_dict({"temperature": "1e-300"}).greedy


def test_refused_messages_stay_short():
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(max_tokens=int("9" * 4000))
    assert len(str(info.value)) < 200


# --- vllm_backend sampling_parameters ------------------------------------------


def test_from_vllm_dict_with_string_values():
    d = json.loads(
        '{"max_tokens": "32", "temperature": "0.7", "top_p": "0.9", "top_k": "40", "seed": "18446744073709551615",'
        ' "min_tokens": "2", "ignore_eos": "true", "stop": ["\\n\\n", "###"]}'
    )
    p = SamplingParams.from_vllm_dict(d)
    assert p == SamplingParams(
        max_tokens=32, temperature=0.7, top_p=0.9, top_k=40, seed=2**64 - 1,
        min_tokens=2, ignore_eos=True, stop=["\n\n", "###"],
    )


def test_from_vllm_dict_with_native_values():
    p = SamplingParams.from_vllm_dict({"max_tokens": 8.0, "temperature": 0, "ignore_eos": False, "stop": "END"})
    assert (p.max_tokens, p.temperature, p.ignore_eos, p.stop) == (8, 0.0, False, ["END"])
    assert type(p.max_tokens) is int


@pytest.mark.parametrize("text, value", [("true", True), ("False", False), (" 1 ", True), ("0", False), (1, True)])
def test_from_vllm_dict_bools(text, value):
    # vllm_backend's bool("false") is True; here "false" means false.
    assert SamplingParams.from_vllm_dict({"ignore_eos": text}).ignore_eos is value


def test_from_vllm_dict_empty_is_defaults():
    assert SamplingParams.from_vllm_dict({}) == SamplingParams()


def test_from_vllm_dict_null_seed_and_stop():
    p = SamplingParams.from_vllm_dict({"seed": None, "stop": None})
    assert p.seed is None and p.stop == []


@pytest.mark.parametrize(
    "d, words",
    [
        ({"max_tokens": "many"}, ["max_tokens", "integer", "'many'"]),
        ({"max_tokens": "1.5"}, ["max_tokens", "'1.5'"]),
        ({"max_tokens": "0"}, ["max_tokens", "[1, 2**31)"]),
        ({"max_tokens": str(2**40)}, ["max_tokens", str(2**40)]),
        ({"max_tokens": "9" * 5000}, ["max_tokens", "integer", "(5002 characters)"]),
        ({"temperature": "hot"}, ["temperature", "number", "'hot'"]),
        ({"temperature": "-1"}, ["temperature", ">= 0"]),
        ({"temperature": "1e999"}, ["temperature", "finite", "inf"]),
        ({"top_p": "nan"}, ["top_p"]),
        ({"ignore_eos": "maybe"}, ["ignore_eos", "'maybe'"]),
        ({"ignore_eos": 2}, ["ignore_eos", "2"]),
        ({"top_k": [1]}, ["top_k", "[1]"]),
        ({"beam_width": 4}, ["unknown", "'beam_width'", "max_tokens"]),
        ({"lora_name": "sql"}, ["unknown", "'lora_name'"]),
        ({"n": 2}, ["'n'", "not supported", "1"]),
        ({"presence_penalty": "0.5"}, ["'presence_penalty'", "not supported"]),
        ({"use_beam_search": "true"}, ["'use_beam_search'", "not supported"]),
        ({"skip_special_tokens": False}, ["'skip_special_tokens'", "not supported"]),
    ],
)
def test_from_vllm_dict_refusals(d, words):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams.from_vllm_dict(d)
    for word in words:
        assert word in str(info.value)


def test_from_vllm_dict_accepts_unimplemented_parameters_at_their_no_op_value():
    d = {"n": "1", "best_of": 1, "presence_penalty": "0", "frequency_penalty": 0.0,
         "repetition_penalty": "1.0", "length_penalty": 1, "use_beam_search": "false",
         "skip_special_tokens": True, "max_tokens": 4}
    assert SamplingParams.from_vllm_dict(d) == SamplingParams(max_tokens=4)


def test_from_vllm_dict_needs_an_object():
    with pytest.raises(InvalidRequestError, match="JSON object"):
        SamplingParams.from_vllm_dict(["max_tokens", 4])
