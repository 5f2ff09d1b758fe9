"""Checks, before tritonserver starts, that the environment can serve (scripts/serve.py runs them).

Each failure found on a real machine so far ended in a server that started
and then hung or died on the first request, so they are refused up front,
with what to install:

- numpy 2 under the Python backend stub of the nvidia-pytriton 0.7.0 wheel
  (Triton server 2.51): that stub is built for numpy < 2 and dies on the first
  non-empty string input ("unpack_from requires a buffer of at least ..."),
  after which every request hangs.
- `multilora` (or `multilora_kernels`) not importable by the stub's
  interpreter. The stub ignores PYTHONPATH, so the check runs that
  interpreter with PYTHONPATH removed.
- A CUDA device asked for (`--device cuda[:N]`) that this machine's torch
  cannot see.

The interpreter is the one the stub will run: `python3` on the server's PATH.
One subprocess answers all three (importing the package imports torch).
"""

import json
import shutil
import subprocess
from typing import Optional

_PROBE = r"""
import json, sys
found = {}
try:
    import numpy
    found["numpy"] = numpy.__version__
except Exception as e:
    found["numpy_error"] = f"{type(e).__name__}: {e}"
try:
    import multilora, multilora_kernels
except Exception as e:
    found["package_error"] = f"{type(e).__name__}: {e}"
if sys.argv[1] == "cuda":
    try:
        import torch
        found["torch"] = torch.__version__
        found["torch_cuda"] = torch.version.cuda
        found["cuda_devices"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as e:
        found["torch_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(found))
"""
PROBE_TIMEOUT_S = 300   # importing torch on a loaded machine can take a while


def stub_interpreter(env: dict) -> Optional[str]:
    """The `python3` the Python backend stub will find on the server's PATH."""
    return shutil.which("python3", path=env.get("PATH", ""))


def cuda_index(device: Optional[str]) -> Optional[int]:
    """The CUDA device index that `device` asks for; None when it asks for none ("auto" may fall back to CPU)."""
    if not device or not device.startswith("cuda"):
        return None
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


def probe(python: str, env: dict, device: Optional[str]) -> dict:
    """What `python` (run as the stub would run it, without PYTHONPATH) can import and see."""
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    mode = "cuda" if cuda_index(device) is not None else "-"
    run = subprocess.run([python, "-c", _PROBE, mode], env=env, capture_output=True, text=True,
                         timeout=PROBE_TIMEOUT_S, cwd="/")
    try:
        return json.loads(run.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"probe_error": (run.stderr or run.stdout).strip()[-500:] or f"exit code {run.returncode}"}


def problems(found: dict, python: str, device: Optional[str], wheel_stub: bool, repo: str) -> list[str]:
    """Each reason the stub's interpreter cannot serve, as a sentence saying what to do."""
    if "probe_error" in found:
        return [f"{python} (the Python backend stub's interpreter) failed to start: {found['probe_error']}"]
    found_problems = []
    numpy_version = found.get("numpy")
    if numpy_version is None:
        found_problems.append(f"{python} cannot import numpy ({found.get('numpy_error')}): "
                              f"{python} -m pip install 'numpy<2'")
    elif wheel_stub and int(numpy_version.split(".")[0]) >= 2:
        found_problems.append(
            f"{python} has numpy {numpy_version}, but the Python backend stub of the nvidia-pytriton "
            "wheel (Triton server 2.51) is built for numpy < 2: with numpy 2 it dies on the first "
            f"string input and the server hangs. Install: {python} -m pip install 'numpy<2' "
            "(requirements.txt pins numpy==1.26.4), or serve from NVIDIA's tritonserver container "
            "(docs/serving.md)")
    if "package_error" in found:
        found_problems.append(
            f"{python} (the Python backend stub's interpreter) cannot import multilora and multilora_kernels "
            f"({found['package_error']}); the stub ignores PYTHONPATH, so install the package into that "
            f"interpreter: {python} -m pip install --no-deps --no-build-isolation -e {repo} "
            "(`make venv` does this)")
    index = cuda_index(device)
    if index is not None:
        devices = found.get("cuda_devices")
        if devices is None:
            found_problems.append(f"--device {device}: {python} cannot import torch ({found.get('torch_error')})")
        elif devices <= index:
            build = f"CUDA {found['torch_cuda']}" if found.get("torch_cuda") else "no CUDA (a CPU-only build)"
            found_problems.append(
                f"--device {device} was asked for, but torch {found.get('torch')} in {python} (built for "
                f"{build}) sees {devices} CUDA device(s). Check the driver (nvidia-smi), install a CUDA "
                "build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu130), "
                "or pass --device cpu")
    return found_problems


def check_environment(env: dict, device: Optional[str], wheel_stub: bool, repo: str) -> list[str]:
    """Every problem that would keep the server from serving; empty when it can serve."""
    python = stub_interpreter(env)
    if python is None:
        return ["no python3 on the server's PATH: the Python backend stub needs one (with numpy, torch "
                "and this package installed)"]
    return problems(probe(python, env, device), python, device, wheel_stub, repo)
