"""serving.json: the engine settings and where the adapters are.

    {"engine":   {...},   # one-to-one onto multilora.EngineConfig (EngineConfig.from_dict)
     "adapters": {"roots": [dir, ...], "registry": "multi_lora.json", "hub_cache_dir": null}}

Relative paths are relative to the file's own directory, so a model
repository that sits next to its model and adapters can be moved as a whole.
"""

import json
import os
from dataclasses import dataclass
from typing import Optional

FILENAME = "serving.json"
_PATH_KEYS_IN_ENGINE = ("model", "tokenizer")
_ADAPTER_KEYS = {"roots", "registry", "hub_cache_dir"}


@dataclass(frozen=True)
class ServingConfig:
    engine: dict                  # EngineConfig.from_dict input, paths made absolute
    adapter_roots: list[str]
    registry: Optional[str]       # a multi_lora.json (vllm_backend format); it may appear later
    hub_cache_dir: Optional[str]


def load_serving_config(model_dir: str) -> ServingConfig:
    """Read `<model_dir>/serving.json`; raises ValueError naming what is wrong."""
    path = os.path.join(model_dir, FILENAME)
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: start the server with scripts/serve.py, "
                         "or write one (see docs/serving.md)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    unknown = set(raw) - {"engine", "adapters"}
    if unknown or not isinstance(raw.get("engine"), dict):
        raise ValueError(f"{path}: needs an \"engine\" object and optionally \"adapters\"; "
                         f"unknown keys: {sorted(unknown)}")
    adapters = raw.get("adapters") or {}
    if set(adapters) - _ADAPTER_KEYS:
        raise ValueError(f"{path}: unknown \"adapters\" keys {sorted(set(adapters) - _ADAPTER_KEYS)}; "
                         f"known: {sorted(_ADAPTER_KEYS)}")
    base = os.path.dirname(os.path.abspath(path))
    engine = dict(raw["engine"])
    for key in _PATH_KEYS_IN_ENGINE:
        if engine.get(key):
            engine[key] = _absolute(base, engine[key])
    roots = adapters.get("roots") or []
    if isinstance(roots, str):
        roots = [roots]
    return ServingConfig(
        engine=engine,
        adapter_roots=[_absolute(base, r) for r in roots],
        registry=_absolute(base, adapters["registry"]) if adapters.get("registry") else None,
        hub_cache_dir=_absolute(base, adapters["hub_cache_dir"]) if adapters.get("hub_cache_dir") else None,
    )


def _absolute(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))
