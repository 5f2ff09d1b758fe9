"""The kernels one decode forward launches, per layer: a guard against slow paths creeping back.

The model runs on CPU through the GPU code path: `use_triton` says yes, Triton
launches are counted instead of run (their outputs are left as allocated), the
paged decode attention kernel is counted as one launch, and every other aten op
that would launch a GPU kernel is counted by a TorchDispatchMode (views and
allocations launch none). Values are garbage; the control flow is the decode
step's, driven through `AttentionMetadata` as the model runner and the CUDA
graph drive it. Never a timing.

The design's budget per decoder layer (model/llama.py's docstring):
  no adapter in the step (mapping None):  4 GEMMs + 4 fused kernels + attention = 9
    fused kernels: residual add + RMSNorm x2, rotary + KV write, SiLU-and-mul
  with adapters:  + one LoRA shrink per projection (4) + one expand (q/k/v's) = 14: the expands of
    o_proj, gate_up and down_proj are added by the norm after o_proj, SiLU-and-mul and the next
    layer's input norm as they read those outputs (LoRALinear.forward_deferred); 17 before that
Counted the same way, the code before the fusion launched ~35 per layer without LoRA
(7 GEMMs; RMSNorm as pow/mean/add/rsqrt/mul/mul twice; rotary as mul/neg/cat/mul/add
for q and k; two KV index copies; two residual adds; SiLU; mul) and 21 more with
LoRA (7 shrinks, 7 expands, 7 zero fills). Attention counts as one launch here
(its own kernels are kernels/attention.py's business).
"""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import multilora.model.attention as model_attention
from multilora.lora.mapping import lora_step
from multilora_kernels import _launch
from multilora_kernels.lora import build_lora_meta

from helpers.tiny_decode import NUM_LAYERS, decode_inputs, tiny_llama

BASE_BUDGET = 9
LORA_BUDGET = 14
OUTSIDE_LAYERS_BUDGET = 10  # embedding, the step's cos/sin, final norm
# Ops that launch no kernel: metadata, aliasing, allocation.
_FREE = {"empty", "empty_like", "empty_strided", "detach", "lift_fresh", "_unsafe_view", "alias", "split",
         "split_with_sizes", "unbind", "chunk", "view", "_reshape_alias", "as_strided"}


class _KernelCounter(TorchDispatchMode):
    """Counts (where, kernel) for aten ops that launch a kernel and for counted Triton launches."""

    def __init__(self):
        super().__init__()
        self.where = "model"
        self.active = False
        self.counts: dict[str, Counter] = {}

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def record(self, name: str) -> None:
        if self.active:
            self.counts.setdefault(self.where, Counter())[name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _FREE:
            self.record(f"aten.{name}")
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_slots=2, max_rank=8)


def _count(model, monkeypatch, token_slots):
    """Kernels per place ('layer i' / 'model') of one decode forward, after a warm-up forward."""
    counter = _KernelCounter()

    def fake_launch(kernel, grid, device, *args, **meta):
        counter.record(f"triton.{kernel.fn.__name__}")

    def fake_decode_attention(q, kv_cache, block_tables, context_lens, scale, out=None):
        counter.record("triton.paged_decode_attention")
        return out

    monkeypatch.setattr(_launch, "use_triton", lambda t: True)
    monkeypatch.setattr(_launch, "launch", fake_launch)
    monkeypatch.setattr(model_attention, "paged_decode_attention", fake_decode_attention)
    hooks = []
    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: setattr(counter, "where", f"layer {i}")))
        hooks.append(layer.register_forward_hook(lambda m, a, o: setattr(counter, "where", "model")))
    input_ids, positions, kv_caches, meta = decode_inputs(model)
    lora_meta = None if token_slots is None else build_lora_meta(torch.tensor(token_slots), 2)
    try:
        with torch.inference_mode(), lora_step(lora_meta):
            model(input_ids, positions, kv_caches, meta)  # warm-up: one-time caches, as before a graph capture
            with counter:
                model(input_ids, positions, kv_caches, meta)
    finally:
        for hook in hooks:
            hook.remove()
    return counter.counts


def _total(counts: Counter) -> int:
    return sum(counts.values())


def test_decode_layer_without_adapters_stays_in_budget(model, monkeypatch):
    counts = _count(model, monkeypatch, None)
    for i in range(NUM_LAYERS):
        layer = counts[f"layer {i}"]
        assert _total(layer) <= BASE_BUDGET, f"layer {i}: {_total(layer)} kernels > {BASE_BUDGET}: {layer}"
        assert not any("lora" in name for name in layer), f"LoRA launched in an adapter-free step: {layer}"
        gemms = sum(n for name, n in layer.items() if name in ("aten.linear", "aten.mm", "aten.addmm"))
        assert gemms == 4, f"layer {i}: {gemms} GEMMs, expected q/k/v, o, gate/up, down: {layer}"
    assert _total(counts["model"]) <= OUTSIDE_LAYERS_BUDGET, counts["model"]


@pytest.mark.parametrize("token_slots", [[0, 1, -1, 0, 1], [1, 1, 1, 1, 1]])
def test_decode_layer_with_adapters_stays_in_budget(model, monkeypatch, token_slots):
    counts = _count(model, monkeypatch, token_slots)
    for i in range(NUM_LAYERS):
        layer = counts[f"layer {i}"]
        assert _total(layer) <= LORA_BUDGET, f"layer {i}: {_total(layer)} kernels > {LORA_BUDGET}: {layer}"
        # One shrink per projection, whatever the number of slices it fuses; one expand, q/k/v's (the
        # other three are deferred to the kernels that read their outputs, which are counted above).
        assert layer["triton._lora_shrink_kernel"] == 4, layer
        assert layer["triton._lora_expand_kernel"] == 1, layer
    assert _total(counts["model"]) <= OUTSIDE_LAYERS_BUDGET, counts["model"]


def test_the_counter_sees_slow_paths(model, monkeypatch):
    """Guards the guard: the torch twins of the same forward launch far more kernels than the budget."""
    counter = _KernelCounter()
    input_ids, positions, kv_caches, meta = decode_inputs(model)
    model_attention_fake = lambda q, kv, bt, cl, scale, out=None: out  # noqa: E731  (attention is not the point)
    monkeypatch.setattr(model_attention, "paged_decode_attention", model_attention_fake)
    with torch.inference_mode(), lora_step(None), counter:
        model(input_ids, positions, kv_caches, meta)
    assert _total(counter.counts["model"]) > NUM_LAYERS * BASE_BUDGET + OUTSIDE_LAYERS_BUDGET
