"""Start a Triton Inference Server serving the `multilora` model (what `make serve` runs).

It finds a tritonserver (--tritonserver, then PATH, then the one inside the
nvidia-pytriton wheel), prepares a runtime directory (the model repository
with a serving.json written from these options and, for the wheel's server, a
Python backend whose stub matches this Python), starts the server bound to
127.0.0.1 with the shared-memory, logging and model-repository APIs behind a
key, waits until the model is ready, prints the endpoints and a client
command, and forwards Ctrl-C / SIGTERM to the server.

Every option can also be set by an environment variable, shown in --help.
Without --model it serves models/demo-llama with models/demo-adapters when
they exist, else a tiny random model with three adapters made under the run
directory.
"""

import argparse
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_MODEL_DIR = os.path.join(REPO, "model_repository", "multilora")
MODEL_NAME = "multilora"
ADMIN_HEADER = "multilora-admin-key"
RESTRICTED_APIS = "shared-memory,logging,model-repository"
DEMO_MODEL = os.path.join(REPO, "models", "demo-llama")
DEMO_ADAPTERS = os.path.join(REPO, "models", "demo-adapters")

# Engine options: (flag, EngineConfig key, type, default). None = the engine's default.
ENGINE_OPTIONS = [
    ("--dtype", "dtype", str, None), ("--device", "device", str, None),
    ("--load-format", "load_format", str, None), ("--seed", "seed", int, None),
    ("--max-loras", "max_loras", int, 4), ("--max-lora-rank", "max_lora_rank", int, 64),
    ("--max-cpu-loras", "max_cpu_loras", int, None), ("--max-num-seqs", "max_num_seqs", int, None),
    ("--max-num-batched-tokens", "max_num_batched_tokens", int, None),
    ("--num-kv-blocks", "num_kv_blocks", int, None), ("--block-size", "block_size", int, None),
    ("--max-model-len", "max_model_len", int, None),
]


def _env_name(flag: str) -> str:
    return "MULTILORA_" + flag.lstrip("-").replace("-", "_").upper()


def _add(parser, flag, help_text, default=None, **kwargs):
    """An option whose default comes from its MULTILORA_* environment variable."""
    env = _env_name(flag)
    if default not in (None, "") and "default:" not in help_text:
        help_text += f" (default: {default})"
    parser.add_argument(flag, default=os.environ.get(env, default), help=f"{help_text} [env {env}]", **kwargs)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model and adapters")
    _add(g, "--model", "Hugging Face model directory (default: models/demo-llama, else a random model)")
    _add(g, "--adapter-roots", "directories whose subdirectories are adapters, separated by "
         f"'{os.pathsep}' (default: models/demo-adapters with the demo model)")
    _add(g, "--registry", "multi_lora.json: adapter name -> directory, or a pinned hub repository")
    _add(g, "--hub-cache-dir", "where adapters listed as hub repositories are downloaded")
    g = parser.add_argument_group("engine limits (EngineConfig fields)")
    for flag, key, kind, default in ENGINE_OPTIONS:
        _add(g, flag, f"{key} (default: {default if default is not None else 'the engine default'})",
             default=default, type=kind)
    _add(g, "--engine-arg", "any other EngineConfig field as KEY=VALUE; ',' separates several", default="")
    g = parser.add_argument_group("server")
    _add(g, "--host", "address every endpoint binds to", default="127.0.0.1")
    _add(g, "--http-port", "HTTP port", default=8000, type=int)
    _add(g, "--grpc-port", "gRPC port", default=8001, type=int)
    _add(g, "--metrics-port", "Prometheus /metrics port", default=8002, type=int)
    _add(g, "--admin-key", "value of the admin header that unlocks the restricted APIs "
         "(default: random, saved in RUN_DIR/admin-key)")
    _add(g, "--run-dir", "runtime directory (model repository copy, backend, random model; default: .run)",
         default=os.path.join(REPO, ".run"))
    _add(g, "--tritonserver", "tritonserver binary (default: on PATH, else the nvidia-pytriton wheel's)")
    _add(g, "--ready-timeout", "seconds to wait for the model to be ready", default=600, type=float)
    _add(g, "--log-verbose", "Triton server verbose log level", default=0, type=int)
    return parser.parse_args(argv)


# ---- what to serve --------------------------------------------------------------

def model_and_adapters(args) -> tuple[str, list[str]]:
    """The model directory and adapter roots: given, the demo model's, or a random model's."""
    roots = [os.path.abspath(r) for r in (args.adapter_roots or "").split(os.pathsep) if r]
    if args.model:
        return os.path.abspath(args.model), roots
    if os.path.isfile(os.path.join(DEMO_MODEL, "config.json")):
        return DEMO_MODEL, roots or ([DEMO_ADAPTERS] if os.path.isdir(DEMO_ADAPTERS) else [])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_random_model import make_random_model

    print(f"models/demo-llama is not there yet: serving a tiny random model from {args.run_dir}/random-model",
          flush=True)
    model_dir, adapter_root = make_random_model(os.path.join(args.run_dir, "random-model"))
    return model_dir, roots or [adapter_root]


def engine_settings(args, model_dir: str) -> dict:
    settings = {"model": model_dir, "enable_lora": True}
    for flag, key, _, _ in ENGINE_OPTIONS:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            settings[key] = value
    for pair in filter(None, (p.strip() for p in args.engine_arg.split(","))):
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"--engine-arg {pair!r}: expected KEY=VALUE")
        settings[key.strip()] = value.strip()  # EngineConfig.from_dict converts strings
    return settings


# ---- runtime directory ------------------------------------------------------------

def prepare_repository(run_dir: str, serving: dict) -> str:
    """A copy of model_repository/ with this run's serving.json; returns the repository path."""
    repo = os.path.join(run_dir, "model_repository")
    target = os.path.join(repo, MODEL_NAME)
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(os.path.join(target, "1"))
    shutil.copy2(os.path.join(SOURCE_MODEL_DIR, "config.pbtxt"), target)
    for name in os.listdir(os.path.join(SOURCE_MODEL_DIR, "1")):
        if name.endswith(".py"):
            shutil.copy2(os.path.join(SOURCE_MODEL_DIR, "1", name), os.path.join(target, "1"))
    with open(os.path.join(target, "serving.json"), "w") as f:
        json.dump(serving, f, indent=2)
    return repo


def find_tritonserver(explicit: str | None) -> tuple[str, str | None]:
    """(binary, wheel directory or None); the wheel's server needs a prepared backend."""
    if explicit:
        return explicit, None
    on_path = shutil.which("tritonserver")
    if on_path:
        return on_path, None
    try:
        import pytriton
    except ImportError:
        sys.exit("no tritonserver found: install nvidia-pytriton (make venv does) or put tritonserver on PATH")
    wheel = os.path.join(os.path.dirname(pytriton.__file__), "tritonserver")
    return os.path.join(wheel, "bin", "tritonserver"), wheel


def prepare_wheel_backend(run_dir: str, wheel: str) -> str:
    """The wheel's Python backend plus the stub built for this Python; returns the backend directory."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = os.path.join(wheel, "python_backend_stubs", version, "triton_python_backend_stub")
    if not os.path.isfile(stub):
        sys.exit(f"the nvidia-pytriton wheel has no Python backend stub for Python {version}")
    backends = os.path.join(run_dir, "backends")
    shutil.rmtree(backends, ignore_errors=True)
    shutil.copytree(os.path.join(wheel, "backends"), backends,
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, os.path.join(backends, "python"))
    return backends


def server_environment(wheel: str | None) -> dict:
    env = dict(os.environ)
    if wheel is not None:
        # This Python's libpython first: otherwise the stub loads the system's and fails on import.
        libs = [sysconfig.get_config_var("LIBDIR"),
                os.path.join(os.path.dirname(os.path.dirname(wheel)), "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    if sys.prefix != sys.base_prefix:
        # The stub's embedded Python finds its home through `python3` on PATH: this
        # virtual environment's comes first, so the stub runs in it (its packages,
        # its .pth files) instead of mixing in the base interpreter's packages.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    return env


def admin_key(args) -> str:
    if args.admin_key:
        return args.admin_key
    path = os.path.join(args.run_dir, "admin-key")
    key = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def server_command(binary: str, args, repo: str, backends: str | None, key: str) -> list[str]:
    restricted = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={key}"
    cmd = [binary, f"--model-repository={repo}", "--model-control-mode=none", "--strict-readiness=true",
           f"--http-address={args.host}", f"--http-port={args.http_port}",
           f"--grpc-address={args.host}", f"--grpc-port={args.grpc_port}",
           f"--metrics-address={args.host}", f"--metrics-port={args.metrics_port}",
           f"--http-restricted-api={restricted}", f"--grpc-restricted-protocol={restricted}",
           "--exit-timeout-secs=30", f"--log-verbose={args.log_verbose}"]
    if backends:
        cmd.append(f"--backend-directory={backends}")
    return cmd


# ---- running ----------------------------------------------------------------------

def _die_with_parent():
    """Linux: the server gets SIGTERM if this launcher dies, so no server outlives it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def wait_ready(proc: subprocess.Popen, url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/v2/models/{MODEL_NAME}/ready", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def _shown_path(path: str) -> str:
    """Relative to the working directory when inside it, so the command pastes as is."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def print_banner(args, proc, model_dir: str, roots: list[str]):
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    http = f"http://{host}:{args.http_port}"
    key_note = "the --admin-key value" if args.admin_key else os.path.join(args.run_dir, "admin-key")
    print(f"""
multilora is ready (tritonserver pid {proc.pid})
  gRPC      {host}:{args.grpc_port}
  HTTP      {http}/v2/models/{MODEL_NAME}/generate  (and /generate_stream)
  metrics   http://{host}:{args.metrics_port}/metrics
  model     {model_dir}
  adapters  {os.pathsep.join(roots) or '(no adapter roots)'}{' + ' + args.registry if args.registry else ''}
  admin     shared-memory, logging and model-repository APIs need header {ADMIN_HEADER}: <{key_note}>
Try:
  {_shown_path(sys.executable)} {_shown_path(os.path.join(REPO, "client_examples", "grpc_stream.py"))} --url {host}:{args.grpc_port}
  curl -s {http}/v2/models/{MODEL_NAME}/generate -d '{{"text_input": "green apple river\\n=>", "max_tokens": 48}}'
Ctrl-C stops the server.""", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.run_dir = os.path.abspath(args.run_dir)
    os.makedirs(args.run_dir, exist_ok=True)
    model_dir, roots = model_and_adapters(args)
    serving = {"engine": engine_settings(args, model_dir),
               "adapters": {"roots": roots, "registry": args.registry and os.path.abspath(args.registry),
                            "hub_cache_dir": args.hub_cache_dir and os.path.abspath(args.hub_cache_dir)}}
    binary, wheel = find_tritonserver(args.tritonserver)
    backends = prepare_wheel_backend(args.run_dir, wheel) if wheel else None
    repo = prepare_repository(args.run_dir, serving)
    cmd = server_command(binary, args, repo, backends, admin_key(args))
    print("starting:", " ".join(c if ADMIN_HEADER not in c else c.split("=")[0] + "=<restricted>" for c in cmd),
          flush=True)
    proc = subprocess.Popen(cmd, env=server_environment(wheel), preexec_fn=_die_with_parent)

    def forward(signum, _frame):
        proc.send_signal(signum)  # a second Ctrl-C makes tritonserver exit at once

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    ready = wait_ready(proc, f"http://{host}:{args.http_port}", args.ready_timeout)
    if ready:
        print_banner(args, proc, model_dir, roots)
    elif proc.poll() is None:
        print(f"the model was not ready after {args.ready_timeout:.0f}s; stopping the server", file=sys.stderr)
        proc.terminate()
    else:
        print(f"tritonserver exited with code {proc.returncode} before the model was ready; "
              "its log is above", file=sys.stderr)
    code = proc.wait()
    code = code if code >= 0 else 128 - code
    return code if ready or code else 1


if __name__ == "__main__":
    sys.exit(main())
