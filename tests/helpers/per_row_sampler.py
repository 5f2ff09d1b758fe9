"""The per-row sampler multilora shipped before the batched one, kept verbatim as the reference.

The batched `multilora.sampler.Sampler` must draw exactly the tokens this one
draws for every seeded row (same logits row, same step seed), so its tests
compare the two. It raises where the batched one returns -1 (NaN rows,
temperatures that underflow); tests only compare rows this one can sample.
"""

from typing import Optional

import torch

from multilora.sampler import SampleRow
from multilora.sampling_params import SamplingParams


class PerRowSampler:
    """Greedy rows by one batched argmax; random rows one at a time.

    A random row applies temperature, then top-k, then top-p, in float32, and
    draws with its own generator when seeded. Its result depends only on its
    own logits row and `step_seed`, never on the other rows.
    """

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> list[int]:
        """logits [N, V] (any float dtype, any device) -> N token ids."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        logits = _mask_banned(logits, rows)
        # torch.argmax breaks ties towards the lowest id; casting bf16/fp16 to
        # float32 is exact, so argmax in the native dtype gives the same ids.
        token_ids = torch.argmax(logits, dim=-1)
        for i, row in enumerate(rows):
            if not row.params.greedy:
                token_ids[i] = _sample_row(logits[i], row.params, row.step_seed)
        return token_ids.tolist()  # the step's only device -> host sync


def _mask_banned(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """A copy of `logits` with each row's banned ids at -inf (the input if none are banned)."""
    pairs = [(i, t) for i, row in enumerate(rows) for t in row.banned_token_ids]
    if not pairs:
        return logits
    vocab_size = logits.shape[1]
    assert all(0 <= t < vocab_size for _, t in pairs), f"banned id outside vocab of {vocab_size}"
    index = torch.tensor(pairs, dtype=torch.long).to(logits.device)
    masked = logits.clone()
    masked[index[:, 0], index[:, 1]] = float("-inf")
    return masked


def _sample_row(row: torch.Tensor, params: SamplingParams, step_seed: Optional[int]) -> torch.Tensor:
    """Draw one id (a 0-dim tensor) from a [V] logits row: temperature, top-k, top-p."""
    x = row.float()
    # Subtracting the max first keeps a tiny temperature from overflowing to inf.
    x = (x - x.max()) / params.temperature
    if 0 < params.top_k < x.shape[0]:
        kth = torch.topk(x, params.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))  # ties with the k-th all stay
    probs = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        probs = _keep_top_p(probs, params.top_p)
    generator = None
    if step_seed is not None:
        generator = torch.Generator(device=row.device).manual_seed(step_seed)
    return torch.multinomial(probs, 1, generator=generator)[0]


def _keep_top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all but the smallest most-likely set whose mass >= top_p (the top id always stays)."""
    # A stable sort puts equal probabilities in id order, so the cut is deterministic.
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    # Mass of the ids ranked above each id; 0 for the top id, which therefore stays.
    mass_before = torch.cumsum(sorted_probs, dim=0).roll(1)
    mass_before[0] = 0.0
    drop_sorted = mass_before >= top_p
    drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)
