"""No-server demo: one prompt through the base model and every adapter, in one batch.

    python -m multilora                                   # the built-in demo model and its adapters
    python -m multilora --model DIR --adapters ROOT "prompt" ...
"""

import argparse
import logging
import os

from multilora import LLM, SamplingParams
from multilora.demo_tasks import PROMPT_SUFFIX
from multilora.lora.resolver import AdapterResolver

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", default=["green apple river" + PROMPT_SUFFIX])
    parser.add_argument("--model", default=os.path.join(REPO, "models", "demo-llama"))
    parser.add_argument("--adapters", default=os.path.join(REPO, "models", "demo-adapters"),
                        help="adapter root: every subdirectory is an adapter, served by its name")
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    resolver = AdapterResolver(roots=[args.adapters])
    names = [None] + resolver.list_adapters()
    llm = LLM(args.model, enable_lora=True, max_loras=max(1, len(names) - 1), max_lora_rank=64)
    prompts = [p for p in args.prompts for _ in names]
    loras = [resolver.resolve(n) if n else None for _ in args.prompts for n in names]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0), loras)
    for prompt, lora, out in zip(prompts, loras, outputs):
        print(f"{lora.lora_name if lora else '(base)':>10} | {prompt!r} -> {out.outputs[0].text!r}")


if __name__ == "__main__":
    main()
