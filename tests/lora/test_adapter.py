"""load_adapter: PEFT checkpoints read exactly as PEFT holds them, and every bad one refused with its typed error."""

import json
import logging
import os
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from multilora.errors import (
    AdapterCorruptError,
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    AdapterTargetError,
    AdapterWeightsError,
    MultiLoRAError,
)
from multilora.lora.adapter import SUPPORTED_TARGET_MODULES, LoRAModelSpec, load_adapter
from multilora.lora.request import LoRARequest

NAME = "my-adapter"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q0_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q0_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def _load(directory, spec, max_lora_rank=16):
    return load_adapter(LoRARequest(NAME, 7, str(directory)), spec, max_lora_rank)


def _peft_layers(peft_model) -> dict:
    """(layer, module) -> the PEFT LoRA layer wrapping it."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for key, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            match = re.fullmatch(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)", key)
            layers[(int(match[1]), match[3])] = module
    return layers


def _assert_same_as_peft(adapter, peft_model):
    layers = _peft_layers(peft_model)
    assert set(adapter.weights) == set(layers)
    for key, layer in layers.items():
        a, b, scaling = adapter.weights[key]
        for ours, theirs in ((a, layer.lora_A["default"].weight), (b, layer.lora_B["default"].weight)):
            assert ours.dtype == torch.float32 and ours.is_contiguous() and ours.device.type == "cpu"
            assert torch.equal(ours, theirs.detach())
        assert scaling == layer.scaling["default"]
    assert adapter.rank == max(layer.r["default"] for layer in layers.values())
    assert adapter.target_modules == {module for _, module in layers}
    assert adapter.nbytes == sum(4 * (a.numel() + b.numel()) for a, b, _ in adapter.weights.values())


@pytest.mark.parametrize("kind", ["attn_r4", "mlp_r8_regex", "all_rslora_r16", "patterns", "layer1_only"])
def test_loads_what_peft_holds(kind, peft_adapters, spec):
    directory, peft_model = peft_adapters[kind]
    adapter = _load(directory, spec)
    assert (adapter.name, adapter.adapter_id) == (NAME, 7)
    _assert_same_as_peft(adapter, peft_model)


def test_ranks_and_scalings_follow_config(peft_adapters, spec):
    all_seven = _load(peft_adapters["all_rslora_r16"][0], spec)
    assert all_seven.target_modules == set(SUPPORTED_TARGET_MODULES) and len(all_seven.weights) == 14
    assert {s for _, _, s in all_seven.weights.values()} == {32 / 4}          # alpha / sqrt(r)
    assert _load(peft_adapters["attn_r4"][0], spec).weights[(1, "o_proj")][2] == 2.0
    assert _load(peft_adapters["mlp_r8_regex"][0], spec).target_modules == {"gate_proj", "up_proj", "down_proj"}
    patterns = _load(peft_adapters["patterns"][0], spec).weights
    rank_scaling = {key: (a.shape[0], s) for key, (a, _, s) in patterns.items()}
    assert rank_scaling == {
        (0, "q_proj"): (4, 2.0), (1, "q_proj"): (2, 4.0),        # rank_pattern on one layer
        (0, "v_proj"): (4, 0.75), (1, "v_proj"): (4, 0.75),      # alpha_pattern 3
        (0, "down_proj"): (8, 5.0), (1, "down_proj"): (8, 1.0),  # rank 8 everywhere, alpha 40 on layer 0
    }
    assert patterns[(1, "q_proj")][1].shape == (64, 2) and patterns[(0, "v_proj")][1].shape == (32, 4)
    assert set(_load(peft_adapters["layer1_only"][0], spec).weights) == {(1, "q_proj"), (1, "up_proj")}


def test_spec_from_llama_config(tiny_config):
    spec = LoRAModelSpec.from_hf_config(tiny_config())
    assert spec.num_layers == 2
    assert spec.module_shapes == {
        "q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
        "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
    wide_heads = LoRAModelSpec.from_hf_config(tiny_config(head_dim=32)).module_shapes
    assert (wide_heads["q_proj"], wide_heads["k_proj"], wide_heads["o_proj"]) == ((64, 128), (64, 64), (128, 64))


def test_qwen2_adapter(tmp_path, make_peft_adapter):
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=128)
    spec = LoRAModelSpec.from_hf_config(config)
    assert spec.module_shapes["k_proj"] == (64, 32) and spec.module_shapes["down_proj"] == (128, 64)
    peft_model = make_peft_adapter(tmp_path / "qwen", model_config=config, r=8, lora_alpha=8,
                                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    _assert_same_as_peft(_load(tmp_path / "qwen", spec), peft_model)


def _copy(src, tmp_path, name="adapter"):
    return shutil.copytree(src, tmp_path / name)


def _edit_config(directory, **changes):
    path = directory / CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(directory, edit):
    tensors = load_file(str(directory / WEIGHTS))
    save_file(edit(tensors), str(directory / WEIGHTS))


def _expect(error_type, directory, spec, max_lora_rank=16) -> str:
    """Loads, asserts exactly `error_type`, a message naming the adapter and holding no path; returns it."""
    with pytest.raises(MultiLoRAError) as info:
        _load(directory, spec, max_lora_rank)
    assert type(info.value) is error_type, info.value
    message = str(info.value)
    assert f"'{NAME}'" in message
    assert os.sep not in message and str(directory) not in message
    return message


def test_adapter_name_segment_in_tensor_names(peft_adapters, spec, tmp_path):
    directory, peft_model = peft_adapters["attn_r4"]
    renamed = _copy(directory, tmp_path)
    _edit_tensors(renamed, lambda ts: {k.replace(".weight", ".default.weight"): v for k, v in ts.items()})
    _assert_same_as_peft(_load(renamed, spec), peft_model)


def test_half_precision_weights_become_float32(peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    _edit_tensors(directory, lambda ts: {k: v.to(torch.bfloat16) for k, v in ts.items()})
    a, b, _ = _load(directory, spec).weights[(0, "q_proj")]
    stored = load_file(str(directory / WEIGHTS))
    assert a.dtype == torch.float32 and torch.equal(a, stored[Q0_A].float())
    assert torch.equal(b, stored[Q0_B].float())


def test_logs_one_info_line(peft_adapters, spec, caplog):
    with caplog.at_level(logging.INFO, logger="multilora.lora.adapter"):
        _load(peft_adapters["mlp_r8_regex"][0], spec)
    (record,) = [r for r in caplog.records if r.name == "multilora.lora.adapter"]
    assert record.levelno == logging.INFO
    assert f"'{NAME}'" in record.getMessage() and "rank 8" in record.getMessage()
    assert "down_proj" in record.getMessage() and "MiB" in record.getMessage()


# ---- refused adapters ----------------------------------------------------------------------------------

def test_missing_directory(tmp_path, spec):
    _expect(AdapterNotFoundError, tmp_path / "nowhere", spec)
    (tmp_path / "a_file").write_text("x")
    _expect(AdapterNotFoundError, tmp_path / "a_file", spec)


@pytest.mark.parametrize("config_text", [None, "{not json", "[1, 2]", "\xff\xfe"])
def test_bad_config_file(config_text, peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    (directory / CONFIG).unlink()
    if config_text is not None:
        (directory / CONFIG).write_bytes(config_text.encode("latin-1"))
    _expect(AdapterFormatError, directory, spec)


@pytest.mark.parametrize("changes", [
    {"peft_type": "IA3"}, {"peft_type": None}, {"r": "4"}, {"r": True}, {"lora_alpha": None},
    {"target_modules": "(unclosed"}, {"target_modules": 5}, {"rank_pattern": {"q_proj": "2"}},
    {"alpha_pattern": {"[": 2}}, {"layers_to_transform": ["0"]}, {"layers_pattern": 3},
    {"layers_to_transform": [0], "layers_pattern": ["layers", "(bad"]},
])
def test_bad_config_values(changes, peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    _edit_config(directory, **changes)
    _expect(AdapterFormatError, directory, spec)


@pytest.fixture
def refuse_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the loader unpickled a file")
    for owner, attr in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(owner, attr, refuse)


@pytest.mark.parametrize("pickled", ["adapter_model.bin", "adapter.pt", "adapter.pth", "last.ckpt"])
def test_pickled_weights_are_refused(pickled, peft_adapters, spec, tmp_path, refuse_unpickling):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    tensors = load_file(str(directory / WEIGHTS))
    (directory / WEIGHTS).unlink()
    (directory / pickled).write_bytes(pickle.dumps({k: v.numpy() for k, v in tensors.items()}))
    message = _expect(AdapterFormatError, directory, spec)
    assert "pickled" in message and WEIGHTS in message


def test_no_weights_file(peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    (directory / WEIGHTS).unlink()
    assert "pickled" not in _expect(AdapterFormatError, directory, spec)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_safetensors(damage, peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    data = (directory / WEIGHTS).read_bytes()
    damaged = {"truncate": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    (directory / WEIGHTS).write_bytes(damaged)
    _expect(AdapterCorruptError, directory, spec)


def test_rank_above_max(peft_adapters, spec):
    message = _expect(AdapterRankError, peft_adapters["all_rslora_r16"][0], spec, max_lora_rank=8)
    assert message == (f"LoRA rank 16 of adapter '{NAME}' is greater than max_lora_rank 8; "
                       "raise max_lora_rank or use a smaller adapter")
    assert _load(peft_adapters["all_rslora_r16"][0], spec, max_lora_rank=16).rank == 16


def test_rank_pattern_above_max(peft_adapters, spec):
    # r is 4 but rank_pattern gives down_proj rank 8.
    assert "rank 8" in _expect(AdapterRankError, peft_adapters["patterns"][0], spec, max_lora_rank=4)


@pytest.mark.parametrize("changes", [{"r": 0}, {"r": -4}, {"rank_pattern": {"q_proj": 0}},
                                     {"rank_pattern": {"v_proj": 128}}])
def test_rank_not_allowed_in_config(changes, peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    _edit_config(directory, **changes)
    _expect(AdapterRankError, directory, spec, max_lora_rank=64)


def test_unsupported_target_module(make_peft_adapter, spec, tmp_path):
    make_peft_adapter(tmp_path / "lm_head", r=4, target_modules=["q_proj", "lm_head"])
    assert "'lm_head'" in _expect(AdapterTargetError, tmp_path / "lm_head", spec)


def test_module_the_base_model_lacks(peft_adapters, spec):
    shapes = {m: s for m, s in spec.module_shapes.items() if m != "o_proj"}
    message = _expect(AdapterTargetError, peft_adapters["attn_r4"][0], LoRAModelSpec(2, shapes))
    assert "'o_proj'" in message


@pytest.mark.parametrize("feature, value", [
    ("use_dora", True), ("modules_to_save", ["lm_head"]), ("bias", "all"), ("bias", "lora_only"),
    ("fan_in_fan_out", True), ("lora_bias", True), ("trainable_token_indices", [1, 2]),
])
def test_unsupported_peft_feature(feature, value, peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    _edit_config(directory, **{feature: value})
    assert feature in _expect(AdapterFormatError, directory, spec)


def test_dora_saved_by_peft(make_peft_adapter, spec, tmp_path):
    make_peft_adapter(tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    assert "use_dora" in _expect(AdapterFormatError, tmp_path / "dora", spec)


def test_lora_on_embeddings(make_peft_adapter, spec, tmp_path):
    make_peft_adapter(tmp_path / "emb", r=4, target_modules=["embed_tokens", "q_proj"])
    assert "embedding" in _expect(AdapterTargetError, tmp_path / "emb", spec)


def test_adapter_for_another_base_model(make_peft_adapter, tiny_config, spec, tmp_path):
    make_peft_adapter(tmp_path / "narrow", model_config=tiny_config(hidden_size=32), r=4,
                      target_modules=["q_proj", "v_proj"])
    assert "shape" in _expect(AdapterShapeError, tmp_path / "narrow", spec)


def test_layer_out_of_range(peft_adapters, spec):
    one_layer = LoRAModelSpec(num_layers=1, module_shapes=spec.module_shapes)
    assert "layer 1" in _expect(AdapterShapeError, peft_adapters["attn_r4"][0], one_layer)


@pytest.mark.parametrize("edit", [
    pytest.param(lambda ts: {**ts, "base_model.model.model.norm.weight": torch.ones(64)}, id="unknown-tensor"),
    pytest.param(lambda ts: {k: v for k, v in ts.items() if k != Q0_B}, id="A-without-B"),
    pytest.param(lambda ts: {k: v for k, v in ts.items() if k != Q0_A}, id="B-without-A"),
    pytest.param(lambda ts: {**ts, Q0_A.replace(".weight", ".other.weight"): ts[Q0_A].clone()}, id="two-A"),
    pytest.param(lambda ts: {k.replace("self_attn.q_proj", "mlp.q_proj"): v for k, v in ts.items()},
                 id="wrong-block"),
    pytest.param(lambda ts: {**ts, Q0_B: ts[Q0_B][:, :3].contiguous()}, id="B-rank-differs"),
    pytest.param(lambda ts: {**ts, Q0_A: torch.zeros(4, 32)}, id="A-wrong-in"),
])
def test_tensor_names_and_shapes(edit, peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    _edit_tensors(directory, edit)
    _expect(AdapterShapeError, directory, spec)


def test_config_rank_differs_from_tensors(peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    _edit_config(directory, r=2)
    _expect(AdapterShapeError, directory, spec)


@pytest.mark.parametrize("changes", [
    {"target_modules": ["q_proj", "k_proj", "v_proj"]}, {"target_modules": r".*\.(q|k|v)_proj"},
    {"exclude_modules": ["o_proj"]}, {"exclude_modules": r"model\.layers\.1\.self_attn\.o_proj"},
])
def test_weights_config_does_not_select(changes, peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    _edit_config(directory, **changes)
    assert "o_proj" in _expect(AdapterFormatError, directory, spec)


@pytest.mark.parametrize("changes", [{"layers_to_transform": [1]}, {"layers_to_transform": 1},
                                     {"layers_to_transform": [1], "layers_pattern": "layers"}])
def test_weights_outside_layers_to_transform(changes, peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    _edit_config(directory, **changes)
    assert "model.layers.0." in _expect(AdapterFormatError, directory, spec)


def test_no_lora_tensors(peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    _edit_tensors(directory, lambda ts: {})
    _expect(AdapterFormatError, directory, spec)


def test_integer_weights(peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)
    _edit_tensors(directory, lambda ts: {**ts, Q0_A: ts[Q0_A].to(torch.int32)})
    assert "int32" in _expect(AdapterWeightsError, directory, spec)


@pytest.mark.parametrize("bad, dtype", [(float("nan"), torch.float32), (float("inf"), torch.float16),
                                        (1e300, torch.float64)])
def test_non_finite_weights(bad, dtype, peft_adapters, spec, tmp_path):
    directory = _copy(peft_adapters["attn_r4"][0], tmp_path)

    def poison(ts):
        b = ts[Q0_B].to(dtype)
        b[3, 1] = bad
        return {**ts, Q0_B: b}

    _edit_tensors(directory, poison)
    assert f"'{Q0_B}'" in _expect(AdapterWeightsError, directory, spec)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weights_kept_in_the_model_dtype(dtype, peft_adapters, spec):
    """The engine keeps host copies in its model's dtype: the file's values rounded once, as its GPU slot holds them."""
    directory, peft_model = peft_adapters["attn_r4"]
    adapter = load_adapter(LoRARequest(NAME, 7, str(directory)), spec, 16, dtype=dtype)
    layers = _peft_layers(peft_model)
    assert set(adapter.weights) == set(layers)
    for key, layer in layers.items():
        a, b, _ = adapter.weights[key]
        for ours, theirs in ((a, layer.lora_A["default"].weight), (b, layer.lora_B["default"].weight)):
            assert ours.dtype == dtype and ours.is_contiguous()
            assert torch.equal(ours, theirs.detach().to(dtype))
    assert adapter.nbytes == sum(2 * (a.numel() + b.numel()) for a, b, _ in adapter.weights.values())
