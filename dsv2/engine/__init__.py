"""The inference engine: paged latent KV cache, continuous batching, vLLM-like surface."""

from .async_llm import AsyncLLM
from .engine import CompletionOutput, EngineConfig, LLMEngine, RequestOutput
from .llm import LLM
from .params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "AsyncLLM", "LLMEngine", "EngineConfig", "SamplingParams", "StructuredOutputsParams",
           "RequestOutput", "CompletionOutput"]
