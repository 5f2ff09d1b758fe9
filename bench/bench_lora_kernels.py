"""Benchmark the model's Triton kernels against their torch twins and their HBM byte floor.

Suite `lora`: the fused-slice LoRA shrink/expand at Llama-3-8B's projections as the
engine runs them (qkv = 3 slices, gate_up = 2, o and down = 1), bf16, several token
counts and adapter mixes. Suite `elementwise`: the fused residual add + RMSNorm,
rotary + KV-cache write and SiLU-and-mul at the same model's shapes, batch 64 (a
decode step) and 8192 tokens (a prefill step), against the unfused torch ops they
replace. For each case: kernel time replayed from a CUDA graph (how the engine runs
decode) and eager (includes the launch), the torch twin's time, the HBM floor (bytes
that must move / bandwidth), and a correctness check against the twin.
Prints the tables and writes JSON to $OUT/lora_kernels.json (else bench/lora_kernels.json).

    python bench/bench_lora_kernels.py                       # H200, both suites
    python bench/bench_lora_kernels.py --suite elementwise   # the fused elementwise kernels only
    git show HEAD~1:kernels/lora.py > /tmp/lora_before.py    # a change to the LoRA kernels, A/B in one run:
    python bench/bench_lora_kernels.py --suite lora --baseline /tmp/lora_before.py   # rows "op[baseline]"
    python bench/bench_lora_kernels.py --device cpu --dtype float32 --shape-div 64 \\
        --tokens 1,40 --iters 2 --warmup 1                   # smoke test, Triton interpreter
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/timing.py, also when loaded by path
from timing import Timer, to_us  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# (H_in, output slices) of Llama-3-8B's projections, fused as the engine runs them.
LAYERS = {"qkv": (4096, (4096, 1024, 1024)), "o": (4096, (4096,)), "gate_up": (4096, (14336, 14336)),
          "down": (14336, (4096,))}
# Llama-3-8B: hidden, query heads, KV heads, head_dim, intermediate.
MODEL_SHAPE = dict(hidden=4096, heads=32, kv_heads=8, head_dim=128, inter=14336)
MIXES = ("uniform", "distinct", "skewed", "base_mix")
TOL = {torch.bfloat16: 3e-2, torch.float16: 1e-2, torch.float32: 1e-4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", default="all", choices=["all", "lora", "elementwise"])
    p.add_argument("--tokens", default="1,16,64,256,1024,8192", help="comma-separated T values (lora suite)")
    p.add_argument("--elementwise-tokens", default="64,8192", help="comma-separated T values (elementwise suite)")
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
    p.add_argument("--expand-tiles", default="",
                   help="also time the expand with these tilings, comma-separated [KERNEL:]COLUMNSxWARPS, KERNEL = "
                        "token (one program per token) or tile (per slot tile: the plain expand rows), "
                        "e.g. 512x2,token:1024x4,tile:256x4")
    p.add_argument("--shrink-splits", default="",
                   help="also time the shrink with these split-K counts, comma-separated (the default is automatic)")
    p.add_argument("--baseline", default="",
                   help="also time the LoRA kernels of this file (another version of kernels/lora.py) beside the tree's")
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="HBM bytes/s for the floor (H200)")
    return p.parse_args(argv)


def load_kernels(device: str, name: str = "lora", path: Path | None = None):
    """kernels/<name>.py (or the file `path`) loaded by path as a private module, so `--device cpu` can
    interpret its kernels even where `multilora_kernels` was imported compiled; needs only torch,
    triton, the repo."""
    if device == "cpu":  # read when the kernels are decorated and when they run
        os.environ["MULTILORA_TRITON_INTERPRET_KERNELS"] = "1"
    if "multilora_kernels" not in sys.modules:  # the kernels' own `from multilora_kernels import`: this repo's
        spec = importlib.util.spec_from_file_location("multilora_kernels", REPO / "kernels" / "__init__.py",
                                                      submodule_search_locations=[str(REPO / "kernels")])
        sys.modules["multilora_kernels"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["multilora_kernels"])
    module_name = f"multilora_kernels_{name}_bench"
    spec = importlib.util.spec_from_file_location(module_name, path or REPO / "kernels" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
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
    """Bytes that must cross HBM: adapter tokens' activations, used slots' weights, fp32 buf (rank = n * R)."""
    if op == "shrink":
        return n_lora * h_in * elem + n_used * rank * h_in * elem + num_tokens * rank * 4
    return n_lora * rank * 4 + n_used * h_out * rank * elem + 2 * n_lora * h_out * elem


def close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> tuple[bool, float]:
    err = (actual.float() - expected.float()).abs().max().item() if actual.numel() else 0.0
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    return err <= tol * max(1.0, scale), err


def bench_case(k, timer: Timer, args, layer: str, num_tokens: int, mix: str) -> list[dict]:
    dtype, dev, div = getattr(torch, args.dtype), args.device, args.shape_div
    h_in, slices = LAYERS[layer][0] // div, tuple(n // div for n in LAYERS[layer][1])
    h_out, n, s, r = sum(slices), len(slices), args.slots, args.rank
    slots = make_slots(mix, num_tokens, s, dev)
    meta = k.build_lora_meta(slots, s)
    x = torch.randn(num_tokens, h_in, device=dev, dtype=dtype)
    # The engine's slot layout (multilora.lora.adapter_slot_weights): rank-major A [S, n, R, H_in], B [S, H_out, R].
    a = (torch.randn(s, r, n, h_in, device=dev) / h_in**0.5).to(dtype).permute(0, 2, 1, 3)
    b = (torch.randn(s, r, h_out, device=dev) / r**0.5).to(dtype).transpose(1, 2)
    scales = torch.rand(s, n, device=dev) + 0.5
    y0 = torch.randn(num_tokens, h_out, device=dev, dtype=dtype)
    used = slots >= 0
    buf_ref = k.lora_shrink_ref(x, a, meta)
    # The expand reads what the engine gives it: the shrink kernel's split-K planes (at decode a
    # dozen), each of which it adds up, not the reference's single plane.
    planes = k.lora_shrink(x, a, meta)
    # Rows of base-model tokens are left unwritten by the kernel: compare adapter rows.
    shrink_ok, shrink_err = close(planes.sum(0)[used], buf_ref[0][used], TOL[dtype])
    y, y_ref = y0.clone(), y0.clone()
    k.lora_expand(y, planes, b, scales, meta, slices)
    k.lora_expand_ref(y_ref, buf_ref, b, scales, meta, slices)
    expand_ok, expand_err = close(y, y_ref, TOL[dtype])
    y_expected = y_ref.clone()      # y_ref keeps accumulating while the reference is timed

    n_lora = int(used.sum())
    n_used = len([v for v in slots.unique().tolist() if v >= 0])
    ops = {
        "shrink": (lambda: k.lora_shrink(x, a, meta), lambda: k.lora_shrink_ref(x, a, meta), shrink_ok, shrink_err),
        # y keeps accumulating across calls: harmless for timing.
        "expand": (lambda: k.lora_expand(y, planes, b, scales, meta, slices),
                   lambda: k.lora_expand_ref(y_ref, buf_ref, b, scales, meta, slices), expand_ok, expand_err),
    }
    rows = []

    def add_row(op, kernel, ref, ok, err, variant=None, tiles=None):
        nbytes = floor_bytes(op, n_lora, n_used, num_tokens, h_in, h_out, n * r, x.element_size())
        with tiling(k, tiles):
            graph_us, eager_us = to_us(timer.graph([kernel] * args.graph_calls)), to_us(timer(kernel))
        rows.append(dict(
            suite="lora", layer=layer, op=op if variant is None else f"{op}[{variant}]", tokens=num_tokens, mix=mix,
            h_in=h_in, h_out=h_out, slices=slices, slots=s, rank=r, used_slots=n_used, lora_tokens=n_lora,
            dtype=args.dtype, planes=planes.shape[0], kernel_graph_us=graph_us, kernel_eager_us=eager_us,
            ref_us=to_us(timer(ref)), floor_us=nbytes / args.bandwidth * 1e6, bytes=nbytes, ok=ok, max_abs_err=err,
        ))

    def add_expand_rows(planes_in, variants, label=None):
        """The expand over `planes_in` with each tiling of `variants` (None: its own), each checked."""
        for tiles in variants:
            y_var = y0.clone()
            with tiling(k, tiles):
                k.lora_expand(y_var, planes_in, b, scales, meta, slices)
            var_ok, var_err = close(y_var, y_expected, TOL[dtype])
            add_row("expand", lambda: k.lora_expand(y_var, planes_in, b, scales, meta, slices), ops["expand"][1],
                    var_ok, var_err, ",".join(filter(None, [label, tiles])) or None, tiles=tiles)

    tile_variants = list(filter(None, args.expand_tiles.split(",")))
    for op, (kernel, ref, ok, err) in ops.items():
        add_row(op, kernel, ref, ok, err)
    add_expand_rows(planes, tile_variants)
    for split in filter(None, args.shrink_splits.split(",")):
        split_planes = k._shrink_triton(x, a, meta, split_k=int(split)) if k._launch.use_triton(x) else planes
        var_ok, var_err = close(split_planes.sum(0)[used], buf_ref[0][used], TOL[dtype])
        add_row("shrink", lambda: k._shrink_triton(x, a, meta, split_k=int(split)), ops["shrink"][1],
                var_ok, var_err, f"split{split}")
        # The expand reads as many planes as the shrink split: fewer planes, a shorter expand.
        add_expand_rows(split_planes, [None, *tile_variants], f"split{split}")
    return rows


@contextlib.contextmanager
def tiling(k, variant: str | None):
    """Within the block, the expand kernel runs with the tiling `variant` ("[KERNEL:]COLUMNSxWARPS"; None: its own)."""
    if variant is None:
        yield
        return
    kernel, _, columns_warps = variant.rpartition(":")
    block_n, num_warps = (int(v) for v in columns_warps.split("x"))
    own = k.expand_config

    def config(block_m, rank, per_token=False):
        per_token = per_token if not kernel else kernel == "token"
        return k.ExpandConfig(block_n, own(block_m, rank, per_token).block_r, num_warps, per_token)

    k.expand_config = config
    try:
        yield
    finally:
        k.expand_config = own


def elementwise_cases(mods, args, num_tokens: int) -> list[tuple[str, callable, callable, int, callable]]:
    """(name, kernel call, twin call, floor bytes, check) at Llama-3-8B shapes / shape_div."""
    dtype, dev, div = getattr(torch, args.dtype), args.device, args.shape_div
    hidden, inter = MODEL_SHAPE["hidden"] // div, MODEL_SHAPE["inter"] // div
    heads, kv_heads = max(1, MODEL_SHAPE["heads"] // div), max(1, MODEL_SHAPE["kv_heads"] // div)
    head_dim, elem = MODEL_SHAPE["head_dim"], torch.finfo(dtype).bits // 8
    norm, rotary, act = mods["norm"], mods["rotary"], mods["activation"]
    x, res = (torch.randn(num_tokens, hidden, device=dev, dtype=dtype) for _ in range(2))
    weight = torch.rand(hidden, device=dev, dtype=dtype) + 0.5
    gate_up = torch.randn(num_tokens, 2 * inter, device=dev, dtype=dtype)
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, device=dev, dtype=dtype)
    q = qkv[:, :heads * head_dim].view(num_tokens, heads, head_dim)
    k_ = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(num_tokens, kv_heads, head_dim)
    angles = torch.rand(num_tokens, head_dim // 2, device=dev) * 100
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    block_size = 16
    cache = torch.zeros(2, num_tokens // block_size + 2, block_size, kv_heads, head_dim, device=dev, dtype=dtype)
    slot_mapping = torch.randperm(cache.shape[1] * block_size, device=dev)[:num_tokens]

    def check_norm():
        return [close(got, want, TOL[dtype]) for got, want in
                zip(norm.fused_add_rms_norm(x, res, weight, 1e-5), norm.fused_add_rms_norm_ref(x, res, weight, 1e-5))]

    def check_rotary():
        runs = []
        for fn in (rotary.rotary_kv_write, rotary.rotary_kv_write_ref):
            qkv_copy, cache_copy = qkv.clone(), cache.clone()
            qc = qkv_copy[:, :heads * head_dim].view_as(q)
            kc = qkv_copy[:, heads * head_dim:(heads + kv_heads) * head_dim].view_as(k_)
            vc = qkv_copy[:, (heads + kv_heads) * head_dim:].view_as(v)
            fn(qc, kc, vc, cos, sin, cache_copy, slot_mapping)
            runs.append((qkv_copy, cache_copy))
        return [close(got, want, TOL[dtype]) for got, want in zip(*runs)]

    def check_act():
        return [close(act.silu_and_mul(gate_up), act.silu_and_mul_ref(gate_up), TOL[dtype])]

    # Rotary runs in place: repeated calls keep rotating q and k, harmless for timing.
    return [
        ("add_rms_norm", lambda: norm.fused_add_rms_norm(x, res, weight, 1e-5),
         lambda: norm.fused_add_rms_norm_ref(x, res, weight, 1e-5), 4 * num_tokens * hidden * elem, check_norm),
        ("rotary_kv_write", lambda: rotary.rotary_kv_write(q, k_, v, cos, sin, cache, slot_mapping),
         lambda: rotary.rotary_kv_write_ref(q, k_, v, cos, sin, cache, slot_mapping),
         num_tokens * elem * head_dim * (2 * (heads + kv_heads) + 3 * kv_heads + 1), check_rotary),
        ("silu_and_mul", lambda: act.silu_and_mul(gate_up), lambda: act.silu_and_mul_ref(gate_up),
         3 * num_tokens * inter * elem, check_act),
    ]


def bench_elementwise(mods, timer: Timer, args, num_tokens: int) -> list[dict]:
    rows = []
    for name, kernel, ref, nbytes, check in elementwise_cases(mods, args, num_tokens):
        results = check()
        rows.append(dict(
            suite="elementwise", layer=name, op="fused", tokens=num_tokens, mix="-", dtype=args.dtype,
            kernel_graph_us=to_us(timer.graph([kernel] * args.graph_calls)), kernel_eager_us=to_us(timer(kernel)),
            ref_us=to_us(timer(ref)), floor_us=nbytes / args.bandwidth * 1e6, bytes=nbytes,
            ok=all(ok for ok, _ in results), max_abs_err=max(err for _, err in results),
        ))
    return rows


def print_table(rows: list[dict], meta_rows: list[dict]) -> None:
    head = f"{'layer':15} {'op':16} {'T':>5} {'mix':9} {'graph_us':>9} {'eager_us':>9} {'ref_us':>9} " \
           f"{'floor_us':>9} {'%floor':>7} {'vs_ref':>7} ok"
    print(head)
    for row in rows:
        best = row["kernel_graph_us"] or row["kernel_eager_us"]
        graph = f"{row['kernel_graph_us']:9.1f}" if row["kernel_graph_us"] is not None else f"{'-':>9}"
        print(f"{row['layer']:15} {row['op']:16} {row['tokens']:5d} {row['mix']:9} {graph} "
              f"{row['kernel_eager_us']:9.1f} {row['ref_us']:9.1f} {row['floor_us']:9.2f} "
              f"{100 * row['floor_us'] / best:6.1f}% {row['ref_us'] / best:6.1f}x {'ok' if row['ok'] else 'FAIL'}")
    if meta_rows:
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
    torch.manual_seed(0)
    timer = Timer(args.device, args.warmup, args.iters)
    rows, meta_rows = [], []
    if args.suite in ("all", "lora"):
        k = load_kernels(args.device)
        baseline = load_kernels(args.device, "baseline", Path(args.baseline)) if args.baseline else None
        # The baseline's own tiling: the variants are the tree's.
        baseline_args = argparse.Namespace(**{**vars(args), "expand_tiles": "", "shrink_splits": ""})
        mixes, layers = args.mixes.split(","), args.layers.split(",")
        for num_tokens in (int(t) for t in args.tokens.split(",")):
            for mix in mixes:
                slots = make_slots(mix, num_tokens, args.slots, args.device)
                meta_rows.append(dict(tokens=num_tokens, mix=mix,
                                      us=to_us(timer(lambda: k.build_lora_meta(slots, args.slots)))))
                for layer in layers:
                    rows.extend(bench_case(k, timer, args, layer, num_tokens, mix))
                    if baseline is not None:
                        rows.extend({**r, "op": f"{r['op']}[baseline]"}
                                    for r in bench_case(baseline, timer, baseline_args, layer, num_tokens, mix))
    if args.suite in ("all", "elementwise"):
        mods = {name: load_kernels(args.device, name) for name in ("norm", "rotary", "activation")}
        for num_tokens in (int(t) for t in args.elementwise_tokens.split(",")):
            rows.extend(bench_elementwise(mods, timer, args, num_tokens))
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "lora_kernels.json"
    out.write_text(json.dumps(dict(device=device_name, args=vars(args), cases=rows, build_meta=meta_rows), indent=1))
    print(f"wrote {out} ({device_name})\n")
    print_table([r for r in rows if r["suite"] == "lora"], meta_rows)
    print("\nfused elementwise kernels (Llama-3-8B shapes) vs the unfused torch ops and the byte floor:")
    print_table([r for r in rows if r["suite"] == "elementwise"], [])
    failed = [r for r in rows if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
