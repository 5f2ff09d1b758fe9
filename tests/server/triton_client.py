"""Small tritonclient helpers for the server tests: build inputs, run requests on one gRPC stream."""

import json
import queue
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

# The contract's input types (CONTRACT.md §2).
DTYPES = {
    "text_input": np.object_, "lora_id": np.object_, "stop": np.object_, "sampling_parameters": np.object_,
    "input_ids": np.int32, "max_tokens": np.int32, "top_k": np.int32, "min_tokens": np.int32,
    "temperature": np.float32, "top_p": np.float32, "seed": np.uint64,
    "stream": bool, "ignore_eos": bool, "exclude_input_in_output": bool,
    "return_finish_reason": bool, "return_num_input_tokens": bool, "return_num_output_tokens": bool,
}


def make_inputs(values: dict) -> list:
    """Contract inputs from Python values; an np.ndarray value is sent as is (wrong dtypes/shapes on purpose)."""
    inputs = []
    for name, value in values.items():
        if isinstance(value, np.ndarray):
            array = value
        else:
            items = value if isinstance(value, list) else [value]
            if DTYPES[name] is np.object_:
                items = [v.encode() if isinstance(v, str) else v for v in items]
            array = np.array(items, dtype=DTYPES[name])
        t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        t.set_data_from_numpy(array)
        inputs.append(t)
    return inputs


@dataclass
class StreamResult:
    deltas: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    finals: int = 0

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def run_stream(url: str, requests: dict[str, dict], timeout: float = 120.0) -> dict[str, StreamResult]:
    """Send every request on one gRPC stream at once; collect each one's responses until its final one."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    results = {rid: StreamResult() for rid in requests}
    try:
        for rid, values in requests.items():
            client.async_stream_infer("multilora", make_inputs(values), request_id=rid,
                                      enable_empty_final_response=True)
        _collect(responses, results, timeout)
    finally:
        client.stop_stream()
        client.close()
    return results


def stream_broke(error) -> bool:
    """Whether a stream callback's error ended the whole stream rather than one request.

    tritonclient reports a broken stream (the server died, the connection was
    reset, a keepalive ping or the stream's deadline expired, the client
    cancelled) once, with the gRPC status; every request still open on that
    stream is over, and no other answer comes. A model's error for one request
    carries no status.
    """
    return error.status() is not None


class Streams:
    """Requests on one gRPC stream; each ends with a final response, an error, or the stream's own end."""

    def __init__(self, url: str, requests: dict[str, dict], channel_args: Optional[list] = None):
        self.responses: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(url, channel_args=channel_args)
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
        self.tokens: dict[str, list] = {}
        self.finished: set[str] = set()
        self.errors: list[str] = []     # a stream's errors carry no request id
        self.broken: Optional[str] = None   # the error that ended the stream, and with it every open request
        self.send(requests)

    def send(self, requests: dict[str, dict]):
        for rid, values in requests.items():
            self.tokens[rid] = []
            self.client.async_stream_infer("multilora", make_inputs(values), request_id=rid,
                                           enable_empty_final_response=True)

    def collect(self, until, timeout: float):
        deadline = time.monotonic() + timeout
        while not until() and time.monotonic() < deadline:
            try:
                result, error = self.responses.get(timeout=0.5)
            except queue.Empty:
                continue
            if error is not None and stream_broke(error):
                self.broken = f"{error.status()}: {error.message()}"
                return
            if error is not None:
                self.errors.append(f"{error.status()}: {error.message()}")
                continue
            response = result.get_response()
            if response.outputs:
                self.tokens[response.id] += result.as_numpy("output_ids").tolist()
            if response.parameters["triton_final_response"].bool_param:
                self.finished.add(response.id)

    def answered(self) -> int:
        """Requests that are over: finished, failed, or open when the stream broke."""
        return len(self.tokens) if self.broken else len(self.finished) + len(self.errors)

    def close(self, cancel: bool = False):
        """Ends the stream; `cancel` cancels the requests still open, as a client that goes away does."""
        try:
            self.client.stop_stream(cancel_requests=cancel)
        finally:
            self.client.close()


def _collect(responses: queue.Queue, results: dict[str, StreamResult], timeout: float):
    open_ids = set(results)
    while open_ids:
        result, error = responses.get(timeout=timeout)
        if error is not None and stream_broke(error):
            for rid in open_ids:
                results[rid].error = str(error)
            return
        if error is not None:
            # A stream error names no request id; the message is checked by the caller.
            rid = _request_id_of_error(error, open_ids)
            results[rid].error, results[rid].finals = str(error), results[rid].finals + 1
            open_ids.discard(rid)
            continue
        response = result.get_response()
        r = results[response.id]
        if response.outputs:
            r.deltas.append(result.as_numpy("text_output")[0].decode("utf-8"))
            r.token_ids += result.as_numpy("output_ids").tolist()
            if result.as_numpy("finish_reason") is not None:
                r.finish_reason = result.as_numpy("finish_reason")[0].decode() or r.finish_reason
        if response.parameters["triton_final_response"].bool_param:
            r.finals += 1
            open_ids.discard(response.id)


def _request_id_of_error(error, open_ids: set[str]) -> str:
    """tritonclient reports stream errors without the request id; ours carry it in the message when possible."""
    if len(open_ids) == 1:
        return next(iter(open_ids))
    raise AssertionError(f"an error arrived while several requests were open: {error}")


def http_generate(http_url: str, body: dict, stream: bool = False, timeout: float = 120.0):
    """POST to /generate (or /generate_stream); returns (status, parsed JSON or list of SSE events)."""
    endpoint = "generate_stream" if stream else "generate"
    request = urllib.request.Request(f"{http_url}/v2/models/multilora/{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    if not stream:
        return status, json.loads(text)
    return status, [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
