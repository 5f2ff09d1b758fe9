"""Fused elementwise kernels (residual add + RMSNorm, rotary + KV write, SiLU-and-mul): the Triton
kernels (interpreted, on CPU) against their torch twins, and the twins against transformers'
own Llama code in float32 (bit for bit: the engine's greedy tokens must equal HF's)."""

import os
import sys

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from helpers.interpreted_kernels import INTERPRET_ENV, load_interpreted

DTYPES = [torch.float32, torch.float16]  # the interpreter mis-reads bfloat16
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.fixture(scope="module")
def kernels():
    # norm and activation add LoRA deltas with lora.py's device function, and a LoRADelta's `apply` runs its
    # expand: they get interpreted copies.
    lora = load_interpreted("lora.py", "_fused_lora_interpreted")
    lora_delta = load_interpreted("lora_delta.py", "_fused_lora_delta_interpreted",
                                  imports={"multilora_kernels.lora": lora})
    imports = {"multilora_kernels.lora": lora, "multilora_kernels.lora_delta": lora_delta}
    mods = {f: load_interpreted(f"{f}.py", f"_fused_{f}_interpreted", imports=imports)
            for f in ("norm", "rotary", "activation")}
    yield {**mods, "lora": lora, "lora_delta": lora_delta}
    for f in (*mods, "lora", "lora_delta"):
        sys.modules.pop(f"_fused_{f}_interpreted", None)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv(INTERPRET_ENV, "1")


# ---------------------------------------------------------------- residual add + RMSNorm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 64), (7, 96), (33, 200), (4, 4096)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_twin(kernels, triton_on_cpu, dtype, num_tokens, hidden, with_residual):
    norm = kernels["norm"]
    gen = torch.Generator().manual_seed(hidden + num_tokens)
    wide = torch.randn(num_tokens, hidden + 8, generator=gen).to(dtype)
    x = wide[:, 3:3 + hidden]  # a row-strided view, as a slice of a wider output
    residual = torch.randn(num_tokens, hidden, generator=gen).to(dtype) if with_residual else None
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    x0, r0 = x.clone(), None if residual is None else residual.clone()

    normed, h = norm.fused_add_rms_norm(x, residual, weight, 1e-5)
    normed_ref, h_ref = norm.fused_add_rms_norm_ref(x, residual, weight, 1e-5)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=0)  # the add is exact in both: one rounding
    torch.testing.assert_close(normed, normed_ref, **TOL[dtype])
    assert normed.dtype == dtype and normed.shape == (num_tokens, hidden)
    assert torch.equal(x, x0) and (residual is None or torch.equal(residual, r0))
    if residual is None:
        assert h is x  # the first layer: the input is the residual, no copy


def test_add_rms_norm_twin_is_transformers_bit_for_bit(kernels):
    norm = kernels["norm"]
    gen = torch.Generator().manual_seed(0)
    x, residual = torch.randn(9, 96, generator=gen), torch.randn(9, 96, generator=gen)
    hf = LlamaRMSNorm(96, eps=1e-6)
    hf.weight.data = torch.rand(96, generator=gen) + 0.5
    normed, h = norm.fused_add_rms_norm_ref(x, residual, hf.weight.data, 1e-6)
    assert torch.equal(h, residual + x)
    assert torch.equal(normed, hf(residual + x))


# ---------------------------------------------------------------- rotary + KV-cache write


def _rotary_inputs(dtype, num_tokens, heads, kv_heads, head_dim, gen):
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, :heads * head_dim].view(num_tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(num_tokens, kv_heads, head_dim)
    positions = torch.randint(0, 500, (num_tokens,), generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = positions[:, None].float() * inv_freq[None, :]
    return qkv, q, k, v, freqs.cos().to(dtype), freqs.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,heads,kv_heads,head_dim", [(1, 2, 1, 16), (13, 4, 2, 24), (5, 6, 3, 32), (6, 8, 8, 64)])
def test_rotary_kv_write_matches_twin(kernels, triton_on_cpu, dtype, num_tokens, heads, kv_heads, head_dim):
    rotary = kernels["rotary"]
    gen = torch.Generator().manual_seed(num_tokens * heads)
    num_blocks, block_size = 5, 4
    slot_mapping = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    results = []
    for use_triton in (True, False):
        os.environ[INTERPRET_ENV] = "1" if use_triton else "0"
        qkv, q, k, v, cos, sin = _rotary_inputs(dtype, num_tokens, heads, kv_heads, head_dim,
                                                torch.Generator().manual_seed(1))
        cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), 7.0, dtype=dtype)
        rotary.rotary_kv_write(q, k, v, cos, sin, cache, slot_mapping)
        results.append((qkv, cache))
    (qkv, cache), (qkv_ref, cache_ref) = results
    torch.testing.assert_close(qkv, qkv_ref, **TOL[dtype])
    torch.testing.assert_close(cache, cache_ref, **TOL[dtype])
    flat = cache.view(2, -1, kv_heads, head_dim)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slot_mapping] = False
    assert torch.all(flat[:, untouched] == 7.0)  # only the tokens' slots are written
    k_rot = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(num_tokens, kv_heads, head_dim)
    assert torch.equal(flat[0, slot_mapping], k_rot)  # the cache holds the rotated k, v as is
    assert torch.equal(flat[1, slot_mapping], qkv[:, (heads + kv_heads) * head_dim:].view_as(k_rot))


def test_rotary_twin_is_transformers_bit_for_bit(kernels):
    rotary = kernels["rotary"]
    gen = torch.Generator().manual_seed(2)
    qkv, q, k, v, cos, sin = _rotary_inputs(torch.float32, 11, 4, 2, 32, gen)
    full_cos, full_sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
    # transformers' layout: [batch, heads, seq, head_dim]
    q_hf, k_hf = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], full_cos[None], full_sin[None])
    cache = torch.zeros(2, 3, 4, 2, 32)
    rotary.rotary_kv_write_ref(q, k, v, cos, sin, cache, torch.arange(11))
    assert torch.equal(q, q_hf[0].transpose(0, 1)) and torch.equal(k, k_hf[0].transpose(0, 1))


# ---------------------------------------------------------------- SiLU-and-mul


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(1, 40), (5, 1000), (3, 1500)])  # 1500: two column blocks
def test_silu_and_mul_matches_twin(kernels, triton_on_cpu, dtype, num_tokens, inter):
    act = kernels["activation"]
    gen = torch.Generator().manual_seed(inter)
    x = (3 * torch.randn(num_tokens, 2 * inter, generator=gen)).to(dtype)
    out = act.silu_and_mul(x)
    assert out.shape == (num_tokens, inter) and out.dtype == dtype
    torch.testing.assert_close(out, act.silu_and_mul_ref(x), **TOL[dtype])
    gate, up = x[:, :inter].float(), x[:, inter:].float()
    torch.testing.assert_close(out.float(), gate * torch.sigmoid(gate) * up, **TOL[dtype])


# ---------------------------------------------------------------- a LoRA layer's deferred expand


def _lora_delta(kernels, x, slices, token_slots, per_token, rank=8, num_slots=3, seed=0):
    """The LoRADelta of a layer of `slices` on x, over random A, B and scales."""
    lora = kernels["lora"]
    gen = torch.Generator().manual_seed(seed)
    meta = lora.build_lora_meta(torch.tensor(token_slots), num_slots, per_token_expand=per_token)
    a = (0.2 * torch.randn(num_slots, len(slices), rank, x.shape[1], generator=gen)).to(x.dtype)
    b = (0.2 * torch.randn(num_slots, sum(slices), rank, generator=gen)).to(x.dtype)
    scales = torch.rand(num_slots, len(slices), generator=gen) + 0.5
    return kernels["lora_delta"].LoRADelta(lora.lora_shrink(x, a, meta), b, scales, meta, tuple(slices))


# Tokens of 3 slots with base tokens between; 12 tokens: two planes of the shrink's split at H_in 96.
DELTA_SLOTS = [[0, -1, 2, 2, 1, -1, 0], [1] * 5, [-1, -1, -1], [2, 0, 1, -1, 0, 0, 2, 1, 1, 0, -1, 2]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_slots", DELTA_SLOTS)
@pytest.mark.parametrize("per_token", [True, False])
def test_add_rms_norm_adds_a_deferred_lora_delta(kernels, triton_on_cpu, dtype, token_slots, per_token):
    """The norm with the o_proj / down_proj delta equals the expand, then the norm: bit for bit
    against the per-token expand (the same sums), within rounding against the slot tiles' tl.dot."""
    norm, lora = kernels["norm"], kernels["lora"]
    gen = torch.Generator().manual_seed(len(token_slots))
    n, hidden = len(token_slots), 96
    x, y, residual = (torch.randn(n, hidden, generator=gen).to(dtype) for _ in range(3))
    weight = (torch.rand(hidden, generator=gen) + 0.5).to(dtype)
    delta = _lora_delta(kernels, x, (hidden,), token_slots, per_token)
    expanded = y.clone()
    delta.apply(expanded)
    want = norm.fused_add_rms_norm(expanded, residual, weight, 1e-5)
    got = norm.fused_add_rms_norm(y.clone(), residual, weight, 1e-5, delta)
    if any(s >= 0 for s in token_slots):
        assert not torch.equal(expanded, y), "the delta must change the output for this test to mean anything"
    for g, w in zip(got, want):
        if per_token or dtype == torch.float16:
            assert torch.equal(g, w), (g - w).abs().max()
        else:
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    # Without a residual (h is x itself) the delta is added into x first.
    x_first = y.clone()
    normed, h = norm.fused_add_rms_norm(x_first, None, weight, 1e-5, delta)
    torch.testing.assert_close(h, expanded, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(normed, norm.fused_add_rms_norm(expanded, None, weight, 1e-5)[0], rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("token_slots", DELTA_SLOTS)
@pytest.mark.parametrize("inter", [40, 1500])   # 1500: two column blocks, the second partial
def test_silu_and_mul_adds_a_deferred_lora_delta(kernels, triton_on_cpu, dtype, token_slots, inter):
    """SiLU-and-mul with the gate_up delta (two slices) equals the per-token expand, then SiLU-and-mul."""
    act, lora = kernels["activation"], kernels["lora"]
    gen = torch.Generator().manual_seed(inter)
    n = len(token_slots)
    x = torch.randn(n, 64, generator=gen).to(dtype)
    gate_up = (3 * torch.randn(n, 2 * inter, generator=gen)).to(dtype)
    delta = _lora_delta(kernels, x, (inter, inter), token_slots, per_token=True, seed=inter)
    expanded = gate_up.clone()
    delta.apply(expanded)
    got = act.silu_and_mul(gate_up.clone(), delta)
    assert torch.equal(got, act.silu_and_mul(expanded)), (got - act.silu_and_mul(expanded)).abs().max()
    if any(s >= 0 for s in token_slots):
        assert not torch.equal(got, act.silu_and_mul(gate_up)), "the delta must change the output"


def test_twins_add_a_deferred_lora_delta_first(kernels, monkeypatch):
    """CPU tensors without the interpreter: the twins apply the delta (the torch expand), then run."""
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    lora = kernels["lora"]
    x, y, residual = torch.randn(5, 64), torch.randn(5, 64), torch.randn(5, 64)
    delta = _lora_delta(kernels, x, (64,), [0, -1, 1, 2, 0], per_token=True)
    expanded = y.clone()
    lora.lora_expand_ref(expanded, delta.buf, delta.lora_b, delta.scales, delta.meta)
    for got, want in zip(kernels["norm"].fused_add_rms_norm(y.clone(), residual, torch.ones(64), 1e-6, delta),
                         kernels["norm"].fused_add_rms_norm_ref(expanded, residual, torch.ones(64), 1e-6)):
        assert torch.equal(got, want)
    gate_up = torch.randn(5, 64)
    delta = _lora_delta(kernels, x, (32, 32), [0, -1, 1, 2, 0], per_token=True)
    expanded = gate_up.clone()
    lora.lora_expand_ref(expanded, delta.buf, delta.lora_b, delta.scales, delta.meta, (32, 32))
    assert torch.equal(kernels["activation"].silu_and_mul(gate_up, delta), kernels["activation"].silu_and_mul_ref(expanded))


def test_twins_run_without_the_interpreter(kernels, monkeypatch):
    """CPU tensors and no switch: the torch twins, never a Triton launch."""
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    for name in ("norm", "rotary", "activation"):
        monkeypatch.setattr(kernels[name]._launch, "launch", lambda *a, **k: pytest.fail("Triton launched"))
    x = torch.randn(3, 64)
    normed, _ = kernels["norm"].fused_add_rms_norm(x, None, torch.ones(64), 1e-6)
    torch.testing.assert_close(normed, kernels["norm"].fused_add_rms_norm_ref(x, None, torch.ones(64), 1e-6)[0])
    torch.testing.assert_close(kernels["activation"].silu_and_mul(x), torch.nn.functional.silu(x[:, :32]) * x[:, 32:])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_fused_kernels_match_twins():
    from multilora_kernels.activation import silu_and_mul, silu_and_mul_ref
    from multilora_kernels.norm import fused_add_rms_norm, fused_add_rms_norm_ref
    from multilora_kernels.rotary import rotary_kv_write, rotary_kv_write_ref

    gen = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    x, r = (torch.randn(64, 4096, generator=gen, device="cuda").bfloat16() for _ in range(2))
    w = (torch.rand(4096, generator=gen, device="cuda") + 0.5).bfloat16()
    for got, want in zip(fused_add_rms_norm(x, r, w, 1e-5), fused_add_rms_norm_ref(x, r, w, 1e-5)):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    g = torch.randn(64, 2 * 14336, generator=gen, device="cuda").bfloat16()
    torch.testing.assert_close(silu_and_mul(g), silu_and_mul_ref(g), rtol=2e-2, atol=2e-2)
    outs = []
    # One set of angles for both: each call gets its own copy of the same qkv and an empty cache.
    angles = torch.arange(64, device="cuda")[:, None].float() * torch.rand(64, generator=gen, device="cuda")[None]
    qkv0 = torch.randn(64, 48 * 128, generator=gen, device="cuda").bfloat16()
    for fn in (rotary_kv_write, rotary_kv_write_ref):
        qkv = qkv0.clone()
        q, k, v = qkv[:, :4096].view(64, 32, 128), qkv[:, 4096:5120].view(64, 8, 128), qkv[:, 5120:].view(64, 8, 128)
        cache = torch.zeros(2, 10, 16, 8, 128, **kw)
        fn(q, k, v, angles.cos().bfloat16(), angles.sin().bfloat16(), cache, torch.arange(64, device="cuda") * 2)
        outs.append((qkv, cache))
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rank", [16, 64])
def test_cuda_bf16_deferred_lora_delta_equals_the_per_token_expand(rank):
    """bf16 at Llama-3-8B widths, 64 decode tokens over 32 slots with base rows between: the norm and
    SiLU-and-mul adding the delta give what the per-token expand, then the kernel, give, bit for bit."""
    from multilora_kernels import activation, lora, lora_delta, norm

    gen = torch.Generator(device="cuda").manual_seed(rank)
    slots = torch.randint(-1, 32, (64,), generator=gen, device="cuda")
    x = torch.randn(64, 4096, generator=gen, device="cuda").bfloat16()
    for slices, consumer in (((4096,), "norm"), ((14336, 14336), "silu")):
        meta = lora.build_lora_meta(slots, 32, per_token_expand=True)
        a = (0.05 * torch.randn(32, len(slices), rank, 4096, generator=gen, device="cuda")).bfloat16()
        b = (0.05 * torch.randn(32, sum(slices), rank, generator=gen, device="cuda")).bfloat16()
        scales = torch.rand(32, len(slices), generator=gen, device="cuda") + 0.5
        delta = lora_delta.LoRADelta(lora.lora_shrink(x, a, meta), b, scales, meta, slices)
        y = torch.randn(64, sum(slices), generator=gen, device="cuda").bfloat16()
        expanded = y.clone()
        delta.apply(expanded)
        if consumer == "norm":
            residual, weight = torch.randn_like(y), (torch.rand(4096, generator=gen, device="cuda") + 0.5).bfloat16()
            got = norm.fused_add_rms_norm(y.clone(), residual, weight, 1e-5, delta)
            want = norm.fused_add_rms_norm(expanded, residual, weight, 1e-5)
        else:
            got, want = (activation.silu_and_mul(y.clone(), delta),), (activation.silu_and_mul(expanded),)
        for g, w in zip(got, want):
            assert torch.equal(g, w), f"{consumer}: {(g.float() - w.float()).abs().max()}"
