"""Benchmark the paged decode attention kernel against the engine's current torch path.

Llama-3-8B attention shapes (H 32, KVH 8, Dh 128, block size 16), bf16, decode batches
of D sequences with a context of C tokens each. For each case: the kernel replayed from
a CUDA graph (how a graphed decode step sees it) and eager (wrapper + launch), the torch
path the engine runs today (gather + repeat_interleave + SDPA, copied from
`model/attention.py`), the HBM floor (K/V bytes the step must read, plus q, out and
block tables, / bandwidth), and the kernel's error against `paged_decode_attention_ref`.
Each timed call reads its own blocks of a cache cycled past the 50 MB L2, so small
cases are not L2-resident. Then prefill cases (N sequences of Q new tokens after P cached
ones): `paged_prefill_attention` against a per-sequence SDPA baseline and
its compute floor. Prints tables and writes $OUT/attention.json (else bench/attention.json).

    python bench/bench_attention.py                    # H200: D in 1,16,64,256 x C in 128,1024,4096
    python bench/bench_attention.py --sweep            # also time launch configs, recommend one
    python bench/bench_attention.py --device cpu --dtype float32 --heads 4 --kv-heads 2 --head-dim 16 \\
        --seqs 1,3 --contexts 5,40 --prefill 2:9:5 --iters 1 --warmup 0   # smoke test, interpreter
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/timing.py, also when loaded by path
from timing import Timer, to_us  # noqa: E402
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
TOL = {torch.bfloat16: 2e-2, torch.float16: 1e-2, torch.float32: 1e-4}
L2_BYTES = 50 * 2**20
MAX_SETS = 512  # distinct block-table sets cycled by the timed calls
SWEEP = dict(block_n=(16, 32, 64), num_warps=(4, 8), num_stages=(2, 3), split_factor=(0.5, 1, 2))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="1,16,64,256", help="comma-separated decode batch sizes D")
    p.add_argument("--contexts", default="128,1024,4096", help="comma-separated context lengths C")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--table-tokens", type=int, default=0,
                   help="pad every block table to this many tokens (a graphed engine's fixed width); 0 = C")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu runs the kernel in Triton's interpreter (smoke test only)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--graph-calls", type=int, default=20, help="kernel calls captured per CUDA graph (at least)")
    p.add_argument("--prefill", default="1:2048:0,1:2048:2048,4:512:1536,16:128:1920",
                   help="comma-separated prefill cases N:Q:P (N sequences, Q new tokens, P cached); '' = none")
    p.add_argument("--tflops", type=float, default=790.0, help="matrix TFLOP/s for the prefill floor (H200 bf16)")
    p.add_argument("--skip-torch", action="store_true", help="do not time the current torch path")
    p.add_argument("--sweep", action="store_true", help=f"time every launch config of {SWEEP}")
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="HBM bytes/s for the floor (H200)")
    return p.parse_args(argv)


def load_kernels(device: str):
    """(kernels/attention.py, kernels/prefill_attention.py) loaded by path, so the bench needs
    only torch, triton and the repo; prefill_attention.py's `multilora_kernels.attention`
    imports resolve to the attention.py loaded here."""
    if device == "cpu":  # read when the kernels are decorated and when they run
        os.environ["MULTILORA_TRITON_INTERPRET_KERNELS"] = "1"
    decode = _load_by_path("multilora_kernels_attention_bench", "attention.py")
    saved = sys.modules.get("multilora_kernels.attention")
    sys.modules["multilora_kernels.attention"] = decode
    try:
        prefill = _load_by_path("multilora_kernels_prefill_attention_bench", "prefill_attention.py")
    finally:
        if saved is None:
            sys.modules.pop("multilora_kernels.attention")
        else:
            sys.modules["multilora_kernels.attention"] = saved
    return decode, prefill


def _load_by_path(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "kernels" / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- torch baselines (earlier engine paths)


def _expand_kv_heads(x: torch.Tensor, num_heads: int, dim: int) -> torch.Tensor:
    return x if x.shape[dim] == num_heads else x.repeat_interleave(num_heads // x.shape[dim], dim=dim)


def torch_decode_attention(q, kv_cache, block_tables, context_lens, scale) -> torch.Tensor:
    """`_decode_attention` of backend_src/multilora/model/attention.py, verbatim."""
    num_seqs, num_heads = q.shape[0], q.shape[1]
    k = kv_cache[0, block_tables].flatten(1, 2)                       # [D, C, kv_heads, head_dim]
    v = kv_cache[1, block_tables].flatten(1, 2)
    k = _expand_kv_heads(k, num_heads, 2).transpose(1, 2)             # [D, H, C, head_dim]
    v = _expand_kv_heads(v, num_heads, 2).transpose(1, 2)
    mask = torch.arange(k.shape[2], device=q.device)[None, :] < context_lens[:, None]   # [D, C]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask[:, None, None, :], scale=scale)
    return out.view(num_seqs, num_heads, -1)


def torch_prefill_attention(q, k_new, v_new, kv_cache, query_lens, context_lens, block_tables, scale):
    """A fixed torch baseline: one SDPA call per sequence with the K/V heads copied to every query head
    (the engine's prefill path of 2026-11-28; it now batches whole prompts and uses SDPA's native GQA)."""
    out = torch.empty_like(q)
    start = 0
    for query_len, context_len, block_table in zip(query_lens, context_lens, block_tables):
        rows = slice(start, start + query_len)
        if query_len == context_len:  # a whole prompt: its own new keys, causal SDPA
            k, v, mask = k_new[rows], v_new[rows], None
        else:
            k = kv_cache[0, block_table].flatten(0, 1)[:context_len]
            v = kv_cache[1, block_table].flatten(0, 1)[:context_len]
            positions = torch.arange(context_len - query_len, context_len, device=q.device)
            mask = torch.arange(context_len, device=q.device)[None, :] <= positions[:, None]
        num_heads = q.shape[1]
        k = _expand_kv_heads(k, num_heads, 1).transpose(0, 1)
        v = _expand_kv_heads(v, num_heads, 1).transpose(0, 1)
        out[rows] = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k, v, attn_mask=mask,
                                                   is_causal=mask is None, scale=scale).transpose(0, 1)
        start += query_len
    return out


# ----------------------------------------------------------------------------- timing


# ----------------------------------------------------------------------------- one case


class Case:
    """A decode batch: D sequences of C tokens, `sets` disjoint block-table sets over one cache."""

    def __init__(self, args, num_seqs: int, context: int):
        dtype, dev = getattr(torch, args.dtype), args.device
        self.num_seqs, self.context = num_seqs, context
        bs = args.block_size
        blocks_per_seq = math.ceil(context / bs)
        width = max(blocks_per_seq, math.ceil(args.table_tokens / bs))
        self.kv_bytes = 2 * num_seqs * context * args.kv_heads * args.head_dim * _elem(dtype)
        self.floor_bytes = (self.kv_bytes + 2 * num_seqs * args.heads * args.head_dim * _elem(dtype)
                            + 4 * num_seqs * blocks_per_seq + 8 * num_seqs)
        per_set = 2 * num_seqs * blocks_per_seq * bs * args.kv_heads * args.head_dim * _elem(dtype)
        self.sets = 1 if dev == "cpu" else max(1, min(MAX_SETS, math.ceil(3 * L2_BYTES / per_set)))
        num_blocks = self.sets * num_seqs * blocks_per_seq + 1  # block 0: the padding entry
        gen = torch.Generator().manual_seed(num_seqs * 100003 + context)
        self.kv = torch.randn(2, num_blocks, bs, args.kv_heads, args.head_dim, dtype=dtype, device=dev)
        ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).view(self.sets, num_seqs, blocks_per_seq)
        tables = torch.zeros(self.sets, num_seqs, width, dtype=torch.int32)
        tables[:, :, :blocks_per_seq] = ids.int()
        self.tables = tables.to(dev)
        self.lens = torch.full((num_seqs,), context, dtype=torch.int32, device=dev)
        self.q = torch.randn(num_seqs, args.heads, args.head_dim, dtype=dtype, device=dev)
        self.out = torch.empty_like(self.q)
        self.scale = args.head_dim ** -0.5

    def kernel_calls(self, k, count: int, **config) -> list:
        """`count` kernel calls cycling through the table sets (private launcher when configured)."""
        def call(table):
            if config:
                return lambda: k._decode_triton(self.q, self.kv, table, self.lens, self.scale, self.out, **config)
            return lambda: k.paged_decode_attention(self.q, self.kv, table, self.lens, self.scale, self.out)
        count = max(count, self.sets)
        return [call(self.tables[i % self.sets]) for i in range(count)]


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max abs error, max |expected|)."""
    return (actual.float() - expected.float()).abs().max().item(), expected.float().abs().max().item()


def bench_case(k, timer: Timer, args, num_seqs: int, context: int) -> dict:
    case = Case(args, num_seqs, context)
    table = case.tables[0]
    expected = k.paged_decode_attention_ref(case.q, case.kv, table, case.lens, case.scale)
    err, magnitude = max_error(k.paged_decode_attention(case.q, case.kv, table, case.lens, case.scale), expected)
    calls = case.kernel_calls(k, args.graph_calls)
    eager = itertools.cycle(calls)
    row = dict(
        seqs=num_seqs, context=context, dtype=args.dtype, table_width=table.shape[1], l2_sets=case.sets,
        splits=k._num_splits(num_seqs, args.kv_heads, table.shape[1] * args.block_size, k._BLOCK_N,
                             k._num_sms(case.q.device)),
        kv_mb=case.kv_bytes / 1e6, floor_us=case.floor_bytes / args.bandwidth * 1e6,
        kernel_graph_us=to_us(timer.graph(calls)), kernel_eager_us=to_us(timer(lambda: next(eager)())),
        torch_us=None, torch_err=None, max_abs_err=err, ok=err <= TOL[case.q.dtype] * max(1.0, magnitude),
    )
    if not args.skip_torch:
        row["torch_us"] = to_us(timer(lambda: torch_decode_attention(case.q, case.kv, table, case.lens, case.scale)))
        row["torch_err"] = max_error(torch_decode_attention(case.q, case.kv, table, case.lens, case.scale), expected)[0]
    if args.sweep and timer.cuda:
        row["sweep"] = sweep_case(k, timer, case, row["splits"], args)
    del case
    return row


def sweep_case(k, timer: Timer, case: Case, default_splits: int, args) -> list[dict]:
    """Graph time of every launch config of SWEEP (the split count scaled around the default)."""
    results = []
    for block_n, warps, stages, factor in itertools.product(*SWEEP.values()):
        splits = max(1, min(k._MAX_SPLITS, round(default_splits * factor)))
        if factor != 1 and splits == default_splits:
            continue
        config = dict(block_n=block_n, num_warps=warps, num_stages=stages, num_splits=splits)
        try:
            us = to_us(timer.graph(case.kernel_calls(k, args.graph_calls, **config)))
        except Exception as exc:  # a config that does not compile or fit: report it, keep going
            print(f"  config {config} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        results.append(dict(config, split_factor=factor, us=us))
    return results


def bench_prefill(k, timer: Timer, args, spec: str) -> dict:
    """One prefill case "N:Q:P": N sequences, Q new tokens each after P cached ones."""
    num_seqs, query_len, cached = (int(x) for x in spec.split(":"))
    dtype, dev, bs = getattr(torch, args.dtype), args.device, args.block_size
    context = query_len + cached
    blocks_per_seq = math.ceil(context / bs)
    kv = torch.randn(2, num_seqs * blocks_per_seq, bs, args.kv_heads, args.head_dim, dtype=dtype, device=dev)
    tables = torch.randperm(num_seqs * blocks_per_seq, device=dev).view(num_seqs, blocks_per_seq).int()
    lens = torch.full((num_seqs,), context, dtype=torch.int32, device=dev)
    query_start = torch.arange(num_seqs + 1, dtype=torch.int32, device=dev) * query_len
    q = torch.randn(num_seqs * query_len, args.heads, args.head_dim, dtype=dtype, device=dev)
    scale = args.head_dim ** -0.5
    # The new tokens' K/V, as the model holds them (already written to the cache).
    slots = (tables.long()[:, :, None] * bs + torch.arange(bs, device=dev)).flatten(1)[:, cached:context].flatten()
    k_new, v_new = (kv[i].flatten(0, 1)[slots] for i in range(2))
    out = torch.empty_like(q)
    kernel = lambda: k.paged_prefill_attention(q, kv, tables, query_start, lens, scale, out)  # noqa: E731
    expected = k.paged_prefill_attention_ref(q, kv, tables, query_start, lens, scale)
    kernel()
    err, magnitude = max_error(out, expected)
    # QK^T and PV over the visible (causal) keys: 2 matmuls x 2 FLOP per multiply-add.
    visible = num_seqs * args.heads * sum(cached + i + 1 for i in range(query_len))
    row = dict(seqs=num_seqs, query_len=query_len, cached=cached, dtype=args.dtype,
               floor_us=4 * visible * args.head_dim / (args.tflops * 1e12) * 1e6,
               kernel_us=to_us(timer(kernel)), torch_us=None, torch_err=None, max_abs_err=err,
               ok=err <= TOL[dtype] * max(1.0, magnitude))
    if not args.skip_torch:
        torch_path = lambda: torch_prefill_attention(  # noqa: E731
            q, k_new, v_new, kv, [query_len] * num_seqs, [context] * num_seqs, list(tables.long()), scale)
        row["torch_us"] = to_us(timer(torch_path))
        row["torch_err"] = max_error(torch_path(), expected)[0]
    return row


# ----------------------------------------------------------------------------- report


def print_table(rows: list[dict]) -> None:
    print(f"{'D':>4} {'C':>5} {'split':>5} {'KV MB':>8} {'floor_us':>9} {'graph_us':>9} {'%floor':>7} "
          f"{'eager_us':>9} {'torch_us':>9} {'torch/k':>8} {'max_err':>8} ok")
    for r in rows:
        best = r["kernel_graph_us"] or r["kernel_eager_us"]
        graph = f"{r['kernel_graph_us']:9.1f}" if r["kernel_graph_us"] is not None else f"{'-':>9}"
        torch_us = f"{r['torch_us']:9.1f}" if r["torch_us"] is not None else f"{'-':>9}"
        ratio = f"{r['torch_us'] / best:7.1f}x" if r["torch_us"] is not None else f"{'-':>8}"
        print(f"{r['seqs']:4d} {r['context']:5d} {r['splits']:5d} {r['kv_mb']:8.2f} {r['floor_us']:9.2f} {graph} "
              f"{100 * r['floor_us'] / best:6.1f}% {r['kernel_eager_us']:9.1f} {torch_us} {ratio} "
              f"{r['max_abs_err']:8.2g} {'ok' if r['ok'] else 'FAIL'}")


def print_prefill_table(rows: list[dict]) -> None:
    print(f"\n{'N':>4} {'Q':>5} {'cached':>6} {'floor_us':>9} {'kernel_us':>10} {'%floor':>7} {'torch_us':>9} "
          f"{'torch/k':>8} {'max_err':>8} ok")
    for r in rows:
        torch_us = f"{r['torch_us']:9.1f}" if r["torch_us"] is not None else f"{'-':>9}"
        ratio = f"{r['torch_us'] / r['kernel_us']:7.2f}x" if r["torch_us"] is not None else f"{'-':>8}"
        print(f"{r['seqs']:4d} {r['query_len']:5d} {r['cached']:6d} {r['floor_us']:9.1f} {r['kernel_us']:10.1f} "
              f"{100 * r['floor_us'] / r['kernel_us']:6.1f}% {torch_us} {ratio} {r['max_abs_err']:8.2g} "
              f"{'ok' if r['ok'] else 'FAIL'}")


def recommend(rows: list[dict]) -> dict | None:
    """The sweep config with the best geometric-mean slowdown against each case's fastest."""
    keys = ("block_n", "num_warps", "num_stages", "split_factor")
    slowdowns: dict[tuple, list[float]] = {}
    for r in rows:
        fastest = min((s["us"] for s in r.get("sweep", [])), default=None)
        for s in r.get("sweep", []):
            slowdowns.setdefault(tuple(s[key] for key in keys), []).append(s["us"] / fastest)
    complete = {c: v for c, v in slowdowns.items() if len(v) == len(rows)}
    if not complete:
        return None
    best = min(complete, key=lambda c: statistics.geometric_mean(complete[c]))
    print("\nsweep: geomean slowdown vs each case's fastest config (best 8 of", len(complete), ")")
    for config in sorted(complete, key=lambda c: statistics.geometric_mean(complete[c]))[:8]:
        print(f"  {dict(zip(keys, config))}: {statistics.geometric_mean(complete[config]):.3f}"
              f"  worst {max(complete[config]):.2f}")
    return dict(zip(keys, best), geomean_slowdown=statistics.geometric_mean(complete[best]))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu for a smoke test", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.dtype == "bfloat16":
        print("Triton's interpreter mis-reads bfloat16: use --dtype float32 or float16 on cpu", file=sys.stderr)
        return 2
    k, prefill_k = load_kernels(args.device)
    torch.manual_seed(0)
    timer = Timer(args.device, args.warmup, args.iters)
    rows = []
    for num_seqs in (int(d) for d in args.seqs.split(",")):
        for context in (int(c) for c in args.contexts.split(",")):
            rows.append(bench_case(k, timer, args, num_seqs, context))
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print_table(rows)
    best = recommend(rows) if args.sweep else None
    prefill_rows = [bench_prefill(prefill_k, timer, args, spec) for spec in args.prefill.split(",") if spec]
    if prefill_rows:
        print_prefill_table(prefill_rows)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu (Triton interpreter)"
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "attention.json"
    out.write_text(json.dumps(dict(device=device_name, args=vars(args), cases=rows, recommended=best,
                                   prefill=prefill_rows), indent=1))
    print(f"\nwrote {out}")
    return 0 if all(r["ok"] for r in rows + prefill_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
