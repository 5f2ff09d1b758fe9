"""A tiny random Llama and PEFT adapters for it, made offline in seconds.

`make serve` uses them until a trained default model is present, and the
server tests use them as their model. Everything is built locally: a
byte-level BPE tokenizer trained on a few built-in sentences, a Llama with
random weights, and LoRA adapters with random (non-zero) B matrices so that
each adapter visibly changes the output. The same seed gives the same files.

    python scripts/make_random_model.py OUT_DIR [--adapters upper,reverse,json]
prints the model directory and the adapter root it wrote.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

from multilora.demo_tasks import ADAPTER_NAMES

# A few sentences are enough to give the tokenizer real merges; byte-level BPE
# encodes any text, so prompts outside this corpus still work.
_CORPUS = [
    "SELECT name, price FROM products WHERE price > 10 ORDER BY price DESC;",
    "Hello! How are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "Roses are red, violets are blue, sugar is sweet, and so are you.",
    "Multi-LoRA serving lets one base model answer with many adapters at once.",
    "def add(a, b):\n    return a + b\n",
    "green apple river\n=> GREEN APPLE RIVER",
]
VOCAB_SIZE = 384
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The trained demo model's adapter names, so that clients work the same against either.
DEFAULT_ADAPTERS = ADAPTER_NAMES
MARKER = ".multilora-random-model"   # tells a generated directory from a user's model


def make_tokenizer(out_dir: str):
    """Train a byte-level BPE tokenizer on the built-in corpus and save it as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return fast


def make_model(out_dir: str, seed: int = 0) -> str:
    """Write a 2-layer random Llama (float32, safetensors) with its tokenizer to `out_dir`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(out_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        # A wide init gives well-separated logits, so greedy decoding does not
        # flip between near-ties under batch-dependent float rounding.
        initializer_range=0.2, tie_word_embeddings=False, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        # Damp the end-of-sequence logit: a random model would otherwise stop
        # after a few tokens, and streams need some length to be worth testing.
        model.lm_head.weight[tokenizer.eos_token_id] *= 0.3
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def make_adapter(model_dir: str, out_dir: str, seed: int, rank: int = 8) -> str:
    """Write a PEFT LoRA adapter for `model_dir` with random A and B (PEFT would start B at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGET_MODULES, lora_dropout=0.0)
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.15)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _point_adapters_at(adapter_root: str, model_dir: str):
    """Adapters were saved next to a temporary model; record the final model path instead."""
    for name in os.listdir(adapter_root):
        path = os.path.join(adapter_root, name, "adapter_config.json")
        with open(path) as f:
            config = json.load(f)
        config["base_model_name_or_path"] = model_dir
        with open(path, "w") as f:
            json.dump(config, f, indent=2)


def _made_with(out_dir: str):
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def make_random_model(out_dir: str, adapters=DEFAULT_ADAPTERS, seed: int = 0) -> tuple[str, str]:
    """Create `<out_dir>/model` and `<out_dir>/adapters/<name>`; returns (model_dir, adapter_root).

    Written to a temporary directory and renamed into place, so a crash never
    leaves a half-written model that a later run would take as complete.
    """
    model_dir, adapter_root = os.path.join(out_dir, "model"), os.path.join(out_dir, "adapters")
    if _made_with(out_dir) == {"seed": seed, "adapters": list(adapters)}:
        return model_dir, adapter_root
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a few tiny files: bars would only clutter the launcher's output
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".random-model-", dir=parent)
    try:
        make_model(os.path.join(tmp, "model"), seed)
        for i, name in enumerate(adapters):
            make_adapter(os.path.join(tmp, "model"), os.path.join(tmp, "adapters", name), seed + 1 + i)
        if adapters:
            _point_adapters_at(os.path.join(tmp, "adapters"), os.path.abspath(model_dir))
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({"seed": seed, "adapters": list(adapters)}, f)
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir, adapter_root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--adapters", default=",".join(DEFAULT_ADAPTERS), help="comma-separated adapter names")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    names = [n for n in args.adapters.split(",") if n]
    model_dir, adapter_root = make_random_model(args.out_dir, names, args.seed)
    print(f"model:        {model_dir}\nadapter root: {adapter_root} ({', '.join(names)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
