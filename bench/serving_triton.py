"""The Triton server target: scripts/serve.py started on free ports, driven over gRPC streaming.

The client must not be the bottleneck: it talks to the server's gRPC service with grpc.aio
and prebuilt protobuf requests (raw tensor bytes, no numpy per response), one bidirectional
stream per client process carrying many requests (matched by request id), and the load is
split over several processes (`--client-procs`). `perf_analyzer --streaming` at the same
concurrency and workload is the independent check (`run_perf_analyzer`).
"""

import asyncio
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Optional

from serving_report import RequestRecord
from serving_workload import BenchRequest, adapter_name

REPO = Path(__file__).resolve().parents[1]
MODEL = "multilora"
METRICS_POLL_S = 0.25


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
    """scripts/serve.py in its own process group; stopped (SIGINT, then SIGKILL) by close()."""

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
            self.proc.send_signal(signal.SIGINT)     # the launcher forwards it; the model unloads
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.log.with_suffix(".pid").unlink(missing_ok=True)


# ---- metrics ------------------------------------------------------------------------------

_SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def metric_samples(text: str, name: str) -> list[tuple[dict, float]]:
    out = []
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and m["name"] == name:
            out.append((dict(_LABEL.findall(m["labels"] or "")), float(m["value"])))
    return out


def metric_sum(text: str, name: str) -> float:
    return sum(v for _, v in metric_samples(text, name))


_POOL = {"adapter_loads": "multilora:adapter_loads_total", "adapter_evictions": "multilora:adapter_evictions_total",
         "adapter_pool_hits": "multilora:adapter_pool_hits_total",
         "adapter_pool_misses": "multilora:adapter_pool_misses_total",
         "adapter_load_seconds_sum": "multilora:adapter_load_seconds_sum"}


class MetricsWatcher:
    """Polls /metrics: distinct running adapters (vLLM's lora_requests_info labels), waiting
    requests, and when the adapter-load counter moves (= the windows in which adapters loaded)."""

    def __init__(self, server: TritonServer):
        self._server = server
        self._stop = threading.Event()

    def begin(self) -> None:
        self._before = self._pool(self._server.metrics())
        self.samples, self._distinct, self.max_waiting, self.windows = 0, 0, 0, []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _pool(self, text: str) -> dict:
        return {key: metric_sum(text, name) for key, name in _POOL.items()}

    def _run(self) -> None:
        loads, last_t = self._before["adapter_loads"], time.monotonic()
        while not self._stop.wait(METRICS_POLL_S):
            try:
                text = self._server.metrics()
            except OSError:
                continue
            now = time.monotonic()
            running = metric_sum(text, "multilora:num_requests_running")
            self.max_waiting = max(self.max_waiting, int(metric_sum(text, "multilora:num_requests_waiting")))
            current = [labels for labels, value in metric_samples(text, "multilora:lora_requests_info") if value > 0]
            if running and current:
                names = current[0].get("running_lora_adapters", "")
                self.samples += 1
                self._distinct += len([n for n in names.split(",") if n])
            new_loads = metric_sum(text, "multilora:adapter_loads_total")
            if new_loads > loads:
                self.windows.append((last_t, now))
            loads, last_t = new_loads, now

    def end(self) -> dict:
        self._stop.set()
        self._thread.join()
        after = self._pool(self._server.metrics())
        stats = {key: after[key] - self._before[key] for key in after}
        stats.update({key: int(v) for key, v in stats.items() if key != "adapter_load_seconds_sum"})
        stats.update(mean_distinct_adapters_per_step=self._distinct / self.samples if self.samples else None,
                     distinct_sampled_every_s=METRICS_POLL_S, steps_sampled=self.samples,
                     max_waiting=self.max_waiting)
        return {"stats": stats, "load_windows": self.windows}


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

        self._channel = grpc.aio.insecure_channel(url, options=[("grpc.max_receive_message_length", 2**30)])
        self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._pending: dict[str, tuple[RequestRecord, asyncio.Future]] = {}
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
        except Exception as error:      # the stream broke: every open request ends with it
            for record, future in self._pending.values():
                record.error = record.error or f"stream: {error}"
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


# ---- perf_analyzer -------------------------------------------------------------------------

def perf_analyzer_inputs(requests: list[BenchRequest], path: Path) -> Path:
    rows = []
    for r in requests:
        row = {"input_ids": {"content": r.prompt_ids, "shape": [len(r.prompt_ids)]}, "stream": [True],
               "ignore_eos": [True], "max_tokens": [r.output_len], "temperature": [0.0]}
        if r.adapter_index is not None:
            row["lora_id"] = [adapter_name(r.adapter_index)]
        rows.append(row)
    path.write_text(json.dumps({"data": rows}))
    return path


def run_perf_analyzer(url: str, requests: list[BenchRequest], concurrency: int, work: Path,
                      binary: Optional[str] = None, timeout: float = 300) -> dict:
    """perf_analyzer --streaming at the same concurrency over the same requests; its req/s."""
    binary = binary or os.environ.get("PERF_ANALYZER") or str(Path(sys.executable).parent / "perf_analyzer")
    inputs = perf_analyzer_inputs(requests, work / "perf_analyzer_inputs.json")
    cmd = [binary, "-m", MODEL, "-i", "grpc", "-u", url, "--streaming", "--input-data", str(inputs),
           "--concurrency-range", str(concurrency), "--measurement-mode", "count_windows",
           "--measurement-request-count", str(max(concurrency, len(requests) // 2)),
           "--max-trials", "3", "--stability-percentage", "999"]
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime as cudart     # the wheel's perf_analyzer links libcudart.so.12
        env["LD_LIBRARY_PATH"] = os.pathsep.join([os.path.join(cudart.__path__[0], "lib"),
                                                  env.get("LD_LIBRARY_PATH", "")])
    except ImportError:
        pass
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as error:
        return {"ok": False, "error": str(error)}
    out = run.stdout + run.stderr
    (work / "perf_analyzer.log").write_text(" ".join(cmd) + "\n" + out)
    found = re.search(r"Client:.*?Throughput: ([\d.]+) infer/sec", out, re.S)
    responses = re.search(r"Response Throughput: ([\d.]+)", out)
    return {"ok": run.returncode == 0 and found is not None, "returncode": run.returncode,
            "req_s": float(found[1]) if found else None, "responses_s": float(responses[1]) if responses else None,
            "log": str(work / "perf_analyzer.log"), "tail": out.strip().splitlines()[-3:] if out.strip() else []}
