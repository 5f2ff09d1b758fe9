"""Measure the demo model's quality with HF transformers + PEFT (the reference, not our engine).

For each adapter: the share of held-out inputs on which greedy generation gives
exactly the task's answer. For the base model: the share of its outputs that
happen to do each task (should be 0), and the share that echo the input.

Usage: python scripts/eval_demo_model.py [--models models] [-n 200] [--json out.json]
"""

import argparse
import json
import warnings
from pathlib import Path

import torch
import transformers
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from multilora import demo_tasks

MAX_NEW_TOKENS = 64


def load(models_dir: Path):
    """(tokenizer, PeftModel holding every demo adapter under its name) from the shipped files."""
    tokenizer = AutoTokenizer.from_pretrained(models_dir / "demo-llama")
    base = AutoModelForCausalLM.from_pretrained(models_dir / "demo-llama", dtype=torch.float32)
    adapters = models_dir / "demo-adapters"
    first, *rest = demo_tasks.ADAPTER_NAMES
    model = PeftModel.from_pretrained(base, str(adapters / first), adapter_name=first)
    for name in rest:
        model.load_adapter(str(adapters / name), adapter_name=name)
    return tokenizer, model.eval()


@torch.no_grad()
def generate(tokenizer, model, prompts: list[str], batch_size: int = 64) -> list[str]:
    """Greedy completions (special tokens dropped) of `prompts` with the currently active adapter."""
    outputs = []
    for i in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, padding_side="left")
        ids = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = ids[:, batch["input_ids"].shape[1]:]
        outputs += tokenizer.batch_decode(new, skip_special_tokens=True)
    return outputs


def evaluate(tokenizer, model, inputs: list[str]) -> dict:
    """{"adapters": {name: exact share}, "base": {"echo": share, name: share doing that task}, "failures": [...]}"""
    prompts = [demo_tasks.format_prompt(x) for x in inputs]
    result: dict = {"n": len(inputs), "adapters": {}, "base": {}, "failures": []}
    for name in demo_tasks.ADAPTER_NAMES:
        model.set_adapter(name)
        outs = generate(tokenizer, model, prompts)
        ok = [demo_tasks.check(name, x, o) for x, o in zip(inputs, outs)]
        result["adapters"][name] = sum(ok) / len(ok)
        result["failures"] += [(name, x, o) for x, o, good in zip(inputs, outs, ok) if not good]
    with model.disable_adapter():
        outs = generate(tokenizer, model, prompts)
    for name in (None, *demo_tasks.ADAPTER_NAMES):
        share = sum(demo_tasks.check(name, x, o) for x, o in zip(inputs, outs)) / len(inputs)
        result["base"][name or "echo"] = share
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("-n", type=int, default=200, help="held-out inputs per adapter")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    torch.set_num_threads(2)
    tokenizer, model = load(args.models)
    result = evaluate(tokenizer, model, demo_tasks.heldout_inputs(args.n, args.seed))
    print(f"{'adapter':10s} {'exact':>8s} {'base does it':>13s}   ({result['n']} held-out inputs)")
    for name, share in result["adapters"].items():
        print(f"{name:10s} {share:8.1%} {result['base'][name]:13.1%}")
    print(f"{'(base)':10s} echo {result['base']['echo']:.1%}")
    for name, x, out in result["failures"][:10]:
        print(f"  miss [{name}] {x!r} -> {out!r}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
