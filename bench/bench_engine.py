"""End-to-end generation throughput: base vs multi-LoRA batches, and multilora vs HF transformers + PEFT.

Builds a model directory at real shapes (default Llama-3-8B) with random weights
(`load_format="dummy"` for our engine, random init for HF), random PEFT-format
adapters, and times the same workload through both. Prompts are token ids, so
no real tokenizer is needed. Prints a table and writes JSON (to $OUT if set).

    python bench/bench_engine.py --requests 64 --prompt-len 128 --output-len 64 --adapters 8
"""

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, rms_norm_eps=1e-5, hidden_act="silu", tie_word_embeddings=False,
                 rope_theta=500000.0, bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_model_dir(path: Path, config: dict) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)


def write_adapter(path: Path, config: dict, rank: int, seed: int) -> None:
    """A PEFT-format LoRA adapter on all seven projections, random A and B."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            group = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{group}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fan_in, generator=gen) / fan_in ** 0.5).bfloat16()
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, rank, generator=gen) * 0.01).bfloat16()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
        "bias": "none", "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}))


def make_workload(args) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 32000) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    adapters = [rng.randrange(args.adapters) for _ in range(args.requests)]
    return prompts, adapters


def run_multilora(model_dir: Path, adapter_dirs: list[Path], prompts, adapter_of, mode: str, args) -> dict:
    from multilora import LLM, LoRARequest, SamplingParams

    llm = run_multilora.llm
    loras = [LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(adapter_dirs)]
    requests = {"base": [None] * len(prompts), "one-adapter": [loras[0]] * len(prompts),
                "mixed": [loras[a] for a in adapter_of]}[mode]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    # Warm-up over the whole batch for 2 tokens: loads the adapters, and the Triton LoRA kernels
    # compile for the timed run's shapes (2048-token prefill chunks, full-batch decode pick other
    # tiles than a 2-prompt warm-up) outside the timing.
    warm = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, warm, requests)
    sync()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, requests)
    sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"engine": "multilora", "mode": mode, "seconds": seconds, "output_tokens": tokens,
            "tokens_per_s": tokens / seconds}


def run_hf_peft(model_dir: Path, adapter_dirs: list[Path], prompts, adapter_of, mode: str, args) -> dict:
    """HF transformers generate(); PEFT's mixed-batch inference via adapter_names."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    if not hasattr(run_hf_peft, "model"):
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("cuda"):
            base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        model = PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name=adapter_dirs[0].name)
        for p in adapter_dirs[1:]:
            model.load_adapter(str(p), adapter_name=p.name)
        run_hf_peft.model = model.eval()
    model = run_hf_peft.model
    names = {"base": ["__base__"] * len(prompts), "one-adapter": [adapter_dirs[0].name] * len(prompts),
             "mixed": [adapter_dirs[a].name for a in adapter_of]}[mode]
    input_ids = torch.tensor(prompts, device="cuda")
    kwargs = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        warm = dict(kwargs, max_new_tokens=2, min_new_tokens=2)  # same warm-up as ours: full batch
        model.generate(input_ids=input_ids, adapter_names=names, **warm)
        sync()
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, adapter_names=names, **kwargs)
        sync()
    seconds = time.perf_counter() - start
    tokens = (out.shape[1] - input_ids.shape[1]) * out.shape[0]
    return {"engine": "hf+peft", "mode": mode, "seconds": seconds, "output_tokens": tokens,
            "tokens_per_s": tokens / seconds}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick runs)")
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()

    config = dict(LLAMA3_8B)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    work = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    model_dir = work / "model"
    write_model_dir(model_dir, config)
    adapter_dirs = [work / f"adapter{i}" for i in range(args.adapters)]
    for i, path in enumerate(adapter_dirs):
        write_adapter(path, config, args.rank, seed=i)
    prompts, adapter_of = make_workload(args)

    from multilora import LLM
    run_multilora.llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", enable_lora=True,
                            max_loras=args.adapters, max_lora_rank=args.rank, max_num_seqs=args.requests,
                            max_num_batched_tokens=max(2048, args.prompt_len * 4))
    results = [run_multilora(model_dir, adapter_dirs, prompts, adapter_of, m, args)
               for m in ("base", "one-adapter", "mixed")]
    del run_multilora.llm
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    if not args.skip_hf and torch.cuda.is_available():
        results += [run_hf_peft(model_dir, adapter_dirs, prompts, adapter_of, m, args)
                    for m in ("base", "one-adapter", "mixed")]

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    report = {"device": device, "args": vars(args), "results": results}
    by = {(r["engine"], r["mode"]): r["tokens_per_s"] for r in results}
    print(f"\n{device}; {args.requests} requests x ({args.prompt_len} prompt + {args.output_len} output) tokens, "
          f"{args.adapters} adapters of rank {args.rank}")
    print(f"{'engine':10} {'mode':12} {'seconds':>8} {'out tok/s':>10} {'vs base':>8}")
    for r in results:
        ratio = r["tokens_per_s"] / by[(r["engine"], "base")]
        print(f"{r['engine']:10} {r['mode']:12} {r['seconds']:8.2f} {r['tokens_per_s']:10.1f} {ratio:8.2f}")
    if ("hf+peft", "mixed") in by:
        print(f"multilora / hf+peft, mixed batch: {by[('multilora', 'mixed')] / by[('hf+peft', 'mixed')]:.2f}x")
    out_dir = Path(os.environ.get("OUT", "bench"))
    (out_dir / "engine.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(main())
