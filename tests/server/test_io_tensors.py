"""io_tensors: the contract's input arrays to a ParsedRequest, and engine outputs to response arrays."""

import json

import numpy as np
import pytest

from multilora.config import RequestLimits
from multilora.errors import InvalidRequestError, LimitExceededError
from multilora.outputs import CompletionOutput, RequestOutput
from model_dir import import_model_module

io = import_model_module("io_tensors")


def arrays(**values) -> dict:
    out = {}
    for name, value in values.items():
        items = value if isinstance(value, list) else [value]
        if isinstance(items[0], str):
            out[name] = np.array([s.encode() for s in items], dtype=np.object_)
        else:
            out[name] = np.array(items)
    return out


def test_defaults_and_scalars():
    p = io.parse_request(arrays(text_input="Hi", lora_id="sql", max_tokens=np.int32(7), temperature=np.float32(0.5),
                                top_k=np.int32(3), seed=np.uint64(9), ignore_eos=True, stop=["\n", "END"]))
    assert p.prompt == "Hi" and p.adapter_name == "sql"
    assert p.sampling == {"max_tokens": 7, "temperature": 0.5, "top_k": 3, "seed": 9, "ignore_eos": True,
                          "stop": ["\n", "END"]}
    assert (p.stream, p.prepend_prompt, p.return_finish_reason) == (False, True, False)
    assert io.parse_request(arrays(text_input="Hi")).sampling == {"max_tokens": io.DEFAULT_MAX_TOKENS}


def test_empty_lora_id_is_the_base_model():
    assert io.parse_request(arrays(text_input="Hi", lora_id="")).adapter_name is None


def test_sampling_parameters_json_with_string_values_and_lora_name():
    params = json.dumps({"max_tokens": "32", "temperature": "0", "ignore_eos": "true", "stop": "###",
                         "lora_name": "chat", "top_p": None})
    p = io.parse_request(arrays(text_input="Hi", sampling_parameters=params))
    assert p.sampling == {"max_tokens": 32, "temperature": 0.0, "ignore_eos": True, "stop": ["###"]}
    assert p.adapter_name == "chat"


def test_tensor_inputs_override_the_json():
    p = io.parse_request(arrays(text_input="Hi", sampling_parameters='{"max_tokens": 32}', max_tokens=np.int32(4)))
    assert p.sampling["max_tokens"] == 4


def test_token_id_prompt():
    p = io.parse_request({"input_ids": np.array([5, 6, 7], dtype=np.int32)})
    assert p.prompt == [5, 6, 7]


def test_streaming_excludes_the_prompt_by_default():
    p = io.parse_request(arrays(text_input="Hi", stream=True))
    assert p.stream and not p.prepend_prompt
    assert not io.parse_request(arrays(text_input="Hi", exclude_input_in_output=True)).prepend_prompt


@pytest.mark.parametrize("values, fragment", [
    (arrays(max_tokens=np.int32(3)), "exactly one of text_input"),
    ({**arrays(text_input="Hi"), "input_ids": np.array([1], dtype=np.int32)}, "exactly one of text_input"),
    (arrays(text_input="Hi", lora_id="a", sampling_parameters='{"lora_name": "b"}'), "disagree"),
    (arrays(text_input="Hi", sampling_parameters="[1]"), "JSON object"),
    (arrays(text_input="Hi", sampling_parameters='{"n": 2}'), "unsupported sampling_parameters ['n']"),
    (arrays(text_input="Hi", sampling_parameters='{"max_tokens": "many"}'), "max_tokens must be int"),
    (arrays(text_input="Hi", sampling_parameters='{"max_tokens": 1.5}'), "max_tokens must be int"),
    (arrays(text_input="Hi", sampling_parameters='{"ignore_eos": "maybe"}'), "true or false"),
    (arrays(text_input="Hi", stream=True, exclude_input_in_output=False), "not allowed when streaming"),
    (arrays(text_input=["a", "b"]), "exactly one element"),
    ({"text_input": np.array([b"\xff\xfe"], dtype=np.object_)}, "not valid UTF-8"),
    ({"text_input": np.array(["a\ud800"])}, "not valid UTF-8"),
])
def test_malformed_input_is_an_invalid_request(values, fragment):
    with pytest.raises(InvalidRequestError) as info:
        io.parse_request(values)
    assert fragment in str(info.value)


def output(text, token_ids, delta_text, delta_ids, finish_reason=None):
    return RequestOutput("r", "Hi", [1, 2, 3], [CompletionOutput(0, text, token_ids, finish_reason,
                                                                 delta_text=delta_text, delta_token_ids=delta_ids)],
                         finish_reason is not None)


def test_stream_responses_carry_deltas_and_counts():
    parsed = io.parse_request(arrays(text_input="Hi", stream=True, return_finish_reason=True,
                                     return_num_input_tokens=True, return_num_output_tokens=True))
    mid = io.response_arrays(parsed, output("ab", [7, 8], "b", [8]), final=False)
    assert mid["text_output"].tolist() == [b"b"] and mid["output_ids"].tolist() == [8]
    assert mid["finish_reason"].tolist() == [b""]
    assert mid["num_input_tokens"].tolist() == [3] and mid["num_output_tokens"].tolist() == [1]
    assert mid["output_ids"].dtype == np.int32 and mid["num_input_tokens"].dtype == np.uint32
    last = io.response_arrays(parsed, output("abc", [7, 8, 9], "c", [9], "length"), final=True)
    assert last["finish_reason"].tolist() == [b"length"]


def test_whole_response_prepends_the_prompt_unless_excluded():
    plain = io.parse_request(arrays(text_input="Hi"))
    out = io.response_arrays(plain, output("abc", [7, 8, 9], "c", [9], "stop"), final=True)
    assert out["text_output"].tolist() == [b"Hiabc"] and out["output_ids"].tolist() == [7, 8, 9]
    assert set(out) == {"text_output", "output_ids"}
    excluded = io.parse_request(arrays(text_input="Hi", exclude_input_in_output=True))
    assert io.response_arrays(excluded, output("abc", [7], "c", [9], "stop"), final=True)["text_output"] \
        .tolist() == [b"abc"]


# ---- limits, widths and dtypes (docs/limits.md) ---------------------------------------

SMALL = RequestLimits(max_prompt_bytes=16, max_stop_strings=2, max_stop_string_bytes=4,
                      max_sampling_parameters_bytes=64, max_sampling_parameters_depth=2)


def refused(values, limits=io.DEFAULT_LIMITS, error=InvalidRequestError) -> str:
    with pytest.raises(error) as info:
        io.parse_request(values, limits)
    assert info.value.code == "INVALID_ARG"
    return str(info.value)


def test_a_10_mb_prompt_is_refused_on_its_size_before_decoding():
    # Not UTF-8 either: the size is what is reported, so nothing was decoded.
    message = refused({"text_input": np.array([b"\xff" * 10_000_000], dtype=np.object_)}, error=LimitExceededError)
    assert message == ("text_input is 10000000 bytes; this server takes at most 1048576 (max_prompt_bytes): "
                       "send a shorter prompt")


def test_prompt_limits_in_bytes_and_token_ids():
    assert io.parse_request(arrays(text_input="x" * 16), SMALL).prompt == "x" * 16
    assert "17 bytes" in refused(arrays(text_input="x" * 17), SMALL, LimitExceededError)
    assert "18 bytes" in refused(arrays(text_input="\u00e9" * 9), SMALL, LimitExceededError)   # 9 characters
    assert io.parse_request({"input_ids": np.arange(4, dtype=np.int32)}, SMALL).prompt == [0, 1, 2, 3]
    message = refused({"input_ids": np.arange(5, dtype=np.int32)}, SMALL, LimitExceededError)
    assert "input_ids has 5 token ids; this server takes at most 4 (max_prompt_bytes 16" in message


@pytest.mark.parametrize("values, fragment", [
    ({"input_ids": np.array([5, 2**40], dtype=np.int64)}, "1099511627776 does not fit INT32"),
    ({"input_ids": np.array([-2**31 - 1], dtype=np.int64)}, "does not fit INT32"),
    (arrays(text_input="Hi", max_tokens=np.int64(2**40)), "max_tokens must fit INT32 ([-2147483648, 2147483647]), "
                                                          "got 1099511627776"),
    (arrays(text_input="Hi", top_k=np.uint64(2**31)), "top_k must fit INT32"),
    (arrays(text_input="Hi", seed=np.int64(-1)), "seed must fit UINT64"),
    (arrays(text_input="Hi", max_tokens=np.float32(4)), "max_tokens must be INT32, got float32"),
    (arrays(text_input="Hi", max_tokens=True), "max_tokens must be INT32, got bool"),
    (arrays(text_input="Hi", temperature="hot"), "temperature must be FP32, got BYTES"),
    (arrays(text_input="Hi", temperature=np.complex64(1)), "temperature must be FP32, got complex64"),
    (arrays(text_input="Hi", stream="false"), "stream must be BOOL"),
    (arrays(text_input="Hi", ignore_eos=np.int32(2)), "ignore_eos must be BOOL, got int32"),
    (arrays(text_input="Hi", lora_id=np.int32(3)), "lora_id must be a string"),
])
def test_numbers_must_have_their_declared_type_and_fit_its_width(values, fragment):
    assert fragment in refused(values)


def test_declared_types_in_any_width_are_accepted():
    p = io.parse_request(arrays(text_input="Hi", max_tokens=np.int64(2**31 - 1), seed=np.uint64(2**64 - 1),
                                temperature=np.float64(0.5), top_p=np.int32(1), stream=np.int8(1)))
    assert p.sampling == {"max_tokens": 2**31 - 1, "seed": 2**64 - 1, "temperature": 0.5, "top_p": 1.0}
    assert p.stream is True


def test_stop_string_limits_before_decoding():
    assert io.parse_request(arrays(text_input="Hi", stop=["ab", "cd"]), SMALL).sampling["stop"] == ["ab", "cd"]
    assert "3 stop strings; this server takes at most 2" in refused(arrays(text_input="Hi", stop=["a", "b", "c"]),
                                                                    SMALL, LimitExceededError)
    many = {**arrays(text_input="Hi"), "stop": np.array([b"\xff"] * 100_000, dtype=np.object_)}
    assert "100000 stop strings" in refused(many, error=LimitExceededError)
    assert "5 bytes" in refused(arrays(text_input="Hi", stop=["abcde"]), SMALL, LimitExceededError)
    json_stop = arrays(text_input="Hi", sampling_parameters=json.dumps({"stop": ["a", "b", "c"]}))
    assert "3 stop strings" in refused(json_stop, SMALL, LimitExceededError)


@pytest.mark.parametrize("text, error, fragment", [
    ("[" * 100_000, LimitExceededError, "sampling_parameters is 100000 bytes; this server takes at most 65536"),
    ('{"a":' * 5000 + "1" + "}" * 5000, LimitExceededError, "nests 5000 levels deep; at most 4"),
    ('{"stop": [["x"]]}', LimitExceededError, "nests 3 levels deep"),
    ('{"max_tokens": ' + "9" * 5000 + "}", InvalidRequestError, "a 5000-digit number"),
    ('{"temperature": NaN}', InvalidRequestError, "holds NaN, which is not JSON"),
    ('{"temperature": -Infinity}', InvalidRequestError, "holds -Infinity"),
    ('{"max_tokens": 1e400}', InvalidRequestError, "max_tokens must be int, got inf"),
    ('{"max_tokens": "' + "9" * 5000 + '"}', InvalidRequestError, "(5002 characters)"),
    ('{"stop": "[[[[[[\\"]]]]"}', None, None),                       # brackets in strings do not nest
])
def test_sampling_parameters_size_depth_and_numbers(text, error, fragment):
    limits = RequestLimits(max_sampling_parameters_depth=4 if "5000 levels" in (fragment or "") else 2)
    values = arrays(text_input="Hi", sampling_parameters=text)
    if error is None:
        assert io.parse_request(values, limits).sampling["stop"] == ['[[[[[["]]]]']
    else:
        assert fragment in refused(values, limits, error)
