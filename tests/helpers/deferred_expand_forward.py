"""Run as a script with MULTILORA_TRITON_INTERPRET_KERNELS=1 (every kernel file interpreted from its
first import): a tiny Llama's decode forward over a mix of adapters, with the LoRA expands deferred to
the kernels that read their outputs and without (DEFERRED_EXPAND_MAX_TOKENS 0), for both LoRA
variants. Prints one JSON object: per variant, the largest difference between the two and whether
they are equal bit for bit; and how far the LoRA output is from the base model's."""

import json
from collections import Counter

import torch

from multilora.lora import lora_linear
from multilora.lora.mapping import lora_step
from multilora_kernels import _launch
from multilora_kernels.lora import build_lora_meta

from helpers.tiny_decode import decode_inputs, tiny_llama


def tiny_model():
    """helpers.tiny_decode's Llama with random weights and LoRA weights in its 3 slots."""
    torch.manual_seed(0)
    model = tiny_llama(num_slots=3, max_rank=8)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for layer in model.model.layers:
            for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                           layer.mlp.down_proj):
                linear.lora_a.normal_(0, 0.1)
                linear.lora_b.normal_(0, 0.1)
                linear.lora_scales.uniform_(0.5, 1.5)
    return model


def decode_forward(model, lora_meta):
    """One decode step (helpers.tiny_decode.decode_inputs) under `lora_meta`."""
    input_ids, positions, kv_caches, meta = decode_inputs(model)
    with torch.inference_mode(), lora_step(lora_meta):
        return model(input_ids, positions, kv_caches, meta)


def count_launches() -> Counter:
    """Counts each kernel's launches from now on (they still run)."""
    counts, launch = Counter(), _launch.launch

    def counted(kernel, *args, **meta):
        counts[kernel.fn.__name__] += 1
        launch(kernel, *args, **meta)
    _launch.launch = counted
    return counts


def main():
    launches = count_launches()
    model = tiny_model()
    slots = torch.tensor([0, -1, 2, 2, 1])
    result = {"lora_vs_base": 0.0}
    base = decode_forward(model, None)
    for per_token in (True, False):
        meta = build_lora_meta(slots, 3, per_token_expand=per_token)
        outs, expands = [], []
        for limit in (128, 0):     # deferred, then every expand applied by its layer
            lora_linear.DEFERRED_EXPAND_MAX_TOKENS = limit
            launches.clear()
            outs.append(decode_forward(model, meta))
            expands.append(launches["_lora_expand_kernel"] + launches["_lora_expand_token_kernel"])
        deferred, applied = outs
        result["per_token" if per_token else "tiles"] = {
            "max_diff": (deferred - applied).abs().max().item(), "equal": torch.equal(deferred, applied),
            "expand_launches_deferred": expands[0], "expand_launches_applied": expands[1]}
        result["lora_vs_base"] = (applied - base).abs().max().item()
        result["base_rows_equal"] = torch.equal(applied[1], base[1])    # token 1 uses no adapter
    print(json.dumps(result))


if __name__ == "__main__":
    main()
