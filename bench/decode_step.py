"""Issue 7's benchmark: the engine's decode, sampled, LoRA, mixed and prefill steps beside their floors.

One call, side by side, through the public API (`LLM`, `LLMEngine.add_request / step / abort_request`):
Llama-3-8B shapes in bf16 with `load_format="dummy"`, a tokenizer of the full 128256-token vocabulary
(so detokenizing costs what it costs in production), random rank-16 PEFT adapters at real shapes. The
floors (step_floors.py) are measured in the same process after the cases, at the base decode case's
batch and mean context.

    mkdir -p /tmp/pp && ln -sfn $PWD/kernels /tmp/pp/multilora_kernels
    PYTHONPATH=$PWD/backend_src:/tmp/pp python3 bench/decode_step.py --profile   # H200, a few minutes
    ... bench/decode_step.py --quick      # 8 layers, fewer steps
    ... bench/decode_step.py --tiny       # CPU, a tiny model, seconds (the smoke test)
    ... bench/decode_step.py --engine-arg enforce_eager=true    # any EngineConfig field, repeatable

A step's time is the interval between consecutive `step()` returns with no synchronisation in
between (the step period a running server sees, which overlap of host and GPU shortens), median
over many steps after warm-up; `synced_step_ms` also synchronises the GPU at the end of each step.
The report is printed last, as a table of each "Done when" target of issue 7 beside its figure,
and written to $OUT/decode_step.json (--out to choose the folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import LLAMA3_8B, write_adapter  # noqa: E402
from full_vocab_tokenizer import write_full_vocab_tokenizer  # noqa: E402
from step_floors import ModelShapes, decode_floors, matmul_tflops, prefill_floor_ms  # noqa: E402
from timing import Timer  # noqa: E402

BASELINE_CLOSED_TOK_S = 3051.0    # issue 7's "where it stands", closed batch 64 x (512 + 128), base
FIRST_TOKEN_ID = 258              # the full-vocab tokenizer's first ordinary token (after bytes, bos, eos)
SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=50)
CHUNK_WINDOW = 3                  # steps per window of the chunk case: the chunk's step, its neighbours


@dataclass(frozen=True)
class Size:
    """How big each case is; `full` is issue 7's workload."""

    batch: int = 64
    prompt_len: int = 512
    output_len: int = 128           # closed batch
    warmup_steps: int = 5
    steps: int = 30                 # timed decode steps per case (and as many again synchronised)
    chunk_windows: int = 12         # timed windows holding a chunk (and as many plain ones)
    prefill_reps: int = 3
    adapter_counts: tuple[int, int] = (8, 32)
    rank: int = 16
    layers: int | None = None       # None: the model's own
    matmul_n: int = 8192
    profile_steps: int = 5

    @property
    def decode_tokens(self) -> int:
        """max_tokens of the rows kept decoding: enough that none ends during a case."""
        return self.warmup_steps + max(2 * self.steps, 2 * CHUNK_WINDOW * (self.chunk_windows + 2)) + 8


SIZES = {"full": Size(), "quick": Size(output_len=64, steps=15, chunk_windows=5, prefill_reps=1, layers=8),
         "tiny": Size(batch=32, prompt_len=16, output_len=4, warmup_steps=1, steps=3, chunk_windows=2, prefill_reps=1,
                      matmul_n=128, profile_steps=2)}
TINY_MODEL = dict(LLAMA3_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, torch_dtype="float32")


# ---------------------------------------------------------------- files


def write_model(work: Path, config: dict) -> Path:
    """config.json at the model's shapes and the full-vocab tokenizer; weights come from load_format=dummy."""
    path = write_full_vocab_tokenizer(work / "model", vocab_size=config["vocab_size"])
    (path / "config.json").write_text(json.dumps(config))
    return path


def write_adapters(work: Path, config: dict, count: int, rank: int) -> list[Path]:
    dirs = [work / f"adapter{i}" for i in range(count)]
    # randn and safetensors release the GIL: 32 adapters of 84 MB take seconds, not half a minute.
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: write_adapter(dirs[i], config, rank, seed=i), range(count)))
    return dirs


# ---------------------------------------------------------------- driving the engine


class EngineDriver:
    """Puts the engine in a known state (B sequences decoding at context C) and times its steps."""

    def __init__(self, llm, size: Size, vocab: int, device: str):
        self.llm, self.engine, self.size = llm, llm.llm_engine, size
        self.vocab, self.cuda = vocab, device == "cuda"
        self._ids = 0
        self._gen = torch.Generator().manual_seed(0)

    def prompts(self, n: int) -> list[list[int]]:
        ids = torch.randint(FIRST_TOKEN_ID, self.vocab, (n, self.size.prompt_len), generator=self._gen)
        return ids.tolist()

    def add(self, params, lora=None) -> str:
        from multilora import SamplingParams

        self._ids += 1
        request_id = f"bench-{self._ids}"
        self.engine.add_request(request_id, self.prompts(1)[0], SamplingParams(**params), lora)
        return request_id

    def start(self, n: int, params_of, lora_of) -> list[str]:
        """Adds n requests and steps until every prompt is computed (all n rows decode from then on)."""
        ids = [self.add(params_of(i), lora_of(i)) for i in range(n)]
        limit = 4 * n * self.size.prompt_len // self.engine.config.max_num_batched_tokens + 4 * n + 8
        for _ in range(limit):
            if self.prefilled(ids):
                return ids
            self.engine.step()
        raise RuntimeError(f"{n} prompts of {self.size.prompt_len} tokens not computed after {limit} steps")

    def prefilled(self, ids: list[str]) -> bool:
        seqs = [self.engine.requests[i] for i in ids]
        return all(s.num_computed_tokens >= len(s.prompt_token_ids) for s in seqs)

    def mean_context(self, ids: list[str]) -> float:
        return statistics.fmean(self.engine.requests[i].num_tokens for i in ids)

    def stop(self, ids: list[str]) -> None:
        for request_id in ids:
            self.engine.abort_request(request_id)
        for _ in range(8):     # an engine that defers aborts to its next step gets that step
            if not self.engine.has_unfinished_requests():
                return
            self.engine.step()
        raise RuntimeError("the bench's aborted requests are still in the engine")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def intervals(self, k: int, synced: bool = False, drain: bool = True) -> list[float]:
        """Milliseconds between consecutive step() returns (synced: the GPU drained at each; drain=False:
        no drain before or after either, the first interval counts from the call)."""
        if drain:
            self.sync()
        times, last = [], time.perf_counter()
        for _ in range(k):
            self.engine.step()
            if synced:
                self.sync()
            now = time.perf_counter()
            times.append((now - last) * 1e3)
            last = now
        if drain:
            self.sync()
        return times


def decode_params(size: Size, sampled: bool):
    """Enough tokens for every timed step; eos ignored so no row ends early. Sampled: half the rows seeded."""
    tokens = size.decode_tokens
    if not sampled:
        return lambda i: dict(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return lambda i: dict(max_tokens=tokens, ignore_eos=True, seed=i if i % 2 == 0 else None, **SAMPLED)


def decode_case(driver: EngineDriver, sampled: bool = False, loras: list | None = None) -> dict:
    """B rows decoding at context prompt_len + a few: median step, free-running and synchronised."""
    size = driver.size
    lora_of = (lambda i: loras[i % len(loras)]) if loras else (lambda i: None)
    ids = driver.start(size.batch, decode_params(size, sampled), lora_of)
    driver.intervals(size.warmup_steps)
    context = driver.mean_context(ids)
    free = driver.intervals(size.steps)
    context = (context + driver.mean_context(ids)) / 2
    synced = driver.intervals(size.steps, synced=True)
    driver.stop(ids)
    return {"rows": size.batch, "adapters": len(loras or []), "sampled": sampled, "steps": len(free),
            "step_ms": statistics.median(free), "mean_ms": statistics.fmean(free),
            "synced_step_ms": statistics.median(synced), "context": context}


def chunk_case(driver: EngineDriver) -> dict:
    """One prompt_len-token prefill chunk plus B-1 decode rows in one step.

    B-1 rows decode, free-running (no device sync inside a measurement, so the host runs ahead
    of the GPU as in production); between two windows of CHUNK_WINDOW steps one new request (a
    single output token) arrives, so the second window holds its whole prompt as one chunk (the
    token budget exceeds prompt + B-1). The chunk step = that window's time minus CHUNK_WINDOW - 1
    decode steps (the median step of the window before it): whichever of the window's intervals
    the chunk's cost lands in (it moves with the host/GPU overlap), the window holds all of it.
    `host_cpu_ms`: the CPU time of this (the engine's) thread for the chunk step, counted the same
    way. The chunk's layers run eagerly, one host launch per kernel: near `step_ms`, the step is
    bound by the host, whose speed differs between machines and processes (bench/RESULTS.md).
    """
    size = driver.size
    ids = driver.start(size.batch - 1, decode_params(size, sampled=False), lambda i: None)
    driver.intervals(size.warmup_steps)
    preemptions = driver.engine.stats().num_preemptions
    chunk, decode, chunk_cpu, late = [], [], [], 0
    for i in range(size.chunk_windows + 2):              # the first two compile and warm the chunk's path
        cpu = time.thread_time()
        plain = driver.intervals(CHUNK_WINDOW, drain=False)
        plain_cpu, cpu = (time.thread_time() - cpu) * 1e3, time.thread_time()
        request_id = driver.add(dict(max_tokens=1, temperature=0.0, ignore_eos=True))
        window = driver.intervals(CHUNK_WINDOW, drain=False)
        window_cpu = (time.thread_time() - cpu) * 1e3
        late += request_id in driver.engine.requests   # then a later window holds its row: say so
        if i >= 2:
            decode.append(statistics.median(plain))
            chunk.append(sum(window) - (CHUNK_WINDOW - 1) * decode[-1])
            chunk_cpu.append(window_cpu - plain_cpu * (CHUNK_WINDOW - 1) / CHUNK_WINDOW)
    driver.sync()
    driver.stop(ids)
    return {"rows": size.batch, "chunk_tokens": size.prompt_len, "decode_rows": size.batch - 1,
            "windows": len(chunk), "window_steps": CHUNK_WINDOW, "step_ms": statistics.median(chunk),
            "host_cpu_ms": statistics.median(chunk_cpu),
            "decode_step_ms": statistics.median(decode), "chunk_requests_unfinished_after_window": late,
            "preemptions": driver.engine.stats().num_preemptions - preemptions}


def prefill_case(driver: EngineDriver) -> dict:
    """B prompts to their first token (max_tokens=1, so no decode row joins a step): generate()'s wall time."""
    from multilora import SamplingParams

    size = driver.size
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for _ in range(size.prefill_reps):
        prompts = driver.prompts(size.batch)
        driver.sync()
        start = time.perf_counter()
        driver.llm.generate(prompts, params)
        driver.sync()
        times.append((time.perf_counter() - start) * 1e3)
    return {"prompts": size.batch, "tokens": size.batch * size.prompt_len, "reps": len(times),
            "ms": statistics.median(times), "budget": driver.engine.config.max_num_batched_tokens}


def closed_case(driver: EngineDriver, loras: list | None = None) -> dict:
    """B x (prompt_len in + output_len out) through LLM.generate: output tokens per second."""
    from multilora import SamplingParams

    size = driver.size
    prompts = driver.prompts(size.batch)
    requests = [loras[i % len(loras)] for i in range(size.batch)] if loras else None
    params = SamplingParams(max_tokens=size.output_len, temperature=0.0, ignore_eos=True)
    driver.sync()
    start = time.perf_counter()
    outs = driver.llm.generate(prompts, params, requests)
    driver.sync()
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == size.batch * size.output_len, tokens
    text_bytes = sum(len(o.outputs[0].text.encode()) for o in outs)
    return {"requests": size.batch, "adapters": len(loras or []), "seconds": seconds, "output_tokens": tokens,
            "tokens_per_s": tokens / seconds, "text_bytes_per_token": text_bytes / tokens}


# ---------------------------------------------------------------- profile


def _profiled(driver: EngineDriver, run, steps: int) -> dict:
    """Runs `run()` under the profiler: its top GPU kernels (CPU ops on a CPU run) per step, and the
    host's CUDA runtime calls by time (a synchronising call here is the host waiting for the GPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = driver.cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        run()
    device = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.events() if e.device_type == device]
    if not cuda:   # top-level ops only, so nested aten calls are not counted twice
        events = [e for e in events if e.cpu_parent is None]
    kernels = [e for e in events if not e.name.startswith(("Memcpy", "Memset"))]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
    runtime: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CPU and e.name.startswith("cuda"):
            runtime.setdefault(e.name, []).append(e.time_range.elapsed_us())
    host_ops: dict[str, float] = {}      # where the host's own time goes (self time: nested ops not counted twice)
    for e in prof.events():
        if e.device_type == DeviceType.CPU and not e.name.startswith("cuda"):
            host_ops[e.name] = host_ops.get(e.name, 0.0) + e.self_cpu_time_total
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:15]
    top_runtime = sorted(runtime.items(), key=lambda kv: -sum(kv[1]))[:8]
    return {"unit": "GPU kernel" if cuda else "CPU op", "steps": steps,
            "launches_per_step": len(kernels) / steps,
            "copies_per_step": (len(events) - len(kernels)) / steps,
            "graph_launches_per_step": sum(e.name == "cudaGraphLaunch" for e in prof.events()) / steps,
            "busy_us_per_step": sum(sum(t) for t in by_name.values()) / steps,
            "top": [{"name": name, "per_step": len(t) / steps, "us_per_step": sum(t) / steps} for name, t in top],
            "host_runtime": [{"name": name, "calls_per_step": len(t) / steps, "us_per_step": sum(t) / steps}
                             for name, t in top_runtime],
            "host_ops": [{"name": name, "self_us_per_step": us / steps}
                         for name, us in sorted(host_ops.items(), key=lambda kv: -kv[1])[:8]]}


def profile_case(driver: EngineDriver, loras: list | None) -> dict:
    """Top GPU kernels (CPU ops on a CPU run) of a decode step and how many launch per step."""
    size = driver.size
    lora_of = (lambda i: loras[i % len(loras)]) if loras else (lambda i: None)
    ids = driver.start(size.batch, decode_params(size, sampled=False), lora_of)
    driver.intervals(size.warmup_steps)
    profiled = _profiled(driver, lambda: driver.intervals(size.profile_steps), size.profile_steps)
    driver.stop(ids)
    return {"case": f"decode step with {len(loras or [])} adapters", "adapters": len(loras or []), **profiled}


def profile_chunk_case(driver: EngineDriver) -> dict:
    """The chunk case's pair of steps (one holding a prefill chunk beside B-1 decode rows), per step."""
    size = driver.size
    ids = driver.start(size.batch - 1, decode_params(size, sampled=False), lambda i: None)
    driver.intervals(size.warmup_steps)
    intervals: list[float] = []

    def pair():
        driver.add(dict(max_tokens=1, temperature=0.0, ignore_eos=True))
        intervals.extend(driver.intervals(2))

    pair()      # warm
    intervals.clear()
    profiled = _profiled(driver, pair, 2)
    driver.stop(ids)
    return {"case": "chunk + decode pair", "adapters": 0, "step_intervals_ms": intervals, **profiled}


def profile_prefill_case(driver: EngineDriver) -> dict:
    """One prefill of B prompts to their first token (the prefill case), as one 'step'."""
    from multilora import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    prompts = driver.prompts(driver.size.batch)
    return {"case": "prefill of the batch", "adapters": 0,
            **_profiled(driver, lambda: (driver.llm.generate(prompts, params), driver.sync()), 1)}


# ---------------------------------------------------------------- report


def targets(floors: dict, cases: dict, counts: tuple[int, int], vocab: int) -> list[dict]:
    """Issue 7's "Done when" list, each with its figure from this run."""
    few, many = counts
    base = cases["decode_base"]["step_ms"]
    floor = floors["decode"]["floor_ms"]
    d_few = cases[f"decode_{few}_adapters"]["step_ms"]
    d_many = cases[f"decode_{many}_adapters"]["step_ms"]
    sampled = cases["decode_sampled"]["step_ms"]
    chunk, chunk_floor = cases["chunk_plus_decode"]["step_ms"], floors["chunk_ms"]
    prefill, prefill_floor = cases["prefill"]["ms"], floors["prefill_ms"]
    closed, closed_many = cases["closed_base"]["tokens_per_s"], cases[f"closed_{many}_adapters"]["tokens_per_s"]
    rows = [
        ("floor, tokenizer", f"floor {floor:.2f} ms measured here; tokenizer {vocab} tokens", "same run, full",
         vocab == floors["vocab"]),
        ("base decode step", f"{base:.2f} ms = {base / floor:.2f}x floor {floor:.2f} ms", "<= 1.2x",
         base / floor <= 1.2),
        (f"{few} adapters step", f"{d_few:.2f} ms = base {d_few - base:+.2f} ms", "<= base + 0.4 ms",
         d_few - base <= 0.4),
        (f"{many} adapters step", f"{d_many:.2f} ms = base {d_many - base:+.2f} ms", "<= base + 1.0 ms",
         d_many - base <= 1.0),
        ("sampled step", f"{sampled:.2f} ms = {sampled / base:.3f}x greedy", "<= 1.05x", sampled / base <= 1.05),
        ("chunk + decode step", f"{chunk:.2f} ms = {chunk / (chunk_floor + base):.2f}x (chunk floor "
         f"{chunk_floor:.2f} + base {base:.2f} ms; host CPU {cases['chunk_plus_decode']['host_cpu_ms']:.1f} ms)",
         "<= 1.3x", chunk / (chunk_floor + base) <= 1.3),
        ("prefill", f"{prefill:.0f} ms = {prefill / prefill_floor:.2f}x floor {prefill_floor:.0f} ms", "<= 1.3x",
         prefill / prefill_floor <= 1.3),
        ("closed batch base", f"{closed:.0f} tok/s = {closed / BASELINE_CLOSED_TOK_S:.2f}x {BASELINE_CLOSED_TOK_S:.0f} "
         f"(floor {floors['closed_tok_s']:.0f} = {floors['closed_tok_s'] / BASELINE_CLOSED_TOK_S:.2f}x)",
         ">= 2x", closed / BASELINE_CLOSED_TOK_S >= 2),
        (f"closed batch {many} adapters", f"{closed_many:.0f} tok/s = {closed_many / closed:.2f}x base", ">= 0.85x",
         closed_many / closed >= 0.85),
    ]
    return [{"target": t, "figure": f, "bound": b, "met": bool(ok)} for t, f, b, ok in rows]


def print_report(report: dict) -> None:
    floors, size = report["floors"], report["size"]
    d = floors["decode"]
    print(f"\n{report['device']}, {report['dtype']}, {report['model']}; batch {size['batch']}, "
          f"prompt {size['prompt_len']}, rank-{size['rank']} adapters, {report['tokenizer_vocab']}-token tokenizer")
    print(f"floor of a decode step at {d['batch']} x {d['context']:.0f} tokens: {d['floor_ms']:.2f} ms (GEMM chain "
          f"{d['gemm_chain_ms']:.2f} [unfused {d['gemm_chain_unfused_ms']:.2f}] + lm_head {d['lm_head_ms']:.2f} + "
          f"KV read {d['kv_read_ms']:.2f} ms, {d['kv_bytes'] / 1e9:.2f} GB at {d['kv_read_tb_s']:.2f} TB/s); "
          f"matmul {floors['matmul_tflops']:.0f} TFLOP/s")
    for p in report.get("profile") or []:
        busy = p["busy_us_per_step"] / 1e3
        print(f"\nprofile, {p['case']}: {p['launches_per_step']:.0f} {p['unit']} launches per step, "
              f"{p['copies_per_step']:.0f} copies/fills, {p['graph_launches_per_step']:.0f} graph launches; "
              f"GPU busy {busy:.2f} ms per step" + (f"; step intervals {', '.join(f'{t:.2f}' for t in p['step_intervals_ms'])} ms"
                                                   if p.get("step_intervals_ms") else ""))
        for t in p["top"][:10]:
            print(f"  {t['us_per_step']:9.1f} us {t['per_step']:6.1f}x  {t['name'][:90]}")
        print("  host ops (self time): " + ", ".join(
            f"{t['name']} {t['self_us_per_step'] / 1e3:.2f} ms" for t in p["host_ops"][:5]))
        print("  host CUDA runtime calls: " + ", ".join(
            f"{t['name']} {t['us_per_step'] / 1e3:.2f} ms ({t['calls_per_step']:.0f}x)" for t in p["host_runtime"][:5]))
    if report["cases"]["chunk_plus_decode"]["preemptions"]:
        print(f"note: {report['cases']['chunk_plus_decode']['preemptions']} preemptions during the chunk case")
    late = report["cases"]["chunk_plus_decode"]["chunk_requests_unfinished_after_window"]
    if late:
        print(f"note: {late} chunk requests were still unfinished after their window of steps; "
              "the chunk figure includes their extra rows")
    print(f"\n{'issue 7 target':26} {'this run':80} {'bound':17} met")
    for t in report["targets"]:
        print(f"{t['target']:26} {t['figure']:80} {t['bound']:17} {'yes' if t['met'] else 'NO'}")


# ---------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="8 layers, fewer steps (a minute on an H200)")
    mode.add_argument("--tiny", action="store_true", help="a tiny model on CPU in seconds (the smoke test)")
    parser.add_argument("--profile", action="store_true", help="top kernels and launches per decode step")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="an EngineConfig field (JSON value), e.g. max_num_batched_tokens=4096; repeatable")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder of decode_step.json ($OUT)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    began = time.perf_counter()
    size = SIZES["tiny" if args.tiny else "quick" if args.quick else "full"]
    model_config = dict(TINY_MODEL if args.tiny else LLAMA3_8B, bos_token_id=256, eos_token_id=257)
    if size.layers:
        model_config["num_hidden_layers"] = size.layers
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = ModelShapes.from_hf_config(model_config)
    with tempfile.TemporaryDirectory(prefix="decode-step-") as work:
        overrides = dict(engine_arg(a) for a in args.engine_arg)
        llm, loras, engine = build_engine(Path(work), model_config, size, device, dtype, overrides)
        driver = EngineDriver(llm, size, model_config["vocab_size"], device)
        warm_up(driver, loras)
        cases = run_cases(driver, loras)
        profile = ([profile_case(driver, None), profile_case(driver, loras), profile_chunk_case(driver),
                    profile_prefill_case(driver)] if args.profile else None)
        vocab = len(llm.get_tokenizer())
    floors = measure_floors(shapes, size, round(cases["decode_base"]["context"]), dtype, device)

    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype),
              "model": "tiny llama" if args.tiny else f"Llama-3-8B shapes, {shapes.layers} layers",
              "tokenizer_vocab": vocab, "model_vocab": model_config["vocab_size"], "size": asdict(size),
              "engine": engine, "floors": floors, "cases": cases, "profile": profile,
              "targets": targets(floors, cases, size.adapter_counts, vocab),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": time.perf_counter() - began}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_step.json").write_text(json.dumps(report, indent=2))
    print_report(report)
    return report


def engine_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--engine-arg {text!r}: write KEY=VALUE, e.g. enforce_eager=true")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value            # a bare string


def build_engine(work: Path, model_config: dict, size: Size, device: str, dtype: torch.dtype, overrides: dict):
    """The model folder, the adapters and one LLM for every case: the token budget fits a whole chunk
    plus B-1 decode rows, and the KV cache every row at its longest. `overrides` are EngineConfig fields."""
    from multilora import LLM, LoRARequest

    model_dir = write_model(work, model_config)
    adapter_dirs = write_adapters(work, model_config, max(size.adapter_counts), size.rank)
    loras = [LoRARequest(d.name, i + 1, str(d)) for i, d in enumerate(adapter_dirs)]
    max_len = size.prompt_len + max(size.output_len, size.decode_tokens) + 16
    settings = {**dict(load_format="dummy", dtype=str(dtype).removeprefix("torch."), device=device,
                       enable_lora=True, max_loras=len(loras), max_lora_rank=size.rank, max_num_seqs=size.batch,
                       max_num_batched_tokens=2048, max_model_len=max_len,
                       num_kv_blocks=size.batch * -(-max_len // 16) + 16), **overrides}
    settings["max_num_batched_tokens"] = max(settings["max_num_batched_tokens"], size.prompt_len + size.batch - 1)
    start = time.perf_counter()
    llm = LLM(str(model_dir), **settings)
    return llm, loras, dict(settings, startup_s=time.perf_counter() - start)


def run_cases(driver: EngineDriver, loras: list) -> dict:
    few, many = driver.size.adapter_counts
    return {"prefill": prefill_case(driver),
            "decode_base": decode_case(driver),
            "decode_sampled": decode_case(driver, sampled=True),
            f"decode_{few}_adapters": decode_case(driver, loras=loras[:few]),
            f"decode_{many}_adapters": decode_case(driver, loras=loras[:many]),
            "chunk_plus_decode": chunk_case(driver),
            "closed_base": closed_case(driver),
            f"closed_{many}_adapters": closed_case(driver, loras[:many])}


def measure_floors(shapes: ModelShapes, size: Size, context: int, dtype: torch.dtype, device: str) -> dict:
    """After the engine's cases, at the context the base decode case had (the engine keeps its memory:
    an H200 holds both)."""
    timer = Timer(device, warmup=3, iters=20 if device == "cuda" else 3)
    tflops = matmul_tflops(device, dtype, size.matmul_n, timer)
    decode = decode_floors(shapes, size.batch, context, dtype, device, timer)
    prefill = prefill_floor_ms(shapes, size.batch * size.prompt_len, tflops)
    # The closed batch at its floor: the prefill, then output_len decode steps whose KV read grows
    # with the context (mean prompt_len + output_len / 2) from what was measured at `context`.
    kv_scale = (size.prompt_len + size.output_len / 2) / context
    closed_decode_ms = decode["floor_ms"] - decode["kv_read_ms"] + decode["kv_read_ms"] * kv_scale
    closed_s = (prefill + size.output_len * closed_decode_ms) / 1e3
    return {"decode": decode, "matmul_tflops": tflops, "linear_params": shapes.linear_params, "vocab": shapes.vocab,
            "chunk_ms": prefill_floor_ms(shapes, size.prompt_len, tflops), "prefill_ms": prefill,
            "closed_tok_s": size.batch * size.output_len / closed_s}


def warm_up(driver: EngineDriver, loras: list) -> None:
    """Every adapter resident, and the prefill and decode paths compiled, before anything is timed."""
    from multilora import SamplingParams

    size = driver.size
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    driver.llm.generate(driver.prompts(size.batch), params)
    driver.llm.generate(driver.prompts(size.batch), params, [loras[i % len(loras)] for i in range(size.batch)])


if __name__ == "__main__":
    main()
