"""SiLU-and-mul of a fused gate/up output: a Triton kernel and its torch twin.

    out[t] = silu(x[t, :I]) * x[t, I:]      x: [T, 2I] (gate columns, then up columns)

One kernel instead of a SiLU and a multiply (and no [T, I] intermediate in HBM).
Rounding follows torch's for half dtypes: SiLU rounded to x.dtype, then the product.
With a `LoRADelta` (x is a gate/up LoRA layer's output whose expand is still to add)
the kernel adds each row's delta to gate and up first, as the expand would have.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from multilora_kernels import _launch
from multilora_kernels.lora import lora_delta_of_token
from multilora_kernels.lora_delta import LoRADelta, delta_kernel_args

_BLOCK = 1024


_wait_for_inputs = _launch.jit(_launch.wait_for_inputs)  # decorated with this file's kernels


@_launch.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, I, stride_x, stride_o,
    buf_ptr, b_ptr, scales_ptr, token_slots_ptr, R,
    stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
    BLOCK: tl.constexpr, HAS_LORA: tl.constexpr, LORA_P: tl.constexpr, LORA_BLOCK_R: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    # grid: (row, column block)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        adapter_slot = tl.load(token_slots_ptr + row).to(tl.int64)
        if adapter_slot >= 0:   # gate is slice 0 (columns 0..I), up slice 1 (I..2I)
            for part in tl.static_range(2):
                delta = lora_delta_of_token(buf_ptr, b_ptr, scales_ptr, row, adapter_slot, part, part * I + offs, mask, R,
                                            stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk,
                                            stride_ss, stride_si, LORA_P, LORA_BLOCK_R)
                if part == 0:
                    gate = (gate + delta).to(x_ptr.dtype.element_ty).to(tl.float32)
                else:
                    up = (up + delta).to(x_ptr.dtype.element_ty).to(tl.float32)
    # Not tl.sigmoid: a @triton.jit helper that an interpreted kernel cannot call (see _launch.jit).
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor) -> None:
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1, (
        f"x must be [T, 2I] with contiguous rows, got {tuple(x.shape)} strides {x.stride()}")


def silu_and_mul(x: torch.Tensor, lora_delta: LoRADelta | None = None) -> torch.Tensor:
    """x: [T, 2I] -> [T, I] = silu(gate) * up, same dtype. `lora_delta` (slices gate and up, I columns
    each): x is taken as x plus it, rounded to x's dtype, as `lora_expand` would leave it (x may be
    overwritten with that). One Triton launch on CUDA tensors (or with
    MULTILORA_TRITON_INTERPRET_KERNELS=1), else `silu_and_mul_ref`."""
    _check(x)
    if not _launch.use_triton(x):
        if lora_delta is not None:
            lora_delta.apply(x)
        return silu_and_mul_ref(x)
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty(num_tokens, inter, dtype=x.dtype, device=x.device)
    if num_tokens and inter:
        assert lora_delta is None or lora_delta.slices == (inter, inter), (lora_delta.slices, inter)
        lora_args, lora_meta = delta_kernel_args(lora_delta, x)
        _launch.launch(_silu_and_mul_kernel, (num_tokens, triton.cdiv(inter, _BLOCK)), x.device,
                       x, out, inter, x.stride(0), out.stride(0), *lora_args, BLOCK=_BLOCK, num_warps=4,
                       **lora_meta)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Pure-torch `silu_and_mul`: transformers' `act_fn(gate_proj(x)) * up_proj(x)` on the fused output."""
    _check(x)
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
