"""The sampler's passes over whole rows of a step's logits: Triton kernels and their torch twins.

Two passes over whole rows, each one launch over column blocks of every row (at decode a
batch has too few rows to fill a GPU with one block per row, as torch's reductions give them),
and one over each row's window of candidates:

    window_softmax_input    the softmax input of a batch whose every random row has a top_k,
                            from the logits and each row's ranked window (multilora.sampler)
    rank_window             a window's ids ordered as top-p ranks them: probability, then id
    argmax_probs_over_noise the draw: token[r] = argmax_j probs[r, j] / noise[r, j]

Each reproduces torch bit for bit: IEEE float32 subtraction, product and division
(tl.math.div_rn), the lowest id among equal maxima as torch.argmax takes, and the order a
stable sort gives.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from multilora_kernels import _launch

_BLOCK = 4096   # columns per program: 32 programs per row of a 128256-token vocabulary
# rank_window compares a chunk of a window's ids with all of them at a time: [chunk, next_pow2(W)]
# booleans, 64 a thread at 8 warps; fewer, wider chunks are fewer dependent loads in a row.
_RANK_TILE = 16384


_wait_for_inputs = _launch.jit(_launch.wait_for_inputs)  # decorated with this file's kernels


@_launch.jit
def _max(x, axis: tl.constexpr):
    # tl.max is a @triton.jit helper that an interpreted kernel cannot call: see _launch.jit.
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@_launch.jit
def _min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


@_launch.jit
def _sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@_launch.jit
def _window_softmax_input_kernel(logits_ptr, best_ptr, ranked_ptr, kth_index_ptr, scale_ptr, out_ptr, V, W,
                                 stride_l, stride_r, stride_o, DIVIDE: tl.constexpr, BLOCK: tl.constexpr,
                                 PDL: tl.constexpr):
    _wait_for_inputs(PDL)
    # grid: (row, column block)
    row = tl.program_id(0).to(tl.int64)
    ids = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = ids < V
    best = tl.load(best_ptr + row).to(tl.float32)
    scale = tl.load(scale_ptr + row)
    kth_logit = tl.load(ranked_ptr + row * stride_r + tl.load(kth_index_ptr + row)).to(tl.float32)
    last_logit = tl.load(ranked_ptr + row * stride_r + W - 1).to(tl.float32)
    logits = tl.load(logits_ptr + row * stride_l + ids, mask=in_row, other=0.0).to(tl.float32)
    if DIVIDE:
        x = tl.math.div_rn(logits - best, scale)
        kth = tl.math.div_rn(kth_logit - best, scale)
    else:
        x = (logits - best) * scale
        kth = (kth_logit - best) * scale
    kept = (logits >= last_logit) & (x >= kth)
    tl.store(out_ptr + row * stride_o + ids, tl.where(kept, x, float("-inf")), mask=in_row)


def window_softmax_input(logits: torch.Tensor, best: torch.Tensor, ranked: torch.Tensor, kth_index: torch.Tensor,
                         scale: torch.Tensor) -> torch.Tensor:
    """The softmax input [M, V] float32 of rows cut by top-k, from one pass over the logits:

        out[r, j] = x[r, j] if logits[r, j] >= ranked[r, W - 1] and x[r, j] >= kth[r] else -inf
        x[r, j] = (logits[r, j] - best[r]) * scale[r]        (/ scale[r] on the CPU, as the sampler scales there)
        kth[r] = x of ranked[r, kth_index[r]]

    logits [M, V] (any float dtype), best [M] (each row's max, logits' dtype), ranked [M, W] (each
    row's W largest logits, descending), kth_index [M] int64, scale [M] float32.

    It is the sampler's former rebuild, `where(logits >= past, kth, -inf)` with the window's
    scaled and cut values scattered over it (past: the window's last logit where its scaled value
    reaches the k-th, else +inf), bit for bit, without a scatter: an id above the window's last
    logit is in the window; one equal to it scales to the last value, which is the k-th when ties
    run past the window (then both give it) and is dropped otherwise; below it, an id is outside
    the window and dropped by both. One Triton launch on CUDA tensors (or with
    MULTILORA_TRITON_INTERPRET_KERNELS=1), else `window_softmax_input_ref`.
    """
    _check_window(logits, best, ranked, kth_index, scale)
    if not _launch.use_triton(logits) or logits.numel() == 0:
        return window_softmax_input_ref(logits, best, ranked, kth_index, scale)
    rows, vocab = logits.shape
    out = torch.empty(rows, vocab, dtype=torch.float32, device=logits.device)
    _launch.launch(_window_softmax_input_kernel, (rows, triton.cdiv(vocab, _BLOCK)), logits.device,
                   logits, best, ranked, kth_index, scale, out, vocab, ranked.shape[1],
                   logits.stride(0), ranked.stride(0), out.stride(0),
                   DIVIDE=logits.device.type != "cuda", BLOCK=_BLOCK, num_warps=8)
    return out


def window_softmax_input_ref(logits: torch.Tensor, best: torch.Tensor, ranked: torch.Tensor, kth_index: torch.Tensor,
                             scale: torch.Tensor) -> torch.Tensor:
    """Pure-torch `window_softmax_input`."""
    _check_window(logits, best, ranked, kth_index, scale)

    def scaled(v: torch.Tensor) -> torch.Tensor:
        x = v - best.float()[:, None]
        return x.mul_(scale[:, None]) if v.device.type == "cuda" else x.div_(scale[:, None])

    x = scaled(logits)
    kth = scaled(ranked.gather(1, kth_index.view(-1, 1)))
    return torch.where((logits >= ranked[:, -1:]) & (x >= kth), x, float("-inf"))


def _check_window(logits, best, ranked, kth_index, scale) -> None:
    rows = logits.shape[0]
    assert logits.dim() == 2 and logits.stride(1) == 1, f"logits must be [M, V] with contiguous rows: {logits.shape}"
    assert ranked.dim() == 2 and ranked.shape[0] == rows and 0 < ranked.shape[1] <= logits.shape[1], ranked.shape
    assert ranked.stride(1) == 1 and best.shape == (rows,) and scale.shape == (rows,), (best.shape, scale.shape)
    assert kth_index.numel() == rows and kth_index.dtype == torch.int64 and scale.dtype == torch.float32


@_launch.jit
def _rank_window_kernel(probs_ptr, ids_ptr, ranked_ptr, ranked_ids_ptr, W, stride_p, stride_i, stride_r,
                        BLOCK_W: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    _wait_for_inputs(PDL)
    # grid: (row,); an id's place = how many of the window rank before it (a counting sort).
    # Probabilities are compared as their int32 bits: for floats >= 0 that is their order, exact for
    # subnormals (a GPU's float compare may flush them to 0, and a sort does not), and a total order
    # even with NaN, so the places are always a permutation and every output gets written.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_W)
    in_window = offs < W
    ids = tl.load(ids_ptr + row * stride_i + offs, mask=in_window, other=0)
    p = tl.load(probs_ptr + row * stride_p + ids, mask=in_window, other=0.0)
    p_bits = p.to(tl.int32, bitcast=True)
    place = offs * 0    # int32 zeros (tl.zeros is a @triton.jit helper: see _launch.jit)
    for start in range(0, W, CHUNK):
        others = start + tl.arange(0, CHUNK)
        in_chunk = others < W
        other_ids = tl.load(ids_ptr + row * stride_i + others, mask=in_chunk, other=0)
        other_bits = tl.load(probs_ptr + row * stride_p + other_ids, mask=in_chunk, other=0.0).to(tl.int32, bitcast=True)
        higher = other_bits[:, None] > p_bits[None, :]
        tied_lower_id = (other_bits[:, None] == p_bits[None, :]) & (other_ids[:, None] < ids[None, :])
        place += _sum(((higher | tied_lower_id) & in_chunk[:, None]).to(tl.int32), 0)
    tl.store(ranked_ptr + row * stride_r + place, p, mask=in_window)
    tl.store(ranked_ids_ptr + row * stride_r + place, ids, mask=in_window)


def rank_window(probs: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """probs float32 [M, V], ids int64 [M, W] (distinct within a row) -> (ranked, ranked_ids), both [M, W]:
    each row's ids ordered by probability, descending, equal probabilities by id, and their probabilities.

    That is the order a stable descending sort of the probabilities gathered at the ids sorted by
    id gives (so top-p cuts a window as a sort of the whole row would), without either sort: an
    id's place is how many ids of its window rank before it. One Triton launch on CUDA tensors (or
    with MULTILORA_TRITON_INTERPRET_KERNELS=1), else `rank_window_ref`. A row holding NaN (the
    sampler fails it) gets all of its ids, in some order.
    """
    _check_rank(probs, ids)
    if not _launch.use_triton(probs) or ids.numel() == 0:
        return rank_window_ref(probs, ids)
    rows, window = ids.shape
    block_w = triton.next_power_of_2(window)
    ranked = torch.empty(rows, window, dtype=torch.float32, device=probs.device)
    ranked_ids = torch.empty(rows, window, dtype=torch.int64, device=probs.device)
    _launch.launch(_rank_window_kernel, (rows,), probs.device, probs, ids, ranked, ranked_ids, window,
                   probs.stride(0), ids.stride(0), ranked.stride(0),
                   BLOCK_W=block_w, CHUNK=_rank_chunk(block_w), num_warps=8)
    return ranked, ranked_ids


def _rank_chunk(block_w: int) -> int:
    return max(1, min(block_w, _RANK_TILE // block_w))


def rank_window_ref(probs: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch `rank_window`: the two sorts."""
    _check_rank(probs, ids)
    by_id = ids.sort(dim=1).values
    ranked, order = probs.gather(1, by_id).sort(dim=1, descending=True, stable=True)
    return ranked, by_id.gather(1, order)


def _check_rank(probs: torch.Tensor, ids: torch.Tensor) -> None:
    assert probs.dim() == 2 and probs.dtype == torch.float32 and probs.stride(1) == 1, (probs.shape, probs.dtype)
    assert ids.dim() == 2 and ids.shape[0] == probs.shape[0] and ids.dtype == torch.int64, (ids.shape, ids.dtype)
    assert ids.stride(1) == 1, "ids rows must be contiguous"


@_launch.jit
def _block_argmax_kernel(probs_ptr, noise_ptr, best_ptr, best_id_ptr, V, stride_p, stride_n, num_blocks,
                         BLOCK: tl.constexpr, PDL: tl.constexpr):
    _wait_for_inputs(PDL)
    # grid: (row, column block); writes the block's largest quotient and the lowest id holding it
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    ids = block * BLOCK + tl.arange(0, BLOCK)
    in_row = ids < V
    p = tl.load(probs_ptr + row * stride_p + ids, mask=in_row, other=0.0)
    n = tl.load(noise_ptr + row * stride_n + ids, mask=in_row & (p > 0.0), other=1.0)
    q = tl.math.div_rn(p, n)        # 0 past the row's end: any id in the row ties it with a lower id
    best = _max(q, 0)
    best_id = _min(tl.where(q == best, ids, V), 0)
    tl.store(best_ptr + row * num_blocks + block, best)
    tl.store(best_id_ptr + row * num_blocks + block, best_id.to(tl.int64))


def _check_draw(probs: torch.Tensor, noise: torch.Tensor) -> None:
    assert probs.dim() == 2 and probs.shape == noise.shape, (tuple(probs.shape), tuple(noise.shape))
    assert probs.dtype == noise.dtype == torch.float32, (probs.dtype, noise.dtype)
    assert probs.stride(1) == noise.stride(1) == 1, "rows must be contiguous"


def argmax_probs_over_noise(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """probs, noise: float32 [M, V] -> int64 [M]: argmax_j probs[r, j] / noise[r, j], the lowest j among
    equal maxima. With noise ~ Exp(1) that is how torch.multinomial draws one sample, and it is
    `(probs / noise).argmax(dim=-1)` bit for bit. Rows holding NaN (the sampler fails them) may
    draw another id. The noise is read only where a probability is positive (0 / noise is 0
    whatever the noise), so a draw reads about the probabilities alone. One Triton launch and a
    [M, V / 4096] argmax on CUDA tensors (or with MULTILORA_TRITON_INTERPRET_KERNELS=1), else
    `argmax_probs_over_noise_ref`."""
    _check_draw(probs, noise)
    if not _launch.use_triton(probs) or probs.numel() == 0:
        return argmax_probs_over_noise_ref(probs, noise)
    rows, vocab = probs.shape
    num_blocks = triton.cdiv(vocab, _BLOCK)
    best = torch.empty(rows, num_blocks, dtype=torch.float32, device=probs.device)
    best_id = torch.empty(rows, num_blocks, dtype=torch.int64, device=probs.device)
    _launch.launch(_block_argmax_kernel, (rows, num_blocks), probs.device, probs, noise, best, best_id,
                   vocab, probs.stride(0), noise.stride(0), num_blocks, BLOCK=_BLOCK, num_warps=8)
    # torch.argmax takes the first of equal maxima: the lowest block, whose ids are the lowest
    return best_id.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1)


def argmax_probs_over_noise_ref(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Pure-torch `argmax_probs_over_noise`: torch.multinomial's one-sample draw given its noise."""
    _check_draw(probs, noise)
    return (probs / noise).argmax(dim=-1)
