"""A real Triton server (started by scripts/serve.py) on the tiny Llama of the test zoo.

The session's server gets free ports and its own run directory; it is
stopped at the end even when tests fail, and its log is attached to every
failed test's report. `reference` runs the same requests through the engine
in-process, which is what the server's streams must reproduce exactly.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.tiny_models import copy_adapter

REPO = Path(__file__).resolve().parents[2]
# Served name -> the zoo adapter behind it. The served names are the demo model's, so the
# client examples (perf_analyzer's input file) run unchanged against the test server.
ADAPTERS = {"upper": "sql", "reverse": "chat", "json": "code"}
REGISTERED = "kv"   # served only through multi_lora.json, from outside the root
MAX_LORA_RANK = 16
READY_TIMEOUT_S = 300
_server_log: list[Path] = []


@dataclass(frozen=True)
class Server:
    grpc_url: str
    http_url: str
    metrics_url: str
    adapter_root: Path
    model_dir: Path
    log: Path
    admin_key: str = ""
    registered: str = REGISTERED  # an adapter served only through multi_lora.json

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=10) as r:
            return r.read().decode()

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/models/multilora/ready", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _layout(zoo, base: Path) -> tuple[Path, Path]:
    """An adapter root with good, broken and escaping adapters, and a registry pointing outside it."""
    root = base / "adapters"
    root.mkdir()
    for served, zoo_name in ADAPTERS.items():
        copy_adapter(zoo.adapter_dir("llama", zoo_name), root / served)
    copy_adapter(zoo.broken_adapter_dir("bin_only"), root / "binonly")
    outside = copy_adapter(zoo.adapter_dir("llama", "sql"), base / "outside" / "sql")
    (root / "escape").symlink_to(outside, target_is_directory=True)
    registry = base / "multi_lora.json"
    registry.write_text(json.dumps({REGISTERED: str(zoo.adapter_dir("llama", REGISTERED))}))
    return root, registry


def _stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # the launcher forwards it; tritonserver unloads the model
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of this session still alive
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def launch(base: Path, model_args: list[str]):
    """Starts scripts/serve.py on free ports with `model_args`; yields a ready Server, stops it after."""
    http, grpc, metrics = _free_ports(3)
    log = base / "server.log"
    _server_log.append(log)
    admin_key = "test-admin-key"
    cmd = [sys.executable, str(REPO / "scripts" / "serve.py"), *model_args, "--run-dir", str(base / "run"),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--dtype", "float32", "--device", "cpu", "--ready-timeout", str(READY_TIMEOUT_S)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTILORA_")} | {
        "MULTILORA_TEST_THREADS": "1", "MULTILORA_ADMIN_KEY": admin_key}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    model_dir = Path(model_args[model_args.index("--model") + 1])
    root = Path(model_args[model_args.index("--adapter-roots") + 1])
    srv = Server(f"127.0.0.1:{grpc}", f"http://127.0.0.1:{http}", f"http://127.0.0.1:{metrics}", root, model_dir,
                 log, admin_key)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S + 30
        while not srv.is_ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the server did not become ready (exit code {proc.poll()}); log:\n{_tail(log)}")
            time.sleep(0.5)
        yield srv
    finally:
        _stop(proc)


@pytest.fixture(scope="session")
def server(tiny_zoo, tmp_path_factory) -> Server:
    base = tmp_path_factory.mktemp("server")
    root, registry = _layout(tiny_zoo, base)
    yield from launch(base, ["--model", str(tiny_zoo.model_dir("llama")), "--adapter-roots", str(root),
                             "--registry", str(registry), "--max-loras", "2",
                             "--max-lora-rank", str(MAX_LORA_RANK), "--num-kv-blocks", "128", "--block-size", "16"])


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory) -> Server:
    """The built-in demo model and its adapters, as `make serve` serves them."""
    yield from launch(tmp_path_factory.mktemp("demo_server"),
                      ["--model", str(REPO / "models" / "demo-llama"),
                       "--adapter-roots", str(REPO / "models" / "demo-adapters")])


@pytest.fixture(scope="session")
def reference(tiny_zoo):
    """reference(prompt, adapter, max_tokens) -> (text, token_ids) from the engine in-process (greedy, eos ignored).

    `adapter` is a served name, or None for the base model.
    """
    from multilora import LLM, SamplingParams

    llm = LLM(model=str(tiny_zoo.model_dir("llama")), enable_lora=True, max_loras=4,
              max_lora_rank=MAX_LORA_RANK, dtype="float32", device="cpu", num_kv_blocks=64)
    cache = {}

    def run(prompt, adapter, max_tokens):
        key = (tuple(prompt) if isinstance(prompt, list) else prompt, adapter, max_tokens)
        if key not in cache:
            lora = None
            if adapter is not None:
                lora = tiny_zoo.lora_request("llama", ADAPTERS.get(adapter, adapter))
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            out = llm.generate([prompt], params, lora_request=lora)[0].outputs[0]
            cache[key] = (out.text, list(out.token_ids))
        return cache[key]

    return run


def _tail(path: Path, lines: int = 150) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and {"server", "demo_server"} & set(item.fixturenames):
        for log in _server_log:
            report.sections.append((f"Triton server log (tail of {log.parent.name})", _tail(log)))

