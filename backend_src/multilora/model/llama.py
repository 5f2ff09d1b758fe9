"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

Tokens of all sequences in a step are flattened into one [T, hidden] batch.
q/k/v and gate/up are one GEMM each (`LoRALinear`s of several slices, weights
stacked at load; `checkpoint_views` maps the HF tensor names onto them), and the
elementwise work of a layer is three fused kernels: residual add + RMSNorm,
rotary + KV-cache write, SiLU-and-mul. A decode layer is thus 4 GEMMs, 4 fused
kernels and attention (tests/engine/test_kernel_budget.py holds it there).
The model does not know adapters exist: its projections read the step's
adapter mapping on their own. What it does know is that a projection may hand
back its output's LoRA delta not yet added (`LoRALinear.forward_deferred`), which
the next fused kernel (the norms after o_proj and down_proj, SiLU-and-mul after
gate_up) adds as it reads. Under tensor parallelism (`tp`, see
multilora.tensor_parallel) each rank builds its part: its heads, its
intermediate columns, its vocabulary columns, with one all-reduce after o_proj
and after down_proj; checkpoint tensors are read in parts (`checkpoint_views`).
"""

from dataclasses import dataclass

import torch
from torch import nn

from multilora.lora.lora_linear import LoRALinear, LoRATarget
from multilora.lora.adapter_slot_weights import AdapterSlotWeights
from multilora.model.attention import AttentionMetadata, paged_attention
from multilora.model.rotary import RotaryEmbedding
from multilora.tensor_parallel import SINGLE, TensorParallel
from multilora_kernels.activation import silu_and_mul
from multilora_kernels.lora_delta import LoRADelta
from multilora_kernels.norm import fused_add_rms_norm
from multilora_kernels.rotary import rotary_kv_write

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class CheckpointView:
    """Where one checkpoint tensor goes: into `param`, from the part `index` of a tensor of `full_shape`."""

    param: torch.Tensor
    full_shape: tuple[int, ...]
    index: tuple[slice, ...]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class RMSNorm(nn.Module):
    """RMSNorm with the residual add before it fused in: forward(x, residual) -> (normed, x + residual)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                x_delta: LoRADelta | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x_delta: x's LoRA delta, not yet added (the projection that made x deferred it)."""
        return fused_add_rms_norm(x, residual, self.weight, self.eps, x_delta)


class Attention(nn.Module):
    def __init__(self, config, tp: TensorParallel):
        super().__init__()
        self.tp = tp
        self.head_dim = head_dim_of(config)
        heads = tp.split(config.num_attention_heads, "num_attention_heads")
        kv_heads = tp.kv_heads(config.num_key_value_heads)
        self.num_heads, self.num_kv_heads = heads.size, kv_heads.size
        q, kv = heads.scaled(self.head_dim), kv_heads.scaled(self.head_dim)     # in features, not heads
        bias = getattr(config, "attention_bias", False) or config.model_type == "qwen2"
        self.qkv_proj = LoRALinear(config.hidden_size, (q.size, kv.size, kv.size), ("q_proj", "k_proj", "v_proj"),
                                   bias=bias, shard=tp.column(config.hidden_size, (q, kv, kv)))
        self.o_proj = LoRALinear(q.size, (config.hidden_size,), ("o_proj",),
                                 bias=getattr(config, "attention_bias", False) and config.model_type != "qwen2",
                                 shard=tp.row(q, config.hidden_size))
        self.scale = self.head_dim ** -0.5

    def forward(self, x, cos, sin, kv_cache, meta: AttentionMetadata) -> tuple[torch.Tensor, LoRADelta | None]:
        """The attention output and its LoRA delta not yet added (see LoRALinear.forward_deferred)."""
        qkv = self.qkv_proj(x)
        q_size, kv_size = self.qkv_proj.slices[0], self.qkv_proj.slices[1]
        q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(-1, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        rotary_kv_write(q, k, v, cos, sin, kv_cache, meta.slot_mapping)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        # Deferred only for the whole layer on one device, where the all-reduce does nothing.
        out, delta = self.o_proj.forward_deferred(out.flatten(1))
        return self.tp.all_reduce(out), delta


class MLP(nn.Module):
    def __init__(self, config, tp: TensorParallel):
        super().__init__()
        if config.hidden_act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
        self.tp = tp
        inter = tp.split(config.intermediate_size, "intermediate_size")
        self.gate_up_proj = LoRALinear(config.hidden_size, (inter.size, inter.size), ("gate_proj", "up_proj"),
                                       bias=False, shard=tp.column(config.hidden_size, (inter, inter)))
        self.down_proj = LoRALinear(inter.size, (config.hidden_size,), ("down_proj",), bias=False,
                                    shard=tp.row(inter, config.hidden_size))

    def forward(self, x) -> tuple[torch.Tensor, LoRADelta | None]:
        """The MLP output and its LoRA delta not yet added (see LoRALinear.forward_deferred)."""
        gate_up, delta = self.gate_up_proj.forward_deferred(x)
        out, delta = self.down_proj.forward_deferred(silu_and_mul(gate_up, delta))
        return self.tp.all_reduce(out), delta


class DecoderLayer(nn.Module):
    def __init__(self, config, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, x, x_delta, residual, cos, sin, kv_cache, meta):
        """x: the previous layer's MLP output (the embeddings, residual None, for the first layer), x_delta
        its LoRA delta not yet added. Returns this layer's (MLP output, its delta, residual)."""
        h, residual = self.input_layernorm(x, residual, x_delta)
        attn, attn_delta = self.self_attn(h, cos, sin, kv_cache, meta)
        h, residual = self.post_attention_layernorm(attn, residual, attn_delta)
        out, out_delta = self.mlp(h)
        return out, out_delta, residual


class DecoderModel(nn.Module):
    def __init__(self, config, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)    # whole on every rank
        self.layers = nn.ModuleList(DecoderLayer(config, tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config, self.tp = config, tp
        self.model = DecoderModel(config, tp)
        self.vocab_shard = tp.vocab(config.vocab_size)
        self.lm_head = nn.Linear(config.hidden_size, self.vocab_shard.size, bias=False)
        if config.tie_word_embeddings and tp.size == 1:
            self.lm_head.weight = self.model.embed_tokens.weight    # split: `tie_lm_head` copies this rank's rows

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        """Returns the final hidden states [T, hidden]; `compute_logits` picks rows to project."""
        x, x_delta, residual = self.model.embed_tokens(input_ids), None, None
        cos, sin = self.model.rotary_emb(positions, x.dtype)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x, x_delta, residual = layer(x, x_delta, residual, cos, sin, kv_cache, meta)
        return self.model.norm(x, residual, x_delta)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [n, vocab] of the hidden rows in the model's dtype; under tensor parallelism on rank 0
        only (None elsewhere). Not cast to float32: the sampler reads any float dtype and casting bf16 to
        float32 is exact, so the tokens are the same, without a cast pass over n x vocab logits
        (bench/RESULTS.md: 64 x 128256 a step)."""
        logits = self.tp.gather_columns(self.lm_head(hidden))
        return None if logits is None else logits[:, :self.config.vocab_size].contiguous()

    @torch.no_grad()
    def tie_lm_head(self) -> None:
        """Tied embeddings under tensor parallelism: lm_head takes this rank's rows of the embedding
        (padding rows zero). At size 1 the two are one parameter already."""
        if self.lm_head.weight is self.model.embed_tokens.weight:
            return
        rows = self.model.embed_tokens.weight[self.vocab_shard.index]
        self.lm_head.weight[:rows.shape[0]].copy_(rows)
        self.lm_head.weight[rows.shape[0]:].zero_()

    def lora_layers(self) -> dict[tuple[int, str], LoRATarget]:
        """(layer index, HF module name) -> its `LoRATarget`, for writing adapter weights into slots.

        Fused projections give one target per HF module (q_proj, k_proj, v_proj
        are slices of qkv_proj), so adapters load unchanged.
        """
        found = {}
        for index, layer in enumerate(self.model.layers):
            for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                           layer.mlp.down_proj):
                for i, name in enumerate(linear.slice_names):
                    found[(index, name)] = LoRATarget(linear, i, self.enable_lora)
        return found

    def enable_lora(self, num_slots: int, max_rank: int) -> AdapterSlotWeights:
        """Gives every LoRA layer its per-slot weights, in one slot buffer (once; later calls return it)."""
        existing = getattr(self, "adapter_slot_weights", None)
        if existing is not None:
            assert (existing.num_slots, existing.max_rank) == (num_slots, max_rank), (
                f"LoRA already enabled with {existing.num_slots} slots of rank {existing.max_rank}")
            return existing
        weight = self.lm_head.weight
        self.adapter_slot_weights = AdapterSlotWeights(self.lora_layers(), num_slots, max_rank, weight.dtype, weight.device)
        return self.adapter_slot_weights

    def checkpoint_views(self) -> dict[str, CheckpointView]:
        """HF checkpoint tensor name -> the parameter (or the rows of a fused one) it loads into, and
        which part of the full tensor this rank reads."""
        whole = lambda t: CheckpointView(t.data, tuple(t.shape), tuple(slice(None) for _ in t.shape))
        views = {name: whole(p) for name, p in self.named_parameters()}
        vocab = self.vocab_shard
        views["lm_head.weight"] = CheckpointView(self.lm_head.weight.data, (vocab.full, self.config.hidden_size),
                                                 (vocab.index, slice(None)))
        for name, module in self.named_modules():
            if not isinstance(module, LoRALinear):
                continue
            parent, shard = name.rsplit(".", 1)[0], module.shard
            for param in ("weight", "bias"):
                tensor = getattr(module, param)
                if tensor is None:
                    continue
                del views[f"{name}.{param}"]
                for i, slice_name in enumerate(module.slice_names):
                    full, index = shard.full_weight_shape(i), shard.weight_index(i)
                    if param == "bias":
                        full, index = full[:1], index[:1]      # the output rows of the weight
                    views[f"{parent}.{slice_name}.{param}"] = CheckpointView(tensor.data[module.slice_rows(i)], full,
                                                                             index)
        return views
