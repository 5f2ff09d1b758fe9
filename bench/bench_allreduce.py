"""The collectives of a tensor-parallel decode step (issue 10), timed alone on N GPUs.

A decode step of a model split over N ranks runs 2 * layers all-reduces of [batch, hidden] (after
o_proj and after down_proj, inside the decode CUDA graph), one gather of the logits [batch, V/N] to
rank 0 and one broadcast of the batch's sampled ids. This times each the way the engine runs it
(torch.distributed, NCCL with NVLink multicast off, as engine/tp_worker.py sets it up): the
all-reduce eager and replayed from a CUDA graph, the gather and broadcast eager; and adds them up
per decode step, to set beside `bench/decode_step.py --engine-arg tensor_parallel_size=N`.

    mkdir -p /tmp/pp && ln -sfn $PWD/kernels /tmp/pp/multilora_kernels
    PYTHONPATH=$PWD/backend_src:/tmp/pp python3 bench/bench_allreduce.py --tp 2      # 2 GPUs, Llama-3-8B shapes
    ... bench/bench_allreduce.py --tp 2 --batch 1,16,64,256
    ... bench/bench_allreduce.py --tiny        # CPU, gloo, tiny shapes (the smoke test)

Writes $OUT/bench_allreduce.json (--out to choose the folder); prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import LLAMA3_8B  # noqa: E402
from timing import Timer, to_us  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, vocab_size=1024)


def measure(rank: int, size: int, store: str, shapes: dict, batches: list[int], iters: int, results) -> None:
    """Every rank runs the same collectives; rank 0 times them and puts its report on `results`."""
    cuda = torch.cuda.is_available() and not shapes.get("cpu")
    if cuda:
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=size,
                            timeout=timedelta(seconds=300))
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = Timer("cuda" if cuda else "cpu", warmup=5, iters=iters)
    hidden, layers, vocab_part = shapes["hidden_size"], shapes["num_hidden_layers"], -(-shapes["vocab_size"] // size)
    rows = []
    for batch in batches:
        x = torch.randn(batch, hidden, dtype=dtype, device=device)
        logits = torch.randn(batch, vocab_part, dtype=dtype, device=device)
        parts = [torch.empty_like(logits) for _ in range(size)] if rank == 0 else None
        ids = torch.zeros(batch, dtype=torch.long, device=device)
        all_reduce = to_us(timer(lambda: dist.all_reduce(x)))
        in_graph = to_us(timer.graph([lambda: dist.all_reduce(x)] * (2 * layers)))
        gather = to_us(timer(lambda: dist.gather(logits, parts, dst=0)))
        broadcast = to_us(timer(lambda: dist.broadcast(ids, src=0)))
        per_step = 2 * layers * (in_graph if in_graph is not None else all_reduce) + gather + broadcast
        rows.append(dict(batch=batch, all_reduce_us=all_reduce, all_reduce_in_graph_us=in_graph,
                         logits_gather_us=gather, ids_broadcast_us=broadcast, collectives_per_decode_step_us=per_step))
    if rank == 0:
        name = torch.cuda.get_device_name(device) if cuda else "cpu"
        results.put(dict(device=name, tensor_parallel_size=size, dtype=str(dtype), hidden=hidden, layers=layers,
                         vocab_per_rank=vocab_part, rows=rows))
    dist.destroy_process_group()


def run(size: int, shapes: dict, batches: list[int], iters: int) -> dict:
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory(prefix="bench-allreduce-") as work:
        processes = [context.Process(target=measure, args=(r, size, f"{work}/store", shapes, batches, iters, results))
                     for r in range(size)]
        for p in processes:
            p.start()
        report = results.get(timeout=600)
        for p in processes:
            p.join(60)
    return report


def print_report(report: dict) -> None:
    print(f"\n{report['device']} x {report['tensor_parallel_size']}, {report['dtype']}, hidden {report['hidden']}, "
          f"{report['layers']} layers, {report['vocab_per_rank']} logit columns per rank (microseconds)")
    print(f"{'batch':>6} {'all-reduce':>11} {'in graph':>9} {'gather':>8} {'bcast':>7} {'per step':>9}")
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    for r in report["rows"]:
        print(f"{r['batch']:>6} {fmt(r['all_reduce_us']):>11} {fmt(r['all_reduce_in_graph_us']):>9} "
              f"{fmt(r['logits_gather_us']):>8} {fmt(r['ids_broadcast_us']):>7} "
              f"{fmt(r['collectives_per_decode_step_us']):>9}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2, help="ranks (GPUs) (default 2)")
    parser.add_argument("--batch", default="64", help="decode batch sizes, comma-separated (default 64)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="CPU, gloo, tiny shapes, few iterations")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of bench_allreduce.json ($OUT)")
    args = parser.parse_args(argv)
    shapes = dict(TINY, cpu=True) if args.tiny else {k: LLAMA3_8B[k] for k in TINY}
    batches = [int(b) for b in args.batch.split(",")]
    began = time.perf_counter()
    report = run(args.tp, shapes, batches, 3 if args.tiny else args.iters)
    report.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), wall_s=time.perf_counter() - began)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_allreduce.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    return report


if __name__ == "__main__":
    main()
