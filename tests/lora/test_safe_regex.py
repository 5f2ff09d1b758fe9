"""Regexes in adapter_config.json (issue 9, item 7): refused when they could backtrack, else matched as PEFT does."""

import json
import shutil
import time

import pytest

from multilora.errors import AdapterFormatError, AdapterPatternError
from multilora.lora.adapter import load_adapter
from multilora.lora.peft_config import PeftConfig
from multilora.lora.request import LoRARequest
from multilora.lora.safe_regex import MAX_PATTERN_LEN, InvalidPattern, MatchDeadline, PatternRefused, check_pattern

# Each holds Python's re for seconds to hours on "model.layers.0.self_attn.q_proj" (measured: over 5 s for
# all but the second, 0.6 s), with the GIL held: nested quantifiers, a repeated overlapping alternation,
# and a dozen adjacent ones.
CATASTROPHIC = [r"(.*)*x", r"(\w+\.?)+$x", r"(.|\w)+x", r"(?:(?:.*)*)*z", r".*.*.*.*.*.*.*.*.*.*.*.*x", r"([\w.]+)+x"]
# Shapes PEFT users write; all accepted.
USUAL = [r".*\.(q_proj|v_proj)", r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj", r"^(?!.*vision).*\.mlp\..*",
         r".*layers\.(0|1|2)\..*_proj$", "q_proj", "layers.1.self_attn.q_proj", r"(?i).*\.MLP\.up_proj"]


@pytest.mark.parametrize("pattern", USUAL)
def test_usual_patterns_are_accepted(pattern):
    check_pattern(pattern)


@pytest.mark.parametrize("pattern", CATASTROPHIC + [r"(?P<x>a)(?P=x)", "a" * (MAX_PATTERN_LEN + 1)])
def test_costly_patterns_are_refused(pattern):
    with pytest.raises(PatternRefused) as info:
        check_pattern(pattern)
    assert type(info.value) is PatternRefused


def test_invalid_patterns_are_invalid():
    with pytest.raises(InvalidPattern):
        check_pattern("(unclosed")


def test_deadline_expires_on_its_clock():
    now = [0.0]
    deadline = MatchDeadline(2.0, clock=lambda: now[0])
    assert not deadline.expired()
    now[0] = 2.5
    assert deadline.expired()


def _with_config(peft_adapters, tmp_path, **changes):
    directory = shutil.copytree(peft_adapters["attn_r4"][0], tmp_path / "adapter")
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


def _load(directory, spec):
    return load_adapter(LoRARequest("regex-adapter", 5, str(directory)), spec, 16)


@pytest.mark.parametrize("field, value", [
    ("target_modules", CATASTROPHIC[0]), ("target_modules", CATASTROPHIC[2]), ("exclude_modules", CATASTROPHIC[1]),
    ("rank_pattern", {CATASTROPHIC[3]: 4}), ("alpha_pattern", {CATASTROPHIC[4]: 8}),
    ("layers_pattern", [CATASTROPHIC[5]]),
])
def test_catastrophic_pattern_in_any_field_is_refused_at_once(field, value, peft_adapters, spec, tmp_path):
    changes = {field: value, **({"layers_to_transform": [0, 1]} if field == "layers_pattern" else {})}
    directory = _with_config(peft_adapters, tmp_path, **changes)
    start = time.perf_counter()
    with pytest.raises(AdapterPatternError) as info:
        _load(directory, spec)
    assert time.perf_counter() - start < 1.0          # refused before it ever runs (unbounded without the rule)
    assert "'regex-adapter'" in str(info.value) and field in str(info.value)


def test_a_regex_target_selects_as_peft_does(peft_adapters, spec, tmp_path):
    listed = _load(peft_adapters["attn_r4"][0], spec)
    directory = _with_config(peft_adapters, tmp_path, target_modules=r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj")
    as_regex = _load(directory, spec)
    assert as_regex.weights.keys() == listed.weights.keys()
    narrow = _with_config(peft_adapters, tmp_path / "narrow", target_modules=r".*\.(q|k|v)_proj")
    with pytest.raises(AdapterFormatError, match="o_proj"):  # o_proj weights that the regex does not select
        _load(narrow, spec)


def test_matching_stops_at_the_deadline(spec):
    config = PeftConfig.from_dict({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": r".*\.q_proj"},
                                  "slow-adapter")
    assert config.targets("model.layers.0.self_attn.q_proj")
    object.__setattr__(config, "_deadline", MatchDeadline(-1.0))   # as if earlier matches had used the budget
    with pytest.raises(AdapterPatternError, match="took longer"):
        config.targets("model.layers.1.self_attn.q_proj")


def test_too_many_pattern_entries_are_refused(peft_adapters, spec, tmp_path):
    directory = _with_config(peft_adapters, tmp_path, rank_pattern={f"layers.{i}.q_proj": 4 for i in range(5000)})
    with pytest.raises(AdapterPatternError, match="entries"):
        _load(directory, spec)
