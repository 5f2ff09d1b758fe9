"""The model's tensors (CONTRACT.md §2) to Python values and back.

`parse_request` turns a request's input arrays into a `ParsedRequest`;
`response_arrays` turns an engine output into the output arrays of one
response. Pure numpy: Triton server types stay in model.py, so this file is
testable without a server. Malformed input raises InvalidRequestError with a
message that says what to send instead; input over a limit (RequestLimits)
raises LimitExceededError, checked on sizes before anything is decoded.

Integers are range-checked against their declared Triton type, never wrapped.
Over HTTP JSON, tritonserver itself casts each number to the input's type
before this code sees it (an INT32 max_tokens of 2**40 arrives as 0), so only
the binary and gRPC paths and `sampling_parameters` values can be checked
here; docs/limits.md says more.
"""

import json
import re
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import numpy as np

from multilora.config import RequestLimits
from multilora.errors import InvalidRequestError

DEFAULT_MAX_TOKENS = 16
DEFAULT_LIMITS = RequestLimits()
_INT32 = (-2**31, 2**31 - 1)
_UINT64 = (0, 2**64 - 1)
# The declared integer type (config.pbtxt) of each integer input: its range, and its name for messages.
_INTEGER_TYPES = {"max_tokens": (_INT32, "INT32"), "top_k": (_INT32, "INT32"), "min_tokens": (_INT32, "INT32"),
                  "seed": (_UINT64, "UINT64")}
# A JSON integer longer than this cannot be any sampling setting (2**64 has 20 digits); refusing it early
# keeps Python from converting 5000-digit numbers (and from its 4300-digit ValueError).
_MAX_JSON_INT_DIGITS = 24

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


def parse_request(inputs: Mapping[str, np.ndarray], limits: RequestLimits = DEFAULT_LIMITS) -> ParsedRequest:
    """Validate and convert one request's inputs (name -> array)."""
    stream = _scalar(inputs, "stream", bool, False)
    exclude = _scalar(inputs, "exclude_input_in_output", bool, None)
    if stream and exclude is False:
        raise InvalidRequestError("exclude_input_in_output=false is not allowed when streaming: "
                                  "the stream carries the new text only")
    prompt = _prompt(inputs, limits)
    json_sampling, json_adapter = _sampling_json(inputs, limits)
    sampling = {"max_tokens": DEFAULT_MAX_TOKENS, **json_sampling}
    for key, kind in SAMPLING_TYPES.items():
        if key in inputs:
            sampling[key] = _stop_strings(inputs, key, limits) if kind is list else _scalar(inputs, key, kind)
    if "stop" in sampling:
        limits.check_stop(sampling["stop"])
    return ParsedRequest(
        prompt=prompt, sampling=sampling, adapter_name=_adapter_name(inputs, json_adapter),
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

def _prompt(inputs, limits: RequestLimits) -> Union[str, list[int]]:
    has_text, has_ids = "text_input" in inputs, "input_ids" in inputs
    if has_text == has_ids:
        raise InvalidRequestError("send the prompt as exactly one of text_input (a string) "
                                  "or input_ids (INT32 token ids)")
    if has_text:
        value = _element(inputs, "text_input")
        limits.check_prompt_bytes("text_input", _size(value))
        return _decode("text_input", value)
    ids = np.asarray(inputs["input_ids"])
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise InvalidRequestError(f"input_ids must be a 1-D INT32 tensor, got shape {list(ids.shape)} "
                                  f"of {ids.dtype}")
    limits.check_prompt_token_ids("input_ids", ids.size)
    if ids.size and (int(ids.min()) < _INT32[0] or int(ids.max()) > _INT32[1]):
        bad = int(ids.max()) if int(ids.max()) > _INT32[1] else int(ids.min())
        raise InvalidRequestError(f"input_ids must be INT32 token ids; {bad} does not fit INT32")
    return ids.tolist()


def _adapter_name(inputs, json_adapter: Optional[str]) -> Optional[str]:
    name = _scalar(inputs, "lora_id", str, None) or None
    if name and json_adapter and name != json_adapter:
        raise InvalidRequestError(f"lora_id {name!r} and sampling_parameters.lora_name {json_adapter!r} "
                                  "disagree; send one of them")
    return name or json_adapter


def _sampling_json(inputs, limits: RequestLimits) -> tuple[dict, Optional[str]]:
    """The vllm_backend-style JSON: values may be strings ("16", "true"); returns (sampling, lora_name)."""
    if "sampling_parameters" not in inputs:
        return {}, None
    value = _element(inputs, "sampling_parameters")
    limits.check_sampling_parameters_bytes(_size(value))
    text = _decode("sampling_parameters", value)
    if not text:
        return {}, None
    limits.check_sampling_parameters_depth(_json_depth(text))
    try:
        raw = json.loads(text, parse_int=_json_int, parse_constant=_json_constant)
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
    except (TypeError, ValueError, OverflowError):
        expected = {list: "a string or a list of strings", bool: "true or false"}.get(kind, kind.__name__)
        raise InvalidRequestError(f"sampling_parameters.{key} must be {expected}, got {_shown(value)}") from None


# What nesting depends on: quotes (strings carry no nesting), escape pairs (an escaped quote ends
# no string) and brackets.
_JSON_NESTING_TOKEN = re.compile(r'\\.|["\[\]{}]', re.DOTALL)


def _json_depth(text: str) -> int:
    """How deep the JSON text nests, counted before parsing so deep nesting never reaches json's recursion.

    One linear pass over quotes, escapes and brackets only (the text is already size-limited).
    """
    depth = deepest = 0
    in_string = False
    for token in _JSON_NESTING_TOKEN.findall(text):
        if token == '"':
            in_string = not in_string
        elif not in_string and token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif not in_string and token in "]}":
            depth -= 1
    return deepest


def _json_int(digits: str) -> int:
    if len(digits.lstrip("-")) > _MAX_JSON_INT_DIGITS:
        raise InvalidRequestError(f"sampling_parameters holds a {len(digits)}-digit number; no setting takes "
                                  f"more than {_MAX_JSON_INT_DIGITS} digits")
    return int(digits)


def _json_constant(name: str):
    raise InvalidRequestError(f"sampling_parameters holds {name}, which is not JSON: send a finite number")


def _shown(value) -> str:
    """repr(value), cut short for error messages."""
    text = repr(value)
    return text if len(text) <= 48 else f"{text[:24]}...({len(text)} characters)"


_NO_DEFAULT = object()


def _scalar(inputs, name: str, kind, default=_NO_DEFAULT):
    """The single element of input `name`, as `kind`; numbers must be of a numeric dtype and fit their type."""
    if name not in inputs:
        if default is _NO_DEFAULT:
            raise InvalidRequestError(f"input {name} is required")
        return default
    value = _element(inputs, name)
    if kind is str:
        return _decode(name, value)
    dtype_kind = np.asarray(value).dtype.kind
    if kind is bool:
        if dtype_kind == "b" or (dtype_kind in "iu" and value in (0, 1)):
            return bool(value)
        raise InvalidRequestError(f"input {name} must be BOOL, got {_type_of(value)}")
    if kind is float:
        if dtype_kind in "iuf":
            return float(value)
        raise InvalidRequestError(f"input {name} must be FP32, got {_type_of(value)}")
    (low, high), type_name = _INTEGER_TYPES.get(name, (_INT32, "INT32"))
    if dtype_kind not in "iu":
        raise InvalidRequestError(f"input {name} must be {type_name}, got {_type_of(value)}")
    number = int(value)
    if not low <= number <= high:
        raise InvalidRequestError(f"input {name} must fit {type_name} ([{low}, {high}]), got {number}")
    return number


def _element(inputs, name: str):
    """The single element of input `name`."""
    array = np.asarray(inputs[name])
    if array.size != 1:
        raise InvalidRequestError(f"input {name} must hold exactly one element, got shape {list(array.shape)}")
    return array.reshape(-1)[0]


def _stop_strings(inputs, name: str, limits: RequestLimits) -> list[str]:
    values = np.asarray(inputs[name]).reshape(-1)
    limits.check_stop_count(values.size)
    for value in values:
        limits.check_stop_string_bytes(_size(value))
    return [_decode(name, v) for v in values]


def _size(value) -> int:
    """UTF-8 bytes of a BYTES element, without decoding it (Triton delivers bytes; in-process callers may pass str)."""
    if isinstance(value, bytes):
        return len(value)
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


def _type_of(value) -> str:
    dtype = np.asarray(value).dtype
    return "BYTES" if dtype.kind in "SUO" else str(dtype)


def _decode(name: str, value) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(f"input {name} is not valid UTF-8") from None
    if isinstance(value, str):
        try:
            value.encode("utf-8")      # a lone surrogate (numpy str in-process) would fail the tokenizer later
        except UnicodeEncodeError:
            raise InvalidRequestError(f"input {name} is not valid UTF-8") from None
        return value
    raise InvalidRequestError(f"input {name} must be a string (BYTES), got {type(value).__name__}")
