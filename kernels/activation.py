"""SiLU-and-mul of a fused gate/up output: a Triton kernel and its torch twin.

    out[t] = silu(x[t, :I]) * x[t, I:]      x: [T, 2I] (gate columns, then up columns)

One kernel instead of a SiLU and a multiply (and no [T, I] intermediate in HBM).
Rounding follows torch's for half dtypes: SiLU rounded to x.dtype, then the product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from multilora_kernels import _launch

_BLOCK = 1024


_wait_for_inputs = _launch.jit(_launch.wait_for_inputs)  # decorated with this file's kernels


@_launch.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    _wait_for_inputs(PDL)
    # grid: (row, column block)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    # Not tl.sigmoid: a @triton.jit helper that an interpreted kernel cannot call (see _launch.jit).
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor) -> None:
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1, (
        f"x must be [T, 2I] with contiguous rows, got {tuple(x.shape)} strides {x.stride()}")


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] -> [T, I] = silu(gate) * up, same dtype. One Triton launch on CUDA tensors
    (or with MULTILORA_TRITON_INTERPRET_KERNELS=1), else `silu_and_mul_ref`."""
    _check(x)
    if not _launch.use_triton(x):
        return silu_and_mul_ref(x)
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    if num_tokens and inter:
        _launch.launch(_silu_and_mul_kernel, (num_tokens, triton.cdiv(inter, _BLOCK)), x.device,
                       x, out, inter, x.stride(0), out.stride(0), BLOCK=_BLOCK, num_warps=4)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Pure-torch `silu_and_mul`: transformers' `act_fn(gate_proj(x)) * up_proj(x)` on the fused output."""
    _check(x)
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
