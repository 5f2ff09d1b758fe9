"""EngineConfig's request limits and waiting-queue settings: defaults, the JSON mapping, validation."""

import pytest

from multilora.config import PROMPT_BYTES_PER_TOKEN, EngineConfig, RequestLimits
from multilora.errors import InvalidRequestError, LimitExceededError


def test_defaults():
    config = EngineConfig(model="m")
    assert config.request_limits(4096) == RequestLimits(max_prompt_bytes=4096 * PROMPT_BYTES_PER_TOKEN)
    assert (config.max_prompt_bytes, config.max_stop_strings, config.max_stop_string_bytes) == (None, 16, 256)
    assert (config.max_sampling_parameters_bytes, config.max_sampling_parameters_depth) == (1 << 16, 4)
    assert (config.max_waiting_requests, config.max_queue_wait_s) == (1024, None)


def test_from_dict_maps_the_json_one_to_one():
    config = EngineConfig.from_dict({"model": "m", "max_prompt_bytes": "4096", "max_stop_strings": 2,
                                     "max_waiting_requests": "null", "max_queue_wait_s": "30"})
    assert config.request_limits(128) == RequestLimits(max_prompt_bytes=4096, max_stop_strings=2)
    assert config.max_waiting_requests is None and config.max_queue_wait_s == 30.0


@pytest.mark.parametrize("values, fragment", [
    ({"max_prompt_bytes": 0}, "max_prompt_bytes must be an integer >= 1, got 0"),
    ({"max_prompt_bytes": 3}, "max_prompt_bytes must be >= 4 (one token id)"),
    ({"max_stop_strings": -1}, "max_stop_strings must be an integer >= 1"),
    ({"max_sampling_parameters_depth": 0}, "max_sampling_parameters_depth"),
    ({"max_waiting_requests": 0}, "max_waiting_requests must be >= 1 or null (unbounded), got 0"),
    ({"max_queue_wait_s": 0}, "max_queue_wait_s must be > 0 or null (no limit), got 0"),
])
def test_bad_settings_name_the_field(values, fragment):
    with pytest.raises(ValueError) as info:
        EngineConfig(model="m", **values)
    assert fragment in str(info.value)


def test_limits_name_the_setting_to_raise():
    limits = RequestLimits(max_prompt_bytes=8, max_stop_strings=1, max_stop_string_bytes=2)
    limits.check_prompt("12345678")
    limits.check_prompt([1, 2])
    for prompt, fragment in [("123456789", "9 bytes"), ("\u00e9" * 5, "10 bytes"), ([1, 2, 3], "3 token ids")]:
        with pytest.raises(LimitExceededError, match="max_prompt_bytes") as info:
            limits.check_prompt(prompt)
        assert fragment in str(info.value) and info.value.code == "INVALID_ARG"
    with pytest.raises(InvalidRequestError, match="lone surrogate"):
        limits.check_prompt("a\ud800")
    with pytest.raises(LimitExceededError, match="max_stop_strings"):
        limits.check_stop(["a", "b"])
    with pytest.raises(LimitExceededError, match="max_stop_string_bytes"):
        limits.check_stop(["\u00e9\u00e9"])
