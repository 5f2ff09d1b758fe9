"""Client cancellation frees the request's resources; adapters added or changed on disk are served at once."""

import os
import queue
import shutil

import tritonclient.grpc as grpcclient
from metrics_text import eventually, sample
from triton_client import make_inputs, run_stream

MAX_TOKENS = 100   # the tiny model's context is 128 tokens
# Several requests on the stream: one alone can finish on the tiny model before the
# twice-a-second gauges show it, which made this test flaky on a loaded machine.
REQUESTS = 16


def test_cancelled_stream_gets_cancelled_and_frees_kv_blocks_and_adapter(server):
    aborted_before = sample(server.metrics(), "multilora:requests_total", lora_name="json", outcome="abort")
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    for i in range(REQUESTS):
        client.async_stream_infer("multilora", make_inputs(
            {"text_input": "Hello, world!", "lora_id": "json", "stream": True, "max_tokens": MAX_TOKENS,
             "ignore_eos": True}), request_id=str(i))
    received = 0
    while received < 3:  # mid-stream: some deltas are in, most are not
        result, error = responses.get(timeout=60)
        assert error is None, error
        received += 1
    busy = lambda: (sample(server.metrics(), "multilora:kv_cache_usage_perc") > 0  # noqa: E731
                    and sample(server.metrics(), "multilora:adapter_holds") >= 1)
    eventually(busy, timeout=10, what="the stream's KV blocks and adapter hold to show")
    client.stop_stream(cancel_requests=True)
    errors = []
    while True:
        try:
            result, error = responses.get(timeout=2)
        except queue.Empty:
            break
        if error is not None:
            errors.append(error)
        else:
            received += 1
    client.close()

    assert [e.status() for e in errors] == ["StatusCode.CANCELLED"]
    assert received < REQUESTS * MAX_TOKENS
    # The server saw the cancellation: the unfinished requests ended as aborts, and their
    # KV blocks and adapter holds are back (the gauges refresh twice a second).
    eventually(lambda: sample(server.metrics(), "multilora:requests_total", lora_name="json",
                            outcome="abort") >= aborted_before + 1, what="the abort to be counted")
    eventually(lambda: all(sample(server.metrics(), name) == 0 for name in (
        "multilora:kv_cache_usage_perc", "multilora:adapter_holds", "multilora:num_requests_running",
        "multilora:num_requests_waiting")), what="KV blocks and adapter holds back to idle")
    assert server.is_ready()


def test_adapter_copied_into_a_root_is_served_and_changes_are_new_versions(server, reference):
    prompt = "Hello, world!"
    request = {"text_input": prompt, "lora_id": "fresh", "stream": True, "max_tokens": 10,
               "temperature": 0.0, "ignore_eos": True}
    assert "unknown adapter" in run_stream(server.grpc_url, {"r": request})["r"].error

    fresh = server.adapter_root / "fresh"
    shutil.copytree(server.adapter_root / "reverse", fresh)
    r = run_stream(server.grpc_url, {"r": request})["r"]
    assert r.error is None and r.text == reference(prompt, "reverse", 10)[0]

    # Same name, other files: the next request must use the new weights, never a cached copy.
    # Each file is replaced by a rename, so no request ever reads a half-written one.
    source = server.adapter_root / "upper"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(source / name, fresh / f".{name}.new")
        os.replace(fresh / f".{name}.new", fresh / name)
    r = run_stream(server.grpc_url, {"r": request})["r"]
    assert r.error is None and r.text == reference(prompt, "upper", 10)[0]
