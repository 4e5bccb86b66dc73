"""Supervised fine-tuning on conversations: cross-entropy on the assistant turns only.

The paper's recipe (REFERENCE.md, Alignment): 2 epochs at LR 5e-6 for the 236B model, whose width
is 5,120. A far narrower model takes a larger step for the same update size (the LR of Adam-type
optimizers scales about inversely with width), so the default LR is 5e-6 x 5120 / hidden_size:
1e-4 for the bundled model (256 wide), 1.25e-5 for V2-Lite. Conversations are batched with right
padding (the attention mask keeps conversations apart), and each optimizer step averages the loss
over all of its batch's assistant tokens, so long answers weigh by their length as in the paper's
token-level loss. Checkpoints use the pre-training loop's format and resume exactly: the epoch,
the position in that epoch's shuffled order, the optimizer and the RNG are all restored.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ..checkpoint import load_model
from ..tokenizer import Tokenizer
from ..train.loop import param_groups
from .chat_data import ChatExample, read_chats
from .run import Run
from .tokens import pad_rows, token_logprobs

PAPER_LR, PAPER_WIDTH = 5e-6, 5120


@dataclass
class SFTConfig:
    model: str  # HF-format directory with its tokenizer
    data: str  # JSONL of {"messages": [...]}
    out: str = "runs/sft"
    val_data: str | None = None  # default: val_fraction of `data`, held out
    val_fraction: float = 0.05
    epochs: float = 2.0
    lr: float | None = None  # default: PAPER_LR x PAPER_WIDTH / hidden_size
    warmup_fraction: float = 0.05
    min_lr_fraction: float = 0.1  # linear decay to this fraction of lr at the end
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch_size: int = 32  # conversations per optimizer step
    micro_batch: int = 8
    max_len: int | None = None  # default: the model's max_position_embeddings
    strict: bool = False  # a bad row raises instead of being reported and skipped
    eval_every: int = 50
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    device: str = "auto"
    autocast: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "micro_batch", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"sft {name} must be positive, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch:
            raise ValueError(f"sft batch_size ({self.batch_size}) must be a multiple of micro_batch ({self.micro_batch})")
        if not self.epochs > 0 or not 0 <= self.val_fraction < 1 or (self.lr is not None and not self.lr > 0):
            raise ValueError("sft epochs and lr must be positive and val_fraction in [0, 1)")


def sft_loss(logits: torch.Tensor, tokens: torch.Tensor, trained: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over trained tokens, their count): token t is predicted from tokens < t."""
    mask = trained[:, 1:]
    return -(token_logprobs(logits, tokens) * mask).sum(), mask.sum()


def default_lr(hidden_size: int) -> float:
    return PAPER_LR * PAPER_WIDTH / hidden_size


class SFTTrainer:
    def __init__(self, cfg: SFTConfig, resume: bool = False):
        self.cfg = cfg
        self.out = Run(cfg.out, cfg.device, cfg.autocast, resume)
        self.device, self.autocast = self.out.device, self.out.autocast
        self.tokenizer = Tokenizer.from_dir(cfg.model)
        self.model = load_model(self.out.weights(cfg.model), device=self.device, dtype=torch.float32,
                                quantization="none").train()
        self.max_len = cfg.max_len or self.model.config.max_position_embeddings
        self.train_set, self.val_set = self._datasets()
        self.lr = cfg.lr or default_lr(self.model.config.hidden_size)
        self.steps_per_epoch = math.ceil(len(self.train_set) / cfg.batch_size)
        self.total_steps = max(1, math.ceil(self.steps_per_epoch * cfg.epochs))
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=self.lr,
                                           betas=(0.9, 0.95), fused=self.device.type == "cuda")
        self.step = self.out.restore(self.optimizer, cfg.seed)
        (self.out.dir / "sft_config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")

    def _datasets(self) -> tuple[list[ChatExample], list[ChatExample]]:
        cfg = self.cfg
        rows = read_chats(cfg.data, self.tokenizer, self.max_len, cfg.strict)
        if cfg.val_data:
            return rows, read_chats(cfg.val_data, self.tokenizer, self.max_len, cfg.strict)
        # a fixed held-out part, chosen by the seed alone, so a resumed run holds out the same rows
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_val = int(len(rows) * cfg.val_fraction)
        return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]

    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_set), generator=g).tolist()

    def learning_rate(self, step: int) -> float:
        warmup = max(1, int(self.cfg.warmup_fraction * self.total_steps))
        if step < warmup:
            return self.lr * (step + 1) / warmup
        done = (step - warmup) / max(1, self.total_steps - warmup)
        return self.lr * (1 - (1 - self.cfg.min_lr_fraction) * done)

    def _batch(self, step: int) -> list[ChatExample]:
        """Step `step`'s conversations: epochs run through a fresh shuffle each, a step never
        straddling two epochs (the last batch of an epoch may be short)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        b = self.cfg.batch_size
        return [self.train_set[i] for i in self._order(epoch)[k * b:(k + 1) * b]]

    def _forward(self, examples: list[ChatExample]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, valid, trained = pad_rows([e.tokens for e in examples], [e.trained for e in examples], self.device)
        with self.autocast:
            logits = self.model(tokens, attention_mask=valid)
        return sft_loss(logits, tokens, trained)

    def train_step(self) -> dict:
        cfg = self.cfg
        lr = self.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self._batch(self.step)
        n_trained = sum(sum(e.trained[1:]) for e in batch)
        total = 0.0
        for i in range(0, len(batch), cfg.micro_batch):
            loss_sum, _ = self._forward(batch[i:i + cfg.micro_batch])
            (loss_sum / n_trained).backward()
            total += loss_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "epoch": self.step / self.steps_per_epoch, "lr": lr,
                "loss": total / n_trained, "trained_tokens": n_trained, "grad_norm": float(grad_norm)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(self.val_set), self.cfg.micro_batch):
            loss_sum, n = self._forward(self.val_set[i:i + self.cfg.micro_batch])
            total, count = total + float(loss_sum), count + int(n)
        self.model.train()
        return {"step": self.step, "val_loss": total / max(count, 1)}

    def run(self) -> dict:
        cfg = self.cfg
        bar = tqdm(total=self.total_steps, initial=self.step, unit="step", disable=not cfg.progress,
                   dynamic_ncols=True)
        last: dict = {}
        t0 = time.perf_counter()
        if self.step == 0 and self.val_set:
            self.out.log(self.evaluate())
        while self.step < self.total_steps:
            record = self.train_step()
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            last = record
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                self.out.log({**record, "elapsed_s": time.perf_counter() - t0})
            if self.val_set and (self.step % cfg.eval_every == 0 or self.step == self.total_steps):
                last.update(self.evaluate())
                self.out.log({"step": self.step, "val_loss": last["val_loss"]})
            if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
                self.out.save(self.step, self.model, self.optimizer, cfg.keep_checkpoints)
        bar.close()
        self.out.save_final(self.model, self.cfg.model)
        return last


def sft(cfg: SFTConfig, resume: bool = False) -> dict:
    return SFTTrainer(cfg, resume).run()
