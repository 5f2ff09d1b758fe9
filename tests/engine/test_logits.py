"""The model's logits reach the sampler in the model's dtype: no float32 copy of [rows, vocab] a step."""

import torch
from transformers import LlamaConfig

from multilora.model.loader import build_model


def test_compute_logits_keeps_the_model_dtype():
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    model = build_model(config, "", torch.bfloat16, torch.device("cpu"), "dummy")
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).bfloat16()
    logits = model.compute_logits(hidden)
    assert logits.dtype == torch.bfloat16 and logits.shape == (3, 300) and logits.is_contiguous()
    assert torch.equal(logits, model.lm_head(hidden))
