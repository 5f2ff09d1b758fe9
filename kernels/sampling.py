"""The sampler's draw over whole rows: a Triton kernel and its torch twin.

    token[r] = argmax_j probs[r, j] / noise[r, j]      probs, noise: float32 [M, V]; the lowest j among equal maxima

That is how torch.multinomial draws one sample (noise ~ Exp(1)), and what
`(probs / noise).argmax(dim=-1)` computes, bit for bit: the quotient is an IEEE
division (tl.math.div_rn, as torch's), and the maximum goes to the lowest id, as
torch.argmax's does. Rows holding NaN (the sampler fails them) may draw another id.

Why a kernel: torch takes two full-row passes (a division writing [M, V], then an argmax
reducing it), and at decode a batch has too few rows to fill a GPU with one block per
row. Here every row is split into column blocks, one program each, and the noise is read
only where a probability is positive (0 / noise is 0 whatever the noise), so a draw reads
about the probabilities alone; a [M, blocks] argmax then picks each row's best block.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from multilora_kernels import _launch

_BLOCK = 4096   # columns per program: 32 programs per row of a 128256-token vocabulary


@_launch.jit
def _max(x, axis: tl.constexpr):
    # tl.max is a @triton.jit helper that an interpreted kernel cannot call: see _launch.jit.
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@_launch.jit
def _min(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_min)


@_launch.jit
def _block_argmax_kernel(probs_ptr, noise_ptr, best_ptr, best_id_ptr, V, stride_p, stride_n, num_blocks,
                         BLOCK: tl.constexpr):
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


def _check(probs: torch.Tensor, noise: torch.Tensor) -> None:
    assert probs.dim() == 2 and probs.shape == noise.shape, (tuple(probs.shape), tuple(noise.shape))
    assert probs.dtype == noise.dtype == torch.float32, (probs.dtype, noise.dtype)
    assert probs.stride(1) == noise.stride(1) == 1, "rows must be contiguous"


def argmax_probs_over_noise(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """probs, noise: float32 [M, V] -> int64 [M], argmax_j probs / noise (see the module docstring).
    One Triton launch and a [M, V / 4096] argmax on CUDA tensors (or with
    MULTILORA_TRITON_INTERPRET_KERNELS=1), else `argmax_probs_over_noise_ref`."""
    _check(probs, noise)
    if not _launch.use_triton(probs):
        return argmax_probs_over_noise_ref(probs, noise)
    rows, vocab = probs.shape
    num_blocks = triton.cdiv(vocab, _BLOCK)
    if rows == 0 or vocab == 0:
        return argmax_probs_over_noise_ref(probs, noise)
    best = torch.empty(rows, num_blocks, dtype=torch.float32, device=probs.device)
    best_id = torch.empty(rows, num_blocks, dtype=torch.int64, device=probs.device)
    _launch.launch(_block_argmax_kernel, (rows, num_blocks), probs.device, probs, noise, best, best_id,
                   vocab, probs.stride(0), noise.stride(0), num_blocks, BLOCK=_BLOCK, num_warps=8)
    # torch.argmax takes the first of equal maxima: the lowest block, whose ids are the lowest
    return best_id.gather(1, best.argmax(dim=1, keepdim=True)).squeeze(1)


def argmax_probs_over_noise_ref(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Pure-torch `argmax_probs_over_noise`: torch.multinomial's one-sample draw given its noise."""
    _check(probs, noise)
    return (probs / noise).argmax(dim=-1)
