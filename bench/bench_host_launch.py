"""Host time to issue each kernel of an eager layer, beside its GPU time: what binds a prefill chunk.

A decode step replays CUDA graphs, but a prefill chunk's layers run eagerly: the host issues every
kernel, one Python call and one launch each. On the H200 the step of one 512-token chunk plus 63
decode rows took 17 ms in some processes and 29 ms in others of the same code (bench/RESULTS.md,
2026-12-04), with one fused norm's launch costing the host 50-89 us. This bench times, at a chunk's
size (Llama-3-8B widths, bf16), each call a layer makes: the host's microseconds per call (calls
issued back to back, no sync; the GPU runs behind) and the GPU's (replayed from a CUDA graph, so no
launch cost). Where host > GPU, a layer of such calls is bound by the host. The per-layer sum is the
layer's own: 4 projections, 2 norms, rotary + KV write, SiLU-and-mul (attention left out).

    python bench/bench_host_launch.py                       # H200, seconds
    python bench/bench_host_launch.py --tiny                # CPU smoke (torch twins; no GPU column)

The table is printed last; JSON goes to $OUT/bench_host_launch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from decode_step import LLAMA3_8B, TINY_MODEL  # noqa: E402
from step_floors import ModelShapes  # noqa: E402
from timing import Timer, to_us  # noqa: E402


def layer_calls(tokens: int, shape: ModelShapes, device: str, dtype: torch.dtype) -> dict:
    """name -> (callable, calls per layer): the eager layer's calls on inputs of `tokens` rows."""
    from multilora_kernels.activation import silu_and_mul
    from multilora_kernels.norm import fused_add_rms_norm
    from multilora_kernels.rotary import rotary_kv_write

    h, inter = shape.hidden, shape.intermediate
    heads, kv_heads, head_dim = shape.heads, shape.kv_heads, shape.head_dim
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    kw = dict(device=device, dtype=dtype)
    x, residual, weight = torch.randn(tokens, h, **kw), torch.randn(tokens, h, **kw), torch.ones(h, **kw)
    qkv = torch.randn(tokens, q_size + 2 * kv_size, **kw)
    gate_up = torch.randn(tokens, 2 * inter, **kw)
    act = torch.randn(tokens, inter, **kw)
    w_qkv, w_o = torch.randn(q_size + 2 * kv_size, h, **kw), torch.randn(h, q_size, **kw)
    w_gate_up, w_down = torch.randn(2 * inter, h, **kw), torch.randn(h, inter, **kw)
    angles = torch.rand(tokens, head_dim // 2, device=device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    block_size = 16
    kv_cache = torch.zeros(2, -(-tokens // block_size), block_size, kv_heads, head_dim, **kw)
    slot_mapping = torch.arange(tokens, device=device)
    q = qkv[:, :q_size].view(tokens, heads, head_dim)
    k = qkv[:, q_size:q_size + kv_size].view(tokens, kv_heads, head_dim)
    v = qkv[:, q_size + kv_size:].view(tokens, kv_heads, head_dim)
    return {
        "qkv_proj (F.linear)": (lambda: F.linear(x, w_qkv), 1),
        "o_proj (F.linear)": (lambda: F.linear(x, w_o), 1),
        "gate_up_proj (F.linear)": (lambda: F.linear(x, w_gate_up), 1),
        "down_proj (F.linear)": (lambda: F.linear(act, w_down), 1),
        "residual add + RMSNorm": (lambda: fused_add_rms_norm(x, residual, weight, 1e-5), 2),
        "rotary + KV write": (lambda: rotary_kv_write(q, k, v, cos, sin, kv_cache, slot_mapping), 1),
        "SiLU-and-mul": (lambda: silu_and_mul(gate_up), 1),
        "torch.empty_like (a torch op's floor)": (lambda: torch.empty_like(x), 0),
    }


def host_us(fn, iters: int, sync) -> float:
    """Microseconds of host time per call, `iters` calls back to back (the GPU may run behind)."""
    for _ in range(3):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    seconds = time.perf_counter() - start
    sync()
    return seconds / iters * 1e6


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="rows per call (a prefill chunk's tokens)")
    parser.add_argument("--iters", type=int, default=200, help="calls per host measurement")
    parser.add_argument("--tiny", action="store_true", help="tiny widths on the CPU (the smoke test)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of bench_host_launch.json ($OUT)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shape = ModelShapes.from_hf_config(TINY_MODEL if args.tiny else LLAMA3_8B)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    timer = Timer(device, warmup=3, iters=10)
    rows = []
    with torch.inference_mode():
        for name, (fn, per_layer) in layer_calls(args.tokens, shape, device, dtype).items():
            rows.append({"call": name, "per_layer": per_layer, "host_us": host_us(fn, args.iters, sync),
                         "gpu_us": to_us(timer.graph([fn] * 8))})
    layer = [r for r in rows if r["per_layer"]]
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
              "tokens": args.tokens, "shape": asdict(shape), "rows": rows,
              "layer_host_us": sum(r["host_us"] * r["per_layer"] for r in layer),
              "layer_gpu_us": (sum(r["gpu_us"] * r["per_layer"] for r in layer) if device == "cuda" else None),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_host_launch.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    return report


def print_report(report: dict) -> None:
    print(f"\n{report['device']}, {report['dtype']}, {report['tokens']} tokens a call (hidden {report['shape']['hidden']})")
    print(f"{'call':40} {'per layer':>9} {'host us':>9} {'GPU us':>9}")
    for r in report["rows"]:
        gpu = "-" if r["gpu_us"] is None else f"{r['gpu_us']:.1f}"
        print(f"{r['call']:40} {r['per_layer']:9d} {r['host_us']:9.1f} {gpu:>9}")
    gpu = "-" if report["layer_gpu_us"] is None else f"{report['layer_gpu_us']:.1f}"
    print(f"{'a layer (attention left out)':40} {'':9} {report['layer_host_us']:9.1f} {gpu:>9}")


if __name__ == "__main__":
    main()
