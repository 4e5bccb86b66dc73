"""dsv2: DeepSeek-V2 in Python: model, checkpoints, training, inference engine.

`from dsv2 import LLM, SamplingParams` loads the engine on first use, so that importing a light
part of the package (the data workers import dsv2.data) does not pull in the rest.
"""

_ENGINE = ("LLM", "AsyncLLM", "SamplingParams", "StructuredOutputsParams", "LLMEngine", "EngineConfig",
           "RequestOutput", "CompletionOutput")


def __getattr__(name: str):
    if name in _ENGINE:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'dsv2' has no attribute {name!r}")


__all__ = list(_ENGINE)
