"""The sampler's draw kernel (kernels/sampling.py), interpreted on CPU, against its torch twin: the same
ids bit for bit, the lowest id among equal quotients (inside a block and across blocks), zeros' noise unread."""

import sys

import pytest
import torch

from helpers.interpreted_kernels import INTERPRET_ENV, load_interpreted


@pytest.fixture(scope="module")
def sampling():
    module = load_interpreted("sampling.py", "_sampling_interpreted")
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


def _former_rebuild(logits, best, ranked, kth_index, scale, multiply: bool):
    """The sampler's rebuild before window_softmax_input: the window scaled, cut and scattered over
    where(logits >= past, kth, -inf) (past: the window's last logit if it scales to the k-th, else inf)."""
    def scaled(v):
        x = v - best.float()[:, None]
        return x.mul_(scale[:, None]) if multiply else x.div_(scale[:, None])

    x = scaled(ranked.values)
    kth = x.gather(1, kth_index.view(-1, 1))
    past = torch.where(x[:, -1:] >= kth, ranked.values[:, -1:], float("inf"))
    rows = torch.where(logits >= past, kth, float("-inf"))
    return rows.scatter_(1, ranked.indices, torch.where(x >= kth, x, float("-inf")))


def _window_case(seed: int, kind: str, dtype: torch.dtype, rows: int = 4, vocab: int = 5000):
    gen = torch.Generator().manual_seed(seed)
    if kind == "randn":
        logits = torch.randn(rows, vocab, generator=gen) * 2.5
    elif kind == "ties":            # a few dozen ids share each value
        logits = torch.randint(0, 40, (rows, vocab), generator=gen).float() / 4
    else:                           # near-constant: the k-th value's ties run past the window
        logits = torch.randint(0, 3, (rows, vocab), generator=gen).float()
    logits = logits.to(dtype)
    logits[0, 7] = float("-inf")    # a banned id
    top_k = torch.randint(1, 60, (rows,), generator=gen)
    ranked = logits.topk(int(top_k.max()) + 256)
    scale = (torch.rand(rows, generator=gen) * 2 + 0.2).float()
    return logits, logits.max(dim=-1).values, ranked, top_k - 1, scale


@pytest.mark.parametrize("kind", ["randn", "ties", "few_values"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])   # the interpreter mis-reads bfloat16
def test_window_softmax_input_matches_the_twin_and_the_former_rebuild(sampling, triton_on_cpu, kind, dtype):
    logits, best, ranked, kth_index, scale = _window_case(len(kind), kind, dtype)
    got = sampling.window_softmax_input(logits, best, ranked.values, kth_index, scale)
    want = _former_rebuild(logits, best, ranked, kth_index, scale, multiply=False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(sampling.window_softmax_input_ref(logits, best, ranked.values, kth_index, scale),
                               want, rtol=0, atol=0)
    if kind == "few_values":        # ties past the window got the k-th value
        assert ((got > float("-inf")).sum(dim=1) > ranked.values.shape[1]).any()


@pytest.mark.parametrize("kind", ["randn", "few_values"])
def test_window_softmax_input_multiplies_by_the_scale_as_on_cuda(sampling, triton_on_cpu, kind):
    """On CUDA the sampler's scale is 1 / temperature and the kernel multiplies (DIVIDE=False)."""
    logits, best, ranked, kth_index, scale = _window_case(3, kind, torch.float32)
    out = torch.empty_like(logits)
    rows, vocab = logits.shape
    sampling._launch.launch(sampling._window_softmax_input_kernel, (rows, -(-vocab // sampling._BLOCK)),
                            logits.device, logits, best, ranked.values, kth_index, scale, out, vocab,
                            ranked.values.shape[1], logits.stride(0), ranked.values.stride(0), out.stride(0),
                            DIVIDE=False, BLOCK=sampling._BLOCK)
    torch.testing.assert_close(out, _former_rebuild(logits, best, ranked, kth_index, scale, multiply=True),
                               rtol=0, atol=0)


@pytest.mark.parametrize("window", [1, 5, 16, 17, 306])
def test_rank_window_orders_as_the_two_sorts(sampling, triton_on_cpu, window):
    gen = torch.Generator().manual_seed(window)
    rows, vocab = 3, 2000
    probs = torch.softmax(torch.randint(0, 6, (rows, vocab), generator=gen).float(), dim=-1)   # many ties
    probs[1] = 0.0                                                   # a row of zeros: ties all the way
    probs[2, :100] = torch.rand(100, generator=gen)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:window] for _ in range(rows)])
    ranked, ranked_ids = sampling.rank_window(probs, ids)
    want, want_ids = sampling.rank_window_ref(probs, ids)
    assert ranked_ids.tolist() == want_ids.tolist()
    torch.testing.assert_close(ranked, want, rtol=0, atol=0)
    torch.testing.assert_close(ranked, probs.gather(1, ranked_ids), rtol=0, atol=0)


def test_rank_window_breaks_ties_by_id(sampling, triton_on_cpu):
    probs = torch.tensor([[0.1, 0.3, 0.3, 0.0, 0.3]])
    ranked, ranked_ids = sampling.rank_window(probs, torch.tensor([[4, 0, 2, 3, 1]]))
    assert ranked_ids.tolist() == [[1, 2, 4, 0, 3]]
    assert ranked[0].tolist() == pytest.approx([0.3, 0.3, 0.3, 0.1, 0.0])


def test_rank_window_orders_subnormal_probabilities_as_the_sorts(sampling, triton_on_cpu):
    """Distinct subnormals (a row of a very peaked softmax) keep their order: a GPU's float compare
    may flush them to 0 and rank them by id, where the sorts do not."""
    tiny = torch.finfo(torch.float32).tiny
    probs = torch.tensor([[0.5, tiny / 4, tiny / 2, tiny / 8, 0.0, 0.5 - tiny]])
    ids = torch.tensor([[3, 1, 5, 4, 2, 0]])
    ranked, ranked_ids = sampling.rank_window(probs, ids)
    assert ranked_ids.tolist() == sampling.rank_window_ref(probs, ids)[1].tolist() == [[0, 5, 2, 1, 3, 4]]


def test_rank_window_places_every_id_of_a_row_holding_nan(sampling, triton_on_cpu):
    probs = torch.tensor([[0.2, float("nan"), 0.3, 0.1, float("nan"), 0.4], [0.1, 0.2, 0.3, 0.4, 0.0, 0.0]])
    ids = torch.tensor([[5, 0, 1, 4, 2, 3], [0, 1, 2, 3, 4, 5]])
    _, ranked_ids = sampling.rank_window(probs, ids)
    assert sorted(ranked_ids[0].tolist()) == list(range(6))       # a permutation: no place left unwritten
    assert ranked_ids[1].tolist() == [3, 2, 1, 0, 4, 5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernels_equal_their_twins_at_llama3_shapes():
    """Compiled, on bf16 logits [64, 128256] with top_k 50 (window 306), as issue 7's batch runs them."""
    from multilora_kernels import sampling

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, vocab = 64, 128256
    logits = (torch.randn(rows, vocab, device="cuda", generator=gen) * 2.5).bfloat16()
    logits[1] = torch.randint(0, 3, (vocab,), device="cuda", generator=gen).bfloat16()    # near-constant
    best = logits.max(dim=-1).values
    ranked = logits.topk(50 + 256)
    kth_index = torch.full((rows,), 49, device="cuda")
    scale = torch.full((rows,), 1 / 0.8, device="cuda")
    x = sampling.window_softmax_input(logits, best, ranked.values, kth_index, scale)
    torch.testing.assert_close(x, sampling.window_softmax_input_ref(logits, best, ranked.values, kth_index, scale),
                               rtol=0, atol=0)
    probs = torch.softmax(x, dim=-1)
    got, want = sampling.rank_window(probs, ranked.indices), sampling.rank_window_ref(probs, ranked.indices)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    noise = torch.empty_like(probs).exponential_(generator=gen)
    assert torch.equal(sampling.argmax_probs_over_noise(probs, noise),
                       sampling.argmax_probs_over_noise_ref(probs, noise))
