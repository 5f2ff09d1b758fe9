"""Rotary embedding + KV-cache write, fused: a Triton kernel and its torch twin.

For each token t (neox / HF Llama layout: the two halves of a head rotate as a pair):

    q[t, h] = (q1 * cos - q2 * sin, q2 * cos + q1 * sin)      q1, q2 = halves of q[t, h]
    k[t, g] = the same rotation                                 (in place)
    kv_cache[0][slot_mapping[t], g] = k[t, g];  kv_cache[1][slot_mapping[t], g] = v[t, g]

One kernel replaces the rotation's ~10 elementwise kernels and the two cache
index copies. The KV cache is [2, num_blocks, block_size, kv_heads, head_dim];
cache slot p is row p % block_size of block p // block_size. Rounding follows
torch's for half dtypes (each product rounded to the model dtype, then the sum),
so the kernel matches transformers' `q * cos + rotate_half(q) * sin`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from multilora_kernels import _launch


_wait_for_inputs = _launch.jit(_launch.wait_for_inputs)  # decorated with this file's kernels


@_launch.jit
def _rotate(ptr, stride_h, num_heads, c, s, offs, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotates the heads [num_heads, 2 * HALF] at ptr in place; returns their two rotated halves."""
    dtype = ptr.dtype.element_ty
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < num_heads) & (offs[None, :] < HALF)
    first = ptr + heads[:, None].to(tl.int64) * stride_h + offs[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = ((x1 * c[None, :]).to(dtype).to(tl.float32) - (x2 * s[None, :]).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * c[None, :]).to(dtype).to(tl.float32) + (x1 * s[None, :]).to(dtype).to(tl.float32)).to(dtype)
    tl.store(first, o1, mask=mask)
    tl.store(first + HALF, o2, mask=mask)
    return o1, o2


@_launch.jit
def _rotary_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, cache_ptr, slot_mapping_ptr,
    num_heads, num_kv_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
    stride_kv, stride_slot, stride_ch,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    # grid: (token,); one program rotates all heads of its token and writes its K/V cache slot.
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    c = tl.load(cos_ptr + t * stride_ct + offs, mask=d_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_ct + offs, mask=d_mask, other=0.0).to(tl.float32)
    _rotate(q_ptr + t * stride_qt, stride_qh, num_heads, c, s, offs, HALF, BLOCK_HQ)
    k1, k2 = _rotate(k_ptr + t * stride_kt, stride_kh, num_kv_heads, c, s, offs, HALF, BLOCK_HKV)
    heads = tl.arange(0, BLOCK_HKV)
    mask = (heads[:, None] < num_kv_heads) & d_mask[None, :]
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    dst = cache_ptr + slot * stride_slot + heads[:, None].to(tl.int64) * stride_ch + offs[None, :]
    tl.store(dst, k1, mask=mask)
    tl.store(dst + HALF, k2, mask=mask)
    src = v_ptr + t * stride_vt + heads[:, None].to(tl.int64) * stride_vh + offs[None, :]
    tl.store(dst + stride_kv, tl.load(src, mask=mask, other=0.0), mask=mask)
    tl.store(dst + stride_kv + HALF, tl.load(src + HALF, mask=mask, other=0.0), mask=mask)


def _check(q, k, v, cos, sin, kv_cache, slot_mapping) -> None:
    num_tokens, _, head_dim = q.shape
    assert q.dim() == k.dim() == v.dim() == 3 and k.shape == v.shape, (
        f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must be [T, heads, head_dim]")
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0, (
        f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree")
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1, "head_dim must be contiguous"
    assert cos.shape == sin.shape == (num_tokens, head_dim // 2) and cos.stride() == sin.stride(), (
        f"cos/sin must be [T, head_dim / 2], got {tuple(cos.shape)}, {tuple(sin.shape)}")
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2 and kv_cache.shape[3:] == k.shape[1:], (
        f"kv_cache {tuple(kv_cache.shape)} does not fit k {tuple(k.shape)}")
    assert kv_cache.stride(1) == kv_cache.shape[2] * kv_cache.stride(2) and kv_cache.stride(4) == 1, (
        "kv_cache blocks must be contiguous")
    assert slot_mapping.shape == (num_tokens,), f"slot_mapping {tuple(slot_mapping.shape)} for {num_tokens} tokens"


def rotary_kv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """In place: rotates q [T, H, D] and k [T, KVH, D], writes k and v into kv_cache at slot_mapping.

    q, k, v may be views into a fused qkv output (any token/head strides, head_dim
    contiguous); cos, sin: [T, D / 2] (the halves' shared angles, model dtype);
    kv_cache: [2, num_blocks, block_size, KVH, D]; slot_mapping: [T] int cache slots.
    One Triton launch on CUDA tensors (or with MULTILORA_TRITON_INTERPRET_KERNELS=1),
    else `rotary_kv_write_ref`.
    """
    _check(q, k, v, cos, sin, kv_cache, slot_mapping)
    if not _launch.use_triton(q):
        rotary_kv_write_ref(q, k, v, cos, sin, kv_cache, slot_mapping)
        return
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    half, num_kv_heads = head_dim // 2, k.shape[1]
    block_half = triton.next_power_of_2(half)
    _launch.launch(
        _rotary_kv_kernel, (num_tokens,), q.device,
        q, k, v, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3),
        HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HKV=triton.next_power_of_2(num_kv_heads),
        num_warps=min(8, max(1, triton.next_power_of_2(num_heads) * block_half // 512)),
    )


def rotary_kv_write_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Pure-torch `rotary_kv_write`, in transformers' order of operations."""
    _check(q, k, v, cos, sin, kv_cache, slot_mapping)
    c, s = cos[:, None, :], sin[:, None, :]
    half = q.shape[2] // 2
    for x in (q, k):
        x1, x2 = x[..., :half], x[..., half:]
        x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)
