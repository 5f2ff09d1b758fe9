"""PEFT's `adapter_config.json`, read and type-checked: `read_peft_config()` -> `PeftConfig`.

`PeftConfig` answers the two questions the weights depend on, the way PEFT
does: whether a module key is targeted (target_modules, exclude_modules,
layers_to_transform) and its rank and alpha (rank_pattern, alpha_pattern).
Every problem raises a typed error from `multilora.errors` whose message names
the adapter and never its directory.
"""

import json
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

from multilora.errors import AdapterFormatError, AdapterRankError

CONFIG_FILE = "adapter_config.json"

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


@dataclass(frozen=True)
class PeftConfig:
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
    def from_dict(cls, raw: dict, name: str) -> "PeftConfig":
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


def read_peft_config(directory: str, name: str) -> PeftConfig:
    """Reads and type-checks `directory`/adapter_config.json of adapter `name`; raises AdapterFormatError."""
    return PeftConfig.from_dict(_read_config(directory, name), name)


def check_ranks(config: PeftConfig, name: str, max_lora_rank: int) -> None:
    """Every rank (r and rank_pattern) must lie in 1 .. max_lora_rank; raises AdapterRankError."""
    ranks = [("r", config.r)] + [(f"rank_pattern[{p!r}]", r) for p, r in config.rank_pattern.items()]
    for source, r in ranks:
        if r <= 0:
            raise AdapterRankError(
                f"LoRA rank {r} ({source}) of adapter '{name}' is not positive; fix {CONFIG_FILE}")
        if r > max_lora_rank:
            raise AdapterRankError(
                f"LoRA rank {r} of adapter '{name}' is greater than max_lora_rank {max_lora_rank}; "
                "raise max_lora_rank or use a smaller adapter")


def _read_config(directory: str, name: str) -> dict:
    try:
        with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise AdapterFormatError(
            f"adapter '{name}' has no {CONFIG_FILE}; save it with PEFT's save_pretrained") from None
    except (OSError, ValueError) as exc:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterFormatError(
            f"adapter '{name}' has an unreadable {CONFIG_FILE} ({type(exc).__name__}); "
            "save it again with PEFT's save_pretrained") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"adapter '{name}': {CONFIG_FILE} is not a JSON object; save it again with PEFT")
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
        raise AdapterFormatError(f"adapter '{name}': {key} in {CONFIG_FILE} is {value!r}, not a number; fix it")
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
    raise AdapterFormatError(f"adapter '{name}': {key} in {CONFIG_FILE} must be a list of names or a regex")


def _layer_indexes(raw: dict, name: str):
    value = raw.get("layers_to_transform")
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return value
    raise AdapterFormatError(f"adapter '{name}': layers_to_transform in {CONFIG_FILE} must be layer numbers")


def _pattern(raw: dict, key: str, types, name: str) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise AdapterFormatError(f"adapter '{name}': {key} in {CONFIG_FILE} must be a JSON object")
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
