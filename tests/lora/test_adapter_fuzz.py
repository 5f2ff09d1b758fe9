"""Fuzzing load_adapter (issue 9, the adapter half of the fuzz test).

Random adapter_config.json documents (wrong types, NaN/Inf, huge and negative
numbers, deep nesting, huge digit strings) and random safetensors files (any
header length, dtypes, shapes and offsets, truncated data, NaN/Inf values):
the loader either returns an adapter or raises one of our typed errors with
code INVALID_ARG, never another exception, never a path, never a hang, never a
large allocation. Few examples each, derandomized, so it runs in seconds.
"""

import json
import math
import resource
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from multilora.errors import AdapterError
from multilora.lora.adapter import LoRAAdapter, load_adapter
from multilora.lora.request import LoRARequest

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
TENSOR_NAMES = [f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{ab}.weight"
                for layer in range(2) for module in MODULES for ab in "AB"]
CONFIG_FIELDS = ["peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
                 "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "bias", "use_dora",
                 "fan_in_fan_out", "modules_to_save"]
SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8", "U8", "U16",
                      "U32", "U64", "BOOL", "C64", "F4", "XX"]

numbers = (st.integers(min_value=-(10**40), max_value=10**40) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from([0, 1, 4, 8, -1, 2**63, 1e-300, 1e300]))
json_values = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=12)
    | st.sampled_from(["LORA", "q_proj", "all-linear", r".*\.q_proj", "(.*)*x", "none", "all"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
# JSON texts Python's own encoder never writes: nesting past the parser's recursion, 5000-digit numbers.
RAW_VALUES = ["[" * 50_000 + "]" * 50_000, '{"a":' * 20_000 + "1" + "}" * 20_000, "1" * 5000, "-" + "9" * 5000,
              "1e999", "-1e999", "NaN", "Infinity", '"' + "x" * 100_000 + '"', "1" + "0" * 400 + ".5"]


@pytest.fixture(scope="module")
def workdir(peft_adapters, tmp_path_factory):
    """(a scratch adapter directory, the pristine attn_r4 config) reused by every example."""
    directory = tmp_path_factory.mktemp("fuzz") / "adapter"
    shutil.copytree(peft_adapters["attn_r4"][0], directory)
    return directory, json.loads((directory / "adapter_config.json").read_text())


def check_load(directory, spec):
    """Loads; the only acceptable outcomes are an adapter or a typed INVALID_ARG error without a path."""
    try:
        adapter = load_adapter(LoRARequest("fuzzed", 9, str(directory)), spec, 16)
    except AdapterError as error:
        assert error.code == "INVALID_ARG" and str(directory) not in str(error) and len(str(error)) < 2000
        return None
    assert isinstance(adapter, LoRAAdapter)
    half = torch.finfo(torch.float16).max              # the default serving dtype's range
    for a, b, scaling in adapter.weights.values():
        assert torch.isfinite(a).all() and torch.isfinite(b).all() and math.isfinite(scaling) and scaling > 0
        assert a.abs().max() <= half and b.abs().max() <= half
    return adapter


@pytest.fixture(scope="module", autouse=True)
def memory_stays_flat():
    """No example may allocate much (a header length must never become an allocation)."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss       # KiB on Linux
    yield
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 512 * 1024


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(CONFIG_FIELDS) | st.text(max_size=8), json_values, max_size=4))
def test_random_config_values(changes, workdir, spec):
    directory, pristine = workdir
    (directory / "adapter_config.json").write_text(json.dumps({**pristine, **changes}))
    check_load(directory, spec)


@FUZZ
@given(field=st.sampled_from(CONFIG_FIELDS), raw=st.sampled_from(RAW_VALUES))
def test_config_texts_beyond_the_encoder(field, raw, workdir, spec):
    directory, pristine = workdir
    text = json.dumps({k: v for k, v in pristine.items() if k != field})
    (directory / "adapter_config.json").write_text(text[:-1] + f', "{field}": {raw}}}')
    check_load(directory, spec)


def _header_entry(draw, offset):
    dtype = draw(st.sampled_from(SAFETENSORS_DTYPES))
    shape = draw(st.lists(st.integers(min_value=-2, max_value=2**40) | st.sampled_from([0, 4, 64]), max_size=3))
    length = draw(st.integers(min_value=0, max_value=2048) | st.sampled_from([2**62, -1]))
    return {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + length]}


@st.composite
def safetensors_bytes(draw):
    names = draw(st.lists(st.sampled_from(TENSOR_NAMES) | st.text(max_size=20), max_size=6, unique=True))
    header, offset = {}, 0
    for name in names:
        header[name] = _header_entry(draw, offset)
        offset = max(offset, header[name]["data_offsets"][1]) if draw(st.booleans()) else offset
    body = json.dumps(header).encode()
    declared = draw(st.sampled_from(["exact", "huge", "random"]))
    length = {"exact": len(body), "huge": 2**63 - 1, "random": draw(st.integers(0, 2**64 - 1))}[declared]
    data = draw(st.binary(max_size=4096))
    return struct.pack("<Q", length) + body + data


@FUZZ
@given(blob=safetensors_bytes() | st.binary(max_size=64))
def test_random_safetensors_files(blob, workdir, spec):
    directory, pristine = workdir
    (directory / "adapter_config.json").write_text(json.dumps(pristine))
    (directory / "adapter_model.safetensors").write_bytes(blob)
    assert check_load(directory, spec) is None


FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OTHER_DTYPES = [torch.int32, torch.int8, torch.bool, torch.float8_e4m3fn, torch.complex64]
SPECIAL = [float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 7e4, 0.0, 1e-40]


def _right_shape(name):
    return (4, 64) if "lora_A" in name else ((32 if "k_proj" in name or "v_proj" in name else 64), 4)


@st.composite
def adapter_tensors(draw):
    """The attn_r4 tensors in one float dtype, at a random scale, with up to two of them damaged:
    another dtype, another shape, or a special value (NaN, Inf, beyond float16) somewhere."""
    dtype, scale = draw(st.sampled_from(FLOAT_DTYPES)), draw(st.sampled_from([0.01, 1.0, 30.0, 1e3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    tensors = {name: torch.randn(_right_shape(name), generator=gen) * scale for name in TENSOR_NAMES}
    for name in draw(st.lists(st.sampled_from(TENSOR_NAMES), max_size=2, unique=True)):
        damage = draw(st.sampled_from(["dtype", "shape", "value"]))
        if damage == "shape":
            tensors[name] = torch.randn(draw(st.lists(st.integers(0, 70), max_size=3)), generator=gen)
        elif damage == "value":
            flat = tensors[name].view(-1)
            flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(SPECIAL))
        else:
            tensors[name] = tensors[name].to(draw(st.sampled_from(OTHER_DTYPES)))
    return {name: t if t.dtype in OTHER_DTYPES else t.to(dtype) for name, t in tensors.items()}


@FUZZ
@given(tensors=adapter_tensors())
def test_random_tensor_dtypes_shapes_and_values(tensors, workdir, spec):
    directory, pristine = workdir
    (directory / "adapter_config.json").write_text(json.dumps(pristine))
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    check_load(directory, spec)
