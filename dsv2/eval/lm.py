"""The model as an evaluation harness sees it: log-likelihoods of continuations and generations.

Two backends give the same numbers (tests hold them together); "auto" generates through the
engine on CUDA and scores log-likelihoods by forward passes (the faster of the two there):
- "engine": requests to the inference engine (`LLMEngine`), batched continuously. A continuation
  is scored as prompt logprobs of context + continuation (one prefill per request, no sampling
  worth the name: max_tokens 1); generations are ordinary requests with stop strings.
- "reference": plain batched forward passes of the model (right-padded, every position's logits)
  and the reference generator: obviously right, and what runs on CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import load_model
from ..generate import generate
from ..model import Transformer
from ..tokenizer import Tokenizer


REFERENCE_TOKENS_PER_BATCH = 8192


class EvalModel:
    def __init__(self, model: str | Path | Transformer, tokenizer: Tokenizer | None = None, device: str | None = None,
                 dtype: str | None = None, backend: str = "auto", batch_size: int = 32, max_num_seqs: int = 64):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if isinstance(model, Transformer):
            self.model = model.eval()  # tokenizer None: token-id scoring only (benchmarks of random weights)
        else:
            # CPU evaluation in fp32 (bf16 matmuls are slow there and change the scores)
            self.model = load_model(model, device, dtype or ("float32" if device == "cpu" else None)).eval()
            tokenizer = tokenizer or Tokenizer.from_dir(model)
        self.tokenizer = tokenizer
        self.device = next(self.model.parameters()).device
        self.max_len = self.model.config.max_position_embeddings
        self.batch_size = batch_size
        if backend not in ("auto", "engine", "reference"):
            raise ValueError(f"eval backend {backend!r}: expected auto, engine or reference")
        # auto: generations through the engine on CUDA; log-likelihoods by forward passes that
        # compute logits only at the scored positions, which measured faster on an H100 than the
        # engine's prompt logprobs (bench/RESULTS.md)
        self.backend = backend if backend != "auto" else ("engine" if self.device.type == "cuda" else "reference")
        self.scoring = "reference" if backend == "auto" else backend
        self._engine = None
        self._max_num_seqs = max_num_seqs
        self._ids = 0

    @property
    def engine(self):
        if self._engine is None:
            from ..engine import EngineConfig, LLMEngine

            self._engine = LLMEngine(self.model, self.tokenizer, EngineConfig(
                max_num_seqs=self._max_num_seqs, max_model_len=self.max_len, enable_prefix_caching=True))
        return self._engine

    # --- log-likelihoods -------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """For each (context ids, continuation ids): the continuation's summed log-probability given
        the context, and whether greedy decoding would have produced it token for token. The pair
        is cut from the left to the model's context length less one (the continuation always kept)."""
        reqs = [self._fit(c, x) for c, x in requests]
        if self.scoring == "engine":
            return self._engine_loglikelihood(reqs)
        return [r for i in range(0, len(reqs), self.batch_size)
                for r in self._forward_loglikelihood(reqs[i:i + self.batch_size])]

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        if not continuation:
            raise ValueError("an empty continuation has no likelihood to score")
        # one position short of the context: an engine request also generates one token, and both
        # backends cut alike so their scores agree
        room = self.max_len - 1
        if len(continuation) >= room:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the context ({self.max_len})")
        keep = room - len(continuation)
        context = context[-keep:] if context else []
        if not context:  # something must predict the first continuation token
            bos = self.tokenizer.bos_token_id if self.tokenizer is not None else None
            context = [bos if bos is not None else continuation[0]]
        return context, continuation

    @torch.no_grad()
    def _forward_loglikelihood(self, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        rows = [c + x for c, x in batch]
        width = max(len(r) for r in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
            valid[i, : len(r)] = True
        # logits only where a continuation token is predicted (position p predicts token p + 1):
        # the LM head and the fp32 log-softmax over every position would be ~10% of the FLOPs and
        # most of the memory traffic of a scoring batch
        k = max(len(x) for _, x in batch)
        index = torch.tensor([[len(c) - 1 + min(j, len(x) - 1) for j in range(k)] for c, x in batch])
        tokens, valid, index = tokens.to(self.device), valid.to(self.device), index.to(self.device)
        logp = F.log_softmax(self.model(tokens, attention_mask=valid, output_index=index).float(), dim=-1)
        out = []
        for i, (_, x) in enumerate(batch):
            target = torch.tensor(x, device=self.device)
            lp = logp[i, : len(x)]
            out.append((lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())))
        return out

    def _engine_loglikelihood(self, reqs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        from ..engine import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, ignore_eos=True)
        results = self._run_engine([c + x for c, x in reqs], [params] * len(reqs))
        out = []
        for (c, x), res in zip(reqs, results):
            entries = res.prompt_logprobs[len(c):]
            total, greedy = 0.0, True
            for token, entry in zip(x, entries, strict=True):
                value = entry[token]
                total += value
                greedy = greedy and value >= max(entry.values())
            out.append((total, greedy))
        return out

    def _run_engine(self, prompts: list[list[int]], params: list) -> list:
        """Each prompt's final RequestOutput, in order; at most max_num_seqs queued at a time so
        finished requests free their pages for the next."""
        done: dict[str, object] = {}
        ids = []
        pending = list(zip(prompts, params))
        queued = 0
        engine = self.engine
        bar = tqdm(total=len(prompts), desc="requests", unit="req", disable=None, leave=False)
        while pending or engine.has_unfinished_requests():
            while pending and queued < 4 * self._max_num_seqs:
                prompt, p = pending.pop(0)
                rid = f"eval-{self._ids}"
                self._ids += 1
                ids.append(rid)
                engine.add_request(rid, prompt, p)
                queued += 1
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out
                    queued -= 1
                    bar.update(1)
        bar.close()
        return [done[r] for r in ids]

    # --- generation ------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[list[int]], max_new_tokens: int, stop: list[str] | None = None,
                 temperature: float = 0.0, n: int = 1, seed: int | None = None) -> list[list[str]]:
        """n completions (text) per prompt, each cut before the first stop string."""
        if self.tokenizer is None:
            raise ValueError("generation needs a tokenizer (stop strings, text)")
        budgets = [min(max_new_tokens, self.max_len - len(p)) for p in prompts]
        if any(b <= 0 for b in budgets):
            raise ValueError(f"a prompt fills the model's context ({self.max_len} tokens)")
        if self.backend == "engine":
            from ..engine import SamplingParams

            params = [SamplingParams(max_tokens=b, temperature=temperature, n=n, stop=stop or None,
                                     seed=None if seed is None else seed + i) for i, b in enumerate(budgets)]
            return [[c.text for c in r.outputs] for r in self._run_engine(list(prompts), params)]
        eos = self.tokenizer.eos_token_id
        # the reference generator's prefill holds [rows, heads, S, S] scores: long prompts go in
        # fewer rows at a time (a 25 x 4K-token batch asked for tens of GB)
        longest = max(len(p) for p in prompts)
        step = max(1, min(self.batch_size, REFERENCE_TOKENS_PER_BATCH // (longest * n)))
        out = []
        for i in tqdm(range(0, len(prompts), step), desc="generating", unit="batch", disable=None, leave=False):
            rows = [p for p in prompts[i:i + step] for _ in range(n)]
            ids = generate(self.model, rows, min(budgets[i:i + step]), temperature=temperature,
                           stop_token_ids=[eos] if eos is not None else None,
                           seed=None if seed is None else seed + i)
            texts = [_cut(self.tokenizer.decode(t, skip_special_tokens=True), stop) for t in ids]
            out += [texts[j * n:(j + 1) * n] for j in range(len(rows) // n)]
        return out


def _cut(text: str, stop: list[str] | None) -> str:
    for s in stop or ():
        k = text.find(s)
        if k >= 0:
            text = text[:k]
    return text
