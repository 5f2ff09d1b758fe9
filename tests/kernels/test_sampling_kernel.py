"""The sampler's draw kernel (kernels/sampling.py), interpreted on CPU, against its torch twin: the same
ids bit for bit, the lowest id among equal quotients (inside a block and across blocks), zeros' noise unread."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
INTERPRET_ENV = "MULTILORA_TRITON_INTERPRET_KERNELS"


@pytest.fixture(scope="module")
def sampling():
    saved = os.environ.get(INTERPRET_ENV)
    os.environ[INTERPRET_ENV] = "1"
    try:
        name = "_sampling_interpreted"
        spec = importlib.util.spec_from_file_location(name, KERNELS_DIR / "sampling.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        os.environ.pop(INTERPRET_ENV) if saved is None else os.environ.__setitem__(INTERPRET_ENV, saved)
    yield module
    sys.modules.pop("_sampling_interpreted", None)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv(INTERPRET_ENV, "1")


def _sparse_probs(gen: torch.Generator, rows: int, vocab: int, kept: int) -> torch.Tensor:
    """Softmax rows with `kept` ids of positive probability, the rest exactly 0 (as top-k leaves them)."""
    x = torch.full((rows, vocab), float("-inf"))
    for r in range(rows):
        ids = torch.randperm(vocab, generator=gen)[:kept]
        x[r, ids] = torch.randn(kept, generator=gen)
    return torch.softmax(x, dim=-1)


@pytest.mark.parametrize("rows,vocab,kept", [(3, 5000, 50), (2, 9000, 9000), (4, 4096, 1), (1, 17, 17)])
def test_draw_matches_the_twin(sampling, triton_on_cpu, rows, vocab, kept):
    gen = torch.Generator().manual_seed(vocab + kept)
    probs = _sparse_probs(gen, rows, vocab, kept)
    noise = torch.empty(rows, vocab).exponential_(generator=gen)
    got = sampling.argmax_probs_over_noise(probs, noise)
    assert got.dtype == torch.int64
    assert got.tolist() == sampling.argmax_probs_over_noise_ref(probs, noise).tolist()


def test_equal_quotients_go_to_the_lowest_id(sampling, triton_on_cpu):
    vocab = 3 * sampling._BLOCK + 5
    probs, noise = torch.zeros(3, vocab), torch.ones(3, vocab)
    probs[0, [9000, 4100, 12000]] = 0.25          # across blocks: 4100 (block 1) wins
    probs[1, [12290, 12289]] = 0.5                # inside the last, partial block
    probs[2, [7, 5000]] = torch.tensor([0.2, 0.4])
    noise[2, 5000] = 2.0                          # 0.4 / 2 == 0.2 / 1: id 7
    assert sampling.argmax_probs_over_noise(probs, noise).tolist() == [4100, 12289, 7]
    assert sampling.argmax_probs_over_noise_ref(probs, noise).tolist() == [4100, 12289, 7]


def test_noise_of_zero_probabilities_is_not_read(sampling, triton_on_cpu):
    probs = torch.zeros(2, 100)
    probs[:, 3] = 1.0
    noise = torch.full((2, 100), float("nan"))    # what the kernel must not read
    noise[:, 3] = 0.5
    assert sampling.argmax_probs_over_noise(probs, noise).tolist() == [3, 3]


def test_without_the_interpreter_cpu_tensors_take_the_twin(sampling, monkeypatch):
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    probs = torch.tensor([[0.1, 0.6, 0.3]])
    noise = torch.tensor([[0.1, 1.0, 1.0]])
    assert sampling.argmax_probs_over_noise(probs, noise).tolist() == [0]
