"""LLMEngine: requests in, one scheduled step at a time, finished outputs out.

add_request -> the scheduler queues it; step() schedules a batch, runs the model over the paged
latent cache, samples the rows whose prompt is complete, detokenizes, checks stops, frees the
pages of finished sequences. abort_request frees a request's pages at once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..model import Transformer
from ..tokenizer import Tokenizer
from .cache import BlockManager, PagedLatentCache
from .params import SamplingParams
from .runner import ModelRunner
from .sampler import Detokenizer, RowState, Sampler, check_stop, make_generator
from .scheduler import Scheduler
from .sequence import Sequence


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list | None
    finish_reason: str | None
    stop_reason: str | int | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    new_text: list[str] = field(default_factory=list)  # per sample: text produced by the last step


@dataclass
class EngineConfig:
    max_num_seqs: int = 256
    max_model_len: int | None = None
    max_num_batched_tokens: int = 2048
    block_size: int = 64
    num_blocks: int | None = None  # None: sized from free GPU memory (or 4 GiB on CPU)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True: no CUDA graphs (nor compilation) for decode steps
    compile: bool = True  # torch.compile the captured decode step
    compile_prefill: bool = False  # and the prefill step (recompiles for new batch shapes)


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, cfg: EngineConfig,
                 cache_dtype: torch.dtype | None = None):
        """tokenizer None: token ids in and out only (no text, no stop strings, no EOS), as for
        benchmarks over random weights."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id if tokenizer is not None else None
        self.cfg = cfg
        mc = model.config
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        param = next(model.parameters())
        cache_dtype = cache_dtype or param.dtype
        num_blocks = cfg.num_blocks or self._size_cache(param.device, cache_dtype)
        if num_blocks * cfg.block_size < self.max_model_len:
            raise ValueError(f"the KV cache holds {num_blocks * cfg.block_size} tokens, fewer than "
                             f"max_model_len ({self.max_model_len}): lower max_model_len or give it more memory")
        # one block more than the manager hands out: the runner's scratch block for padding writes
        self.pages = PagedLatentCache(mc, num_blocks + 1, cfg.block_size, param.device, cache_dtype)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.pages, cfg.max_num_seqs, self.max_model_len,
                                  cuda_graphs=not cfg.enforce_eager, compile=cfg.compile,
                                  compile_prefill=cfg.compile_prefill)
        self.sampler = Sampler()
        self.requests: dict[str, list[Sequence]] = {}
        self.prompts: dict[str, str | None] = {}
        self._ids = itertools.count()
        self._arrival = itertools.count()

    def _size_cache(self, device: torch.device, dtype: torch.dtype) -> int:
        bs, mc = self.cfg.block_size, self.model.config
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            budget = free - (1 - self.cfg.gpu_memory_utilization) * total
        else:
            budget = 4 * 2**30
        return max(1, int(PagedLatentCache.num_blocks_for(mc, int(budget), bs, dtype)) - 1)

    # --- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if self.tokenizer is None and params.stop:
            raise ValueError("stop strings need a tokenizer; this engine has none")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds max_model_len ({self.max_model_len})")
        arrival = next(self._arrival)
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seq = Sequence(next(self._ids), request_id, i, list(prompt_token_ids), params, arrival,
                           generator=None if seed is None else make_generator(seed, self.runner.device),
                           detokenizer=None if self.tokenizer is None else Detokenizer(self.tokenizer, params))
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        self.prompts[request_id] = prompt

    def abort_request(self, request_id: str) -> None:
        for seq in self.requests.pop(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
        self.prompts.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # --- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return an output for every request that made progress."""
        batch = self.scheduler.schedule()
        if not batch.items:
            if self.scheduler.running or self.scheduler.waiting:
                raise RuntimeError("the KV cache is too small to run even one sequence")
            return []
        logits = self.runner.run(batch.items)
        sampling_rows = []
        for i, (seq, n) in enumerate(batch.items):
            seq.num_computed_tokens += n
            self.blocks.cache_full_blocks(seq.block_table, seq.all_token_ids, seq.num_computed_tokens)
            if seq.num_computed_tokens == seq.num_tokens:  # prompt (or recompute) done: sample
                sampling_rows.append(i)
        touched: dict[str, list[str]] = {}
        if sampling_rows:
            seqs = [batch.items[i][0] for i in sampling_rows]
            out = self.sampler(logits[sampling_rows], [
                RowState(s.params, s.prompt_token_ids, s.output_token_ids, s.generator, self.eos_token_id)
                for s in seqs])
            tokens, logprobs = out.token_ids.tolist(), out.logprobs.tolist()  # the step's one sync
            for j, seq in enumerate(seqs):
                token = tokens[j]
                seq.output_token_ids.append(token)
                if seq.params.logprobs is not None:
                    seq.logprobs.append(out.top_logprobs[j] if out.top_logprobs else None)
                seq.cumulative_logprob += logprobs[j]
                new_text, stop_str = seq.detokenizer.push(token) if seq.detokenizer else ("", None)
                reason = "stop" if stop_str is not None else check_stop(
                    seq.params, token, len(seq.output_token_ids), self.eos_token_id)
                if reason is None and seq.num_tokens >= self.max_model_len:
                    reason = "length"
                if reason is not None:
                    if stop_str is None and seq.detokenizer:
                        new_text += seq.detokenizer.flush()
                        stop_str = seq.detokenizer.stopped_by  # a stop string completed at the flush
                        reason = "stop" if stop_str is not None else reason
                    seq.stop_reason = stop_str if stop_str is not None else (
                        token if token in (seq.params.stop_token_ids or []) else None)
                    self.scheduler.finish(seq, reason)
                seq.text += new_text
                touched.setdefault(seq.request_id, [""] * seq.params.n)[seq.index] += new_text
        return [self._output(rid, texts) for rid, texts in touched.items()]

    def _output(self, request_id: str, new_text: list[str]) -> RequestOutput:
        seqs = self.requests[request_id]
        finished = all(s.finished for s in seqs)
        outputs = [CompletionOutput(s.index, s.text, list(s.output_token_ids),
                                    s.cumulative_logprob if s.params.logprobs is not None else None,
                                    list(s.logprobs) if s.params.logprobs is not None else None,
                                    s.finish_reason, s.stop_reason) for s in seqs]
        out = RequestOutput(request_id, self.prompts[request_id], list(seqs[0].prompt_token_ids), outputs,
                            finished, seqs[0].num_cached_tokens, new_text)
        if finished:
            del self.requests[request_id]
            del self.prompts[request_id]
        return out
