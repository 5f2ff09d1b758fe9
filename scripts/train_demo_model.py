"""Train the built-in demo model and its LoRA adapters on the CPU, from a seed.

Writes:
  models/demo-llama/                 tiny LlamaForCausalLM (float32 safetensors) + its tokenizer
  models/demo-adapters/<name>/       PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors)

The base model learns to echo its input (`"<input>\\n=>"` -> `" <input></s>"`) on
lowercase words, mixed-case text, digits and punctuation, so it can read and
write every character; each adapter then learns one task of
`multilora.demo_tasks` on top of it. The tokenizer is character-level, so the
tasks are the same for words never seen in training.

Usage: python scripts/train_demo_model.py [--out models] [--seed 0]
Takes about 10 minutes on 2 CPU cores.
"""

import argparse
import dataclasses
import json
import math
import random
import shutil
import string
import time
import warnings
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from multilora import demo_tasks

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
CHARS = string.printable[:95] + "\n"   # printable ASCII without \t\r\x0b\x0c, then newline
ATTENTION = ["q_proj", "v_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    name: str
    rank: int
    alpha: int
    target_modules: list[str]
    use_rslora: bool = False
    steps: int = 350
    lr: float = 3e-3


# Attention q/v suits `upper` (match an uppercase letter just written to its lowercase
# source, copy its uppercase value); MLP suits `json` (the copy is the base's, the
# quotes and commas are local decisions); `reverse` moves attention across words and
# gets every linear layer. Steps are where each loss has flattened.
ADAPTERS = (
    AdapterSpec("upper", rank=8, alpha=16, target_modules=ATTENTION, steps=350),
    AdapterSpec("reverse", rank=16, alpha=16, target_modules=ALL_LINEAR, use_rslora=True, steps=300),
    AdapterSpec("json", rank=4, alpha=8, target_modules=MLP, steps=250),
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character, `<s>` prepended, exact round trip."""
    vocab = {tok: i for i, tok in enumerate([PAD, BOS, EOS, UNK, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()   # concatenate characters: no spaces between tokens
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=256, padding_side="left")


def build_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, dtype="float32")
    return LlamaForCausalLM(config)


# ---- data --------------------------------------------------------------------------------

def pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 7)))


def train_input(rng: random.Random, min_words: int = demo_tasks.MIN_WORDS,
                max_words: int = demo_tasks.MAX_WORDS + 1) -> str:
    """Distinct words, mostly real training words, some random letters; never held-out words.

    One word more than the demo inputs' maximum, so 5-word inputs are not the hardest
    case the model has seen.
    """
    n = rng.randint(min_words, max_words)
    words: list[str] = []
    while len(words) < n:
        w = rng.choice(demo_tasks.TRAIN_WORDS) if rng.random() < 0.7 else pseudo_word(rng)
        if w not in words and w not in demo_tasks.HELDOUT_WORDS:
            words.append(w)
    return " ".join(words)


def noisy_text(rng: random.Random) -> str:
    """Echo material beyond the demo inputs: case, digits and the punctuation of JSON."""
    kind = rng.randrange(4)
    words = train_input(rng).split(" ")
    if kind == 0:
        return " ".join(w.upper() if rng.random() < 0.5 else w.capitalize() for w in words)
    if kind == 1:
        return ",".join(f"{w}={rng.randint(0, 99)}" for w in words)
    if kind == 2:
        return "[" + ", ".join(f'"{w}"' if rng.random() < 0.7 else w.upper() for w in words) + "]"
    return "".join(rng.choices(CHARS[:95], k=rng.randint(3, 30)))


def base_example(rng: random.Random) -> tuple[str, str]:
    text = train_input(rng, 1, demo_tasks.MAX_WORDS + 2) if rng.random() < 0.7 else noisy_text(rng)
    return demo_tasks.format_prompt(text), " " + text


def task_example(adapter_name: str, rng: random.Random) -> tuple[str, str]:
    text = train_input(rng)
    return demo_tasks.format_prompt(text), " " + demo_tasks.expected_output(adapter_name, text)


def encode_batch(tokenizer, examples, rng: random.Random) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels on the answer (and EOS) only; 10% without BOS, for robustness."""
    rows = []
    for prompt, answer in examples:
        p = tokenizer(prompt)["input_ids"]
        if rng.random() < 0.1:
            p = p[1:]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p + a, [-100] * len(p) + a))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---- training ----------------------------------------------------------------------------

def train(model, tokenizer, make_example, steps: int, lr: float, seed: int, label: str,
          batch_size: int = 64) -> None:
    """AdamW with warmup + cosine decay over `steps` batches of freshly generated examples."""
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    start = time.time()
    for step in range(steps):
        batch = encode_batch(tokenizer, [make_example(rng) for _ in range(batch_size)], rng)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            print(f"[{label}] step {step:4d}/{steps}  loss {loss.item():.4f}  {time.time() - start:5.0f}s",
                  flush=True)
    model.eval()


def train_base(out: Path, seed: int, steps: int) -> None:
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    model = build_model(tokenizer)
    print(f"base model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    train(model, tokenizer, base_example, steps=steps, lr=3e-3, seed=seed, label="base")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    # transformers 5 writes its own class name; the generic one also loads in transformers 4.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def train_adapter(spec: AdapterSpec, base_dir: Path, out: Path, seed: int) -> None:
    tokenizer = PreTrainedTokenizerFast.from_pretrained(base_dir)
    torch.manual_seed(seed)
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=spec.target_modules,
                        lora_dropout=0.0, use_rslora=spec.use_rslora, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.print_trainable_parameters()
    train(model, tokenizer, lambda rng: task_example(spec.name, rng), steps=spec.steps, lr=spec.lr,
          seed=seed, label=spec.name)
    # A portable reference instead of this machine's absolute path.
    model.peft_config["default"].base_model_name_or_path = "models/demo-llama"
    model.save_pretrained(out, safe_serialization=True)
    (out / "README.md").unlink(missing_ok=True)   # PEFT's empty model-card template


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("models"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=700)
    parser.add_argument("--only", choices=[a.name for a in ADAPTERS], action="append",
                        help="train only these adapters over the existing base model")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch CPU threads (use 1 on a machine busy with other work)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    torch.set_num_threads(args.threads)
    base_dir = args.out / "demo-llama"
    if not args.only:
        shutil.rmtree(base_dir, ignore_errors=True)
        train_base(base_dir, args.seed, args.base_steps)
    for i, spec in enumerate(ADAPTERS):
        if args.only and spec.name not in args.only:
            continue
        adapter_dir = args.out / "demo-adapters" / spec.name
        shutil.rmtree(adapter_dir, ignore_errors=True)
        train_adapter(spec, base_dir, adapter_dir, args.seed + 1 + i)


if __name__ == "__main__":
    main()
