"""multilora: a multi-LoRA LLM engine (vLLM-style API) and its NVIDIA Triton Inference Server model."""

from multilora.config import EngineConfig
from multilora.engine.async_engine import AsyncLLMEngine
from multilora.engine.llm_engine import EngineStats, LLMEngine
from multilora.llm import LLM
from multilora.lora.request import LoRARequest
from multilora.outputs import CompletionOutput, RequestOutput
from multilora.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "AsyncLLMEngine", "EngineConfig", "EngineStats", "SamplingParams", "LoRARequest",
           "RequestOutput", "CompletionOutput"]
