"""Where a decode step's time goes: per-step wall time for base and mixed-adapter batches, and the
top GPU kernels of a mixed step (torch.profiler). Llama-3-8B shapes, random weights.

    python bench/profile_decode_step.py --requests 64 --adapters 8
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import LLAMA3_8B, make_workload, write_adapter, write_model_dir  # noqa: E402


def decode_step_times(llm, prompts, loras, steps: int) -> list[float]:
    from multilora import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True)
    for i, (prompt, lora) in enumerate(zip(prompts, loras)):
        engine.add_request(f"p{time.time()}-{i}", prompt, params, lora)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()                                   # prefill
    torch.cuda.synchronize()
    decode_step_times.prefill_seconds = time.perf_counter() - start
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    while engine.has_unfinished_requests():
        engine.step()
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    args.output_len = args.steps

    from multilora import LLM, LoRARequest

    work = Path(tempfile.mkdtemp(prefix="profile-decode-"))
    write_model_dir(work / "model", LLAMA3_8B)
    dirs = [work / f"adapter{i}" for i in range(args.adapters)]
    for i, d in enumerate(dirs):
        write_adapter(d, LLAMA3_8B, args.rank, seed=i)
    prompts, adapter_of = make_workload(args)
    llm = LLM(str(work / "model"), load_format="dummy", dtype="bfloat16", enable_lora=True, max_loras=args.adapters,
              max_lora_rank=args.rank, max_num_seqs=args.requests)
    loras = [LoRARequest(d.name, i + 1, str(d)) for i, d in enumerate(dirs)]
    modes = {"base": [None] * len(prompts), "mixed": [loras[a] for a in adapter_of]}
    report = {}
    for mode, requests in modes.items():
        decode_step_times(llm, prompts, requests, 4)    # warm-up
        times = sorted(decode_step_times(llm, prompts, requests, args.steps))
        report[mode] = {"median_ms": 1e3 * times[len(times) // 2], "min_ms": 1e3 * times[0],
                        "prefill_ms": 1e3 * decode_step_times.prefill_seconds}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        decode_step_times(llm, prompts, modes["mixed"], 5)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    print(table)
    print(f"decode step, {args.requests} sequences: " +
          ", ".join(f"{m} {r['median_ms']:.1f} ms (min {r['min_ms']:.1f})" for m, r in report.items()))
    print(f"prefill of {args.requests} x {args.prompt_len} tokens: " +
          ", ".join(f"{m} {r['prefill_ms']:.0f} ms" for m, r in report.items()))
    print(f"mixed / base: {report['mixed']['median_ms'] / report['base']['median_ms']:.2f}; "
          f"weights floor 3.3 ms")
    out = Path(os.environ.get("OUT", "bench"))
    (out / "decode_step.json").write_text(json.dumps({"args": vars(args), "steps": report, "profile": table}, indent=2))


if __name__ == "__main__":
    main()
