"""SamplingParams: how one request picks its tokens (vLLM's names and defaults)."""

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from multilora.errors import InvalidRequestError

SEED_LIMIT = 2**64   # seeds arrive as Triton TYPE_UINT64
INT32_LIMIT = 2**31  # max_tokens, top_k and min_tokens arrive as TYPE_INT32: larger ones are refused, never wrapped
# The sampler computes in float32. A temperature below its smallest normal number (1e-300 rounds to
# 0 there) would divide by zero and give NaN, which used to fail every request in the step; greedy
# decoding is its limit, so such a temperature means greedy. Past float32's range on the other side
# (a temperature above its largest number, a top_p below its smallest) the arithmetic gives inf or 0;
# those values are stored as float32's limits, which sample the same: as uniformly, the top token alone.
FLOAT32_TINY = float(np.finfo(np.float32).tiny)
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class SamplingParams:
    """Per-request sampling settings, validated on construction.

    `temperature == 0` (or `top_k == 1`) means greedy, and so does a temperature
    too small for float32 (below about 1.2e-38); temperatures above float32's
    largest number and top_p below its smallest are stored as those limits.
    `top_k` 0 or -1 means
    no top-k filter; `top_p == 1` means no nucleus filter. Stop strings are
    matched on the output text and are not part of it.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    min_tokens: int = 0

    def __post_init__(self):
        # Accept the shapes users naturally pass (a lone string, a tuple,
        # numpy scalars from Triton tensors) and store plain Python values.
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)  # our own copy: the caller may reuse theirs
        self.validate()
        self.max_tokens = int(self.max_tokens)
        self.temperature = min(float(self.temperature), FLOAT32_MAX)
        self.top_p = max(float(self.top_p), FLOAT32_TINY)
        self.top_k = int(self.top_k)
        self.seed = None if self.seed is None else int(self.seed)
        self.min_tokens = int(self.min_tokens)
        self.ignore_eos = bool(self.ignore_eos)

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad value and its allowed range."""
        _check_int("max_tokens", self.max_tokens, "an integer in [1, 2**31)", lambda v: 1 <= v < INT32_LIMIT)
        _check_real("temperature", self.temperature, "a finite number >= 0 (0 = greedy)", lambda v: v >= 0)
        _check_real("top_p", self.top_p, "a number in (0, 1]", lambda v: 0 < v <= 1)
        _check_int("top_k", self.top_k, "-1 or 0 (off) or an integer in [1, 2**31)",
                   lambda v: -1 <= v < INT32_LIMIT)
        if self.seed is not None:
            _check_int("seed", self.seed, "an integer in [0, 2**64)", lambda v: 0 <= v < SEED_LIMIT)
        _check_int(
            "min_tokens",
            self.min_tokens,
            f"an integer in [0, max_tokens={self.max_tokens}]",
            lambda v: 0 <= v <= self.max_tokens,
        )
        if not isinstance(self.ignore_eos, (bool, np.bool_)):
            raise InvalidRequestError(f"ignore_eos must be true or false, got {_shown(self.ignore_eos)}")
        _check_stop(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature < FLOAT32_TINY or self.top_k == 1

    @classmethod
    def from_vllm_dict(cls, d: dict) -> "SamplingParams":
        """Build from the `sampling_parameters` JSON object of Triton's vllm_backend.

        Values may be strings ("0.7", "16", "true"), as vllm_backend clients
        send them. vLLM parameters this engine does not implement are accepted
        only at their no-op value. The caller removes `lora_name` first.
        """
        if not isinstance(d, dict):
            raise InvalidRequestError(f"sampling_parameters must be a JSON object, got {type(d).__name__}")
        kwargs = {}
        for key, value in d.items():
            if key in _VLLM_PARSERS:
                kwargs[key] = _VLLM_PARSERS[key](key, value)
            elif key in _VLLM_NO_OP:
                _check_no_op(key, value)
            else:
                known = ", ".join(sorted(_VLLM_PARSERS))
                raise InvalidRequestError(f"unknown sampling parameter {_shown(key)}; supported: {known}")
        return cls(**kwargs)


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True must not pass as max_tokens=1.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """repr(value), cut short: a 5000-digit number or a huge list must not become a huge message."""
    text = repr(value)
    return text if len(text) <= 48 else f"{text[:24]}...({len(text)} characters)"


def _check_int(name: str, value: Any, allowed: str, ok: Callable[[int], bool]) -> None:
    if not _is_int(value) or not ok(int(value)):
        raise InvalidRequestError(f"{name} must be {allowed}, got {_shown(value)}")


def _check_real(name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> None:
    try:
        real = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an int past float's range
        real = math.nan
    if not math.isfinite(real) or not ok(real):
        raise InvalidRequestError(f"{name} must be {allowed}, got {_shown(value)}")


def _check_stop(stop: Any) -> None:
    if not isinstance(stop, list):
        raise InvalidRequestError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    for s in stop:
        if not isinstance(s, str) or not s:
            raise InvalidRequestError(f"stop strings must be non-empty strings, got {_shown(s)}")


# --- vllm_backend JSON: values may arrive as strings -------------------------


def _parse_int(key: str, value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise InvalidRequestError(f"sampling parameter {_shown(key)} must be an integer, "
                                      f"got {_shown(value)}") from None
    return value  # validate() reports anything else with the allowed range


def _parse_float(key: str, value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise InvalidRequestError(f"sampling parameter {_shown(key)} must be a number, "
                                      f"got {_shown(value)}") from None
    return value


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _parse_bool(key: str, value: Any) -> bool:
    # vllm_backend uses bool(value), which makes "false" true; parse it properly.
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if _is_int(value) and value in (0, 1):
        return bool(value)
    raise InvalidRequestError(f"sampling parameter {_shown(key)} must be true or false, got {_shown(value)}")


def _as_is(key: str, value: Any) -> Any:
    return value  # __post_init__ normalises and validates it


_VLLM_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "max_tokens": _parse_int,
    "temperature": _parse_float,
    "top_p": _parse_float,
    "top_k": _parse_int,
    "seed": _parse_int,
    "min_tokens": _parse_int,
    "ignore_eos": _parse_bool,
    "stop": _as_is,  # a string or a list, as SamplingParams takes it
}

# vLLM parameters we do not implement: stock clients often send them at their
# default, which changes nothing, so that value is accepted and any other refused.
_VLLM_NO_OP: dict[str, tuple[Callable[[str, Any], Any], Any]] = {
    "n": (_parse_int, 1),
    "best_of": (_parse_int, 1),
    "presence_penalty": (_parse_float, 0.0),
    "frequency_penalty": (_parse_float, 0.0),
    "repetition_penalty": (_parse_float, 1.0),
    "length_penalty": (_parse_float, 1.0),
    "use_beam_search": (_parse_bool, False),
    "skip_special_tokens": (_parse_bool, True),
}


def _check_no_op(key: str, value: Any) -> None:
    parse, no_op = _VLLM_NO_OP[key]
    if value is None:
        return
    parsed = parse(key, value)
    if type(parsed) is bool or type(no_op) is bool:
        same = type(parsed) is type(no_op) and parsed == no_op
    else:
        same = isinstance(parsed, numbers.Real) and parsed == no_op
    if not same:
        raise InvalidRequestError(f"sampling parameter {key!r}={_shown(value)} is not supported; "
                                  f"only {no_op!r} is")
