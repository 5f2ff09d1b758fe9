"""Refusals from two threads at once against a real server: the soak's segfault, reproduced in seconds.

A malformed request is refused on Triton's execute thread; an adapter name
the resolver refuses is answered on model.py's sender thread. Both count the
refusal in the same Prometheus metric (`requests_total{lora_name="(refused)",
outcome="INVALID_ARG"}`). python_backend's stub-side Metric is not thread-safe
(increment() drops the GIL and rewrites the metric's shared-memory message),
so two threads counting into it at once hand tritonserver a freed message:
SIGSEGV in Metric::LoadFromSharedMemory on its stub-to-parent thread.
"""

import threading

from metrics_text import eventually, sample
from triton_client import Streams

WORKERS = 4
ROUNDS = 30
PER_STREAM = 40
REFUSALS = ("max_tokens must be an integer", "is not a valid adapter name")   # the two errors' messages
REFUSED = {"lora_name": "(refused)", "outcome": "INVALID_ARG"}


def _refused_in_execute(i):     # malformed: parse_request refuses it on Triton's execute thread
    return {"text_input": f"p{i}", "max_tokens": -3}


def _refused_by_resolver(i):    # not a plain name: the resolver refuses it, the sender thread answers
    return {"text_input": f"p{i}", "lora_id": "../demo-llama"}


def _worker(url, failures, name):
    for r in range(ROUNDS):
        requests = {f"{name}-{r}-{i}": (_refused_in_execute if i % 2 else _refused_by_resolver)(i)
                    for i in range(PER_STREAM)}
        streams = Streams(url, requests)
        try:
            streams.collect(lambda: streams.answered() == PER_STREAM, timeout=60)
        finally:
            streams.close()
        if streams.broken or len(streams.errors) != PER_STREAM or streams.finished:
            failures.append(f"{name} round {r}: broken={streams.broken}, {len(streams.errors)} errors, "
                            f"{len(streams.finished)} finished of {PER_STREAM}")
            return
        if not all(REFUSALS[0] in e or REFUSALS[1] in e for e in streams.errors):
            failures.append(f"{name} round {r}: {sorted(set(streams.errors))[:3]}")
            return


def test_refusals_on_two_threads_at_once_do_not_crash_the_server(server):
    log_before = server.log.read_text(errors="replace")
    counted_before = sample(server.metrics(), "multilora:requests_total", **REFUSED)
    failures: list[str] = []
    threads = [threading.Thread(target=_worker, args=(server.grpc_url, failures, f"w{w}")) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    new_log = server.log.read_text(errors="replace")[len(log_before):]
    assert "Signal (11)" not in new_log and "exited unexpectedly" not in new_log, new_log[-4000:]
    assert failures == []
    expected = counted_before + WORKERS * ROUNDS * PER_STREAM   # every refusal counted, none lost
    eventually(lambda: sample(server.metrics(), "multilora:requests_total", **REFUSED) == expected,
               what=f"{expected:.0f} refusals counted")
