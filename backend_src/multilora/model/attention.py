"""Attention over the paged KV cache, and the per-step metadata it needs.

The KV cache of a layer is [2, num_blocks, block_size, num_kv_heads, head_dim];
token slot `block_table[p // block_size] * block_size + p % block_size` holds
position p of a sequence. This pure-torch version runs everywhere; a fused GPU
kernel can replace `paged_attention` behind the same signature.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [T] int64: where each new token's K/V is written
    query_lens: list[int]               # new tokens per sequence (tokens are grouped by sequence)
    context_lens: list[int]             # tokens in the cache per sequence after this step
    block_tables: list[torch.Tensor]    # per sequence, int64 block ids covering its context


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    flat[0].index_copy_(0, slot_mapping, k)
    flat[1].index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, num_heads, head_dim] -> [T, num_heads, head_dim]; causal within each sequence."""
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], kv_cache.shape[3]
    start = 0
    for query_len, context_len, block_table in zip(meta.query_lens, meta.context_lens, meta.block_tables):
        k = kv_cache[0, block_table].flatten(0, 1)[:context_len]     # [C, kv_heads, head_dim]
        v = kv_cache[1, block_table].flatten(0, 1)[:context_len]
        if num_heads != num_kv_heads:
            k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)
            v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        query = q[start:start + query_len].transpose(0, 1)          # [H, Q, D]
        # Query i sits at position context_len - query_len + i and sees keys up to it.
        positions = torch.arange(context_len - query_len, context_len, device=q.device)
        mask = torch.arange(context_len, device=q.device)[None, :] <= positions[:, None]
        attended = F.scaled_dot_product_attention(query, k.transpose(0, 1), v.transpose(0, 1),
                                                  attn_mask=mask, scale=scale)
        out[start:start + query_len] = attended.transpose(0, 1)
        start += query_len
    return out
