"""Fused-slice LoRA (one shrink over stacked A, one expand into each slice's columns): the
Triton kernels (interpreted, on CPU) against the torch twins, and the twins against
separate per-module LoRA, at several adapter mixes, mixed ranks and partial targets."""

import sys

import pytest
import torch

from helpers.interpreted_kernels import INTERPRET_ENV, load_interpreted

NUM_SLOTS, RANK, H_IN = 4, 8, 72  # H_IN: not a power of 2 nor a multiple of the K block
QKV = (48, 24, 24)  # q wider than k/v, as with grouped-query attention
GATE_UP = (40, 40)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2)}


@pytest.fixture(scope="module")
def lora():
    yield load_interpreted("lora.py", "_lora_slices_interpreted")
    sys.modules.pop("_lora_slices_interpreted", None)


def _slots(mix: str, num_tokens: int) -> torch.Tensor:
    if mix == "distinct":
        return torch.arange(num_tokens) % NUM_SLOTS
    if mix == "uniform":
        return torch.full((num_tokens,), 1)
    if mix == "skewed":
        slots = torch.full((num_tokens,), 2)
        slots[::5], slots[1::9] = 0, -1
        return slots
    assert mix == "all_base"
    return torch.full((num_tokens,), -1)


def _adapters(slices, ranks, targets, gen):
    """Per slot and slice: (A [r, H_IN], B [N_i, r], scale) or None; stacked A [S, n*R, H], B [S, sum N, R]."""
    per_slot = []
    a = torch.zeros(NUM_SLOTS, len(slices) * RANK, H_IN)
    b = torch.zeros(NUM_SLOTS, sum(slices), RANK)
    scales = torch.zeros(NUM_SLOTS, len(slices))
    for s in range(NUM_SLOTS):
        modules, col = [], 0
        for i, width in enumerate(slices):
            if i in targets[s]:
                r = ranks[s]
                mod = (torch.randn(r, H_IN, generator=gen) / H_IN**0.5, torch.randn(width, r, generator=gen) / r**0.5,
                       float(torch.rand(1, generator=gen)) + 0.5)
                a[s, i * RANK:i * RANK + r], b[s, col:col + width, :r], scales[s, i] = mod
            else:
                mod = None
            modules.append(mod)
            col += width
        per_slot.append(modules)
    return per_slot, a, b, scales


def _separate_lora(x, y0, slots, per_slot, slices):
    """What PEFT does per module: y_i += (x @ A_i.T @ B_i.T) * scale_i, for each targeted slice."""
    y = y0.clone().float()
    for t, s in enumerate(slots.tolist()):
        col = 0
        for i, width in enumerate(slices):
            if s >= 0 and per_slot[s][i] is not None:
                a, b, scale = per_slot[s][i]
                y[t, col:col + width] += (x[t].float() @ a.T) @ b.T * scale
            col += width
    return y


CASES = [  # (slices, mix, tokens, ranks per slot, targeted slices per slot)
    (QKV, "distinct", 9, (8, 8, 8, 8), [{0, 1, 2}] * 4),
    (QKV, "skewed", 41, (1, 4, 8, 2), [{0, 2}, {0, 1, 2}, {1}, {2}]),  # q/v-only adapters: k slice stays zero
    (QKV, "uniform", 20, (8, 4, 8, 8), [{0, 1, 2}] * 4),
    (QKV, "all_base", 7, (8, 8, 8, 8), [{0, 1, 2}] * 4),
    (GATE_UP, "distinct", 33, (2, 8, 4, 8), [{0, 1}, {1}, {0}, {0, 1}]),
    ((56,), "skewed", 150, (8, 3, 8, 5), [{0}] * 4),  # one slice: o_proj / down_proj
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slices,mix,num_tokens,ranks,targets", CASES)
def test_sliced_kernels_match_twins_and_separate_lora(lora, monkeypatch, dtype, slices, mix, num_tokens, ranks,
                                                     targets):
    gen = torch.Generator().manual_seed(num_tokens)
    per_slot, a, b, scales = _adapters(slices, ranks, targets, gen)
    x = torch.randn(num_tokens, H_IN, generator=gen)
    y0 = torch.randn(num_tokens, sum(slices), generator=gen)
    slots = _slots(mix, num_tokens)
    meta = lora.build_lora_meta(slots, NUM_SLOTS)
    xd, ad, bd = x.to(dtype), a.to(dtype), b.to(dtype)

    results = {}
    for use_triton in (True, False):
        monkeypatch.setenv(INTERPRET_ENV, "1" if use_triton else "0")
        y = y0.to(dtype, copy=True)
        lora.lora_expand(y, lora.lora_shrink(xd, ad, meta), bd, scales, meta, slices)
        results[use_triton] = y
    torch.testing.assert_close(results[True], results[False], **TOL[dtype])
    expected = _separate_lora(xd, y0.to(dtype), slots, per_slot, slices)
    torch.testing.assert_close(results[False].float(), expected, **TOL[dtype])
    base = slots < 0
    assert torch.equal(results[True][base], y0.to(dtype)[base])
    if not base.all():
        assert not torch.allclose(results[True].float(), y0.to(dtype).float())


def test_expand_touches_only_its_slices_columns(lora, monkeypatch):
    """A k-only adapter changes the k columns alone; the others keep their bits."""
    monkeypatch.setenv(INTERPRET_ENV, "1")
    gen = torch.Generator().manual_seed(3)
    per_slot, a, b, scales = _adapters(QKV, (8,) * 4, [{1}] * 4, gen)
    x, y0 = torch.randn(10, H_IN, generator=gen), torch.randn(10, sum(QKV), generator=gen)
    meta = lora.build_lora_meta(_slots("distinct", 10), NUM_SLOTS)
    y = y0.clone()
    lora.lora_expand(y, lora.lora_shrink(x, a, meta), b, scales, meta, QKV)
    q, k = QKV[0], QKV[0] + QKV[1]
    assert torch.equal(y[:, :q], y0[:, :q]) and torch.equal(y[:, k:], y0[:, k:])
    assert not torch.allclose(y[:, q:k], y0[:, q:k])


def _assert_views_match_stack(lora, slices, views, stacked, mix, num_tokens, gen):
    """LoRA through strided (A, B, scales) views equals the twins on the contiguous stack."""
    x, y0 = torch.randn(num_tokens, H_IN, generator=gen), torch.randn(num_tokens, sum(slices), generator=gen)
    meta = lora.build_lora_meta(_slots(mix, num_tokens), NUM_SLOTS)
    (a_view, b_view, s_view), (a, b, scales) = views, stacked
    y, y_ref = y0.clone(), y0.clone()
    lora.lora_expand(y, lora.lora_shrink(x, a_view, meta), b_view, s_view, meta, slices)
    lora.lora_expand_ref(y_ref, lora.lora_shrink_ref(x, a, meta), b, scales, meta, slices)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])


def test_slot_strided_weights(lora, monkeypatch):
    """A/B/scales as views into one buffer per slot give the same result."""
    monkeypatch.setenv(INTERPRET_ENV, "1")
    gen = torch.Generator().manual_seed(4)
    _, a, b, scales = _adapters(GATE_UP, (8, 2, 8, 4), [{0, 1}] * 4, gen)
    pool = torch.zeros(NUM_SLOTS, a[0].numel() + b[0].numel() + 16)
    a_view = pool[:, :a[0].numel()].view(NUM_SLOTS, *a.shape[1:])
    b_view = pool[:, a[0].numel():a[0].numel() + b[0].numel()].view(NUM_SLOTS, *b.shape[1:])
    s_view = pool[:, -2:]
    a_view.copy_(a), b_view.copy_(b), s_view.copy_(scales)
    _assert_views_match_stack(lora, GATE_UP, (a_view, b_view, s_view), (a, b, scales), "distinct", 17, gen)


@pytest.mark.parametrize("use_triton", [True, False])
def test_rank_major_stacked_a(lora, monkeypatch, use_triton):
    """A as [S, n, R, H] with rank-major strides and B as [S, N, R] with the rank outermost
    (the adapter-slot layout: an adapter of rank r fills a prefix) equal the contiguous stack."""
    monkeypatch.setenv(INTERPRET_ENV, "1" if use_triton else "0")
    gen = torch.Generator().manual_seed(5)
    _, a, b, scales = _adapters(QKV, (8, 3, 5, 8), [{0, 1, 2}, {0, 2}, {1}, {0, 1, 2}], gen)
    n = len(QKV)
    a_rank_major = torch.zeros(NUM_SLOTS, RANK, n, H_IN).permute(0, 2, 1, 3)  # [S, n, R, H]
    a_rank_major.copy_(a.view(NUM_SLOTS, n, RANK, H_IN))
    b_rank_major = torch.zeros(NUM_SLOTS, RANK, sum(QKV)).transpose(1, 2)     # [S, N, R]
    b_rank_major.copy_(b)
    _assert_views_match_stack(lora, QKV, (a_rank_major, b_rank_major, scales), (a, b, scales), "skewed", 23, gen)
