"""The Triton server target: scripts/serve.py started on free ports, driven over gRPC streaming.

The client must not be the bottleneck: it talks to the server's gRPC service with grpc.aio
and prebuilt protobuf requests (raw tensor bytes, no numpy per response), one bidirectional
stream per client process carrying many requests (matched by request id), and the load is
split over several processes (`--client-procs`). `perf_analyzer --streaming` at the same
concurrency and workload is the independent check (bench/serving_perf_analyzer.py).
"""

import asyncio
import multiprocessing as mp
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

from serving_report import RequestRecord
from serving_workload import BenchRequest, adapter_name

REPO = Path(__file__).resolve().parents[1]
MODEL = "multilora"
# Keepalive pings every 10 s, answered within 10 s, or the stream breaks: a dead or frozen server ends the
# run's open requests with an error instead of hanging it (docs/serving.md, "When the server dies").
KEEPALIVE = [("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 10_000),
             ("grpc.http2.ping_timeout_ms", 10_000), ("grpc.http2.max_pings_without_data", 0)]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class TritonServer:
    """scripts/serve.py in its own process group; stopped (SIGTERM, then SIGKILL) by close()."""

    def __init__(self, model_dir: Path, adapter_root: Path, engine_args: dict, run_dir: Path, log: Path,
                 ready_timeout: float = 600.0, python: Optional[str] = None):
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        pairs = ",".join(f"{k}={v}" for k, v in engine_args.items() if v is not None)
        cmd = [python or sys.executable, str(REPO / "scripts" / "serve.py"), "--model", str(model_dir),
               "--adapter-roots", str(adapter_root), "--run-dir", str(run_dir), "--engine-arg", pairs,
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--ready-timeout", str(ready_timeout)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("MULTILORA_")}
        if python:      # a server environment of its own: this process's PYTHONPATH is not for it
            env.pop("PYTHONPATH", None)
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        # Its own session (so that a Ctrl-C of the benchmark reaches it through close() only): the
        # pid file lets a wrapper script stop it if this process is killed outright.
        log.with_suffix(".pid").write_text(f"{self.proc.pid}\n")
        self._wait_ready(ready_timeout + 30)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.http_port}/v2/models/{MODEL}/ready"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
                raise RuntimeError(f"the Triton server did not become ready; {self.log}:\n{tail}")
            time.sleep(0.5)

    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=10) as r:
            return r.read().decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)    # the launcher drains and stops the server
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.log.with_suffix(".pid").unlink(missing_ok=True)


# ---- the client ---------------------------------------------------------------------------

def _bytes_tensor(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def build_request(req: BenchRequest, request_id: str):
    """A ModelInferRequest for the contract's inputs (CONTRACT.md §2), raw little-endian tensors."""
    from tritonclient.grpc import service_pb2

    tensors = [("input_ids", "INT32", [len(req.prompt_ids)], struct.pack(f"<{len(req.prompt_ids)}i", *req.prompt_ids)),
               ("stream", "BOOL", [1], b"\x01"), ("ignore_eos", "BOOL", [1], b"\x01"),
               ("max_tokens", "INT32", [1], struct.pack("<i", req.output_len)),
               ("temperature", "FP32", [1], struct.pack("<f", 0.0))]
    if req.adapter_index is not None:
        tensors.append(("lora_id", "BYTES", [1], _bytes_tensor(adapter_name(req.adapter_index).encode())))
    request = service_pb2.ModelInferRequest(model_name=MODEL, id=request_id)
    for name, dtype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=dtype, shape=shape)
        request.raw_input_contents.append(raw)
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    return request


class StreamClient:
    """One gRPC bidirectional stream carrying any number of concurrent requests."""

    def __init__(self, url: str):
        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self._channel = grpc.aio.insecure_channel(url, options=[("grpc.max_receive_message_length", 2**30),
                                                                *KEEPALIVE])
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._pending: dict[str, tuple[RequestRecord, asyncio.Future]] = {}
        self._ended: Optional[str] = None      # why the stream ended; nothing sent after that is answered
        self.stream_errors = 0
        self._call = self._stub.ModelStreamInfer(self._requests())
        self._reader = asyncio.ensure_future(self._read())

    async def _requests(self):
        while True:
            item = await self._outbox.get()
            if item is None:
                return
            yield item

    async def _read(self) -> None:
        try:
            async for response in self._call:
                self._on_response(response, time.monotonic())
            self._ended = "the server ended the stream"
        except Exception as error:      # the stream broke (server gone, connection reset, ping unanswered)
            self._ended = str(error)
        for record, future in self._pending.values():   # every open request ends with the stream
            record.error = record.error or f"stream: {self._ended}"
            if not future.done():
                future.set_result(None)

    def _on_response(self, response, now: float) -> None:
        infer = response.infer_response
        entry = self._pending.get(infer.id)
        if response.error_message:
            self.stream_errors += 1
            if entry is not None:
                entry[0].error = response.error_message
        if entry is None:
            return
        record, future = entry
        for i, out in enumerate(infer.outputs):
            if out.name == "output_ids" and i < len(infer.raw_output_contents):
                record.on_tokens(now, len(infer.raw_output_contents[i]) // 4)
        final = infer.parameters.get("triton_final_response")
        if (final is not None and final.bool_param) or response.error_message:
            record.end_s = now
            del self._pending[infer.id]
            future.set_result(None)

    async def run(self, req: BenchRequest, record: RequestRecord) -> None:
        if self._ended is not None:
            record.error = f"stream: {self._ended}"
            return
        request_id = f"r{req.index}"
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (record, future)
        await self._outbox.put(build_request(req, request_id))
        await future

    async def close(self) -> None:
        await self._outbox.put(None)
        try:
            await asyncio.wait_for(self._reader, 30)
        except asyncio.TimeoutError:
            self._call.cancel()
        await self._channel.close()


def client_process(url: str, requests: list[BenchRequest], concurrency: Optional[int], start: float,
                   progress, results) -> None:
    """Runs in a child process: drives its share of the load, sends back its records."""
    from serving_driver import drive

    async def main():
        client = StreamClient(url)
        records = await drive(requests, concurrency, client.run, start, progress)
        await client.close()
        return records, client.stream_errors

    results.put(asyncio.run(main()))


def run_clients(url: str, requests: list[BenchRequest], concurrency: Optional[int], procs: int,
                on_progress) -> tuple[list[RequestRecord], int]:
    """Splits the requests (round robin) and the concurrency over `procs` client processes."""
    ctx = mp.get_context("spawn")
    procs = max(1, min(procs, len(requests), concurrency or len(requests)))
    progress = ctx.Array("q", 2 * procs)        # per process: finished requests, tokens
    results = ctx.Queue()
    start = time.monotonic() + 2.0 + 0.5 * procs     # all processes start sending together
    shares = [concurrency // procs + (i < concurrency % procs) for i in range(procs)] if concurrency else [None] * procs
    workers = [ctx.Process(target=client_process, daemon=True,
                           args=(url, requests[i::procs], shares[i], start, _Slot(progress, i), results))
               for i in range(procs)]
    for w in workers:
        w.start()
    collected, stream_errors = [], 0
    while len(collected) < procs:
        try:
            records, errors = results.get(timeout=1.0)
            collected.append(records)
            stream_errors += errors
        except Exception:
            if not any(w.is_alive() for w in workers) and results.empty():
                raise RuntimeError("a client process died; see its traceback above")
        on_progress(sum(progress[0::2]), sum(progress[1::2]))
    for w in workers:
        w.join(timeout=10)
    return sorted((r for rs in collected for r in rs), key=lambda r: r.index), stream_errors


class _Slot:
    """A client process's two progress counters in a shared array (picklable for spawn)."""

    def __init__(self, array, index: int):
        self.array, self.index = array, index

    def update(self, done: int, tokens: int) -> None:
        self.array[2 * self.index] = done
        self.array[2 * self.index + 1] = tokens


class TritonTarget:
    """The server, the metrics watcher and the client processes behind the driver's interface."""

    name = "triton"

    def __init__(self, model_dir: Path, adapter_root: Path, engine_args: dict, run_dir: Path, log: Path,
                 client_procs: int, python: Optional[str] = None):
        from serving_metrics import MetricsWatcher

        self.server = TritonServer(model_dir, adapter_root, engine_args, run_dir, log, python=python)
        self.watcher = MetricsWatcher(self.server)
        self.procs = client_procs

    def load(self, requests: list[BenchRequest], concurrency: Optional[int], progress) -> tuple[list, dict]:
        records, stream_errors = run_clients(self.server.grpc_url, requests, concurrency, self.procs,
                                             progress.update if progress else lambda *a: None)
        return records, {"stream_errors": stream_errors}

    def begin(self) -> None:
        self.watcher.begin()

    def end(self) -> dict:
        return self.watcher.end()

    def close(self) -> None:
        self.server.close()
