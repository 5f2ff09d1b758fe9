"""Benchmark the LoRA shrink/expand Triton kernels against their torch twins.

Llama-3-8B projection shapes, bf16, several token counts and adapter mixes. For
each case: kernel time replayed from a CUDA graph (how the engine runs decode)
and eager (includes the launch), the torch twin's time, the HBM floor (bytes of
x, A, B, y that must move / bandwidth), and a correctness check against the twin.
Prints a table and writes JSON to $OUT/lora_kernels.json (else bench/lora_kernels.json).

    python bench/bench_lora_kernels.py                       # H200, full sweep
    python bench/bench_lora_kernels.py --device cpu --dtype float32 --shape-div 64 \\
        --tokens 1,40 --iters 2 --warmup 1                   # smoke test, Triton interpreter
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/timing.py, also when loaded by path
from timing import Timer, to_us  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# (H_in, H_out) of Llama-3-8B's distinct projection shapes.
LAYERS = {"q|o": (4096, 4096), "k|v": (4096, 1024), "gate|up": (4096, 14336), "down": (14336, 4096)}
MIXES = ("uniform", "distinct", "skewed", "base_mix")
TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,16,64,256,1024,8192", help="comma-separated T values")
    p.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated subset of {MIXES}")
    p.add_argument("--layers", default=",".join(LAYERS), help=f"comma-separated subset of {list(LAYERS)}")
    p.add_argument("--slots", type=int, default=16, help="GPU adapter slots S")
    p.add_argument("--rank", type=int, default=64, help="max LoRA rank R")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu runs the kernels in Triton's interpreter (smoke test only)")
    p.add_argument("--shape-div", type=int, default=1, help="divide hidden sizes by this (smoke tests)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--graph-calls", type=int, default=20, help="kernel calls captured per CUDA graph")
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="HBM bytes/s for the floor (H200)")
    return p.parse_args(argv)


def load_kernels(device: str):
    """kernels/lora.py loaded by path, so the bench needs only torch, triton and the repo."""
    if device == "cpu":  # read when the kernels are decorated and when they run
        os.environ["MULTILORA_TRITON_INTERPRET_KERNELS"] = "1"
    name = "multilora_kernels_lora_bench"
    spec = importlib.util.spec_from_file_location(name, REPO / "kernels" / "lora.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_slots(mix: str, num_tokens: int, num_slots: int, device: str) -> torch.Tensor:
    """Token -> slot for one adapter mix; tokens of a slot are scattered, as in a decode batch."""
    gen = torch.Generator().manual_seed(num_tokens)
    spread = torch.arange(num_tokens) % num_slots
    if mix == "uniform":
        slots = torch.zeros(num_tokens, dtype=torch.int64)
    elif mix == "distinct":
        slots = spread
    elif mix == "skewed":  # one hot adapter takes 70% of the tokens
        slots = torch.where(torch.rand(num_tokens, generator=gen) < 0.7, 0, spread)
    else:  # base_mix: a quarter of the tokens use the base model
        slots = torch.where(torch.rand(num_tokens, generator=gen) < 0.25, -1, spread)
    return slots[torch.randperm(num_tokens, generator=gen)].to(torch.int32).to(device)


def floor_bytes(op: str, n_lora: int, n_used: int, num_tokens: int, h_in: int, h_out: int,
                rank: int, elem: int) -> int:
    """Bytes that must cross HBM: adapter tokens' activations, used slots' weights, fp32 buf."""
    if op == "shrink":
        return n_lora * h_in * elem + n_used * rank * h_in * elem + num_tokens * rank * 4
    return n_lora * rank * 4 + n_used * h_out * rank * elem + 2 * n_lora * h_out * elem


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> tuple[bool, float]:
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    return err <= tol * max(1.0, scale), err


def bench_case(k, timer: Timer, args, layer: str, num_tokens: int, mix: str) -> list[dict]:
    dtype, dev, div = getattr(torch, args.dtype), args.device, args.shape_div
    h_in, h_out = (h // div for h in LAYERS[layer])
    s, r = args.slots, args.rank
    slots = make_slots(mix, num_tokens, s, dev)
    meta = k.build_lora_meta(slots, s)
    x = torch.randn(num_tokens, h_in, device=dev, dtype=dtype)
    a = (torch.randn(s, r, h_in, device=dev) / h_in**0.5).to(dtype)
    b = (torch.randn(s, h_out, r, device=dev) / r**0.5).to(dtype)
    scales = torch.rand(s, device=dev) + 0.5
    y0 = torch.randn(num_tokens, h_out, device=dev, dtype=dtype)
    buf_ref = k.lora_shrink_ref(x, a, meta)
    shrink_ok, shrink_err = close(k.lora_shrink(x, a, meta), buf_ref, TOL[dtype])
    y, y_ref = y0.clone(), y0.clone()
    k.lora_expand(y, buf_ref, b, scales, meta)
    k.lora_expand_ref(y_ref, buf_ref, b, scales, meta)
    expand_ok, expand_err = close(y, y_ref, TOL[dtype])

    n_lora = int((slots >= 0).sum())
    n_used = len([v for v in slots.unique().tolist() if v >= 0])
    ops = {
        "shrink": (lambda: k.lora_shrink(x, a, meta), lambda: k.lora_shrink_ref(x, a, meta), shrink_ok, shrink_err),
        # y keeps accumulating across calls: harmless for timing.
        "expand": (lambda: k.lora_expand(y, buf_ref, b, scales, meta),
                   lambda: k.lora_expand_ref(y_ref, buf_ref, b, scales, meta), expand_ok, expand_err),
    }
    rows = []
    for op, (kernel, ref, ok, err) in ops.items():
        nbytes = floor_bytes(op, n_lora, n_used, num_tokens, h_in, h_out, r, x.element_size())
        rows.append(dict(
            layer=layer, op=op, tokens=num_tokens, mix=mix, h_in=h_in, h_out=h_out, slots=s, rank=r,
            used_slots=n_used, lora_tokens=n_lora, dtype=args.dtype,
            kernel_graph_us=to_us(timer.graph([kernel] * args.graph_calls)), kernel_eager_us=to_us(timer(kernel)),
            ref_us=to_us(timer(ref)), floor_us=nbytes / args.bandwidth * 1e6, bytes=nbytes, ok=ok, max_abs_err=err,
        ))
    return rows


def print_table(rows: list[dict], meta_rows: list[dict]) -> None:
    head = f"{'layer':8} {'op':6} {'T':>5} {'mix':9} {'graph_us':>9} {'eager_us':>9} {'ref_us':>9} " \
           f"{'floor_us':>9} {'%floor':>7} {'vs_ref':>7} ok"
    print(head)
    for row in rows:
        best = row["kernel_graph_us"] or row["kernel_eager_us"]
        graph = f"{row['kernel_graph_us']:9.1f}" if row["kernel_graph_us"] is not None else f"{'-':>9}"
        print(f"{row['layer']:8} {row['op']:6} {row['tokens']:5d} {row['mix']:9} {graph} "
              f"{row['kernel_eager_us']:9.1f} {row['ref_us']:9.1f} {row['floor_us']:9.2f} "
              f"{100 * row['floor_us'] / best:6.1f}% {row['ref_us'] / best:6.1f}x {'ok' if row['ok'] else 'FAIL'}")
    print("\nbuild_lora_meta (once per step, eager):")
    for row in meta_rows:
        print(f"  T={row['tokens']:5d} {row['mix']:9} {row['us']:8.1f} us")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu for a smoke test", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.dtype == "bfloat16":
        print("Triton's interpreter mis-reads bfloat16: use --dtype float32 or float16 on cpu", file=sys.stderr)
        return 2
    k = load_kernels(args.device)
    torch.manual_seed(0)
    timer = Timer(args.device, args.warmup, args.iters)
    tokens = [int(t) for t in args.tokens.split(",")]
    mixes, layers = args.mixes.split(","), args.layers.split(",")
    rows, meta_rows = [], []
    for num_tokens in tokens:
        for mix in mixes:
            slots = make_slots(mix, num_tokens, args.slots, args.device)
            meta_rows.append(dict(tokens=num_tokens, mix=mix,
                                  us=to_us(timer(lambda: k.build_lora_meta(slots, args.slots)))))
            for layer in layers:
                rows.extend(bench_case(k, timer, args, layer, num_tokens, mix))
    print_table(rows, meta_rows)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "lora_kernels.json"
    out.write_text(json.dumps(dict(device=device_name, args=vars(args), cases=rows, build_meta=meta_rows), indent=1))
    print(f"\nwrote {out}")
    failed = [r for r in rows if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
