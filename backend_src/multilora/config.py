"""EngineConfig: every engine setting, frozen and validated in one place.

The Triton model's JSON (and `LLM(**kwargs)`) map one-to-one onto these fields.
Values measured at start-up (the number of KV blocks that fit) are returned by
their owner, the model runner, never written back here.
"""

import dataclasses
import typing
from dataclasses import dataclass
from typing import Optional

DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "safetensors", "dummy")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    tokenizer: Optional[str] = None        # defaults to the model directory
    dtype: str = "auto"                    # auto: the checkpoint's dtype on GPU, float32 on CPU
    device: str = "auto"                   # auto: cuda when present, else cpu
    load_format: str = "auto"              # dummy: random weights at the checkpoint's shapes
    seed: int = 0
    enforce_eager: bool = False            # True: no CUDA graphs (they are used on GPUs for decode steps)
    async_scheduling: Optional[bool] = None    # schedule and launch step N+1 while the GPU runs step N; None: on GPUs
    max_model_len: Optional[int] = None    # defaults to max_position_embeddings
    # KV cache
    block_size: int = 16
    num_kv_blocks: Optional[int] = None    # None: as many as fit (gpu_memory_utilization / cpu_kv_cache_gib)
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_gib: float = 1.0
    # Scheduler
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    # LoRA
    enable_lora: bool = False
    max_loras: int = 4                     # GPU adapter slots = most distinct adapters in one step
    max_lora_rank: int = 16
    max_cpu_loras: Optional[int] = None    # host LRU of loaded adapters; defaults to max(32, max_loras)

    def __post_init__(self):
        def check(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        check(bool(self.model), "model must name a Hugging Face model directory")
        check(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        check(self.load_format in LOAD_FORMATS, f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        check(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda"),
              f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        check(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        check(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks must be >= 1")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization must be in (0, 1]")
        check(self.max_num_seqs >= 1, "max_num_seqs must be >= 1")
        check(self.max_num_batched_tokens >= 1, "max_num_batched_tokens must be >= 1")
        check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len must be >= 1")
        check(self.max_loras >= 1, f"max_loras must be >= 1, got {self.max_loras}")
        check(self.max_lora_rank >= 1, f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        check(self.max_cpu_loras is None or self.max_cpu_loras >= self.max_loras,
              f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")

    @property
    def host_lora_capacity(self) -> int:
        return self.max_cpu_loras if self.max_cpu_loras is not None else max(32, self.max_loras)

    @classmethod
    def from_dict(cls, values: dict) -> "EngineConfig":
        """Build from a JSON-style dict; string values ("4", "true", "null") are converted."""
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown engine setting(s) {unknown}; known: {sorted(names)}")
        return cls(**{key: _coerce(key, value, hints[key]) for key, value in values.items()})


def _coerce(key: str, value, hint):
    """Converts a JSON or string value to the field's type."""
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if isinstance(value, str):
        text = value.strip()
        if optional and text.lower() in ("", "none", "null"):
            return None
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"engine setting {key} must be true or false, got {value!r}")
            return text.lower() in ("true", "1", "yes")
        if base in (int, float):
            try:
                return base(text)
            except ValueError:
                raise ValueError(f"engine setting {key} must be a number, got {value!r}") from None
        return value
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if value is not None and base in (int, bool, float) and not isinstance(value, base):
        raise ValueError(f"engine setting {key} must be {base.__name__}, got {value!r}")
    return value
