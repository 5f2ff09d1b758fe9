"""Paged decode and prefill attention (kernels/attention.py, kernels/prefill_attention.py): the
Triton kernels (in Triton's interpreter, on CPU) against their torch twins, and the twins against
plain SDPA per sequence."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers.interpreted_kernels import INTERPRET_ENV, load_interpreted

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_attention.py"
SHARED = "multilora_kernels.attention"  # prefill_attention.py imports its input checks and constants from it
# bfloat16 only on a GPU (test at the end): the interpreter mis-reads it.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2)}
NUM_BLOCKS = 40


@pytest.fixture(scope="module")
def attn():
    """kernels/attention.py (decode), interpreted."""
    yield load_interpreted("attention.py", "_attention_interpreted")
    sys.modules.pop("_attention_interpreted", None)


@pytest.fixture(scope="module")
def prefill(attn):
    """kernels/prefill_attention.py, interpreted, over the interpreted attention.py's helpers."""
    yield load_interpreted("prefill_attention.py", "_prefill_attention_interpreted", {SHARED: attn})
    sys.modules.pop("_prefill_attention_interpreted", None)


@pytest.fixture
def triton_on_cpu(monkeypatch):
    """Route paged_decode_attention on CPU tensors to the interpreted Triton kernels."""
    monkeypatch.setenv(INTERPRET_ENV, "1")


def _case(context_lens, heads, kv_heads, head_dim, block_size, dtype, gen, pad_blocks=3, pad_id=0):
    """q, kv_cache, block_tables, context_lens: distinct random blocks per sequence, rows padded.

    Each row holds its sequence's blocks in shuffled order, then `pad_id` up to a width of
    `pad_blocks` more entries than the longest sequence needs.
    """
    lens = torch.tensor(context_lens)
    needed = [math.ceil(n / block_size) for n in context_lens]
    width = max(needed + [1]) + pad_blocks
    ids = torch.randperm(NUM_BLOCKS, generator=gen)
    assert sum(needed) <= NUM_BLOCKS
    tables = torch.full((len(context_lens), width), pad_id, dtype=torch.int64)
    start = 0
    for d, n in enumerate(needed):
        tables[d, :n] = ids[start:start + n]
        start += n
    q = torch.randn(len(context_lens), heads, head_dim, generator=gen).to(dtype)
    kv = torch.randn(2, NUM_BLOCKS, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    return q, kv, tables, lens


def _sdpa_per_sequence(q, kv, tables, lens, scale):
    """Naive reference: gather each sequence's keys in order, repeat KV heads, SDPA in fp64."""
    heads, kv_heads, block_size = q.shape[1], kv.shape[3], kv.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for d, n in enumerate(lens.tolist()):
        if n <= 0:
            continue
        blocks = tables[d, :math.ceil(n / block_size)]
        k = kv[0, blocks].flatten(0, 1)[:n].double().repeat_interleave(heads // kv_heads, dim=1)  # [n, H, Dh]
        v = kv[1, blocks].flatten(0, 1)[:n].double().repeat_interleave(heads // kv_heads, dim=1)
        query = q[d].double()[:, None, :]  # [H, 1, Dh]
        out[d] = F.scaled_dot_product_attention(query, k.transpose(0, 1), v.transpose(0, 1), scale=scale)[:, 0]
    return out


SHAPES = [  # heads, kv_heads, head_dim, block_size
    (4, 2, 16, 4),   # GQA, group 2
    (4, 4, 32, 16),  # MHA
    (4, 1, 16, 16),  # MQA, group 4
    (4, 2, 32, 4),
]


@pytest.mark.parametrize("num_splits,block_n,dtype", [
    (1, 16, torch.float32), (1, 16, torch.float16), (3, 16, torch.float32), (3, 16, torch.float16),
    (None, None, torch.float32),  # the public entry point with its own split choice and tile
])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-KVH{}-Dh{}-BS{}".format(*s))
def test_kernel_matches_ref(attn, triton_on_cpu, shape, num_splits, block_n, dtype):
    heads, kv_heads, head_dim, bs = shape
    gen = torch.Generator().manual_seed(heads * 100 + kv_heads * 10 + bs)
    lens = [1, bs, bs + 1, 3 * bs + 2, 37]  # ragged, one block, block edges, several tiles
    q, kv, tables, context_lens = _case(lens, heads, kv_heads, head_dim, bs, dtype, gen)
    scale = head_dim ** -0.5
    expected = attn.paged_decode_attention_ref(q, kv, tables, context_lens, scale)

    out = torch.full_like(q, float("nan"))
    if num_splits is None:
        assert attn.paged_decode_attention(q, kv, tables, context_lens, scale, out) is out
    else:
        attn._decode_triton(q, kv, tables, context_lens, scale, out, num_splits=num_splits, block_n=block_n)
    torch.testing.assert_close(out, expected, **TOL[dtype])


@pytest.mark.parametrize("num_splits", [1, 2, 8])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_single_sequence_many_splits(attn, triton_on_cpu, num_splits, index_dtype):
    """D = 1, a context of several tiles cut into up to 8 splits (some empty), int32/int64 indices."""
    gen = torch.Generator().manual_seed(num_splits)
    q, kv, tables, lens = _case([101], 4, 2, 16, 4, torch.float32, gen, pad_blocks=20)
    expected = attn.paged_decode_attention_ref(q, kv, tables, lens, 0.3)
    out = torch.empty_like(q)
    attn._decode_triton(q, kv, tables.to(index_dtype), lens.to(index_dtype), 0.3, out,
                        num_splits=num_splits, block_n=16)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


@pytest.mark.parametrize("num_splits", [1, 4])
def test_padding_entries_are_never_read(attn, triton_on_cpu, num_splits):
    """Table entries past each row's context may be garbage ids: the kernel never reads them."""
    gen = torch.Generator().manual_seed(7)
    q, kv, tables, lens = _case([5, 17, 2], 4, 2, 16, 4, torch.float32, gen, pad_blocks=4)
    expected = attn.paged_decode_attention_ref(q, kv, tables, lens, 0.25)
    poisoned = tables.clone()
    for d, n in enumerate(lens.tolist()):
        poisoned[d, math.ceil(n / 4):] = 2**40  # far outside the cache
    out = torch.empty_like(q)
    attn._decode_triton(q, kv, poisoned, lens, 0.25, out, num_splits=num_splits, block_n=16)
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    torch.testing.assert_close(attn.paged_decode_attention_ref(q, kv, poisoned, lens, 0.25), expected)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_rows_without_keys_give_zero(attn, triton_on_cpu, num_splits):
    """context_len 0 (a padded batch row under a CUDA graph) gives 0, never NaN; others unaffected."""
    gen = torch.Generator().manual_seed(8)
    q, kv, tables, lens = _case([9, 1, 30], 4, 2, 16, 4, torch.float32, gen)
    lens[1] = 0
    out = torch.full_like(q, float("nan"))
    attn._decode_triton(q, kv, tables, lens, 0.25, out, num_splits=num_splits, block_n=16)
    expected = attn.paged_decode_attention_ref(q, kv, tables, lens, 0.25)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(expected[1], out[1])
    torch.testing.assert_close(out, expected, **TOL[torch.float32])


def test_writes_into_a_strided_out_and_reads_a_strided_q(attn, triton_on_cpu):
    """q and out as views into wider buffers (decode rows after prefill rows, a fused qkv)."""
    gen = torch.Generator().manual_seed(9)
    q, kv, tables, lens = _case([6, 21], 4, 2, 16, 4, torch.float32, gen)
    fused = torch.randn(2, 8, 16, generator=gen)  # q heads then 4 other heads
    fused[:, :4] = q
    buffer = torch.randn(5, 4, 16, generator=gen)
    before = buffer.clone()

    result = attn.paged_decode_attention(fused[:, :4], kv, tables, lens, 0.25, out=buffer[3:])

    assert result.data_ptr() == buffer[3:].data_ptr()
    torch.testing.assert_close(buffer[3:], attn.paged_decode_attention_ref(q, kv, tables, lens, 0.25))
    assert torch.equal(buffer[:3], before[:3])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-KVH{}-Dh{}-BS{}".format(*s))
def test_ref_matches_sdpa_per_sequence(attn, shape):
    heads, kv_heads, head_dim, bs = shape
    gen = torch.Generator().manual_seed(10)
    q, kv, tables, lens = _case([1, bs, bs + 1, 2 * bs + 3, 0], heads, kv_heads, head_dim, bs, torch.float32, gen)
    out = attn.paged_decode_attention_ref(q, kv, tables, lens, 0.2)
    torch.testing.assert_close(out.double(), _sdpa_per_sequence(q, kv, tables, lens, 0.2), rtol=1e-5, atol=1e-5)


def test_num_splits_depends_on_shapes_only(attn):
    split = attn._num_splits
    # Llama-3-8B (KVH 8) on 132 SMs: fill ~4 programs per SM, at most 64 splits.
    assert split(1, 8, 8192, 32, 132) == 64
    assert split(16, 8, 8192, 32, 132) == 5
    assert split(64, 8, 8192, 32, 132) == 2
    assert split(66, 8, 8192, 32, 132) == 1 and split(256, 8, 8192, 32, 132) == 1
    assert split(1, 8, 64, 32, 132) == 2  # never more splits than tiles in the table's capacity


def test_dispatch_follows_device_and_env(attn, monkeypatch):
    gen = torch.Generator().manual_seed(11)
    q, kv, tables, lens = _case([3, 7], 4, 2, 16, 4, torch.float32, gen)

    def fail(*args, **kwargs):
        raise AssertionError("Triton path taken")

    monkeypatch.setattr(attn, "_decode_triton", fail)
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    torch.testing.assert_close(attn.paged_decode_attention(q, kv, tables, lens, 0.3),
                               attn.paged_decode_attention_ref(q, kv, tables, lens, 0.3))
    monkeypatch.setenv(INTERPRET_ENV, "1")
    with pytest.raises(AssertionError, match="Triton path taken"):
        attn.paged_decode_attention(q, kv, tables, lens, 0.3)


def test_compiled_kernels_on_cpu_say_how_to_fix(monkeypatch):
    import multilora_kernels.attention as compiled

    if not isinstance(compiled._decode_kernel, compiled.triton.runtime.JITFunction):
        pytest.skip("multilora_kernels.attention was imported with interpreted kernels")
    monkeypatch.setenv(INTERPRET_ENV, "1")
    q, kv = torch.ones(1, 2, 16), torch.ones(2, 3, 4, 1, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        compiled.paged_decode_attention(q, kv, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([3]), 1.0)


def test_compiled_prefill_kernel_on_cpu_says_how_to_fix(monkeypatch):
    import multilora_kernels.prefill_attention as compiled

    if not isinstance(compiled._prefill_kernel, compiled.triton.runtime.JITFunction):
        pytest.skip("multilora_kernels.prefill_attention was imported with an interpreted kernel")
    monkeypatch.setenv(INTERPRET_ENV, "1")
    q, kv = torch.ones(1, 2, 16), torch.ones(2, 3, 4, 1, 16)
    with pytest.raises(RuntimeError, match="before multilora_kernels.prefill_attention is imported"):
        compiled.paged_prefill_attention(q, kv, torch.zeros(1, 2, dtype=torch.int32), torch.tensor([0, 1]),
                                         torch.tensor([3]), 1.0)


def _prefill_case(query_lens, context_lens, shape, dtype, gen):
    """q [T, H, Dh] for sequences with `query_lens` new tokens each, and their cache and tables."""
    heads, kv_heads, head_dim, bs = shape
    _, kv, tables, lens = _case(context_lens, heads, kv_heads, head_dim, bs, dtype, gen)
    query_start = torch.tensor([0, *query_lens]).cumsum(0)
    q = torch.randn(int(query_start[-1]), heads, head_dim, generator=gen).to(dtype)
    return q, kv, tables, query_start, lens


def _sdpa_prefill_per_sequence(q, kv, tables, query_start, lens, scale):
    """Naive reference: per sequence, SDPA in fp64 with the causal mask offset by the cached tokens."""
    heads, kv_heads, block_size = q.shape[1], kv.shape[3], kv.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for n, ctx in enumerate(lens.tolist()):
        begin, end = query_start[n].item(), query_start[n + 1].item()
        if begin == end:
            continue
        blocks = tables[n, :math.ceil(ctx / block_size)]
        k = kv[0, blocks].flatten(0, 1)[:ctx].double().repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
        v = kv[1, blocks].flatten(0, 1)[:ctx].double().repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1)
        positions = torch.arange(ctx - (end - begin), ctx)
        mask = torch.arange(ctx)[None, :] <= positions[:, None]
        out[begin:end] = F.scaled_dot_product_attention(q[begin:end].double().transpose(0, 1), k, v, attn_mask=mask,
                                                        scale=scale).transpose(0, 1)
    return out


# (query_len, context_len) per sequence: a whole prompt, a chunk after cached tokens, one token,
# an idle sequence, a chunk of several query tiles (tiles are 64 // G tokens).
PREFILL_SEQS = [(7, 7), (5, 23), (1, 9), (0, 4), (40, 45)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "H{}-KVH{}-Dh{}-BS{}".format(*s))
def test_prefill_kernel_matches_ref(prefill, triton_on_cpu, shape, dtype):
    gen = torch.Generator().manual_seed(20 + shape[1])
    query_lens, context_lens = zip(*PREFILL_SEQS)
    q, kv, tables, query_start, lens = _prefill_case(query_lens, context_lens, shape, dtype, gen)
    scale = shape[2] ** -0.5
    expected = prefill.paged_prefill_attention_ref(q, kv, tables, query_start, lens, scale)
    out = torch.full_like(q, float("nan"))
    assert prefill.paged_prefill_attention(q, kv, tables, query_start.int(), lens, scale, out) is out
    torch.testing.assert_close(out, expected, **TOL[dtype])


def test_prefill_kernel_small_key_tiles(prefill, triton_on_cpu):
    """Key tiles of 16 over block size 4: causal masks that cut through the middle of tiles."""
    gen = torch.Generator().manual_seed(21)
    q, kv, tables, query_start, lens = _prefill_case([19, 3], [19, 50], (4, 2, 16, 4), torch.float32, gen)
    out = torch.empty_like(q)
    prefill._prefill_triton(q, kv, tables, query_start, lens, 0.3, out, block_n=16)
    torch.testing.assert_close(out, prefill.paged_prefill_attention_ref(q, kv, tables, query_start, lens, 0.3),
                               **TOL[torch.float32])


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "H{}-KVH{}-Dh{}-BS{}".format(*s))
def test_prefill_ref_matches_sdpa_per_sequence(prefill, shape):
    gen = torch.Generator().manual_seed(22)
    query_lens, context_lens = zip(*PREFILL_SEQS)
    q, kv, tables, query_start, lens = _prefill_case(query_lens, context_lens, shape, torch.float32, gen)
    out = prefill.paged_prefill_attention_ref(q, kv, tables, query_start, lens, 0.2)
    expected = _sdpa_prefill_per_sequence(q, kv, tables, query_start, lens, 0.2)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_prefill_decode_agree_on_single_tokens(attn, prefill, triton_on_cpu):
    """A prefill step of one token per sequence is a decode step."""
    gen = torch.Generator().manual_seed(23)
    q, kv, tables, lens = _case([3, 17, 9], 4, 2, 16, 4, torch.float32, gen)
    chunked = prefill.paged_prefill_attention(q, kv, tables, torch.arange(4), lens, 0.3)
    torch.testing.assert_close(chunked, attn.paged_decode_attention(q, kv, tables, lens, 0.3), **TOL[torch.float32])


@pytest.mark.parametrize("query_lens", [[0], [1], [16, 0, 17, 33], [5] * 7])
def test_prefill_tiles_cover_each_query_once(prefill, query_lens):
    block_q = 16
    query_start = torch.tensor([0, *query_lens]).cumsum(0)
    num_tokens = sum(query_lens)
    seqs, firsts = prefill._prefill_tiles(query_start, num_tokens, block_q)
    assert seqs.shape == (math.ceil(num_tokens / block_q) + len(query_lens),)
    covered = []
    for seq, first in zip(seqs.tolist(), firsts.tolist()):
        if seq >= 0:
            assert first < query_lens[seq]
            covered += [(seq, i) for i in range(first, min(first + block_q, query_lens[seq]))]
    assert sorted(covered) == [(n, i) for n, q_len in enumerate(query_lens) for i in range(q_len)]


def test_prefill_dispatch_follows_device_and_env(prefill, monkeypatch):
    gen = torch.Generator().manual_seed(24)
    q, kv, tables, query_start, lens = _prefill_case([3, 2], [3, 9], (4, 2, 16, 4), torch.float32, gen)

    def fail(*args, **kwargs):
        raise AssertionError("Triton path taken")

    monkeypatch.setattr(prefill, "_prefill_triton", fail)
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    torch.testing.assert_close(prefill.paged_prefill_attention(q, kv, tables, query_start, lens, 0.3),
                               prefill.paged_prefill_attention_ref(q, kv, tables, query_start, lens, 0.3))
    monkeypatch.setenv(INTERPRET_ENV, "1")
    with pytest.raises(AssertionError, match="Triton path taken"):
        prefill.paged_prefill_attention(q, kv, tables, query_start, lens, 0.3)


def test_bench_smoke_writes_checked_cases(tmp_path, monkeypatch):
    """bench/bench_attention.py end to end on CPU (interpreter, tiny shapes), as the H200 run uses it."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv(INTERPRET_ENV, "1")  # the bench sets it for --device cpu; restored afterwards
    spec = importlib.util.spec_from_file_location("_bench_attention", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--device", "cpu", "--dtype", "float32", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                     "--block-size", "4", "--seqs", "2", "--contexts", "9", "--table-tokens", "32",
                     "--prefill", "2:9:5,1:6:0", "--warmup", "0", "--iters", "1"])
    result = json.loads((tmp_path / "attention.json").read_text())
    assert rc == 0
    [case] = result["cases"]
    assert (case["seqs"], case["context"], case["table_width"]) == (2, 9, 8)
    assert case["ok"] and case["torch_err"] < 1e-5 and case["floor_us"] > 0
    assert [(c["seqs"], c["query_len"], c["cached"]) for c in result["prefill"]] == [(2, 9, 5), (1, 6, 0)]
    assert all(c["ok"] and c["torch_err"] < 1e-5 and c["floor_us"] > 0 for c in result["prefill"])
    assert bench.main(["--device", "cpu", "--dtype", "bfloat16"]) == 2  # the interpreter mis-reads bf16


# --- a previous request's values never leak into another's attention ----------------------


def _stale(kv, tables, lens, fill):
    """A copy of `kv` with every slot outside the rows' contexts set to `fill`: what freed blocks
    (partly reused, or only named by table padding) may hold after a NaN-producing request."""
    block_size = kv.shape[2]
    live = torch.zeros(kv.shape[1] * block_size, dtype=torch.bool)
    for row, n in zip(tables.long(), lens.tolist()):
        positions = torch.arange(max(n, 0))
        live[row[positions // block_size] * block_size + positions % block_size] = True
    stale = kv.clone().flatten(1, 2)
    stale[:, ~live] = fill
    return stale.view_as(kv)


STALE_DECODE_LENS = [5, 17, 2, 9, 1]     # contexts ending mid-block (block size 4), tables padded with block 0


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_never_reads_stale_slots(attn, triton_on_cpu, fill, dtype):
    gen = torch.Generator().manual_seed(30)
    q, kv, tables, lens = _case(STALE_DECODE_LENS, 4, 2, 16, 4, dtype, gen, pad_blocks=2)
    clean, stale = _stale(kv, tables, lens, 0.0), _stale(kv, tables, lens, fill)
    expected = attn.paged_decode_attention_ref(q, clean, tables, lens, 0.25)
    assert expected.isfinite().all()
    assert torch.equal(attn.paged_decode_attention_ref(q, stale, tables, lens, 0.25), expected)
    for num_splits in (1, 3):
        outs = []
        for cache in (clean, stale):
            outs.append(torch.empty_like(q))
            attn._decode_triton(q, cache, tables, lens, 0.25, outs[-1], num_splits=num_splits, block_n=16)
        assert torch.equal(outs[0], outs[1]) and outs[1].isfinite().all()


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_prefill_never_reads_stale_slots(prefill, triton_on_cpu, fill):
    gen = torch.Generator().manual_seed(31)
    q, kv, tables, query_start, lens = _prefill_case([3, 6, 1], [10, 6, 7], (4, 2, 16, 4), torch.float32, gen)
    clean, stale = _stale(kv, tables, lens, 0.0), _stale(kv, tables, lens, fill)
    expected = prefill.paged_prefill_attention_ref(q, clean, tables, query_start, lens, 0.3)
    assert expected.isfinite().all()
    assert torch.equal(prefill.paged_prefill_attention_ref(q, stale, tables, query_start, lens, 0.3), expected)
    outs = [prefill.paged_prefill_attention(q, cache, tables, query_start, lens, 0.3) for cache in (clean, stale)]
    assert torch.equal(outs[0], outs[1]) and outs[1].isfinite().all()


def _new_token_slots(tables, query_lens, context_lens, block_size) -> torch.Tensor:
    """The cache slots of each sequence's new tokens (its last query_len positions), in token order."""
    return torch.cat([tables[n, p // block_size] * block_size + p % block_size
                      for n, (ql, cl) in enumerate(zip(query_lens, context_lens)) for p in [torch.arange(cl - ql, cl)]])


def test_model_attention_never_reads_stale_slots():
    """The model's own path on CPU: SDPA over gathered blocks for prefill chunks, the torch twin for decode."""
    from multilora.model.attention import AttentionMetadata, paged_attention

    gen = torch.Generator().manual_seed(32)
    # Two prefill chunks (one after cached tokens, one whole prompt), then three decode rows.
    query_lens, context_lens = [3, 6, 1, 1, 1], [10, 6, 5, 17, 2]
    q, kv, tables, query_start, lens = _prefill_case(query_lens, context_lens, (4, 2, 16, 4), torch.float32, gen)
    block_size = kv.shape[2]
    slots = _new_token_slots(tables, query_lens, context_lens, block_size)
    outs = []
    for cache in (_stale(kv, tables, lens, 0.0), _stale(kv, tables, lens, float("nan"))):
        k_new, v_new = (cache[i].flatten(0, 1)[slots] for i in (0, 1))
        meta = AttentionMetadata(slots, [3, 6], [10, 6], [tables[0], tables[1]], num_prefill_tokens=9,
                                 decode_block_tables=tables[2:].int(), decode_context_lens=lens[2:].int())
        outs.append(paged_attention(q, k_new, v_new, cache, meta, 0.3))
    assert torch.equal(outs[0], outs[1]) and outs[1].isfinite().all()


def test_model_attention_batches_runs_of_equal_whole_prompts():
    """Consecutive whole prompts of one length share one SDPA call; a chunk after cached tokens, or a
    prompt of another length, starts a new call. Every sequence still sees only its own keys."""
    from multilora.model.attention import AttentionMetadata, _prefill_runs, paged_attention

    gen = torch.Generator().manual_seed(33)
    # The chunk after cached tokens has the prompts' length: it must still get a call of its own.
    query_lens, context_lens = [4, 4, 4, 4, 4, 4, 6], [4, 4, 4, 9, 4, 4, 6]
    q, kv, tables, query_start, lens = _prefill_case(query_lens, context_lens, (4, 2, 16, 4), torch.float32, gen)
    block_size = kv.shape[2]
    slots = _new_token_slots(tables, query_lens, context_lens, block_size)
    k_new, v_new = (kv[i].flatten(0, 1)[slots] for i in (0, 1))
    widths = [math.ceil(c / block_size) for c in context_lens]
    meta = AttentionMetadata(slots, query_lens, context_lens, [tables[n, :w] for n, w in enumerate(widths)],
                             num_prefill_tokens=len(slots))
    assert [(r.start, r.stop, count) for r, count, *_ in _prefill_runs(meta)] == [
        (0, 12, 3), (12, 16, 1), (16, 24, 2), (24, 30, 1)]
    out = paged_attention(q, k_new, v_new, kv, meta, 0.3)
    expected = _sdpa_prefill_per_sequence(q, kv, tables, query_start, lens, 0.3)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("num_seqs", [1, 16, 256])
def test_cuda_bf16_llama_shapes_match_ref(num_seqs):
    from multilora_kernels.attention import paged_decode_attention, paged_decode_attention_ref

    gen = torch.Generator(device="cuda").manual_seed(12)
    kw = dict(device="cuda", generator=gen)
    lens = torch.randint(1, 2048, (num_seqs,), **kw)
    lens[0] = 2048
    kv = torch.randn(2, num_seqs * 128 + 1, 16, 8, 128, **kw).bfloat16()
    tables = (torch.randperm(num_seqs * 128, **kw).view(num_seqs, 128) + 1).int()
    q = torch.randn(num_seqs, 32, 128, **kw).bfloat16()
    out = paged_decode_attention(q, kv, tables, lens, 128 ** -0.5)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, kv, tables, lens, 128 ** -0.5), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_prefill_llama_shapes_match_ref():
    from multilora_kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref

    gen = torch.Generator(device="cuda").manual_seed(13)
    kw = dict(device="cuda", generator=gen)
    query_lens = torch.tensor([512, 1, 300, 1000], device="cuda")
    lens = query_lens + torch.tensor([0, 700, 2000, 48], device="cuda")
    kv = torch.randn(2, 4 * 256 + 1, 16, 8, 128, **kw).bfloat16()
    tables = (torch.randperm(4 * 256, **kw).view(4, 256) + 1).int()
    query_start = torch.cat([query_lens.new_zeros(1), query_lens.cumsum(0)]).int()
    q = torch.randn(int(query_lens.sum()), 32, 128, **kw).bfloat16()
    out = paged_prefill_attention(q, kv, tables, query_start, lens, 128 ** -0.5)
    expected = paged_prefill_attention_ref(q, kv, tables, query_start, lens, 128 ** -0.5)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
