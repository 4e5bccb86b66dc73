"""LLMEngine: requests in, one scheduled step at a time, finished outputs out.

add_request -> the scheduler queues it; step() schedules a batch, runs the model over the paged
latent cache, samples the rows whose prompt is complete, detokenizes, checks stops, frees the
pages of finished sequences. abort_request frees a request's pages at once.

A request with structured outputs gets a grammar matcher per sequence (engine/structured.py): its
mask is computed on the host while the device runs the step's model forward, applied by the
sampler, and the matcher advances with each token read back.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..model import Transformer
from ..tokenizer import Tokenizer
from .cache import BlockManager, PagedLatentCache
from .host import to_device
from .params import SamplingParams
from .runner import ModelRunner
from .sampler import Detokenizer, RowState, Sampler, check_stop, make_generator
from .scheduler import Scheduler
from .sequence import PENDING, Sequence, Status
from .structured import GrammarCompiler
from .warmup import warmup

log = logging.getLogger(__name__)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None  # per token: the top N and the chosen token's logprob
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
    # with SamplingParams.prompt_logprobs: per prompt token, {token id: logprob} of the top N and
    # of the token itself (None for the first token, which nothing predicts), as vLLM gives them
    prompt_logprobs: list[dict[int, float] | None] | None = None


class StepError(RuntimeError):
    """A scheduled step failed while running (out of memory in the model, say). The requests it
    carried, and those of the step still in flight, cannot go on: `request_ids` names them for the
    caller to abort; every other request is intact and the engine can keep stepping."""

    def __init__(self, request_ids: list[str], cause: BaseException):
        super().__init__(f"an engine step failed ({type(cause).__name__}: {cause})")
        self.request_ids, self.cause = request_ids, cause


@dataclass
class EngineConfig:
    max_num_seqs: int = 256
    max_model_len: int | None = None
    max_num_batched_tokens: int = 2048
    block_size: int = 64
    num_blocks: int | None = None  # None: sized from free GPU memory (or 4 GiB on CPU)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # True: no CUDA graphs (nor compilation) for any step
    compile: bool = True  # torch.compile the captured decode steps
    compile_prefill: bool = True  # and the captured prefill steps
    async_scheduling: bool = True  # launch each step before processing the previous one's tokens


@dataclass
class _Step:
    """A launched step: what its host-side processing needs once its tokens are back."""

    items: list[tuple[Sequence, int]]
    computed: list[int]  # each item's num_computed_tokens after the step
    seqs: list[Sequence]  # the sampled rows' sequences
    slots: list[int]  # where each one's token goes in its output_token_ids
    token_ids: torch.Tensor | None = None  # [S] on the device
    host: torch.Tensor | None = None  # [2, S] token ids and logprobs, copied back without blocking
    ready: torch.cuda.Event | None = None
    top_logprobs: list | None = None


class LLMEngine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, cfg: EngineConfig,
                 cache_dtype: torch.dtype | None = None, tp_group=None):
        """tokenizer None: token ids in and out only (no text, no stop strings, no EOS), as for
        benchmarks over random weights. `tp_group`: the process group a tensor-parallel model is
        split over (engine/workers.py); this engine leads it from its rank 0, and every rank
        builds an engine of the same shape (its cache sized for the rank with the least memory)."""
        self.tp_group = tp_group
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id if tokenizer is not None else None
        self.cfg = cfg
        mc = model.config
        self.max_model_len = min(cfg.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        param = next(model.parameters())
        cache_dtype = cache_dtype or param.dtype
        num_blocks = cfg.num_blocks or self._size_cache(param.device, cache_dtype)
        if tp_group is not None:  # every rank's cache holds the same blocks
            least = torch.tensor([num_blocks], device=param.device)
            dist.all_reduce(least, dist.ReduceOp.MIN, group=tp_group)
            num_blocks = int(least)
        if num_blocks * cfg.block_size < self.max_model_len:
            raise ValueError(f"the KV cache holds {num_blocks * cfg.block_size} tokens, fewer than "
                             f"max_model_len ({self.max_model_len}): lower max_model_len or give it more memory")
        # one block more than the manager hands out: the runner's scratch block for padding writes
        self.pages = PagedLatentCache(mc, num_blocks + 1, cfg.block_size, param.device, cache_dtype)
        self.blocks = BlockManager(num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, cfg.max_num_seqs, cfg.max_num_batched_tokens, self.max_model_len)
        self.runner = ModelRunner(self.model, self.pages, cfg.max_num_seqs, self.max_model_len,
                                  cuda_graphs=not cfg.enforce_eager, compile=cfg.compile,
                                  compile_prefill=cfg.compile_prefill,
                                  max_graph_tokens=2 * cfg.max_num_batched_tokens, tp_group=tp_group)
        self.sampler = Sampler()
        # structured outputs' grammars, compiled once per spec (thread-safe: a server compiles in
        # its worker threads, see AsyncLLM.compile_grammar)
        self.grammars = None if tokenizer is None else GrammarCompiler(tokenizer, mc.vocab_size)
        self.requests: dict[str, list[Sequence]] = {}
        self.prompts: dict[str, str | None] = {}
        self._ids = itertools.count()
        self._arrival = itertools.count()
        self._inflight: _Step | None = None
        # a tensor-parallel engine's workers (engine/workers.py): `check` raises if one died, and the
        # engine holds it while a step runs (a step stuck on a dead worker ends the process)
        self.guard = None

    def _size_cache(self, device: torch.device, dtype: torch.dtype) -> int:
        bs, mc = self.cfg.block_size, self.model.config
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            budget = free - (1 - self.cfg.gpu_memory_utilization) * total
        else:
            budget = 4 * 2**30
        return max(1, int(PagedLatentCache.num_blocks_for(mc, int(budget), bs, dtype)) - 1)

    # --- requests -------------------------------------------------------------------------------
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError for a request this engine cannot run, before anything is queued."""
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
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}), got {max(params.logit_bias)}")
        spec = params.structured_outputs
        if spec is not None:
            if self.grammars is None:
                raise ValueError("structured outputs need a tokenizer; this engine has none")
            self.grammars.compile(spec)  # a ValueError for a spec that does not compile, before anything is queued

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.check_request(prompt_token_ids, params)
        spec = params.structured_outputs
        arrival = next(self._arrival)
        seqs = []
        for i in range(params.n):
            seed = None if params.seed is None else params.seed + i
            seq = Sequence(next(self._ids), request_id, i, list(prompt_token_ids), params, arrival,
                           generator=None if seed is None else make_generator(seed, self.runner.device),
                           detokenizer=None if self.tokenizer is None else Detokenizer(self.tokenizer, params),
                           grammar=None if spec is None else self.grammars.grammar(spec))
            if i == 0 and params.prompt_logprobs is not None:  # one sample scores the prompt
                seq.prompt_logprobs = [None] * len(prompt_token_ids)
            seqs.append(seq)
            self.scheduler.add(seq)
        self.requests[request_id] = seqs
        self.prompts[request_id] = prompt

    def stop_followers(self) -> None:
        """A tensor-parallel engine's last word to its other ranks (engine/workers.py)."""
        self.runner.stop_followers()

    def warmup(self, batch_sizes: list[int] | None = None) -> dict:
        """Compile and capture every kind of step before the first request (engine/warmup.py)."""
        return warmup(self, batch_sizes)

    def abort_request(self, request_id: str) -> None:
        for seq in self.requests.pop(request_id, []):
            if not seq.finished:
                self.scheduler.finish(seq, "abort")
        self.prompts.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)  # a request whose token is in flight is still among them

    # --- one step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return an output for every request that made progress.

        With async scheduling a step launches its batch and, while the GPU runs it, reads back and
        processes the previous step's tokens: outputs come one step late, and a decode row whose
        input is the token still in flight takes it on the device. A batch that reads token
        history on the host (penalties, a structured output's grammar) or asks for top or prompt
        logprobs runs synchronously.
        A failure while running the batch raises StepError naming the requests it leaves broken."""
        if self.guard is not None:
            self.guard.check()
        batch = self.scheduler.schedule()
        prior = self._inflight
        try:
            with self.guard or contextlib.nullcontext():
                return self._step(batch)
        except Exception as e:
            self._inflight = None
            if self.guard is not None:
                self.guard.check(e)  # a dead worker ends the engine, not just this step
            failed = {seq.request_id for seq, _ in batch.items}
            failed |= {seq.request_id for seq in prior.seqs} if prior is not None else set()
            raise StepError(sorted(failed & self.requests.keys()), e) from e

    def _step(self, batch) -> list[RequestOutput]:
        # A grammar's mask for the next token needs the token before it in the host's matcher, and
        # under async scheduling that token is still on the device when the next step launches. So
        # a batch with a constrained row goes synchronous: the step in flight is read back (every
        # matcher advanced) before the launch, and the launched step right after it, so no
        # constrained token is ever in flight. The mask is still computed while the device runs
        # the model (_launch); only the overlap of the host's bookkeeping is lost, and only for
        # steps that carry a constrained row. Graphs are unaffected: they capture the model's
        # step, and the mask is applied by the sampler after it.
        sync = not self.cfg.async_scheduling or any(
            seq.params.has_penalties or seq.params.logprobs is not None or seq.needs_prompt_logprobs
            or seq.grammar is not None for seq, _ in batch.items)
        outputs, was_inflight = [], self._inflight is not None
        if self._inflight is not None and (sync or not batch.items):
            outputs, self._inflight = self._process(self._inflight), None
        if not batch.items:
            if not was_inflight and (self.scheduler.running or self.scheduler.waiting):
                raise RuntimeError("the KV cache is too small to run even one sequence")
            return outputs
        launched = self._launch(batch.items)
        if self._inflight is not None:  # overlaps the batch just launched
            outputs = self._process(self._inflight)
        self._inflight = None
        if sync:
            return outputs + self._process(launched)
        self._inflight = launched
        return outputs

    def _launch(self, items: list[tuple[Sequence, int]]) -> _Step:
        """Run the model over the batch and sample; the tokens stay on the device, their places in
        each sequence held by PENDING."""
        pending = None
        if self._inflight is not None:
            pending = (self._inflight.token_ids, {seq.seq_id: j for j, seq in enumerate(self._inflight.seqs)})
        scoring = [i for i, (seq, _) in enumerate(items)
                   if seq.needs_prompt_logprobs and seq.num_computed_tokens < len(seq.prompt_token_ids)]
        if scoring:
            logits, every = self.runner.run_every_position(items, pending)
            for i in scoring:
                _record_prompt_logprobs(items[i][0], items[i][1], every[i])
        else:
            logits = self.runner.run(items, pending)
        step = _Step(items=items, computed=[], seqs=[], slots=[])
        rows = []
        for i, (seq, n) in enumerate(items):
            seq.num_computed_tokens += n
            step.computed.append(seq.num_computed_tokens)
            if seq.num_computed_tokens == seq.num_tokens:  # prompt (or recompute) done: sample
                step.seqs.append(seq)
                rows.append(i)
        if step.seqs:
            if len(rows) < len(items):
                logits = logits[to_device(rows, logits.device)]
            allowed = self._allowed(step.seqs)
            out = self.sampler(logits, [
                RowState(s.params, s.prompt_token_ids, s.output_token_ids, s.generator, self.eos_token_id, allowed[j])
                for j, s in enumerate(step.seqs)])
            step.token_ids, step.top_logprobs = out.token_ids, out.top_logprobs
            step.host = out.host.to("cpu", non_blocking=True)
            if logits.is_cuda:
                step.ready = torch.cuda.Event()
                step.ready.record()
            for seq in step.seqs:
                step.slots.append(len(seq.output_token_ids))
                seq.output_token_ids.append(PENDING)
        return step

    def _allowed(self, seqs: list[Sequence]) -> list:
        """Each sampled row's grammar mask (None for a free row), computed here on the host while
        the device runs the step's forward; nothing at all when no row is constrained."""
        which = [j for j, s in enumerate(seqs) if s.grammar is not None]
        allowed = [None] * len(seqs)
        if which:
            masks = self.grammars.fill_bitmask([seqs[j].grammar for j in which])
            for k, j in enumerate(which):
                allowed[j] = masks[k]
        return allowed

    def _process(self, step: _Step) -> list[RequestOutput]:
        """The host's side of a launched step: its tokens read back (the one sync), prefix-cache
        registration, detokenization, stop checks."""
        bs = self.cfg.block_size
        for (seq, n), computed in zip(step.items, step.computed):
            # a block filled up, and the sequence still holds it (not finished or preempted since)
            if computed // bs > (computed - n) // bs and seq.status is Status.RUNNING \
                    and seq.num_computed_tokens >= computed:
                self.blocks.cache_full_blocks(seq.block_table, seq.all_token_ids, computed)
        if not step.seqs:
            return []
        if step.ready is not None:
            step.ready.synchronize()
        tokens, logprobs = step.host.tolist()
        touched: dict[str, list[str]] = {}
        for j, (seq, slot) in enumerate(zip(step.seqs, step.slots)):
            if seq.finished:  # ended (or aborted) while this step was in flight: its token is void
                continue
            token = int(tokens[j])
            seq.output_token_ids[slot] = token
            if seq.params.logprobs is not None:
                # as vLLM: {token id: logprob} of the top N and of the chosen token, wherever it ranks
                top = step.top_logprobs[j] if step.top_logprobs else None
                seq.logprobs.append({**dict(top or ()), token: logprobs[j]})
            seq.cumulative_logprob += logprobs[j]
            new_text, stop_str = seq.detokenizer.push(token) if seq.detokenizer else ("", None)
            reason = "stop" if stop_str is not None else check_stop(seq.params, token, slot + 1, self.eos_token_id)
            if reason is None and len(seq.prompt_token_ids) + slot + 1 >= self.max_model_len:
                reason = "length"
            if seq.grammar is not None:
                if reason is None:
                    seq.grammar.accept(token)
                if seq.grammar.error is not None:
                    # as vLLM's guidance backend: a failed matcher allows only EOS, and the request
                    # ends here (under ignore_eos too, which would draw EOS until max_tokens)
                    log.warning("request %s: its structured output cannot go on (%s); it ends",
                                seq.request_id, seq.grammar.error)
                    reason = reason or "stop"
            if reason is not None:
                if stop_str is None and seq.detokenizer:
                    new_text += seq.detokenizer.flush()
                    stop_str = seq.detokenizer.stopped_by  # a stop string completed at the flush
                    reason = "stop" if stop_str is not None else reason
                seq.stop_reason = stop_str if stop_str is not None else (
                    token if token in (seq.params.stop_token_ids or []) else None)
                del seq.output_token_ids[slot + 1:]  # a token the next step has in flight
                self.scheduler.finish(seq, reason)
            seq.text += new_text
            if seq.params.output_kind == "final_only" and not seq.finished:
                continue
            touched.setdefault(seq.request_id, [""] * seq.params.n)[seq.index] += new_text
        # (a request of n > 1 samples touched by a finished one reports once all of them have)
        return [self._output(rid, texts) for rid, texts in touched.items()
                if self.requests[rid][0].params.output_kind == "cumulative"
                or all(s.finished for s in self.requests[rid])]

    def _output(self, request_id: str, new_text: list[str]) -> RequestOutput:
        seqs = self.requests[request_id]
        finished = all(s.finished for s in seqs)
        outputs = [CompletionOutput(s.index, s.text, s.resolved_output_ids,
                                    s.cumulative_logprob if s.params.logprobs is not None else None,
                                    list(s.logprobs) if s.params.logprobs is not None else None,
                                    s.finish_reason, s.stop_reason) for s in seqs]
        # the prompt's list itself, not a copy per step: the engine never changes it
        out = RequestOutput(request_id, self.prompts[request_id], seqs[0].prompt_token_ids, outputs,
                            finished, seqs[0].num_cached_tokens, new_text,
                            None if seqs[0].prompt_logprobs is None else list(seqs[0].prompt_logprobs))
        if finished:
            del self.requests[request_id]
            del self.prompts[request_id]
        return out


def _record_prompt_logprobs(seq: Sequence, n: int, logits: torch.Tensor) -> None:
    """The prompt logprobs a chunk of n tokens from seq.num_computed_tokens gives: position p's
    logits [W, V] predict prompt token p + 1."""
    prompt, start = seq.prompt_token_ids, seq.num_computed_tokens
    m = min(start + n, len(prompt) - 1) - start
    if m <= 0:
        return
    lp = logits[:m].float().log_softmax(-1)
    targets = prompt[start + 1:start + 1 + m]
    chosen = lp.gather(1, torch.tensor(targets, device=lp.device)[:, None])[:, 0].tolist()
    k = seq.params.prompt_logprobs
    top_values, top_ids = lp.topk(k, dim=-1) if k else (None, None)
    top = zip(top_ids.tolist(), top_values.tolist()) if k else (([], []) for _ in range(m))
    for j, ((ids, values), token, value) in enumerate(zip(top, targets, chosen)):
        seq.prompt_logprobs[start + 1 + j] = {**dict(zip(ids, values)), token: value}
