"""Sampler on tiny vocabularies: greedy, seeded draws, temperature, top-k, top-p, bans, failed rows.

`sample` turns the sampler's device tensor into a list; the former per-row sampler
(helpers/per_row_sampler.py) is the reference every seeded draw must match.
"""

import math
import random

import pytest
import torch

from helpers.per_row_sampler import PerRowSampler
from multilora.sampler import FAILED, SampleRow, Sampler, SamplingTensors, derive_step_seed
from multilora.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
RANDOM = SamplingParams(temperature=1.0)
PROBS = [0.5, 0.3, 0.15, 0.05]  # a tiny vocab with known probabilities


def sample(logits, rows):
    ids = Sampler()(logits, rows)
    assert ids.dtype == torch.int64 and ids.shape == (len(rows),) and ids.device == logits.device
    return ids.tolist()


def logits_of(probs):
    return torch.tensor([math.log(p) for p in probs])


def draw_many(params, probs=PROBS, n=1000, banned=()):
    """Token counts over n seeded draws of one row, batched n at a time."""
    logits = logits_of(probs).repeat(n, 1)
    rows = [SampleRow(params, step_seed=derive_step_seed(seed, 0), banned_token_ids=banned) for seed in range(n)]
    ids = sample(logits, rows)
    return [ids.count(t) for t in range(len(probs))]


def assert_frequencies(counts, expected):
    n = sum(counts)
    for count, p in zip(counts, expected):
        sigma = math.sqrt(n * p * (1 - p)) + 1e-9
        assert abs(count - n * p) <= 4 * sigma + 1, (counts, expected)


# --- greedy ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_greedy_batch_is_argmax(dtype):
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0)).to(dtype)
    ids = sample(logits, [SampleRow(GREEDY, None)] * 5)
    assert ids == torch.argmax(logits.float(), dim=-1).tolist()
    assert all(type(i) is int for i in ids)


def test_greedy_ties_go_to_the_lowest_id():
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [2.0, 2.0, 2.0, 2.0]])
    assert sample(logits, [SampleRow(GREEDY, None)] * 2) == [1, 0]


def test_top_k_1_is_greedy_even_with_temperature():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(1))
    rows = [SampleRow(SamplingParams(temperature=2.0, top_k=1), step_seed=s) for s in range(8)]
    assert sample(logits, rows) == torch.argmax(logits, dim=-1).tolist()


def test_greedy_and_random_rows_mixed():
    logits = logits_of(PROBS).repeat(3, 1)
    logits[0] = torch.tensor([0.0, 0.0, 9.0, 0.0])
    rows = [SampleRow(GREEDY, None), SampleRow(RANDOM, 7), SampleRow(GREEDY, None)]
    ids = sample(logits, rows)
    assert ids[0] == 2 and ids[2] == 0
    assert ids[1] == sample(logits[1:2], [rows[1]])[0]


def test_empty_batch():
    assert sample(torch.empty(0, 10), []) == []


# --- seeds -------------------------------------------------------------------


def test_seeded_row_ignores_the_rest_of_the_batch():
    gen = torch.Generator().manual_seed(2)
    target_logits = torch.randn(64, generator=gen)
    others = torch.randn(5, 64, generator=gen)
    rng = random.Random(0)
    picks = set()
    for seed in range(20):
        target = SampleRow(SamplingParams(temperature=1.5, top_p=0.95), step_seed=derive_step_seed(seed, 3))
        alone = sample(target_logits[None], [target])[0]
        picks.add(alone)
        other_rows = [SampleRow(RANDOM, None), SampleRow(GREEDY, None), SampleRow(RANDOM, 123)]
        other_rows += [SampleRow(SamplingParams(top_k=3), None), SampleRow(RANDOM, None, (0, 1))]
        batch = [(target_logits, target)] + list(zip(others, other_rows))
        for _ in range(3):
            rng.shuffle(batch)
            ids = sample(torch.stack([l for l, _ in batch]), [r for _, r in batch])
            assert ids[[r for _, r in batch].index(target)] == alone
    assert len(picks) > 3  # the seeds really draw different tokens


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_logits_sample_what_their_float32_cast_samples(dtype):
    """The model hands the sampler its logits in the model's dtype (LlamaForCausalLM.compute_logits), not
    a float32 copy: every row, greedy or seeded with any cut, draws the token its float32 cast draws."""
    gen = torch.Generator().manual_seed(5)
    logits = (3 * torch.randn(8, 300, generator=gen)).to(dtype)
    logits[0, 7] = logits[0, 9] = logits[0].max() + 1     # a greedy tie
    params = [GREEDY, GREEDY, SamplingParams(temperature=0.8, top_p=0.9, top_k=50), SamplingParams(top_k=5),
              SamplingParams(temperature=1.3, top_p=0.5), RANDOM, SamplingParams(temperature=0.8, top_p=0.9, top_k=50),
              SamplingParams(temperature=0.2)]
    for step in range(5):
        rows = [SampleRow(p, step_seed=None if i < 2 else derive_step_seed(i, step)) for i, p in enumerate(params)]
        assert sample(logits, rows) == sample(logits.float(), rows)
    assert sample(logits, rows)[0] == 7


def test_unseeded_rows_vary():
    logits = torch.zeros(200, 10)
    ids = sample(logits, [SampleRow(RANDOM, None)] * 200)
    assert len(set(ids)) > 5


def test_derive_step_seed():
    seeds = {derive_step_seed(s, p) for s in (0, 1, 2**64 - 1) for p in range(50)}
    assert len(seeds) == 150
    assert all(0 <= s < 2**63 for s in seeds)
    assert derive_step_seed(42, 7) == derive_step_seed(42, 7)


# --- temperature, top-k, top-p -----------------------------------------------


def test_temperature_one_follows_the_distribution():
    assert_frequencies(draw_many(RANDOM), PROBS)


def test_temperature_sharpens_and_flattens():
    for t in (0.5, 2.0):
        powered = [p ** (1 / t) for p in PROBS]
        assert_frequencies(draw_many(SamplingParams(temperature=t)), [p / sum(powered) for p in powered])


def test_tiny_temperature_does_not_overflow():
    logits = torch.tensor([[1000.0, 999.0, -1000.0]])
    assert sample(logits, [SampleRow(SamplingParams(temperature=1e-6), 5)]) == [0]


@pytest.mark.parametrize(
    "top_p, kept",
    [(0.45, [0]), (0.7, [0, 1]), (0.85, [0, 1, 2]), (0.99, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3])],
)
def test_top_p_keeps_the_smallest_set_reaching_the_mass(top_p, kept):
    counts = draw_many(SamplingParams(top_p=top_p))
    mass = sum(PROBS[i] for i in kept)
    assert_frequencies(counts, [PROBS[i] / mass if i in kept else 0.0 for i in range(len(PROBS))])


def test_top_k_keeps_the_k_most_likely():
    counts = draw_many(SamplingParams(top_k=2))
    assert_frequencies(counts, [0.5 / 0.8, 0.3 / 0.8, 0, 0])


@pytest.mark.parametrize("top_k", [0, -1, 4, 100])
def test_top_k_off_or_at_least_vocab_keeps_all(top_k):
    assert_frequencies(draw_many(SamplingParams(top_k=top_k)), PROBS)


def test_top_k_applies_before_top_p():
    # After top-k=2 the probabilities are 0.625/0.375, so top-p=0.6 keeps only
    # id 0; top-p on the full distribution would have kept ids 0 and 1.
    assert draw_many(SamplingParams(top_k=2, top_p=0.6), n=300) == [300, 0, 0, 0]


def test_top_p_with_equal_probabilities_cuts_by_id():
    counts = draw_many(SamplingParams(top_p=0.5), probs=[0.25] * 4, n=400)
    assert counts[2:] == [0, 0] and min(counts[:2]) > 100


# --- bans --------------------------------------------------------------------


def test_banned_ids_are_never_sampled():
    counts = draw_many(RANDOM, banned=(0, 2), n=500)
    assert counts[0] == 0 and counts[2] == 0
    assert_frequencies(counts, [0, 0.3 / 0.35, 0, 0.05 / 0.35])


def test_banned_argmax_falls_to_the_next_best_and_input_is_untouched():
    logits = torch.tensor([[0.0, 5.0, 4.0], [0.0, 5.0, 4.0]])
    before = logits.clone()
    rows = [SampleRow(GREEDY, None, banned_token_ids=(1,)), SampleRow(GREEDY, None)]
    assert sample(logits, rows) == [2, 1]
    assert torch.equal(logits, before)


def test_banned_with_top_k():
    counts = draw_many(SamplingParams(top_k=1, temperature=1.0), banned=(0,), n=50)
    assert counts == [0, 50, 0, 0]


# --- the same draws as the per-row sampler ------------------------------------


def random_case(rng: random.Random, vocab: int, num_rows: int, kind: str):
    """Logits of one kind (ties are what top-k/top-p cuts must order by id) and mixed rows."""
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    logits = {"randn": lambda: torch.randn(num_rows, vocab, generator=gen) * rng.choice([0.1, 1.0, 8.0]),
              "ties": lambda: torch.randint(0, 40, (num_rows, vocab), generator=gen).float() / 4,
              "flat": lambda: torch.zeros(num_rows, vocab)}[kind]()
    rows = []
    for i in range(num_rows):
        params = SamplingParams(temperature=rng.choice([0.0, 0.5, 0.8, 1.0, 2.0]),
                                top_k=rng.choice([0, -1, 1, 2, 5, 50, vocab, 2000]),
                                top_p=rng.choice([1.0, 0.999, 0.9, 0.5, 0.3]))
        banned = tuple(rng.sample(range(vocab), rng.randint(0, 2)))
        rows.append(SampleRow(params, derive_step_seed(rng.randrange(1000), i), banned))
    return logits, rows


@pytest.mark.parametrize("kind", ["randn", "ties", "flat"])
@pytest.mark.parametrize("vocab", [7, 300, 1500])
def test_seeded_draws_match_the_per_row_sampler(kind, vocab):
    rng = random.Random(f"{kind}-{vocab}")
    for _ in range(12):
        logits, rows = random_case(rng, vocab, rng.randint(1, 8), kind)
        assert sample(logits, rows) == PerRowSampler()(logits, rows), [r.params for r in rows]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_match_the_per_row_sampler(dtype):
    rng = random.Random(3)
    for _ in range(8):
        logits, rows = random_case(rng, 500, 6, "randn")
        logits = logits.to(dtype)              # bf16 logits tie often: the top-k window's edge case
        assert sample(logits, rows) == PerRowSampler()(logits, rows)


def packed(*rows):
    return SamplingTensors.build(list(rows), 3000, torch.device("cpu"))


def test_one_ranking_sized_by_the_widest_top_k():
    assert packed(SampleRow(RANDOM, 1), SampleRow(GREEDY, None)).window == 0        # nothing to rank
    mixed = packed(SampleRow(SamplingParams(top_k=40), 1), SampleRow(GREEDY, None, (1,)),
                   SampleRow(SamplingParams(top_k=3, top_p=0.5), None))
    assert (mixed.window, mixed.use_top_k, mixed.use_top_p, mixed.seeds) == (40 + 256, True, True, ((0, 1),))
    top_k_alone = packed(SampleRow(SamplingParams(top_k=40), 1))                  # sampled in the window: its ties
    assert (top_k_alone.window, top_k_alone.in_window, mixed.in_window) == (40 + 256, True, True)
    assert top_k_alone.kth_index.tolist() == [[39]] and mixed.kth_index.tolist() == [[39], [2]]
    assert mixed.random_rows.tolist() == [0, 2] and mixed.top_k.tolist() == [40, 3]
    assert mixed.banned.tolist() == [[1], [1]]
    assert packed(SampleRow(SamplingParams(top_k=2000), 1)).window == 3000      # past the window limit: a sort
    top_p_alone = packed(SampleRow(SamplingParams(top_p=0.9), None), SampleRow(SamplingParams(top_k=5), None))
    assert (top_p_alone.window, top_p_alone.top_p_sorts_rows, top_p_alone.in_window) == (5, True, False)  # sorts rows
    assert top_p_alone.random_rows is None and not mixed.top_p_sorts_rows


def test_top_p_ignores_ties_past_the_margin_of_a_near_constant_row():
    """The one place the window differs from a sort: > 256 ids tied with the k-th logit all stay,
    whatever top-p says (a sort would keep the lowest ids of the tie)."""
    logits = torch.zeros(400, 2000)
    logits[:, 0] = 1.0
    rows = [SampleRow(SamplingParams(top_k=5, top_p=0.5), s) for s in range(400)]
    ids = sample(logits, rows)
    assert max(ids) >= 1000                      # a sort would have kept only ids < 1000
    assert ids.count(0) < 20                     # id 0 is about 1 / (1 + 1999 / e) of the mass


def test_packed_rows_sample_like_the_rows():
    rng = random.Random(5)
    logits, rows = random_case(rng, 200, 6, "randn")
    packed = SamplingTensors.build(rows, 200, logits.device)
    assert Sampler().sample(logits, packed).tolist() == sample(logits, rows)


def test_no_host_sync_inside_the_sampler(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the sampler waited for the device")

    rng = random.Random(6)
    logits, rows = random_case(rng, 300, 8, "ties")
    logits[2] = float("nan")
    packed = SamplingTensors.build(rows, 300, logits.device)
    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    ids = Sampler().sample(logits, packed)
    monkeypatch.undo()
    assert ids.tolist()[2] == FAILED


# --- rows that cannot be sampled fail alone -----------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("params", [GREEDY, RANDOM, SamplingParams(temperature=0.7, top_k=5, top_p=0.8)])
def test_a_non_finite_row_fails_alone(bad, params):
    rng = random.Random(7)
    logits, rows = random_case(rng, 100, 5, "randn")
    clean = sample(logits, rows)
    logits[3, 17] = bad
    rows[3] = SampleRow(params, 9)
    ids = sample(logits, rows)
    assert ids[3] == FAILED
    assert ids[:3] + ids[4:] == clean[:3] + clean[4:]


def test_a_row_with_every_token_banned_fails_alone():
    logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(8))
    everything = (0, 1, 2)
    rows = [SampleRow(RANDOM, 1, everything), SampleRow(GREEDY, None, everything), SampleRow(GREEDY, None)]
    assert sample(logits, rows) == [FAILED, FAILED, int(logits[2].argmax())]


def test_temperature_that_underflows_float32_is_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, 4.0, 4.5]])
    rows = [SampleRow(SamplingParams(temperature=1e-300), 1), SampleRow(SamplingParams(temperature=1e-40), None)]
    assert sample(logits, rows) == [1, 0]


def test_huge_temperature_still_samples_and_never_picks_a_banned_id():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]]).repeat(300, 1)
    rows = [SampleRow(SamplingParams(temperature=1e300), s, banned_token_ids=(1,)) for s in range(300)]
    ids = sample(logits, rows)
    assert set(ids) == {0, 2, 3}                 # flat over the allowed ids


# --- on a GPU ----------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_seeded_rows_match_the_per_row_sampler_without_a_sync():
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(64, 128256, device="cuda", generator=gen) * 2.5).bfloat16()
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50)
    rows = [SampleRow(params, derive_step_seed(i, 3) if i % 2 == 0 else None, (2,) if i % 3 == 0 else ())
            for i in range(64)]
    rows[5] = SampleRow(GREEDY, None)
    logits[7, 11] = float("nan")
    packed = SamplingTensors.build(rows, logits.shape[1], logits.device)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids = Sampler().sample(logits, packed)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    ids = ids.tolist()
    assert ids[7] == FAILED and ids[5] == int(logits[5].argmax())
    clean = [i for i in range(64) if i != 7 and rows[i].step_seed is not None]
    reference = PerRowSampler()(logits[clean], [rows[i] for i in clean])
    assert [ids[i] for i in clean] == reference
