"""Fused residual add + RMSNorm: a Triton kernel and its torch twin.

    h      = x + residual            (rounded to x.dtype; residual None: h = x)
    normed = weight * (h * rsqrt(mean(h^2) + eps))      (the mean in float32)

Both are returned: `h` is the next residual, `normed` the layer's input. One
kernel replaces the ~8 elementwise kernels of an add followed by an fp32 RMSNorm.
With a `LoRADelta` (x is a LoRA layer's output whose expand is still to add) the
kernel adds each row's delta to x first, as the expand would have.
The order of operations is transformers' LlamaRMSNorm's, so the twin gives
identical float32 results to HF's model.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from multilora_kernels import _launch
from multilora_kernels.lora import lora_delta_of_token
from multilora_kernels.lora_delta import LoRADelta, delta_kernel_args


_wait_for_inputs = _launch.jit(_launch.wait_for_inputs)  # decorated with this file's kernels


@_launch.jit
def _sum(x, axis: tl.constexpr):
    # tl.sum is a @triton.jit helper that an interpreted kernel cannot call: see _launch.jit.
    return tl.reduce(x, axis, tl.standard._sum_combine)


@_launch.jit
def _add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    H, eps, stride_x, stride_r, stride_o, stride_ro,
    buf_ptr, b_ptr, scales_ptr, token_slots_ptr, R,
    stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
    HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_LORA: tl.constexpr, LORA_P: tl.constexpr, LORA_BLOCK_R: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    # grid: (row,); the whole row in one block (H <= 16k).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_LORA:
        adapter_slot = tl.load(token_slots_ptr + row).to(tl.int64)
        if adapter_slot >= 0:
            # 8 rank rows in flight, not 16: a whole row per program is 8 columns a thread (4096 over
            # 16 warps), and 16 rows of those spill on sm_90 at rank 64.
            delta = lora_delta_of_token(buf_ptr, b_ptr, scales_ptr, row, adapter_slot, 0, offs, mask, R,
                                        stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk,
                                        stride_ss, stride_si, LORA_P, LORA_BLOCK_R, ROWS_IN_FLIGHT=8)
            h = (h.to(tl.float32) + delta).to(x_ptr.dtype.element_ty)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + offs, h, mask=mask)
    hf = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(_sum(hf * hf, 0) / H + eps)
    normed = (hf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> None:
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be [T, H] with contiguous rows, got {tuple(x.shape)}"
    assert weight.shape == (x.shape[1],) and weight.dtype == x.dtype, (
        f"weight {weight.dtype} {tuple(weight.shape)} does not fit x {x.dtype} {tuple(x.shape)}")
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(1) == 1, (
            f"residual {residual.dtype} {tuple(residual.shape)} does not fit x {x.dtype} {tuple(x.shape)}")


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float, lora_delta: LoRADelta | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, h) with h = x + residual (h = x when residual is None, the first layer).

    x, residual: [T, H] (rows contiguous); weight: [H], all of one dtype (the model's);
    normed: [T, H], contiguous. `lora_delta` (one slice of H columns): x is taken as x plus it,
    rounded to x's dtype, as `lora_expand` would leave it (and x may be overwritten with that; it is
    when residual is None, as h is x). Otherwise neither input is modified. One Triton launch on CUDA tensors
    (or with MULTILORA_TRITON_INTERPRET_KERNELS=1), else `fused_add_rms_norm_ref`.
    """
    _check(x, residual, weight)
    if lora_delta is not None and (residual is None or not _launch.use_triton(x)):
        lora_delta.apply(x)     # h is x itself without a residual; the twin adds it first
        lora_delta = None
    if not _launch.use_triton(x):
        return fused_add_rms_norm_ref(x, residual, weight, eps)
    num_tokens, hidden = x.shape
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = x if residual is None else torch.empty_like(x)
    if num_tokens:
        block_h = triton.next_power_of_2(hidden)
        assert lora_delta is None or lora_delta.slices == (hidden,), (lora_delta.slices, hidden)
        lora_args, lora_meta = delta_kernel_args(lora_delta, x)
        _launch.launch(
            _add_rms_norm_kernel, (num_tokens,), x.device,
            x, x if residual is None else residual, weight, out, h,
            hidden, eps, x.stride(0), (x if residual is None else residual).stride(0), out.stride(0), h.stride(0),
            *lora_args, HAS_RESIDUAL=residual is not None, BLOCK_H=block_h,
            num_warps=min(16, max(1, block_h // 256)), **lora_meta,
        )
    return out, h


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch `fused_add_rms_norm`, in transformers' order of operations (residual add in x.dtype)."""
    _check(x, residual, weight)
    h = x if residual is None else x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), h
