"""Fuzz (hypothesis) of the request parser: whatever the tensors or the sampling_parameters JSON, a request
is either parsed into valid SamplingParams or refused with one of our typed errors, never INTERNAL.

This is the path model.py runs for every request (parse_request, then SamplingParams), on the arrays
Triton's Python backend hands it: any dtype, shape and size, strings as bytes objects.
"""

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from model_dir import import_model_module
from multilora import SamplingParams
from multilora.config import RequestLimits
from multilora.errors import MultiLoRAError

io = import_model_module("io_tensors")

# Few, small examples (seconds in all); no example database written into the checkout. The deadline
# only turns a hang into a failure: every example takes milliseconds.
FUZZ = settings(max_examples=150, deadline=10_000, database=None, suppress_health_check=[HealthCheck.too_slow])
LIMITS = RequestLimits(max_prompt_bytes=256, max_stop_strings=4, max_stop_string_bytes=16,
                       max_sampling_parameters_bytes=2048, max_sampling_parameters_depth=3)
INPUT_NAMES = ["text_input", "input_ids", "lora_id", "stream", "max_tokens", "temperature", "top_p", "top_k",
               "seed", "min_tokens", "ignore_eos", "stop", "sampling_parameters", "exclude_input_in_output",
               "return_finish_reason", "return_num_input_tokens", "return_num_output_tokens"]
NUMERIC_DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                  np.float16, np.float32, np.float64, np.complex64]


def parse(inputs):
    """What model.py does with a request's arrays: parsed and valid, or a typed error that is not INTERNAL."""
    try:
        parsed = io.parse_request(inputs, LIMITS)
        params = SamplingParams(**parsed.sampling)
    except MultiLoRAError as error:
        assert error.code != "INTERNAL", error
        return None
    params.validate()
    LIMITS.check_stop(params.stop)
    return parsed


def numeric_arrays():
    """Any numeric dtype, 0-3 dimensions of 0-3 elements, values over the dtype's whole range (NaN, inf too)."""
    return st.sampled_from(NUMERIC_DTYPES).flatmap(
        lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=3)))


def string_arrays():
    element = st.one_of(st.binary(max_size=300), st.text(max_size=40).map(str.encode),
                        st.sampled_from([b"", b"\xff\xfe", b"true", b"false", b"1", b"nan", b"{}", b"\x00"]))
    return st.lists(element, max_size=6).map(lambda items: np.array(items, dtype=np.object_))


def arrays_for_any_input():
    return st.one_of(numeric_arrays(), string_arrays(),
                     st.lists(st.text(st.characters(exclude_categories=()), max_size=8), min_size=1, max_size=3)
                     .map(np.array))  # numpy str (kind U), lone surrogates included


PROMPTS = st.text(min_size=1, max_size=300).map(lambda t: np.array([t.encode()], dtype=np.object_))
# Inputs of their declared type and shape, with values anywhere in that type's range.
_SCALAR = hnp.array_shapes(min_dims=1, max_dims=1, min_side=1, max_side=1)
WELL_TYPED = {
    **{name: hnp.arrays(np.int32, _SCALAR) for name in ("max_tokens", "top_k", "min_tokens")},
    **{name: hnp.arrays(np.float32, _SCALAR) for name in ("temperature", "top_p")},
    "seed": hnp.arrays(np.uint64, _SCALAR),
    **{name: hnp.arrays(np.bool_, _SCALAR) for name in ("stream", "ignore_eos", "exclude_input_in_output",
                                                        "return_finish_reason", "return_num_input_tokens",
                                                        "return_num_output_tokens")},
    "stop": st.lists(st.text(min_size=1, max_size=20), max_size=6).map(
        lambda items: np.array([s.encode() for s in items], dtype=np.object_)),
}


@FUZZ
@given(st.dictionaries(st.sampled_from(INPUT_NAMES + ["unknown_input"]), arrays_for_any_input(), max_size=8))
def test_random_tensors_are_parsed_or_refused_with_a_typed_error(inputs):
    parse(inputs)


@FUZZ
@given(st.fixed_dictionaries({"text_input": st.one_of(PROMPTS, string_arrays())},
                             optional={name: st.one_of(arrays_for_any_input(), WELL_TYPED.get(name, st.nothing()))
                                       for name in INPUT_NAMES[2:]}))
def test_random_tensors_beside_a_prompt(inputs):
    parse(inputs)


# ---- sampling_parameters JSON -------------------------------------------------------------

SAMPLING_KEYS = ["max_tokens", "temperature", "top_p", "top_k", "seed", "min_tokens", "ignore_eos", "stop",
                 "lora_name", "n", "unknown"]
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**80, 2**80), st.floats(), st.text(max_size=12),
                         st.sampled_from(["NaN", "inf", "-Infinity", "1e-300", "1e400", "9" * 30, " 16 ", "true"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4)), max_leaves=12)


def as_json(obj) -> str:
    return json.dumps(obj, allow_nan=True)    # NaN and Infinity as Python writes them: not JSON, refused


RAW_TEXTS = st.one_of(
    st.text(max_size=60),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
    st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(1, 6000).map(lambda n: '{"max_tokens": ' + "7" * n + "}"),
    st.integers(1, 6000).map(lambda n: '{"temperature": 0.' + "3" * n + "}"),
    st.sampled_from(['{"temperature": NaN}', '{"top_p": Infinity}', '{"seed": -Infinity}', "{", "[1]", "null",
                     '{"stop": "\\ud800"}', '"just a string"', '{"max_tokens": 1e999}', '{"stop": [' + '"a",' * 9
                     + '"a"]}']),
)


@FUZZ
@given(st.one_of(st.dictionaries(st.sampled_from(SAMPLING_KEYS), JSON_VALUES, max_size=5).map(as_json),
                 JSON_VALUES.map(as_json), RAW_TEXTS))
def test_random_sampling_parameters_are_parsed_or_refused_with_a_typed_error(text):
    parse({"text_input": np.array([b"Hi"], dtype=np.object_),
           "sampling_parameters": np.array([text.encode("utf-8", "surrogatepass")], dtype=np.object_)})
