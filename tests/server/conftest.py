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
from typing import Optional

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
    run_dir: Optional[Path] = None
    grpc_only: bool = False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"{self.metrics_url}/metrics", timeout=10) as r:
            return r.read().decode()

    def is_ready(self) -> bool:
        if self.grpc_only:
            import tritonclient.grpc as grpcclient

            client = grpcclient.InferenceServerClient(self.grpc_url)
            try:
                return client.is_model_ready("multilora")
            except Exception:       # not up (yet): any transport error
                return False
            finally:
                client.close()
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
    proc, srv = start_launcher(base, model_args)
    try:
        yield srv
    finally:
        _stop(proc)


def start_launcher(base: Path, model_args: list[str]) -> tuple[subprocess.Popen, Server]:
    """scripts/serve.py on free ports, in its own session, once its model is ready; the caller stops it."""
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
                 log, admin_key, run_dir=base / "run", grpc_only="--grpc-only" in model_args)
    deadline = time.monotonic() + READY_TIMEOUT_S + 30
    while not srv.is_ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(f"the server did not become ready (exit code {proc.poll()}); log:\n{_tail(log)}")
        time.sleep(0.5)
    while "multilora is ready" not in log.read_text(errors="replace"):  # the banner names tritonserver's pid
        assert time.monotonic() < deadline and proc.poll() is None, _tail(log)
        time.sleep(0.2)
    return proc, srv


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


DEMO_ARGS = ["--model", str(REPO / "models" / "demo-llama"), "--adapter-roots", str(REPO / "models" / "demo-adapters")]


@pytest.fixture
def launcher(tmp_path):
    """start(extra_args, model_args=demo) -> (launcher process, ready Server): the test's own server, stopped after."""
    started = []

    def start(extra_args: list[str], model_args: list[str] = DEMO_ARGS):
        proc, srv = start_launcher(tmp_path, model_args + extra_args)
        started.append(proc)
        return proc, srv
    yield start
    for proc in started:
        _stop(proc)


@pytest.fixture(scope="session")
def demo_reference():
    """demo_reference(prompts, adapter, max_tokens, ignore_eos) -> [token ids]: the demo model in-process, greedy.

    `adapter` is a demo adapter name (or a copy of one served under another name), None for the base model.
    """
    from multilora import LLM, LoRARequest, SamplingParams

    llm = LLM(model=str(REPO / "models" / "demo-llama"), enable_lora=True, max_loras=4, max_lora_rank=64,
              dtype="float32", device="cpu")
    ids = {name: i + 1 for i, name in enumerate(("upper", "reverse", "json"))}
    cache = {}

    def run(prompts: list[str], adapter, max_tokens: int, ignore_eos: bool) -> list[list[int]]:
        todo = [p for p in dict.fromkeys(prompts) if (p, adapter, max_tokens, ignore_eos) not in cache]
        if todo:
            lora = LoRARequest(adapter, ids[adapter], str(REPO / "models" / "demo-adapters" / adapter)) if adapter else None
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
            for prompt, out in zip(todo, llm.generate(todo, params, lora_request=lora)):
                cache[(prompt, adapter, max_tokens, ignore_eos)] = list(out.outputs[0].token_ids)
        return [cache[(p, adapter, max_tokens, ignore_eos)] for p in prompts]

    return run


def _tail(path: Path, lines: int = 150) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def pytest_configure(config):
    config.addinivalue_line("markers", "soak: minutes of load against one server (CI runs it; -m 'not soak' skips it)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and {"server", "demo_server", "launcher"} & set(item.fixturenames):
        for log in _server_log:
            report.sections.append((f"Triton server log (tail of {log.parent.name})", _tail(log)))

