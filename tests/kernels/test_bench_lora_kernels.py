"""The LoRA kernel benchmark runs end to end (CPU smoke mode: Triton interpreter, tiny shapes)."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_lora_kernels.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("_bench_lora_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_smoke_writes_checked_cases(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    # The bench sets it for --device cpu; registering it here restores it afterwards.
    monkeypatch.setenv("MULTILORA_TRITON_INTERPRET_KERNELS", "1")
    bench = _load_bench()
    rc = bench.main(["--device", "cpu", "--dtype", "float32", "--shape-div", "64", "--tokens", "5",
                     "--mixes", "base_mix", "--layers", "qkv", "--slots", "4", "--rank", "8",
                     "--elementwise-tokens", "3", "--warmup", "0", "--iters", "1"])
    result = json.loads((tmp_path / "lora_kernels.json").read_text())
    assert rc == 0
    assert [(c["layer"], c["op"], c["tokens"]) for c in result["cases"]] == [
        ("qkv", "shrink", 5), ("qkv", "expand", 5),
        ("add_rms_norm", "fused", 3), ("rotary_kv_write", "fused", 3), ("silu_and_mul", "fused", 3)]
    qkv = result["cases"][0]
    assert (qkv["h_in"], qkv["h_out"], qkv["slices"]) == (64, 96, [64, 16, 16])
    assert all(c["ok"] and c["floor_us"] > 0 for c in result["cases"])


def test_bench_times_tiling_and_split_variants_each_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("MULTILORA_TRITON_INTERPRET_KERNELS", "1")
    bench = _load_bench()
    rc = bench.main(["--device", "cpu", "--dtype", "float32", "--shape-div", "64", "--tokens", "6",
                     "--mixes", "distinct", "--layers", "o", "--slots", "4", "--rank", "8", "--suite", "lora",
                     "--expand-tiles", "32x2,tile:32x4", "--shrink-splits", "2", "--warmup", "0", "--iters", "1"])
    result = json.loads((tmp_path / "lora_kernels.json").read_text())
    assert rc == 0
    assert [c["op"] for c in result["cases"]] == ["shrink", "expand", "expand[32x2]", "expand[tile:32x4]", "shrink[split2]",
                                                  "expand[split2]", "expand[split2,32x2]", "expand[split2,tile:32x4]"]
    assert all(c["ok"] for c in result["cases"])


def test_bench_times_a_baseline_kernel_file_beside_the_tree(tmp_path, monkeypatch):
    """--baseline: another version of kernels/lora.py (here a copy), timed and checked on the same cases."""
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("MULTILORA_TRITON_INTERPRET_KERNELS", "1")
    baseline = tmp_path / "lora_before.py"
    baseline.write_text((BENCH.parents[1] / "kernels" / "lora.py").read_text())
    bench = _load_bench()
    rc = bench.main(["--device", "cpu", "--dtype", "float32", "--shape-div", "64", "--tokens", "6",
                     "--mixes", "distinct", "--layers", "o", "--slots", "4", "--rank", "8", "--suite", "lora",
                     "--shrink-splits", "2", "--baseline", str(baseline), "--warmup", "0", "--iters", "1"])
    result = json.loads((tmp_path / "lora_kernels.json").read_text())
    assert rc == 0
    assert [c["op"] for c in result["cases"]] == ["shrink", "expand", "shrink[split2]", "expand[split2]",
                                                  "shrink[baseline]", "expand[baseline]"]
    assert all(c["ok"] for c in result["cases"])


def test_bench_refuses_cuda_without_gpu_or_bf16_on_cpu(capsys):
    bench = _load_bench()
    assert bench.main(["--device", "cpu", "--dtype", "bfloat16"]) == 2
    assert "bfloat16" in capsys.readouterr().err
