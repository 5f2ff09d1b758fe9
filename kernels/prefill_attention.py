"""Chunked-prefill attention: a Triton kernel over the paged KV cache, and its torch twin.

The KV cache layout is that of `multilora_kernels.attention` ([2, NB, BS, KVH, Dh], position p
of a sequence in block `block_table[p // BS]`, row `p % BS`). A prefill step holds the new
tokens of N sequences; query i of sequence n sits at position context_lens[n] - query_len + i
and attends causally to keys 0 .. that position, the cached ones included:

    out[t, h] = softmax(scale * q[t, h] @ K[n, :p+1, h // G].T) @ V[n, :p+1, h // G],  G = H // KVH

One program takes a tile of query tokens of one sequence times the G query heads of one KV
head, so each KV tile is read once per group, with an online softmax in fp32. The grid
depends only on (T, N, KVH), never on tensor values: no host sync.

As in attention.py, MULTILORA_TRITON_INTERPRET_KERNELS=1 (or TRITON_INTERPRET=1) set before
this module is imported runs the kernel on CPU tensors too (tests)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from multilora_kernels import _launch
from multilora_kernels.attention import (
    _LOG2E,
    _NUM_STAGES,
    _NUM_WARPS,
    _check_inputs,
)

# Query rows (tokens x heads of a KV group) per program, and context tokens per iteration.
_PREFILL_ROWS = 64
_PREFILL_BLOCK_N = 64


_wait_for_inputs = _launch.jit(_launch.wait_for_inputs)  # decorated with this file's kernels


# Our own reductions, not attention.py's: a @triton.jit helper is interpreted or compiled as
# the module that decorates it was imported, and an interpreted kernel can call only
# interpreted helpers (see `_launch.jit`).
@_launch.jit
def _max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@_launch.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


# ----------------------------------------------------------------------------- Triton kernel


@_launch.jit
def _prefill_kernel(
    q_ptr, kv_ptr, block_tables_ptr, context_lens_ptr, query_start_ptr, out_ptr, tile_seqs_ptr, tile_firsts_ptr,
    scale_log2, capacity,
    stride_qt, stride_qh, stride_kv, stride_nb, stride_bs, stride_kh, stride_btn, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    # grid: (query tile, kv head). A tile is BLOCK_Q query tokens of one sequence times the
    # GROUP query heads of one KV head: row r is token r // GROUP, head r % GROUP.
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = tl.load(tile_seqs_ptr + tile)
    if seq < 0:
        return
    first = tl.load(tile_firsts_ptr + tile)  # index of the tile's first query within its sequence
    q_begin = tl.load(query_start_ptr + seq).to(tl.int32)
    query_len = tl.load(query_start_ptr + seq + 1).to(tl.int32) - q_begin
    context_len = tl.load(context_lens_ptr + seq).to(tl.int32)
    context_len = tl.maximum(tl.minimum(context_len, capacity), 0)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    query = first + offs_m // GROUP
    row_mask = (offs_m < BLOCK_Q * GROUP) & (query < query_len)
    heads = kv_head * GROUP + offs_m % GROUP
    tokens = (q_begin + query).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    # Query i of the sequence sits at position context_len - query_len + i (causal).
    positions = context_len - query_len + query
    last = tl.minimum(context_len - query_len + tl.minimum(first + BLOCK_Q, query_len), context_len)

    table = block_tables_ptr + seq.to(tl.int64) * stride_btn
    kv_head_ptr = kv_ptr + kv_head.to(tl.int64) * stride_kh
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)  # not tl.zeros: see _launch.jit
    for tile_start in tl.range(0, last, BLOCK_N, num_stages=NUM_STAGES):
        keys = tile_start + tl.arange(0, BLOCK_N)
        k_mask = keys < last
        blocks = tl.load(table + keys // BLOCK_SIZE, mask=k_mask, other=0).to(tl.int64)
        rows = kv_head_ptr + blocks * stride_nb + (keys % BLOCK_SIZE) * stride_bs
        kv_mask = k_mask[:, None] & d_mask[None, :]
        k = tl.load(rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(rows[:, None] + stride_kv + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        scores = tl.where(k_mask[None, :] & (keys[None, :] <= positions[:, None]), scores, float("-inf"))
        m_new = tl.maximum(m_i, _max(scores, 1))
        # A row can see no key yet (a padding row, or context_len < query_len): keep it at 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + _sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])



# ----------------------------------------------------------------------------- launcher


def _prefill_tiles(query_start: torch.Tensor, num_tokens: int, block_q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_seqs, tile_firsts) [G]: sequence and first query index of each query tile, -1 = unused.

    Torch ops only, no host sync; G = ceil(T / block_q) + N bounds the tiles of any split of T
    tokens over N sequences, so the grid depends only on (T, N).
    """
    num_seqs = query_start.shape[0] - 1
    query_lens = (query_start[1:] - query_start[:-1]).long()
    tiles = (query_lens + block_q - 1) // block_q
    ends = torch.cumsum(tiles, 0)
    ids = torch.arange(triton.cdiv(num_tokens, block_q) + num_seqs, device=query_start.device)
    seqs = torch.searchsorted(ends, ids, right=True)
    used = seqs < num_seqs
    seqs = seqs.clamp(max=num_seqs - 1)
    firsts = (ids - (ends[seqs] - tiles[seqs])) * block_q
    return torch.where(used, seqs, -1).to(torch.int32), torch.where(used, firsts, 0).to(torch.int32)


def _prefill_triton(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, query_start: torch.Tensor,
                    context_lens: torch.Tensor, scale: float, out: torch.Tensor, *, block_n: int = _PREFILL_BLOCK_N,
                    num_warps: int = _NUM_WARPS, num_stages: int = _NUM_STAGES) -> None:
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = block_tables.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return
    group = num_heads // num_kv_heads
    block_q = max(1, _PREFILL_ROWS // group)
    tile_seqs, tile_firsts = _prefill_tiles(query_start, num_tokens, block_q)
    _launch.launch(
        _prefill_kernel, (tile_seqs.shape[0], num_kv_heads), q.device,
        q, kv_cache, block_tables, context_lens, query_start, out, tile_seqs, tile_firsts,
        scale * _LOG2E, block_tables.shape[1] * block_size,
        q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, BLOCK_Q=block_q,
        BLOCK_M=max(16, triton.next_power_of_2(block_q * group)), BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_N=block_n, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", NUM_STAGES=num_stages,
        num_warps=num_warps,
    )


def _check_prefill(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor, query_start: torch.Tensor,
                   context_lens: torch.Tensor, out: torch.Tensor | None) -> None:
    _check_inputs(q, kv_cache, block_tables, out, query_start=query_start, context_lens=context_lens)
    num_seqs = block_tables.shape[0]
    assert query_start.shape == (num_seqs + 1,) and context_lens.shape == (num_seqs,), (
        f"query_start {tuple(query_start.shape)}, context_lens {tuple(context_lens.shape)}: "
        f"[N + 1] and [N] for N = {num_seqs} block-table rows")


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            query_start: torch.Tensor, context_lens: torch.Tensor, scale: float,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention of (chunked) prefill queries over the paged KV cache.

    q: [T, H, Dh], the new tokens of N sequences, sequence n's at rows
        query_start[n] .. query_start[n + 1] - 1 (query_start: [N + 1] int32/int64, from 0 to T).
    kv_cache: [2, NB, BS, KVH, Dh], already holding the new tokens' K/V; same dtype as q.
    block_tables: [N, W] int32/int64; context_lens: [N] int32/int64, tokens in the cache
        per sequence after this step (>= its query count). Query i of sequence n sits at
        position context_lens[n] - query_len + i and attends keys 0 .. that position.
    out: optional [T, H, Dh] of q.dtype. Returns out.

    Runs the Triton kernel on CUDA tensors (or with MULTILORA_TRITON_INTERPRET_KERNELS=1),
    else `paged_prefill_attention_ref`. No host sync; the grid depends on (T, N, KVH).
    """
    _check_prefill(q, kv_cache, block_tables, query_start, context_lens, out)
    if not _launch.use_triton(q):
        return paged_prefill_attention_ref(q, kv_cache, block_tables, query_start, context_lens, scale, out)
    out = torch.empty_like(q) if out is None else out
    _prefill_triton(q, kv_cache, block_tables, query_start, context_lens, scale, out)
    return out


# ----------------------------------------------------------------------------- torch twin


def paged_prefill_attention_ref(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                                query_start: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-torch `paged_prefill_attention`: per sequence, gather its context, causal fp32 softmax.

    Loops over sequences on the host: a reference, not for CUDA graphs.
    """
    _check_prefill(q, kv_cache, block_tables, query_start, context_lens, out)
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    out = torch.empty_like(q) if out is None else out
    starts = query_start.tolist()
    for n, context_len in enumerate(context_lens.clamp(0, block_tables.shape[1] * block_size).tolist()):
        begin, end = starts[n], starts[n + 1]
        if begin == end:
            continue
        blocks = block_tables[n, :(context_len + block_size - 1) // block_size].long()
        k = kv_cache[0, blocks].flatten(0, 1)[:context_len].float()  # [C, KVH, Dh]
        v = kv_cache[1, blocks].flatten(0, 1)[:context_len].float()
        query = q[begin:end].float().unflatten(1, (num_kv_heads, group))  # [Q, KVH, G, Dh]
        scores = torch.einsum("qkgh,ckh->qkgc", query, k) * scale
        positions = torch.arange(context_len - (end - begin), context_len, device=q.device)
        visible = torch.arange(context_len, device=q.device)[None, :] <= positions[:, None]  # [Q, C]
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        probs = torch.where(visible.any(1)[:, None, None, None], torch.softmax(scores, -1), 0.0)
        out[begin:end] = torch.einsum("qkgc,ckh->qkgh", probs, v).flatten(1, 2).to(q.dtype)
    return out
