"""Tiny random HF models, PEFT adapters and an HF + PEFT greedy reference.

Everything here is built offline and deterministically from seeds: a byte-level
BPE tokenizer trained on a fixed corpus, tiny Llama / Qwen2 / Mistral models
saved with `save_pretrained` (safetensors), and LoRA adapters saved by PEFT
itself. `greedy_reference` is the ground truth the engine's tests compare to:
a float32, cache-free greedy loop over the HF model with PEFT's LoRA layers
loaded from the adapter directory, one prompt at a time, eos ignored.

Weights are re-initialised at a larger scale than HF's default so that logits
are peaked: greedy outputs then differ between adapters, and the gap between
the best and second-best logit (`GreedyResult.min_margin`) stays far above
float32 noise, so a kernel that computes the same thing in another order picks
the same tokens.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB_SIZE = 300
EOS_TOKEN, BOS_TOKEN = "<|endoftext|>", "<|bos|>"
EOS_ID, BOS_ID = 0, 1
MAX_POSITION_EMBEDDINGS = 128
EMBED_STD_TIED = 0.3
MODEL_KINDS = ("llama", "llama3rope", "qwen2", "mistral")
# Llamas with more heads, for tensor parallelism: (attention heads, KV heads). Not in MODEL_KINDS,
# which the tests of every architecture go through.
HEAD_VARIANTS = {"llama-8h2kv": (8, 2), "llama-8h1kv": (8, 1)}
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_CORPUS = (
    "the quick brown fox jumps over the lazy dog",
    "SELECT name, email FROM users WHERE id = 42 ORDER BY name;",
    "Hello, world! How are you today? I am fine, thank you.",
    "def add(a, b):\n    return a + b",
    "Multi-LoRA serving batches requests for many adapters at once.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16",
)


@dataclass(frozen=True)
class AdapterSpec:
    """How to make one PEFT LoRA adapter: rank, targets, scaling and seed."""

    name: str
    r: int
    target_modules: tuple[str, ...]
    lora_alpha: float
    use_rslora: bool = False
    seed: int = 0


@dataclass(frozen=True)
class GreedyResult:
    """Greedy tokens of one prompt, and the smallest top-1 minus top-2 logit gap met."""

    token_ids: list[int]
    min_margin: float


# ---------------------------------------------------------------- tokenizer


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of exactly VOCAB_SIZE tokens that prepends BOS."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOS_TOKEN, BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE, tok.get_vocab_size()
    assert tok.token_to_id(EOS_TOKEN) == EOS_ID and tok.token_to_id(BOS_TOKEN) == BOS_ID
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )


# ---------------------------------------------------------------- base models


def tiny_config(kind: str, hidden_size: int = 64) -> PretrainedConfig:
    """The HF config of a tiny model of `kind` (one of MODEL_KINDS)."""
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        rms_norm_eps=1e-5,
    )
    if kind == "llama":
        return LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=False)
    if kind in HEAD_VARIANTS:
        heads, kv_heads = HEAD_VARIANTS[kind]
        return LlamaConfig(**{**common, "num_attention_heads": heads, "num_key_value_heads": kv_heads},
                           rope_theta=10000.0, tie_word_embeddings=False)
    if kind == "llama3rope":
        # Llama 3.1-style frequency scaling. original_max_position_embeddings is
        # small so that, at head_dim 16, some frequencies are scaled, some are
        # kept and some are interpolated.
        rope = {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        }
        return LlamaConfig(**{**common, "num_hidden_layers": 3}, rope_scaling=rope, tie_word_embeddings=False)
    if kind == "qwen2":
        # Qwen2: bias on q/k/v (always, in HF's Qwen2), tied embeddings, no sliding window.
        return Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False)
    if kind == "mistral":
        return MistralConfig(**common, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny model kind {kind!r}; expected one of {MODEL_KINDS}")


def _reinit_(model: torch.nn.Module, seed: int) -> None:
    """Deterministic weights, scaled so that logits are peaked (see module doc)."""
    gen = torch.Generator().manual_seed(seed)
    # With tied embeddings a large embedding makes each token's own logit win
    # (the residual carries it to the head), so the model just repeats its input.
    embed_std = EMBED_STD_TIED if model.config.tie_word_embeddings else 1.0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                p.copy_(embed_std * noise)
            else:
                p.copy_(noise * (1.5 / math.sqrt(p.shape[1])))


def _legacy_rope_config(model_dir: Path) -> None:
    """Rewrite config.json's rope fields the way real Llama 3.1 checkpoints spell them.

    transformers 5 saves `rope_parameters`; checkpoints on the Hub carry
    `rope_theta` and `rope_scaling` instead. Both must load to the same model.
    """
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    path.write_text(json.dumps(cfg, indent=2))


def save_tiny_model(kind: str, out_dir: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Save a tiny random model of `kind` and its tokenizer to `out_dir` (safetensors).

    `max_shard_size` (e.g. "40KB") saves several shards plus an index file.
    """
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32)
    _reinit_(model, seed)
    model.generation_config.do_sample = False
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    build_tokenizer().save_pretrained(out_dir)
    if kind == "llama3rope":
        _legacy_rope_config(out_dir)
    return out_dir


def load_hf_model(model_dir: Path) -> torch.nn.Module:
    """The HF model saved in `model_dir`, in float32, in eval mode."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def load_tokenizer(model_dir: Path):
    return AutoTokenizer.from_pretrained(model_dir)


# ---------------------------------------------------------------- adapters


def save_peft_adapter(base: torch.nn.Module | Path, spec: AdapterSpec, out_dir: Path) -> Path:
    """Wrap `base` (a model or a model dir) with a random LoRA and save it with PEFT.

    The saved directory is what PEFT writes: adapter_config.json and
    adapter_model.safetensors. lora_B is random (PEFT's default init makes it
    zero, which would leave the model unchanged).
    """
    from peft import LoraConfig, get_peft_model

    model = load_hf_model(Path(base)) if isinstance(base, (str, Path)) else base
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.lora_alpha,
        target_modules=list(spec.target_modules),
        use_rslora=spec.use_rslora,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                # Unit-variance rows scaled by fan-in keep each delta comparable to the base weight.
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    assert (Path(out_dir) / "adapter_model.safetensors").is_file()
    return Path(out_dir)


# ---------------------------------------------------------------- reference


def load_reference_model(model_dir: Path, adapter_dir: Path | None = None) -> torch.nn.Module:
    """The HF model of `model_dir`, with PEFT's adapter from `adapter_dir` when given.

    Both are read back from disk, so the reference sees the files the engine reads.
    """
    model = load_hf_model(model_dir)
    if adapter_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt_ids: list[int], max_new_tokens: int) -> GreedyResult:
    """Greedy tokens, eos ignored. No KV cache and no padding: each step runs the whole sequence."""
    ids = list(prompt_ids)
    margin = math.inf
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        top2 = torch.topk(logits, 2)
        margin = min(margin, float(top2.values[0] - top2.values[1]))
        ids.append(int(top2.indices[0]))
    return GreedyResult(token_ids=ids[len(prompt_ids):], min_margin=margin)


def greedy_reference(
    model_dir: Path, adapter_dir: Path | None, prompts: list[list[int]], max_new_tokens: int
) -> list[GreedyResult]:
    """HF transformers (+ PEFT when `adapter_dir` is given) greedy tokens, float32, eos ignored."""
    model = load_reference_model(model_dir, adapter_dir)
    return [greedy(model, p, max_new_tokens) for p in prompts]


def copy_adapter(src: Path, dst: Path) -> Path:
    """A writable copy of an adapter dir, to break on purpose."""
    shutil.copytree(src, dst)
    return Path(dst)
