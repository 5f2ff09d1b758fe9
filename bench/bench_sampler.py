"""The sampler's cost: greedy vs sampled (temperature 0.8, top_p 0.9, top_k 50, half the rows seeded).

Issue 7 asks the sampled step to cost at most 1.05x the greedy step (H200, batch 64, vocab 128256).
Part 1 times the sampler alone on bf16 logits [batch, vocab] with CUDA events (median): a call from
SampleRows, and with the rows packed ahead (`SamplingTensors`); the host time to issue a call (no
sync) shows what a CUDA-graph replay in front of it would hide. It also checks on the device that
seeded rows draw exactly the tokens of the former per-row sampler (tests/helpers/per_row_sampler.py)
and that a call never synchronises (torch.cuda.set_sync_debug_mode("error")).
Part 2 (CUDA only; --no-engine skips it) times whole engine decode steps both ways: Llama-3-8B
shapes, dummy bf16 weights, batch 64, ~512 tokens of context, a tokenizer of the full vocabulary;
each step synchronised, median. The table is printed last; JSON goes to $OUT/sampler.json.

    python bench/bench_sampler.py                                              # H200, ~2 minutes
    python bench/bench_sampler.py --device cpu --batch 8 --vocab 1000 --no-engine --iters 3   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from timing import Timer  # noqa: E402

SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=50)
TARGET_RATIO = 1.05


def sample_rows(batch: int, sampled: bool):
    from multilora.sampler import SampleRow, derive_step_seed
    from multilora.sampling_params import SamplingParams

    if not sampled:
        return [SampleRow(SamplingParams(temperature=0.0), None) for _ in range(batch)]
    params = SamplingParams(**SAMPLED)
    return [SampleRow(params, derive_step_seed(i, 7) if i % 2 == 0 else None) for i in range(batch)]


def host_ms(fn, iters: int) -> float:
    """Median host time to issue fn (the device may still be running it)."""
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return statistics.median(times)


def never_syncs(fn) -> bool | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError:
        return False
    finally:
        torch.cuda.set_sync_debug_mode(0)


def bench_sampler_alone(args) -> dict:
    from helpers.per_row_sampler import PerRowSampler
    from multilora.sampler import Sampler, SamplingTensors

    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    logits = (torch.randn(args.batch, args.vocab, device=device, generator=gen) * 2.5).to(dtype)
    sampler, timer = Sampler(), Timer(device.type, args.warmup, args.iters)
    result = {}
    for name, sampled in (("greedy", False), ("sampled", True)):
        rows = sample_rows(args.batch, sampled)
        packed = SamplingTensors.build(rows, args.vocab, device)
        result[name] = {
            "gpu_ms": timer(lambda: sampler(logits, rows)),
            "gpu_ms_packed_ahead": timer(lambda: sampler.sample(logits, packed)),
            "host_ms": host_ms(lambda: sampler(logits, rows), args.iters),
            "never_syncs": never_syncs(lambda: sampler(logits, rows)),
        }
    rows = sample_rows(args.batch, True)
    got = sampler(logits, rows).tolist()
    want = PerRowSampler()(logits, rows)
    seeded = [i for i, row in enumerate(rows) if row.step_seed is not None]
    result["seeded_rows"] = len(seeded)
    result["seeded_rows_as_per_row_sampler"] = sum(got[i] == want[i] for i in seeded)
    result["delta_ms"] = result["sampled"]["gpu_ms"] - result["greedy"]["gpu_ms"]
    return result


def write_model_dir(path: Path, vocab: int) -> None:
    """Llama-3-8B's config.json and a word-level tokenizer of its whole vocabulary (ids decode to text)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from bench_engine import LLAMA3_8B

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(dict(LLAMA3_8B, vocab_size=vocab)))
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<unk>")),
                                        bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)


def decode_step_ms(llm, sampled: bool, args) -> list[float]:
    """Synchronised wall time of each decode step of a batch of args.batch requests."""
    from multilora import SamplingParams

    engine, gen = llm.llm_engine, torch.Generator().manual_seed(1)
    for i in range(args.batch):
        seed = i if sampled and i % 2 == 0 else None
        params = SamplingParams(max_tokens=args.steps + 10, ignore_eos=True, seed=seed,
                                **(SAMPLED if sampled else dict(temperature=0.0)))
        prompt = torch.randint(3, args.vocab, (args.context,), generator=gen).tolist()
        engine.add_request(f"{'sampled' if sampled else 'greedy'}-{i}", prompt, params)
    for _ in range(10_000):                    # prefill (chunked) and a few warm-up decode steps
        if all(len(s.output_token_ids) >= 3 for s in engine.scheduler.running) and not engine.scheduler.waiting:
            break
        engine.step()
    times = []
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    while engine.has_unfinished_requests():
        engine.step()
    return times


def bench_engine_step(args) -> dict:
    from multilora import LLM

    model_dir = Path(tempfile.mkdtemp(prefix="bench-sampler-")) / "model"
    write_model_dir(model_dir, args.vocab)
    llm = LLM(str(model_dir), load_format="dummy", dtype="bfloat16", enable_lora=False, max_num_seqs=args.batch,
              max_num_batched_tokens=8192)
    decode_step_ms(llm, False, args)           # warm-up: graphs, allocator
    result = {}
    for name, sampled in (("greedy", False), ("sampled", True)):
        result[name] = {"median_ms": statistics.median(decode_step_ms(llm, sampled, args))}
    result["ratio"] = result["sampled"]["median_ms"] / result["greedy"]["median_ms"]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--context", type=int, default=512, help="prompt tokens per request (engine part)")
    parser.add_argument("--steps", type=int, default=30, help="timed decode steps per setting (engine part)")
    parser.add_argument("--no-engine", action="store_true", help="skip the engine decode steps")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; use --device cpu", file=sys.stderr)
        return 2

    alone = bench_sampler_alone(args)
    engine = None if args.no_engine or args.device != "cuda" else bench_engine_step(args)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = dict(device=device_name, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), args=vars(args),
                  sampler=alone, engine=engine)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else HERE
    (out_dir / "sampler.json").write_text(json.dumps(report, indent=1))

    g, s = alone["greedy"], alone["sampled"]
    print(f"\n{device_name}; batch {args.batch}, vocab {args.vocab}; sampled = {SAMPLED}, half the rows seeded")
    print(f"{'sampler alone (median)':34} {'greedy':>9} {'sampled':>9} {'delta':>9}")
    for key, label in (("gpu_ms", "GPU ms (CUDA events)"), ("gpu_ms_packed_ahead", "GPU ms, rows packed ahead"),
                       ("host_ms", "host ms to issue (no sync)")):
        print(f"  {label:32} {g[key]:9.3f} {s[key]:9.3f} {s[key] - g[key]:+9.3f}")
    print(f"  never synchronises: greedy {g['never_syncs']}, sampled {s['never_syncs']}; seeded rows as the "
          f"per-row sampler: {alone['seeded_rows_as_per_row_sampler']}/{alone['seeded_rows']}")
    if engine is not None:
        verdict = "PASS" if engine["ratio"] <= TARGET_RATIO else "FAIL"
        print(f"engine decode step (Llama-3-8B dummy, context {args.context}): greedy "
              f"{engine['greedy']['median_ms']:.2f} ms, sampled {engine['sampled']['median_ms']:.2f} ms, "
              f"ratio {engine['ratio']:.3f} (target <= {TARGET_RATIO}): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
