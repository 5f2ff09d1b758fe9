"""The model's tensors (CONTRACT.md §2) to Python values and back.

`parse_request` turns a request's input arrays into a `ParsedRequest`;
`response_arrays` turns an engine output into the output arrays of one
response. Pure numpy: Triton server types stay in model.py, so this file is
testable without a server. Malformed input raises InvalidRequestError with a
message that says what to send instead.
"""

import json
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import numpy as np

from multilora.errors import InvalidRequestError

DEFAULT_MAX_TOKENS = 16

# Sampling settings: the contract's scalar inputs and the keys accepted in the
# vllm_backend-style `sampling_parameters` JSON, with their Python types.
SAMPLING_TYPES = {
    "max_tokens": int, "temperature": float, "top_p": float, "top_k": int,
    "seed": int, "min_tokens": int, "ignore_eos": bool, "stop": list,
}
_FLAGS = ("return_finish_reason", "return_num_input_tokens", "return_num_output_tokens")


@dataclass(frozen=True)
class ParsedRequest:
    prompt: Union[str, list[int]]
    sampling: dict                 # keyword arguments of multilora.SamplingParams
    adapter_name: Optional[str]    # None = base model
    stream: bool
    prepend_prompt: bool           # non-streaming only: text_output starts with the prompt
    return_finish_reason: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False


def parse_request(inputs: Mapping[str, np.ndarray]) -> ParsedRequest:
    """Validate and convert one request's inputs (name -> array)."""
    stream = _scalar(inputs, "stream", bool, False)
    exclude = _scalar(inputs, "exclude_input_in_output", bool, None)
    if stream and exclude is False:
        raise InvalidRequestError("exclude_input_in_output=false is not allowed when streaming: "
                                  "the stream carries the new text only")
    json_sampling, json_adapter = _sampling_json(inputs)
    sampling = {"max_tokens": DEFAULT_MAX_TOKENS, **json_sampling}
    for key, kind in SAMPLING_TYPES.items():
        if key in inputs:
            sampling[key] = _strings(inputs, key) if kind is list else _scalar(inputs, key, kind)
    return ParsedRequest(
        prompt=_prompt(inputs), sampling=sampling, adapter_name=_adapter_name(inputs, json_adapter),
        stream=stream, prepend_prompt=not stream and not exclude,
        **{flag: _scalar(inputs, flag, bool, False) for flag in _FLAGS})


def response_arrays(parsed: ParsedRequest, output, final: bool) -> dict[str, np.ndarray]:
    """The output arrays for one response carrying `output` (a multilora RequestOutput).

    Streaming responses carry the new text and token ids only; a non-streaming
    response carries everything, after the prompt unless it was excluded.
    """
    completion = output.outputs[0]
    if parsed.stream:
        text, token_ids = completion.delta_text, completion.delta_token_ids
    else:
        prefix = parsed.prompt if parsed.prepend_prompt and isinstance(parsed.prompt, str) else ""
        text, token_ids = prefix + completion.text, completion.token_ids
    arrays = {
        "text_output": np.array([text.encode("utf-8")], dtype=np.object_),
        "output_ids": np.array(token_ids, dtype=np.int32),
    }
    if parsed.return_finish_reason:
        reason = completion.finish_reason if final and completion.finish_reason else ""
        arrays["finish_reason"] = np.array([reason.encode("utf-8")], dtype=np.object_)
    if parsed.return_num_input_tokens:
        arrays["num_input_tokens"] = np.array([len(output.prompt_token_ids)], dtype=np.uint32)
    if parsed.return_num_output_tokens:
        arrays["num_output_tokens"] = np.array([len(token_ids)], dtype=np.uint32)
    return arrays


# ---- inputs -------------------------------------------------------------------

def _prompt(inputs) -> Union[str, list[int]]:
    has_text, has_ids = "text_input" in inputs, "input_ids" in inputs
    if has_text == has_ids:
        raise InvalidRequestError("send the prompt as exactly one of text_input (a string) "
                                  "or input_ids (INT32 token ids)")
    if has_text:
        return _scalar(inputs, "text_input", str)
    ids = np.asarray(inputs["input_ids"])
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise InvalidRequestError(f"input_ids must be a 1-D INT32 tensor, got shape {list(ids.shape)} "
                                  f"of {ids.dtype}")
    return [int(i) for i in ids]


def _adapter_name(inputs, json_adapter: Optional[str]) -> Optional[str]:
    name = _scalar(inputs, "lora_id", str, None) or None
    if name and json_adapter and name != json_adapter:
        raise InvalidRequestError(f"lora_id {name!r} and sampling_parameters.lora_name {json_adapter!r} "
                                  "disagree; send one of them")
    return name or json_adapter


def _sampling_json(inputs) -> tuple[dict, Optional[str]]:
    """The vllm_backend-style JSON: values may be strings ("16", "true"); returns (sampling, lora_name)."""
    text = _scalar(inputs, "sampling_parameters", str, None)
    if not text:
        return {}, None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"sampling_parameters is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise InvalidRequestError("sampling_parameters must be a JSON object, e.g. {\"max_tokens\": 32}")
    raw = {k: v for k, v in raw.items() if v is not None}
    adapter = raw.pop("lora_name", None)
    if adapter is not None and not isinstance(adapter, str):
        raise InvalidRequestError("sampling_parameters.lora_name must be a string")
    unknown = sorted(set(raw) - set(SAMPLING_TYPES))
    if unknown:
        raise InvalidRequestError(f"unsupported sampling_parameters {unknown}; supported: "
                                  f"{sorted(SAMPLING_TYPES) + ['lora_name']}")
    return {key: _convert(key, value, SAMPLING_TYPES[key]) for key, value in raw.items()}, adapter


def _convert(key: str, value, kind):
    """A JSON value (or its string form) as `kind`."""
    try:
        if kind is list:
            value = [value] if isinstance(value, str) else value
            if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
                raise ValueError
            return value
        if kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if not isinstance(value, bool):
                raise ValueError
            return value
        if isinstance(value, bool) or (kind is int and isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        expected = {list: "a string or a list of strings", bool: "true or false"}.get(kind, kind.__name__)
        raise InvalidRequestError(f"sampling_parameters.{key} must be {expected}, got {value!r}") from None


_NO_DEFAULT = object()


def _scalar(inputs, name: str, kind, default=_NO_DEFAULT):
    """The single element of input `name`, as `kind`."""
    if name not in inputs:
        if default is _NO_DEFAULT:
            raise InvalidRequestError(f"input {name} is required")
        return default
    array = np.asarray(inputs[name])
    if array.size != 1:
        raise InvalidRequestError(f"input {name} must hold exactly one element, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    if kind is str:
        return _decode(name, value)
    if kind is bool:
        return bool(value)
    return kind(value.item() if hasattr(value, "item") else value)


def _strings(inputs, name: str) -> list[str]:
    return [_decode(name, v) for v in np.asarray(inputs[name]).reshape(-1)]


def _decode(name: str, value) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(f"input {name} is not valid UTF-8") from None
    if isinstance(value, str):
        return value
    raise InvalidRequestError(f"input {name} must be a string (BYTES), got {type(value).__name__}")
