"""Paged decode attention: a Triton kernel over the paged KV cache, and its torch twin.

The KV cache of a layer is [2, NB, BS, KVH, Dh]; position p of a sequence lives in
block `block_table[p // BS]`, row `p % BS`. A decode step has one query token per
sequence, at position context_len - 1, attending to keys 0 .. context_len - 1:

    out[d, h] = softmax(scale * q[d, h] @ K[d, :, h // G].T) @ V[d, :, h // G],  G = H // KVH

The kernel reads K/V in place through the block table (no gather, no repeat of KV
heads): one program takes the G query heads of one KV head, so each KV tile is read
once per group, with an online softmax in fp32. When D * KVH programs cannot fill
the GPU, each context is cut into `num_splits` tile-aligned pieces (flash-decoding)
and a second small kernel merges them. `num_splits` and so the grid depend only on
shapes (D, KVH, W) and fixed config, never on tensor values: the launch is
CUDA-graph capturable, and a graph replays correctly with other context lengths
(splits past the end of a context exit at once).

Chunked-prefill attention over the same cache is `multilora_kernels.prefill_attention`,
which shares this module's input checks and launch constants."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from multilora_kernels import _launch

_LOG2E = 1.4426950408889634
# Launch config, chosen without a GPU from an offline sm_90 compile (Llama-3-8B shapes, bf16:
# 72 registers, 21.6 KB shared memory, 128-bit loads, the next tile's K and V copied
# asynchronously while this one is computed); `bench/bench_attention.py --sweep` times the
# alternatives on a GPU.
_BLOCK_N = 64  # context tokens per loop iteration (one K and one V tile)
_NUM_WARPS = 4
_NUM_STAGES = 3
# Split contexts until D * KVH * splits reaches this many programs per SM: an SM needs
# ~3 programs with a tile in flight each to cover HBM latency (Little's law).
_TARGET_PROGRAMS_PER_SM = 4
_MAX_SPLITS = 64  # also bounds the reduce kernel's tile
_H200_SMS = 132  # SM count assumed where there is no CUDA device (the interpreter)


_wait_for_inputs = _launch.jit(_launch.wait_for_inputs)  # decorated with this file's kernels


@_launch.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@_launch.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


# ----------------------------------------------------------------------------- Triton kernels


@_launch.jit
def _split_len(context_len, num_splits, BLOCK_N: tl.constexpr):
    """Tokens per split of one context: the context over num_splits, in whole tiles (>= 1 tile)."""
    per_split = (context_len + num_splits - 1) // num_splits
    return tl.maximum((per_split + BLOCK_N - 1) // BLOCK_N, 1) * BLOCK_N


@_launch.jit
def _decode_kernel(
    q_ptr, kv_ptr, block_tables_ptr, context_lens_ptr, out_ptr, part_out_ptr, part_ml_ptr,
    scale_log2, capacity, num_splits,
    stride_qd, stride_qh, stride_kv, stride_nb, stride_bs, stride_kh, stride_btd, stride_od, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr, PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    # grid: (sequence, kv head, split). SPLIT: write this split's normalised output
    # and its (max, sum) to part_out / part_ml for _reduce_kernel; else write out.
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    context_len = tl.maximum(tl.minimum(context_len, capacity), 0)
    if SPLIT:
        split_len = _split_len(context_len, num_splits, BLOCK_N)
        start = split * split_len
        if start >= context_len:
            return
        end = tl.minimum(start + split_len, context_len)
    else:
        start = 0
        end = context_len

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qd + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)

    table = block_tables_ptr + seq.to(tl.int64) * stride_btd
    kv_head_ptr = kv_ptr + kv_head.to(tl.int64) * stride_kh
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_G,), 0.0, tl.float32)
    acc = tl.full((BLOCK_G, BLOCK_D), 0.0, tl.float32)  # not tl.zeros: see _launch.jit
    # num_stages: the next tile's block ids, K and V load asynchronously during this tile.
    for tile in tl.range(start, end, BLOCK_N, num_stages=NUM_STAGES):
        tokens = tile + tl.arange(0, BLOCK_N)
        t_mask = tokens < end
        # Only table entries of real tokens are read: padded entries may hold anything.
        blocks = tl.load(table + tokens // BLOCK_SIZE, mask=t_mask, other=0).to(tl.int64)
        rows = kv_head_ptr + blocks * stride_nb + (tokens % BLOCK_SIZE) * stride_bs
        kv_mask = t_mask[:, None] & d_mask[None, :]
        k = tl.load(rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(rows[:, None] + stride_kv + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N], log2 units
        scores = tl.where(t_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, _max(scores, 1))  # finite: every tile has a real token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + _sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # No keys at all (context_len <= 0, e.g. a padded batch row): output 0, not NaN.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        rows = (seq * (GROUP * tl.num_programs(1)) + heads).to(tl.int64) * num_splits + split
        tl.store(part_out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], out, mask=out_mask)
        tl.store(part_ml_ptr + rows * 2, m_i, mask=g_mask)
        tl.store(part_ml_ptr + rows * 2 + 1, l_i, mask=g_mask)
    else:
        tl.store(out_ptr + seq.to(tl.int64) * stride_od + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)


@_launch.jit
def _reduce_kernel(
    part_out_ptr, part_ml_ptr, context_lens_ptr, out_ptr,
    capacity, num_splits, stride_od, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    # grid: (sequence, query head). Merges the splits _decode_kernel wrote:
    # out = sum_s w_s * out_s / sum_s w_s, w_s = l_s * 2^(m_s - max_s m_s).
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    context_len = tl.maximum(tl.minimum(context_len, capacity), 0)
    split_len = _split_len(context_len, num_splits, BLOCK_N)
    used = (context_len + split_len - 1) // split_len  # splits with keys; the rest never wrote
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < used
    rows = (seq * tl.num_programs(1) + head).to(tl.int64) * num_splits + offs_s
    m = tl.load(part_ml_ptr + rows * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(part_ml_ptr + rows * 2 + 1, mask=s_mask, other=0.0)
    m_all = tl.where(used > 0, _max(m, 0), 0.0)  # finite, so no -inf - -inf below
    w = tl.where(s_mask, l * tl.exp2(m - m_all), 0.0)
    o = tl.load(part_out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    norm = _sum(w, 0)
    out = _sum(o * w[:, None], 0) / tl.where(norm > 0, norm, 1.0)  # no splits used: 0
    tl.store(out_ptr + seq.to(tl.int64) * stride_od + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


# ----------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return _H200_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def _num_splits(num_seqs: int, num_kv_heads: int, capacity: int, block_n: int, num_sms: int) -> int:
    """Splits per context: 1 when D * KVH programs fill the GPU, else enough to fill it.

    Shapes only, so a captured graph keeps its grid for any context lengths; each
    sequence's context is cut into this many tile-aligned pieces in the kernel.
    A lone 4096-token sequence at 8 KV heads: 64 splits of 64 tokens, 512 programs.
    """
    programs = num_seqs * num_kv_heads
    wanted = triton.cdiv(_TARGET_PROGRAMS_PER_SM * num_sms, programs)
    return max(1, min(wanted, _MAX_SPLITS, triton.cdiv(capacity, block_n)))


def _decode_triton(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   context_lens: torch.Tensor, scale: float, out: torch.Tensor, *,
                   num_splits: int | None = None, block_n: int = _BLOCK_N,
                   num_warps: int = _NUM_WARPS, num_stages: int = _NUM_STAGES) -> None:
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    if num_seqs == 0:
        return
    capacity = block_tables.shape[1] * block_size
    if num_splits is None:
        num_splits = _num_splits(num_seqs, num_kv_heads, capacity, block_n, _num_sms(q.device))
    assert 1 <= num_splits <= _MAX_SPLITS, f"num_splits {num_splits} outside 1..{_MAX_SPLITS}"
    group = num_heads // num_kv_heads
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs every dim >= 16
    split = num_splits > 1
    if split:
        part_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(num_seqs, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_out = part_ml = out  # unused
    _launch.launch(
        _decode_kernel, (num_seqs, num_kv_heads, num_splits), q.device,
        q, kv_cache, block_tables, context_lens, out, part_out, part_ml,
        scale * _LOG2E, capacity, num_splits,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=block_n,
        SPLIT=split, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", NUM_STAGES=num_stages,
        num_warps=num_warps,
    )
    if split:
        _launch.launch(
            _reduce_kernel, (num_seqs, num_heads), q.device,
            part_out, part_ml, context_lens, out,
            capacity, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4,
        )


def _check_inputs(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, out: torch.Tensor | None,
                  **index_tensors: torch.Tensor) -> None:
    """What decode and prefill share: q against the cache, dtypes, layouts, out, index dtypes."""
    assert q.dim() == 3 and kv_cache.dim() == 5 and kv_cache.shape[0] == 2, (
        f"q {tuple(q.shape)} must be [T, H, Dh], kv_cache {tuple(kv_cache.shape)} [2, NB, BS, KVH, Dh]")
    num_heads, head_dim, num_kv_heads = q.shape[1], q.shape[2], kv_cache.shape[3]
    assert kv_cache.shape[4] == head_dim and num_heads % num_kv_heads == 0, (
        f"q {tuple(q.shape)} does not fit kv_cache {tuple(kv_cache.shape)}")
    assert q.dtype == kv_cache.dtype, f"q is {q.dtype}, kv_cache is {kv_cache.dtype}"
    assert q.stride(2) == 1 and kv_cache.stride(4) == 1, "q and kv_cache need a contiguous head_dim"
    assert block_tables.dim() == 2 and block_tables.shape[1] >= 1, (
        f"block_tables {tuple(block_tables.shape)} must be [N, W >= 1]")
    for name, t in dict(index_tensors, block_tables=block_tables).items():
        assert t.dtype in (torch.int32, torch.int64), f"{name} must be int32 or int64, got {t.dtype}"
    if out is not None:
        assert out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1, (
            f"out {out.dtype} {tuple(out.shape)} must be {q.dtype} {tuple(q.shape)}, contiguous head_dim")


def _check_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, out: torch.Tensor | None) -> None:
    _check_inputs(q, kv_cache, block_tables, out, context_lens=context_lens)
    num_seqs = q.shape[0]
    assert block_tables.shape[0] == num_seqs and context_lens.shape == (num_seqs,), (
        f"block_tables {tuple(block_tables.shape)}, context_lens {tuple(context_lens.shape)}: "
        f"one row per sequence of q ({num_seqs})")


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention over the paged KV cache: one query token per sequence.

    q: [D, H, Dh], the query of each sequence at position context_lens[d] - 1.
    kv_cache: [2, NB, BS, KVH, Dh] (K then V), same dtype as q, H % KVH == 0;
        query head h reads KV head h // (H // KVH).
    block_tables: [D, W] int32/int64; only the first ceil(context_lens[d] / BS) entries
        of row d are read, so rows may be padded with anything (e.g. 0) up to any W.
    context_lens: [D] int32/int64, keys 0 .. context_lens[d] - 1 are attended
        (clamped to W * BS); a row with context_lens[d] <= 0 gets 0.
    out: optional [D, H, Dh] of q.dtype to write into (any row/head strides).
    Returns out: softmax(scale * q K^T) V per head, computed in fp32.

    Runs the Triton kernel on CUDA tensors (or with MULTILORA_TRITON_INTERPRET_KERNELS=1),
    else `paged_decode_attention_ref`. The Triton path has no host sync and a grid fixed
    by (D, KVH, W): capture it in a CUDA graph with static tensors and replay with
    other context lengths and block tables.
    """
    _check_decode(q, kv_cache, block_tables, context_lens, out)
    if not _launch.use_triton(q):
        return paged_decode_attention_ref(q, kv_cache, block_tables, context_lens, scale, out)
    out = torch.empty_like(q) if out is None else out
    _decode_triton(q, kv_cache, block_tables, context_lens, scale, out)
    return out


# ----------------------------------------------------------------------------- torch twin


def paged_decode_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                               context_lens: torch.Tensor, scale: float,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch `paged_decode_attention`: gather the needed blocks, GQA by reshape, fp32 softmax.

    Reads context_lens on the host (a sync on GPU): a reference, not for CUDA graphs.
    """
    _check_decode(q, kv_cache, block_tables, context_lens, out)
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    lens = context_lens.long().clamp(0, block_tables.shape[1] * block_size)
    width = max(1, (int(lens.max()) + block_size - 1) // block_size)
    blocks = block_tables[:, :width].long()
    # Like the kernel, never use a table entry past a row's context: padding may hold anything.
    needed = torch.arange(width, device=q.device)[None, :] * block_size < lens[:, None]
    blocks = torch.where(needed, blocks, 0)
    valid = torch.arange(width * block_size, device=q.device)[None, :] < lens[:, None]  # [D, C]
    # Slots past a row's context hold whatever a previous request left there, NaN included,
    # and a zero probability times NaN is NaN: zero those keys and values, as the kernel's
    # masked loads do, so no output depends on them.
    unused = ~valid[:, :, None, None]
    k = kv_cache[0, blocks].flatten(1, 2).float().masked_fill(unused, 0.0)  # [D, C, KVH, Dh]
    v = kv_cache[1, blocks].flatten(1, 2).float().masked_fill(unused, 0.0)
    query = q.float().reshape(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("dkgh,dckh->dkgc", query, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where((lens > 0)[:, None, None, None], probs, 0.0)  # no keys: 0, not NaN
    attended = torch.einsum("dkgc,dckh->dkgh", probs, v)
    out.copy_(attended.reshape(num_seqs, num_heads, head_dim))
    return out
