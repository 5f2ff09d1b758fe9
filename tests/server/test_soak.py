"""Soak (issue 9): about two minutes of overload against one real server, nothing wrong and nothing left after.

Workers send batches of streaming requests on their own gRPC streams, far
more than the engine runs at once (max_num_seqs 6): well-formed requests for
the base model and 13 adapter names (copies of the demo adapters, more than
max_cpu_loras, so adapters are evicted and loaded again all the time, one of
them copied in mid-soak), mixed with hostile requests and adapters, and some
streams cancelled mid-way. Checked: every well-formed request of a stream
that was not cancelled is token-exact against the engine in-process; every
error is one that a hostile request must get; no INTERNAL outcome; the
server is back to idle (no KV block, adapter hold or request left); the
stub's memory is flat after warm-up.

Marked `soak`: CI runs it (about two minutes); `-m "not soak"` skips it locally.
"""

import json
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from safetensors.torch import load_file, save_file

from helpers.tiny_models import copy_adapter
from metrics_text import eventually, sample, samples
from model_dir import import_model_module
from multilora.demo_tasks import ADAPTER_NAMES, format_prompt, heldout_inputs
from triton_client import Streams

pytestmark = pytest.mark.soak
launcher_link = import_model_module("launcher_link")

REPO = Path(__file__).resolve().parents[2]
DEMO_ADAPTERS = REPO / "models" / "demo-adapters"
SOAK_S = 90.0
WARMUP_S = 25.0
WORKERS = 6
COPIES = 3                        # served names per demo adapter, beside the original
LATE = "late-upper"               # copied into the root mid-soak
MAX_TOKENS = (8, 16, 32)
CANCEL_P = 0.12
HOSTILE_P = 0.15
# Hostile adapters in the root, each refused with its name in the message: broken files from the test zoo,
# and copies of a demo adapter whose numbers are hostile (adapter_config.json changes, or weights scaled).
HOSTILE_ADAPTERS = {"binonly": "bin_only", "truncated": "truncated", "otherbase": "other_base", "nanweights": "nan"}
HOSTILE_NUMBERS = {"alpha-1e300": {"lora_alpha": 1e300}, "alpha-nan": {"lora_alpha": float("nan")},
                   "alpha-negative": {"lora_alpha": -16}, "regex-backtracking": {"target_modules": r"(.*)*x"},
                   "weights-1e30": 1e30}


def _hostile_requests(prompt: str) -> list[tuple[dict, str]]:
    """(request, a piece of the error it must get)."""
    bad_dtype = np.array([16], dtype=np.float32)          # max_tokens must be INT32: Triton server refuses it
    cases = [({"text_input": prompt, "lora_id": f"nope{random.randrange(10**6)}"}, "unknown adapter"),
             ({"text_input": prompt, "lora_id": "../demo-llama"}, "not a valid adapter name"),
             ({"text_input": prompt, "lora_id": "escape"}, "leaves the adapter root"),
             ({"text_input": prompt, "max_tokens": -3}, "max_tokens"),
             ({"text_input": prompt, "top_p": 2.0}, "top_p"),
             ({"text_input": prompt, "sampling_parameters": '{"temperature": "hot"}'}, "temperature"),
             ({"text_input": prompt, "max_tokens": bad_dtype}, "max_tokens")]
    cases += [({"text_input": prompt, "lora_id": name}, f"'{name}'") for name in (*HOSTILE_ADAPTERS, *HOSTILE_NUMBERS)]
    cases += [({"text_input": prompt * 5000}, "max_prompt_bytes"),
              ({"text_input": prompt, "stop": [f"s{i}" for i in range(100)]}, "max_stop_strings"),
              ({"text_input": prompt, "sampling_parameters": '{"stop": ' + "[" * 64 + "]" * 64 + "}"},
               "max_sampling_parameters_depth")]
    return cases


@dataclass
class Tally:
    checked: int = 0              # well-formed requests whose output was compared
    hostile: int = 0
    cancelled_streams: int = 0
    wrong: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _served_names() -> dict[str, str]:
    """Served adapter name -> the demo adapter whose weights it has."""
    names = {name: name for name in ADAPTER_NAMES}
    names.update({f"{name}-{k}": name for name in ADAPTER_NAMES for k in range(COPIES)})
    return names


def _layout(tiny_zoo, root: Path):
    for served, source in _served_names().items():
        shutil.copytree(DEMO_ADAPTERS / source, root / served)
    for served, case in HOSTILE_ADAPTERS.items():
        copy_adapter(tiny_zoo.broken_adapter_dir(case), root / served)
    for served, damage in HOSTILE_NUMBERS.items():
        directory = shutil.copytree(DEMO_ADAPTERS / "upper", root / served)
        if isinstance(damage, dict):
            config = json.loads((directory / "adapter_config.json").read_text())
            (directory / "adapter_config.json").write_text(json.dumps({**config, **damage}))
        else:
            weights = str(directory / "adapter_model.safetensors")
            save_file({k: t * damage if "lora_B" in k else t for k, t in load_file(weights).items()}, weights)
    outside = root.parent / "outside"
    shutil.copytree(DEMO_ADAPTERS / "upper", outside / "upper")
    (root / "escape").symlink_to(outside / "upper", target_is_directory=True)


def _run_batch(url: str, batch: list, cancel: bool, tally: Tally):
    """One stream: send the batch, maybe cancel it mid-way, collect every answer, check it."""
    streams = Streams(url, {rid: values for rid, values, _ in batch})
    done = lambda: streams.answered() >= len(batch)  # noqa: E731
    if cancel:          # the client goes away mid-stream
        streams.collect(lambda: any(streams.tokens.values()) or done(), timeout=120)
        streams.close(cancel=True)
        with tally.lock:
            tally.cancelled_streams += 1
        return
    try:
        streams.collect(done, timeout=120)
    finally:
        streams.close()
    assert streams.broken is None, f"the stream broke (did the server die?): {streams.broken}"
    assert done(), f"a stream hung: {streams.answered()} of {len(batch)} answered"
    expected_errors = [expected for _, _, expected in batch if isinstance(expected, str)]
    with tally.lock:
        for rid, _, expected in batch:
            if isinstance(expected, list):
                tally.checked += 1
                if rid not in streams.finished or streams.tokens[rid] != expected:
                    tally.wrong.append((rid, streams.tokens[rid][:8], expected[:8]))
        tally.hostile += len(expected_errors)
        # A stream's errors carry no request id: each must be one that some hostile request must get.
        unmatched = list(streams.errors)
        for piece in expected_errors:
            match = next((e for e in unmatched if piece in e), None)
            if match is None:
                tally.unexpected.append(f"missing an error with {piece!r}; got {streams.errors}")
            else:
                unmatched.remove(match)
        tally.unexpected += unmatched


def _stub_rss_mb(control: Path) -> float:
    pid = launcher_link.read_health(str(control)).pid
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def test_soak_overload_churn_cancellations_and_hostile_requests(launcher, tiny_zoo, demo_reference, tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    _layout(tiny_zoo, root)
    proc, srv = launcher(["--max-num-seqs", "6", "--max-loras", "2", "--max-cpu-loras", "3"],
                         model_args=["--model", str(REPO / "models" / "demo-llama"), "--adapter-roots", str(root)])
    prompts = [format_prompt(words) for words in heldout_inputs(8, seed=11)]
    sources = (None, *ADAPTER_NAMES)
    references = {(p, src, n, eos): ids for src in sources for n in MAX_TOKENS for eos in (False, True)
                  for p, ids in zip(prompts, demo_reference(prompts, src, n, eos))}
    served = _served_names()
    tally, stop_at, late_added = Tally(), time.monotonic() + SOAK_S, threading.Event()
    failures = []

    def worker(index: int):
        rng = random.Random(index)
        count = 0
        try:
            while time.monotonic() < stop_at:
                batch = []
                for _ in range(rng.randint(3, 8)):
                    count += 1
                    rid, prompt = f"w{index}-{count}", rng.choice(prompts)
                    if rng.random() < HOSTILE_P:
                        values, piece = rng.choice(_hostile_requests(prompt))
                        batch.append((rid, values, piece))
                        continue
                    names = [None, *served] + ([LATE] if late_added.is_set() else [])
                    name = rng.choice(names)
                    n, eos = rng.choice(MAX_TOKENS), rng.random() < 0.5
                    values = {"text_input": prompt, "stream": True, "max_tokens": n, "temperature": 0.0,
                              "ignore_eos": eos, **({"lora_id": name} if name else {})}
                    if rng.random() < 0.1:      # too small for float32: means greedy, not an error for everyone
                        del values["temperature"]
                        values["sampling_parameters"] = json.dumps({"temperature": 1e-300})
                    source = "upper" if name == LATE else served.get(name)
                    batch.append((rid, values, references[(prompt, source, n, eos)]))
                _run_batch(srv.grpc_url, batch, rng.random() < CANCEL_P, tally)
        except BaseException as e:      # reported by the main thread
            failures.append(repr(e))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(WORKERS)]
    for t in threads:
        t.start()
    time.sleep(WARMUP_S)
    warm_rss = _stub_rss_mb(srv.run_dir / "control")
    shutil.copytree(DEMO_ADAPTERS / "upper", root / LATE)      # a new adapter, served without a restart
    late_added.set()
    for t in threads:
        t.join(SOAK_S + 180)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert failures == []
    assert tally.wrong == [] and tally.unexpected == []
    assert tally.checked > 100 and tally.hostile > 10 and tally.cancelled_streams > 3, tally

    metrics = srv.metrics()
    outcomes = {labels["outcome"] for labels, _ in samples(metrics, "multilora:requests_total")}
    assert "INTERNAL" not in outcomes, outcomes
    assert sample(metrics, "multilora:requests_total", lora_name=LATE, outcome="length") + sample(
        metrics, "multilora:requests_total", lora_name=LATE, outcome="stop") > 0
    # Churn beyond max_cpu_loras: adapters were loaded again after being evicted from host memory.
    assert sample(metrics, "multilora:adapter_loads_total") > len(served) + 1
    eventually(lambda: all(sample(srv.metrics(), name) == 0 for name in (
        "multilora:kv_cache_usage_perc", "multilora:adapter_holds", "multilora:num_requests_running",
        "multilora:num_requests_waiting")), what="the server back to idle")
    end_rss = _stub_rss_mb(srv.run_dir / "control")
    assert end_rss < warm_rss * 1.10 + 64, (warm_rss, end_rss)
    assert srv.is_ready() and proc.poll() is None
