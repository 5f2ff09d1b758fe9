"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

Parameter names match the Hugging Face checkpoints, so weights load by name.
Tokens of all sequences in a step are flattened into one [T, hidden] batch.
The model does not know adapters exist: its projections are `LoRALinear`s that
read the step's adapter mapping on their own.
"""

import torch
from torch import nn

from multilora.lora.lora_linear import LoRALinear
from multilora.model.attention import AttentionMetadata, paged_attention, write_kv
from multilora.model.rotary import RotaryEmbedding

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as transformers' LlamaRMSNorm, for identical float32 results.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        hidden = config.hidden_size
        self.q_proj = LoRALinear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = LoRALinear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = LoRALinear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = LoRALinear(self.num_heads * self.head_dim, hidden,
                                 bias=getattr(config, "attention_bias", False) and config.model_type != "qwen2")
        self.scale = self.head_dim ** -0.5

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata):
        q = self.q_proj(x).view(-1, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(-1, self.num_kv_heads, self.head_dim)
        q, k = RotaryEmbedding.apply(q, k, cos, sin)
        write_kv(kv_cache, k, v, meta.slot_mapping)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.flatten(1))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        self.gate_proj = LoRALinear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = LoRALinear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = LoRALinear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Returns the final hidden states [T, hidden]; `compute_logits` picks rows to project."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def lora_layers(self) -> dict[tuple[int, str], LoRALinear]:
        """(layer index, projection name) -> the layer, for writing adapter weights into slots."""
        found = {}
        for index, layer in enumerate(self.model.layers):
            for parent in (layer.self_attn, layer.mlp):
                for name, module in parent.named_children():
                    if isinstance(module, LoRALinear):
                        found[(index, name)] = module
        return found
