"""Hostile adapters beside running requests (issue 9, items 1, 2 and 7): each is refused with INVALID_ARG at its
first request, costs one load however often it is asked for, and the other requests stay token-exact."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from helpers.engine_runs import StepTracker, assert_idle, greedy, make_llm
from helpers.zoo import SHORT_PROMPTS
from multilora import LoRARequest
from multilora.errors import AdapterPatternError, AdapterRangeError, AdapterScalingError


def _overflowing_weights(directory):
    path = str(directory / "adapter_model.safetensors")
    tensors = load_file(path)
    save_file({name: t * 1e30 if "lora_B" in name else t for name, t in tensors.items()}, path)


# name -> (how to break a copy of the 'sql' adapter, the error its requests get)
HOSTILE = {
    "alpha-1e300": ({"lora_alpha": 1e300}, AdapterScalingError),      # overflowed the GPU slot write before
    "alpha-nan": ({"lora_alpha": float("nan")}, AdapterScalingError),  # NaN outputs and KV blocks before
    "alpha-negative": ({"lora_alpha": -8}, AdapterScalingError),
    "weights-1e30": (_overflowing_weights, AdapterRangeError),
    "regex-backtracking": ({"target_modules": r"(.*)*x"}, AdapterPatternError),   # froze the stub before
}


@pytest.fixture
def hostile_requests(tiny_zoo, tmp_path):
    sql_dir = tiny_zoo.adapter_dir("llama", "sql")
    requests = {}
    for i, (name, (damage, _)) in enumerate(HOSTILE.items()):
        directory = shutil.copytree(sql_dir, tmp_path / name)
        if callable(damage):
            damage(directory)
        else:
            config = json.loads((directory / "adapter_config.json").read_text())
            (directory / "adapter_config.json").write_text(json.dumps({**config, **damage}))
        requests[name] = LoRARequest(name, 500 + i, str(directory))
    return requests


def test_hostile_adapters_are_refused_once_and_others_run_exactly(tiny_zoo, hostile_requests):
    engine = make_llm(tiny_zoo, "llama").llm_engine
    engine.add_request("base", SHORT_PROMPTS[0], greedy(8))
    engine.add_request("sql", SHORT_PROMPTS[1], greedy(8), tiny_zoo.lora_request("llama", "sql"))
    tracker = StepTracker(engine)
    tracker.step()
    for attempt in range(3):
        for name, lora in hostile_requests.items():
            with pytest.raises(HOSTILE[name][1]) as info:
                engine.add_request(f"{name}-{attempt}", SHORT_PROMPTS[2], greedy(8), lora)
            assert info.value.code == "INVALID_ARG" and f"'{name}'" in str(info.value)
        tracker.step()
    counters = engine.adapter_pool.counters
    assert counters.failed_loads == len(HOSTILE)                  # one load per hostile adapter, not per request
    assert counters.remembered_failures == 2 * len(HOSTILE)
    tracker.drain()
    assert tracker.finals["base"].outputs[0].token_ids == tiny_zoo.reference("llama", None, SHORT_PROMPTS[0], 8)
    assert tracker.finals["sql"].outputs[0].token_ids == tiny_zoo.reference("llama", "sql", SHORT_PROMPTS[1], 8)
    assert_idle(engine)
    assert engine.stats().resident_adapters == ["sql"]
