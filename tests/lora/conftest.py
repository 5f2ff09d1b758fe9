"""Tiny HF models and PEFT-saved adapters for the adapter loader tests."""

import pytest
import torch

# Shapes of the tiny base models: hidden 64, 2 layers, 4 heads, 2 KV heads, MLP 128, vocab 128.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=128)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**TINY, **overrides})


def save_peft_adapter(directory, lora_config, model_config=None, seed=0):
    """Saves a PEFT adapter with random (non-zero) A and B for a fresh tiny model; returns the PeftModel."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config or tiny_llama_config())
    peft_model = get_peft_model(model, lora_config)
    peft_model.save_pretrained(str(directory))
    return peft_model


def _lora(**kwargs):
    from peft import LoraConfig

    return LoraConfig(init_lora_weights=False, **kwargs)


# name -> LoraConfig kwargs of the adapters every happy-path test loads.
ADAPTER_KINDS = {
    "attn_r4": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp_r8_regex": dict(r=8, lora_alpha=16, target_modules=r".*\.mlp\.(gate_proj|up_proj|down_proj)"),
    "all_rslora_r16": dict(r=16, lora_alpha=32, target_modules="all-linear", use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 8},
                     alpha_pattern={"v_proj": 3, r"layers\.0\.mlp\.down_proj": 40}),
    "layer1_only": dict(r=4, lora_alpha=4, target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
}


@pytest.fixture(scope="session")
def peft_adapters(tmp_path_factory):
    """kind -> (adapter directory, PeftModel holding the same weights), saved once per session."""
    root = tmp_path_factory.mktemp("peft_adapters")
    return {kind: (root / kind, save_peft_adapter(root / kind, _lora(**kwargs)))
            for kind, kwargs in ADAPTER_KINDS.items()}


@pytest.fixture(scope="session")
def make_peft_adapter():
    """save(directory, model_config=None, **LoraConfig kwargs) -> PeftModel; B starts non-zero."""
    def save(directory, model_config=None, **kwargs):
        return save_peft_adapter(directory, _lora(**kwargs), model_config)
    return save


@pytest.fixture(scope="session")
def tiny_config():
    """The tiny LlamaConfig, with optional overrides."""
    return tiny_llama_config


@pytest.fixture(scope="session")
def spec(tiny_config):
    """The LoRAModelSpec of the tiny LlamaConfig."""
    from multilora.lora.adapter import LoRAModelSpec

    return LoRAModelSpec.from_hf_config(tiny_config())
