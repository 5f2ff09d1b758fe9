"""The kernels the sampler launches for issue 7's batch: a guard against slow paths creeping back.

On a busy GPU each launch costs its few microseconds plus a gap before the next, so the sampled
step's cost over a greedy one (bench/bench_sampler.py) is mostly a count of launches. The batch is
the issue's: every row at temperature 0.8, top_p 0.9, top_k 50, half of them seeded. Every aten op
that would launch a GPU kernel is counted by a TorchDispatchMode, and each Triton launch (the
kernels of kernels/sampling.py, interpreted on CPU) as one. The noise is left out: on a GPU it is
drawn on a side stream, under the forward.
"""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers.interpreted_sampling import use_interpreted_sampling_kernels
from multilora.sampler import SampleRow, Sampler, SamplingTensors, derive_step_seed
from multilora.sampling_params import SamplingParams
from multilora_kernels import _launch

# Greedy: aminmax, two compares and their and (the finite rows), the argmax, the final where.
GREEDY_BUDGET = 6
# The issue's batch: greedy's less the argmax, then the topk (one op here, a few kernels on a GPU),
# the softmax input, the softmax, top-p's ranking, mass, compare, cut and scatter, the draw, its
# pick of a block and the pick's id. Before these kernels it was 36 (sorts, scatters, full-row
# compares and wheres, a division and an argmax over whole rows).
SAMPLED_BUDGET = 16
_FREE = {"empty", "empty_like", "empty_strided", "detach", "lift_fresh", "_unsafe_view", "alias", "split",
         "split_with_sizes", "unbind", "chunk", "view", "_reshape_alias", "as_strided",
         "scalar_tensor"}   # a Python number made a 0-dim host tensor


class _KernelCounter(TorchDispatchMode):
    """Counts the aten ops that launch a kernel (composites such as isfinite count as the ops they
    run, as on a GPU), and each Triton launch as one (not the interpreter's own ops)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()
        self.in_triton_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in _FREE or self.in_triton_launch):
            self.counts[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def interpreted_kernels(monkeypatch):
    use_interpreted_sampling_kernels(monkeypatch)


def _count(monkeypatch, rows: list[SampleRow], vocab: int = 3000) -> Counter:
    logits = torch.randn(len(rows), vocab, generator=torch.Generator().manual_seed(0)) * 2.5
    sampler = Sampler()
    params = SamplingTensors.build(rows, vocab, logits.device)
    counter = _KernelCounter()
    real_launch = _launch.launch

    def counted_launch(kernel, grid, device, *args, **meta):
        counter.counts[f"triton.{kernel.fn.__name__}"] += 1
        counter.in_triton_launch = True
        try:
            real_launch(kernel, grid, device, *args, **meta)
        finally:
            counter.in_triton_launch = False

    monkeypatch.setattr(_launch, "launch", counted_launch)
    with counter:
        sampler.sample(logits, params)
    counter.counts.pop("aten.exponential_", None)      # the noise: a side stream's on a GPU
    return counter.counts


def test_greedy_batch_budget(interpreted_kernels, monkeypatch):
    counts = _count(monkeypatch, [SampleRow(SamplingParams(temperature=0.0), None)] * 8)
    assert sum(counts.values()) <= GREEDY_BUDGET, counts


def test_issue_batch_budget(interpreted_kernels, monkeypatch):
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50)
    rows = [SampleRow(params, derive_step_seed(i, 7) if i % 2 == 0 else None) for i in range(8)]
    counts = _count(monkeypatch, rows)
    assert counts["triton._window_softmax_input_kernel"] == counts["triton._rank_window_kernel"] == 1, counts
    assert counts["triton._block_argmax_kernel"] == 1 and "aten.sort" not in counts, counts
    assert sum(counts.values()) <= SAMPLED_BUDGET, counts


def test_a_window_of_the_whole_vocabulary_ranks_top_p_by_one_sort(interpreted_kernels, monkeypatch):
    """A top_k past the window limit ranks whole rows; rank_window (quadratic in its window) is not for them."""
    vocab = 3000
    rows = [SampleRow(SamplingParams(temperature=0.8, top_k=2000), 1),
            SampleRow(SamplingParams(temperature=0.8, top_k=50, top_p=0.9), 2)]
    assert SamplingTensors.build(rows, vocab, torch.device("cpu")).window == vocab
    counts = _count(monkeypatch, rows, vocab)
    assert "triton._rank_window_kernel" not in counts and counts["aten.sort"] == 2, counts
