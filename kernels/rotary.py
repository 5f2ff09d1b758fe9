"""Rotary embedding + KV-cache write, fused: a Triton kernel and its torch twin.

For each token t (neox / HF Llama layout: the two halves of a head rotate as a pair):

    q[t, h] = (q1 * cos - q2 * sin, q2 * cos + q1 * sin)      q1, q2 = halves of q[t, h]
    k[t, g] = the same rotation                                 (in place)
    kv_cache[0][slot_mapping[t], g] = k[t, g];  kv_cache[1][slot_mapping[t], g] = v[t, g]

One kernel replaces the rotation's ~10 elementwise kernels and the two cache
index copies. With a `LoRADelta` (q/k/v are a LoRA layer's output whose expand is
still to add) the kernel adds each token's delta to q, k and v first, as the
expand would have. The KV cache is [2, num_blocks, block_size, kv_heads, head_dim];
cache slot p is row p % block_size of block p // block_size. Rounding follows
torch's for half dtypes (each product rounded to the model dtype, then the sum),
so the kernel matches transformers' `q * cos + rotate_half(q) * sin`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from multilora_kernels import _launch
from multilora_kernels.lora import LoRADelta, delta_kernel_args, lora_delta_of_token


_wait_for_inputs = _launch.jit(_launch.wait_for_inputs)  # decorated with this file's kernels

# With a LoRA delta each head's B rows are loaded too: one program over all of a token's heads would hold
# 6144 columns of them in flight at Llama-3-8B, so a token's heads are spread over programs of this many
# query heads (and an equal share of the kv heads), 4 warps each: 4 columns a thread.
_LORA_HEADS_PER_PROGRAM = 8
_LORA_WARPS = 4


@_launch.jit
def _plus_delta(x, dtype: tl.constexpr, slot, token, part, cols, mask,
                buf_ptr, b_ptr, scales_ptr, R,
                stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
                HAS_LORA: tl.constexpr, LORA_P: tl.constexpr, LORA_BLOCK_R: tl.constexpr):
    """x (float32, at fused-output columns `cols` of slice `part`) plus the token's LoRA delta there,
    rounded to dtype as the expand would have stored it; x itself for base tokens or without a delta."""
    if HAS_LORA:
        if slot >= 0:
            delta = lora_delta_of_token(buf_ptr, b_ptr, scales_ptr, token, slot, part, cols, mask, R,
                                        stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk,
                                        stride_ss, stride_si, LORA_P, LORA_BLOCK_R)
            x = (x + delta).to(dtype).to(tl.float32)
    return x


@_launch.jit
def _rotate(ptr, stride_h, head0, num_heads, c, s, offs, col0, part, slot, token,
            buf_ptr, b_ptr, scales_ptr, R,
            stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
            HALF: tl.constexpr, BLOCK_H: tl.constexpr,
            HAS_LORA: tl.constexpr, LORA_P: tl.constexpr, LORA_BLOCK_R: tl.constexpr):
    """Rotates heads head0.. (< num_heads, BLOCK_H of them) [.., 2 * HALF] at ptr in place, each first
    plus its LoRA delta (slice `part`, whose head 0 is fused-output column col0); returns their two
    rotated halves."""
    dtype = ptr.dtype.element_ty
    heads = head0 + tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < num_heads) & (offs[None, :] < HALF)
    first = ptr + heads[:, None].to(tl.int64) * stride_h + offs[None, :]
    cols = col0 + heads[:, None] * (2 * HALF) + offs[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    x1 = _plus_delta(x1, dtype, slot, token, part, cols, mask, buf_ptr, b_ptr, scales_ptr, R,
                     stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
                     HAS_LORA, LORA_P, LORA_BLOCK_R)
    x2 = _plus_delta(x2, dtype, slot, token, part, cols + HALF, mask, buf_ptr, b_ptr, scales_ptr, R,
                     stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
                     HAS_LORA, LORA_P, LORA_BLOCK_R)
    o1 = ((x1 * c[None, :]).to(dtype).to(tl.float32) - (x2 * s[None, :]).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * c[None, :]).to(dtype).to(tl.float32) + (x1 * s[None, :]).to(dtype).to(tl.float32)).to(dtype)
    tl.store(first, o1, mask=mask)
    tl.store(first + HALF, o2, mask=mask)
    return o1, o2


@_launch.jit
def _rotary_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, cache_ptr, slot_mapping_ptr,
    num_heads, num_kv_heads, kv_heads_per_program,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ct,
    stride_kv, stride_slot, stride_ch,
    buf_ptr, b_ptr, scales_ptr, token_slots_ptr, R,
    stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
    HAS_LORA: tl.constexpr, LORA_P: tl.constexpr, LORA_BLOCK_R: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    # grid: (token, head group); group g rotates query heads g * BLOCK_HQ.. and kv heads
    # g * kv_heads_per_program.., and writes those kv heads' K/V cache slots. Without a LoRA delta
    # one group holds all heads.
    t = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    d_mask = offs < HALF
    c = tl.load(cos_ptr + t * stride_ct + offs, mask=d_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t * stride_ct + offs, mask=d_mask, other=0.0).to(tl.float32)
    adapter_slot = -1
    if HAS_LORA:
        adapter_slot = tl.load(token_slots_ptr + t).to(tl.int64)
    q_cols, kv_cols = num_heads * 2 * HALF, num_kv_heads * 2 * HALF     # the slices' widths
    kv0 = group * kv_heads_per_program
    kv_end = tl.minimum(kv0 + kv_heads_per_program, num_kv_heads)
    _rotate(q_ptr + t * stride_qt, stride_qh, group * BLOCK_HQ, num_heads, c, s, offs, 0, 0, adapter_slot, t,
            buf_ptr, b_ptr, scales_ptr, R,
            stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
            HALF, BLOCK_HQ, HAS_LORA, LORA_P, LORA_BLOCK_R)
    k1, k2 = _rotate(k_ptr + t * stride_kt, stride_kh, kv0, kv_end, c, s, offs, q_cols, 1, adapter_slot, t,
                     buf_ptr, b_ptr, scales_ptr, R,
                     stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
                     HALF, BLOCK_HKV, HAS_LORA, LORA_P, LORA_BLOCK_R)
    heads = kv0 + tl.arange(0, BLOCK_HKV)
    mask = (heads[:, None] < kv_end) & d_mask[None, :]
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    dst = cache_ptr + slot * stride_slot + heads[:, None].to(tl.int64) * stride_ch + offs[None, :]
    tl.store(dst, k1, mask=mask)
    tl.store(dst + HALF, k2, mask=mask)
    src = v_ptr + t * stride_vt + heads[:, None].to(tl.int64) * stride_vh + offs[None, :]
    v1 = tl.load(src, mask=mask, other=0.0)
    v2 = tl.load(src + HALF, mask=mask, other=0.0)
    if HAS_LORA:
        # v as its expand would have left it: in place too (a prefill-sized step's attention reads it).
        v_col = q_cols + kv_cols + heads[:, None] * (2 * HALF) + offs[None, :]
        v1 = _plus_delta(v1.to(tl.float32), v_ptr.dtype.element_ty, adapter_slot, t, 2, v_col, mask,
                         buf_ptr, b_ptr, scales_ptr, R,
                         stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
                         HAS_LORA, LORA_P, LORA_BLOCK_R).to(v_ptr.dtype.element_ty)
        v2 = _plus_delta(v2.to(tl.float32), v_ptr.dtype.element_ty, adapter_slot, t, 2, v_col + HALF, mask,
                         buf_ptr, b_ptr, scales_ptr, R,
                         stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
                         HAS_LORA, LORA_P, LORA_BLOCK_R).to(v_ptr.dtype.element_ty)
        tl.store(src, v1, mask=mask)
        tl.store(src + HALF, v2, mask=mask)
    tl.store(dst + stride_kv, v1, mask=mask)
    tl.store(dst + stride_kv + HALF, v2, mask=mask)


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
                    kv_cache: torch.Tensor, slot_mapping: torch.Tensor, lora_delta: LoRADelta | None = None) -> None:
    """In place: rotates q [T, H, D] and k [T, KVH, D], writes k and v into kv_cache at slot_mapping.

    q, k, v may be views into a fused qkv output (any token/head strides, head_dim
    contiguous); cos, sin: [T, D / 2] (the halves' shared angles, model dtype);
    kv_cache: [2, num_blocks, block_size, KVH, D]; slot_mapping: [T] int cache slots.
    `lora_delta` (slices q, k, v: H * D, KVH * D, KVH * D columns): q, k and v are taken as
    themselves plus it, rounded to their dtype, as `lora_expand` would leave them, and are
    left so (before the rotation) in place. One Triton launch on CUDA tensors (or with
    MULTILORA_TRITON_INTERPRET_KERNELS=1), else `rotary_kv_write_ref`.
    """
    _check(q, k, v, cos, sin, kv_cache, slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert lora_delta is None or lora_delta.slices == (num_heads * head_dim, num_kv_heads * head_dim,
                                                       num_kv_heads * head_dim), (lora_delta.slices, q.shape, k.shape)
    if not _launch.use_triton(q):
        if lora_delta is not None:
            lora_delta.apply_to_slices(q.flatten(1), k.flatten(1), v.flatten(1))
        rotary_kv_write_ref(q, k, v, cos, sin, kv_cache, slot_mapping)
        return
    if num_tokens == 0:
        return
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    if lora_delta is None:
        groups, block_hq, kv_per_program = 1, triton.next_power_of_2(num_heads), num_kv_heads
        num_warps = min(8, max(1, block_hq * block_half // 512))
    else:
        groups = triton.cdiv(num_heads, _LORA_HEADS_PER_PROGRAM)
        block_hq, kv_per_program = min(_LORA_HEADS_PER_PROGRAM, triton.next_power_of_2(num_heads)), \
            triton.cdiv(num_kv_heads, groups)
        num_warps = _LORA_WARPS
    lora_args, lora_meta = delta_kernel_args(lora_delta, q)
    _launch.launch(
        _rotary_kv_kernel, (num_tokens, groups), q.device,
        q, k, v, cos, sin, kv_cache, slot_mapping, num_heads, num_kv_heads, kv_per_program,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        kv_cache.stride(0), kv_cache.stride(2), kv_cache.stride(3), *lora_args,
        HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=block_hq, BLOCK_HKV=triton.next_power_of_2(kv_per_program),
        num_warps=num_warps, **lora_meta,
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
