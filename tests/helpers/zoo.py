"""TinyZoo: the session's tiny models, adapters and cached HF + PEFT references.

Built lazily under one root directory, so a test pays only for what it uses
and the whole session builds each model, adapter and reference once. Other
test folders get it through the `tiny_zoo` fixture of tests/conftest.py.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from .tiny_models import (
    ALL_TARGETS,
    HEAD_VARIANTS,
    MODEL_KINDS,
    VOCAB_SIZE,
    AdapterSpec,
    GreedyResult,
    copy_adapter,
    greedy,
    load_hf_model,
    load_reference_model,
    load_tokenizer,
    save_peft_adapter,
    save_tiny_model,
    tiny_config,
)

Prompt = Union[str, list[int]]
ALL_KINDS = MODEL_KINDS + tuple(HEAD_VARIANTS)

# Rank, targets and scaling differ between adapters so that each engine path
# (attention only, MLP only, all seven modules with rsLoRA, tiny rank) is used.
ADAPTERS = {
    "sql": AdapterSpec("sql", r=4, target_modules=("q_proj", "v_proj"), lora_alpha=8, seed=1),
    "chat": AdapterSpec("chat", r=8, target_modules=("gate_proj", "up_proj", "down_proj"), lora_alpha=16, seed=2),
    "code": AdapterSpec("code", r=16, target_modules=ALL_TARGETS, lora_alpha=16, use_rslora=True, seed=3),
    "kv": AdapterSpec("kv", r=2, target_modules=("k_proj", "o_proj"), lora_alpha=4, seed=4),
}

# Adapters that an engine with max_lora_rank=16 must refuse, by the error they must raise.
BROKEN_ADAPTERS = ("rank_too_high", "missing", "other_base", "bin_only", "target_lm_head",
                   "target_embed_tokens", "truncated", "nan")

SHORT_PROMPTS: tuple[Prompt, ...] = (
    "Hello, world!",
    "SELECT name FROM users WHERE",
    "the quick brown fox",
    [5, 17, 42, 99, 123, 7],
)

# Each greedy step of every reference must beat the runner-up logit by this
# much; far above float32 noise, so an engine that is right cannot differ.
MIN_MARGIN = 1e-3


def long_prompt(length: int, seed: int = 0) -> list[int]:
    """A deterministic prompt of `length` token ids (no special tokens)."""
    rng = random.Random(seed)
    return [rng.randrange(2, VOCAB_SIZE) for _ in range(length)]


class TinyZoo:
    """Tiny models by kind (MODEL_KINDS, and the HEAD_VARIANTS of Llama) and their adapters."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._refs: dict[tuple, GreedyResult] = {}

    # ------------------------------------------------------------ models
    @functools.cache
    def model_dir(self, kind: str) -> Path:
        assert kind in ALL_KINDS, kind
        # The plain Llama is saved in shards, so the index file is read too.
        shard = "40KB" if kind == "llama" else None
        return save_tiny_model(kind, self.root / kind, seed=ALL_KINDS.index(kind), max_shard_size=shard)

    @functools.cache
    def tokenizer(self, kind: str):
        return load_tokenizer(self.model_dir(kind))

    def prompt_ids(self, kind: str, prompt: Prompt) -> list[int]:
        """The token ids the engine must see for `prompt` (HF tokenizer, special tokens added)."""
        return list(prompt) if isinstance(prompt, list) else self.tokenizer(kind)(prompt)["input_ids"]

    # ------------------------------------------------------------ adapters
    @functools.cache
    def adapter_dir(self, kind: str, name: str) -> Path:
        return save_peft_adapter(self.model_dir(kind), ADAPTERS[name], self.root / f"{kind}-adapters" / name)

    def lora_request(self, kind: str, name: str):
        """The LoRARequest of a standard adapter; ids are unique across kinds."""
        from multilora import LoRARequest

        int_id = 100 * (ALL_KINDS.index(kind) + 1) + list(ADAPTERS).index(name) + 1
        return LoRARequest(name, int_id, str(self.adapter_dir(kind, name)))

    @functools.cache
    def broken_adapter_dir(self, case: str) -> Path:
        """A Llama adapter broken in the way `case` (one of BROKEN_ADAPTERS) names."""
        assert case in BROKEN_ADAPTERS, case
        out = self.root / "broken" / case
        return _BROKEN_BUILDERS[case](self, out)

    # ------------------------------------------------------------ references
    def reference(self, kind: str, adapter: Optional[str], prompt: Prompt, max_tokens: int) -> list[int]:
        """HF (+ PEFT) greedy tokens for `prompt`, eos ignored; cached for the session."""
        ids = self.prompt_ids(kind, prompt)
        key = (kind, adapter, tuple(ids), max_tokens)
        if key not in self._refs:
            result = greedy(self._reference_model(kind, adapter), ids, max_tokens)
            assert result.min_margin >= MIN_MARGIN, (
                f"reference for {kind}/{adapter}/{prompt!r} has a near-tie (top-2 logit gap "
                f"{result.min_margin:.2e}); pick another prompt or seed so the comparison is meaningful")
            self._refs[key] = result
        return list(self._refs[key].token_ids)

    @functools.cache
    def _reference_model(self, kind: str, adapter: Optional[str]):
        adapter_dir = None if adapter is None else self.adapter_dir(kind, adapter)
        return load_reference_model(self.model_dir(kind), adapter_dir)


# ---------------------------------------------------------------- broken adapters


def _rank_too_high(zoo: TinyZoo, out: Path) -> Path:
    spec = AdapterSpec("big", r=32, target_modules=("q_proj", "v_proj"), lora_alpha=32, seed=5)
    return save_peft_adapter(zoo.model_dir("llama"), spec, out)


def _missing(zoo: TinyZoo, out: Path) -> Path:
    return out  # never created


def _other_base(zoo: TinyZoo, out: Path) -> Path:
    # Same architecture and module names, hidden size 32 instead of 64.
    from transformers import AutoModelForCausalLM

    torch.manual_seed(7)
    other = AutoModelForCausalLM.from_config(tiny_config("llama", hidden_size=32), dtype=torch.float32)
    return save_peft_adapter(other, ADAPTERS["sql"], out)


def _bin_only(zoo: TinyZoo, out: Path) -> Path:
    # Arbitrary bytes under the pickle name: the engine must refuse it by name,
    # and nothing here is a real pickle that anyone could load.
    copy_adapter(zoo.adapter_dir("llama", "sql"), out)
    (out / "adapter_model.safetensors").unlink()
    (out / "adapter_model.bin").write_bytes(b"not a pickle; the engine must never unpickle adapters")
    return out


def _target(module: str):
    def build(zoo: TinyZoo, out: Path) -> Path:
        spec = AdapterSpec(f"target-{module}", r=4, target_modules=("q_proj", module), lora_alpha=8, seed=6)
        return save_peft_adapter(load_hf_model(zoo.model_dir("llama")), spec, out)

    return build


def _truncated(zoo: TinyZoo, out: Path) -> Path:
    copy_adapter(zoo.adapter_dir("llama", "sql"), out)
    weights = out / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return out


def _nan(zoo: TinyZoo, out: Path) -> Path:
    copy_adapter(zoo.adapter_dir("llama", "sql"), out)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    name = sorted(k for k in tensors if "lora_B" in k)[0]
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    return out


_BROKEN_BUILDERS = {
    "rank_too_high": _rank_too_high,
    "missing": _missing,
    "other_base": _other_base,
    "bin_only": _bin_only,
    "target_lm_head": _target("lm_head"),
    "target_embed_tokens": _target("embed_tokens"),
    "truncated": _truncated,
    "nan": _nan,
}
