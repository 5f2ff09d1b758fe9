"""Launch plumbing shared by the kernel files: the interpret switch, Triton-or-twin dispatch, the launch itself.

Every kernel file decorates its kernels with `jit`, asks `use_triton(t)` whether a
call goes to the Triton kernel or to its pure-torch `*_ref` twin, and starts
kernels through `launch`, the one place that sees every Triton launch (the
kernel-count budget test observes it).
"""

from __future__ import annotations

import os

import torch
import triton

# "1" = run the Triton kernels on CPU tensors too (tests). Set it, or TRITON_INTERPRET=1,
# before a kernel file is imported: Triton picks compiled or interpreted at decoration.
INTERPRET_ENV = "MULTILORA_TRITON_INTERPRET_KERNELS"


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
    kernel[grid](*args, **meta)


def precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: tf32 would cost fp32 models ~3 digits; half inputs ignore the setting."""
    return "ieee" if dtype == torch.float32 else "tf32"
