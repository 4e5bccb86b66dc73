"""Sampling completions from the current policy: the engine on CUDA, the reference generator on CPU.

Both draw reproducibly from a seed. The engine runs on its own bf16 copy of the policy, refreshed
in place after each optimizer round (`sync`), so its captured graphs keep pointing at the same
tensors; prefix caching stays off because cached latents would outlive the weights they came from.
"""

from __future__ import annotations

import copy

import torch

from ..generate import generate
from ..model import Transformer
from ..tokenizer import Tokenizer


class Rollout:
    def __init__(self, policy: Transformer, tokenizer: Tokenizer, backend: str = "auto", max_len: int = 1024,
                 max_num_seqs: int = 256):
        device = next(policy.parameters()).device
        if backend == "auto":
            backend = "engine" if device.type == "cuda" else "reference"
        if backend not in ("engine", "reference"):
            raise ValueError(f"rollout backend {backend!r}: expected auto, engine or reference")
        self.backend, self.policy, self.tokenizer = backend, policy, tokenizer
        self.eos = tokenizer.eos_token_id
        if backend == "engine":
            from ..engine import EngineConfig, LLMEngine

            self.copy = copy.deepcopy(policy).to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval()
            # a cache for the rollouts alone (the trainer shares the GPU), and CUDA graphs without
            # torch.compile: rollouts meet many prompt shapes, and a policy small enough to train
            # beside its engine is bound by launches, which the graphs remove
            pages = max_num_seqs * -(-max_len // 64) + 1
            self.engine = LLMEngine(self.copy, tokenizer, EngineConfig(
                max_num_seqs=max_num_seqs, max_model_len=max_len, num_blocks=pages, enable_prefix_caching=False,
                compile=False))
            self._ids = 0

    @torch.no_grad()
    def sync(self) -> None:
        """After the policy's weights change: the engine's copy takes them in place."""
        if self.backend == "engine":
            for dst, src in zip(self.copy.parameters(), self.policy.parameters(), strict=True):
                dst.copy_(src)

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float,
               top_p: float = 1.0, seed: int = 0) -> list[list[list[int]]]:
        """For each prompt, n completions (token ids, ending with EOS when the model stopped)."""
        if self.backend == "reference":
            was_training = self.policy.training
            self.policy.eval()
            rows = [p for p in prompts for _ in range(n)]
            out = generate(self.policy, rows, max_new_tokens, temperature=temperature, top_p=top_p,
                           stop_token_ids=[self.eos] if self.eos is not None else None, seed=seed)
            self.policy.train(was_training)
            return [out[i * n:(i + 1) * n] for i in range(len(prompts))]
        from ..engine import SamplingParams

        ids = []
        for i, p in enumerate(prompts):
            rid = f"rollout-{self._ids}"
            self._ids += 1
            ids.append(rid)
            self.engine.add_request(rid, p, SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed + i,
                skip_special_tokens=True))
        done: dict[str, list[list[int]]] = {}
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = [list(c.token_ids) for c in out.outputs]
        return [done[r] for r in ids]
