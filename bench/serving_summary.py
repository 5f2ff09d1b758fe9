"""Issue 8's checks over bench/serving.py reports: one table, then each target of "Done when"
beside its figure, and one plot of every run.

    python bench/serving_summary.py $OUT/A-compare.json $OUT/B-128x16.json $OUT/C-1024.json
"""

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_report import load_runs, plot, queue_wait, table   # noqa: E402


def _ms(v) -> str:
    if v is None:
        return "-"
    return f"{v:.2f} s" if v >= 1 else f"{v * 1e3:.1f} ms" if v >= 1e-3 else f"{v * 1e6:.0f} us"


def thread_cpu_line(cpu: dict, wall_s: float) -> str:
    """The process's CPU seconds over the measured part, by thread (a pool's numbered threads together)."""
    groups: dict = {}
    for name, seconds in cpu.items():
        key = re.sub(r"_\d+$", "", name)
        groups[key] = groups.get(key, 0.0) + seconds
    shares = ", ".join(f"{name} {seconds:.2f}" for name, seconds in sorted(groups.items(), key=lambda kv: -kv[1]))
    return f"CPU seconds over the {wall_s:.1f} s measured: {shares}"


def adapter_line(run: dict) -> str:
    """Loads, uploads and evictions: how many, and their mean / p99 time."""
    e, parts = run.get("engine", {}), []
    for kind, label in (("load", "loads"), ("upload", "uploads"), ("gpu_eviction", "GPU evictions"),
                        ("host_eviction", "host evictions")):
        t = e.get("adapter_timings_s", {}).get(kind) or {}
        parts.append(f"{label} {t.get('count', 0)} (mean {_ms(t.get('mean'))}, p99 {_ms(t.get('p99'))})")
    prefetches = e.get("adapter_prefetches")
    return "; ".join(parts) + ("" if prefetches is None else f"; {prefetches} of the uploads prefetched")


def checks(runs: list[dict]) -> list[str]:
    lines = []
    by = {}
    for r in runs:
        if r.get("phase") != "calibration":
            by.setdefault((r["group"], r["workload"]["num_adapters"]), {})[r["target"]] = r
    for (prefix, n), group in sorted(by.items()):
        inproc, triton = group.get("inproc"), group.get("triton")
        if inproc and triton:
            a, b = inproc["summary"], triton["summary"]
            ratio = b["output_tok_s"] / a["output_tok_s"] if a["output_tok_s"] else 0.0
            steady = (b["steady_output_tok_s"] / a["steady_output_tok_s"]
                      if a.get("steady_output_tok_s") and b.get("steady_output_tok_s") else None)
            lines.append(f"[{prefix} N={n}] server / in-process output tok/s = {b['output_tok_s']:.0f} / "
                         f"{a['output_tok_s']:.0f} = {ratio:.2f}x (steady state "
                         f"{'-' if steady is None else f'{steady:.2f}x'}; target >= 0.9x); errors: triton "
                         f"{b['errors']} (+{triton['engine'].get('stream_errors', 0)} stream), inproc {a['errors']}"
                         " (target 0)")
            pa = triton.get("perf_analyzer")
            if pa:
                ours = b.get("steady_req_s")
                lines.append(f"[{prefix} N={n}] client check: perf_analyzer --streaming {pa.get('req_s')} req/s vs "
                             f"this client {'-' if ours is None else f'{ours:.2f}'} req/s in steady state "
                             f"({b['req_s']:.2f} over the whole run) at the same concurrency (ok={pa.get('ok')})")
        for base in ("hf", "hf-peft"):
            if inproc and group.get(base):
                other = group[base]["summary"]["output_tok_s"]
                goal = "10x" if base == "hf" else "300x"
                lines.append(f"[{prefix} N={n}] multilora / {base} output tok/s = {inproc['summary']['output_tok_s']:.0f}"
                             f" / {other:.1f} = {inproc['summary']['output_tok_s'] / other:.1f}x (target >= {goal})"
                             if other else f"[{prefix} N={n}] {base}: no throughput")
        bound = inproc and inproc.get("decode_bound")
        if bound and bound.get("decode_tok_s"):
            got = inproc["summary"]["steady_output_tok_s"] or inproc["summary"]["output_tok_s"]
            lines.append(f"[{prefix} N={n}] output tok/s {got:.0f} (steady state) = {got / bound['decode_tok_s']:.2f}x "
                         f"the bound {bound['decode_tok_s']:.0f}: {bound['rows']} rows decoding together over "
                         f"{bound['distinct_adapters']} distinct adapters at ({bound['prompt_len']} + "
                         f"{bound['output_len']}) tokens (target >= 0.9x)")
            if bound.get("batch_tok_s"):
                lines.append(f"[{prefix} N={n}] output tok/s {got:.0f} = {got / bound['batch_tok_s']:.2f}x that closed "
                             f"batch over its whole span, prefill included ({bound['batch_tok_s']:.0f} tok/s; a reference, "
                             "not a bound: a closed loop also overlaps its refills' prefill with decoding)")
        for r in group.values():
            if not r["workload"]["num_adapters"] or r["target"] not in ("inproc", "triton"):
                continue
            e = r["engine"]
            dist = e.get("mean_distinct_adapters_per_step")
            share, chunk = e.get("prefill_step_share"), e.get("mean_prefill_tokens_per_prefill_step")
            mix = "" if share is None else (f" ({100 * share:.0f}% of them with prompt chunks"
                                            + ("" if chunk is None else f", {chunk:.0f} prompt tokens each") + ")")
            lines.append(f"[{prefix} N={n} {r['target']}] mean distinct adapters per step "
                         f"{'-' if dist is None else f'{dist:.1f}'} over {e.get('engine_steps')} steps{mix}; "
                         + adapter_line(r))
            if e.get("thread_cpu_s") and e.get("wall_s"):
                lines.append(f"[{prefix} N={n} {r['target']}] " + thread_cpu_line(e["thread_cpu_s"], e["wall_s"]))
        for r in group.values():
            if r["workload"]["rate"] is None:
                continue
            s, m = r["summary"], r.get("memory", {})
            cold, wait, bound = s["itl_cold_over_warm"], queue_wait(r), s.get("wait_bound")
            cold_decode = s.get("itl_cold_over_warm_decode")
            verdict = ("not checked: no per-request engine times" if bound is None else
                       f"{bound['violations']} of {bound['checked']} requests over it, worst "
                       f"{bound['worst_wait_over_bound']:.2f}x it (target: none over), S "
                       f"{_ms(bound['longest_request_s'])}, L {_ms(bound['longest_load_s'])}")
            lines.append(f"[{prefix} N={n} {r['target']} Poisson {r['workload']['rate']:.2f} req/s] finished "
                         f"{s['finished']}/{s['requests']}; TTFT p99 {_ms(s['ttft_s']['p99'])}, max "
                         f"{_ms(s['ttft_s']['max'])}; queue wait p50 {_ms(wait.get('p50'))}, p99 {_ms(wait.get('p99'))}, "
                         f"max {_ms(wait.get('max'))}; the design's bound per request, (k ahead + 1) x (S + L) "
                         f"(docs/limits.md): {verdict}; preemptions {r['engine'].get('preemptions', '-')}; "
                         "ITL while adapters load / warm = "
                         f"{'-' if cold is None else f'{cold:.2f}x'} (target <= 1.2x; "
                         f"{s['itl_cold_s']['count']} cold gaps), over decode-only gaps (no prompt finished in "
                         f"the gap's closing step) {'-' if cold_decode is None else f'{cold_decode:.2f}x'} "
                         f"({s.get('itl_cold_decode_s', {}).get('count', 0)} cold); GPU memory at warm-up {m.get('warmup_start_gib')}, "
                         f"run start {m.get('first_gib')}, end {m.get('last_gib')} GiB, peak {m.get('peak_gib')} "
                         "(target: flat)")
    return lines


def main(argv=None) -> int:
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv) if Path(p).is_file()]
    runs = load_runs(paths)
    if not runs:
        print("no runs found in", paths)
        return 1
    if paths:
        plot(runs, paths[0].parent / "serving-summary.png")
    print(table(runs))
    print()
    print("\n".join(checks(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
