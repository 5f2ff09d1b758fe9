"""Property test of the sampler: random logits (NaN/Inf rows included), random valid SamplingParams.

It never raises; a row gets -1 exactly when its logits are not all finite or every token
is banned; any other row gets an allowed id, the argmax for greedy rows, and the per-row
sampler's id for seeded rows wherever that one was defined (values inside float32's range).
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.per_row_sampler import PerRowSampler
from multilora.sampler import FAILED, SampleRow, Sampler
from multilora.sampling_params import SamplingParams

F32_TINY, F32_MAX = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
POISON = [float("nan"), float("inf"), float("-inf")]

temperatures = st.one_of(st.just(0.0), st.sampled_from([1e-300, 1e-40, 1e-30, 1e-6, 1e300, 1e38, 1e39]),
                         st.floats(min_value=0.0, max_value=10.0))
top_ps = st.one_of(st.just(1.0), st.floats(min_value=0.0, max_value=1.0, exclude_min=True))


@st.composite
def batches(draw):
    vocab = draw(st.integers(1, 40))
    num_rows = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32)))
    logits = {"spread": lambda: torch.randn(num_rows, vocab, generator=gen) * 10,
              "ties": lambda: torch.randint(-2, 3, (num_rows, vocab), generator=gen).float(),   # ties: cut by id
              "flat": lambda: torch.zeros(num_rows, vocab)}[draw(st.sampled_from(["spread", "ties", "flat"]))]()
    for _ in range(draw(st.integers(0, 3))):    # some rows get a non-finite value
        logits[draw(st.integers(0, num_rows - 1)), draw(st.integers(0, vocab - 1))] = draw(st.sampled_from(POISON))
    rows = []
    for _ in range(num_rows):
        params = SamplingParams(temperature=draw(temperatures), top_p=draw(top_ps),
                                top_k=draw(st.integers(-1, vocab + 2)))
        seed = draw(st.one_of(st.none(), st.integers(0, 2**63 - 1)))
        banned = tuple(draw(st.lists(st.integers(0, vocab - 1), max_size=vocab, unique=True)))
        rows.append(SampleRow(params, seed, banned))
    return logits.to(dtype), rows


def greedy(row: SampleRow) -> bool:
    return row.params.greedy or row.params.temperature < F32_TINY


def per_row_defined(row: SampleRow) -> bool:
    """The per-row sampler computed in float32 what a seeded row got: not for values outside float32's
    range (it divided by 0 or inf, or cut top-p at 0, and raised or drew from a degenerate row)."""
    p = row.params
    in_range = p.greedy or F32_TINY <= p.temperature <= F32_MAX
    return row.step_seed is not None and in_range and torch.tensor(p.top_p, dtype=torch.float32) > 0


@settings(max_examples=200, deadline=None, database=None, derandomize=True)
@given(batches())
def test_sampler_never_raises_and_fails_exactly_the_invalid_rows(batch):
    logits, rows = batch
    ids = Sampler()(logits, rows)
    assert ids.dtype == torch.int64 and ids.shape == (len(rows),)
    for i, (token, row) in enumerate(zip(ids.tolist(), rows)):
        allowed = [t for t in range(logits.shape[1]) if t not in row.banned_token_ids]
        if not logits[i].isfinite().all() or not allowed:
            assert token == FAILED
            continue
        assert token in allowed
        masked = logits[i].float().clone()
        masked[list(row.banned_token_ids)] = -math.inf
        if greedy(row):
            assert token == int(masked.argmax())
        if per_row_defined(row):
            assert token == PerRowSampler()(logits[i:i + 1], [row])[0]
