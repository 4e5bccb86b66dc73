"""GRPO: Group Relative Policy Optimization, reinforcement learning without a value model.

For each prompt q, G completions o_1..o_G are sampled from the policy as it was when the round
began (pi_old) and scored by a reward function. Each completion's advantage is its reward
normalized within its group, A_i = (r_i - mean(r)) / std(r), for every one of its tokens. The
objective (REFERENCE.md, Alignment), maximized over several optimizer steps per round of rollouts:

    J = 1/G sum_i 1/|o_i| sum_t [ min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) - beta D_KL,t ]
    rho_t = pi_theta(o_i,t | q, o_i,<t) / pi_old(o_i,t | ...)
    D_KL,t = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1       (unbiased, always >= 0)

against a frozen reference policy (the starting model). pi_old's log-probabilities are computed
once per round, before its first update, and kept: after the first update pi_theta moves away from
them and the ratio and its clipping start to matter.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..checkpoint import load_model
from ..tokenizer import Tokenizer
from ..train.loop import param_groups
from . import rewards
from .rollout import Rollout
from .run import Run
from .sft import PAPER_WIDTH
from .tokens import pad_rows, token_logprobs

PAPER_LR = 1e-6  # DeepSeekMath's GRPO learning rate, at DeepSeek-V2's width scaled as SFT's


@dataclass
class GRPOConfig:
    model: str  # HF-format directory with its tokenizer: the starting policy and the reference
    prompts: str  # JSONL: {"prompt": str} or {"messages": [...]}, plus what the reward reads
    reward: str = "math"
    out: str = "runs/grpo"
    eval_prompts: str | None = None  # held-out rows: greedy reward (accuracy) every eval_every steps
    steps: int = 100  # rounds of rollouts
    prompts_per_step: int = 16
    group_size: int = 8  # G
    updates_per_step: int = 1  # optimizer steps on each round's rollouts
    micro_batch: int = 32  # completions per forward
    lr: float | None = None  # default: PAPER_LR x PAPER_WIDTH / hidden_size
    beta: float = 0.04  # KL coefficient
    clip_eps: float = 0.2
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    rollout: str = "auto"  # engine on CUDA, reference generator on CPU
    eval_every: int = 10
    eval_limit: int | None = None
    checkpoint_every: int = 20
    keep_checkpoints: int = 2
    device: str = "auto"
    autocast: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "prompts_per_step", "updates_per_step", "micro_batch", "max_new_tokens",
                     "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(f"grpo {name} must be positive, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError(f"grpo group_size must be at least 2 (advantages are relative), got {self.group_size}")
        if self.beta < 0 or not 0 < self.clip_eps < 1 or self.temperature <= 0:
            raise ValueError("grpo needs beta >= 0, 0 < clip_eps < 1 and temperature > 0")
        rewards.get(self.reward)


def group_advantages(r: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Rewards [P, G] -> (r - group mean) / (group std + eps); a group whose rewards are all equal
    carries no signal and gets zeros."""
    return (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per token, the unbiased estimator of KL(pi_theta || pi_ref): pi_ref/pi - log(pi_ref/pi) - 1."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-J for a batch of completions: per-token log-probs [N, T] (logp with gradient, the others
    without), advantages [N], mask [N, T] marking completion tokens. Each completion's tokens are
    averaged, then the completions (1/|o_i|, then 1/G as the mean over the batch's completions)."""
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    kl = kl_estimate(logp, ref_logp)
    per_token = surrogate - beta * kl
    lengths = mask.sum(dim=1).clamp(min=1)
    loss = -((per_token * mask).sum(dim=1) / lengths).mean()
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_eps) & (ratio * a != surrogate)
        stats = {"kl": ((kl * mask).sum(1) / lengths).mean(),
                 "clip_fraction": (clipped.float() * mask).sum() / mask.sum().clamp(min=1)}
    return loss, stats


def read_prompts(path: str | Path, tokenizer: Tokenizer, report=print) -> list[dict]:
    """Rows of a prompts JSONL with their chat-template token ids (`ids`); bad rows are reported
    with their line number and skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("expected an object")
                if isinstance(row.get("messages"), list):
                    messages = row["messages"]
                elif isinstance(row.get("prompt"), str):
                    messages = [{"role": "user", "content": row["prompt"]}]
                else:
                    raise ValueError("needs a 'prompt' string or a 'messages' list")
                row["ids"] = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
                rows.append(row)
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                report(f"dsv2: {path}:{line_no}: skipped: {e}")
    if not rows:
        raise ValueError(f"{path}: no usable prompt")
    return rows


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig, resume: bool = False):
        self.cfg = cfg
        self.out = Run(cfg.out, cfg.device, cfg.autocast, resume)
        self.device, self.autocast = self.out.device, self.out.autocast
        self.tokenizer = Tokenizer.from_dir(cfg.model)
        self.reward = rewards.get(cfg.reward)
        self.policy = load_model(self.out.weights(cfg.model), self.device, torch.float32, quantization="none").train()
        self.reference = load_model(cfg.model, self.device, torch.float32, quantization="none")
        self.reference.eval().requires_grad_(False)
        self.prompts = read_prompts(cfg.prompts, self.tokenizer)
        self.eval_rows = read_prompts(cfg.eval_prompts, self.tokenizer)[: cfg.eval_limit] if cfg.eval_prompts else []
        longest = max(len(r["ids"]) for r in self.prompts + self.eval_rows)
        self.rollout = Rollout(self.policy, self.tokenizer, cfg.rollout, max_len=longest + cfg.max_new_tokens,
                               max_num_seqs=max(cfg.prompts_per_step * cfg.group_size, 1))
        self.lr = cfg.lr or PAPER_LR * PAPER_WIDTH / self.policy.config.hidden_size
        self.optimizer = torch.optim.AdamW(param_groups(self.policy, cfg.weight_decay), lr=self.lr,
                                           betas=(0.9, 0.95), fused=self.device.type == "cuda")
        self.step = self.out.restore(self.optimizer, cfg.seed)
        self.rollout.sync()  # a resumed policy's weights into the engine's copy
        (self.out.dir / "grpo_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    def _batch(self, step: int) -> list[dict]:
        """Round `step`'s prompts: passes through a fresh shuffle of the prompts, by the seed alone."""
        per = self.cfg.prompts_per_step
        start = step * per
        return [self.prompts[self._order(epoch)[k]]
                for epoch, k in (divmod(i, len(self.prompts)) for i in range(start, start + per))]

    @functools.lru_cache(maxsize=2)  # noqa: B019 - one trainer per run; a round spans at most two epochs
    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(self.cfg.seed * 1_000_003 + epoch).shuffle(order)
        return order

    @torch.no_grad()
    def _logprobs(self, model, tokens, valid) -> torch.Tensor:
        out = []
        for i in range(0, tokens.shape[0], self.cfg.micro_batch):
            with self.autocast:
                logits = model(tokens[i:i + self.cfg.micro_batch], attention_mask=valid[i:i + self.cfg.micro_batch])
            out.append(token_logprobs(logits, tokens[i:i + self.cfg.micro_batch]))
        return torch.cat(out)

    def train_step(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        batch = self._batch(self.step)
        completions = self.rollout.sample([r["ids"] for r in batch], cfg.group_size, cfg.max_new_tokens,
                                          cfg.temperature, cfg.top_p, seed=cfg.seed * 1_000_003 + self.step * 7919)
        t_rollout = time.perf_counter() - t0
        texts = [[self.tokenizer.decode(c, skip_special_tokens=True) for c in group] for group in completions]
        r = torch.tensor([[self.reward(t, row) for t in group] for group, row in zip(texts, batch)])
        advantages = group_advantages(r).flatten().to(self.device)
        rows, masks = [], []
        for row, group in zip(batch, completions):
            for c in group:
                rows.append(row["ids"] + c)
                masks.append([False] * len(row["ids"]) + [True] * len(c))
        tokens, valid, mask = pad_rows(rows, masks, self.device)
        mask = mask[:, 1:]  # aligned with the log-probs: position t predicts token t + 1
        self.policy.eval()  # pi_old: the policy that sampled, before this round's first update
        old_logp = self._logprobs(self.policy, tokens, valid)
        self.policy.train()
        ref_logp = self._logprobs(self.reference, tokens, valid)
        n = tokens.shape[0]
        stats = {"kl": 0.0, "clip_fraction": 0.0, "loss": 0.0}
        for _ in range(cfg.updates_per_step):
            for i in range(0, n, cfg.micro_batch):
                sl = slice(i, i + cfg.micro_batch)
                with self.autocast:
                    logits = self.policy(tokens[sl], attention_mask=valid[sl])
                logp = token_logprobs(logits, tokens[sl])
                loss, parts = grpo_loss(logp, old_logp[sl], ref_logp[sl], advantages[sl], mask[sl],
                                        cfg.clip_eps, cfg.beta)
                share = logp.shape[0] / n
                (loss * share).backward()
                for k, v in (("loss", loss), *parts.items()):
                    stats[k] += v.item() * share / cfg.updates_per_step
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.rollout.sync()
        self.step += 1
        lengths = [len(c) for group in completions for c in group]
        return {"step": self.step, "reward_mean": float(r.mean()), "reward_std": float(r.std()),
                "groups_with_signal": float((r.std(dim=1) > 0).float().mean()), **stats,
                "grad_norm": float(grad_norm), "length_mean": sum(lengths) / len(lengths),
                "length_max": max(lengths), "rollout_s": t_rollout, "step_s": time.perf_counter() - t0}

    def evaluate(self) -> dict:
        return {"step": self.step, **score(self.rollout, self.tokenizer, self.eval_rows, self.reward,
                                            self.cfg.max_new_tokens)}

    def run(self) -> dict:
        cfg = self.cfg
        bar = tqdm(total=cfg.steps, initial=self.step, unit="step", disable=not cfg.progress, dynamic_ncols=True)
        last: dict = {}
        if self.step == 0 and self.eval_rows:
            self.out.log(self.evaluate())
        while self.step < cfg.steps:
            last = self.train_step()
            self.out.log(last)
            bar.update(1)
            bar.set_postfix(reward=f"{last['reward_mean']:.3f}", kl=f"{last['kl']:.4f}")
            if self.eval_rows and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                last.update(self.evaluate())
                self.out.log({k: last[k] for k in ("step", "eval_reward", "eval_n")})
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.out.save(self.step, self.policy, self.optimizer, cfg.keep_checkpoints)
        bar.close()
        self.out.save_final(self.policy, cfg.model)
        return last


def score(rollout: Rollout, tokenizer: Tokenizer, rows: list[dict], reward, max_new_tokens: int) -> dict:
    """Greedy completions of `rows`, their mean reward (accuracy for a 0/1 reward)."""
    if not rows:
        return {"eval_reward": math.nan, "eval_n": 0}
    outs = rollout.sample([r["ids"] for r in rows], 1, max_new_tokens, temperature=0.0)
    values = [reward(tokenizer.decode(o[0], skip_special_tokens=True), r) for o, r in zip(outs, rows)]
    return {"eval_reward": sum(values) / len(values), "eval_n": len(values)}


def grpo(cfg: GRPOConfig, resume: bool = False) -> dict:
    return GRPOTrainer(cfg, resume).run()
