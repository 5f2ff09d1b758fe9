"""EngineConfig: every engine setting, frozen and validated in one place.

The Triton model's JSON (and `LLM(**kwargs)`) map one-to-one onto these fields.
Values measured at start-up (the number of KV blocks that fit) are returned by
their owner, the model runner, never written back here.
"""

import dataclasses
import typing
from dataclasses import dataclass
from typing import Optional

from multilora.errors import InvalidRequestError, LimitExceededError

DTYPES = ("auto", "float32", "float16", "bfloat16")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
# The default max_prompt_bytes, per token of max_model_len: a text longer than this many bytes per
# token the model can take is almost surely too long, and refusing it unread costs nothing, while
# tokenizing it first could take seconds (a 10 MB prompt took 52).
PROMPT_BYTES_PER_TOKEN = 32


@dataclass(frozen=True)
class RequestLimits:
    """How big a request may be (docs/limits.md); each check raises LimitExceededError naming its setting.

    The checks look at sizes only, before any tokenizing or decoding, so an
    oversized request costs microseconds. They are EngineConfig fields of the
    same names, resolved by the engine (`LLMEngine.request_limits`) and applied
    both by the Triton model's request parser and by the engine, for in-process use.
    """

    max_prompt_bytes: int = 1 << 20            # UTF-8 bytes of a text prompt; 4 per token id
    max_stop_strings: int = 16
    max_stop_string_bytes: int = 256           # UTF-8 bytes of one stop string
    max_sampling_parameters_bytes: int = 1 << 16
    max_sampling_parameters_depth: int = 4     # JSON nesting: the object is 1, the stop list in it 2

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{f.name} must be an integer >= 1, got {value!r}")
        if self.max_prompt_bytes < 4:
            raise ValueError(f"max_prompt_bytes must be >= 4 (one token id), got {self.max_prompt_bytes}")

    @property
    def max_prompt_token_ids(self) -> int:
        return self.max_prompt_bytes // 4       # token ids travel as INT32

    def check_prompt_bytes(self, name: str, num_bytes: int) -> None:
        if num_bytes > self.max_prompt_bytes:
            raise LimitExceededError(f"{name} is {num_bytes} bytes; this server takes at most "
                                     f"{self.max_prompt_bytes} (max_prompt_bytes): send a shorter prompt")

    def check_prompt_token_ids(self, name: str, count: int) -> None:
        if count > self.max_prompt_token_ids:
            raise LimitExceededError(f"{name} has {count} token ids; this server takes at most "
                                     f"{self.max_prompt_token_ids} (max_prompt_bytes {self.max_prompt_bytes}, "
                                     "4 bytes per id): send a shorter prompt")

    def check_prompt(self, prompt) -> None:
        """A text prompt's UTF-8 size or a token-id prompt's length, before tokenizing."""
        if isinstance(prompt, str):
            # A character is at least one byte: a prompt with too many characters is refused
            # without encoding it (a 10 MB prompt costs nothing); the rest are encoded to count bytes.
            self.check_prompt_bytes("the prompt", len(prompt))
            try:
                self.check_prompt_bytes("the prompt", len(prompt.encode("utf-8")))
            except UnicodeEncodeError:     # a lone surrogate: the tokenizer would fail on it
                raise InvalidRequestError("the prompt is not valid Unicode text (it holds a lone surrogate)") from None
        elif isinstance(prompt, (list, tuple)):
            self.check_prompt_token_ids("the prompt", len(prompt))

    def check_stop_count(self, count: int) -> None:
        if count > self.max_stop_strings:
            raise LimitExceededError(f"{count} stop strings; this server takes at most {self.max_stop_strings} "
                                     "(max_stop_strings)")

    def check_stop_string_bytes(self, num_bytes: int) -> None:
        if num_bytes > self.max_stop_string_bytes:
            raise LimitExceededError(f"a stop string of {num_bytes} bytes; this server takes at most "
                                     f"{self.max_stop_string_bytes} per string (max_stop_string_bytes)")

    def check_stop(self, stop) -> None:
        """A SamplingParams' stop list (a list of str, already type-checked)."""
        self.check_stop_count(len(stop))
        for s in stop:
            self.check_stop_string_bytes(len(s.encode("utf-8", "replace")))

    def check_sampling_parameters_bytes(self, num_bytes: int) -> None:
        if num_bytes > self.max_sampling_parameters_bytes:
            raise LimitExceededError(f"sampling_parameters is {num_bytes} bytes; this server takes at most "
                                     f"{self.max_sampling_parameters_bytes} (max_sampling_parameters_bytes)")

    def check_sampling_parameters_depth(self, depth: int) -> None:
        if depth > self.max_sampling_parameters_depth:
            raise LimitExceededError(f"sampling_parameters nests {depth} levels deep; at most "
                                     f"{self.max_sampling_parameters_depth} (max_sampling_parameters_depth): send "
                                     'a flat object such as {"max_tokens": 32, "stop": ["\\n"]}')


_LIMITS = RequestLimits()


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
    tensor_parallel_size: int = 1          # GPUs the model is split over, one worker process each (ARCHITECTURE.md)
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
    # Processes that read adapters (engine/load_workers.py), so their Python never slows the engine's threads;
    # 0: the preparing threads read them, one at a time. One device only (tensor parallelism: always 0).
    adapter_load_workers: int = 0
    # Request limits (RequestLimits; docs/limits.md)
    max_prompt_bytes: Optional[int] = None        # None: PROMPT_BYTES_PER_TOKEN per token of max_model_len
    max_stop_strings: int = _LIMITS.max_stop_strings
    max_stop_string_bytes: int = _LIMITS.max_stop_string_bytes
    max_sampling_parameters_bytes: int = _LIMITS.max_sampling_parameters_bytes
    max_sampling_parameters_depth: int = _LIMITS.max_sampling_parameters_depth
    # Waiting queue (docs/limits.md): beyond it, or after waiting this long, a request gets UNAVAILABLE
    max_waiting_requests: Optional[int] = 1024    # None: unbounded (LLM's in-process batches)
    max_queue_wait_s: Optional[float] = None      # None: no limit

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
        check(self.tensor_parallel_size >= 1, f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        check(self.max_loras >= 1, f"max_loras must be >= 1, got {self.max_loras}")
        check(self.max_lora_rank >= 1, f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        check(self.max_cpu_loras is None or self.max_cpu_loras >= self.max_loras,
              f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
        check(self.adapter_load_workers >= 0, f"adapter_load_workers must be >= 0, got {self.adapter_load_workers}")
        check(self.max_waiting_requests is None or self.max_waiting_requests >= 1,
              f"max_waiting_requests must be >= 1 or null (unbounded), got {self.max_waiting_requests}")
        check(self.max_queue_wait_s is None or self.max_queue_wait_s > 0,
              f"max_queue_wait_s must be > 0 or null (no limit), got {self.max_queue_wait_s}")
        self.request_limits(self.max_model_len or 1)  # validates the limits

    def request_limits(self, max_model_len: int) -> RequestLimits:
        """The request limits, with max_prompt_bytes resolved against the model's context length."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(RequestLimits)}
        if values["max_prompt_bytes"] is None:
            values["max_prompt_bytes"] = PROMPT_BYTES_PER_TOKEN * max_model_len
        return RequestLimits(**values)

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
