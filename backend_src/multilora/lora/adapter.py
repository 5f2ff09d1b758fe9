"""Read and validate a PEFT LoRA checkpoint on the CPU: `load_adapter()` -> `LoRAAdapter`.

Only `adapter_model.safetensors` is read; pickled weights are refused, never
unpickled. Every problem with the user's files raises a typed error from
`multilora.errors` whose message names the adapter and never its directory.
"""

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from multilora.errors import (
    AdapterCorruptError,
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterRankError,
    AdapterShapeError,
    AdapterTargetError,
    AdapterWeightsError,
)
from multilora.lora.request import LoRARequest

logger = logging.getLogger(__name__)

SUPPORTED_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The block each module sits in, as in HF Llama/Mistral/Qwen2 module names.
_MODULE_PARENT = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}

_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# LoraConfig fields that, when set, change the forward pass beyond y += scaling * B(A(x)).
_UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (use_dora)",
    "fan_in_fan_out": "fan_in_fan_out",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QALoRA (use_qalora)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
}

# PEFT saves `base_model.model.<module key>.lora_A.weight`, or with the adapter
# name before `.weight` when saved by hand; the module key is relative to the
# *ForCausalLM model, which is what rank_pattern/alpha_pattern match against.
_TENSOR_NAME = re.compile(r"(?:base_model\.model\.)?(?P<key>.+)\.(?P<ab>lora_A|lora_B)(?:\.[^.]+)?\.weight")
_EMBEDDING_TENSOR = re.compile(r".*\.lora_embedding_[AB](\..*)?")
_MODULE_KEY = re.compile(r"(?:model\.)?layers\.(?P<layer>\d+)\.(?P<parent>self_attn|mlp)\.(?P<module>[^.]+)")


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


def load_adapter(lora_request: LoRARequest, spec: LoRAModelSpec, max_lora_rank: int) -> LoRAAdapter:
    """Reads `lora_request.lora_path` (a PEFT LoRA directory) and checks it against `spec`.

    Raises the `multilora.errors.Adapter*Error` that names the problem.
    """
    start = time.perf_counter()
    name = lora_request.lora_name
    directory = lora_request.lora_path
    if not directory or not os.path.isdir(directory):
        raise AdapterNotFoundError(
            f"adapter '{name}' was not found: its directory does not exist; check the adapter name and roots")
    config = _PeftConfig.from_dict(_read_config(directory, name), name)
    _check_ranks(config, name, max_lora_rank)
    weights = _build_weights(config, _read_tensors(directory, name), spec, name)
    adapter = LoRAAdapter(name, lora_request.lora_int_id, max(a.shape[0] for a, _, _ in weights.values()), weights)
    logger.info("loaded LoRA adapter '%s' (id %d): rank %d, modules %s, %.2f MiB, %.3f s",
                name, adapter.adapter_id, adapter.rank, sorted(adapter.target_modules),
                adapter.nbytes / 2**20, time.perf_counter() - start)
    return adapter


@dataclass(frozen=True)
class _PeftConfig:
    """The LoraConfig fields that decide which weights exist and how they scale, type-checked."""

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: Union[list[str], str, None]      # names, a regex, "all-linear", or None (all)
    exclude_modules: Union[list[str], str, None]
    layers_to_transform: Union[list[int], int, None]
    layers_pattern: Optional[list[str]]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    @classmethod
    def from_dict(cls, raw: dict, name: str) -> "_PeftConfig":
        if raw.get("peft_type") != "LORA":
            raise AdapterFormatError(
                f"adapter '{name}' has peft_type {raw.get('peft_type')!r}; only LORA adapters are served")
        _check_features(raw, name)
        layers_pattern = _names_or_regex(raw, "layers_pattern", name)
        return cls(
            r=_typed(raw, "r", int, name),
            lora_alpha=_typed(raw, "lora_alpha", (int, float), name),
            use_rslora=bool(raw.get("use_rslora")),
            target_modules=_names_or_regex(raw, "target_modules", name),
            exclude_modules=_names_or_regex(raw, "exclude_modules", name),
            layers_to_transform=_layer_indexes(raw, name),
            layers_pattern=[layers_pattern] if isinstance(layers_pattern, str) else layers_pattern,
            rank_pattern=_pattern(raw, "rank_pattern", int, name),
            alpha_pattern=_pattern(raw, "alpha_pattern", (int, float), name),
        )

    def targets(self, key: str) -> bool:
        """Whether PEFT would have put LoRA on module `key` (peft.tuners.tuners_utils.check_target_module_exists)."""
        if _selects(self.exclude_modules, key):
            return False
        if self.target_modules is None or self.target_modules == "all-linear":
            return True
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, key) is not None
        if key in self.target_modules:
            return True
        return _selects(self.target_modules, key) and self._in_transformed_layer(key)

    def _in_transformed_layer(self, key: str) -> bool:
        if self.layers_to_transform is None or self.layers_to_transform == []:
            return True
        patterns = [r".*?\.[^.]*\.(?P<idx>\d+)\."] if not self.layers_pattern else [
            rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\." for p in self.layers_pattern]
        match = next((m for m in (re.match(p, key) for p in patterns) if m), None)
        if match is None:
            return False
        layers = self.layers_to_transform
        return int(match["idx"]) in (layers if isinstance(layers, list) else [layers])

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """Per-module rank and alpha, first matching pattern wins (peft.utils.other.get_pattern_key)."""
        r = next((v for p, v in self.rank_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), self.r)
        alpha = next((v for p, v in self.alpha_pattern.items() if re.match(rf"(.*\.)?({p})$", key)), self.lora_alpha)
        return r, alpha


def _read_config(directory: str, name: str) -> dict:
    try:
        with open(os.path.join(directory, _CONFIG_FILE), encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise AdapterFormatError(
            f"adapter '{name}' has no {_CONFIG_FILE}; save it with PEFT's save_pretrained") from None
    except (OSError, ValueError) as exc:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterFormatError(
            f"adapter '{name}' has an unreadable {_CONFIG_FILE} ({type(exc).__name__}); "
            "save it again with PEFT's save_pretrained") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"adapter '{name}': {_CONFIG_FILE} is not a JSON object; save it again with PEFT")
    return raw


def _check_features(raw: dict, name: str) -> None:
    used = [label for key, label in _UNSUPPORTED_FEATURES.items() if raw.get(key)]
    if raw.get("bias", "none") != "none":
        used.append(f"trained base-layer biases (bias={raw['bias']!r})")
    if used:
        raise AdapterFormatError(
            f"adapter '{name}' uses {', '.join(used)}, which this engine does not support; "
            "retrain it as a plain LoRA adapter")


def _typed(raw: dict, key: str, types, name: str):
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, types):
        raise AdapterFormatError(f"adapter '{name}': {key} in {_CONFIG_FILE} is {value!r}, not a number; fix it")
    return value


def _names_or_regex(raw: dict, key: str, name: str):
    value = raw.get(key)
    if isinstance(value, str) and value.lower() == "all-linear":
        return "all-linear"
    # Module names are valid regexes too, so checking every entry refuses only broken layers_pattern items.
    entries = [value] if isinstance(value, str) else value
    if value is None or (isinstance(entries, list) and all(isinstance(v, str) for v in entries)):
        for entry in entries or ():
            _check_regex(entry, key, name)
        return value
    raise AdapterFormatError(f"adapter '{name}': {key} in {_CONFIG_FILE} must be a list of names or a regex")


def _layer_indexes(raw: dict, name: str):
    value = raw.get("layers_to_transform")
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    raise AdapterFormatError(f"adapter '{name}': layers_to_transform in {_CONFIG_FILE} must be layer numbers")


def _pattern(raw: dict, key: str, types, name: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterFormatError(f"adapter '{name}': {key} in {_CONFIG_FILE} must be a JSON object")
    for pattern, v in value.items():
        _check_regex(pattern, key, name)
        if isinstance(v, bool) or not isinstance(v, types):
            raise AdapterFormatError(f"adapter '{name}': {key}[{pattern!r}] is {v!r}, not a number; fix it")
    return value


def _check_regex(pattern: str, key: str, name: str) -> None:
    try:
        re.compile(pattern)
    except re.error:
        raise AdapterFormatError(
            f"adapter '{name}': {key} holds {pattern!r}, which is not a valid regular expression; fix it") from None


def _selects(names, key: str) -> bool:
    """PEFT's list matching (exact or dotted suffix), or a full-match regex."""
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == n or key.endswith(f".{n}") for n in names)


def _check_ranks(config: _PeftConfig, name: str, max_lora_rank: int) -> None:
    ranks = [("r", config.r)] + [(f"rank_pattern[{p!r}]", r) for p, r in config.rank_pattern.items()]
    for source, r in ranks:
        if r <= 0:
            raise AdapterRankError(
                f"LoRA rank {r} ({source}) of adapter '{name}' is not positive; fix {_CONFIG_FILE}")
        if r > max_lora_rank:
            raise AdapterRankError(
                f"LoRA rank {r} of adapter '{name}' is greater than max_lora_rank {max_lora_rank}; "
                "raise max_lora_rank or use a smaller adapter")


def _read_tensors(directory: str, name: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, _WEIGHTS_FILE)
    if not os.path.isfile(path):
        if any(f.endswith(_PICKLED_SUFFIXES) for f in os.listdir(directory)):
            raise AdapterFormatError(
                f"adapter '{name}' has only pickled weights, which are refused because loading them can run "
                f"code; convert them to {_WEIGHTS_FILE} (PEFT save_pretrained(safe_serialization=True))")
        raise AdapterFormatError(f"adapter '{name}' has no {_WEIGHTS_FILE}; save it with PEFT's save_pretrained")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        logger.warning("adapter '%s': cannot parse %s: %s", name, path, exc)
        raise AdapterCorruptError(
            f"adapter '{name}': {_WEIGHTS_FILE} cannot be parsed ({type(exc).__name__}, truncated or not "
            "safetensors); copy or save the adapter again") from None


def _build_weights(config: "_PeftConfig", tensors: dict[str, torch.Tensor], spec: LoRAModelSpec, name: str):
    """Checks names against the base model, then shapes, dtypes and values; -> LoRAAdapter.weights."""
    halves, unknown = _index_tensors(tensors, name)
    # Report an unsupported module before the stray tensors PEFT saves beside it (lm_head.base_layer.weight).
    for key in halves:
        _check_module(key.rsplit(".", 1)[-1], spec, name)
    if unknown:
        raise AdapterShapeError(
            f"adapter '{name}' holds tensor '{unknown[0]}', which is not a LoRA weight of this base model; "
            "use an adapter trained for this base model")
    if not halves:
        raise AdapterFormatError(f"adapter '{name}' holds no LoRA weights; save it again with PEFT")
    weights = {}
    for key, pair in sorted(halves.items()):
        if len(pair) != 2:
            missing = "lora_B" if "lora_A" in pair else "lora_A"
            raise AdapterShapeError(
                f"adapter '{name}' has no {missing} tensor for '{key}'; save the complete adapter again")
        layer, module = _locate(key, spec, name)
        if not config.targets(key):
            raise AdapterFormatError(
                f"adapter '{name}' has weights for '{key}', which target_modules in {_CONFIG_FILE} "
                "does not select; fix target_modules or remove those weights")
        r, alpha = config.rank_and_alpha(key)
        in_features, out_features = spec.module_shapes[module]
        a = _to_float32(tensors[pair["lora_A"]], pair["lora_A"], (r, in_features), name)
        b = _to_float32(tensors[pair["lora_B"]], pair["lora_B"], (out_features, r), name)
        weights[(layer, module)] = (a, b, alpha / (math.sqrt(r) if config.use_rslora else r))
    return weights


def _index_tensors(tensors, name: str) -> tuple[dict[str, dict[str, str]], list[str]]:
    """-> ({module key: {"lora_A": tensor name, "lora_B": tensor name}}, names that are no LoRA weight)."""
    halves: dict[str, dict[str, str]] = {}
    unknown = []
    for tensor_name in tensors:
        if _EMBEDDING_TENSOR.fullmatch(tensor_name):
            raise AdapterTargetError(
                f"adapter '{name}' has LoRA on an embedding layer ('{tensor_name}'), which this engine does not "
                "support; retrain it on linear layers only")
        match = _TENSOR_NAME.fullmatch(tensor_name)
        if match is None:
            unknown.append(tensor_name)
        elif match["ab"] in halves.setdefault(match["key"], {}):
            raise AdapterShapeError(
                f"adapter '{name}' holds two {match['ab']} tensors for '{match['key']}'; save it again with PEFT")
        else:
            halves[match["key"]][match["ab"]] = tensor_name
    return halves, unknown


def _check_module(module: str, spec: LoRAModelSpec, name: str) -> None:
    if module not in SUPPORTED_TARGET_MODULES:
        raise AdapterTargetError(
            f"adapter '{name}' targets module '{module}', which this engine does not support "
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
            f"adapter '{name}' has weights for '{key}', which is not a module of this base model; "
            "use an adapter trained for this base model")
    layer = int(match["layer"])
    if layer >= spec.num_layers:
        raise AdapterShapeError(
            f"adapter '{name}' has weights for layer {layer} but the base model has only layers 0 to "
            f"{spec.num_layers - 1}; use an adapter trained for this base model")
    return layer, match["module"]


def _to_float32(tensor: torch.Tensor, tensor_name: str, shape: tuple[int, int], name: str) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise AdapterShapeError(
            f"adapter '{name}': tensor '{tensor_name}' has shape {list(tensor.shape)} but this base model and "
            f"the adapter's rank need {list(shape)}; use an adapter trained for this base model")
    if not tensor.is_floating_point():
        raise AdapterWeightsError(
            f"adapter '{name}': tensor '{tensor_name}' has dtype {tensor.dtype}, not a floating type; "
            "save the adapter in float32, float16 or bfloat16")
    # A copy, so the adapter never shares memory with the file it came from.
    out = tensor.to(dtype=torch.float32, copy=True).contiguous()
    if not torch.isfinite(out).all():
        raise AdapterWeightsError(
            f"adapter '{name}': tensor '{tensor_name}' contains NaN or Inf values; fix or retrain the adapter")
    return out
