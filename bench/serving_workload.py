"""bench/serving.py's workload: who asks what, when, for which adapter; and the files it needs.

Conventions (stated so that a rerun means the same thing):
- Popularity: Zipf over adapter ranks. Adapter k (k = 1..N) is asked with probability
  proportional to k**-alpha (alpha 0 = uniform; 1 = the classic Zipf). Before that, a request
  goes to the base model with probability `base_share`. S-LoRA's "power law" workloads use the
  same form with its own alpha.
- LoRA ranks cycle through `ranks` by adapter index (adapter k has ranks[(k - 1) % len]), so every
  popularity band mixes ranks.
- Lengths: a spec "A" is fixed, "A:B" uniform over the integers A..B (inclusive). Prompts are
  random token ids (no tokenizer on the client), outputs run to their drawn length (ignore_eos).
- Arrivals: a closed loop keeps `concurrency` requests in flight; with `rate`, arrivals are
  Poisson (exponential gaps of mean 1/rate seconds) and nothing bounds the number in flight.
Everything comes from one seed.
"""

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# Llama-3-8B's shapes (the weights are random: load_format="dummy").
LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                 rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16")
# The smoke configuration: seconds on a CPU.
TINY = dict(LLAMA3_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
            torch_dtype="float32")
PRESETS = {"llama3-8b": LLAMA3_8B, "tiny": TINY}
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parse_range(spec: str) -> tuple[int, int]:
    """'128' -> (128, 128); '64:512' -> (64, 512)."""
    lo, _, hi = str(spec).partition(":")
    lo, hi = int(lo), int(hi or lo)
    if not 1 <= lo <= hi:
        raise ValueError(f"length spec {spec!r}: expected A or A:B with 1 <= A <= B")
    return lo, hi


@dataclass(frozen=True)
class Workload:
    num_adapters: int
    ranks: tuple[int, ...] = (8, 16, 64)
    alpha: float = 1.0
    base_share: float = 0.0
    prompt_len: tuple[int, int] = (128, 128)
    output_len: tuple[int, int] = (128, 128)
    num_requests: int = 256
    concurrency: Optional[int] = 64      # closed loop; None when `rate` is set
    rate: Optional[float] = None         # Poisson arrivals per second
    seed: int = 0

    def __post_init__(self):
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) and rate (Poisson arrivals)")
        if not 0.0 <= self.base_share <= 1.0:
            raise ValueError(f"base_share must be in [0, 1], got {self.base_share}")
        if self.num_adapters < 0 or (self.num_adapters == 0 and self.base_share < 1.0):
            raise ValueError("with no adapters every request is a base request: set base_share 1")

    def rank_of(self, adapter_index: int) -> int:
        return self.ranks[adapter_index % len(self.ranks)]

    def describe(self) -> str:
        load = f"concurrency {self.concurrency}" if self.rate is None else f"Poisson {self.rate:g} req/s"
        return (f"{self.num_requests} requests, {self.num_adapters} adapters (ranks {'/'.join(map(str, self.ranks))}, "
                f"Zipf alpha {self.alpha:g}, base share {self.base_share:g}), prompt {_span(self.prompt_len)}, "
                f"output {_span(self.output_len)} tokens, {load}, seed {self.seed}")


@dataclass(frozen=True)
class BenchRequest:
    index: int
    adapter_index: Optional[int]   # None = base model
    prompt_ids: list[int]
    output_len: int
    arrival_s: Optional[float]     # offset from the start (Poisson), None in a closed loop


def adapter_name(index: int) -> str:
    return f"a{index:04d}"


def make_requests(workload: Workload, vocab_size: int, seed_offset: int = 0) -> list[BenchRequest]:
    rng = random.Random(workload.seed * 1_000_003 + seed_offset)
    weights = [(k + 1) ** -workload.alpha for k in range(workload.num_adapters)]
    requests, clock = [], 0.0
    for i in range(workload.num_requests):
        adapter = None
        if workload.num_adapters and rng.random() >= workload.base_share:
            adapter = rng.choices(range(workload.num_adapters), weights)[0]
        prompt = [rng.randrange(3, vocab_size) for _ in range(rng.randint(*workload.prompt_len))]
        arrival = None
        if workload.rate is not None:
            clock += rng.expovariate(workload.rate)
            arrival = clock
        requests.append(BenchRequest(i, adapter, prompt, rng.randint(*workload.output_len), arrival))
    return requests


def _span(r: tuple[int, int]) -> str:
    return str(r[0]) if r[0] == r[1] else f"{r[0]}-{r[1]}"


# ---- files ------------------------------------------------------------------------------

def write_model_dir(path: Path, preset: str) -> Path:
    """config.json + a tokenizer of the preset's full vocabulary; no weights (load_format="dummy")."""
    config = PRESETS[preset]
    if (path / "config.json").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    bos, eos = _write_tokenizer(path, config)
    # config.json last: its presence marks a complete directory (reused by later runs).
    (path / "config.json").write_text(json.dumps(dict(config, bos_token_id=bos, eos_token_id=eos), indent=1))
    return path


def _write_tokenizer(path: Path, config: dict) -> tuple[int, int]:
    """Writes a tokenizer of exactly vocab_size tokens; returns its (bos, eos) ids."""
    from transformers import AutoTokenizer

    try:
        from full_vocab_tokenizer import write_full_vocab_tokenizer    # bench/ (branch decodebench)
    except ImportError:
        write_full_vocab_tokenizer = None
    if write_full_vocab_tokenizer is not None:
        write_full_vocab_tokenizer(str(path), config["vocab_size"])
    else:
        _write_word_tokenizer(path, config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == config["vocab_size"], (len(tokenizer), config["vocab_size"])
    return tokenizer.bos_token_id, tokenizer.eos_token_id


def _write_word_tokenizer(path: Path, config: dict) -> None:
    """Fallback: a word-level vocabulary of the full size; every id decodes to a short word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {"<unk>": 0, "<s>": config["bos_token_id"], "</s>": config["eos_token_id"]}
    taken = set(specials.values())
    vocab = dict(specials)
    vocab.update({f"w{i}": i for i in range(config["vocab_size"]) if i not in taken})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """Each target module's (in_features, out_features)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (hidden // config["num_attention_heads"])
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
            "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def _write_weights(path: Path, config: dict, rank: int, seed: int) -> None:
    """Random PEFT LoRA weights (bf16) on all seven projections; small enough that the adapter's
    effect stays well inside any sane validation bound (|scale * B @ A| of order 0.1)."""
    import torch
    from safetensors.torch import save_file

    # Drawn on the GPU when there is one: a rank-64 8B adapter is 168M numbers.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in module_shapes(config).items():
            group = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            a = torch.randn(rank, fan_in, generator=gen, device=device) / fan_in ** 0.5
            b = torch.randn(fan_out, rank, generator=gen, device=device) * (0.1 / (fan_out * rank) ** 0.5)
            tensors[f"{prefix}.lora_A.weight"] = a.bfloat16().cpu()
            tensors[f"{prefix}.lora_B.weight"] = b.bfloat16().cpu()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def write_adapters(root: Path, preset: str, workload: Workload, unique_files: int) -> Path:
    """`root/<adapter_name(k)>/` for k < num_adapters: PEFT checkpoints at the model's real shapes.

    Writing a thousand 8B-shaped adapters would take tens of GB and minutes, so at most
    `unique_files` weight files per rank are drawn and hard-linked into the adapter
    directories. Each adapter still has its own name, id and load (the engine never
    deduplicates by content); only disk and page cache are shared.
    """
    config = PRESETS[preset]
    weights = root.parent / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    for k in range(workload.num_adapters):
        rank = workload.rank_of(k)
        directory = root / adapter_name(k)
        if (directory / "adapter_model.safetensors").is_file():
            continue
        directory.mkdir(parents=True, exist_ok=True)
        draw = (k // len(workload.ranks)) % unique_files
        source = weights / f"{preset}-r{rank}-{draw}.safetensors"
        if not source.is_file():
            _write_weights(source, config, rank, seed=1000 * rank + draw)
        try:
            os.link(source, directory / "adapter_model.safetensors")
        except OSError:
            shutil.copyfile(source, directory / "adapter_model.safetensors")
        (directory / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(TARGET_MODULES),
            "bias": "none", "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}))
    return root
