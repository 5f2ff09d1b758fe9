"""bench/bench_lora_overlap.py's variants on a CPU (the torch twins): `serial` is the base GEMM plus each
token's adapter delta, `base` the GEMM alone (the CUDA-only variants need streams and graphs)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import bench_lora_overlap  # noqa: E402
import multilora_kernels.lora as kernels  # noqa: E402


def test_serial_adds_each_tokens_adapter_delta_to_the_gemm():
    torch.manual_seed(0)
    layer = bench_lora_overlap.make_layer(32, (16, 8), slots=3, rank=4, device=torch.device("cpu"))
    layer = {k: (v.float() if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v) for k, v in layer.items()}
    x = torch.randn(5, 32)
    slots = torch.tensor([0, 2, -1, 1, 2], dtype=torch.int32)
    meta = kernels.build_lora_meta(slots, 3)
    base = bench_lora_overlap.variant_fn("base", meta, None, kernels)(x, layer)
    serial = bench_lora_overlap.variant_fn("serial", meta, None, kernels)(x, layer)
    torch.testing.assert_close(base, x @ layer["w"].T)
    for t, s in enumerate(slots.tolist()):
        expected = x[t] @ layer["w"].T
        if s >= 0:
            for i, (lo, hi) in enumerate(((0, 16), (16, 24))):
                delta = (x[t] @ layer["a"][s, i].T) @ layer["b"][s, lo:hi].T * layer["scales"][s, i]
                expected[lo:hi] += delta
        torch.testing.assert_close(serial[t], expected, rtol=1e-4, atol=1e-4)


def test_the_cublas_expand_over_row_blocks_equals_the_kernels():
    torch.manual_seed(1)
    layer = bench_lora_overlap.make_layer(32, (16, 8), slots=4, rank=4, device=torch.device("cpu"))
    layer = {k: (v.float() if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v) for k, v in layer.items()}
    x = torch.randn(7, 32)
    slots = [2, 2, 2, -1, 0, 0, 3]
    blocks = bench_lora_overlap.row_blocks(slots)
    assert blocks == [(2, 0, 3), (0, 4, 6), (3, 6, 7)]
    meta = kernels.build_lora_meta(torch.tensor(slots, dtype=torch.int32), 4)
    serial = bench_lora_overlap.variant_fn("serial", meta, None, kernels)(x, layer)
    cublas = bench_lora_overlap.variant_fn("serial_cublas", meta, None, kernels, blocks)(x, layer)
    torch.testing.assert_close(cublas, serial, rtol=1e-5, atol=1e-5)
