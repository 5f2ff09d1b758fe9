"""Dependent launches (kernels/_launch.py): every kernel waits for its inputs first, and the launcher
asks for a dependent launch exactly where one can run.

A kernel launched dependent may start while the previous kernel on its stream still writes its
inputs, so a load or an early return before `wait_for_inputs` would be a race that only a GPU
shows, now and then: this test reads each kernel's source instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from multilora_kernels import _launch

KERNEL_FILES = sorted((Path(__file__).resolve().parents[2] / "kernels").glob("*.py"))


def _kernels():
    for path in KERNEL_FILES:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                yield pytest.param(node, id=f"{path.stem}.{node.name}")


def test_the_kernel_files_define_kernels():
    assert len(list(_kernels())) >= 12


@pytest.mark.parametrize("kernel", _kernels())
def test_every_kernel_waits_for_its_inputs_before_anything_else(kernel):
    params = [a.arg for a in kernel.args.args]
    assert "PDL" in params, f"{kernel.name} takes no PDL constexpr (the launcher passes one)"
    first = kernel.body[0]
    assert isinstance(first, ast.Expr) and ast.unparse(first) == "_wait_for_inputs(PDL)", (
        f"{kernel.name} starts with {ast.unparse(first)!r}, not _wait_for_inputs(PDL)")


class _RecordingKernel:
    """Stands in for a kernel: records what `launch` starts it with."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.calls.append((grid, args, meta))


def test_an_interpreted_kernel_is_never_launched_dependent():
    kernel = _RecordingKernel()
    _launch.launch(kernel, (3,), torch.device("cpu"), "x", BLOCK=16)
    assert kernel.calls == [((3,), ("x",), {"PDL": False, "BLOCK": 16})]


def test_a_compiled_kernel_on_a_hopper_gpu_is_launched_dependent(monkeypatch):
    monkeypatch.setattr(_launch, "is_interpreted", lambda kernel: False)
    monkeypatch.setattr(_launch, "_has_dependent_launch", lambda index: True)
    monkeypatch.delenv(_launch.DEPENDENT_LAUNCH_ENV, raising=False)
    kernel = _RecordingKernel()
    _launch.launch(kernel, (2, 1), torch.device("cuda", 0), "y", num_warps=4)
    assert kernel.calls == [((2, 1), ("y",), {"PDL": True, "num_warps": 4, "launch_pdl": True})]


def test_dependent_launch_only_on_cuda_devices_that_have_it(monkeypatch):
    monkeypatch.delenv(_launch.DEPENDENT_LAUNCH_ENV, raising=False)
    assert not _launch.dependent_launch(torch.device("cpu"))
    monkeypatch.setattr(_launch, "_has_dependent_launch", lambda index: index == 1)
    assert _launch.dependent_launch(torch.device("cuda", 1))
    assert not _launch.dependent_launch(torch.device("cuda", 0))


def test_the_switch_turns_dependent_launch_off(monkeypatch):
    monkeypatch.setattr(_launch, "_has_dependent_launch", lambda index: True)
    monkeypatch.setenv(_launch.DEPENDENT_LAUNCH_ENV, "0")
    assert not _launch.dependent_launch(torch.device("cuda", 0))
