"""model.py in-process, with a fake triton_python_backend_utils and the real engine on the tiny Llama.

What a real server cannot show cheaply: the error-code mapping, and that
finalize() ends every in-flight request with exactly one final response.
"""

import importlib.util
import json
import sys
import threading
import time

import numpy as np
import pytest

import fake_pb_utils
from model_dir import MODEL_VERSION_DIR, import_model_module
from multilora import errors


# Misuses of a response sender that crash or corrupt a real server; model.py's sender thread catches and
# logs exceptions, so the fake records them here and every test using `model_module` fails on one.
SENDER_MISUSES: list[str] = []


@pytest.fixture
def model_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils.module())
    import_model_module("io_tensors")  # puts the version directory on sys.path
    spec = importlib.util.spec_from_file_location("multilora_triton_model", MODEL_VERSION_DIR / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    SENDER_MISUSES.clear()
    fake_pb_utils.METRIC_MISUSES.clear()
    monkeypatch.setattr(fake_pb_utils.FakeMetric, "only_thread", "multilora-sender")
    yield module
    assert SENDER_MISUSES == []
    assert fake_pb_utils.METRIC_MISUSES == []


class FakeSender:
    def __init__(self):
        self.sent, self.cancelled, self.done = [], False, threading.Event()

    def send(self, response=None, flags=0):
        if self.done.is_set():
            SENDER_MISUSES.append("a response after the final one")
        assert not self.done.is_set(), "a response after the final one"
        self.sent.append((response, flags))
        if flags:
            self.done.set()

    def is_cancelled(self):
        if self.done.is_set():
            # python_backend (2.51 and later alike) then asks tritonserver about the response factory that
            # the final response freed: a use after free in the server process (server issue 8192's segfault).
            SENDER_MISUSES.append("is_cancelled() after the final response")
        return self.cancelled


class FakeRequest:
    def __init__(self, **values):
        self._inputs = [fake_pb_utils.Tensor(k, np.array([v.encode() if isinstance(v, str) else v]))
                        for k, v in values.items()]
        self.sender = FakeSender()

    def inputs(self):
        return self._inputs

    def get_response_sender(self):
        return self.sender


def start_model(model_module, tiny_zoo, repository, **engine):
    """The Triton model initialised over a serving.json in `repository` (tiny Llama on the CPU, an empty
    adapter root) with `engine` on top of the defaults; the caller finalizes it."""
    (repository / "adapters").mkdir()
    engine = {"model": str(tiny_zoo.model_dir("llama")), "enable_lora": True, "dtype": "float32", "device": "cpu",
              "num_kv_blocks": 32, "max_lora_rank": 16, **engine}
    (repository / "serving.json").write_text(json.dumps({"engine": engine, "adapters": {"roots": ["adapters"]}}))
    m = model_module.TritonPythonModel()
    m.initialize({"model_repository": str(repository), "model_name": "multilora", "model_version": "1"})
    return m


@pytest.fixture
def model(model_module, tiny_zoo, tmp_path):
    m = start_model(model_module, tiny_zoo, tmp_path)
    yield m
    m.finalize()


@pytest.mark.parametrize("error, code", [
    (errors.AdapterNotFoundError("unknown adapter 'x'"), "NOT_FOUND"),
    (errors.AdapterNameError("bad name"), "INVALID_ARG"),
    (errors.AdapterFormatError("no safetensors"), "INVALID_ARG"),
    (errors.InvalidRequestError("empty prompt"), "INVALID_ARG"),
    (errors.RequestCancelledError("cancelled"), "CANCELLED"),
    (errors.EngineStoppedError("stopping"), "UNAVAILABLE"),
    (errors.WorkerFailedError("a tensor-parallel worker failed"), "UNAVAILABLE"),
])
def test_each_error_maps_to_its_code(model_module, error, code):
    mapped = model_module.triton_error(error)
    assert (mapped.code, mapped.message) == (getattr(fake_pb_utils.TritonError, code), str(error))


def test_unexpected_errors_are_internal_and_hide_details(model_module):
    mapped = model_module.triton_error(RuntimeError("/secret/path exploded"))
    assert mapped.code == fake_pb_utils.TritonError.INTERNAL and "/secret" not in mapped.message


def test_stream_ends_with_exactly_one_final_response(model):
    request = FakeRequest(text_input="Hello, world!", stream=True, max_tokens=np.int32(5), ignore_eos=True)
    model.execute([request])
    assert request.sender.done.wait(60)
    time.sleep(0.3)  # nothing may follow the final response
    flags = [f for _, f in request.sender.sent]
    assert flags[-1] == 1 and flags.count(1) == 1 and len(flags) >= 2
    assert all(r.error is None for r, _ in request.sender.sent)


def test_bad_request_gets_one_error_response(model):
    request = FakeRequest(text_input="Hi", lora_id="nope")
    model.execute([request])
    assert request.sender.done.wait(10)
    [(response, flags)] = request.sender.sent
    assert flags == 1 and response.error.code == fake_pb_utils.TritonError.NOT_FOUND


def test_a_request_refused_in_execute_is_counted_on_the_sender_thread(model_module, tiny_zoo, tmp_path):
    m = start_model(model_module, tiny_zoo, tmp_path)
    request = FakeRequest(text_input="Hi", max_tokens=np.int32(-3))  # malformed: refused inside execute()
    m.execute([request])  # on this thread, as Triton's execute thread calls it
    m.finalize()  # the sender handles its queue in order, so the refusal is counted by now
    [(response, flags)] = request.sender.sent
    assert flags == 1 and response.error.code == fake_pb_utils.TritonError.INVALID_ARG
    [metric] = fake_pb_utils.FakeMetricFamily.registry["multilora:requests_total"].metrics
    assert (metric.labels["lora_name"], metric.labels["outcome"], metric.value) == ("(refused)", "INVALID_ARG", 1)
    assert fake_pb_utils.METRIC_MISUSES == []  # checked here too, so the failure names this test


def test_cancelled_request_is_aborted_with_cancelled(model, model_module, monkeypatch):
    monkeypatch.setattr(model_module, "CANCEL_CHECK_S", 0.0)  # the tiny model is faster than the usual check
    request = FakeRequest(text_input="Hello, world!", stream=True, max_tokens=np.int32(100), ignore_eos=True)
    request.sender.cancelled = True  # the client has gone by the time outputs flow
    model.execute([request])
    assert request.sender.done.wait(10)
    response, flags = request.sender.sent[-1]
    assert flags == 1 and response.error.code == fake_pb_utils.TritonError.CANCELLED
    assert len(request.sender.sent) < 100


def test_finalize_ends_in_flight_requests_then_stops(model):
    requests = [FakeRequest(text_input="Hello, world!", stream=True, max_tokens=np.int32(100), ignore_eos=True)
                for _ in range(3)]
    model.execute(requests)
    model.finalize()
    for r in requests:
        assert r.sender.done.is_set()
        assert [f for _, f in r.sender.sent].count(1) == 1
    assert not model._sender.is_alive()


@pytest.fixture
def supervised_model(model_module, tiny_zoo, tmp_path, monkeypatch):
    """The model as scripts/serve.py runs it: with a control directory for health and drain."""
    control = tmp_path / "control"
    control.mkdir()
    monkeypatch.setenv("MULTILORA_CONTROL_DIR", str(control))
    monkeypatch.setattr(model_module, "HEALTH_EVERY_S", 0.0)
    monkeypatch.setattr(model_module, "CANCEL_CHECK_S", 0.0)
    m = start_model(model_module, tiny_zoo, tmp_path, max_num_seqs=2)
    yield m, control
    m.finalize()


def _health(control):
    return json.loads((control / "health.json").read_text())


def _wait_for(predicate, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_health_report_names_the_stub_and_a_dead_engine_threads_reason(supervised_model):
    import os

    model, control = supervised_model
    _wait_for(lambda: (control / "health.json").exists(), "the first health report")
    health = _health(control)
    assert (health["pid"], health["engine_alive"], health["engine_failure"]) == (os.getpid(), True, None)
    assert model.is_ready()
    running = FakeRequest(text_input="Hello, world!", stream=True, max_tokens=np.int32(100), ignore_eos=True)
    model.execute([running])
    _wait_for(lambda: len(running.sender.sent) >= 2, "the stream to start")

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access")
    model._engine.engine.has_unfinished_requests = broken      # the engine thread's loop now fails
    _wait_for(lambda: not _health(control)["engine_alive"], "the health report to show the dead engine")
    assert _health(control)["engine_failure"] == "RuntimeError: CUDA error: an illegal memory access"
    assert not model.is_ready()
    # The request in flight got its final response; a new one is refused as UNAVAILABLE, at once.
    assert running.sender.done.wait(10) and running.sender.sent[-1][0].error.code == fake_pb_utils.TritonError.UNAVAILABLE
    late = FakeRequest(text_input="Hi")
    model.execute([late])
    assert late.sender.done.wait(10) and late.sender.sent[-1][0].error.code == fake_pb_utils.TritonError.UNAVAILABLE


def test_drain_refuses_new_requests_and_ends_the_unfinished_at_its_deadline(supervised_model, model_module):
    import launcher_link

    model, control = supervised_model
    step_events = model._engine.engine.step_events     # what the engine thread calls each step

    def slow_step():        # 100 tokens now take 2 s: the deadline below comes first
        time.sleep(0.02)
        return step_events()
    model._engine.engine.step_events = slow_step
    requests = [FakeRequest(text_input="Hello, world!", stream=True, max_tokens=np.int32(100), ignore_eos=True)
                for _ in range(4)]      # max_num_seqs 2: two run, two wait
    model.execute(requests)
    _wait_for(lambda: len(requests[0].sender.sent) >= 2, "the first stream to start")
    launcher_link.request_drain(str(control), abort_at=time.time() + 0.5)
    _wait_for(lambda: _health(control)["draining"], "the model to drain")
    refused = FakeRequest(text_input="Hi")
    model.execute([refused])
    assert refused.sender.done.wait(10)
    assert refused.sender.sent[-1][0].error.code == fake_pb_utils.TritonError.UNAVAILABLE
    assert "shutting down" in refused.sender.sent[-1][0].error.message
    for r in requests:          # each one answered once: finished, or ended at the deadline
        assert r.sender.done.wait(30)
        assert [f for _, f in r.sender.sent].count(1) == 1
        last = r.sender.sent[-1][0]
        assert last.error is None or last.error.code == fake_pb_utils.TritonError.UNAVAILABLE
    assert all(r.sender.sent[-1][0].error is not None for r in requests)
    _wait_for(lambda: _health(control)["unanswered"] == 0, "the health report to show every request answered")
    assert not model.is_ready()
