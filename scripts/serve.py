"""Start a Triton Inference Server serving the `multilora` model (what `make serve` runs).

It finds a tritonserver (--tritonserver, then PATH, then the one inside the
nvidia-pytriton wheel), refuses to start when the stub's Python cannot serve
(serve_checks.py: numpy 2 under the wheel's stub, the package not importable,
a CUDA device asked for but absent), prepares a runtime directory (the model
repository with a serving.json written from these options and, for the wheel's
server, a Python backend whose stub matches this Python), starts the server
bound to 127.0.0.1 with the admin-like APIs (shared memory, logging, model
repository, trace) behind a key, waits until the model is ready and prints the
endpoints and a client command. Then it supervises the server (supervisor.py):
a crashed server, dead stub or dead engine is restarted; Ctrl-C or SIGTERM
drains and stops it within --shutdown-timeout.

Every option can also be set by an environment variable, shown in --help.
Without --model it serves models/demo-llama with models/demo-adapters when
they exist, else a tiny random model with three adapters made under the run
directory.
"""

import argparse
import json
import os
import secrets
import shutil
import signal
import sys
import sysconfig
import urllib.error
import urllib.request

from serve_checks import check_environment  # this directory
from supervisor import CONTROL_DIR_ENV, SHM_PREFIX_ENV, Supervisor, SupervisorConfig, drain_seconds, log

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_MODEL_DIR = os.path.join(REPO, "model_repository", "multilora")

MODEL_NAME = "multilora"
ADMIN_HEADER = "multilora-admin-key"
ADMIN_KEY_ENV = "MULTILORA_ADMIN_KEY"
# Every admin-like API: loading models, registering shared memory, changing the log, tracing to files.
RESTRICTED_APIS = "shared-memory,logging,model-repository,trace"
# Clients may send gRPC keepalive pings, idle or not, as often as once a second: pings are how a client
# notices a server that died without closing its connections (docs/serving.md). Triton server's defaults
# count a ping within 5 minutes of the last one as a strike and close the connection (GOAWAY
# "too_many_pings") after two strikes.
GRPC_CLIENT_PINGS = ["--grpc-keepalive-permit-without-calls=1", "--grpc-http2-min-recv-ping-interval-without-data=1000"]
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
    ("--tensor-parallel-size", "tensor_parallel_size", int, None),
]


def _env_name(flag: str) -> str:
    return "MULTILORA_" + flag.lstrip("-").replace("-", "_").upper()


def _add(parser, flag, help_text, default=None, **kwargs):
    """An option whose default comes from its MULTILORA_* environment variable."""
    env = _env_name(flag)
    if default not in (None, "") and "default:" not in help_text:
        help_text += f" (default: {default})"
    parser.add_argument(flag, default=os.environ.get(env, default), help=f"{help_text} [env {env}]", **kwargs)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class _RefuseKeyOnCommandLine(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is gone: a key on a command line is visible to every local user "
                     f"(ps). Set {ADMIN_KEY_ENV} or pass --admin-key-file")


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
    _add(g, "--admin-key-file", f"file holding the value of the header {ADMIN_HEADER} that unlocks the "
         f"restricted APIs; or set {ADMIN_KEY_ENV} (default: random, saved in RUN_DIR/admin-key, mode 600)")
    g.add_argument("--admin-key", nargs="?", action=_RefuseKeyOnCommandLine, help=argparse.SUPPRESS)
    g.add_argument("--grpc-only", action="store_true", default=_env_flag("MULTILORA_GRPC_ONLY"),
                   help="serve gRPC only, no HTTP endpoint [env MULTILORA_GRPC_ONLY=1]")
    _add(g, "--run-dir", "runtime directory (model repository copy, backend, random model; default: .run)",
         default=os.path.join(REPO, ".run"))
    _add(g, "--tritonserver", "tritonserver binary (default: on PATH, else the nvidia-pytriton wheel's)")
    _add(g, "--ready-timeout", "seconds to wait for the model to be ready", default=600, type=float)
    _add(g, "--shutdown-timeout", "seconds from SIGTERM to exit; requests still unfinished "
         "max(T/2, T-10) s after it end with UNAVAILABLE", default=30, type=float)
    _add(g, "--health-timeout", "seconds without a health report from the model before the server "
         "is restarted (a hung stub)", default=20, type=float)
    _add(g, "--max-restarts", "restarts allowed within 10 minutes before giving up", default=5, type=int)
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


def server_environment(wheel: str | None, control_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != ADMIN_KEY_ENV} | {
        CONTROL_DIR_ENV: control_dir, SHM_PREFIX_ENV: shm_prefix()}
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
    """From the environment, else the key file, else a random one written to RUN_DIR/admin-key."""
    if os.environ.get(ADMIN_KEY_ENV, "").strip():
        return os.environ[ADMIN_KEY_ENV].strip()
    if args.admin_key_file:
        try:
            with open(args.admin_key_file, encoding="utf-8") as f:
                key = f.read().strip()
        except OSError as e:
            sys.exit(f"--admin-key-file: {e}")
        if not key:
            sys.exit(f"--admin-key-file {args.admin_key_file} is empty")
        return key
    path = os.path.join(args.run_dir, "admin-key")
    key = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def shm_prefix() -> str:
    """This launcher's name for the Python backend's shared-memory regions, so it can remove exactly them."""
    return f"multilora_{os.getpid()}_"


def server_command(binary: str, args, repo: str, backends: str | None, key: str) -> list[str]:
    # Triton server takes the restricted-API key only on its command line (2.51 and later
    # releases alike): visible in /proc/<pid>/cmdline to local users; docs/serving.md says how to contain it.
    restricted = f"{RESTRICTED_APIS}:{ADMIN_HEADER}={key}"
    cmd = [binary, f"--model-repository={repo}", "--model-control-mode=none", "--strict-readiness=true",
           f"--grpc-address={args.host}", f"--grpc-port={args.grpc_port}",
           f"--metrics-address={args.host}", f"--metrics-port={args.metrics_port}",
           f"--grpc-restricted-protocol={restricted}", *GRPC_CLIENT_PINGS,
           f"--backend-config=python,shm-region-prefix-name={shm_prefix()}",
           f"--exit-timeout-secs={max(1, int(args.shutdown_timeout))}", f"--log-verbose={args.log_verbose}"]
    if args.grpc_only:
        cmd.append("--allow-http=false")
    else:
        cmd += [f"--http-address={args.host}", f"--http-port={args.http_port}",
                f"--http-restricted-api={restricted}"]
    if backends:
        cmd.append(f"--backend-directory={backends}")
    return cmd


# ---- running ----------------------------------------------------------------------

def readiness_probe(args):
    """A () -> bool that asks the server whether the model is ready, over HTTP or, with --grpc-only, gRPC."""
    host = _local_host(args.host)
    if not args.grpc_only:
        url = f"http://{host}:{args.http_port}/v2/models/{MODEL_NAME}/ready"

        def http_ready() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    return r.status == 200
            except (urllib.error.URLError, OSError):
                return False
        return http_ready
    try:
        import tritonclient.grpc as grpcclient
    except ImportError:
        sys.exit("--grpc-only checks readiness over gRPC and needs tritonclient: pip install 'tritonclient[grpc]'")

    def grpc_ready() -> bool:
        client = grpcclient.InferenceServerClient(f"{host}:{args.grpc_port}")
        try:
            return client.is_model_ready(MODEL_NAME)
        except Exception:   # not up yet: any transport error means "not ready"
            return False
        finally:
            client.close()
    return grpc_ready


def _local_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _shown_path(path: str) -> str:
    """Relative to the working directory when inside it, so the command pastes as is."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def print_banner(args, proc, model_dir: str, roots: list[str]):
    host = _local_host(args.host)
    http = f"http://{host}:{args.http_port}"
    key_note = (f"${ADMIN_KEY_ENV}" if os.environ.get(ADMIN_KEY_ENV, "").strip() else
                f"the contents of {args.admin_key_file}" if args.admin_key_file else
                f"$(cat {os.path.join(args.run_dir, 'admin-key')})")
    http_lines = ("  HTTP      (off: --grpc-only)" if args.grpc_only else
                  f"  HTTP      {http}/v2/models/{MODEL_NAME}/generate  (and /generate_stream)")
    # temperature 0: the demo model's answers are exact, so a newcomer sees them rather than samples.
    curl = ("" if args.grpc_only else f"""
  curl -s {http}/v2/models/{MODEL_NAME}/generate -d '{{"text_input": "green apple river\\n=>", "max_tokens": 48, "temperature": 0}}'""")
    print(f"""
multilora is ready (tritonserver pid {proc.pid})
  gRPC      {host}:{args.grpc_port}
{http_lines}
  metrics   http://{host}:{args.metrics_port}/metrics
  model     {model_dir}
  adapters  {os.pathsep.join(roots) or '(no adapter roots)'}{' + ' + args.registry if args.registry else ''}
  admin     {RESTRICTED_APIS.replace(',', ', ')} APIs need header {ADMIN_HEADER}: {key_note}
            (over gRPC the header is named triton-grpc-protocol-{ADMIN_HEADER})
Try:
  {_shown_path(sys.executable)} {_shown_path(os.path.join(REPO, "client_examples", "grpc_stream.py"))} --url {host}:{args.grpc_port}{curl}
Ctrl-C stops the server (in-flight requests get up to {drain_note(args)}).""", flush=True)


def drain_note(args) -> str:
    return f"{drain_seconds(args.shutdown_timeout):.0f} s to finish; the launcher exits within {args.shutdown_timeout:.0f} s"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.run_dir = os.path.abspath(args.run_dir)
    os.makedirs(args.run_dir, exist_ok=True)
    model_dir, roots = model_and_adapters(args)
    serving = {"engine": engine_settings(args, model_dir),
               "adapters": {"roots": roots, "registry": args.registry and os.path.abspath(args.registry),
                            "hub_cache_dir": args.hub_cache_dir and os.path.abspath(args.hub_cache_dir)}}
    binary, wheel = find_tritonserver(args.tritonserver)
    control_dir = os.path.join(args.run_dir, "control")
    env = server_environment(wheel, control_dir)
    problems = check_environment(env, args.device, wheel_stub=wheel is not None, repo=REPO)
    if problems:
        for problem in problems:
            print(f"serve.py: cannot serve: {problem}", file=sys.stderr)
        return 2
    backends = prepare_wheel_backend(args.run_dir, wheel) if wheel else None
    repo = prepare_repository(args.run_dir, serving)
    cmd = server_command(binary, args, repo, backends, admin_key(args))
    print("starting:", " ".join(c if ADMIN_HEADER not in c else c.split("=")[0] + "=<restricted>" for c in cmd),
          flush=True)

    def on_ready(proc, restarts: int):
        if restarts == 0:
            print_banner(args, proc, model_dir, roots)
        else:
            log(f"multilora is ready again (tritonserver pid {proc.pid}, after {restarts} restart(s))")

    supervisor = Supervisor(SupervisorConfig(
        command=cmd, env=env, control_dir=control_dir, shm_prefix=shm_prefix(), is_ready=readiness_probe(args),
        ready_timeout=args.ready_timeout, shutdown_timeout=args.shutdown_timeout,
        health_timeout=args.health_timeout, max_restarts=args.max_restarts), on_ready)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
