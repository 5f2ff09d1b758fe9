"""The sampler against the one it replaced (helpers/previous_sampler.py): the same tokens for every
seeded and greedy row, the same failed rows, and the same law for unseeded rows.

Batches whose random rows all have a top_k take the window path (only the window scaled, the
softmax input rebuilt from it); the rest scale whole rows as before. Both are checked on logits
that tie the way bf16 logits do, on flat and near-constant rows (whose k-th value's ties run past
the window), with greedy rows, bans, top_k of 1 and past the vocabulary, top_p of 1, NaN rows.
"""

import math
import random

import numpy as np
import pytest
import torch

from helpers import previous_sampler
from helpers.interpreted_sampling import use_interpreted_sampling_kernels
from helpers.previous_sampler import PreviousSampler
from multilora.sampler import (
    FAILED, SampleRow, Sampler, SamplingTensors, _kept_from_window, _kept_over_rows, _ranked, _scales, derive_step_seed,
)
from multilora.sampling_params import SamplingParams

KINDS = ["randn", "ties", "few_values", "flat"]


def make_logits(rng: random.Random, kind: str, num_rows: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    if kind == "randn":
        return torch.randn(num_rows, vocab, generator=gen) * rng.choice([0.1, 1.0, 2.5, 8.0]) + rng.choice([0, 5])
    if kind == "ties":             # a few dozen ids share each value
        return torch.randint(0, 40, (num_rows, vocab), generator=gen).float() / 4
    if kind == "few_values":       # near-constant: hundreds of ids share the k-th value
        return torch.randint(0, 3, (num_rows, vocab), generator=gen).float()
    return torch.zeros(num_rows, vocab)


def make_rows(rng: random.Random, num_rows: int, vocab: int, all_top_k: bool) -> list[SampleRow]:
    """Mixed rows; with all_top_k every random row has a top_k below the vocabulary (the window path)."""
    rows = []
    for i in range(num_rows):
        ks = [1, 2, 5, 50, 300, 1000] if all_top_k else [0, -1, 1, 5, 50, vocab, vocab + 5, 2000]
        params = SamplingParams(temperature=rng.choice([0.0, 0.3, 0.8, 1.0, 1.7]),
                                top_k=max(1, min(rng.choice(ks), vocab - 1)) if all_top_k else rng.choice(ks),
                                top_p=rng.choice([1.0, 0.999, 0.9, 0.5, 0.1]))
        seed = derive_step_seed(rng.randrange(10**6), i) if rng.random() < 0.8 else None
        banned = tuple(rng.sample(range(vocab), rng.choice([0, 0, 1, 2])))
        rows.append(SampleRow(params, seed, banned))
    return rows


def top_p_cuts_ties_past_the_window(logits: torch.Tensor, row: SampleRow, window: int) -> bool:
    """The one case both samplers leave to torch.topk's pick among ties (see _TIE_MARGIN): top-p
    cutting a row whose k-th logit ties with ids past the window. Which of them the window holds
    may differ between a topk of the logits and one of their scaled float32 values."""
    vocab, params = logits.shape[0], row.params
    if params.greedy or params.top_p >= 1.0 or not 0 < params.top_k < vocab:
        return False
    x = logits.float()
    return int((x >= x.topk(params.top_k).values[-1]).sum()) > window


def assert_same_tokens(logits: torch.Tensor, rows: list[SampleRow]) -> int:
    """Asserts that the seeded and greedy rows draw the previous tokens; returns how many were compared."""
    got = Sampler()(logits, rows).tolist()
    want = PreviousSampler()(logits, rows).tolist()
    window = SamplingTensors.build(rows, logits.shape[1], logits.device).window
    compared = 0
    for i, row in enumerate(rows):
        if want[i] != FAILED and top_p_cuts_ties_past_the_window(logits[i], row, window):
            continue
        if row.params.greedy or row.step_seed is not None or want[i] == FAILED:
            assert got[i] == want[i], (i, row, got[i], want[i])
            compared += 1
        else:
            assert got[i] not in row.banned_token_ids
    return compared


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab", [3, 40, 300, 1500])
@pytest.mark.parametrize("all_top_k", [True, False], ids=["window", "whole_rows"])
def test_seeded_and_greedy_rows_draw_the_previous_tokens(kind, vocab, all_top_k):
    rng = random.Random(f"{kind}-{vocab}-{all_top_k}")
    compared = 0
    for _ in range(10):
        num_rows = rng.randint(1, 8)
        logits = make_logits(rng, kind, num_rows, vocab)
        rows = make_rows(rng, num_rows, vocab, all_top_k)
        if rng.random() < 0.2:
            logits[rng.randrange(num_rows), rng.randrange(vocab)] = float("nan")
        if all_top_k and any(not r.params.greedy for r in rows):
            assert SamplingTensors.build(rows, vocab, logits.device).in_window
        compared += assert_same_tokens(logits, rows)
    assert compared >= 20


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("all_top_k", [True, False], ids=["window", "whole_rows"])
def test_half_precision_logits_draw_the_previous_tokens(dtype, all_top_k):
    """bf16/fp16 logits tie often at the k-th value: the window path must keep every tie."""
    rng = random.Random(f"{dtype}-{all_top_k}")
    for _ in range(12):
        logits = make_logits(rng, rng.choice(["randn", "ties"]), 6, 2000).to(dtype)
        assert_same_tokens(logits, make_rows(rng, 6, 2000, all_top_k))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("all_top_k", [True, False])
def test_the_triton_kernels_draw_the_previous_tokens(monkeypatch, kind, all_top_k):
    """The CUDA path (kernels/sampling.py, interpreted on CPU) against the previous sampler: the window's
    softmax input, top-p's ranking and the draw, with greedy rows, bans, ties and near-constant rows."""
    use_interpreted_sampling_kernels(monkeypatch)
    rng = random.Random(f"triton-{kind}-{all_top_k}")
    compared = 0
    for _ in range(3):
        vocab = rng.choice([300, 5000])
        logits = make_logits(rng, kind, 6, vocab).to(rng.choice([torch.float32, torch.float16]))
        compared += assert_same_tokens(logits, make_rows(rng, 6, vocab, all_top_k))
    assert compared >= 6


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_rebuilds_the_whole_row_softmax_input_bit_for_bit(kind, dtype):
    """What makes the window path's probabilities the previous ones: the same softmax input, to the last bit."""
    rng = random.Random(f"rebuild-{kind}-{dtype}")
    for _ in range(10):
        vocab = rng.choice([50, 700, 3000])
        logits = make_logits(rng, kind, 5, vocab).to(dtype)
        top_ks = [k for k in (2, 3, 40, 500) if k < vocab]          # (top_k 1 is greedy)
        rows = [SampleRow(SamplingParams(temperature=rng.choice([0.3, 1.0, 1.7]), top_k=rng.choice(top_ks),
                                         top_p=rng.choice([1.0, 0.7])), None) for _ in range(5)]
        params = SamplingTensors.build(rows, vocab, logits.device)
        assert params.in_window and params.random_rows is None
        best = logits.max(dim=-1).values
        ranked = _ranked(logits, params.window)
        torch.testing.assert_close(_kept_from_window(logits, best, ranked, params),
                                   _kept_over_rows(logits, best, ranked, params), rtol=0, atol=0)


def test_ties_past_the_window_keep_their_probability():
    """Top-k 5 of a flat row keeps all 3000 ids (they all tie with the 5th), though the window holds 261."""
    logits = torch.zeros(500, 3000)
    rows = [SampleRow(SamplingParams(top_k=5), derive_step_seed(s, 0)) for s in range(500)]
    ids = Sampler()(logits, rows).tolist()
    assert ids == PreviousSampler()(logits, rows).tolist()
    assert sum(i >= 261 for i in ids) > 400


def test_unseeded_rows_follow_the_same_law():
    """Unseeded rows draw from other noise than before, from the same probabilities: top-k 3 of
    [2, 1, 1, 0, ...] at temperature 0.5 keeps ids 0-2, top-p 0.9 then drops none of them."""
    logits = torch.tensor([2.0, 1.0, 1.0, 0.0, -1.0, 0.5]).repeat(6000, 1)
    rows = [SampleRow(SamplingParams(temperature=0.5, top_k=3, top_p=0.9), None)] * 6000
    assert SamplingTensors.build(rows, 6, logits.device).in_window
    ids = Sampler()(logits, rows).tolist()
    weights = [math.exp(2 * v) for v in (2.0, 1.0, 1.0)]
    expected = [w / sum(weights) for w in weights] + [0.0, 0.0, 0.0]
    for token, p in enumerate(expected):
        count = ids.count(token)
        assert abs(count - 6000 * p) <= 4 * math.sqrt(6000 * p * (1 - p)) + 1, (token, count, p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("all_top_k", [True, False], ids=["window", "whole_rows"])
def test_cuda_seeded_rows_draw_the_previous_tokens(all_top_k):
    rng = random.Random(f"cuda-{all_top_k}")
    for kind in KINDS:
        logits = make_logits(rng, kind, 64, 128256).cuda().bfloat16()
        assert assert_same_tokens(logits, make_rows(rng, 64, 128256, all_top_k)) > 20


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_temperature_scales_are_the_previous_float32_values(device_type):
    """The scales (a temperature on the CPU, its float32 reciprocal on CUDA) are the previous ones, bit for bit."""
    rng = random.Random(9)
    temperatures = [1e-37, 1e-6, 0.1, 0.3, 0.5, 0.8, 1.0, 1.7, 3.0, 1e38, 3.5e38, 1e300]
    temperatures += [rng.uniform(1e-3, 10.0) for _ in range(200)]
    got = _scales(temperatures, device_type)
    want = np.array([previous_sampler._scale(t, device_type) for t in temperatures], dtype=np.float32)
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
