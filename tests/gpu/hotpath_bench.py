"""The engine's hot path on a GPU: how much of a step is host time the GPU waits for.

Llama-3-8B shapes, bf16, random weights, token-id prompts. For synchronous and
async scheduling, base and 8 distinct rank-16 adapters: the decode step's GPU
time alone (one replay of its CUDA graph), the engine thread's time per decode
step (`step_events()`, what AsyncLLMEngine's engine thread runs) and with the
output processor inline (`step()`); and a mixed step (one 512-token prefill
chunk + 63 decode rows). Prints a table last, writes $OUT/hotpath.json.

    python tests/gpu/hotpath_bench.py
"""

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from bench_engine import LLAMA3_8B, write_adapter, write_model_dir  # noqa: E402


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 32000, (n, length), generator=gen).tolist()


def _fill(engine, prompts, loras, max_tokens: int, tag: str) -> None:
    from multilora import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i, (prompt, lora) in enumerate(zip(prompts, loras)):
        engine.add_request(f"{tag}-{i}", prompt, params, lora)
    while engine.scheduler.waiting or any(s.num_computed_tokens < len(s.prompt_token_ids)
                                          for s in engine.scheduler.running):
        engine.step()                       # prefill, then every sequence decodes


def _per_step_ms(step, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / steps


def _graph_ms(runner, batch: int, lora) -> float:
    graphs = runner.decode_graphs
    size = graphs.size_for(batch)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graphs.run(size, lora)
    begin.record()
    for _ in range(10):
        graphs.run(size, lora)
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 10


def _mixed_step_ms(engine, prompt_len: int, loras) -> float:
    """One step holding a whole 512-token prompt beside the running decode rows."""
    from multilora import SamplingParams

    times = []
    for k in range(5):
        engine.add_request(f"mixed-{k}", _prompts(1, prompt_len, 100 + k)[0],
                           SamplingParams(max_tokens=2, ignore_eos=True), loras[0])
        times.append(_per_step_ms(engine.step, 1))
        engine.abort_request(f"mixed-{k}")
    return sorted(times)[len(times) // 2]


def measure(model_dir: Path, loras_all, args, async_scheduling: bool) -> list[dict]:
    from multilora import LLM
    from multilora.lora.mapping import lora_variant

    blocks = args.requests * (-(-(args.context + args.steps * 4 + 64) // 16)) + 64
    llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", enable_lora=True, max_loras=8, max_lora_rank=16,
              max_num_seqs=args.requests, num_kv_blocks=blocks, async_scheduling=async_scheduling)
    engine, rows = llm.llm_engine, []
    for mode, loras in (("base", [None] * args.requests), ("8 adapters", [loras_all[i % 8] for i in range(args.requests)])):
        decode = args.requests - 1
        _fill(engine, _prompts(decode, args.context, 1), loras[:decode], args.steps * 4 + 16, mode)
        # The graph variant the engine picks for these rows (adapter i % 8 on row i).
        lora = lora_variant((i % 8, 1) for i in range(decode)) if loras[0] is not None else None
        row = {"scheduling": "async" if async_scheduling else "sync", "mode": mode,
               "gpu_graph_ms": _graph_ms(engine.runner, decode, lora),
               "engine_thread_ms": _per_step_ms(engine.step_events, args.steps),
               "inline_outputs_ms": _per_step_ms(engine.step, args.steps),
               "mixed_step_ms": _mixed_step_ms(engine, 512, loras[-1:])}
        rows.append(row)
        for i in range(decode):
            engine.abort_request(f"{mode}-{i}")
        while engine.has_unfinished_requests():
            engine.step()
    del llm, engine
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    from multilora import LoRARequest

    work = Path(tempfile.mkdtemp(prefix="hotpath-"))
    write_model_dir(work / "model", LLAMA3_8B)
    loras = []
    for i in range(8):
        write_adapter(work / f"a{i}", LLAMA3_8B, 16, seed=i)
        loras.append(LoRARequest(f"a{i}", i + 1, str(work / f"a{i}")))
    rows = measure(work / "model", loras, args, False) + measure(work / "model", loras, args, True)
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "hotpath.json").write_text(json.dumps({"args": vars(args), "rows": rows,
                                                  "device": torch.cuda.get_device_name()}, indent=2))
    print(f"decode batch {args.requests - 1}, context ~{args.context}; mixed = 512-token prefill + decode rows (ms)")
    print(f"{'scheduling':<10} {'mode':<11} {'GPU graph':>9} {'engine thread':>13} {'inline outputs':>14} "
          f"{'mixed step':>10}")
    for r in rows:
        print(f"{r['scheduling']:<10} {r['mode']:<11} {r['gpu_graph_ms']:9.2f} {r['engine_thread_ms']:13.2f} "
              f"{r['inline_outputs_ms']:14.2f} {r['mixed_step_ms']:10.2f}")


if __name__ == "__main__":
    main()
