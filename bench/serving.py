"""Serving benchmark: a multi-adapter load against the in-process engine, the Triton server, or HF.

It writes what it needs under --work (reused by later runs): a model directory at real shapes
(Llama-3-8B, or the tiny smoke preset) served with load_format="dummy", a tokenizer of the full
vocabulary, and random PEFT adapters (safetensors) of mixed ranks. Then it runs the workload
(see bench/serving_workload.py for the conventions: Zipf popularity, length distributions,
closed loop or Poisson arrivals, seed) against each --target, for each --adapters count, and
writes JSON + a PNG plot under --out ($OUT by default), printing progress and a table last.

    # the server path vs in-process, 64 streams, base + 16 adapters (GPU)
    python bench/serving.py --target inproc,triton --adapters 16 --base-share 0.25 --concurrency 64
    # 1024 adapters, 32 GPU slots, Poisson at 80% of the closed-loop rate
    python bench/serving.py --target inproc --adapters 1024 --max-loras 32 --max-cpu-loras 128 --rate-fraction 0.8
    # the smoke configuration (CPU, seconds)
    python bench/serving.py --preset tiny --target inproc --adapters 16 --requests 24 --concurrency 4

Targets: inproc (AsyncLLMEngine.generate), triton (scripts/serve.py + gRPC streaming from
--client-procs processes; --perf-analyzer adds perf_analyzer --streaming at the same
concurrency as a check on the client), hf (transformers generate), hf-peft (PEFT mixed
adapter_names). Several targets run one after another, each in a process of its own so each
starts with the whole GPU. The inproc report also gives the CPU seconds each of the process's threads
used over the measured part (engine, outputs, preparing pool, client): a thread that waits for the
GIL uses none, so beside the wall time they say which threads held the host.

    # what the adapter loads cost the engine: the same run with every adapter read during warm-up
    python bench/serving.py --target inproc --adapters 128 --ranks 16 --max-loras 64 --prompt-len 256 \
        --output-len 128 --requests 192 --warmup 600 --max-cpu-loras 128
"""

import argparse
import dataclasses
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from serving_device import MemorySampler, device_name   # noqa: E402
from serving_report import cdf_points, load_runs, plot, records_json, summarize, table, wait_bound_check   # noqa: E402
from serving_workload import PRESETS, Workload, make_requests, parse_range, write_adapters, write_model_dir  # noqa: E402

TARGETS = ("inproc", "triton", "hf", "hf-peft")
WARMUP_TOKENS = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="inproc", help=f"comma-separated, of {TARGETS}")
    p.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    w = p.add_argument_group("workload")
    w.add_argument("--adapters", default="16", help="adapter counts, comma-separated: one run each (1,16,128,1024)")
    w.add_argument("--ranks", default="8,16,64", help="LoRA ranks, cycled over adapters")
    w.add_argument("--alpha", type=float, default=1.0, help="Zipf exponent of adapter popularity (0 = uniform)")
    w.add_argument("--base-share", type=float, default=0.0, help="fraction of requests for the base model")
    w.add_argument("--prompt-len", default="128:512", help="A (fixed) or A:B (uniform integers)")
    w.add_argument("--output-len", default="128", help="A (fixed) or A:B (uniform integers)")
    w.add_argument("--requests", type=int, default=256)
    w.add_argument("--concurrency", type=int, default=64, help="closed loop (unless --rate or --rate-fraction)")
    w.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second instead of a closed loop")
    w.add_argument("--rate-fraction", type=float, default=None,
                   help="Poisson at this fraction of the req/s a closed-loop run at --concurrency measures first")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--warmup", type=int, default=None, help="warm-up requests (default: --concurrency)")
    e = p.add_argument_group("engine (EngineConfig fields)")
    e.add_argument("--max-loras", type=int, default=16)
    e.add_argument("--max-cpu-loras", type=int, default=None)
    e.add_argument("--max-num-seqs", type=int, default=None, help="default: --concurrency (at least 64)")
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--num-kv-blocks", type=int, default=None)
    e.add_argument("--dtype", default=None, help="default: bfloat16 on a GPU, float32 on the CPU")
    e.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    e.add_argument("--switch-interval", type=float, default=None,
                   help="inproc: Python's thread switch interval in seconds (default: the engine's own, 0.0002)")
    e.add_argument("--engine-arg", action="append", default=[], help="KEY=VALUE, any other EngineConfig field")
    o = p.add_argument_group("targets and output")
    o.add_argument("--client-procs", type=int, default=4, help="triton: client processes sharing the load")
    o.add_argument("--perf-analyzer", action="store_true", help="triton: also run perf_analyzer --streaming")
    o.add_argument("--server-python", default=None,
                   help="triton: the interpreter that runs scripts/serve.py and the server's Python backend "
                        "(default: this one); its environment needs nvidia-pytriton, numpy < 2 and multilora")
    o.add_argument("--decode-bound", action="store_true",
                   help="inproc: after each run, the decode rate of a closed batch of --concurrency rows with "
                        "as many distinct adapters as the run batched on average (the bound its tok/s is held to)")
    o.add_argument("--hf-batch", type=int, default=None, help="hf, hf-peft: batch size (default: --concurrency)")
    o.add_argument("--hf-requests", type=int, default=None, help="hf, hf-peft: requests (default: one batch)")
    o.add_argument("--unique-adapter-files", type=int, default=8, help="distinct weight files per rank (hard links)")
    o.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "multilora-serving"))
    o.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                                       "multilora-serving", "out"),
                   help="where the JSON, PNG and logs go (default: $OUT, else under /tmp)")
    o.add_argument("--target-timeout", default=None,
                   help="with several targets: seconds each may run before it is stopped (its run is then "
                        "missing); one value, or one per target, comma-separated")
    o.add_argument("--label", default=None, help="name of this run's files (default: from the options)")
    o.add_argument("--save-records", action="store_true", help="put every request's record in the JSON")
    o.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines")
    return p.parse_args(argv)


def workload_for(args, num_adapters: int, rate=None) -> Workload:
    return Workload(num_adapters=num_adapters, ranks=tuple(int(r) for r in args.ranks.split(",")), alpha=args.alpha,
                    base_share=args.base_share if num_adapters else 1.0, prompt_len=parse_range(args.prompt_len),
                    output_len=parse_range(args.output_len), num_requests=args.requests,
                    concurrency=None if rate else args.concurrency, rate=rate, seed=args.seed)


def engine_args(args) -> dict:
    import torch

    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    settings = {"load_format": "dummy", "enable_lora": True, "dtype": args.dtype or ("bfloat16" if cuda else "float32"),
                "device": args.device or ("cuda:0" if cuda else "cpu"), "max_loras": args.max_loras,
                "max_lora_rank": max(int(r) for r in args.ranks.split(",")), "max_cpu_loras": args.max_cpu_loras,
                "max_num_seqs": args.max_num_seqs or max(64, args.concurrency),
                "max_num_batched_tokens": args.max_num_batched_tokens, "num_kv_blocks": args.num_kv_blocks}
    for pair in args.engine_arg:
        key, _, value = pair.partition("=")
        try:
            settings[key.strip()] = json.loads(value)     # numbers, true/false, null
        except json.JSONDecodeError:
            settings[key.strip()] = value.strip()         # a plain string: "float32", "cuda:1"
    return {k: v for k, v in settings.items() if v is not None}


class Progress:
    """Progress lines at most every `every` seconds."""

    def __init__(self, label: str, total: int, every: float):
        self.label, self.total, self.every = label, total, every
        self.start = self.last = time.monotonic()

    def update(self, done: int, tokens: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every or done == self.total:
            self.last = now
            rate = tokens / (now - self.start) if now > self.start else 0.0
            print(f"  [{self.label}] {now - self.start:6.1f}s  {done}/{self.total} done  {tokens} tokens  "
                  f"{rate:.0f} tok/s", flush=True)


def run_target(args, target: str, model_dir: Path, root: Path, counts: list[int], out: Path, label: str) -> list:
    """Every adapter count against one target, in this process (one engine or server for all)."""
    settings = engine_args(args)
    vocab = PRESETS[args.preset]["vocab_size"]
    runs, memory = [], MemorySampler(settings["device"])
    if target in ("hf", "hf-peft"):
        from serving_hf import run_hf

        for n in counts:
            wl = dataclasses.replace(workload_for(args, n), num_requests=args.hf_requests or args.hf_batch
                                     or args.concurrency)
            requests = make_requests(wl, vocab)
            memory.begin()
            records, info = run_hf(model_dir, root, requests, args.hf_batch or args.concurrency, target == "hf-peft",
                                   settings["device"], settings["dtype"], Progress(f"{target} N={n}", len(requests),
                                                                                   args.progress_every))
            runs.append(_run_record(args, target, label, wl, records, {"stats": info, "load_windows": []},
                                    memory.end(), settings))
        return runs
    if target == "inproc":
        from serving_inproc import InprocTarget

        if args.switch_interval:    # before the engine starts: it only ever shortens the interval
            sys.setswitchinterval(args.switch_interval)
        session = InprocTarget(model_dir, root, settings)
    else:
        from serving_triton import TritonTarget

        session = TritonTarget(model_dir, root, settings, Path(args.work) / f"run-{label}", out / f"{label}-server.log",
                               args.client_procs, python=args.server_python)
    try:
        for n in counts:
            wl = workload_for(args, n)
            warm = dataclasses.replace(wl, num_requests=args.warmup if args.warmup is not None else args.concurrency,
                                       output_len=(WARMUP_TOKENS, WARMUP_TOKENS))
            print(f"{target} N={n}: warm-up ({warm.num_requests} requests)", flush=True)
            memory.begin()
            session.load(make_requests(warm, vocab, seed_offset=1), args.concurrency, None)
            if args.rate_fraction:
                calib = dataclasses.replace(wl, num_requests=max(args.concurrency, args.requests // 4))
                print(f"{target} N={n}: closed-loop calibration: {calib.describe()}", flush=True)
                records, _ = session.load(make_requests(calib, vocab, seed_offset=2), args.concurrency,
                                          Progress(f"{target} N={n} calib", calib.num_requests, args.progress_every))
                closed = summarize(records)
                wl = workload_for(args, n, rate=args.rate_fraction * closed["req_s"])
                runs.append(_run_record(args, target, label, calib, records, {}, {}, settings, phase="calibration"))
            elif args.rate:
                wl = workload_for(args, n, rate=args.rate)
            print(f"{target} N={n}: {wl.describe()}", flush=True)
            requests = make_requests(wl, vocab)
            memory.mark()
            session.begin()
            records, extra = session.load(requests, wl.concurrency,
                                          Progress(f"{target} N={n}", len(requests), args.progress_every))
            engine = session.end()
            engine.update(extra)
            run = _run_record(args, target, label, wl, records, engine, memory.end(), settings)
            if target == "triton" and args.perf_analyzer and wl.concurrency:
                from serving_perf_analyzer import run_perf_analyzer

                print(f"{target} N={n}: perf_analyzer --streaming at concurrency {wl.concurrency}", flush=True)
                run["perf_analyzer"] = run_perf_analyzer(session.server.grpc_url, requests, wl.concurrency, out)
            if target == "inproc" and args.decode_bound:
                run["decode_bound"] = _decode_bound(session, wl, engine, vocab, args)
            runs.append(run)
    finally:
        session.close()
    return runs


def _decode_bound(session, wl: Workload, engine: dict, vocab: int, args) -> dict:
    """A closed batch of `concurrency` requests at the workload's mean lengths, over D distinct adapters
    (D = the run's mean distinct per step, rounded), their adapters resident from the run: its tok/s while
    every row decodes is the decode bound; over the whole batch (the prompts' prefill, then the decode
    steps, all rows together) `batch_tok_s`, a reference for a workload whose prompts are prefilled too
    (not a bound: a closed loop overlaps its refills' prefill with other rows' decoding)."""
    import random

    from serving_report import batch_rate, decode_rate
    from serving_workload import BenchRequest

    mean = engine.get("stats", {}).get("mean_distinct_adapters_per_step") or 0
    distinct = min(max(1, round(mean)), args.max_loras, wl.num_adapters) if wl.num_adapters else 0
    rng = random.Random(wl.seed + 7)
    prompt = round(sum(wl.prompt_len) / 2)
    requests = [BenchRequest(i, (i % distinct) if distinct else None, [rng.randrange(3, vocab) for _ in range(prompt)],
                             wl.output_len[1], None) for i in range(args.concurrency)]
    print(f"inproc: decode bound, {args.concurrency} rows x ({prompt} + {wl.output_len[1]}) tokens, "
          f"{distinct} distinct adapters", flush=True)
    records, _ = session.load(requests, args.concurrency, None)
    return {"distinct_adapters": distinct, "rows": args.concurrency, "prompt_len": prompt,
            "output_len": wl.output_len[1], "decode_tok_s": decode_rate(records), "batch_tok_s": batch_rate(records)}


def _run_record(args, target, label, wl, records, engine, memory, settings, phase="measured") -> dict:
    stats = dict(engine.get("stats", {}))
    if "stream_errors" in engine:
        stats["stream_errors"] = engine["stream_errors"]
    # group: the label of the whole invocation (a multi-target parent gives each child LABEL-TARGET).
    group = label[:-len(target) - 1] if label.endswith("-" + target) else label
    suffix = "-closed" if phase == "calibration" else ""
    summary = summarize(records, engine.get("load_windows", []))
    summary["wait_bound"] = wait_bound_check(records, (stats.get("adapter_timings_s", {}).get("load") or {}).get("max")
                                             or 0.0)
    return {"label": f"{group}{suffix}-N{wl.num_adapters}", "group": group, "phase": phase, "target": target,
            "device": device_name(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
            "workload": dataclasses.asdict(wl), "engine_args": settings, "engine": stats,
            "summary": summary, "memory": memory,
            "cdf": cdf_points(records), **({"records": records_json(records)} if args.save_records else {})}


def main(argv=None) -> int:
    args = parse_args(argv)
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    bad = sorted(set(targets) - set(TARGETS))
    if bad:
        sys.exit(f"unknown target(s) {bad}; choose from {TARGETS}")
    counts = [int(n) for n in args.adapters.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = args.label or f"serving-{args.preset}"
    if len(targets) > 1:     # each target in a fresh process: each starts with the whole GPU
        paths = []
        limits = [float(x) for x in args.target_timeout.split(",")] if args.target_timeout else [None]
        limits = limits * len(targets) if len(limits) == 1 else limits
        for t, limit in zip(targets, limits):
            argv_t = _replace_option(sys.argv[1:] if argv is None else list(argv), "--target", t)
            argv_t = _replace_option(argv_t, "--label", f"{label}-{t}")
            code = _run_child([sys.executable, os.path.abspath(__file__), *argv_t], limit)
            path = out / f"{label}-{t}.json"
            if code != 0 or not path.is_file():
                print(f"target {t} failed (exit code {code})", file=sys.stderr, flush=True)
                continue
            paths.append(path)
        runs = load_runs(paths)
    else:
        work = Path(args.work)
        model_dir = write_model_dir(work / f"model-{args.preset}", args.preset)
        root = write_adapters(work / f"adapters-{args.preset}-{args.ranks.replace(',', '_')}", args.preset,
                              workload_for(args, max(counts)), args.unique_adapter_files)
        runs = run_target(args, targets[0], model_dir, root, counts, out, label)
        gc.collect()
    (out / f"{label}.json").write_text(json.dumps({"runs": runs}, indent=1))
    png = plot(runs, out / f"{label}.png")
    print(f"\nwrote {out / f'{label}.json'}" + (f" and {png}" if png else " (no matplotlib: no plot)"))
    print(table(runs))
    return 0 if runs and all(r["summary"]["finished"] == r["summary"]["requests"] for r in runs) else 1


def _run_child(cmd: list[str], timeout) -> int:
    """A target's process; past `timeout` it gets SIGTERM (it then stops its server), then SIGKILL."""
    child = subprocess.Popen(cmd)
    try:
        return child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"stopping {cmd[3:]} after {timeout:.0f}s", file=sys.stderr, flush=True)
        child.terminate()
        try:
            return child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            return child.wait()


def _replace_option(argv: list[str], flag: str, value: str) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == flag:
            skip = True
            continue
        if a.startswith(flag + "="):
            continue
        out.append(a)
    return out + [flag, value]


if __name__ == "__main__":
    # SIGTERM (timeout, Ctrl-C of a parent) unwinds like an exception, so a started server is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sys.exit(main())
