"""scripts/serve.py refuses to start, saying what to install, when the stub's Python cannot serve (issue 8)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import serve  # noqa: E402
import serve_checks  # noqa: E402

PY = "/venv/bin/python3"


def problems(found: dict, device=None, wheel_stub=True) -> list[str]:
    return serve_checks.problems(found, PY, device, wheel_stub, "/repo")


def test_a_working_environment_has_no_problems():
    assert problems({"numpy": "1.26.4"}) == []
    assert problems({"numpy": "2.1.0"}, wheel_stub=False) == []     # NVIDIA's container builds its stub for numpy 2
    assert problems({"numpy": "1.26.4", "torch": "2.11", "torch_cuda": "13.0", "cuda_devices": 2}, "cuda:1") == []


def test_numpy_2_under_the_wheels_stub_is_refused_with_the_pin_to_install():
    [problem] = problems({"numpy": "2.1.0"})
    assert "numpy 2.1.0" in problem and "pip install 'numpy<2'" in problem and PY in problem


def test_a_package_the_stub_cannot_import_is_refused_with_the_install_command():
    [problem] = problems({"numpy": "1.26.4", "package_error": "ModuleNotFoundError: No module named 'multilora'"})
    assert "ignores PYTHONPATH" in problem and f"{PY} -m pip install --no-deps --no-build-isolation -e /repo" in problem


def test_a_cuda_device_that_torch_cannot_see_is_refused():
    [problem] = problems({"numpy": "1.26.4", "torch": "2.13.0+cpu", "torch_cuda": None, "cuda_devices": 0}, "cuda")
    assert "--device cuda" in problem and "sees 0 CUDA device" in problem and "CPU-only build" in problem
    [problem] = problems({"numpy": "1.26.4", "torch": "2.11", "torch_cuda": "13.0", "cuda_devices": 1}, "cuda:1")
    assert "--device cuda:1" in problem and "sees 1 CUDA device" in problem
    assert serve_checks.cuda_index("auto") is None and serve_checks.cuda_index("cpu") is None


def _fake_python(directory: Path, script: str) -> Path:
    directory.mkdir(parents=True)
    python = directory / "python3"
    python.write_text(f"#!/bin/sh\n{script}\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return directory


def test_this_environment_passes_as_the_stub_would_run_it(tmp_path):
    env = serve.server_environment(str(tmp_path / "pytriton" / "tritonserver"), str(tmp_path / "control"))
    env["PYTHONPATH"] = "/nonexistent"      # the stub ignores it; so does the check
    assert serve_checks.check_environment(env, "cpu", wheel_stub=True, repo=str(REPO)) == []


def test_the_stubs_own_interpreter_is_checked_without_pythonpath(tmp_path):
    # An interpreter without site-packages: what a stub finds when the package was never installed into it.
    bare = _fake_python(tmp_path / "bare", f'exec {sys.executable} -S "$@"')
    env = {"PATH": f"{bare}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(REPO / "backend_src")}
    found = serve_checks.check_environment(env, "cpu", wheel_stub=True, repo=str(REPO))
    assert any("cannot import multilora" in p and str(bare / "python3") in p for p in found), found

    fake_numpy = tmp_path / "numpy2" / "numpy"
    fake_numpy.mkdir(parents=True)
    (fake_numpy / "__init__.py").write_text('__version__ = "2.0.2"\n')
    numpy2 = _fake_python(tmp_path / "np2", f'PYTHONPATH={fake_numpy.parent} exec {sys.executable} -S "$@"')
    found = serve_checks.check_environment({"PATH": str(numpy2)}, "cpu", wheel_stub=True, repo=str(REPO))
    assert any("numpy 2.0.2" in p for p in found), found


def test_serve_refuses_a_missing_cuda_device_before_starting_anything(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "serve.py"), "--model", str(tmp_path),
                          "--device", "cuda:99", "--run-dir", str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "cannot serve: --device cuda:99 was asked for" in run.stderr and "--device cpu" in run.stderr
    assert not (tmp_path / "run" / "model_repository").exists()
