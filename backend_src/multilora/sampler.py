"""Sampler: one token id per row of a step's logits, each row under its own SamplingParams.

The whole batch is sampled by a fixed number of tensor operations, whatever its
size: temperature, top-k and top-p are per-row tensors, and a draw is
argmax(probs / Exp(1) noise), which is exactly how torch.multinomial draws one
sample. Only a seeded row's noise comes from its own generator (one launch per
seeded row), so a seeded row's token depends on its own logits row and step seed
alone, and is the token the former one-row-at-a-time sampler drew
(tests/helpers/per_row_sampler.py). The noise needs no logits: on a GPU it is
drawn on a side stream, under the forward that makes them.

Ranking is one `torch.topk` of the logits in their own dtype, as wide as the
batch's widest top_k plus a margin for ties. When every random row has a top_k
(the common case), the softmax input is built in one pass from the logits and the
window's k-th and last values (the full-row path's input, bit for bit); top-p then
cuts inside the window, ranked by one counting sort. A batch with a row without
top-k scales whole rows; only top-p without top-k sorts them. Either way one softmax
and one draw read whole rows. The passes that read whole rows or rank a window are
Triton kernels on a GPU (kernels/sampling.py, each with its torch twin): at decode,
a sampled step's cost over a greedy one is mostly a count of launches.
Nothing here waits for the device: the result stays on it, and a row that cannot
be sampled (logits not finite, every token banned) gets FAILED (-1) instead of
failing the batch.
"""

import contextlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from multilora_kernels.sampling import argmax_probs_over_noise, rank_window, window_softmax_input

from multilora.sampling_params import SamplingParams

FAILED = -1                                # the token id of a row that could not be sampled
_MASK64 = (1 << 64) - 1
_F32 = np.finfo(np.float32)
_WINDOW_LIMIT = 1024                       # a larger top_k ranks the whole vocabulary (one sort)
# The window ranks this many logits past the widest top_k, so that the ids tied with a row's
# k-th value (bf16 logits tie often) lie in it. Ties past the margin (a near-constant row)
# are kept whatever top-p says: the one case that differs from a sort.
_TIE_MARGIN = 256


@dataclass
class SampleRow:
    """What the sampler needs to know about one row of the logits.

    `step_seed` comes from `derive_step_seed(request seed, tokens generated so
    far)`, so a seeded request draws the same tokens whatever shares its batch
    and across preemption; None draws from torch's default generator.
    `banned_token_ids` can never be picked (EOS while output < min_tokens).
    """

    params: SamplingParams
    step_seed: Optional[int]
    banned_token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SamplingTensors:
    """One step's sampling parameters, on the logits' device, built by `SamplingTensors.build`.

    Per-row tensors hold one entry per *random* row (not greedy), in batch order;
    `random_rows` maps them to batch rows (None: every row is random).
    """

    num_rows: int
    random_rows: Optional[torch.Tensor]    # int64 [M]
    top_k: torch.Tensor                    # int64 [M]; 0 = no top-k
    kth_index: torch.Tensor                # int64 [M, 1]: max(top_k - 1, 0), the k-th value's place in the ranking
    scale: torch.Tensor                    # float32 [M]: temperature (CPU) or its reciprocal (CUDA), see _scale
    top_p: torch.Tensor                    # float32 [M]; inf = no top-p
    banned: Optional[torch.Tensor]         # int64 [2, P]: (batch row, token id) pairs that can never be picked
    seeds: tuple[tuple[int, int], ...]     # (random row, step seed) of the seeded rows
    window: int                            # logits ranked per random row (one topk): 0 = none, vocab size = a sort
    in_window: bool                        # every random row has a top_k within the limit: only the window is cut
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
        random, top_k, temperature, top_p, seeds = [], [], [], [], []
        for i, row in enumerate(rows):
            params = row.params
            if params.greedy:
                continue    # greedy includes temperatures that underflow float32 (they would divide by zero)
            if row.step_seed is not None:
                seeds.append((len(random), row.step_seed))
            random.append(i)
            top_k.append(params.top_k if 0 < params.top_k < vocab_size else 0)
            temperature.append(params.temperature)
            top_p.append(params.top_p if params.top_p < 1.0 else float("inf"))
        banned = [(i, t) for i, row in enumerate(rows) for t in row.banned_token_ids]
        assert all(0 <= t < vocab_size for _, t in banned), f"banned id outside vocab of {vocab_size}"
        all_random = len(random) == len(rows)
        kth_index = [max(k - 1, 0) for k in top_k]
        # numpy turns lists into arrays about twice as fast as torch.tensor does
        ints = torch.from_numpy(np.array(top_k + kth_index + ([] if all_random else random)
                                         + [i for i, _ in banned] + [t for _, t in banned], dtype=np.int64))
        floats = torch.from_numpy(np.concatenate((_scales(temperature, device.type), np.array(top_p, np.float32))))
        ints, floats = ints.to(device, non_blocking=True), floats.to(device, non_blocking=True)
        m = len(random)
        in_window = bool(top_k) and all(0 < k <= _WINDOW_LIMIT for k in top_k)
        use_top_p = any(p != float("inf") for p in top_p)
        # top-p of a row without top-k (or past the window limit) ranks whole rows
        sorts_rows = any(p != float("inf") and (k == 0 or k > _WINDOW_LIMIT) for k, p in zip(top_k, top_p))
        return cls(num_rows=len(rows), random_rows=None if all_random else ints[2 * m:3 * m],
                   top_k=ints[:m], kth_index=ints[m:2 * m].view(m, 1), scale=floats[:m], top_p=floats[m:],
                   banned=ints[len(ints) - 2 * len(banned):].view(2, -1) if banned else None, seeds=tuple(seeds),
                   window=_window(top_k, in_window or (use_top_p and not sorts_rows), vocab_size),
                   in_window=in_window, use_top_k=any(top_k), use_top_p=use_top_p, top_p_sorts_rows=sorts_rows)


def _scales(temperatures: list[float], device_type: str) -> np.ndarray:
    """The float32 values that reproduce the per-row sampler's `x / temperature` bit for bit.

    torch divides a CUDA tensor by a Python number as x * (1 / float32(t)) (its
    reciprocal in float32), and a CPU tensor by true division; the sampler
    multiplies on CUDA and divides on the CPU by these values. A temperature past
    float32's range is clamped there, where it is already as flat as float32 gets.
    """
    t = np.minimum(np.array(temperatures, dtype=np.float64), float(_F32.max)).astype(np.float32)
    return np.float32(1.0) / t if device_type == "cuda" else t


def _window(top_k: list[int], with_ties: bool, vocab_size: int) -> int:
    """How many logits of each random row one topk ranks (0: none; vocab_size: a sort instead).

    Enough for the widest top_k's k-th logit and, `with_ties` (the window holds the rows'
    kept sets: sampled in the window, or cut there by top-p), for those sets and their ties.
    """
    widest = max(top_k, default=0)
    if widest > _WINDOW_LIMIT:
        return vocab_size
    return min(widest + _TIE_MARGIN if with_ties else widest, vocab_size)


class Sampler:
    """Samples a step's rows: greedy rows by one argmax, random rows by one batched draw."""

    def __init__(self):
        self._generators: dict[torch.device, torch.Generator] = {}
        self._side_streams: dict[torch.device, torch.cuda.Stream] = {}

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        """logits [N, V] (any float dtype, any device) -> token ids, int64 [N] on the same device,
        FAILED (-1) for a row whose logits are not finite or whose tokens are all banned."""
        assert logits.dim() == 2 and logits.shape[0] == len(rows), (tuple(logits.shape), len(rows))
        return self.sample(logits, SamplingTensors.build(rows, logits.shape[1], logits.device))

    def sample(self, logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
        """As __call__, with the rows already packed (so a caller can build them ahead of the step)."""
        assert logits.dim() == 2 and logits.shape[0] == params.num_rows, (tuple(logits.shape), params.num_rows)
        if params.num_random:      # first: it needs no logits
            noise, drawn = self._noise(params, logits.shape[1], logits.device)
        low, high = torch.aminmax(logits, dim=-1)
        # Finite rows (NaN fails both compares): three launches, where isfinite takes four a call.
        valid = (low > float("-inf")) & (high < float("inf"))
        if params.banned is not None:
            minus_inf = torch.full(params.banned[0].shape, float("-inf"), dtype=logits.dtype, device=logits.device)
            logits = logits.index_put((params.banned[0], params.banned[1]), minus_inf)
        if params.num_random == params.num_rows > 0 and params.banned is None:
            best = high     # every row is drawn and nothing banned: no argmax, aminmax has the row max
        else:
            # torch.max breaks ties towards the lowest id; casting bf16/fp16 to
            # float32 is exact, so the native dtype gives the ids float32 would.
            best, token_ids = logits.max(dim=-1)
            if params.banned is not None:
                valid &= best > float("-inf")      # finite logits, yet every token banned
        if params.num_random:
            rows = params.random_rows
            probs = _probabilities(logits if rows is None else logits.index_select(0, rows),
                                   best if rows is None else best.index_select(0, rows), params)
            picked = argmax_probs_over_noise(probs, _ready(noise, drawn))
            token_ids = picked if rows is None else token_ids.index_copy(0, rows, picked)
        return torch.where(valid, token_ids, FAILED)

    def _noise(self, params: SamplingTensors, vocab_size: int,
               device: torch.device) -> tuple[torch.Tensor, Optional[torch.cuda.Event]]:
        """Exp(1) noise [M, V] for the random rows: a seeded row's from a generator reset to its step
        seed (the per-row sampler's draw, one launch per row), the rest from torch's default one.

        It needs no logits, so on a GPU it is drawn on a side stream, while the forward that makes
        them still runs; the event says when it is drawn (None: on the caller's stream already).
        """
        side = self._side_stream(device)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            noise = torch.empty(params.num_random, vocab_size, dtype=torch.float32, device=device)
            if len(params.seeds) < params.num_random:
                noise.exponential_()
            if params.seeds:
                generator = self._generator(device)
                for row, seed in params.seeds:
                    noise[row].exponential_(generator=generator.manual_seed(seed))
        return noise, None if side is None else side.record_event()

    def _generator(self, device: torch.device) -> torch.Generator:
        # manual_seed resets a generator completely, so one per device serves every seeded row.
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def _side_stream(self, device: torch.device) -> Optional[torch.cuda.Stream]:
        if device.type != "cuda":
            return None
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device=device)
        return self._side_streams[device]


def _ready(noise: torch.Tensor, drawn: Optional[torch.cuda.Event]) -> torch.Tensor:
    """`noise`, once the caller's stream has waited for the side stream that draws it."""
    if drawn is not None:
        stream = torch.cuda.current_stream(noise.device)
        stream.wait_event(drawn)
        noise.record_stream(stream)     # allocated on the side stream, last used on this one
    return noise


def _probabilities(logits: torch.Tensor, best: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """The random rows' probabilities [M, V]: temperature, then top-k, then top-p, in float32."""
    ranked = _ranked(logits, params.window) if params.window else None
    if params.in_window:
        x = _kept_from_window(logits, best, ranked, params)
    else:
        x = _kept_over_rows(logits, best, ranked, params)
    probs = torch.softmax(x, dim=-1)
    if params.use_top_p:
        _keep_top_p(probs, None if params.top_p_sorts_rows else ranked.indices, params.top_p)
    return probs


def _kept_over_rows(logits: torch.Tensor, best: torch.Tensor, ranked, params: SamplingTensors) -> torch.Tensor:
    """The rows' scaled logits [M, V], -inf where top-k drops them (rows without top-k keep all)."""
    x = _scaled(logits, best, params)
    if not params.use_top_k:
        return x
    kth = _scaled(ranked.values.gather(1, params.kth_index), best, params)
    kth = torch.where(params.top_k[:, None] > 0, kth, float("-inf"))
    return torch.where(x >= kth, x, float("-inf"))      # ties with the k-th all stay


def _kept_from_window(logits: torch.Tensor, best: torch.Tensor, ranked, params: SamplingTensors) -> torch.Tensor:
    """_kept_over_rows, bit for bit, in one pass over the logits, for rows that each have a top_k.

    A row's kept ids are its top_k and their ties, so the window holds them all, except in a
    near-constant row whose window ends inside the k-th value's ties: those past it share the
    window's last logit and get the k-th value too (see window_softmax_input). (The one miss: ids
    past such a window whose logits are lower yet scale to the same float32, which takes a row
    max 2^15 times their size.)
    """
    return window_softmax_input(logits, best, ranked.values, params.kth_index, params.scale)


def _ranked(logits: torch.Tensor, window: int):
    """The `window` largest logits of each row and their ids, descending (the native dtype orders
    them as float32 would: casting bf16/fp16 to float32 is exact)."""
    return logits.topk(window) if window < logits.shape[1] else logits.sort(dim=1, descending=True)


def _scaled(logits: torch.Tensor, best: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """(logits - the row's max) / temperature in float32, as the per-row sampler computes it (subtracting
    the max first, a tiny temperature cannot overflow). A non-decreasing map of each row's logits, so the
    k-th largest scaled value is the scaled k-th largest logit."""
    x = logits - best.float()[:, None]
    return x.mul_(params.scale[:, None]) if x.device.type == "cuda" else x.div_(params.scale[:, None])


def _keep_top_p(probs: torch.Tensor, candidates: Optional[torch.Tensor], top_p: torch.Tensor) -> None:
    """Zeroes, in place, all but each row's smallest most-likely set whose mass reaches top_p
    (the top id always stays), cut as a stable descending sort of the whole row would cut it.

    `candidates` [M, W]: each row's W largest logits' ids, which hold every id its top-k
    kept (see _TIE_MARGIN); None ranks whole rows. Ordered by probability, then by id (as a
    stable sort orders equal probabilities), they are that sort's first W places.
    """
    if candidates is None or candidates.shape[1] == probs.shape[1]:
        # whole rows (a "window" of every id, which a top_k past _WINDOW_LIMIT takes, is one)
        ranked, ids = probs.sort(dim=1, descending=True, stable=True)
    else:
        ranked, ids = rank_window(probs, candidates)     # at most _WINDOW_LIMIT + _TIE_MARGIN ids
    # A place is dropped once the mass ranked above it reaches top_p; place 0 (none above) stays.
    mass = torch.cumsum(ranked, dim=1)
    ranked[:, 1:].masked_fill_(mass[:, :-1] >= top_p[:, None], 0.0)
    probs.scatter_(1, ids, ranked)


def derive_step_seed(seed: int, position: int) -> int:
    """A 63-bit seed for drawing output token `position` of a request seeded with `seed`.

    Deterministic and well mixed (splitmix64 applied twice), so nearby seeds and
    positions give unrelated generator streams.
    """
    assert 0 <= seed <= _MASK64 and position >= 0, (seed, position)
    return _splitmix64(_splitmix64(seed) ^ position) >> 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)
