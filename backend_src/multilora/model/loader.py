"""Builds the model from a Hugging Face directory: config, then safetensors weights (or random ones).

Checkpoints are read by their HF tensor names; fused projections (qkv, gate_up) take
each named tensor into their rows (`LlamaForCausalLM.checkpoint_views`). Under tensor
parallelism each rank reads only its part of each tensor (safetensors slices).
"""

import json
import logging
import os
import time

import torch
from safetensors import safe_open
from transformers import AutoConfig

from multilora.model.llama import SUPPORTED_ARCHITECTURES, LlamaForCausalLM
from multilora.tensor_parallel import SINGLE, TensorParallel

logger = logging.getLogger(__name__)


def load_hf_config(model_dir: str):
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"{model_dir!r} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(model_dir)
    architectures = getattr(config, "architectures", None) or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ValueError(f"architecture {architectures} is not supported; supported: {SUPPORTED_ARCHITECTURES}")
    return config


def build_model(hf_config, model_dir: str, dtype: torch.dtype, device: torch.device, load_format: str,
                tp: TensorParallel = SINGLE):
    start = time.perf_counter()
    model = build_skeleton(hf_config, dtype, device, tp)
    if load_format == "dummy":
        _init_random(model)
    else:
        _load_safetensors(model, model_dir)
    if hf_config.tie_word_embeddings:
        model.tie_lm_head()
    logger.info("Loaded %s (%s, %s) in %.1f s", hf_config.architectures[0], dtype, load_format,
                time.perf_counter() - start)
    return model


def build_skeleton(hf_config, dtype: torch.dtype, device: torch.device, tp: TensorParallel = SINGLE):
    """The model's modules on `device`, weights not loaded (on the meta device: shapes only)."""
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = LlamaForCausalLM(hf_config, tp)
        finally:
            torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def _weight_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(model_dir, name) for name in names]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise ValueError("no *.safetensors weights in the model directory (pickled weights are not read)")
    return [os.path.join(model_dir, f) for f in files]


def _load_safetensors(model: LlamaForCausalLM, model_dir: str) -> None:
    # By HF name: q/k/v and gate/up land in their rows of the fused projections.
    views = model.checkpoint_views()
    missing = set(views)
    for path in _weight_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name not in views:
                    if "rotary_emb" not in name:
                        logger.warning("Ignoring unexpected checkpoint tensor %s", name)
                    continue
                view = views[name]
                part = f.get_slice(name)
                if tuple(part.get_shape()) != view.full_shape:
                    raise ValueError(f"checkpoint tensor {name} has shape {tuple(part.get_shape())}, "
                                     f"expected {view.full_shape}")
                tensor = part[view.index]
                # A shard may run past the tensor's end (the last rank's vocabulary rows): zero padding.
                view.param[:tensor.shape[0]].copy_(tensor)
                view.param[tensor.shape[0]:].zero_()
                missing.discard(name)
    if model.config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")


def _init_random(model: LlamaForCausalLM) -> None:
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.data.fill_(1.0)
        else:
            param.data.normal_(0.0, 0.02, generator=generator)
