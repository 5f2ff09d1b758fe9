"""Launch plumbing shared by the kernel files: the interpret switch, Triton-or-twin dispatch, the launch itself.

Every kernel file decorates its kernels with `jit`, asks `use_triton(t)` whether a
call goes to the Triton kernel or to its pure-torch `*_ref` twin, and starts
kernels through `launch`, the one place that sees every Triton launch (the
kernel-count budget test observes it).

On Hopper and later GPUs every kernel is a programmatic dependent launch: the GPU
starts launching it while the kernel before it on the stream still runs, and the
kernel's first statement, `wait_for_inputs(PDL)`, waits until that kernel is done.
A decode step is hundreds of short kernels, so each saves its launch gap (CUDA
graphs keep these dependencies). Measured on an H200 (bench/RESULTS.md,
2026-12-03): a tiny kernel after a GEMM in a graph 1.48 -> 0.75 us; the engine's
decode step of 64 rows 6.38 -> 6.32 ms, over 32 adapters 8.68 -> 8.53 ms.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# "1" = run the Triton kernels on CPU tensors too (tests). Set it, or TRITON_INTERPRET=1,
# before a kernel file is imported: Triton picks compiled or interpreted at decoration.
INTERPRET_ENV = "MULTILORA_TRITON_INTERPRET_KERNELS"
# "0" = launch every kernel only once the previous one has finished (for A/B runs and to rule it out).
DEPENDENT_LAUNCH_ENV = "MULTILORA_DEPENDENT_LAUNCH"


def jit(fn):
    """`triton.jit`, but interpreted when MULTILORA_TRITON_INTERPRET_KERNELS=1 at decoration.

    Kernels decorated this way call only Triton builtins (no @triton.jit helpers of
    triton.language such as tl.zeros), so they interpret correctly even when triton
    was imported compiled, and TRITON_INTERPRET need not be set for the whole process.
    """
    if os.environ.get(INTERPRET_ENV) != "1":
        return triton.jit(fn)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        return triton.jit(fn)


def wait_for_inputs(PDL: tl.constexpr):
    """The first statement of every kernel, before any load and any early return. Each kernel file
    decorates it with `jit` itself (a kernel interpreted in tests calls only helpers decorated with
    it, see `jit`), as `_wait_for_inputs = _launch.jit(_launch.wait_for_inputs)`. Launched dependent
    (`PDL`), the kernel may be running before the previous kernel on its stream has finished: this lets
    the next kernel start launching, then waits for the previous one to finish and its writes to be
    visible. Since every kernel waits before it exits, each finished kernel implies all earlier ones."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


def use_triton(t: torch.Tensor) -> bool:
    """True: run the Triton kernel (CUDA tensors, or the interpreter switch on); False: the torch twin."""
    return t.is_cuda or os.environ.get(INTERPRET_ENV) == "1"


def is_interpreted(kernel) -> bool:
    return not isinstance(kernel, triton.runtime.JITFunction)


def launch(kernel, grid: tuple[int, ...], device: torch.device, *args, **meta) -> None:
    """`kernel[grid](*args, **meta)`, after checking that it can run on `device`."""
    if device.type != "cuda" and not is_interpreted(kernel):
        # A compiled (not interpreted) kernel cannot run on CPU tensors: say how to fix it.
        raise RuntimeError(
            f"Triton kernels on CPU tensors need {INTERPRET_ENV}=1 (or TRITON_INTERPRET=1) "
            f"set before {kernel.fn.__module__} is imported"
        )
    dependent = not is_interpreted(kernel) and dependent_launch(device)
    if dependent:
        meta["launch_pdl"] = True
    kernel[grid](*args, PDL=dependent, **meta)


def dependent_launch(device: torch.device) -> bool:
    """Whether kernels on `device` launch dependent (see the module docstring): CUDA devices of compute
    capability 9 (Hopper) or later, unless MULTILORA_DEPENDENT_LAUNCH=0."""
    if device.type != "cuda" or os.environ.get(DEPENDENT_LAUNCH_ENV) == "0":
        return False
    return _has_dependent_launch(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _has_dependent_launch(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: tf32 would cost fp32 models ~3 digits; half inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"
