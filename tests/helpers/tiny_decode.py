"""One decode step of a tiny dummy Llama, driven as the model runner drives it (no engine).

For tests that look inside a decode forward: which kernels it launches (tests/engine/test_kernel_budget.py)
and what it computes with the LoRA expands deferred or not (helpers/deferred_expand_forward.py).
"""

import torch
from transformers import LlamaConfig

from multilora.model.attention import AttentionMetadata
from multilora.model.loader import build_model

NUM_LAYERS, NUM_SEQS, BLOCK_SIZE, NUM_BLOCKS = 2, 5, 4, 16


def tiny_llama(num_slots: int, max_rank: int):
    """A 2-layer float32 Llama on the CPU with dummy weights and LoRA enabled (slots empty)."""
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=NUM_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         architectures=["LlamaForCausalLM"])
    model = build_model(config, "", torch.float32, torch.device("cpu"), "dummy")
    model.enable_lora(num_slots=num_slots, max_rank=max_rank)
    return model


def decode_inputs(model):
    """(input_ids, positions, kv_caches, meta) of one decode step of 5 sequences at contexts 1..12, each
    on a fresh (zero) KV cache."""
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    kv_caches = [torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, model.config.num_key_value_heads, head_dim)
                 for _ in range(NUM_LAYERS)]
    context_lens = torch.tensor([3, 9, 1, 4, 12], dtype=torch.int32)
    block_tables = torch.arange(NUM_SEQS * 3, dtype=torch.int32).view(NUM_SEQS, 3)
    positions = context_lens.long() - 1
    slot_mapping = block_tables[torch.arange(NUM_SEQS), positions // BLOCK_SIZE].long() * BLOCK_SIZE \
        + positions % BLOCK_SIZE
    meta = AttentionMetadata(slot_mapping, [], [], [], num_prefill_tokens=0, decode_block_tables=block_tables,
                             decode_context_lens=context_lens)
    return torch.tensor([5, 17, 42, 7, 99]), positions, kv_caches, meta
