"""Multi-LoRA shrink/expand Triton kernels (SGMV style), their torch twins, and `LoRAMeta`.

A LoRA layer on a batch whose tokens use different adapters is two grouped GEMMs:

    buf[t] = x[t] @ A[s].T                    shrink  [T, H_in] -> [T, R]   (fp32)
    y[t]  += scale[s] * (buf[t] @ B[s].T)     expand  [T, R]    -> [T, H_out]

with s = the GPU adapter slot of token t (-1 = base model: y row untouched).

A fused projection (q/k/v or gate/up as one GEMM) is one LoRA layer of several
output slices: its A is the slices' A stacked ([S, n, R, H_in]), so one shrink
computes every slice's rank-R activations (buf column i*R + j is slice i's rank j),
and one expand adds slice i's `buf[:, i*R:(i+1)*R] @ B_i[s].T * scale[s, i]` into
slice i's columns.
An adapter that targets only some slices leaves the others' A/B zero.

The shrink splits its reduction over H_in for parallelism and writes each split's
partial sums to its own plane of `buf` [P, T, n * R]; the expand adds the planes
as it reads them. So no buffer is ever zero-filled and no atomics are needed:
every element the expand reads was written by the shrink (rows of base-model
tokens are never written nor read).
`build_lora_meta` sorts the tokens by slot once per step and cuts each slot's run
into tiles of `block_m` tokens, so each kernel program works on tokens of ONE slot
and reads that slot's A/B tile once for the whole tile (Punica's SGMV).
When a decode step spreads its tokens over many adapters (a few tokens each), a
tile holds one or two real tokens and the per-tile expand is latency-bound; then
the caller asks for the per-token expand (`per_token_expand`): one program per
(token, column block, slice), each reading its token's slot's B rows directly.
The choice is the caller's (multilora.lora.mapping.lora_variant), made on the
host per step, so a CUDA graph can be captured for each variant.
At decode an expand can also be left to the kernel that reads y next: a
`LoRADelta` (kernels/lora_delta.py) carries it there, and that kernel adds each
token's delta as it reads y (`lora_delta_of_token` here, the per-token expand's
own sum), which saves the expand's launch and y's round trip (kernels/norm.py,
kernels/activation.py).
Everything here is built with torch ops only: no host sync, and every tensor's
shape depends only on (T, S), so the model runner can copy a fresh `LoRAMeta`
into static buffers and replay CUDA graphs over it.

Adapters of rank < R are zero-padded in A and B, so mixed ranks just work.
A/B may be views with any slot stride (all layers' slot weights live in one
buffer per slot, see multilora.lora.adapter_slot_weights); the kernels take strides.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from multilora_kernels import _launch
from multilora_kernels._launch import INTERPRET_ENV  # noqa: F401  (tests and benches read it here)

# Shrink splits its reduction over H_in until roughly this many programs are in flight:
# decode batches have only a few tiles, and one program per tile would idle an H200.
_SHRINK_TARGET_PROGRAMS = 512
# ...but at most this many splits: each is a plane that every expand program reads back. Measured on
# the H200 at decode (64 tokens, rank 16; bench/RESULTS.md): a cap of 8 instead of none (32-38 splits at
# 8 adapters, 13-15 at 32) took the step over base from +1.46 to +1.41 ms at 8 adapters, +3.12 to +3.09
# at 32 (2026-12-02); 12 instead of 8, once the per-token expand read the planes cheaply, +2.44 to +2.31
# ms at 32 adapters and no change at 8 (2026-12-03). Fewer (4, 2) cost the shrink more than they save.
_MAX_SHRINK_SPLITS = 12
# H_in per shrink loop step. Measured on the H200 (bench/RESULTS.md, 2026-12-02): K tiles of up to 512
# for narrow rank tiles (16 KB loads) made the decode shrink slower (0.97 vs 0.91 ms per step at 32
# adapters), so the tile stays 64.
_SHRINK_BLOCK_K = 64
_EXPAND_BLOCK_N = 128
_DECODE_EXPAND_BLOCK_N = 256
# Prefill-sized steps (tiles of 64 tokens, T > 1024) have programs enough without splitting the
# shrink, and each split is a plane that every expand program of a tile reads back: there the
# shrink splits only every 4096 of H_in, and the expand's programs are 64 columns x 4 warps.
# Measured on the H200 (bench/RESULTS.md, 2026-12-03, 2048 tokens over 8 adapters, per layer):
# shrink + expand qkv 62 -> 45 us, o 41 -> 31, gate_up 273 -> 153, down 52 -> 53; in the engine,
# the prefill of 64 x 512 tokens over 8 adapters 968 -> 920 ms (base 772), over 32 969 -> 958.
_PREFILL_BLOCK_M = 64
_PREFILL_K_PER_SPLIT = 4096
_PREFILL_EXPAND_BLOCK_N = 64
# The per-token expand: 512 columns x 4 warps, 96 registers a thread at ranks 16-64 on sm_90, no spills
# (bench/RESULTS.md: the fastest of 128-1024 columns x 2-8 warps at 64 tokens over 32 adapters).
_TOKEN_EXPAND_BLOCK_N = 512
_TOKEN_EXPAND_WARPS = 4
_MAX_BLOCK_R = 64
# The expand adds the planes in a runtime loop: unrolled (all loads in flight at once) it measured slower
# (78 vs 61 us per layer at decode, 32 adapters, same tiles), and so did one [planes, rows, rank] load
# per program (88.7 vs 61.1 us; 2 planes instead of 13 save only 8 us: the plane loop is not the chain
# that binds it). One expand program covers one column
# block: a loop over 16 blocks per program at decode (1024 columns, the planes summed once) made the
# 8-adapter step slower (+3.5 vs +2.3 ms over base), the blocks running one after another.


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
    # The expand runs one program per token (a few tokens per adapter), not per slot tile.
    per_token_expand: bool = False

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


def build_lora_meta(token_slots: torch.Tensor, num_slots: int, per_token_expand: bool = False) -> LoRAMeta:
    """Build the kernel mapping for one step from `token_slots` [T] (int, -1 = base model).

    Torch ops only, no host sync; all output shapes depend only on (T, num_slots).
    `per_token_expand`: the caller knows the tokens are spread over many adapters (a few each), where
    one expand program per token beats one per slot tile (bench/RESULTS.md).
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
        per_token_expand=per_token_expand,
    )


# ----------------------------------------------------------------------------- Triton kernels


_wait_for_inputs = _launch.jit(_launch.wait_for_inputs)  # decorated with this file's kernels


@_launch.jit
def _tile_rows(sorted_ids_ptr, tile_starts_ptr, tile_ends_ptr, tile, BLOCK_M: tl.constexpr):
    """Token indices (int64) of one tile's rows and the mask of rows that exist."""
    start = tl.load(tile_starts_ptr + tile)
    end = tl.load(tile_ends_ptr + tile)
    offs = start + tl.arange(0, BLOCK_M)
    mask = offs < end
    tokens = tl.load(sorted_ids_ptr + offs, mask=mask, other=0).to(tl.int64)
    return tokens, mask


@_launch.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr,
    sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
    K, NR, R, K_PER_SPLIT,
    stride_xt, stride_xk, stride_as, stride_ai, stride_ar, stride_ak, stride_op, stride_ot, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    # grid: (tile, block of the n * R stacked ranks, K split); split p writes its partial sums to out[p].
    tile = tl.program_id(0)
    slot = tl.load(tile_slots_ptr + tile).to(tl.int64)
    if slot < 0:
        return
    tokens, m_mask = _tile_rows(sorted_ids_ptr, tile_starts_ptr, tile_ends_ptr, tile, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < NR
    split = tl.program_id(2)
    k_begin = split * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    x_rows = x_ptr + tokens[:, None] * stride_xt
    # Stacked rank n = slice n // R, rank n % R: A's slices and ranks may have any strides.
    a_cols = a_ptr + slot * stride_as + ((offs_n // R).to(tl.int64) * stride_ai
                                         + (offs_n % R).to(tl.int64) * stride_ar)[None, :]
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: see _launch.jit
    for k in range(k_begin, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        a = tl.load(a_cols + offs_k[:, None] * stride_ak, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc += tl.dot(x, a, input_precision=PRECISION)
    out = out_ptr + split.to(tl.int64) * stride_op + tokens[:, None] * stride_ot + offs_n[None, :] * stride_or
    tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


@_launch.jit
def _lora_expand_kernel(
    buf_ptr, b_ptr, y_ptr, scales_ptr, slice_starts_ptr,
    sorted_ids_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
    R, P,
    stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_yt, stride_yn, stride_ss, stride_si,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    # grid: (tile, column block within a slice, slice); narrower slices' surplus blocks exit.
    # BLOCK_R >= R: the whole rank in one tile.
    tile = tl.program_id(0)
    slot = tl.load(tile_slots_ptr + tile).to(tl.int64)
    if slot < 0:
        return
    part = tl.program_id(2)
    col_end = tl.load(slice_starts_ptr + part + 1)
    col = tl.load(slice_starts_ptr + part) + tl.program_id(1) * BLOCK_N
    if col >= col_end:
        return
    tokens, m_mask = _tile_rows(sorted_ids_ptr, tile_starts_ptr, tile_ends_ptr, tile, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    # The shrink's split-K partial sums.
    buf_rows = buf_ptr + tokens[:, None] * stride_bt + ((part * R).to(tl.int64) + offs_r[None, :]) * stride_br
    h_mask = m_mask[:, None] & r_mask[None, :]
    h = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)  # not tl.zeros: see _launch.jit
    for p in range(0, P):
        h += tl.load(buf_rows + p * stride_bp, mask=h_mask, other=0.0)
    # Half-precision B: feed the tensor cores in B's dtype (PEFT rounds this
    # intermediate to the model dtype too); fp32 B: keep full fp32.
    h = h.to(b_ptr.dtype.element_ty)
    scale = tl.load(scales_ptr + slot * stride_ss + part * stride_si)
    offs_n = col + tl.arange(0, BLOCK_N)
    n_mask = offs_n < col_end
    # int64: in the slot layout B's rank stride spans every layer's rank row.
    b = tl.load(b_ptr + slot * stride_bs + offs_r[:, None].to(tl.int64) * stride_bk + offs_n[None, :] * stride_bn,
                mask=r_mask[:, None] & n_mask[None, :], other=0.0)
    acc = tl.dot(h, b, input_precision=PRECISION) * scale
    y = y_ptr + tokens[:, None] * stride_yt + offs_n[None, :] * stride_yn
    mask = m_mask[:, None] & n_mask[None, :]
    old = tl.load(y, mask=mask, other=0.0).to(tl.float32)
    tl.store(y, (old + acc).to(y_ptr.dtype.element_ty), mask=mask)


@_launch.jit
def lora_delta_of_token(
    buf_ptr, b_ptr, scales_ptr, token, slot, part, cols, col_mask, R,
    stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
    P: tl.constexpr, BLOCK_R: tl.constexpr, ROWS_IN_FLIGHT: tl.constexpr = 16,
):
    """A device function (for this file's per-token expand and for the kernels that add a `LoRADelta` as
    they read a LoRA layer's output): token's expand at output columns `cols` (any shape; `col_mask`
    where they exist) of slice `part`, in float32 of cols' shape,

        scales[slot, part] * (sum_p buf[p, token, part*R:(part+1)*R]) @ B[slot, cols].T

    slot >= 0 (the caller skips base tokens: their buf rows are never written). Adding it to y's old
    value in float32 and rounding once to y's dtype gives what the expand kernels store."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    buf_row = buf_ptr + token * stride_bt + ((part * R).to(tl.int64) + offs_r) * stride_br
    # The planes unrolled: P independent loads in flight at once, not a chain of P round trips.
    h = tl.load(buf_row, mask=r_mask, other=0.0)
    for p in tl.static_range(1, P):
        h += tl.load(buf_row + p * stride_bp, mask=r_mask, other=0.0)
    # Rounded to B's dtype as the tile kernel feeds its tensor cores (and PEFT rounds it).
    h = h.to(b_ptr.dtype.element_ty).to(tl.float32)
    scale = tl.load(scales_ptr + slot * stride_ss + part * stride_si)
    # B one rank row at a time: pointers of cols' shape, where a [BLOCK_R, ...] tile's 64-bit pointers
    # alone would take most of a thread's registers; the rows' loads are independent, all in flight.
    b_row = b_ptr + slot * stride_bs + cols * stride_bn
    acc = tl.full(cols.shape, 0.0, tl.float32)  # not tl.zeros: see _launch.jit
    # ROWS_IN_FLIGHT rank rows at a time, their loads all in flight (a branch around rows past R would
    # make them one round trip each); a group's rows x (cols per thread) values bound the registers.
    # Rows past R (R not a multiple of the group) read row R - 1 again, times h[r] = 0: a row mask
    # instead costs registers (sm_90: 96 a thread instead of 40 at 512 columns x 4 warps, and fp16 spills).
    for r0 in range(0, R, ROWS_IN_FLIGHT):
        for j in tl.static_range(ROWS_IN_FLIGHT):
            r = r0 + j
            # h[r] as a scalar (tl.reduce, not tl.sum: an interpreted kernel cannot call it, see _launch.jit).
            h_r = tl.reduce(tl.where(offs_r == r, h, 0.0), 0, tl.standard._sum_combine)
            b = tl.load(b_row + tl.minimum(r, R - 1) * stride_bk, mask=col_mask, other=0.0)
            acc += h_r * b.to(tl.float32)
    return acc * scale


@_launch.jit
def _lora_expand_token_kernel(
    buf_ptr, b_ptr, y_ptr, scales_ptr, slice_starts_ptr, token_slots_ptr,
    R,
    stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_yt, stride_yn, stride_ss, stride_si,
    P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    PDL: tl.constexpr,
):
    _wait_for_inputs(PDL)
    # grid: (token in batch order, column block within a slice, slice). The decode expand: one token's
    # row, so no tile of 16 rows of which a few are real (tl.dot's smallest M, in registers and 64-bit
    # pointers), and the rank sum as FMAs. Tokens of one slot read the same B rows, mostly from L2.
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(token_slots_ptr + token).to(tl.int64)
    if slot < 0:
        return
    part = tl.program_id(2)
    col_end = tl.load(slice_starts_ptr + part + 1)
    col = tl.load(slice_starts_ptr + part) + tl.program_id(1) * BLOCK_N
    if col >= col_end:
        return
    offs_n = col + tl.arange(0, BLOCK_N)
    n_mask = offs_n < col_end
    acc = lora_delta_of_token(buf_ptr, b_ptr, scales_ptr, token, slot, part, offs_n, n_mask, R,
                              stride_bp, stride_bt, stride_br, stride_bs, stride_bn, stride_bk, stride_ss, stride_si,
                              P, BLOCK_R)
    y = y_ptr + token * stride_yt + offs_n * stride_yn
    old = tl.load(y, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y, (old + acc).to(y_ptr.dtype.element_ty), mask=n_mask)


# ----------------------------------------------------------------------------- launchers


def _pow2_block(n: int, cap: int) -> int:
    return min(cap, max(16, triton.next_power_of_2(n)))


def rank_block(rank: int) -> int:
    """The whole rank as one block: a power of two, at least 16 (tl.dot's smallest dimension)."""
    return max(16, triton.next_power_of_2(rank))


@dataclass(frozen=True)
class ShrinkConfig:
    block_n: int        # stacked ranks per program
    block_k: int        # H_in per loop step
    k_per_split: int    # H_in per split (a multiple of block_k)
    planes: int         # splits: the planes of partial sums the expand adds


def shrink_config(block_m: int, max_tiles: int, k: int, stacked_rank: int, split_k: int | None = None) -> ShrinkConfig:
    """The shrink's tiling for a step of `max_tiles` tiles of `block_m` tokens, H_in = k."""
    block_n = _pow2_block(stacked_rank, _MAX_BLOCK_R)
    block_k = _SHRINK_BLOCK_K
    k_blocks = triton.cdiv(k, block_k)
    if split_k is None and block_m >= _PREFILL_BLOCK_M:
        split_k = triton.cdiv(k, _PREFILL_K_PER_SPLIT)
    # Keep >= 2 K blocks per split: each split adds a plane the expand reads back.
    split_k = split_k or max(1, min(triton.cdiv(_SHRINK_TARGET_PROGRAMS, max_tiles), k_blocks // 2, _MAX_SHRINK_SPLITS))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return ShrinkConfig(block_n, block_k, k_per_split, triton.cdiv(k, k_per_split))


def _shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta, split_k: int | None = None) -> torch.Tensor:
    num_tokens, k = x.shape
    lora_a = _stacked(lora_a)
    rank = lora_a.shape[1] * lora_a.shape[2]
    if num_tokens == 0 or rank == 0 or k == 0:
        return torch.zeros(1, num_tokens, rank, dtype=torch.float32, device=x.device)
    cfg = shrink_config(meta.block_m, meta.max_tiles, k, rank, split_k)
    # Not zero-filled: the expand reads only rows of adapter tokens, which every split writes.
    out = torch.empty(cfg.planes, num_tokens, rank, dtype=torch.float32, device=x.device)
    _launch.launch(
        _lora_shrink_kernel, (meta.max_tiles, triton.cdiv(rank, cfg.block_n), cfg.planes), x.device,
        x, lora_a, out,
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        k, rank, lora_a.shape[2], cfg.k_per_split,
        x.stride(0), x.stride(1), *lora_a.stride(), *out.stride(),
        BLOCK_M=meta.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PRECISION=_launch.precision(x.dtype),
    )
    return out


@functools.lru_cache(maxsize=64)
def _slice_starts(slices: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Once per (layer shape, device): the first calls run before any CUDA-graph capture.
    starts = [0]
    for width in slices:
        starts.append(starts[-1] + width)
    return torch.tensor(starts, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class ExpandConfig:
    block_n: int        # columns per block
    block_r: int        # the whole rank, padded to a power of two (>= 16 for tl.dot)
    num_warps: int
    per_token: bool     # one program per token (`_lora_expand_token_kernel`), else per slot tile


def expand_config(block_m: int, rank: int, per_token: bool = False) -> ExpandConfig:
    """The expand's tiling for tiles of `block_m` tokens (16 at decode) and rank R; `per_token`: one
    program per token (`LoRAMeta.per_token_expand`)."""
    block_r = rank_block(rank)
    if per_token:
        return ExpandConfig(_TOKEN_EXPAND_BLOCK_N, block_r, _TOKEN_EXPAND_WARPS, per_token=True)
    if block_m >= _PREFILL_BLOCK_M:
        return ExpandConfig(_PREFILL_EXPAND_BLOCK_N, block_r, 4, per_token=False)
    # Wider at decode, where a launch is latency-bound: 256 columns per program took the four
    # projections' expands from 88 to 61 us per layer on the H200 (64 columns: 4x the programs, so
    # more waves of the same chain of loads; bench/RESULTS.md, 2026-12-02).
    block_n = _DECODE_EXPAND_BLOCK_N if block_m <= 16 else _EXPAND_BLOCK_N
    # A 64 x 128 fp32 tile plus its y tile over 4 warps needs > 255 registers: an sm_90 compile
    # spills 72-176 bytes per thread to local memory (rank 16/64, bf16); 8 warps fit (~245, no spill).
    num_warps = 8 if block_m * block_n >= 64 * 128 else 4
    return ExpandConfig(block_n, block_r, num_warps, per_token=False)


def _expand_triton(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                   meta: LoRAMeta, slices: tuple[int, ...]) -> None:
    num_tokens = y.shape[0]
    rank = lora_b.shape[2]
    if num_tokens == 0 or rank == 0 or y.shape[1] == 0:
        return
    cfg = expand_config(meta.block_m, rank, meta.per_token_expand)
    strides = (*buf.stride(), *lora_b.stride(), y.stride(0), y.stride(1), *scales.stride())
    if cfg.per_token:
        _launch.launch(
            _lora_expand_token_kernel, (num_tokens, triton.cdiv(max(slices), cfg.block_n), len(slices)), y.device,
            buf, lora_b, y, scales, _slice_starts(slices, y.device), meta.token_slots, rank, *strides,
            P=buf.shape[0], BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r, num_warps=cfg.num_warps,
        )
        return
    grid = (meta.max_tiles, triton.cdiv(max(slices), cfg.block_n), len(slices))
    _launch.launch(
        _lora_expand_kernel, grid, y.device,
        buf, lora_b, y, scales, _slice_starts(slices, y.device),
        meta.sorted_token_ids, meta.tile_slots, meta.tile_starts, meta.tile_ends,
        rank, buf.shape[0], *strides,
        BLOCK_M=meta.block_m, BLOCK_N=cfg.block_n, BLOCK_R=cfg.block_r,
        PRECISION=_launch.precision(lora_b.dtype), num_warps=cfg.num_warps,
    )


def _stacked(lora_a: torch.Tensor) -> torch.Tensor:
    """A as [S, n, R, H_in] (a 3-D [S, R, H_in] is one slice)."""
    return lora_a[:, None] if lora_a.dim() == 3 else lora_a


def _check_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta) -> None:
    assert x.dim() == 2 and lora_a.dim() in (3, 4), f"x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)}"
    assert x.shape[0] == meta.num_tokens, f"x has {x.shape[0]} tokens, meta {meta.num_tokens}"
    assert lora_a.shape[0] == meta.num_slots and lora_a.shape[-1] == x.shape[1], (
        f"lora_a {tuple(lora_a.shape)} does not fit x {tuple(x.shape)} and {meta.num_slots} slots")
    assert x.dtype == lora_a.dtype, f"x is {x.dtype}, lora_a is {lora_a.dtype}"


def _expand_args(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                 meta: LoRAMeta, slices: tuple[int, ...] | None):
    """Checks the shapes; returns buf as [P, T, n * R], scales as [S, n] and the slice widths."""
    slices = (y.shape[1],) if slices is None else tuple(slices)
    buf = buf[None] if buf.dim() == 2 else buf
    scales = scales[:, None] if scales.dim() == 1 else scales
    assert y.dim() == 2 and buf.dim() == 3 and lora_b.dim() == 3, (
        f"y {tuple(y.shape)}, buf {tuple(buf.shape)}, lora_b {tuple(lora_b.shape)}")
    assert sum(slices) == y.shape[1], f"slices {slices} do not add up to y's {y.shape[1]} columns"
    rank = lora_b.shape[2]
    assert y.shape[0] == buf.shape[1] == meta.num_tokens, (
        f"y has {y.shape[0]} tokens, buf {buf.shape[1]}, meta {meta.num_tokens}")
    assert lora_b.shape[:2] == (meta.num_slots, y.shape[1]) and buf.shape[2] == len(slices) * rank, (
        f"lora_b {tuple(lora_b.shape)}, buf {tuple(buf.shape)} do not fit y {tuple(y.shape)}, slices {slices}")
    assert buf.dtype == torch.float32, f"buf must be float32, got {buf.dtype}"
    assert scales.shape == (meta.num_slots, len(slices)) and scales.dtype == torch.float32, (
        f"scales must be float32 [{meta.num_slots}, {len(slices)}], got {scales.dtype} {tuple(scales.shape)}")
    return buf, scales, slices


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
    """buf[:, t].sum(0) = x[t] @ lora_a[s].T with s = meta.token_slots[t], for tokens with s >= 0.

    x: [T, H_in]; lora_a: [S, n, R, H_in] for n stacked slices, or [S, R, H_in] for one (any
    strides), same dtype as x; lora_a[s] above means its n * R rows in (slice, rank) order.
    Returns buf [P, T, n * R] float32: P planes of split-K partial sums, as
    `lora_expand` takes them. Rows of tokens with s = -1 are left unwritten (undefined).
    Runs the Triton kernel on CUDA tensors (or with MULTILORA_TRITON_INTERPRET_KERNELS=1),
    else `lora_shrink_ref`.
    """
    _check_shrink(x, lora_a, meta)
    if _launch.use_triton(x):
        return _shrink_triton(x, lora_a, meta)
    return lora_shrink_ref(x, lora_a, meta)


def lora_expand(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                meta: LoRAMeta, slices: tuple[int, ...] | None = None) -> None:
    """In place, for tokens t with s = meta.token_slots[t] >= 0 and each output slice i:

        y[t, c_i:c_i+N_i] += scales[s, i] * (buf[:, t, i*R:(i+1)*R].sum(0) @ lora_b[s, c_i:c_i+N_i].T)

    y: [T, sum N_i], any strides (e.g. a fused qkv output), left untouched where s = -1;
    buf: [P, T, n * R] float32 from `lora_shrink` (or [T, n * R]); lora_b: [S, sum N_i, R],
    slice i's B in rows c_i.. (any strides); scales: [S, n] float32 (or [S] for one slice);
    slices: the widths N_i (default: one slice, all of y). Accumulates in fp32, stores in
    y.dtype. One launch for all slices. Runs the Triton kernel on CUDA tensors (or with
    MULTILORA_TRITON_INTERPRET_KERNELS=1), else `lora_expand_ref`.
    """
    buf, scales, slices = _expand_args(y, buf, lora_b, scales, meta, slices)
    if _launch.use_triton(y):
        _expand_triton(y, buf, lora_b, scales, meta, slices)
    else:
        lora_expand_ref(y, buf, lora_b, scales, meta, slices)


# ----------------------------------------------------------------------------- torch twins


def _used_slots(meta: LoRAMeta) -> list[int]:
    return [s for s in meta.token_slots.unique().tolist() if s >= 0]


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
    """Pure-torch `lora_shrink`: per used slot, x[rows] @ A[s].T in float32 (PEFT's order); one plane."""
    _check_shrink(x, lora_a, meta)
    lora_a = _stacked(lora_a)
    out = torch.zeros(1, x.shape[0], lora_a.shape[1] * lora_a.shape[2], dtype=torch.float32, device=x.device)
    for slot in _used_slots(meta):
        rows = (meta.token_slots == slot).nonzero().squeeze(1)
        out[0, rows] = x[rows].float() @ lora_a[slot].flatten(0, 1).float().T
    return out


def lora_expand_ref(y: torch.Tensor, buf: torch.Tensor, lora_b: torch.Tensor, scales: torch.Tensor,
                    meta: LoRAMeta, slices: tuple[int, ...] | None = None) -> None:
    """Pure-torch `lora_expand`: per used slot and slice, y[rows, cols] += (buf[rows] @ B[s, cols].T) * scale."""
    buf, scales, slices = _expand_args(y, buf, lora_b, scales, meta, slices)
    rank = lora_b.shape[2]
    for slot in _used_slots(meta):
        rows = (meta.token_slots == slot).nonzero().squeeze(1)
        h = buf[:, rows].sum(0)
        col = 0
        for i, width in enumerate(slices):
            cols = slice(col, col + width)
            delta = (h[:, i * rank:(i + 1) * rank] @ lora_b[slot, cols].float().T) * scales[slot, i]
            y[rows, cols] = (y[rows, cols].float() + delta).to(y.dtype)
            col += width
