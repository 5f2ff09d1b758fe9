"""Attention over the paged KV cache, and the per-step metadata it needs.

The KV cache of a layer is [2, num_blocks, block_size, num_kv_heads, head_dim];
token slot `block_table[p // block_size] * block_size + p % block_size` holds
position p of a sequence. Decode tokens go through the paged decode kernel
(Triton on GPUs, its torch twin elsewhere); prefill chunks use torch SDPA, one
call per chunk after cached tokens and one per run of whole prompts of one length.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from multilora_kernels.attention import paged_decode_attention


@dataclass
class AttentionMetadata:
    """Per-step inputs of attention, built once per step by the model runner.

    Sequences come first with several new tokens (prefill chunks), then the
    decode sequences (one new token each), whose attention runs as one batch.
    """

    slot_mapping: torch.Tensor          # [T] int64: where each new token's K/V is written
    query_lens: list[int]               # new tokens per prefill sequence, in token order
    context_lens: list[int]             # tokens in the cache per prefill sequence after this step
    block_tables: list[torch.Tensor]    # per prefill sequence, int64 block ids covering its context
    num_prefill_tokens: int = 0
    decode_block_tables: torch.Tensor | None = None   # [D, max_blocks] int32, padded with any valid block
    decode_context_lens: torch.Tensor | None = None   # [D] int32


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, num_heads, head_dim], k/v: the new tokens' [T, kv_heads, head_dim] (already in the cache)
    -> [T, num_heads, head_dim]; causal within each sequence."""
    out = torch.empty_like(q)
    _prefill_attention(q, k, v, kv_cache, meta, scale, out)
    if meta.decode_block_tables is not None:
        p = meta.num_prefill_tokens
        paged_decode_attention(q[p:], kv_cache, meta.decode_block_tables, meta.decode_context_lens, scale, out=out[p:])
    return out


def _expand_kv_heads(x: torch.Tensor, num_heads: int, dim: int) -> torch.Tensor:
    return x if x.shape[dim] == num_heads else x.repeat_interleave(num_heads // x.shape[dim], dim=dim)


def _prefill_attention(q, k_new, v_new, kv_cache, meta: AttentionMetadata, scale: float, out: torch.Tensor) -> None:
    for rows, count, query_len, context_len, block_table in _prefill_runs(meta):
        if query_len == context_len:
            # Whole prompts: their keys are the new ones, no need to read the cache.
            k, v, causal = k_new[rows], v_new[rows], None
        else:
            k = kv_cache[0, block_table].flatten(0, 1)[:context_len]          # [C, kv_heads, D]
            v = kv_cache[1, block_table].flatten(0, 1)[:context_len]
            # Query i sits at position context_len - query_len + i and sees keys up to it.
            positions = torch.arange(context_len - query_len, context_len, device=q.device)
            causal = torch.arange(context_len, device=q.device)[None, :] <= positions[:, None]
        out[rows] = _attend(q[rows], k, v, causal, scale, count)


def _prefill_runs(meta: AttentionMetadata):
    """(token rows, sequences, query_len, context_len, block_table) per attention call: consecutive whole
    prompts of one length share a call (one batched SDPA launch instead of one per prompt)."""
    start, run = 0, None
    for query_len, context_len, block_table in zip(meta.query_lens, meta.context_lens, meta.block_tables):
        if run is not None and query_len == context_len == run[2] == run[3]:
            run[1] += 1
        else:
            if run is not None:
                yield slice(run[0], start), *run[1:]
            run = [start, 1, query_len, context_len, block_table]
        start += query_len
    if run is not None:
        yield slice(run[0], start), *run[1:]


def _attend(q, k, v, mask, scale, batch: int = 1) -> torch.Tensor:
    """q [batch * Q, H, D], k/v [batch * C, kv_heads, D]: `batch` sequences of Q queries and C keys each;
    mask None = causal with Q == C."""
    # 4-D [batch, H, Q, D] inputs: SDPA's flash and memory-efficient kernels take only those (3-D falls back to math).
    q = q.unflatten(0, (batch, -1)).transpose(1, 2)
    k = k.unflatten(0, (batch, -1)).transpose(1, 2)
    v = v.unflatten(0, (batch, -1)).transpose(1, 2)
    # Whole prompts (causal, no mask): SDPA shares each K/V head among its query heads itself, so the
    # heads are never copied num_heads / kv_heads times (28 ms of a 64 x 512 prefill on the H200). With
    # a mask its GQA support depends on the backend, so those calls keep the explicit copy.
    gqa = mask is None and k.shape[1] != q.shape[1]
    if not gqa:
        k, v = _expand_kv_heads(k, q.shape[1], 1), _expand_kv_heads(v, q.shape[1], 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                         enable_gqa=gqa)
    return out.transpose(1, 2).flatten(0, 1)
