"""io_tensors: the contract's input arrays to a ParsedRequest, and engine outputs to response arrays."""

import json

import numpy as np
import pytest

from multilora.errors import InvalidRequestError
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
