"""The batched sampler as it was before issue 7's window path (sampler.py at da3b6d4), kept as a reference.

The current `multilora.sampler.Sampler` must draw exactly the tokens this one draws for every
seeded row whose kept set fits its window (tests/test_sampler_vs_previous.py), and
bench/bench_sampler.py times the two side by side. Only the class name changed
(`Sampler` -> `PreviousSampler`); `SampleRow` is the package's.
"""

import functools
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from multilora.sampler import SampleRow

FAILED = -1                                # the token id of a row that could not be sampled
_F32 = np.finfo(np.float32)
_WINDOW_LIMIT = 1024                       # a larger top_k ranks the whole vocabulary (one sort)
# Top-p over top-k ranks this many logits past the widest top_k: ids tied with a row's
# k-th logit all stay in its top-k set, and bf16 logits tie often. Ties past the margin
# (a near-constant row) are kept whatever top-p says: the one case that differs from a sort.
_TIE_MARGIN = 256


@dataclass(frozen=True)
class SamplingTensors:
    """One step's sampling parameters, on the logits' device, built by `SamplingTensors.build`.

    Per-row tensors hold one entry per *random* row (not greedy), in batch order;
    `random_rows` maps them to batch rows (None: every row is random).
    """

    num_rows: int
    random_rows: Optional[torch.Tensor]    # int64 [M]
    top_k: torch.Tensor                    # int64 [M]; 0 = no top-k
    scale: torch.Tensor                    # float32 [M]: temperature (CPU) or its reciprocal (CUDA), see _scale
    top_p: torch.Tensor                    # float32 [M]; inf = no top-p
    banned: Optional[torch.Tensor]         # int64 [2, P]: (batch row, token id) pairs that can never be picked
    seeds: tuple[tuple[int, int], ...]     # (random row, step seed) of the seeded rows
    window: int                            # logits ranked per random row (one topk): 0 = none, vocab size = a sort
    use_top_k: bool
    use_top_p: bool
    top_p_sorts_rows: bool                 # top-p ranks whole rows of probabilities (some row has no top-k)

    @property
    def num_random(self) -> int:
        return self.top_k.shape[0]

    @classmethod
    def build(cls, rows: list[SampleRow], vocab_size: int, device: torch.device) -> "SamplingTensors":
        """Packs the rows into two host tensors and copies them without waiting (pageable
        host memory is staged at once, so the copy never blocks on the device)."""
        random, top_k, scale, top_p, seeds = [], [], [], [], []
        for i, row in enumerate(rows):
            params = row.params
            if params.greedy or params.temperature < _F32.tiny:
                continue    # a temperature that underflows float32 would divide by zero: greedy is its limit
            if row.step_seed is not None:
                seeds.append((len(random), row.step_seed))
            random.append(i)
            top_k.append(params.top_k if 0 < params.top_k < vocab_size else 0)
            scale.append(_scale(params.temperature, device.type))
            top_p.append(params.top_p if params.top_p < 1.0 else float("inf"))
        banned = [(i, t) for i, row in enumerate(rows) for t in row.banned_token_ids]
        assert all(0 <= t < vocab_size for _, t in banned), f"banned id outside vocab of {vocab_size}"
        all_random = len(random) == len(rows)
        ints = torch.tensor(top_k + ([] if all_random else random) + [i for i, _ in banned] + [t for _, t in banned],
                            dtype=torch.long).to(device, non_blocking=True)
        floats = torch.tensor(scale + top_p, dtype=torch.float32).to(device, non_blocking=True)
        m = len(random)
        return cls(num_rows=len(rows), random_rows=None if all_random else ints[m:2 * m],
                   top_k=ints[:m], scale=floats[:m], top_p=floats[m:],
                   banned=ints[len(ints) - 2 * len(banned):].view(2, -1) if banned else None,
                   seeds=tuple(seeds), window=_window(top_k, top_p, vocab_size),
                   use_top_k=any(top_k), use_top_p=any(p != float("inf") for p in top_p),
                   top_p_sorts_rows=_top_p_sorts_rows(top_k, top_p))


@functools.lru_cache(maxsize=1024)        # a step's rows share a few temperatures: skip numpy per row
def _scale(temperature: float, device_type: str) -> float:
    """The float32 that reproduces the per-row sampler's `x / temperature` bit for bit.

    torch divides a CUDA tensor by a Python number as x * (1 / float32(t)) (its
    reciprocal in float32), and a CPU tensor by true division; the sampler
    multiplies on CUDA and divides on the CPU by this value. A temperature past
    float32's range is clamped there, where it is already as flat as float32 gets.
    """
    t = np.float32(min(temperature, float(_F32.max)))
    return float(np.float32(1.0) / t) if device_type == "cuda" else float(t)


def _top_p_sorts_rows(top_k: list[int], top_p: list[float]) -> bool:
    """Whether some row's top-p set can only be found by sorting its whole row."""
    return any(p != float("inf") and (k == 0 or k > _WINDOW_LIMIT) for k, p in zip(top_k, top_p))


def _window(top_k: list[int], top_p: list[float], vocab_size: int) -> int:
    """How many logits of each random row one topk ranks (0: none; vocab_size: a sort instead).

    Enough for the widest top_k's k-th logit and, when top-p cuts inside the top-k sets,
    for those sets and their ties.
    """
    widest = max(top_k, default=0)
    if widest > _WINDOW_LIMIT:
        return vocab_size
    if any(p != float("inf") for p in top_p) and not _top_p_sorts_rows(top_k, top_p):
        widest += _TIE_MARGIN
    return min(widest, vocab_size)


class PreviousSampler:
    """Samples a step's rows: greedy rows by one argmax, random rows by one batched draw."""

    def __init__(self):
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """logits [N, V] (any float dtype, any device) -> token ids, int64 [N] on the same device,
        FAILED (-1) for a row whose logits are not finite or whose tokens are all banned."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        return self.sample(logits, SamplingTensors.build(rows, logits.shape[1], logits.device))

    def sample(self, logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
        """As __call__, with the rows already packed (so a caller can build them ahead of the step)."""
        assert logits.dim() == 2 and logits.shape[0] == params.num_rows, (tuple(logits.shape), params.num_rows)
        low, high = torch.aminmax(logits, dim=-1)
        valid = low.isfinite() & high.isfinite()
        if params.banned is not None:
            minus_inf = torch.full(params.banned[0].shape, float("-inf"), dtype=logits.dtype, device=logits.device)
            logits = logits.index_put((params.banned[0], params.banned[1]), minus_inf)
        # torch.max breaks ties towards the lowest id; casting bf16/fp16 to
        # float32 is exact, so the native dtype gives the ids float32 would.
        best, token_ids = logits.max(dim=-1)
        valid &= best > float("-inf")      # finite logits, yet every token banned
        if params.num_random:
            rows = params.random_rows
            picked = self._draw(logits if rows is None else logits.index_select(0, rows),
                                best if rows is None else best.index_select(0, rows), params)
            token_ids = picked if rows is None else token_ids.index_copy(0, rows, picked)
        return torch.where(valid, token_ids, FAILED)

    def _draw(self, logits: torch.Tensor, best: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
        """One id per random row: temperature, then top-k, then top-p, in float32, then the draw."""
        x = logits - best.float()[:, None]      # float32; subtracting the max first: a tiny temperature cannot overflow
        x = x.mul_(params.scale[:, None]) if x.device.type == "cuda" else x.div_(params.scale[:, None])
        vocab = x.shape[1]
        ranked = None
        if params.window:
            ranked = x.topk(params.window) if params.window < vocab else x.sort(dim=1, descending=True)
        if params.use_top_k:
            kth = ranked.values.gather(1, (params.top_k - 1).clamp(min=0)[:, None])
            kth = torch.where(params.top_k[:, None] > 0, kth, float("-inf"))
            x = torch.where(x >= kth, x, float("-inf"))      # ties with the k-th all stay
        probs = torch.softmax(x, dim=-1)
        if params.use_top_p:
            _keep_top_p(probs, None if params.top_p_sorts_rows else ranked.indices, params.top_p)
        noise = torch.empty_like(probs).exponential_()
        for row, seed in params.seeds:
            noise[row].exponential_(generator=self._generator(x.device).manual_seed(seed))
        return (probs / noise).argmax(dim=-1)

    def _generator(self, device: torch.device) -> torch.Generator:
        # manual_seed resets a generator completely, so one per device serves every seeded row.
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]


def _keep_top_p(probs: torch.Tensor, candidates: Optional[torch.Tensor], top_p: torch.Tensor) -> None:
    """Zeroes, in place, all but each row's smallest most-likely set whose mass reaches top_p
    (the top id always stays), cut as a stable descending sort of the whole row would cut it.

    `candidates` [M, W]: each row's W largest logits' ids, which hold every id its top-k
    kept (see _TIE_MARGIN); None ranks whole rows. Ordered by probability, then by id (as a
    stable sort orders equal probabilities), they are that sort's first W places.
    """
    if candidates is None:
        ranked, ids = probs.sort(dim=1, descending=True, stable=True)
    else:
        by_id, order = candidates.sort(dim=1)
        ranked, order = probs.gather(1, by_id).sort(dim=1, descending=True, stable=True)
        ids = by_id.gather(1, order)
    # The mass ranked above place i is cumsum[i - 1]; the first place whose mass reaches
    # top_p is the first dropped (place 0, with mass 0, always stays).
    mass = torch.cumsum(ranked, dim=1)
    first_dropped = 1 + (mass[:, :-1] < top_p[:, None]).sum(dim=1, keepdim=True)
    dropped = torch.arange(ranked.shape[1], device=probs.device) >= first_dropped
    probs.scatter_(1, ids, ranked.masked_fill(dropped, 0.0))
