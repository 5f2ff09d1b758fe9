"""Every Triton kernel compiles for an H200 (sm_90), ahead of time, without a GPU.

The other kernel tests run the kernels under the interpreter, which accepts what the
compiler refuses (non-constexpr tl.arange bounds, tl.dot with a dim < 16, dtype
mismatches, bf16 ops). Here each kernel goes through Triton's real pipeline
(TTIR -> TTGIR -> LLVM -> PTX -> cubin via ptxas) for `GPUTarget("cuda", 90, 32)`,
with the arguments its launcher passes at Llama-3-8B shapes (hidden 4096, 32 heads,
8 KV heads, head_dim 128, intermediate 14336, LoRA rank 16/64, KV block 16, batches
of 1/64/8192 tokens).

The signatures mimic the JIT's specialization: an int argument equal to 1 becomes the
constexpr 1, ints and (all, since torch allocations are 256-byte aligned) pointers
divisible by 16 carry `tt.divisibility`, ints past int32 are i64. So a case compiles
what `kernel[grid](...)` would compile on the GPU.

MULTILORA_AOT_FULL=1 compiles every dtype x shape; the default set (bf16 at every
shape, fp16/fp32 at one) stays well under a minute on a 2-core machine.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402

H200 = GPUTarget("cuda", 90, 32)
INTERPRET_ENVS = ("MULTILORA_TRITON_INTERPRET_KERNELS", "TRITON_INTERPRET")
FULL = os.environ.get("MULTILORA_AOT_FULL") == "1"

# Llama-3-8B
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 4096, 32, 8, 128, 14336
QKV = HIDDEN + 2 * KV_HEADS * HEAD_DIM
BLOCK_SIZE, NUM_BLOCKS, MAX_BLOCKS_PER_SEQ = 16, 20000, 512
KV_STRIDE = NUM_BLOCKS * BLOCK_SIZE * KV_HEADS * HEAD_DIM
SLOT_STRIDE = 180_000_000  # one adapter slot's weights (all layers) in adapter_slot_weights' layout
TOKENS = (1, 64, 8192)
DTYPES = ("bf16", "fp16", "fp32")
TORCH_PRECISION = {"bf16": "tf32", "fp16": "tf32", "fp32": "ieee"}  # _launch.precision


def _have_nvidia_backend() -> str | None:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # noqa: BLE001  (any import failure means: cannot compile here)
        return f"triton's NVIDIA backend is unavailable: {e!r}"
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not (os.path.exists(bundled) or shutil.which("ptxas") or os.environ.get("TRITON_PTXAS_PATH")):
        return "no ptxas (neither triton's bundled one nor on PATH)"
    return None


pytestmark = pytest.mark.skipif(_have_nvidia_backend() is not None, reason=str(_have_nvidia_backend()))


@pytest.fixture(scope="module")
def kernels():
    """Fresh imports of the kernel modules with compiled (not interpreted) @triton.jit kernels.

    Other tests import them interpreted (Triton picks the mode at decoration), so the
    modules are re-imported with the interpret switches off and sys.modules restored after.
    """
    names = [n for n in sys.modules if n == "multilora_kernels" or n.startswith("multilora_kernels.")]
    saved_mods = {n: sys.modules.pop(n) for n in names}
    saved_env = {k: os.environ.pop(k) for k in INTERPRET_ENVS if k in os.environ}
    try:
        mods = {n: importlib.import_module(f"multilora_kernels.{n}")
                for n in ("lora", "attention", "prefill_attention", "norm", "rotary", "activation", "sampling")}
        if saved_env.get("TRITON_INTERPRET") == "1" or triton.knobs.runtime.interpret:
            pytest.skip("TRITON_INTERPRET=1 makes every @triton.jit interpreted in this process")
        yield mods
    finally:
        for n in [n for n in sys.modules if n == "multilora_kernels" or n.startswith("multilora_kernels.")]:
            del sys.modules[n]
        sys.modules.update(saved_mods)
        os.environ.update(saved_env)


def _compile(fn, args: dict, constexprs: dict, num_warps: int = 4, num_stages: int = 3):
    """triton.compile `fn` for sm_90 as the JIT would specialize `args` (name -> '*dtype' | int | float),
    launched dependent as on an H200 (PDL, see _launch.wait_for_inputs)."""
    constexprs = {"PDL": True, **constexprs}
    assert set(args) | set(constexprs) == set(fn.arg_names), (
        f"{fn.__name__}: missing {set(fn.arg_names) - set(args) - set(constexprs)}, "
        f"unknown {set(args) | set(constexprs) - set(fn.arg_names)}")
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name], consts[name] = "constexpr", constexprs[name]
            continue
        value = args[name]
        if isinstance(value, str):  # a pointer, 16-byte aligned like every torch allocation
            signature[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:  # the JIT turns 1 into a constexpr
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=H200, options={"num_warps": num_warps, "num_stages": num_stages})


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
REPORT = os.environ.get("MULTILORA_AOT_REPORT")  # a JSON path: every case's registers, spills, shared memory


def _resources(cubin: bytes) -> dict:
    """cuobjdump's resource usage of the cubin's kernel (REG, STACK, SHARED, LOCAL, ...), {} without cuobjdump."""
    if not os.path.exists(CUOBJDUMP):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True).stdout
    line = next((ln for ln in out.splitlines() if "REG:" in ln), "")
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


def _check_compiled(compiled, dtype: str = "bf16") -> None:
    """A real sm_90 cubin that fits an H200 SM: 227 KB of shared memory per block, and for the
    serving dtypes (bf16/fp16) no register spills. fp32 (CPU tests, exactness checks on a GPU)
    may spill: an fp32 tl.dot is FMA code on sm_90, not tensor cores."""
    assert compiled.asm.get("cubin"), "no cubin produced"
    assert ".target sm_90" in compiled.asm["ptx"]
    assert compiled.metadata.shared <= 227 * 1024, f"needs {compiled.metadata.shared} B of shared memory"
    res = _resources(compiled.asm["cubin"])
    if REPORT:
        _REPORT_ROWS.append(dict(kernel=compiled.metadata.name, num_warps=compiled.metadata.num_warps,
                                 shared=compiled.metadata.shared,
                                 case=os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[-1].split(" ")[0], **res))
    # Local memory = spilled registers: a silent slowdown the interpreter can never show.
    if dtype != "fp32":
        assert res.get("LOCAL", 0) == 0 and res.get("STACK", 0) == 0, f"{compiled.metadata.name} spills: {res}"


_REPORT_ROWS: list[dict] = []


@pytest.fixture(scope="module", autouse=True)
def _write_report():
    yield
    if REPORT and _REPORT_ROWS:
        with open(REPORT, "w") as f:
            json.dump(_REPORT_ROWS, f, indent=1)


def _cases(dtype_shapes):
    """(dtype, tokens) pairs: bf16 at every batch size, fp16/fp32 at one (all with MULTILORA_AOT_FULL=1)."""
    if FULL:
        return [(d, t) for d in DTYPES for t in dtype_shapes]
    return [("bf16", t) for t in dtype_shapes] + [(d, dtype_shapes[-1]) for d in ("fp16", "fp32")]


def _block_m(tokens: int) -> int:
    return 16 if tokens <= 128 else 32 if tokens <= 1024 else 64  # lora._block_m_for


# ----------------------------------------------------------------------------- LoRA


LORA_LAYERS = {  # name: (slices, H_in)
    "qkv": ((HIDDEN, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM), HIDDEN),
    "down": ((HIDDEN,), INTER),
    "gate_up": ((INTER, INTER), HIDDEN),
}


def _lora_cases():
    """Every layer x rank at 64 tokens; qkv/16 and down/64 at the other shapes (all: MULTILORA_AOT_FULL=1)."""
    return [(d, t, layer, rank) for d, t in _cases(TOKENS) for layer in sorted(LORA_LAYERS) for rank in (16, 64)
            if FULL or t == 64 or (layer, rank) in (("qkv", 16), ("down", 64))]


@pytest.mark.parametrize("dtype,tokens,layer,rank", _lora_cases())
def test_lora_kernels_compile(kernels, dtype, tokens, layer, rank):
    lora = kernels["lora"]
    slices, k = LORA_LAYERS[layer]
    n, nr = len(slices), len(slices) * rank
    block_m = _block_m(tokens)
    # The launchers' own tiling, with as many tiles as 8 adapters give at this token count.
    shrink = lora.shrink_config(block_m, triton.cdiv(tokens, block_m) + min(8, tokens), k, nr)
    precision = TORCH_PRECISION[dtype]
    idx = "*i32"
    _check_compiled(_compile(lora._lora_shrink_kernel, dict(
        x_ptr=f"*{dtype}", a_ptr=f"*{dtype}", out_ptr="*fp32",
        sorted_ids_ptr=idx, tile_slots_ptr=idx, tile_starts_ptr=idx, tile_ends_ptr=idx,
        K=k, NR=nr, R=rank, K_PER_SPLIT=shrink.k_per_split,
        stride_xt=k, stride_xk=1, stride_as=SLOT_STRIDE, stride_ai=rank * k, stride_ar=k, stride_ak=1,
        stride_op=tokens * nr, stride_ot=nr, stride_or=1,
    ), dict(BLOCK_M=block_m, BLOCK_N=shrink.block_n, BLOCK_K=shrink.block_k, PRECISION=precision)), dtype)
    width = sum(slices)
    expand = lora.expand_config(block_m, rank)
    strides = dict(
        stride_bp=tokens * nr, stride_bt=nr, stride_br=1,
        # Slot layout: B's columns contiguous, its rank stride spans every layer's rank row.
        stride_bs=SLOT_STRIDE, stride_bn=1, stride_bk=2_800_000,
        stride_yt=QKV if layer == "qkv" else width, stride_yn=1, stride_ss=n, stride_si=1)
    pointers = dict(buf_ptr="*fp32", b_ptr=f"*{dtype}", y_ptr=f"*{dtype}", scales_ptr="*fp32", slice_starts_ptr=idx)
    _check_compiled(_compile(lora._lora_expand_kernel, dict(
        **pointers, sorted_ids_ptr=idx, tile_slots_ptr=idx, tile_starts_ptr=idx, tile_ends_ptr=idx,
        R=rank, P=shrink.planes, **strides,
    ), dict(BLOCK_M=block_m, BLOCK_N=expand.block_n, BLOCK_R=expand.block_r,
            PRECISION=precision), num_warps=expand.num_warps), dtype)
    per_token = lora.expand_config(block_m, rank, per_token=True)   # tokens spread over many adapters
    _check_compiled(_compile(lora._lora_expand_token_kernel, dict(**pointers, token_slots_ptr=idx, R=rank, **strides),
                             dict(P=shrink.planes, BLOCK_N=per_token.block_n, BLOCK_R=per_token.block_r),
                             num_warps=per_token.num_warps), dtype)


# ----------------------------------------------------------------------------- attention


@pytest.mark.parametrize("dtype,seqs", _cases(TOKENS))
def test_decode_attention_compiles(kernels, dtype, seqs):
    att = kernels["attention"]
    capacity = MAX_BLOCKS_PER_SEQ * BLOCK_SIZE
    splits = att._num_splits(seqs, KV_HEADS, capacity, att._BLOCK_N, att._H200_SMS)
    group = HEADS // KV_HEADS
    _check_compiled(_compile(att._decode_kernel, dict(
        q_ptr=f"*{dtype}", kv_ptr=f"*{dtype}", block_tables_ptr="*i32", context_lens_ptr="*i64",
        out_ptr=f"*{dtype}",
        # Unsplit, the launcher passes `out` for the unused partial buffers.
        part_out_ptr="*fp32" if splits > 1 else f"*{dtype}", part_ml_ptr="*fp32" if splits > 1 else f"*{dtype}",
        scale_log2=HEAD_DIM ** -0.5 * att._LOG2E, capacity=capacity, num_splits=splits,
        stride_qd=QKV, stride_qh=HEAD_DIM, stride_kv=KV_STRIDE, stride_nb=BLOCK_SIZE * KV_HEADS * HEAD_DIM,
        stride_bs=KV_HEADS * HEAD_DIM, stride_kh=HEAD_DIM, stride_btd=MAX_BLOCKS_PER_SEQ,
        stride_od=HEADS * HEAD_DIM, stride_oh=HEAD_DIM,
    ), dict(GROUP=group, HEAD_DIM=HEAD_DIM, BLOCK_SIZE=BLOCK_SIZE, BLOCK_G=max(16, triton.next_power_of_2(group)),
            BLOCK_D=HEAD_DIM, BLOCK_N=att._BLOCK_N, SPLIT=splits > 1, PRECISION=TORCH_PRECISION[dtype],
            NUM_STAGES=att._NUM_STAGES), num_warps=att._NUM_WARPS, num_stages=3), dtype)
    if splits > 1:
        _check_compiled(_compile(att._reduce_kernel, dict(
            part_out_ptr="*fp32", part_ml_ptr="*fp32", context_lens_ptr="*i64", out_ptr=f"*{dtype}",
            capacity=capacity, num_splits=splits, stride_od=HEADS * HEAD_DIM, stride_oh=HEAD_DIM,
        ), dict(HEAD_DIM=HEAD_DIM, BLOCK_D=HEAD_DIM, BLOCK_N=att._BLOCK_N,
                BLOCK_S=triton.next_power_of_2(splits)), num_warps=4), dtype)


@pytest.mark.parametrize("dtype,tokens", _cases((64, 8192)))
def test_prefill_attention_compiles(kernels, dtype, tokens):
    pre = kernels["prefill_attention"]
    group = HEADS // KV_HEADS
    block_q = max(1, pre._PREFILL_ROWS // group)
    _check_compiled(_compile(pre._prefill_kernel, dict(
        q_ptr=f"*{dtype}", kv_ptr=f"*{dtype}", block_tables_ptr="*i32", context_lens_ptr="*i64",
        query_start_ptr="*i64", out_ptr=f"*{dtype}", tile_seqs_ptr="*i32", tile_firsts_ptr="*i32",
        scale_log2=HEAD_DIM ** -0.5 * pre._LOG2E, capacity=MAX_BLOCKS_PER_SEQ * BLOCK_SIZE,
        stride_qt=QKV, stride_qh=HEAD_DIM, stride_kv=KV_STRIDE, stride_nb=BLOCK_SIZE * KV_HEADS * HEAD_DIM,
        stride_bs=KV_HEADS * HEAD_DIM, stride_kh=HEAD_DIM, stride_btn=MAX_BLOCKS_PER_SEQ,
        stride_ot=HEADS * HEAD_DIM, stride_oh=HEAD_DIM,
    ), dict(GROUP=group, HEAD_DIM=HEAD_DIM, BLOCK_SIZE=BLOCK_SIZE, BLOCK_Q=block_q,
            BLOCK_M=max(16, triton.next_power_of_2(block_q * group)), BLOCK_D=HEAD_DIM,
            BLOCK_N=pre._PREFILL_BLOCK_N, PRECISION=TORCH_PRECISION[dtype], NUM_STAGES=pre._NUM_STAGES),
        num_warps=pre._NUM_WARPS, num_stages=3), dtype)


# ----------------------------------------------------------------------------- fused elementwise


def _lora_delta_args(dtype: str, rank: int | None, slices: int, planes: int = 12, tokens: int = 64):
    """A consumer kernel's LoRADelta arguments and constexprs (`delta_kernel_args`) for a decode step of
    `tokens` with a delta of `slices` slices of rank `rank` (None: no delta, the placeholders)."""
    if rank is None:
        args = dict(buf_ptr=f"*{dtype}", b_ptr=f"*{dtype}", scales_ptr=f"*{dtype}", token_slots_ptr=f"*{dtype}",
                    R=0, **{name: 0 for name in STRIDES})
        return args, dict(HAS_LORA=False, LORA_P=1, LORA_BLOCK_R=16)
    nr = slices * rank
    args = dict(buf_ptr="*fp32", b_ptr=f"*{dtype}", scales_ptr="*fp32", token_slots_ptr="*i32", R=rank,
                stride_bp=tokens * nr, stride_bt=nr, stride_br=1, stride_bs=SLOT_STRIDE, stride_bn=1,
                stride_bk=2_800_000, stride_ss=slices, stride_si=1)
    return args, dict(HAS_LORA=True, LORA_P=planes, LORA_BLOCK_R=max(16, triton.next_power_of_2(rank)))


STRIDES = ("stride_bp", "stride_bt", "stride_br", "stride_bs", "stride_bn", "stride_bk", "stride_ss", "stride_si")


@pytest.mark.parametrize("rank", [None, 16, 64])
@pytest.mark.parametrize("has_residual", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_compiles(kernels, dtype, has_residual, rank):
    block_h = triton.next_power_of_2(HIDDEN)
    lora_args, lora_meta = _lora_delta_args(dtype, rank, 1)
    _check_compiled(_compile(kernels["norm"]._add_rms_norm_kernel, dict(
        x_ptr=f"*{dtype}", res_ptr=f"*{dtype}", w_ptr=f"*{dtype}", out_ptr=f"*{dtype}", res_out_ptr=f"*{dtype}",
        H=HIDDEN, eps=1e-5, stride_x=HIDDEN, stride_r=HIDDEN, stride_o=HIDDEN, stride_ro=HIDDEN, **lora_args,
    ), dict(HAS_RESIDUAL=has_residual, BLOCK_H=block_h, **lora_meta),
        num_warps=min(16, max(1, block_h // 256))), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_compiles(kernels, dtype):
    half = HEAD_DIM // 2
    _check_compiled(_compile(kernels["rotary"]._rotary_kv_kernel, dict(
        q_ptr=f"*{dtype}", k_ptr=f"*{dtype}", v_ptr=f"*{dtype}", cos_ptr=f"*{dtype}", sin_ptr=f"*{dtype}",
        cache_ptr=f"*{dtype}", slot_mapping_ptr="*i64", num_heads=HEADS, num_kv_heads=KV_HEADS,
        stride_qt=QKV, stride_qh=HEAD_DIM, stride_kt=QKV, stride_kh=HEAD_DIM, stride_vt=QKV, stride_vh=HEAD_DIM,
        stride_ct=half, stride_kv=KV_STRIDE, stride_slot=KV_HEADS * HEAD_DIM, stride_ch=HEAD_DIM,
    ), dict(HALF=half, BLOCK_HALF=half, BLOCK_HQ=HEADS, BLOCK_HKV=KV_HEADS),
        num_warps=min(8, max(1, HEADS * half // 512))), dtype)


@pytest.mark.parametrize("rank", [None, 16, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_compiles(kernels, dtype, rank):
    act = kernels["activation"]
    lora_args, lora_meta = _lora_delta_args(dtype, rank, 2)
    _check_compiled(_compile(act._silu_and_mul_kernel, dict(
        x_ptr=f"*{dtype}", out_ptr=f"*{dtype}", I=INTER, stride_x=2 * INTER, stride_o=INTER, **lora_args,
    ), dict(BLOCK=act._BLOCK, **lora_meta), num_warps=4), dtype)


def test_sampling_draw_compiles(kernels):
    sampling = kernels["sampling"]
    vocab = 128256                           # Llama 3
    _check_compiled(_compile(sampling._block_argmax_kernel, dict(
        probs_ptr="*fp32", noise_ptr="*fp32", best_ptr="*fp32", best_id_ptr="*i64",
        V=vocab, stride_p=vocab, stride_n=vocab, num_blocks=-(-vocab // sampling._BLOCK),
    ), dict(BLOCK=sampling._BLOCK), num_warps=8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_sampling_window_softmax_input_compiles(kernels, dtype):
    sampling = kernels["sampling"]
    vocab, window = 128256, 50 + 256                     # Llama 3, top_k 50 and the tie margin
    _check_compiled(_compile(sampling._window_softmax_input_kernel, dict(
        logits_ptr=f"*{dtype}", best_ptr=f"*{dtype}", ranked_ptr=f"*{dtype}", kth_index_ptr="*i64",
        scale_ptr="*fp32", out_ptr="*fp32", V=vocab, W=window, stride_l=vocab, stride_r=window, stride_o=vocab,
    ), dict(DIVIDE=False, BLOCK=sampling._BLOCK), num_warps=8), dtype)


@pytest.mark.parametrize("window", [1 + 256, 50 + 256, 500 + 256, 1024 + 256])     # top_k 1 ... the window limit
def test_sampling_rank_window_compiles(kernels, window):
    sampling = kernels["sampling"]
    vocab, block_w = 128256, triton.next_power_of_2(window)
    _check_compiled(_compile(sampling._rank_window_kernel, dict(
        probs_ptr="*fp32", ids_ptr="*i64", ranked_ptr="*fp32", ranked_ids_ptr="*i64",
        W=window, stride_p=vocab, stride_i=window, stride_r=window,
    ), dict(BLOCK_W=block_w, CHUNK=sampling._rank_chunk(block_w)), num_warps=8))
