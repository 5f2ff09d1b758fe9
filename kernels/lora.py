"""Multi-LoRA shrink/expand Triton kernels (SGMV style), their torch twins, and `LoRAMeta`.

A LoRA layer on a batch whose tokens use different adapters is two grouped GEMMs:

    buf[t] = x[t] @ A[s].T                    shrink  [T, H_in] -> [T, R]   (fp32)
    y[t]  += scale[s] * (buf[t] @ B[s].T)     expand  [T, R]    -> [T, H_out]

with s = the GPU adapter slot of token t (-1 = base model: buf row 0, y row untouched).
`build_lora_meta` sorts the tokens by slot once per step and cuts each slot's run
into tiles of `block_m` tokens, so each kernel program works on tokens of ONE slot
and reads that slot's A/B tile once for the whole tile (Punica's SGMV).
Everything here is built with torch ops only: no host sync, and every tensor's
shape depends only on (T, S), so the model runner can copy a fresh `LoRAMeta`
into static buffers and replay CUDA graphs over it.

Adapters of rank < R are zero-padded in A and B, so mixed ranks just work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# "1" = run the Triton kernels on CPU tensors too (tests). Set it, or TRITON_INTERPRET=1,
# before this module is imported: Triton picks compiled or interpreted at decoration.
INTERPRET_ENV = "MULTILORA_TRITON_INTERPRET_KERNELS"

# Shrink splits its reduction over H_in until roughly this many programs are in flight:
# decode batches have only a few tiles, and one program per tile would idle an H200.
_SHRINK_TARGET_PROGRAMS = 512
_SHRINK_BLOCK_K = 64
_EXPAND_BLOCK_N = 128
_MAX_BLOCK_R = 64


@dataclass(frozen=True)
class LoRAMeta:
    """The step's token -> adapter-slot mapping in kernel form, shared by all LoRA layers.

    Tokens sorted by slot form one contiguous run per slot; each run is cut into
    tiles of `block_m` tokens. Tile g covers sorted positions
    `[tile_starts[g], min(tile_starts[g] + block_m, tile_ends[g]))` of slot
    `tile_slots[g]`; tiles past the real ones have slot -1 and are skipped.
    """

    token_slots: torch.Tensor  # [T] int32, slot of each token, -1 = no adapter
    num_slots: int  # S
    block_m: int  # tokens per tile
    sorted_token_ids: torch.Tensor  # [T] int32, token indices sorted by slot (base tokens first)
    slot_token_counts: torch.Tensor  # [S] int32, tokens per slot
    slot_token_starts: torch.Tensor  # [S] int32, first position of each slot's run in sorted_token_ids
    tile_slots: torch.Tensor  # [G] int32, slot of each tile, -1 = unused tile
    tile_starts: torch.Tensor  # [G] int32, first sorted position of each tile
    tile_ends: torch.Tensor  # [G] int32, end of the tile's slot run (exclusive)

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @property
    def max_tiles(self) -> int:
        """G: an upper bound on the number of tiles, known without a host sync."""
        return self.tile_slots.shape[0]


def _block_m_for(num_tokens: int) -> int:
    # Small tiles waste little on decode batches split across many slots; big tiles
    # read each A/B tile fewer times on prefill batches.
    if num_tokens <= 128:
        return 16
    if num_tokens <= 1024:
        return 32
    return 64


def build_lora_meta(token_slots: torch.Tensor, num_slots: int) -> LoRAMeta:
    """Build the kernel mapping for one step from `token_slots` [T] (int, -1 = base model).

    Torch ops only, no host sync; all output shapes depend only on (T, num_slots).
    """
    assert token_slots.dim() == 1, f"token_slots must be 1-D, got {tuple(token_slots.shape)}"
    assert num_slots >= 1, f"num_slots must be >= 1, got {num_slots}"
    if not token_slots.is_cuda and token_slots.numel():  # checking on GPU would sync
        lo, hi = int(token_slots.min()), int(token_slots.max())
        assert lo >= -1 and hi < num_slots, f"token slots {lo}..{hi} outside -1..{num_slots - 1}"
    device = token_slots.device
    slots = token_slots.to(torch.int32)
    num_tokens = slots.shape[0]
    block_m = _block_m_for(num_tokens)

    # Stable sort keeps tokens of one slot in batch order; base tokens (-1) sort first.
    sorted_ids = torch.sort(slots, stable=True).indices.to(torch.int32)
    # Counts over slot+1 so base tokens land in bucket 0; scatter_add_ avoids bincount's sync.
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, slots.long() + 1, torch.ones(num_tokens, dtype=torch.int64, device=device))
    starts = torch.cumsum(counts, 0) - counts
    slot_counts, slot_starts = counts[1:], starts[1:]

    tiles_per_slot = (slot_counts + block_m - 1) // block_m
    tile_cum = torch.cumsum(tiles_per_slot, 0)
    # sum_s ceil(c_s / block_m) <= ceil(T / block_m) + (slots in use) - 1.
    max_tiles = triton.cdiv(num_tokens, block_m) + min(num_slots, num_tokens)
    tile_ids = torch.arange(max_tiles, dtype=torch.int64, device=device)
    tile_slot = torch.searchsorted(tile_cum, tile_ids, right=True)
    used = tile_slot < num_slots
    slot_c = tile_slot.clamp(max=num_slots - 1)
    first_tile = tile_cum[slot_c] - tiles_per_slot[slot_c]
    tile_start = slot_starts[slot_c] + (tile_ids - first_tile) * block_m
    tile_end = slot_starts[slot_c] + slot_counts[slot_c]
    return LoRAMeta(
        token_slots=slots,
        num_slots=num_slots,
        block_m=block_m,
        sorted_token_ids=sorted_ids,
        slot_token_counts=slot_counts.to(torch.int32),
        slot_token_starts=slot_starts.to(torch.int32),
        tile_slots=torch.where(used, tile_slot, -1).to(torch.int32),
        tile_starts=torch.where(used, tile_start, 0).to(torch.int32),
        tile_ends=torch.where(used, tile_end, 0).to(torch.int32),
    )


# ----------------------------------------------------------------------------- Triton kernels


def _jit(fn):
    """`triton.jit`, but interpreted when MULTILORA_TRITON_INTERPRET_KERNELS=1 at import.

    The kernels call only Triton builtins (no @triton.jit helpers of triton.language
    such as tl.zeros), so they interpret correctly even when triton was imported
    compiled, and TRITON_INTERPRET need not be set for the whole process.
    """
    if os.environ.get(INTERPRET_ENV) != "1":
        return triton.jit(fn)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = True
        return triton.jit(fn)


@_jit
def _tile_rows(sorted_ids_ptr, tile_starts_ptr, tile_ends_ptr, tile, BLOCK_M: tl.constexpr):
    """Token indices (int64) of one tile's rows and the mask of rows that exist."""
    start = tl.load(tile_starts_ptr + tile)
    end = tl.load(tile_ends_ptr + tile)
    offs = start + tl.arange(0, BLOCK_M)
    mask = offs < end
    tokens = tl.load(sorted_ids_ptr + offs, mask=mask, other=0).to(tl.int64)
    return tokens, mask


@_jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr,
    sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
    K, R, K_PER_SPLIT,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ot, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
):
    # grid: (tile, rank block, K split). out must be zero on entry when ATOMIC.
    tile = tl.program_id(0)
    slot = tl.load(tile_slots_ptr + tile).to(tl.int64)
    if slot < 0:
        return
    tokens, m_mask = _tile_rows(sorted_ids_ptr, tile_starts_ptr, tile_ends_ptr, tile, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < R
    k_begin = tl.program_id(2) * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    x_rows = x_ptr + tokens[:, None] * stride_xt
    a_cols = a_ptr + slot * stride_as + offs_n[None, :] * stride_ar
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: see _jit
    for k in range(k_begin, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_cols + offs_k[:, None] * stride_ak, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(x, a, input_precision=PRECISION)
    out = out_ptr + tokens[:, None] * stride_ot + offs_n[None, :] * stride_or
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc, mask=mask)


@_jit
def _lora_expand_kernel(
    buf_ptr, b_ptr, y_ptr, scales_ptr,
    sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
    N, R,
    stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_yt, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # grid: (tile, output-column block)
    tile = tl.program_id(0)
    slot = tl.load(tile_slots_ptr + tile).to(tl.int64)
    if slot < 0:
        return
    tokens, m_mask = _tile_rows(sorted_ids_ptr, tile_starts_ptr, tile_ends_ptr, tile, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    buf_rows = buf_ptr + tokens[:, None] * stride_bt
    b_cols = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: see _jit
    for r in range(0, R, BLOCK_R):
        offs_r = r + tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        h = tl.load(buf_rows + offs_r[None, :] * stride_br, mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        b = tl.load(b_cols + offs_r[:, None] * stride_bk, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        # Half-precision B: feed the tensor cores in B's dtype (PEFT rounds this
        # intermediate to the model dtype too); fp32 B: keep full fp32.
        acc += tl.dot(h.to(b.dtype), b, input_precision=PRECISION)
    acc = acc * tl.load(scales_ptr + slot)
    y = y_ptr + tokens[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    old = tl.load(y, mask=mask, other=0.0).to(tl.float32)
    tl.store(y, (old + acc).to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get(INTERPRET_ENV) == "1"


def _precision(dtype: torch.dtype) -> str:
    # tf32 would cost fp32 models ~3 digits; half inputs ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2_block(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


def _check_kernel_runnable(t: torch.Tensor) -> None:
    # A compiled (not interpreted) kernel cannot run on CPU tensors: say how to fix it.
    interpreted = not isinstance(_lora_shrink_kernel, triton.runtime.JITFunction)
    if not t.is_cuda and not interpreted:
        raise RuntimeError(
            f"Triton kernels on CPU tensors need {INTERPRET_ENV}=1 (or TRITON_INTERPRET=1) "
            "set before multilora_kernels.lora is imported"
        )


def _shrink_split_k(max_tiles: int, k: int) -> int:
    k_blocks = triton.cdiv(k, _SHRINK_BLOCK_K)
    # Keep >= 2 K blocks per split so the atomics stay a small share of the traffic.
    return max(1, min(triton.cdiv(_SHRINK_TARGET_PROGRAMS, max_tiles), k_blocks // 2))


def _shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta, split_k: int | None = None) -> torch.Tensor:
    num_tokens, k = x.shape
    rank = lora_a.shape[1]
    out = torch.zeros(num_tokens, rank, dtype=torch.float32, device=x.device)
    if num_tokens == 0 or rank == 0:
        return out
    _check_kernel_runnable(x)
    split_k = split_k or _shrink_split_k(meta.max_tiles, k)
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), _SHRINK_BLOCK_K) * _SHRINK_BLOCK_K
    split_k = triton.cdiv(k, k_per_split)
    block_n = _pow2_block(rank, _MAX_BLOCK_R)
    grid = (meta.max_tiles, triton.cdiv(rank, block_n), split_k)
    _lora_shrink_kernel[grid](
        x, lora_a, out,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        k, rank, k_per_split,
        x.stride(0), x.stride(1), *lora_a.stride(), out.stride(0), out.stride(1),
        BLOCK_M=meta.block_m, BLOCK_N=block_n, BLOCK_K=_SHRINK_BLOCK_K,
        ATOMIC=split_k > 1, PRECISION=_precision(x.dtype),
    )
    return out


def _expand_triton(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                   meta: LoRAMeta) -> None:
    num_tokens, n = y.shape
    rank = lora_b.shape[2]
    if num_tokens == 0 or rank == 0 or n == 0:
        return
    _check_kernel_runnable(y)
    block_n = _EXPAND_BLOCK_N if num_tokens > 128 else _EXPAND_BLOCK_N // 2
    grid = (meta.max_tiles, triton.cdiv(n, block_n))
    _lora_expand_kernel[grid](
        buf, lora_b, y, scales,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        n, rank,
        buf.stride(0), buf.stride(1), *lora_b.stride(), y.stride(0), y.stride(1),
        BLOCK_M=meta.block_m, BLOCK_N=block_n, BLOCK_R=_pow2_block(rank, _MAX_BLOCK_R),
        PRECISION=_precision(lora_b.dtype),
    )


def _check_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta) -> None:
    assert x.dim() == 2 and lora_a.dim() == 3, f"x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}"
    assert x.shape[0] == meta.num_tokens, f"x has {x.shape[0]} tokens, meta {meta.num_tokens}"
    assert lora_a.shape[0] == meta.num_slots and lora_a.shape[2] == x.shape[1], (
        f"lora_a {tuple(lora_a.shape)} does not fit x {tuple(x.shape)} and {meta.num_slots} slots")
    assert x.dtype == lora_a.dtype, f"x is {x.dtype}, lora_a is {lora_a.dtype}"


def _check_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                  meta: LoRAMeta) -> None:
    assert y.dim() == 2 and buf.dim() == 2 and lora_b.dim() == 3, (
        f"y {tuple(y.shape)}, buf {tuple(buf.shape)}, lora_b {tuple(lora_b.shape)}")
    assert y.shape[0] == buf.shape[0] == meta.num_tokens, (
        f"y has {y.shape[0]} tokens, buf {buf.shape[0]}, meta {meta.num_tokens}")
    assert lora_b.shape == (meta.num_slots, y.shape[1], buf.shape[1]), (
        f"lora_b {tuple(lora_b.shape)} != ({meta.num_slots}, {y.shape[1]}, {buf.shape[1]})")
    assert buf.dtype == torch.float32, f"buf must be float32, got {buf.dtype}"
    assert scales.shape == (meta.num_slots,) and scales.dtype == torch.float32, (
        f"scales must be float32 [{meta.num_slots}], got {scales.dtype} {tuple(scales.shape)}")


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
    """buf[t] = x[t] @ lora_a[s].T with s = meta.token_slots[t]; rows with s = -1 are 0.

    x: [T, H_in]; lora_a: [S, R, H_in], same dtype as x. Returns buf [T, R] float32.
    Runs the Triton kernel on CUDA tensors (or with MULTILORA_TRITON_INTERPRET_KERNELS=1),
    else `lora_shrink_ref`.
    """
    _check_shrink(x, lora_a, meta)
    if _use_triton(x):
        return _shrink_triton(x, lora_a, meta)
    return lora_shrink_ref(x, lora_a, meta)


def lora_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                meta: LoRAMeta) -> None:
    """In place: y[t] += scales[s] * (buf[t] @ lora_b[s].T) for tokens with s >= 0.

    y: [T, H_out], any strides (e.g. a column slice of a fused qkv output), left
    untouched where s = -1; buf: [T, R] float32 (any strides); lora_b: [S, H_out, R];
    scales: [S] float32. Accumulates in fp32 and stores in y.dtype.
    Runs the Triton kernel on CUDA tensors (or with MULTILORA_TRITON_INTERPRET_KERNELS=1),
    else `lora_expand_ref`.
    """
    _check_expand(y, buf, lora_b, scales, meta)
    if _use_triton(y):
        _expand_triton(y, buf, lora_b, scales, meta)
    else:
        lora_expand_ref(y, buf, lora_b, scales, meta)


# ----------------------------------------------------------------------------- torch twins


def _used_slots(meta: LoRAMeta) -> list[int]:
    return [s for s in meta.token_slots.unique().tolist() if s >= 0]


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
    """Pure-torch `lora_shrink`: per used slot, x[rows] @ A[s].T in float32 (PEFT's order)."""
    _check_shrink(x, lora_a, meta)
    out = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)
    for slot in _used_slots(meta):
        rows = (meta.token_slots == slot).nonzero().squeeze(1)
        out[rows] = x[rows].float() @ lora_a[slot].float().T
    return out


def lora_expand_ref(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                    meta: LoRAMeta) -> None:
    """Pure-torch `lora_expand`: per used slot, y[rows] += (buf[rows] @ B[s].T) * scale[s]."""
    _check_expand(y, buf, lora_b, scales, meta)
    for slot in _used_slots(meta):
        rows = (meta.token_slots == slot).nonzero().squeeze(1)
        delta = (buf[rows] @ lora_b[slot].float().T) * scales[slot]
        y[rows] = (y[rows].float() + delta).to(y.dtype)
