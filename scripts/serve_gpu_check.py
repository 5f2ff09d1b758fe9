"""One command on a GPU host: the launcher's checks, the served demo model, a restart, a SIGTERM (issues 8, 9).

    PYTHONPATH=$PWD/backend_src:<dir with multilora_kernels -> kernels> python3 scripts/serve_gpu_check.py

Offline: unless this Python imports the package without PYTHONPATH (as
`make venv`'s does), it makes a virtual environment under $OUT (or a
temporary directory) that sees this Python's packages (torch, numpy,
nvidia-pytriton, tritonclient) plus a .pth file naming this checkout,
because the Python backend stub ignores PYTHONPATH. Then, through scripts/serve.py on free
ports with the demo model on --device (cuda:0):

1. the launcher's environment checks (it refuses, with what to install, if
   they fail; that refusal is the result then);
2. time to ready; the demo model's answers over gRPC streaming for the base
   model and every adapter, checked with multilora.demo_tasks;
3. the stub killed: time until the restarted server is ready again;
4. SIGTERM with 64 streams in flight: time to exit, requests answered;
5. no process or /dev/shm region left.

Prints a table last and writes serve_gpu_check.json under $OUT.
"""

import argparse
import glob
import json
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "backend_src"))
from multilora.demo_tasks import ADAPTER_NAMES, check, format_prompt, heldout_inputs  # noqa: E402


def serving_python(base: str) -> str:
    """This interpreter when it imports the package without PYTHONPATH (an installed checkout), else a venv."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", "import multilora, multilora_kernels"], env=env, cwd="/",
                           capture_output=True)
    return sys.executable if probe.returncode == 0 else make_venv(base)


def make_venv(base: str) -> str:
    """A venv over this Python's packages, with this checkout importable by any interpreter start (.pth)."""
    venv = os.path.join(base, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], check=True)
    kernels_dir = os.path.join(base, "pp")
    os.makedirs(kernels_dir, exist_ok=True)
    link = os.path.join(kernels_dir, "multilora_kernels")
    if not os.path.lexists(link):
        os.symlink(os.path.join(REPO, "kernels"), link)
    site = subprocess.run([os.path.join(venv, "bin", "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(site, "multilora-checkout.pth"), "w") as f:
        f.write(f"{os.path.join(REPO, 'backend_src')}\n{kernels_dir}\n")
    return os.path.join(venv, "bin", "python")


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def http_ready(url) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/models/multilora/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wait_for(predicate, timeout):
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.2)
    return time.monotonic() - start


def stream(grpc_url, requests: dict, until_first=False, timeout=300):
    """Sends {id: (prompt, adapter, max_tokens)} on one gRPC stream; returns (client, responses queue)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    responses = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    for rid, (prompt, adapter, max_tokens) in requests.items():
        values = {"text_input": np.array([prompt.encode()], dtype=np.object_), "stream": np.array([True]),
                  "max_tokens": np.array([max_tokens], dtype=np.int32),
                  "temperature": np.array([0.0], dtype=np.float32)}
        if adapter:
            values["lora_id"] = np.array([adapter.encode()], dtype=np.object_)
        inputs = []
        for name, array in values.items():
            t = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            t.set_data_from_numpy(array)
            inputs.append(t)
        client.async_stream_infer("multilora", inputs, request_id=rid, enable_empty_final_response=True)
    return client, responses


def collect(responses, n, timeout):
    texts, finals, errors = {}, set(), []
    deadline = time.monotonic() + timeout
    while len(finals) + len(errors) < n and time.monotonic() < deadline:
        try:
            result, error = responses.get(timeout=0.5)
        except queue.Empty:
            continue
        if error is not None:
            errors.append(error.message())
            continue
        response = result.get_response()
        if response.outputs:
            texts[response.id] = texts.get(response.id, "") + result.as_numpy("text_output")[0].decode()
        if response.parameters["triton_final_response"].bool_param:
            finals.add(response.id)
    return texts, finals, errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--dtype", default="float32", help="float32: the demo adapters' answers are exact")
    args = parser.parse_args()
    out = os.environ.get("OUT") or tempfile.mkdtemp(prefix="serve_gpu_check_")
    os.makedirs(out, exist_ok=True)
    result = {"device": args.device, "dtype": args.dtype, "python": sys.version.split()[0]}
    python = serving_python(out)
    http, grpc, metrics = free_ports(3)
    log_path = os.path.join(out, "serve.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTILORA_") and k != "PYTHONPATH"}
    env["MULTILORA_ADMIN_KEY"] = secrets.token_hex(16)
    cmd = [python, os.path.join(REPO, "scripts", "serve.py"), "--device", args.device, "--dtype", args.dtype,
           "--model", os.path.join(REPO, "models", "demo-llama"),
           "--adapter-roots", os.path.join(REPO, "models", "demo-adapters"), "--run-dir", os.path.join(out, "run"),
           "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics),
           "--max-num-seqs", "16", "--shutdown-timeout", "20"]
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url, grpc_url = f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}"
    try:
        ready_s = wait_for(lambda: http_ready(url) or proc.poll() is not None, 900)
        text = open(log_path).read()
        refusals = re.findall(r"serve\.py: cannot serve: (.*)", text) + re.findall(r"(no tritonserver found.*)", text)
        result["environment_check"] = "refused: " + " | ".join(refusals) if refusals else "passed"
        if proc.poll() is not None or ready_s is None:
            result["error"] = f"not ready (exit code {proc.poll()}); see {log_path}"
            return report(result, out)
        result["ready_s"] = round(time.monotonic() - started, 1)

        inputs = heldout_inputs(8, seed=5)
        requests = {f"{i}-{name or 'base'}": (format_prompt(w), name, 48)
                    for i, w in enumerate(inputs) for name in (None, *ADAPTER_NAMES)}
        client, responses = stream(grpc_url, requests)
        texts, finals, errors = collect(responses, len(requests), 300)
        client.stop_stream()
        client.close()
        right = sum(check(rid.split("-", 1)[1] if not rid.endswith("-base") else None, inputs[int(rid.split("-")[0])],
                          texts.get(rid, "")) for rid in finals)
        result["demo_answers_right"] = f"{right}/{len(requests)}"
        result["demo_errors"] = errors[:3]

        with open(os.path.join(out, "run", "control", "health.json")) as f:
            stub = json.load(f)["pid"]
        first_server = int(re.search(r"tritonserver pid (\d+)", open(log_path).read()).group(1))
        os.kill(stub, signal.SIGKILL)
        again = wait_for(lambda: "multilora is ready again" in open(log_path).read(), 900)
        result["stub_killed_ready_again_s"] = round(again, 1) if again is not None else None

        flood = {f"f{i}": (format_prompt(inputs[i % len(inputs)]), (None, *ADAPTER_NAMES)[i % 4], 200) for i in range(64)}
        client, responses = stream(grpc_url, flood)
        collect(responses, 1, 60)                                   # streams flowing
        sent_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, finals, errors = collect(responses, len(flood), 60)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        result["sigterm_exit_s"] = round(time.monotonic() - sent_at, 1) if proc.poll() is not None else None
        result["sigterm_exit_code"] = proc.poll()
        result["sigterm_answered"] = f"{len(finals) + len(errors)}/{len(flood)}"
        client.close()
        servers = [first_server] + [int(p) for p in re.findall(r"ready again \(tritonserver pid (\d+)",
                                                                 open(log_path).read())]
        wait_for(lambda: not any(_group_alive(pg) for pg in [proc.pid] + servers), 10)  # init reaps the last
        left = [pg for pg in [proc.pid] + servers if _group_alive(pg)]
        shm = glob.glob(f"/dev/shm/multilora_{proc.pid}_*")
        result["left_behind"] = "none" if not left and not shm else f"process groups {left}, shm {shm}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return report(result, out)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def report(result: dict, out: str) -> int:
    with open(os.path.join(out, "serve_gpu_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    width = max(len(k) for k in result)
    print(f"\n{'check'.ljust(width)}  result")
    for key, value in result.items():
        print(f"{key.ljust(width)}  {value}")
    ok = (result.get("environment_check") == "passed" and result.get("left_behind") == "none"
          and result.get("sigterm_exit_code") == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
