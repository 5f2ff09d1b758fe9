"""PEFT's `adapter_config.json`, read and type-checked: `read_peft_config()` -> `PeftConfig`.

`PeftConfig` answers the two questions the weights depend on, the way PEFT
does: whether a module key is targeted (target_modules, exclude_modules,
layers_to_transform) and its rank and alpha (rank_pattern, alpha_pattern).
Every problem raises a typed error from `multilora.errors` whose message names
the adapter and never its directory.
"""

import json
import math
import os
import re
import reprlib
from dataclasses import dataclass, field
from typing import Optional, Union

from multilora.errors import AdapterFormatError, AdapterPatternError, AdapterRankError, AdapterScalingError
from multilora.lora.safe_regex import MATCH_BUDGET_S, InvalidPattern, MatchDeadline, PatternRefused, check_pattern

CONFIG_FILE = "adapter_config.json"
# PEFT writes about 1 KiB; a rank_pattern over every module of a large model stays far below this.
MAX_CONFIG_BYTES = 1 << 20
# Trained adapters use alpha up to a few times their rank (a few thousand at most); above this the
# scaling alone would dwarf the base model's outputs.
MAX_LORA_ALPHA = 1e6
# rank_pattern / alpha_pattern entries: one per module of a 128-layer model fits with room to spare.
MAX_PATTERN_ENTRIES = 4096

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
    """The LoraConfig fields that decide which weights exist and how they scale, type-checked.

    Regexes are checked by `multilora.lora.safe_regex` when read and share one
    matching deadline, which starts when the config is read (at the load).
    """

    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: Union[list[str], str, None]      # names, a regex, "all-linear", or None (all)
    exclude_modules: Union[list[str], str, None]
    layers_to_transform: Union[list[int], int, None]
    layers_pattern: Optional[list[str]]
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    adapter_name: str = field(default="", compare=False)
    _compiled: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _deadline: MatchDeadline = field(default_factory=MatchDeadline, init=False, repr=False, compare=False)

    @classmethod
    def from_dict(cls, raw: dict, name: str) -> "PeftConfig":
        if raw.get("peft_type") != "LORA":
            raise AdapterFormatError(
                f"adapter '{name}' has peft_type {_shown(raw.get('peft_type'))}; only LORA adapters are served")
        _check_features(raw, name)
        layers_pattern = _names_or_regex(raw, "layers_pattern", name, always_regex=True)
        return cls(
            r=_typed(raw, "r", int, name),
            lora_alpha=_alpha(_typed(raw, "lora_alpha", (int, float), name), "lora_alpha", name),
            use_rslora=_flag(raw, "use_rslora", name),
            target_modules=_names_or_regex(raw, "target_modules", name),
            exclude_modules=_names_or_regex(raw, "exclude_modules", name),
            layers_to_transform=_layer_indexes(raw, name),
            layers_pattern=[layers_pattern] if isinstance(layers_pattern, str) else layers_pattern,
            rank_pattern=_pattern(raw, "rank_pattern", int, name),
            alpha_pattern={p: _alpha(v, f"alpha_pattern[{_shown(p)}]", name)
                           for p, v in _pattern(raw, "alpha_pattern", (int, float), name).items()},
            adapter_name=name,
        )

    def targets(self, key: str) -> bool:
        """Whether PEFT would have put LoRA on module `key` (peft.tuners.tuners_utils.check_target_module_exists)."""
        if self._selects(self.exclude_modules, key):
            return False
        if self.target_modules is None or self.target_modules == "all-linear":
            return True
        if isinstance(self.target_modules, str):
            return self._match("", self.target_modules, "", key, full=True) is not None
        if key in self.target_modules:
            return True
        return self._selects(self.target_modules, key) and self._in_transformed_layer(key)

    def _in_transformed_layer(self, key: str) -> bool:
        if self.layers_to_transform is None or self.layers_to_transform == []:
            return True
        if not self.layers_pattern:
            match = self._match("", r".*?\.[^.]*\.(?P<idx>\d+)\.", "", key)
        else:
            match = next((m for m in (self._match(r"(?:^|.*?\.)", p, r"\.(?P<idx>\d+)\.", key)
                                      for p in self.layers_pattern) if m), None)
        if match is None:
            return False
        layers = self.layers_to_transform
        return int(match["idx"]) in (layers if isinstance(layers, list) else [layers])

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """Per-module rank and alpha, first matching pattern wins (peft.utils.other.get_pattern_key)."""
        r = next((v for p, v in self.rank_pattern.items() if self._match(r"(.*\.)?(", p, ")$", key)), self.r)
        alpha = next((v for p, v in self.alpha_pattern.items() if self._match(r"(.*\.)?(", p, ")$", key)),
                     self.lora_alpha)
        return r, alpha

    def _selects(self, names, key: str) -> bool:
        """PEFT's list matching (exact or dotted suffix), or a full-match regex."""
        if not names:
            return False
        if isinstance(names, str):
            return self._match("", names, "", key, full=True) is not None
        return any(key == n or key.endswith(f".{n}") for n in names)

    def _match(self, before: str, pattern: str, after: str, key: str, full: bool = False):
        """`re.match` (or fullmatch) of before + pattern + after, a pattern checked when read, under the deadline."""
        if self._deadline.expired():
            raise AdapterPatternError(
                f"adapter '{self.adapter_name}': matching the regexes in {CONFIG_FILE} against the model's modules "
                f"took longer than {MATCH_BUDGET_S:g} s; use fewer or simpler patterns")
        compiled = self._compiled.get((before, pattern, after))
        if compiled is None:
            try:
                compiled = re.compile(before + pattern + after)
            except (re.error, RecursionError):
                raise AdapterPatternError(
                    f"adapter '{self.adapter_name}': the regex {_shown(pattern)} in {CONFIG_FILE} cannot be used "
                    "as PEFT uses it; fix it") from None
            self._compiled[(before, pattern, after)] = compiled
        return compiled.fullmatch(key) if full else compiled.match(key)


def read_peft_config(directory: str, name: str) -> PeftConfig:
    """Reads and type-checks `directory`/adapter_config.json of adapter `name`; raises an AdapterError."""
    return PeftConfig.from_dict(_read_config(directory, name), name)


def check_ranks(config: PeftConfig, name: str, max_lora_rank: int) -> None:
    """Every rank (r and rank_pattern) must lie in 1 .. max_lora_rank; raises AdapterRankError."""
    ranks = [("r", config.r)] + [(f"rank_pattern[{_shown(p)}]", r) for p, r in config.rank_pattern.items()]
    for source, r in ranks:
        if r <= 0:
            raise AdapterRankError(
                f"LoRA rank {_shown(r)} ({source}) of adapter '{name}' is not positive; fix {CONFIG_FILE}")
        if r > max_lora_rank:
            raise AdapterRankError(
                f"LoRA rank {_shown(r)} of adapter '{name}' is greater than max_lora_rank {max_lora_rank}; "
                "raise max_lora_rank or use a smaller adapter")


def _read_config(directory: str, name: str) -> dict:
    try:
        with open(os.path.join(directory, CONFIG_FILE), "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise AdapterFormatError(
            f"adapter '{name}' has no {CONFIG_FILE}; save it with PEFT's save_pretrained") from None
    except OSError as exc:
        raise AdapterFormatError(
            f"adapter '{name}' has an unreadable {CONFIG_FILE} ({type(exc).__name__}); "
            "save it again with PEFT's save_pretrained") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise AdapterFormatError(
            f"adapter '{name}': {CONFIG_FILE} is larger than {MAX_CONFIG_BYTES // 1024} KiB; save it again with PEFT")
    try:
        raw = json.loads(data.decode("utf-8"))
    # JSONDecodeError, UnicodeDecodeError and too many digits are ValueErrors; deep nesting is a RecursionError.
    except (ValueError, RecursionError) as exc:
        raise AdapterFormatError(
            f"adapter '{name}' has an unreadable {CONFIG_FILE} ({type(exc).__name__}); "
            "save it again with PEFT's save_pretrained") from None
    if not isinstance(raw, dict):
        raise AdapterFormatError(f"adapter '{name}': {CONFIG_FILE} is not a JSON object; save it again with PEFT")
    return raw


def _shown(value) -> str:
    """A value from the user's file for a message: short, whatever its size or nesting."""
    return reprlib.repr(value)


def _check_features(raw: dict, name: str) -> None:
    used = [label for key, label in _UNSUPPORTED_FEATURES.items() if raw.get(key)]
    if raw.get("bias", "none") != "none":
        used.append(f"trained base-layer biases (bias={_shown(raw['bias'])})")
    if used:
        raise AdapterFormatError(
            f"adapter '{name}' uses {', '.join(used)}, which this engine does not support; "
            "retrain it as a plain LoRA adapter")


def _typed(raw: dict, key: str, types, name: str):
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, types):
        raise AdapterFormatError(f"adapter '{name}': {key} in {CONFIG_FILE} is {_shown(value)}, not a number; fix it")
    return value


def _alpha(value, source: str, name: str) -> float:
    """A finite alpha in (0, MAX_LORA_ALPHA]; NaN, Infinity (JSON allows both here), 0 and negatives are refused."""
    try:
        alpha = float(value)
    except OverflowError:       # an integer too large for a float
        alpha = math.inf
    if not (math.isfinite(alpha) and 0 < alpha <= MAX_LORA_ALPHA):
        raise AdapterScalingError(
            f"adapter '{name}': {source} in {CONFIG_FILE} is {_shown(value)}; it must be a finite number "
            f"greater than 0 and at most {MAX_LORA_ALPHA:g}; fix it or retrain the adapter")
    return alpha


def _flag(raw: dict, key: str, name: str) -> bool:
    value = raw.get(key)
    if value is not None and not isinstance(value, bool):
        raise AdapterFormatError(f"adapter '{name}': {key} in {CONFIG_FILE} is {_shown(value)}, not true or false")
    return bool(value)


def _names_or_regex(raw: dict, key: str, name: str, always_regex: bool = False):
    """A regex string, "all-linear", None, or a list of names (checked as regexes only if `always_regex`)."""
    value = raw.get(key)
    if isinstance(value, str) and value.lower() == "all-linear":
        return "all-linear"
    if isinstance(value, str):
        _check_regex(value, key, name)
        return value
    if value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        for entry in value if always_regex and value else ():
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
    if len(value) > MAX_PATTERN_ENTRIES:
        raise AdapterPatternError(
            f"adapter '{name}': {key} in {CONFIG_FILE} has {len(value)} entries, more than {MAX_PATTERN_ENTRIES}; "
            "merge them into fewer patterns")
    for pattern, v in value.items():
        _check_regex(pattern, key, name)
        if isinstance(v, bool) or not isinstance(v, types):
            raise AdapterFormatError(
                f"adapter '{name}': {key}[{_shown(pattern)}] is {_shown(v)}, not a number; fix it")
    return value


def _check_regex(pattern: str, key: str, name: str) -> None:
    try:
        check_pattern(pattern)
    except InvalidPattern:
        raise AdapterFormatError(
            f"adapter '{name}': {key} holds {_shown(pattern)}, which is not a valid regular expression; "
            "fix it") from None
    except PatternRefused as refused:
        raise AdapterPatternError(
            f"adapter '{name}': the regex {_shown(pattern)} in {key} {refused}; this server refuses patterns that "
            "could take long to match (see multilora.lora.safe_regex); use module names or a simpler regex") from None
