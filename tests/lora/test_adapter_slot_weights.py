"""AdapterSlotWeights: one buffer per adapter slot over every layer and slice, uploaded with one copy;
fused LoRA layers read their HF modules' slices from it."""

import gc

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig

from multilora.lora.adapter import LoRAAdapter
from multilora.lora.mapping import lora_step
from multilora.model.loader import build_model
from multilora_kernels.lora import build_lora_meta

NUM_SLOTS, MAX_RANK = 3, 8


def _model():
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    model = build_model(config, "", torch.float32, torch.device("cpu"), "dummy")
    for target in model.lora_layers().values():  # as the model runner enables it: once per target
        target.enable_lora(NUM_SLOTS, MAX_RANK)
    return model


def _adapter(model, modules: dict[tuple[int, str], int], seed: int) -> LoRAAdapter:
    """modules: (layer, HF module) -> rank; random A/B in the adapter loader's layout."""
    gen = torch.Generator().manual_seed(seed)
    targets, weights = model.lora_layers(), {}
    for key, rank in modules.items():
        t = targets[key]
        weights[key] = (torch.randn(rank, t.in_features, generator=gen), torch.randn(t.out_features, rank, generator=gen),
                        0.5 + seed)
    return LoRAAdapter(f"a{seed}", seed, max(modules.values()), weights)


def _slice_weights(target, slot):
    layer, i = target.layer, target.index
    return layer.lora_a[slot, i], layer.lora_b[slot, target.rows], layer.lora_scales[slot, i]


def test_targets_name_hf_modules_and_share_one_buffer():
    model = _model()
    targets = model.lora_layers()
    assert sorted({name for _, name in targets}) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert targets[(0, "q_proj")].layer is targets[(0, "v_proj")].layer is model.model.layers[0].self_attn.qkv_proj
    assert targets[(1, "up_proj")].rows == slice(48, 96)
    buffer = model.adapter_slot_weights.buffer
    for target in targets.values():  # every layer's weights are views into the one slot buffer
        assert target.layer.lora_a.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    assert model.enable_lora(NUM_SLOTS, MAX_RANK) is model.adapter_slot_weights


def test_upload_writes_each_module_into_its_slice_and_zeroes_the_rest():
    model = _model()
    first = _adapter(model, {(0, "q_proj"): 8, (0, "k_proj"): 4, (1, "up_proj"): 2, (1, "o_proj"): 8}, seed=1)
    second = _adapter(model, {(0, "v_proj"): 3, (1, "down_proj"): 2}, seed=2)  # lower rank than `first`
    slots = model.adapter_slot_weights
    slots.upload(1, first)
    slots.upload(2, second)
    slots.upload(1, second)  # the same slot again: nothing of `first` may survive
    slots.upload(0, first)
    for key, target in model.lora_layers().items():
        for slot, adapter in ((0, first), (1, second), (2, second)):
            a, b, scale = _slice_weights(target, slot)
            if key in adapter.weights:
                want_a, want_b, want_scale = adapter.weights[key]
                rank = want_a.shape[0]
                assert torch.equal(a[:rank], want_a) and torch.equal(b[:, :rank], want_b)
                assert torch.all(a[rank:] == 0) and torch.all(b[:, rank:] == 0)  # rank padding
                assert scale == want_scale
            else:
                assert torch.all(a == 0) and torch.all(b == 0) and scale == 0, (key, slot)


def test_an_image_built_over_old_bytes_equals_one_built_over_zeros():
    # Host images come from torch.empty (a reused pinned block holds an older image's bytes): every byte
    # the weights leave (untargeted modules, rows past a lower-ranked module's rank, padding) is written.
    model = _model()
    slots = model.adapter_slot_weights
    adapter = _adapter(model, {(0, "q_proj"): 8, (0, "k_proj"): 4, (1, "up_proj"): 2, (1, "o_proj"): 8}, seed=4)
    size = slots.header_bytes + 8 * slots.row_bytes
    over_zeros, over_old = torch.zeros(size, dtype=torch.uint8), torch.full((size,), 0xFF, dtype=torch.uint8)
    slots._fill_image(over_zeros, adapter, 8)
    slots._fill_image(over_old, adapter, 8)
    assert torch.equal(over_old, over_zeros)
    assert over_zeros.view(torch.float32).isfinite().all()      # 0xFF bytes would be NaN where left
    no_weights = LoRAAdapter("none", 9, 0, {})
    header = torch.full((slots.header_bytes,), 0xFF, dtype=torch.uint8)
    slots._fill_image(header, no_weights, 0)
    assert torch.all(header == 0)


class _CopyCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.copies += func.overloadpacket.__name__ == "copy_"
        return func(*args, **(kwargs or {}))


def test_one_copy_per_upload_of_the_ranks_prefix_and_the_host_image_lives_with_the_adapter():
    model = _model()
    slots = model.adapter_slot_weights
    adapter = _adapter(model, {(layer, m): 4 for layer in (0, 1) for m in ("q_proj", "v_proj", "gate_proj")}, seed=3)
    image = slots.host_image(adapter)
    # Rank 4 of max 8: the image is the slot's scales and its first 4 rank rows, no padding.
    assert image.shape == (slots.header_bytes + 4 * slots.row_bytes,) and image.dtype == torch.uint8
    assert image.numel() < slots.slot_bytes * 0.6
    assert slots.host_image(adapter) is image  # built once per adapter
    counter = _CopyCounter()
    with counter:
        slots.upload(2, adapter)
    assert counter.copies == 1
    assert torch.equal(slots.buffer[2, :image.numel()], image)
    assert torch.all(slots.buffer[2, image.numel():] == 0)
    del adapter, image
    gc.collect()
    assert not slots._images  # the host image goes with the adapter


def test_fused_layer_output_equals_separate_per_module_lora():
    """qkv_proj with a q/v adapter in one slot and a k-only one in another: each slice gets its own delta."""
    model = _model()
    qv = _adapter(model, {(0, "q_proj"): 8, (0, "v_proj"): 2}, seed=4)
    k_only = _adapter(model, {(0, "k_proj"): 5}, seed=5)
    model.adapter_slot_weights.upload(0, qv)
    model.adapter_slot_weights.upload(2, k_only)
    layer = model.model.layers[0].self_attn.qkv_proj
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(6))
    token_slots = torch.tensor([0, -1, 2, 0, 2])
    with lora_step(build_lora_meta(token_slots, NUM_SLOTS)):
        got = layer(x)
    with lora_step(None):
        base = layer(x)
    expected = base.clone()
    targets = model.lora_layers()
    for t, slot in enumerate(token_slots.tolist()):
        adapter = {0: qv, 2: k_only}.get(slot)
        for key, (a, b, scale) in (adapter.weights.items() if adapter else ()):
            expected[t, targets[key].rows] += (x[t] @ a.T) @ b.T * scale
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[1], base[1])


def test_each_upload_is_timed_once_in_upload_order():
    model = _model()
    slots = model.adapter_slot_weights
    first = _adapter(model, {(0, "q_proj"): 8}, seed=7)
    second = _adapter(model, {(1, "down_proj"): 2}, seed=8)
    slots.upload(0, first)
    slots.upload(1, second)
    slots.wait_for_uploads([0, 1, -1])          # nothing to wait for on the CPU: the copies are done
    finished = slots.take_finished_uploads()
    assert [name for name, _ in finished] == ["a7", "a8"] and all(s >= 0 for _, s in finished)
    assert slots.take_finished_uploads() == []
