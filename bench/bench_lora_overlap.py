"""How a decode step's LoRA kernels share the GPU with the base GEMMs, replayed from CUDA graphs.

A chain of `--layers` decoder layers' four projections (qkv, o, gate_up, down at
Llama-3-8B shapes, each layer its own weights so nothing stays in L2), `--tokens`
decode tokens spread evenly over `--adapters` adapters, run as:

    base        the GEMMs alone (the floor the LoRA variants add to)
    serial      GEMM, shrink, expand one after another
    fork        today's LoRALinear: the shrink on a side stream beside the GEMM, the expand after both
    fork_lora   shrink and expand into a delta on the side stream beside the GEMM, then y += delta
    fork_lora_hi  the same with the side stream at high priority
    serial_cublas (with --layout blocks) the shrink, then the expand as one cuBLAS addmm per adapter's rows
                and output slice (a prefill step's prompts: each adapter's tokens are one block of rows)

each under cuBLAS SM carveouts (`--carveouts`: SMs the GEMMs leave free for the side stream), and
`serial` and `fork` again with other versions of kernels/lora.py (`--kernels LABEL=FILE`, rows
"serial[LABEL]"). Prints per-chain milliseconds and each variant's cost over base at the same
carveout, checks every variant's outputs against `serial`, writes JSON to $OUT/lora_overlap.json
(else bench/).

    python bench/bench_lora_overlap.py                          # H200
    python bench/bench_lora_overlap.py --adapters 8 --carveouts 0,16
    python bench/bench_lora_overlap.py --tokens 2048 --layers 16 --layout blocks --adapters 4,8 --carveouts 0
    git show HEAD~1:kernels/lora.py > /tmp/lora_before.py
    python bench/bench_lora_overlap.py --carveouts 0 --kernels before=/tmp/lora_before.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import Timer  # noqa: E402
from bench_lora_kernels import LAYERS  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("base", "serial", "fork", "fork_lora", "fork_lora_hi")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--adapters", default="8,32", help="comma-separated counts of distinct adapters in the batch")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--carveouts", default="0,16", help="comma-separated SMs left free by cuBLAS")
    p.add_argument("--layout", default="spread", choices=["spread", "blocks"],
                   help="tokens to adapters: spread (token t -> t mod adapters, a decode batch) or blocks (a "
                        "prefill step: each adapter's tokens contiguous)")
    p.add_argument("--kernels", default="", help="comma-separated LABEL=FILE: other kernels/lora.py versions")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    return p.parse_args(argv)


def make_layer(in_features, slices, slots, rank, device):
    """Base weight, A [S, n, R, in], B [S, out, R] with the slot buffer's layout (rank rows of contiguous columns)."""
    out = sum(slices)
    w = torch.randn(out, in_features, device=device, dtype=torch.bfloat16) * 0.02
    a = torch.randn(slots, len(slices), rank, in_features, device=device, dtype=torch.bfloat16) * 0.02
    b = (torch.randn(slots, rank, out, device=device, dtype=torch.bfloat16) * 0.02).transpose(1, 2)
    scales = torch.rand(slots, len(slices), device=device, dtype=torch.float32) + 0.5
    return dict(w=w, a=a, b=b, scales=scales, scales_host=scales.tolist(), slices=tuple(slices))


def row_blocks(token_slots: list[int]) -> list[tuple[int, int, int]]:
    """(slot, first row, end row) of each run of consecutive tokens of one adapter (slot >= 0)."""
    blocks, start = [], 0
    for t in range(1, len(token_slots) + 1):
        if t == len(token_slots) or token_slots[t] != token_slots[start]:
            if token_slots[start] >= 0:
                blocks.append((token_slots[start], start, t))
            start = t
    return blocks


def variant_fn(name, meta, side, kernels, blocks=()):
    lora_expand, lora_shrink = kernels.lora_expand, kernels.lora_shrink

    def run(x, layer):
        w, a, b, s, slices = layer["w"], layer["a"], layer["b"], layer["scales"], layer["slices"]
        if name == "base":
            return F.linear(x, w)
        if name == "serial_cublas":
            y = F.linear(x, w)
            h = lora_shrink(x, a, meta).sum(0).to(x.dtype)   # PEFT rounds the shrink to the model dtype too
            rank = b.shape[2]
            for slot, lo, hi in blocks:
                col = 0
                for i, width in enumerate(slices):
                    y[lo:hi, col:col + width].addmm_(h[lo:hi, i * rank:(i + 1) * rank], b[slot, col:col + width].T,
                                                    alpha=layer["scales_host"][slot][i])
                    col += width
            return y
        if name == "serial":
            y = F.linear(x, w)
            lora_expand(y, lora_shrink(x, a, meta), b, s, meta, slices)
            return y
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        if name == "fork":
            with torch.cuda.stream(side):
                buf = lora_shrink(x, a, meta)
            y = F.linear(x, w)
            main.wait_stream(side)
            lora_expand(y, buf, b, s, meta, slices)
            return y
        with torch.cuda.stream(side):  # fork_lora*: the whole LoRA beside the GEMM
            delta = torch.zeros(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
            lora_expand(delta, lora_shrink(x, a, meta), b, s, meta, slices)
        y = F.linear(x, w)
        main.wait_stream(side)
        return y.add_(delta)
    return run


def chain(fn, layers, inputs):
    outs = []
    for layer in layers:
        outs = [fn(inputs[kind], layer[kind]) for kind in LAYERS]
    return outs


def print_table(rows: list[dict], names: list[str], args) -> None:
    print(f"\n{args.layers} layers x (qkv, o, gate_up, down), {args.tokens} tokens ({args.layout}), rank {args.rank}, "
          f"{args.slots} slots")
    width = max(13, *(len(n) for n in names))
    header = " ".join(f"{v:>{width}}" for v in names)
    print(f"{'adapters':>8} {'carveout':>8} {header}   (ms; LoRA variants: over base)")
    for adapters in sorted({r["adapters"] for r in rows}):
        for carveout in sorted({r["carveout"] for r in rows}):
            sel = {r["variant"]: r for r in rows if r["adapters"] == adapters and r["carveout"] == carveout}
            cells = [f"{sel['base']['ms']:{width}.3f}"] + [f"{'+' + format(sel[v]['over_base_ms'], '.3f'):>{width}}"
                                                           for v in names[1:]]
            print(f"{adapters:>8} {carveout:>8} " + " ".join(cells))


def main(argv=None) -> int:
    args = parse_args(argv)
    import multilora_kernels.lora as tree_kernels
    from bench_lora_kernels import load_kernels
    from multilora.lora.mapping import LoRAVariant, lora_variant

    # (row label, variant, kernels module): the tree's kernels in every variant, other files' in two.
    own = VARIANTS + (("serial_cublas",) if args.layout == "blocks" else ())
    others = {label: load_kernels("cuda", "lora", Path(path))
              for label, path in (item.split("=", 1) for item in args.kernels.split(",") if item)}
    variants = [(name, name, tree_kernels) for name in own] + [
        (f"{name}[{label}]", name, module) for label, module in others.items() for name in ("serial", "fork")]

    device = torch.device("cuda")
    torch.manual_seed(0)
    layers = [{kind: make_layer(h_in, sl, args.slots, args.rank, device) for kind, (h_in, sl) in LAYERS.items()}
              for _ in range(args.layers)]
    inputs = {kind: torch.randn(args.tokens, h_in, device=device, dtype=torch.bfloat16)
              for kind, (h_in, _) in LAYERS.items()}
    timer = Timer("cuda", args.warmup, args.iters)
    streams = {"fork_lora_hi": torch.cuda.Stream(device, priority=-1)}
    side_default = torch.cuda.Stream(device)
    rows = []
    for adapters in (int(n) for n in args.adapters.split(",")):
        tokens = torch.arange(args.tokens, device=device)
        slots = (tokens % adapters if args.layout == "spread" else tokens * adapters // args.tokens).to(torch.int32)
        blocks = row_blocks(slots.tolist())
        variant = lora_variant((s, 1) for s in slots.tolist())
        meta = tree_kernels.build_lora_meta(slots, args.slots, per_token_expand=variant is LoRAVariant.PER_TOKEN)
        reference = None
        for carveout in (int(c) for c in args.carveouts.split(",")):
            torch._C._set_sm_carveout_experimental(carveout or None)
            base_ms = None
            for name, kind, module in variants:
                fn = variant_fn(kind, meta, streams.get(kind, side_default), module, blocks)
                outs = chain(fn, layers, inputs)  # compile, and the outputs to check
                torch.cuda.synchronize()
                if name == "serial" and reference is None:
                    reference = [o.float() for o in outs]
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    chain(fn, layers, inputs)
                ms = timer(graph.replay)
                del graph
                err = None if name == "base" or reference is None else max(
                    (o.float() - r).abs().max().item() for o, r in zip(outs, reference))
                base_ms = ms if name == "base" else base_ms
                rows.append(dict(adapters=adapters, expand=variant.value, carveout=carveout, variant=name, ms=ms,
                                 over_base_ms=ms - base_ms, max_abs_err_vs_serial=err))
                print(f"  {adapters:>3} adapters carveout {carveout:>2} {name:<20} {ms:7.3f} ms"
                      f"  +{ms - base_ms:.3f}" + ("" if err is None else f"  err {err:.2e}"), flush=True)
    torch._C._set_sm_carveout_experimental(None)
    out_dir = Path(os.environ.get("OUT") or REPO / "bench")
    (out_dir / "lora_overlap.json").write_text(json.dumps(dict(args=vars(args), rows=rows), indent=1))
    print_table(rows, [name for name, _, _ in variants], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
