"""Every error a user can cause, typed in one place.

Each class carries `code`, the name of the Triton error code it maps to; the
Triton model turns that name into a `pb_utils.TritonError` in one place.
Messages say what went wrong and what to do, and never show filesystem paths
that a client did not send.
"""


class MultiLoRAError(Exception):
    """Base of all errors caused by a request or by its adapter."""

    code = "INTERNAL"


class InvalidRequestError(MultiLoRAError, ValueError):
    """Malformed input: empty prompt, bad sampling values, wrong tensor types."""

    code = "INVALID_ARG"


class PromptTooLongError(InvalidRequestError):
    """The prompt can never fit the model's context (max_model_len) or the KV cache."""


class LimitExceededError(InvalidRequestError):
    """A request larger than a configured limit (RequestLimits, docs/limits.md); the message names the setting."""


class AdapterNotFoundError(MultiLoRAError):
    """No adapter of that name in any adapter root or in the registry."""

    code = "NOT_FOUND"


class AdapterNameError(InvalidRequestError):
    """A lora_id that is not a plain name (a path, `..`, or one leaving the adapter roots)."""


class AdapterError(InvalidRequestError):
    """An adapter was found but cannot be served; subclasses name the problem."""


class AdapterFormatError(AdapterError):
    """Missing or unreadable adapter_config.json, or weights not in safetensors (pickled .bin/.pt are refused)."""


class AdapterCorruptError(AdapterError):
    """adapter_model.safetensors cannot be parsed."""


class AdapterRankError(AdapterError):
    """LoRA rank greater than max_lora_rank (or not positive)."""


class AdapterTargetError(AdapterError):
    """A target module this engine does not support, or one the base model lacks."""


class AdapterShapeError(AdapterError):
    """Tensor names or shapes do not match the base model (an adapter for another model)."""


class AdapterWeightsError(AdapterError):
    """NaN/Inf or an unsupported dtype in the adapter weights."""


class ServerOverloadedError(MultiLoRAError):
    """The server has more work than it queues; the client should retry later or elsewhere."""

    code = "UNAVAILABLE"


class QueueFullError(ServerOverloadedError):
    """max_waiting_requests requests are already waiting: a new one is refused at once."""


class QueueTimeoutError(ServerOverloadedError):
    """A request waited longer than max_queue_wait_s without starting."""


class RequestCancelledError(MultiLoRAError):
    """The client cancelled the request, or it was aborted."""

    code = "CANCELLED"


class EngineStoppedError(MultiLoRAError):
    """The engine is shutting down and accepts no more requests."""

    code = "UNAVAILABLE"


class NonFiniteLogitsError(MultiLoRAError):
    """The model's logits for one request were NaN/Inf (a broken adapter or numerics): that request alone ends."""

    code = "INTERNAL"


class AdapterScalingError(AdapterError):
    """lora_alpha (or an alpha_pattern value), or the scaling it gives, is not finite, not positive or too large."""


class AdapterRangeError(AdapterWeightsError):
    """Weights too large for the serving dtype, or an adapter whose effect on a layer is above the limit."""


class AdapterPatternError(AdapterFormatError):
    """A regex in adapter_config.json that is refused as too costly to match (or took too long)."""


class AdapterWriteError(MultiLoRAError):
    """Copying a loaded adapter into its GPU slot failed (a server-side fault; the log says why)."""

    code = "INTERNAL"


class AdapterLoadFailedError(MultiLoRAError):
    """The process loading an adapter died while reading it (a server-side fault, not the adapter's: the next
    request for it loads it again)."""

    code = "INTERNAL"


class WorkerFailedError(MultiLoRAError):
    """A tensor-parallel worker process died or stopped answering: every request in flight ends with this,
    and the engine stops (the server reports not ready and its launcher restarts it)."""

    code = "UNAVAILABLE"
