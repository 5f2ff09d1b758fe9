"""bench/serving.py's measurements: per-request records -> a summary, a table, JSON and a PNG plot.

Definitions (client side, the same for every target):
- TTFT: from sending the request to the first response that carries a token.
- TPOT: per request, (last token time - first token time) / (tokens after the first response).
- ITL: every gap between two token-carrying responses of a stream, divided by the tokens of
  the later one; classed "cold" when the gap overlaps an adapter load (disk read + checks) or,
  in-process, a copy to the GPU; "warm" otherwise. Arrivals' prompts run in the same steps as the
  running streams and lengthen their gaps whether or not an adapter loads, and a cold request's
  prompt runs right after its load: so each class is also reported over its decode-only gaps, those
  whose closing step finished no request's prompt (no first token of another stream within half a
  gap of its end), which isolates what a load itself costs the running batch.
- Output tok/s and req/s: over the measured window, first send to last final response; the
  steady_* figures stop at the last send, before the load drains (perf_analyzer's kind).
- Queue wait, prefill, service (engine side, where the target reports it: inproc): arrival in the
  engine to first step (preparing + waiting), first step to first token, first step to the end.
"""

import bisect
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional


@dataclass
class RequestRecord:
    index: int
    adapter: Optional[str]
    prompt_len: int
    output_len: int                  # asked for
    send_s: float
    first_token_s: Optional[float] = None
    end_s: Optional[float] = None
    tokens: int = 0
    error: Optional[str] = None
    token_times: list[tuple[float, int]] = field(default_factory=list)   # (time, tokens in that response)
    arrival_t: Optional[float] = None    # engine side (RequestMetrics, time.time()): arrival in the engine
    queue_s: Optional[float] = None      # arrival -> first step
    prefill_s: Optional[float] = None    # first step -> first token
    service_s: Optional[float] = None    # first step -> finished

    def on_tokens(self, now: float, count: int) -> None:
        if count <= 0:
            return
        if self.first_token_s is None:
            self.first_token_s = now
        self.tokens += count
        self.token_times.append((now, count))

    @property
    def finished(self) -> bool:
        return self.end_s is not None and self.error is None


def percentile(values: list[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    import numpy as np

    return float(np.percentile(values, q))


def _dist(values: list[float]) -> dict:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90), "p99": percentile(values, 99),
            "max": max(values) if values else None, "mean": sum(values) / len(values) if values else None,
            "count": len(values)}


def timing_dists(events: list[tuple[str, float]]) -> dict:
    """(kind, seconds) events -> per kind: count, sum, mean, p50/p90/p99, max."""
    by_kind: dict[str, list[float]] = {}
    for kind, seconds in events:
        by_kind.setdefault(kind, []).append(seconds)
    return {kind: {**_dist(values), "sum": sum(values)} for kind, values in sorted(by_kind.items())}


def step_stats(counts: dict) -> dict:
    """Counter deltas over a run -> its steps' make-up; pops the step counters out of `counts`: the mean
    distinct adapters per step, and the steps that held prompt chunks (which take longer than a decode
    step) with their mean prompt tokens."""
    steps, adapters = counts.pop("steps"), counts.pop("step_adapters")
    prefill_steps, prefill_tokens = counts.pop("prefill_steps"), counts.pop("prefill_tokens")
    return {"engine_steps": steps, "mean_distinct_adapters_per_step": adapters / steps if steps else None,
            "prefill_step_share": prefill_steps / steps if steps else None,
            "mean_prefill_tokens_per_prefill_step": prefill_tokens / prefill_steps if prefill_steps else None}


def _tpot(r: RequestRecord) -> float:
    return (r.token_times[-1][0] - r.first_token_s) / (r.tokens - r.token_times[0][1])


def _overlaps(a: float, b: float, windows: list[tuple[float, float]]) -> bool:
    return any(start < b and a < end for start, end in windows)


def _any_within(sorted_times: list[float], t: float, half: float) -> bool:
    i = bisect.bisect_left(sorted_times, t - half)
    return i < len(sorted_times) and sorted_times[i] <= t + half


def _mean_ratio(a: list[float], b: list[float]) -> Optional[float]:
    return (sum(a) / len(a)) / (sum(b) / len(b)) if a and b else None


def summarize(records: list[RequestRecord], load_windows: list[tuple[float, float]] = ()) -> dict:
    done = [r for r in records if r.finished]
    sends = [r.send_s for r in records]
    ends = [r.end_s for r in records if r.end_s is not None]
    window = (max(ends) - min(sends)) if ends and sends else 0.0
    tokens = sum(r.tokens for r in records)
    ttft = [r.first_token_s - r.send_s for r in done if r.first_token_s is not None]
    tpot = [_tpot(r) for r in done if len(r.token_times) > 1]
    warm, cold, warm_decode, cold_decode = [], [], [], []
    first_tokens = sorted(r.first_token_s for r in records if r.first_token_s is not None)
    for r in done:
        for (t0, _), (t1, n) in zip(r.token_times, r.token_times[1:]):
            is_cold = _overlaps(t0, t1, load_windows)
            (cold if is_cold else warm).append((t1 - t0) / n)
            if not _any_within(first_tokens, t1, (t1 - t0) / 2):
                (cold_decode if is_cold else warm_decode).append((t1 - t0) / n)
    # Steady state: until the last request is sent, a closed loop holds its full concurrency; after
    # it, the load drains. What finished by then, over that span, is the rate a long run converges to
    # (the figure perf_analyzer's measurement windows give).
    last_send = max(sends) if sends else 0.0
    steady_span = last_send - min(sends) if sends else 0.0
    steady_tokens = sum(n for r in records for t, n in r.token_times if t <= last_send)
    steady_done = sum(1 for r in done if r.end_s <= last_send)
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error[:120]] = errors.get(r.error[:120], 0) + 1
    return {
        "requests": len(records), "finished": len(done), "errors": sum(errors.values()), "error_kinds": errors,
        "unfinished": sum(1 for r in records if r.end_s is None),
        "short": sum(1 for r in done if r.tokens != r.output_len),
        "seconds": window, "output_tokens": tokens,
        "output_tok_s": tokens / window if window else 0.0, "req_s": len(done) / window if window else 0.0,
        "steady_output_tok_s": steady_tokens / steady_span if steady_span > 0 else None,
        "steady_req_s": steady_done / steady_span if steady_span > 0 else None,
        "ttft_s": _dist(ttft), "tpot_s": _dist(tpot), "itl_warm_s": _dist(warm), "itl_cold_s": _dist(cold),
        "itl_cold_over_warm": _mean_ratio(cold, warm),
        "itl_warm_decode_s": _dist(warm_decode), "itl_cold_decode_s": _dist(cold_decode),
        "itl_cold_over_warm_decode": _mean_ratio(cold_decode, warm_decode),
        "queue_wait_s": _dist([r.queue_s for r in done if r.queue_s is not None]),
        "prefill_s": _dist([r.prefill_s for r in done if r.prefill_s is not None]),
        "service_s": _dist([r.service_s for r in done if r.service_s is not None]),
        "distinct_adapters_requested": len({r.adapter for r in records if r.adapter}),
    }


def wait_bound_check(records: list[RequestRecord], longest_load_s: float) -> Optional[dict]:
    """docs/limits.md's bound on each request's queue wait: (k + 1) x (S + L), with k = the requests that
    may have been ahead of it (arrived before it started, started after it arrived), S = the run's longest
    first step -> end, L = its longest adapter load. None without engine-side times (Triton server target)."""
    timed = [r for r in records if r.finished and r.arrival_t is not None]
    if not timed:
        return None
    span = max(r.service_s for r in timed) + longest_load_s
    spans = [(r.arrival_t, r.arrival_t + r.queue_s) for r in timed]
    ratios = []
    for i, (arrived, started) in enumerate(spans):
        ahead = sum(1 for j, (a, s) in enumerate(spans) if j != i and a < started and s > arrived)
        ratios.append((started - arrived) / ((ahead + 1) * span))
    return {"checked": len(timed), "longest_request_s": span - longest_load_s, "longest_load_s": longest_load_s,
            "violations": sum(1 for x in ratios if x > 1), "worst_wait_over_bound": max(ratios)}


def decode_rate(records: list[RequestRecord]) -> Optional[float]:
    """Tokens per second while every request of a closed batch is decoding: from the last first
    token to the first end (no prefill and no finished rows in that span)."""
    firsts = [r.first_token_s for r in records if r.first_token_s is not None]
    ends = [r.end_s for r in records if r.end_s is not None]
    if len(firsts) < len(records) or not ends or min(ends) <= max(firsts):
        return None
    t0, t1 = max(firsts), min(ends)
    return sum(n for r in records for t, n in r.token_times if t0 < t <= t1) / (t1 - t0)


def batch_rate(records: list[RequestRecord]) -> Optional[float]:
    """Output tokens per second of a closed batch over its whole span, first send to last end."""
    ends = [r.end_s for r in records if r.end_s is not None]
    if len(ends) < len(records) or not records:
        return None
    return sum(r.tokens for r in records) / (max(ends) - min(r.send_s for r in records))


def cdf_points(records: list[RequestRecord], limit: int = 400) -> dict:
    """Sorted TTFT and TPOT values, thinned to at most `limit` points, for the CDF plot."""
    done = [r for r in records if r.finished and r.first_token_s is not None]
    ttft = sorted(r.first_token_s - r.send_s for r in done)
    tpot = sorted(_tpot(r) for r in done if len(r.token_times) > 1)
    thin = lambda v: v if len(v) <= limit else [v[round(i * (len(v) - 1) / (limit - 1))] for i in range(limit)]
    return {"ttft_s": thin(ttft), "tpot_s": thin(tpot)}


def records_json(records: list[RequestRecord]) -> list[dict]:
    out = []
    for r in records:
        d = asdict(r)
        d.pop("token_times")
        out.append(d)
    return out


# ---- table and plot ----------------------------------------------------------------------

def _ms(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value * 1e3:.1f}"


def queue_wait(run: dict) -> dict:
    """The run's queue waits: per request where the target reports them (inproc), else the server's histogram."""
    mine = run["summary"].get("queue_wait_s") or {}
    return mine if mine.get("count") else run.get("engine", {}).get("queue_wait_s") or {}


def table(runs: list[dict]) -> str:
    """One line per run: what a reader checks first."""
    head = (f"{'run':28} {'target':8} {'N':>5} {'done/req':>10} {'err':>4} {'out tok/s':>10} {'req/s':>7} "
            f"{'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>7} {'wait p99':>8} {'loads':>6} {'evict':>6} "
            f"{'dist/step':>9} {'peak GiB':>8}")
    lines = [head, "-" * len(head)]
    for run in runs:
        s, e = run["summary"], run.get("engine", {})
        mem = run.get("memory", {}).get("peak_gib")
        dist = e.get("mean_distinct_adapters_per_step")
        lines.append(
            f"{run['label'][:28]:28} {run['target']:8} {run['workload']['num_adapters']:5d} "
            f"{s['finished']:>4}/{s['requests']:<5} {s['errors']:4d} {s['output_tok_s']:10.1f} {s['req_s']:7.2f} "
            f"{_ms(s['ttft_s']['p50']):>9} {_ms(s['ttft_s']['p99']):>8} {_ms(s['tpot_s']['p50']):>9} "
            f"{_ms(s['tpot_s']['p99']):>7} {_ms(queue_wait(run).get('p99')):>8} {str(e.get('adapter_loads', '-')):>6} "
            f"{str(e.get('adapter_evictions', '-')):>6} {('-' if dist is None else f'{dist:.1f}'):>9} "
            f"{('-' if mem is None else f'{mem:.1f}'):>8}")
    lines.append("(TTFT, TPOT, wait in ms; wait = arrival in the engine to first step; N = adapters in the workload; "
                 "dist/step = mean distinct adapters per engine step; peak GiB = device memory in use, all processes)")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> Optional[Path]:
    """Throughput and p99 latency against the number of adapters (one line per target), and CDFs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    # One line per (invocation, target): only the points of one --adapters sweep are joined.
    series: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        if run.get("phase") != "calibration":
            series.setdefault((run.get("group", ""), run["target"]), []).append(run)
    for (group, target), members in sorted(series.items()):
        members = sorted(members, key=lambda r: r["workload"]["num_adapters"])
        n = [max(1, r["workload"]["num_adapters"]) for r in members]
        name = f"{group} {target}".strip()
        axes[0][0].plot(n, [r["summary"]["output_tok_s"] for r in members], "o-", label=name)
        axes[0][1].plot(n, [(r["summary"]["ttft_s"]["p99"] or 0) * 1e3 for r in members], "o-", label=f"{name} TTFT")
        axes[0][1].plot(n, [(r["summary"]["tpot_s"]["p99"] or 0) * 1e3 for r in members], "s--",
                        label=f"{name} TPOT")
    axes[0][1].set_yscale("log")
    for ax, title, ylabel in ((axes[0][0], "output throughput", "tok/s"), (axes[0][1], "p99 latency", "ms")):
        ax.set_xscale("log")
        ax.set_xlabel("adapters in the workload")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=7)
    for ax, key, title in ((axes[1][0], "ttft_s", "TTFT CDF"), (axes[1][1], "tpot_s", "TPOT CDF")):
        for run in runs:
            values = run.get("cdf", {}).get(key) or []
            if values:
                ys = [(i + 1) / len(values) for i in range(len(values))]
                ax.plot([v * 1e3 for v in values], ys, label=f"{run['label'][:28]} {run['target']}")
        ax.set_xscale("log")
        ax.set_xlabel("ms")
        ax.set_title(title)
        if ax.get_lines():      # HF baselines have no per-token times: nothing to plot or name
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def load_runs(paths: list[Path]) -> list[dict]:
    runs = []
    for p in paths:
        data = json.loads(Path(p).read_text())
        runs.extend(data["runs"] if "runs" in data else [data])
    return runs
