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


@pytest.fixture
def model_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils.module())
    import_model_module("io_tensors")  # puts the version directory on sys.path
    spec = importlib.util.spec_from_file_location("multilora_triton_model", MODEL_VERSION_DIR / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeSender:
    def __init__(self):
        self.sent, self.cancelled, self.done = [], False, threading.Event()

    def send(self, response=None, flags=0):
        assert not self.done.is_set(), "a response after the final one"
        self.sent.append((response, flags))
        if flags:
            self.done.set()

    def is_cancelled(self):
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


@pytest.fixture
def model(model_module, tiny_zoo, tmp_path):
    (tmp_path / "adapters").mkdir()
    serving = {"engine": {"model": str(tiny_zoo.model_dir("llama")), "enable_lora": True, "dtype": "float32",
                          "device": "cpu", "num_kv_blocks": 32, "max_lora_rank": 16},
               "adapters": {"roots": ["adapters"]}}
    (tmp_path / "serving.json").write_text(json.dumps(serving))
    m = model_module.TritonPythonModel()
    m.initialize({"model_repository": str(tmp_path), "model_name": "multilora", "model_version": "1"})
    yield m
    m.finalize()


@pytest.mark.parametrize("error, code", [
    (errors.AdapterNotFoundError("unknown adapter 'x'"), "NOT_FOUND"),
    (errors.AdapterNameError("bad name"), "INVALID_ARG"),
    (errors.AdapterFormatError("no safetensors"), "INVALID_ARG"),
    (errors.InvalidRequestError("empty prompt"), "INVALID_ARG"),
    (errors.RequestCancelledError("cancelled"), "CANCELLED"),
    (errors.EngineStoppedError("stopping"), "UNAVAILABLE"),
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
