"""LoRA shrink/expand: Triton kernels (in Triton's interpreter, on CPU) against the torch twins,
and the twins against a naive per-token loop."""

import ast
import os
import sys

import pytest
import torch

from helpers.interpreted_kernels import INTERPRET_ENV, KERNELS_DIR, load_interpreted

NUM_SLOTS, RANK, H_IN, H_OUT = 4, 16, 96, 80  # H_IN, H_OUT: not multiples of the kernel blocks
DTYPES = [torch.float32, torch.float16]  # the interpreter mis-reads bfloat16: GPU test below
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2)}


@pytest.fixture(scope="module")
def lora():
    """A private copy of kernels/lora.py whose Triton kernels are interpreted."""
    module = load_interpreted("lora.py", "_lora_interpreted")
    yield module
    sys.modules.pop(module.__name__, None)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Route lora_shrink/lora_expand on CPU tensors to the interpreted Triton kernels."""
    monkeypatch.setenv(INTERPRET_ENV, "1")


def test_interpreted_by_our_variable_alone():
    """Our variable interprets our kernels without changing TRITON_INTERPRET for others."""
    import triton

    before = os.environ.get("TRITON_INTERPRET")
    module = load_interpreted("lora.py", "_lora_interpreted_probe")
    sys.modules.pop(module.__name__)
    assert os.environ.get("TRITON_INTERPRET") == before
    assert not isinstance(module._lora_shrink_kernel, triton.runtime.JITFunction)
    assert not isinstance(module._tile_rows, triton.runtime.JITFunction)


def _slots(mix: str, num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    if mix == "distinct":
        return torch.arange(num_tokens) % NUM_SLOTS
    if mix == "uniform":
        return torch.full((num_tokens,), 2)
    if mix == "skewed":  # one slot dominates; a few tokens of others and of the base model
        slots = torch.zeros(num_tokens, dtype=torch.int64)
        slots[::7], slots[3::11], slots[5::13] = 3, 1, -1
        return slots
    if mix == "all_base":
        return torch.full((num_tokens,), -1)
    assert mix == "random"
    return torch.randint(-1, NUM_SLOTS, (num_tokens,), generator=gen)


def _weights(dtype, gen, num_tokens=37, ranks=(RANK,) * NUM_SLOTS):
    """x, A, B, scales with each slot's adapter zero-padded from ranks[s] to RANK."""
    x = torch.randn(num_tokens, H_IN, generator=gen)
    a = torch.zeros(NUM_SLOTS, RANK, H_IN)
    b = torch.zeros(NUM_SLOTS, H_OUT, RANK)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, H_IN, generator=gen) / H_IN**0.5
        b[s, :, :r] = torch.randn(H_OUT, r, generator=gen) / r**0.5
    scales = torch.rand(NUM_SLOTS, generator=gen) + 0.5
    return x.to(dtype), a.to(dtype), b.to(dtype), scales


@pytest.mark.parametrize("per_token", [False, True], ids=["tiles", "per_token"])   # the expand's two kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mix,num_tokens", [
    ("distinct", 4), ("distinct", 37), ("uniform", 37), ("skewed", 200), ("random", 37),
    ("all_base", 19), ("random", 1), ("random", 0),
])
def test_kernels_match_ref(lora, triton_on_cpu, mix, num_tokens, dtype, per_token):
    gen = torch.Generator().manual_seed(num_tokens)
    x, a, b, scales = _weights(dtype, gen, num_tokens)
    meta = lora.build_lora_meta(_slots(mix, num_tokens, gen), NUM_SLOTS, per_token_expand=per_token)

    buf = lora.lora_shrink(x, a, meta)
    buf_ref = lora.lora_shrink_ref(x, a, meta)
    assert buf.shape[1:] == (num_tokens, RANK) and buf.dtype == torch.float32
    base = meta.token_slots < 0
    # Rows of base-model tokens are never written (nor read by the expand).
    torch.testing.assert_close(buf.sum(0)[~base], buf_ref[0][~base], **TOL[dtype])
    assert torch.all(buf_ref[0][base] == 0)

    y0 = torch.randn(num_tokens, H_OUT, generator=gen).to(dtype)
    y, y_ref = y0.clone(), y0.clone()
    lora.lora_expand(y, buf_ref, b, scales, meta)
    lora.lora_expand_ref(y_ref, buf_ref, b, scales, meta)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert torch.equal(y[base], y0[base])
    if num_tokens and not base.all():
        assert not torch.allclose(y, y0)  # the delta is really applied


@pytest.mark.parametrize("per_token", [False, True], ids=["tiles", "per_token"])   # the expand's two kernels
@pytest.mark.parametrize("num_tokens", [37, 150])   # decode and larger tilings (block_m 16 / 32)
def test_fused_slices_span_several_column_blocks(lora, triton_on_cpu, num_tokens, per_token):
    """Slices wider than one column block and not multiples of it, split-K planes
    added: each slice gets exactly its own B and scale, columns past a slice's end stay its neighbour's."""
    slices = (1100, 72, 72)
    gen = torch.Generator().manual_seed(3)
    meta = lora.build_lora_meta(_slots("random", num_tokens, gen), NUM_SLOTS, per_token_expand=per_token)
    k = 2 * lora.shrink_config(meta.block_m, meta.max_tiles, 1, len(slices) * RANK).block_k   # two K splits
    x = torch.randn(num_tokens, k, generator=gen)
    a = torch.randn(NUM_SLOTS, len(slices), RANK, k, generator=gen) / k**0.5
    b = torch.randn(NUM_SLOTS, sum(slices), RANK, generator=gen) / RANK**0.5
    scales = torch.rand(NUM_SLOTS, len(slices), generator=gen) + 0.5
    cfg = lora.expand_config(meta.block_m, RANK, per_token)
    assert slices[0] > cfg.block_n and slices[0] % cfg.block_n  # the cases this test is for
    planes = lora._shrink_triton(x, a, meta, split_k=2)
    assert planes.shape[0] == 2
    y0 = torch.randn(num_tokens, sum(slices), generator=gen)
    y, y_ref = y0.clone(), y0.clone()
    lora.lora_expand(y, planes, b, scales, meta, slices)
    lora.lora_expand_ref(y_ref, lora.lora_shrink_ref(x, a, meta), b, scales, meta, slices)
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])
    assert not torch.allclose(y, y0)


def test_split_k_accumulates(lora, triton_on_cpu):
    gen = torch.Generator().manual_seed(1)
    block_k = lora.shrink_config(16, 1, 1, RANK).block_k
    k = 5 * block_k                 # 5 K blocks: splits of 2, 2 and 1 blocks at split_k=3
    x = torch.randn(23, k, generator=gen)
    a = torch.randn(NUM_SLOTS, RANK, k, generator=gen) / 16
    meta = lora.build_lora_meta(_slots("random", 23, gen), NUM_SLOTS)
    expected = lora.lora_shrink_ref(x, a, meta)
    used = meta.token_slots >= 0
    for split_k in (1, 3, 5):
        assert lora.shrink_config(meta.block_m, meta.max_tiles, k, RANK, split_k).block_k == block_k
        planes = lora._shrink_triton(x, a, meta, split_k=split_k)
        assert planes.shape[0] == split_k  # one plane of partial sums per split, no atomics
        torch.testing.assert_close(planes.sum(0)[used], expected[0][used])


@pytest.mark.parametrize("per_token", [False, True], ids=["tiles", "per_token"])   # the expand's two kernels
@pytest.mark.parametrize("dtype", DTYPES)
def test_mixed_ranks_padded(lora, triton_on_cpu, dtype, per_token):
    """Ranks 1/8/16 zero-padded to 16 give each adapter's own unpadded product."""
    ranks = (1, 8, 16, 8)
    gen = torch.Generator().manual_seed(2)
    x, a, b, scales = _weights(dtype, gen, 29, ranks)
    slots = _slots("random", 29, gen)
    meta = lora.build_lora_meta(slots, NUM_SLOTS, per_token_expand=per_token)
    y = torch.zeros(29, H_OUT, dtype=dtype)
    lora.lora_expand(y, lora.lora_shrink(x, a, meta), b, scales, meta)

    expected = torch.zeros(29, H_OUT)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            r = ranks[s]
            expected[t] = (x[t].float() @ a[s, :r].float().T) @ b[s, :, :r].float().T * scales[s]
    torch.testing.assert_close(y.float(), expected, **TOL[dtype])


@pytest.mark.parametrize("use_triton,per_token", [(True, False), (True, True), (False, False)])
def test_expand_into_strided_view(lora, monkeypatch, use_triton, per_token):
    """y as the middle column slice of a fused output, buf as a column slice of a wider buffer."""
    monkeypatch.setenv(INTERPRET_ENV, "1" if use_triton else "0")
    gen = torch.Generator().manual_seed(3)
    _, _, b, scales = _weights(torch.float32, gen, 21)
    meta = lora.build_lora_meta(_slots("random", 21, gen), NUM_SLOTS, per_token_expand=per_token)
    wide_buf = torch.randn(21, 3 * RANK, generator=gen)
    buf = wide_buf[:, RANK:2 * RANK]
    fused = torch.randn(21, 3 * H_OUT, generator=gen)
    before = fused.clone()

    lora.lora_expand(fused[:, H_OUT:2 * H_OUT], buf, b, scales, meta)

    expected = before[:, H_OUT:2 * H_OUT].clone()
    lora.lora_expand_ref(expected, buf.contiguous(), b, scales, meta)
    torch.testing.assert_close(fused[:, H_OUT:2 * H_OUT], expected)
    assert torch.equal(fused[:, :H_OUT], before[:, :H_OUT])
    assert torch.equal(fused[:, 2 * H_OUT:], before[:, 2 * H_OUT:])


def test_refs_match_per_token_loop(lora):
    gen = torch.Generator().manual_seed(4)
    x, a, b, scales = _weights(torch.float32, gen, 33)
    slots = _slots("random", 33, gen)
    meta = lora.build_lora_meta(slots, NUM_SLOTS)
    y = torch.randn(33, H_OUT, generator=gen)
    expected = y.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:  # PEFT's order: (x @ A.T) @ B.T * scale, then added
            expected[t] += (x[t] @ a[s].T) @ b[s].T * scales[s]

    buf = lora.lora_shrink_ref(x, a, meta)
    lora.lora_expand_ref(y, buf, b, scales, meta)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_tokens", [1, 37, 200, 1500])
def test_meta_tiles_cover_each_adapter_token_once(lora, num_tokens):
    gen = torch.Generator().manual_seed(num_tokens)
    slots = _slots("random", num_tokens, gen)
    slots[: num_tokens // 2] = 1  # one long run across many tiles
    meta = lora.build_lora_meta(slots, NUM_SLOTS)

    seen = []
    for slot, start, end in zip(meta.tile_slots.tolist(), meta.tile_starts.tolist(), meta.tile_ends.tolist()):
        if slot < 0:
            continue
        tokens = meta.sorted_token_ids[start:min(start + meta.block_m, end)]
        assert len(tokens) > 0
        assert torch.all(slots[tokens.long()] == slot)
        seen += tokens.tolist()
    assert sorted(seen) == torch.nonzero(slots >= 0).squeeze(1).tolist()
    assert meta.slot_token_counts.tolist() == [int((slots == s).sum()) for s in range(NUM_SLOTS)]


def test_dispatch_follows_device_and_env(lora, monkeypatch):
    gen = torch.Generator().manual_seed(5)
    x, a, _, _ = _weights(torch.float32, gen, 5)
    meta = lora.build_lora_meta(_slots("random", 5, gen), NUM_SLOTS)

    def fail(*args, **kwargs):
        raise AssertionError("Triton path taken")

    monkeypatch.setattr(lora, "_shrink_triton", fail)
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    torch.testing.assert_close(lora.lora_shrink(x, a, meta), lora.lora_shrink_ref(x, a, meta))
    monkeypatch.setenv(INTERPRET_ENV, "1")
    with pytest.raises(AssertionError, match="Triton path taken"):
        lora.lora_shrink(x, a, meta)


def test_compiled_kernels_on_cpu_say_how_to_fix(monkeypatch):
    import multilora_kernels.lora as compiled

    if not isinstance(compiled._lora_shrink_kernel, compiled.triton.runtime.JITFunction):
        pytest.skip("multilora_kernels.lora was imported with interpreted kernels")
    meta = compiled.build_lora_meta(torch.tensor([0, -1]), 1)
    monkeypatch.setenv(compiled.INTERPRET_ENV, "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        compiled.lora_shrink(torch.ones(2, 8), torch.ones(1, 4, 8), meta)


def test_kernels_import_only_torch_triton_and_stdlib():
    allowed = {"torch", "triton", "multilora_kernels"} | set(sys.stdlib_module_names)
    for path in KERNELS_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [node.module.split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{path.name} imports {roots}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("per_token", [False, True], ids=["tiles", "per_token"])   # the expand's two kernels
@pytest.mark.parametrize("num_tokens", [1, 64, 1000])
def test_cuda_bf16_matches_ref(num_tokens, per_token):
    from multilora_kernels import build_lora_meta, lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref

    gen = torch.Generator(device="cuda").manual_seed(6)
    kw = dict(device="cuda", generator=gen)
    x = torch.randn(num_tokens, 4096, **kw).bfloat16()
    a = (torch.randn(8, 64, 4096, **kw) / 64).bfloat16()
    b = (torch.randn(8, 6144, 64, **kw) / 8).bfloat16()
    scales = torch.rand(8, **kw)
    meta = build_lora_meta(torch.randint(-1, 8, (num_tokens,), **kw), 8, per_token_expand=per_token)
    buf = lora_shrink(x, a, meta)
    used = meta.token_slots >= 0
    torch.testing.assert_close(buf.sum(0)[used], lora_shrink_ref(x, a, meta)[0][used], rtol=2e-2, atol=2e-2)
    y = torch.randn(num_tokens, 3 * 6144, **kw).bfloat16()[:, 6144:2 * 6144]
    y_ref = y.clone()
    lora_expand(y, buf, b, scales, meta)
    lora_expand_ref(y_ref, buf, b, scales, meta)
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
