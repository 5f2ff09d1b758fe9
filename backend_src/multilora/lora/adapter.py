"""Read and validate a PEFT LoRA checkpoint on the CPU: `load_adapter()` -> `LoRAAdapter`.

Only `adapter_model.safetensors` is read; pickled weights are refused, never
unpickled. `adapter_config.json` is parsed by `multilora.lora.peft_config`.
Adapters are validated as numbers as well as files (see `load_adapter`), so an
adapter that loads cannot overflow its GPU slot or flood the model with NaN.
Every problem with the user's files raises a typed error from
`multilora.errors` whose message names the adapter and never its directory.
"""

import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors import safe_open

from multilora.errors import (
    AdapterCorruptError,
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterScalingError,
    AdapterShapeError,
    AdapterTargetError,
    AdapterWeightsError,
)
from multilora.lora.peft_config import CONFIG_FILE, MAX_LORA_ALPHA, PeftConfig, check_ranks, read_peft_config
from multilora.lora.request import LoRARequest
from multilora.lora.safetensors_groups import read_grouped
from multilora.lora.weight_limits import (DEFAULT_SERVING_DTYPE, MAX_DELTA_NORM, WeightLimits, check_effect,
                                          check_values, frobenius_norms)

logger = logging.getLogger(__name__)

SUPPORTED_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The block each module sits in, as in HF Llama/Mistral/Qwen2 module names.
_MODULE_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}

_WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_CHECKED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)   # checked as they are; others as float32

# Room in a weights file beyond its tensors' data: the JSON header (names, shapes, offsets) and metadata.
_HEADER_ALLOWANCE = 1 << 20
_HEADER_BYTES_PER_TENSOR = 1024

# PEFT saves `base_model.model.<module key>.lora_A.weight`, or with the adapter
# name before `.weight` when saved by hand; the module key is relative to the
# *ForCausalLM model, which is what rank_pattern/alpha_pattern match against.
_TENSOR_NAME = re.compile(r"(?:base_model\.model\.)?(?P<key>.+)\.(?P<ab>lora_A|lora_B)(?:\.[^.]+)?\.weight")
_EMBEDDING_TENSOR = re.compile(r".*\.lora_embedding_[AB](\..*)?")
# At most 6 digits: a layer index never needs more, and int() of a huge digit string is itself slow.
_MODULE_KEY = re.compile(r"(?:model\.)?layers\.(?P<layer>\d{1,6})\.(?P<parent>self_attn|mlp)\.(?P<module>[^.]+)")


@dataclass(frozen=True)
class LoRAModelSpec:
    """What the base model offers LoRA: its layer count and each target module's (in, out) features."""

    num_layers: int
    module_shapes: dict[str, tuple[int, int]]

    @classmethod
    def from_hf_config(cls, config) -> "LoRAModelSpec":
        """From a transformers Llama/Mistral/Qwen2 config; head_dim may be explicit, else hidden / heads."""
        hidden = config.hidden_size
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        inter = config.intermediate_size
        return cls(
            num_layers=config.num_hidden_layers,
            module_shapes={
                "q_proj": (hidden, heads * head_dim),
                "k_proj": (hidden, kv_heads * head_dim),
                "v_proj": (hidden, kv_heads * head_dim),
                "o_proj": (heads * head_dim, hidden),
                "gate_proj": (hidden, inter),
                "up_proj": (hidden, inter),
                "down_proj": (inter, hidden),
            },
        )


@dataclass
class LoRAAdapter:
    """A validated adapter in host memory.

    `weights[(layer, module)] = (A [r, in], B [out, r], scaling)`, float32,
    contiguous, on the CPU; the delta is `scaling * x @ A.T @ B.T`. Layers and
    modules the adapter does not touch are absent.
    """

    name: str
    adapter_id: int
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]

    @property
    def target_modules(self) -> frozenset[str]:
        return frozenset(module for _, module in self.weights)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b, _ in self.weights.values())


def load_adapter(lora_request: LoRARequest, spec: LoRAModelSpec, max_lora_rank: int, *,
                 serving_dtype: Optional[torch.dtype] = None, max_delta_norm: float = MAX_DELTA_NORM,
                 dtype: torch.dtype = torch.float32) -> LoRAAdapter:
    """Reads `lora_request.lora_path` (a PEFT LoRA directory) and checks it against `spec`.

    Besides names, shapes and ranks, the numbers are checked: lora_alpha and
    alpha_pattern finite, positive and at most `peft_config.MAX_LORA_ALPHA`;
    every weight finite and within the range of `serving_dtype` (default
    float16, the narrowest the engine serves); and for each module the
    spectral norm of `scaling * B @ A`, and of `A`, at most `max_delta_norm`
    (default MAX_DELTA_NORM = 1e3): the adapter can change a layer's output
    by at most that many times the input's norm. Raises the
    `multilora.errors.Adapter*Error` that names the problem.
    The weights are kept in `dtype`: the engine passes the model's, which its GPU
    slots hold anyway, so a host copy costs no more than it must.
    """
    start = time.perf_counter()
    name = lora_request.lora_name
    directory = lora_request.lora_path
    if not directory or not os.path.isdir(directory):
        raise AdapterNotFoundError(
            f"adapter '{name}' was not found: its directory does not exist; check the adapter name and roots")
    config = read_peft_config(directory, name)
    check_ranks(config, name, max_lora_rank)
    tensors, owned = _read_tensors(directory, name, _max_weights_bytes(spec, max_lora_rank))
    limits = WeightLimits(torch.finfo(serving_dtype or DEFAULT_SERVING_DTYPE), max_delta_norm)
    weights = _build_weights(config, tensors, spec, name, limits, dtype, owned)
    adapter = LoRAAdapter(name, lora_request.lora_int_id, max(a.shape[0] for a, _, _ in weights.values()), weights)
    logger.info("loaded LoRA adapter '%s' (id %d): rank %d, modules %s, %.2f MiB, %.3f s",
                name, adapter.adapter_id, adapter.rank, sorted(adapter.target_modules),
                adapter.nbytes / 2**20, time.perf_counter() - start)
    return adapter


def _max_weights_bytes(spec: LoRAModelSpec, max_lora_rank: int) -> int:
    """The largest weights file an adapter of this base model can need (every module, float64, max rank)."""
    per_layer = sum(max_lora_rank * (n_in + n_out) for n_in, n_out in spec.module_shapes.values())
    num_tensors = 2 * spec.num_layers * len(spec.module_shapes)
    return 8 * spec.num_layers * per_layer + _HEADER_ALLOWANCE + _HEADER_BYTES_PER_TENSOR * num_tensors


def _read_tensors(directory: str, name: str, max_bytes: int) -> tuple[dict[str, torch.Tensor], bool]:
    """-> (tensor name -> tensor, whether the tensors own their memory rather than map the file's)."""
    path = os.path.join(directory, _WEIGHTS_FILE)
    if not os.path.isfile(path):
        if any(f.endswith(_PICKLED_SUFFIXES) for f in os.listdir(directory)):
            raise AdapterFormatError(
                f"adapter '{name}' has only pickled weights, which are refused because loading them can run "
                f"code; convert them to {_WEIGHTS_FILE} (PEFT save_pretrained(safe_serialization=True))")
        raise AdapterFormatError(f"adapter '{name}' has no {_WEIGHTS_FILE}; save it with PEFT's save_pretrained")
    # Checked before parsing, so neither the header nor the tensors can make us allocate more than this.
    size = os.path.getsize(path)
    if size > max_bytes:
        raise AdapterFormatError(
            f"adapter '{name}': {_WEIGHTS_FILE} is {size / 2**20:.1f} MiB, more than an adapter of rank at most "
            f"max_lora_rank for this base model can need ({max_bytes / 2**20:.1f} MiB); use an adapter trained "
            "for this base model")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            keys = f.keys()
            # A few torch calls per group of same-shaped tensors, where get_tensor makes ~9 per tensor.
            grouped = read_grouped(path, size, keys)
            if grouped is not None:
                return grouped, True
            return {key: f.get_tensor(key) for key in keys}, False
    # The parser is native code fed an untrusted file: whatever it raises (SafetensorError, a dtype torch lacks,
    # an I/O error) means the same thing, a file we cannot read.
    except Exception as exc:
        logger.warning("adapter '%s': cannot parse %s: %s", name, path, exc)
        raise AdapterCorruptError(
            f"adapter '{name}': {_WEIGHTS_FILE} cannot be parsed ({type(exc).__name__}, truncated or not "
            "safetensors); copy or save the adapter again") from None


def _build_weights(config: PeftConfig, tensors: dict[str, torch.Tensor], spec: LoRAModelSpec, name: str,
                   limits: WeightLimits, dtype: torch.dtype, owned: bool):
    """Checks names against the base model, then shapes, dtypes and values; -> LoRAAdapter.weights."""
    halves, unknown = _index_tensors(tensors, name)
    # Report an unsupported module before the stray tensors PEFT saves beside it (lm_head.base_layer.weight).
    for key in halves:
        _check_module(key.rsplit(".", 1)[-1], spec, name)
    if unknown:
        raise AdapterShapeError(
            f"adapter '{name}' holds tensor {_shown_name(unknown[0])}, which is not a LoRA weight of this base "
            "model; use an adapter trained for this base model")
    if not halves:
        raise AdapterFormatError(f"adapter '{name}' holds no LoRA weights; save it again with PEFT")
    modules = {}     # (layer, module) -> (module_key, A, B, A's name, B's name, scaling), checked but for values
    for key, pair in sorted(halves.items()):
        if len(pair) != 2:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise AdapterShapeError(
                f"adapter '{name}' has no {missing} tensor for {_shown_name(key)}; save the complete adapter again")
        layer, module = _locate(key, spec, name)
        if (layer, module) in modules:
            raise AdapterShapeError(
                f"adapter '{name}' holds two sets of weights for layer {layer} {module}; save it again with PEFT")
        # PEFT matched its patterns against the model's own module names, which is this canonical form;
        # matching the file's spelling instead would let a hostile name (long, zero-padded) feed the regexes.
        module_key = f"model.layers.{layer}.{_MODULE_PARENT[module]}.{module}"
        if not config.targets(module_key):
            raise AdapterFormatError(
                f"adapter '{name}' has weights for '{module_key}', which target_modules in {CONFIG_FILE} "
                "does not select; fix target_modules or remove those weights")
        r, alpha = config.rank_and_alpha(module_key)
        in_features, out_features = spec.module_shapes[module]
        a = _checked(tensors[pair["lora_A"]], pair["lora_A"], (r, in_features), name)
        b = _checked(tensors[pair["lora_B"]], pair["lora_B"], (out_features, r), name)
        scaling = alpha / (math.sqrt(r) if config.use_rslora else r)
        if not 0 < scaling <= MAX_LORA_ALPHA:   # follows from the alpha and rank checks; kept as the last word
            raise AdapterScalingError(f"adapter '{name}': the scaling {scaling:g} of '{module_key}' is out of range")
        modules[(layer, module)] = (module_key, a, b, pair["lora_A"], pair["lora_B"], scaling)
    # The values: every tensor's norm in one call (a load runs beside the engine's threads, and each
    # torch call per tensor is one more wait for the GIL), then the per-module limits in Python.
    entries = list(modules.values())
    norms = frobenius_norms([t for _, a, b, _, _, _ in entries for t in (a, b)])
    for i, (module_key, a, b, a_name, b_name, scaling) in enumerate(entries):
        a_norm = check_values(a, _shown_name(a_name), name, limits.finfo, norms[2 * i])
        b_norm = check_values(b, _shown_name(b_name), name, limits.finfo, norms[2 * i + 1])
        check_effect(a, b, scaling, module_key, name, limits.max_delta_norm, a_norm, b_norm)
    # Unless the reader gave them memory of their own, a copy: the adapter never shares the file's.
    kept = _in_dtype([t for _, a, b, _, _, _ in entries for t in (a, b)], dtype, copy=not owned)
    return {key: (kept[2 * i], kept[2 * i + 1], entry[-1]) for i, (key, entry) in enumerate(modules.items())}


def _in_dtype(tensors: list[torch.Tensor], dtype: torch.dtype, copy: bool) -> list[torch.Tensor]:
    """`tensors` in `dtype` and contiguous; those converted (all, if `copy`) are copied with one
    foreach copy per shape into one new stack, not a call or two per tensor."""
    kept = list(tensors)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        if copy or t.dtype != dtype or not t.is_contiguous():
            by_shape.setdefault(tuple(t.shape), []).append(i)
    for shape, indices in by_shape.items():
        rows = torch.empty((len(indices), *shape), dtype=dtype).unbind(0)
        torch._foreach_copy_(list(rows), [tensors[i] for i in indices])
        for i, row in zip(indices, rows):
            kept[i] = row
    return kept


def _index_tensors(tensors, name: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """-> ({module key: {"lora_A": tensor name, "lora_B": tensor name}}, names that are no LoRA weight)."""
    halves: dict[str, dict[str, str]] = {}
    unknown = []
    for tensor_name in tensors:
        if _EMBEDDING_TENSOR.fullmatch(tensor_name):
            raise AdapterTargetError(
                f"adapter '{name}' has LoRA on an embedding layer ({_shown_name(tensor_name)}), which this engine "
                "does not support; retrain it on linear layers only")
        match = _TENSOR_NAME.fullmatch(tensor_name)
        if match is None:
            unknown.append(tensor_name)
        elif match["ab"] in halves.setdefault(match["key"], {}):
            raise AdapterShapeError(
                f"adapter '{name}' holds two {match['ab']} tensors for {_shown_name(match['key'])}; save it again "
                "with PEFT")
        else:
            halves[match["key"]][match["ab"]] = tensor_name
    return halves, unknown


def _check_module(module: str, spec: LoRAModelSpec, name: str) -> None:
    if module not in SUPPORTED_TARGET_MODULES:
        raise AdapterTargetError(
            f"adapter '{name}' targets module {_shown_name(module)}, which this engine does not support "
            f"(supported: {', '.join(SUPPORTED_TARGET_MODULES)}); retrain it on supported modules")
    if module not in spec.module_shapes:
        raise AdapterTargetError(
            f"adapter '{name}' targets module '{module}', which the base model does not have; "
            "use an adapter trained for this base model")


def _locate(key: str, spec: LoRAModelSpec, name: str) -> tuple[int, str]:
    """Module key -> (layer, module) of the base model."""
    match = _MODULE_KEY.fullmatch(key)
    if match is None or match["parent"] != _MODULE_PARENT.get(match["module"]):
        raise AdapterShapeError(
            f"adapter '{name}' has weights for {_shown_name(key)}, which is not a module of this base model; "
            "use an adapter trained for this base model")
    layer = int(match["layer"])
    if layer >= spec.num_layers:
        raise AdapterShapeError(
            f"adapter '{name}' has weights for layer {layer} but the base model has only layers 0 to "
            f"{spec.num_layers - 1}; use an adapter trained for this base model")
    return layer, match["module"]


def _checked(tensor: torch.Tensor, tensor_name: str, shape: tuple[int, int], name: str) -> torch.Tensor:
    """The file's tensor, checked for shape and dtype (its values: `check_values`)."""
    shown = _shown_name(tensor_name)
    if tuple(tensor.shape) != shape:
        raise AdapterShapeError(
            f"adapter '{name}': tensor {shown} has shape {list(tensor.shape)} but this base model and "
            f"the adapter's rank need {list(shape)}; use an adapter trained for this base model")
    if not tensor.is_floating_point():
        raise AdapterWeightsError(
            f"adapter '{name}': tensor {shown} has dtype {tensor.dtype}, not a floating type; "
            "save the adapter in float32, float16 or bfloat16")
    # Other float types (float64, float8) are computed in float32: what overflows it is refused as Inf.
    return tensor if tensor.dtype in _CHECKED_DTYPES else tensor.float()


def _shown_name(text: str) -> str:
    """A tensor or module name from the user's file for a message, cut short so it cannot flood the log."""
    return repr(text if len(text) <= 200 else text[:200] + "...")
