"""load_adapter validates numbers, not only files (issue 9, item 2): alpha, scaling, weight range, effect norm."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from multilora.errors import (
    AdapterCorruptError,
    AdapterFormatError,
    AdapterRangeError,
    AdapterScalingError,
    AdapterWeightsError,
    MultiLoRAError,
)
from multilora.lora.adapter import load_adapter
from multilora.lora.request import LoRARequest
from multilora.lora.weight_limits import MAX_DELTA_NORM

NAME = "tenant-adapter"
Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q0_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.fixture
def adapter_dir(peft_adapters, tmp_path):
    """A private copy of the attn_r4 adapter (r=4, alpha=8, q/k/v/o) to damage."""
    return shutil.copytree(peft_adapters["attn_r4"][0], tmp_path / "adapter")


def load(directory, spec, **kwargs):
    return load_adapter(LoRARequest(NAME, 3, str(directory)), spec, 16, **kwargs)


def expect(error_type, directory, spec, **kwargs) -> str:
    with pytest.raises(MultiLoRAError) as info:
        load(directory, spec, **kwargs)
    assert type(info.value) is error_type, info.value
    message = str(info.value)
    assert f"'{NAME}'" in message and os.sep not in message
    return message


def edit_config_text(directory, **changes):
    """Rewrites adapter_config.json with Python's json, which writes NaN and Infinity as PEFT's reader accepts."""
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensor(directory, tensor_name, edit):
    path = str(directory / "adapter_model.safetensors")
    tensors = load_file(path)
    tensors[tensor_name] = edit(tensors[tensor_name].clone())
    save_file(tensors, path)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), -8, 0, 0.0, 1e300, 10**400])
def test_lora_alpha_must_be_finite_positive_and_bounded(alpha, adapter_dir, spec):
    edit_config_text(adapter_dir, lora_alpha=alpha)
    message = expect(AdapterScalingError, adapter_dir, spec)
    assert "lora_alpha" in message and len(message) < 400      # a 400-digit alpha is not echoed whole


@pytest.mark.parametrize("alpha", [float("nan"), -1, 1e7])
def test_alpha_pattern_values_are_checked_too(alpha, adapter_dir, spec):
    edit_config_text(adapter_dir, alpha_pattern={"q_proj": alpha})
    assert "alpha_pattern" in expect(AdapterScalingError, adapter_dir, spec)


def test_use_rslora_must_be_a_flag(adapter_dir, spec):
    edit_config_text(adapter_dir, use_rslora="false")          # a truthy string would have meant True
    expect(AdapterFormatError, adapter_dir, spec)


def test_finite_weights_beyond_half_precision_are_refused(adapter_dir, spec):
    edit_tensor(adapter_dir, Q0_B, lambda b: b.index_fill_(0, torch.tensor([0]), 1e30))
    message = expect(AdapterRangeError, adapter_dir, spec)
    assert f"'{Q0_B}'" in message and "float16" in message
    # Served in float32, the same weights still change q_proj's output far beyond the limit.
    assert "scaling * B @ A" in expect(AdapterRangeError, adapter_dir, spec, serving_dtype=torch.float32)


def test_weight_range_follows_the_serving_dtype(adapter_dir, spec):
    edit_tensor(adapter_dir, Q0_B, lambda b: b.index_fill_(0, torch.tensor([1]), 7e4))   # > float16 max 65504
    assert "float16" in expect(AdapterRangeError, adapter_dir, spec)
    adapter = load(adapter_dir, spec, serving_dtype=torch.bfloat16, max_delta_norm=1e9)
    assert adapter.weights[(0, "q_proj")][1][1].eq(7e4).all()


def test_effect_above_the_limit_is_refused_and_the_limit_is_a_parameter(adapter_dir, spec):
    adapter = load(adapter_dir, spec)
    a, b, scaling = adapter.weights[(0, "q_proj")]
    norm = scaling * torch.linalg.matrix_norm(b.double() @ a.double(), ord=2).item()
    assert 0 < norm < MAX_DELTA_NORM
    factor = 2 * MAX_DELTA_NORM / norm
    edit_tensor(adapter_dir, Q0_B, lambda t: t * factor)       # values stay well inside float16
    message = expect(AdapterRangeError, adapter_dir, spec)
    assert "scaling * B @ A" in message and "model.layers.0.self_attn.q_proj" in message
    assert f"{2 * MAX_DELTA_NORM:.3g}" in message               # the exact spectral norm, not a loose bound
    assert load(adapter_dir, spec, max_delta_norm=3 * MAX_DELTA_NORM).weights[(0, "q_proj")][2] == scaling


def test_the_rank_r_intermediate_is_bounded_too(adapter_dir, spec):
    # A scaled up and B down: the same B @ A, but x @ A.T would overflow half precision on its way.
    edit_tensor(adapter_dir, Q0_A, lambda t: t * 3e4)
    edit_tensor(adapter_dir, Q0_B, lambda t: t / 3e4)
    assert "lora_A" in expect(AdapterRangeError, adapter_dir, spec)


def test_non_finite_weights_stay_a_weights_error(adapter_dir, spec):
    edit_tensor(adapter_dir, Q0_A, lambda t: t.index_fill_(1, torch.tensor([2]), float("nan")))
    assert "NaN" in expect(AdapterWeightsError, adapter_dir, spec)


def test_weights_file_larger_than_any_adapter_of_this_model_is_refused_unread(adapter_dir, spec, monkeypatch):
    path = adapter_dir / "adapter_model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(2**40)                                       # sparse: 1 TiB on paper, nothing on disk

    def never(*args, **kwargs):
        raise AssertionError("the loader parsed an oversized file")

    monkeypatch.setattr("multilora.lora.adapter.safe_open", never)
    assert "MiB" in expect(AdapterFormatError, adapter_dir, spec)


def test_huge_header_length_is_a_corrupt_file(adapter_dir, spec):
    path = adapter_dir / "adapter_model.safetensors"
    path.write_bytes((2**62).to_bytes(8, "little") + b'{"a": 1}')
    expect(AdapterCorruptError, adapter_dir, spec)


def test_bfloat16_norms_bound_the_exact_ones_from_above_within_2_percent():
    from multilora.lora.weight_limits import frobenius_norms

    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (16, 64), (16, 4096), (4096, 16), (1024, 16)]
    tensors = [(torch.randn(*shapes[i % 5], generator=gen) * 10.0 ** (i % 24 - 12)).bfloat16() for i in range(120)]
    for tensor, norm in zip(tensors, frobenius_norms(tensors)):
        exact = torch.linalg.vector_norm(tensor.double()).item()
        assert exact <= norm <= 1.02 * exact
