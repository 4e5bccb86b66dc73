"""`LLM`: offline batched generation with vLLM's surface.

    from dsv2 import LLM, SamplingParams
    llm = LLM("path/to/model")
    outs = llm.generate(["Hello"], SamplingParams(temperature=0.8, max_tokens=64))
    print(outs[0].outputs[0].text)
"""

from __future__ import annotations

import atexit
import dataclasses
import inspect
import itertools
from collections.abc import Sequence as Seq
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..checkpoint import load_model, random_model
from ..config import ModelConfig
from ..model.tensor_parallel import check_config
from ..tokenizer import Tokenizer
from .data_parallel import DataParallelEngine
from .engine import EngineConfig, LLMEngine, RequestOutput
from .params import SamplingParams
from .workers import ModelSpec, Workers, build_model, follow_forever, local_device

# "auto" follows the model's dtype; "fp8" and "6bit" quantize the latent cache (engine/cache.py)
KV_CACHE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                   "fp8": "fp8", "6bit": "6bit"}


def _spec(model, dtype, device, max_num_seqs, max_model_len, max_num_batched_tokens, gpu_memory_utilization,
          kv_cache_dtype, block_size, num_blocks, enable_prefix_caching, enforce_eager, async_scheduling, load_format,
          compile, quantization, data_parallel_attention=False, tokenizer=None, skip_tokenizer_init=False,
          seed=None) -> ModelSpec:
    """LLM's settings checked, as every rank of an engine builds from them (`seed` is each
    process's own business)."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format {load_format!r}: expected 'auto' or 'dummy'")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r}: expected one of {', '.join(KV_CACHE_DTYPES)}")
    if quantization not in (None, "fp8"):
        raise ValueError(f"quantization {quantization!r}: expected None or 'fp8'")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dtype = None if dtype == "auto" else dtype
    if model_dtype is None and device == "cpu":
        model_dtype = "float32"  # CPU matmuls in bf16 are slow and gain nothing here
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                       max_num_batched_tokens=max_num_batched_tokens, block_size=block_size,
                       num_blocks=num_blocks, gpu_memory_utilization=gpu_memory_utilization,
                       enable_prefix_caching=enable_prefix_caching, enforce_eager=enforce_eager,
                       async_scheduling=async_scheduling, compile=compile, compile_prefill=compile)
    if data_parallel_attention:
        # each rank's MoE layers exchange a step-dependent number of tokens, and every rank samples
        # its own rows: no graphs, no async scheduling (engine/data_parallel.py)
        cfg = dataclasses.replace(cfg, enforce_eager=True, async_scheduling=False)
    return ModelSpec(str(model), device, model_dtype, quantization, load_format, cfg, KV_CACHE_DTYPES[kv_cache_dtype],
                     data_parallel_attention, None if skip_tokenizer_init else str(tokenizer or model))


class LLM:
    def __init__(
        self,
        model: str | Path,
        dtype: str = "auto",
        device: str | None = None,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        max_num_batched_tokens: int = 2048,
        gpu_memory_utilization: float = 0.9,
        kv_cache_dtype: str = "auto",
        block_size: int = 64,
        num_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        async_scheduling: bool = True,
        load_format: str = "auto",
        compile: bool = True,
        quantization: str | None = None,
        tensor_parallel_size: int = 1,
        data_parallel_attention: bool = False,
        tokenizer: str | Path | None = None,
        skip_tokenizer_init: bool = False,
        seed: int | None = None,
    ):
        """load_format "dummy" (as vLLM's) gives random weights of the directory's config.json
        shape, for benchmarks of released shapes without their checkpoints. compile=False keeps
        the CUDA graphs but skips torch.compile (no compile time at new step shapes).
        quantization="fp8" holds the weights in FP8 (docs/quantization.md), quantizing a bf16
        checkpoint as it loads; None takes what the checkpoint stores (an FP8 checkpoint stays FP8).
        tensor_parallel_size=N splits the model over N GPUs (N processes on the CPU): this process
        is rank 0 and starts the other N-1 itself (engine/workers.py, docs/parallel.md); under
        torchrun with N processes it joins their process group instead. data_parallel_attention=True
        (with N > 1): each rank runs attention for its own requests over its own cache, the MoE
        layers shared (engine/data_parallel.py), for N times the cache. As vLLM's: `tokenizer` is a
        directory holding tokenizer.json (default: the model's); skip_tokenizer_init=True needs none
        (prompts as token ids, outputs as token ids with empty text); `seed` seeds the sampling of
        requests without a seed of their own."""
        if seed is not None:
            torch.manual_seed(seed)
        spec = _spec(model, dtype, device, max_num_seqs, max_model_len, max_num_batched_tokens, gpu_memory_utilization,
                     kv_cache_dtype, block_size, num_blocks, enable_prefix_caching, enforce_eager, async_scheduling,
                     load_format, compile, quantization, data_parallel_attention, tokenizer, skip_tokenizer_init)
        self.workers = None
        tp_group = None
        if data_parallel_attention and tensor_parallel_size == 1:
            raise ValueError("data_parallel_attention needs tensor_parallel_size > 1 (the ranks that share the MoE layers)")
        if tensor_parallel_size != 1:
            check_config(ModelConfig.from_hf(model), tensor_parallel_size, data_parallel_attention)
            if not dist.is_initialized():
                self.workers = Workers(tensor_parallel_size, spec)
                atexit.register(self.close)
            elif dist.get_world_size() != tensor_parallel_size or dist.get_rank() != 0:
                raise ValueError(f"tensor_parallel_size {tensor_parallel_size} in a process group of "
                                 f"{dist.get_world_size()} (this is rank {dist.get_rank()}): the engine's "
                                 "group is the whole world, led by rank 0")
            tp_group = dist.group.WORLD
            self.model = build_model(spec, local_device(spec.device, 0))
        elif load_format == "dummy":
            self.model = random_model(ModelConfig.from_hf(model), spec.device, spec.dtype, quantization=quantization)
        else:
            self.model = load_model(model, device=spec.device, dtype=spec.dtype, quantization=quantization or "auto")
        self.tokenizer = None if skip_tokenizer_init else Tokenizer.from_dir(tokenizer or model)
        if data_parallel_attention:
            self.engine = DataParallelEngine(LLMEngine(self.model, self.tokenizer, spec.engine, spec.cache_dtype),
                                             tp_group)
        else:
            self.engine = LLMEngine(self.model, self.tokenizer, spec.engine, spec.cache_dtype, tp_group=tp_group)
        self.engine.guard = self.workers
        self._ids = itertools.count()

    def generate(
        self,
        prompts: str | dict | Seq[str | dict],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A prompt is a string or {"prompt_token_ids": [...]}."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        order = []
        for prompt, p in zip(prompts, params):
            ids, text = self.encode(prompt)
            rid = str(next(self._ids))
            # only the finished outputs are returned: the engine need not build one every step (vLLM's)
            self.engine.add_request(rid, ids, dataclasses.replace(p, output_kind="final_only"), text)
            order.append(rid)
        return self._run(order, use_tqdm)

    def _tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this LLM has no tokenizer (skip_tokenizer_init=True): give prompts as "
                             "{'prompt_token_ids': [...]}")
        return self.tokenizer

    def encode(self, prompt: str | dict) -> tuple[list[int], str | None]:
        """A prompt (a string, or {"prompt_token_ids": [...]}) as token ids and its text."""
        if isinstance(prompt, str):
            tokenizer = self._tokenizer()
            return tokenizer.encode(prompt, add_bos=tokenizer.bos_token_id is not None), prompt
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"]), prompt.get("prompt")
        raise ValueError("a prompt is a string or a dict with 'prompt_token_ids'")

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the chat template (with the generation prompt) to one or more conversations."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self._tokenizer().apply_chat_template(c, add_generation_prompt=True)}
                   for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    @staticmethod
    def follow(model: str | Path, **kwargs) -> None:
        """Rank r > 0 of a torchrun launch (`torchrun --nproc-per-node N -m dsv2 serve ...`): build
        this rank's part of the engine that rank 0's `LLM(model, tensor_parallel_size=N, **kwargs)`
        leads, and run its steps until rank 0 stops."""
        bound = inspect.signature(LLM.__init__).bind(None, model, **kwargs)
        bound.apply_defaults()
        args = dict(bound.arguments)
        del args["self"], args["tensor_parallel_size"]
        if args["seed"] is not None:
            torch.manual_seed(args["seed"])
        follow_forever(_spec(**args), dist.get_rank())

    def close(self) -> None:
        """Stop a tensor-parallel engine's workers (also at exit); nothing to do on one device."""
        if self.workers is not None:
            self.workers.close(self.engine)

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), disable=not use_tqdm, desc="generating")
        while len(done) < len(order):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [done[rid] for rid in order]
