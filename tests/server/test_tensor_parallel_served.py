"""tensor_parallel_size 2 inside the Triton server (CPU, gloo; issue 10).

The model keeps KIND_MODEL and its engine, inside the Python backend stub, spawns and drives its two
workers: streams give the engine's in-process tokens. A killed worker ends the streams in flight with
UNAVAILABLE; the model reports not ready, the launcher restarts the server (with new workers) and nothing
of the old one is left.
"""

import os
import re
import signal
import time
from pathlib import Path

from helpers.tiny_models import copy_adapter
from triton_client import Streams, run_stream
from multilora import LLM, SamplingParams

KIND = "llama-8h2kv"
MAX_TOKENS = 24
SERVER_ARGS = ["--tensor-parallel-size", "2", "--max-loras", "2", "--max-lora-rank", "16", "--num-kv-blocks", "128",
               "--block-size", "16", "--grpc-only"]


def _request(prompt: str, adapter=None, max_tokens: int = MAX_TOKENS) -> dict:
    return {"text_input": prompt, "stream": True, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            **({"lora_id": adapter} if adapter else {})}


def _workers(server_pid: int) -> list[int]:
    """The spawned processes in the server's session: the tensor-parallel workers."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        session = int(stat.rsplit(")", 1)[1].split()[3])
        if session == server_pid and b"multiprocessing.spawn" in cmdline:
            found.append(int(entry.name))
    return sorted(found)


def _server_pids(log: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"tritonserver pid (\d+)", log.read_text())]


def test_two_workers_serve_and_a_killed_one_restarts_the_server(launcher, tiny_zoo, tmp_path):
    root = tmp_path / "adapters"
    copy_adapter(tiny_zoo.adapter_dir(KIND, "sql"), root / "upper")
    model = tiny_zoo.model_dir(KIND)
    proc, srv = launcher(SERVER_ARGS, ["--model", str(model), "--adapter-roots", str(root)])
    first_server = _server_pids(srv.log)[-1]
    workers = _workers(first_server)
    assert len(workers) == 2, workers

    prompts = {"base": ("the quick brown fox", None), "lora": ("SELECT name FROM users WHERE", "upper")}
    served = run_stream(srv.grpc_url, {rid: _request(*pa) for rid, pa in prompts.items()})
    llm = LLM(str(model), enable_lora=True, max_lora_rank=16, dtype="float32", device="cpu", num_kv_blocks=64)
    for rid, (prompt, adapter) in prompts.items():
        lora = tiny_zoo.lora_request(KIND, "sql") if adapter else None
        want = llm.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
                            lora_request=lora)[0].outputs[0].token_ids
        assert served[rid].error is None and served[rid].token_ids == want, rid

    # Long enough that none ends between the first token and the kill.
    streams = Streams(srv.grpc_url, {f"k{i}": _request("Hello, world!", "upper" if i % 2 else None, 100)
                                     for i in range(4)})
    try:
        streams.collect(lambda: any(streams.tokens.values()), timeout=60)
        os.kill(workers[1], signal.SIGKILL)
        streams.collect(lambda: streams.answered() >= 4, timeout=60)
    finally:
        streams.close()
    assert not streams.finished and len(streams.errors) == 4, (streams.finished, streams.errors)
    # A stream's error carries its message (WorkerFailedError's: UNAVAILABLE, test_model_py.py maps it).
    assert all("a tensor-parallel worker of the model failed" in e for e in streams.errors), streams.errors

    deadline = time.monotonic() + 300
    while "multilora is ready again" not in srv.log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, srv.log.read_text()[-3000:]
        time.sleep(0.5)
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), workers
    assert len(_workers(_server_pids(srv.log)[-1])) == 2
    after = run_stream(srv.grpc_url, {"after": _request(*prompts["lora"])})["after"]
    assert after.error is None and after.token_ids == served["lora"].token_ids

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert _workers(first_server) == [] and _workers(_server_pids(srv.log)[-1]) == []
