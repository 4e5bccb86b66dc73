"""One training loop: the paper's pre-training recipe, logged, checkpointed, exactly resumable.

Each optimizer step takes batch_size(tokens_seen) sequences in micro-batches (gradient
accumulation), computes CE + the balance losses under bf16 autocast on GPU (fp32 on CPU), clips
the gradient norm to 1.0 and steps AdamW at the schedule's LR. Every checkpoint holds what the
next step depends on (weights, optimizer, tokens seen, data position, RNG), so a run resumed from
one continues exactly as it would have; on CPU the losses are bit-identical. Under torchrun the same
loop runs on every rank with the model sharded by FSDP2 (train/parallel.py) and sharded checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..checkpoint import CheckpointError, load_model
from ..config import ModelConfig, preset
from ..data.loader import TokenLoader
from ..model import TokenDropping, Transformer
from . import checkpoint as ckpt
from .config import TrainConfig
from .losses import BalanceConfig, training_loss
from .parallel import Dist, ParallelConfig, clip_grad_norm_, scale_expert_gradients, shard, sync_gradients
from .schedule import batch_size, learning_rate


def build_model_config(cfg: TrainConfig) -> ModelConfig:
    source = Path(cfg.init_from or cfg.model)
    if source.exists():
        base = ModelConfig.from_hf(source)
        return ModelConfig.from_hf({**base.to_hf(), **cfg.model_overrides})
    return preset(cfg.model, **cfg.model_overrides)


def _init_from(cfg: TrainConfig, device: torch.device) -> Transformer:
    """The init_from model's weights under the run's config (its own, model_overrides on top)."""
    if not Path(cfg.init_from).is_dir():
        raise ValueError(f"init_from {cfg.init_from!r}: not a model directory")
    try:
        model = load_model(cfg.init_from, device=device, dtype=torch.float32, quantization="none",
                           config=build_model_config(cfg))
    except CheckpointError as e:
        raise ValueError(f"init_from {cfg.init_from}: model_overrides change its tensors, so its weights do "
                         f"not fit the run's model ({e})") from None
    return model.train()


def balance_config(cfg: TrainConfig, mc: ModelConfig) -> BalanceConfig:
    groups = cfg.device_groups or (mc.n_group or 1)
    limit = cfg.device_limit or (mc.topk_group if mc.topk_method == "group_limited_greedy" else groups)
    if mc.n_routed_experts and mc.n_routed_experts % groups:
        raise ValueError(f"device_groups ({groups}) must divide n_routed_experts ({mc.n_routed_experts})")
    return BalanceConfig(cfg.expert_alpha, cfg.device_alpha, cfg.comm_alpha, groups, min(limit, groups),
                         mc.seq_aux)


def param_groups(model: Transformer, weight_decay: float) -> list[dict]:
    """No weight decay on norms and biases (the 1-D parameters)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.dist = Dist.start(cfg.device)
        self.device = self.dist.device
        share = cfg.micro_batch * self.dist.world
        for name in ("batch_start", "batch_end"):
            if getattr(cfg, name) % share:
                raise ValueError(f"{name} ({getattr(cfg, name)}) must be a multiple of micro_batch x processes "
                                 f"({cfg.micro_batch} x {self.dist.world}): each process takes whole micro-batches")
        use_bf16 = cfg.autocast == "bf16" or (cfg.autocast == "auto" and self.device.type == "cuda")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext())
        torch.manual_seed(cfg.seed)
        self.train_data = TokenLoader(cfg.data, "train", cfg.seq_len, seed=cfg.seed)
        self.val_data = TokenLoader(cfg.data, "val", cfg.seq_len, seed=cfg.seed)
        self.step, self.tokens_seen = 0, 0
        if not resume and ckpt.checkpoints(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds checkpoints of another run: pass --resume to "
                             "continue it, or choose a new out directory")
        start = self.dist.from_main(ckpt.latest_valid(self.run_dir) if resume and self.dist.main else None)
        if resume and start is None and self.dist.main:
            print(f"dsv2: no valid checkpoint in {self.run_dir}; starting from scratch")
        if start is not None and not ckpt.is_sharded(start):
            self.model = load_model(start / "model", device=self.device, dtype=torch.float32,
                                    quantization="none").train()
        elif start is None and cfg.init_from:
            self.model = _init_from(cfg, self.device)
        else:  # a sharded checkpoint's weights are loaded into the built model in _restore
            self.model = Transformer(build_model_config(cfg)).to(self.device)
            self.model.init_weights(cfg.init_std)
            self.model.train()
        parallel = ParallelConfig.from_dict(cfg.parallel)
        self.ep_group = None
        self.async_checkpoint, self.pending_save = parallel.async_checkpoint, None
        if parallel.ep > 1 and self.dist.world == 1:
            raise ValueError(f"parallel.ep = {parallel.ep} needs that many processes at least (torchrun)")
        if parallel.cpu_offload and not self.dist.launched:
            raise ValueError("parallel.cpu_offload is FSDP2's: run under torchrun (--nproc-per-node 1 for one GPU)")
        if parallel.cpu_offload and self.device.type != "cuda":
            raise ValueError("parallel.cpu_offload keeps a GPU run's parameters and optimizer state in host "
                             "memory: it needs CUDA (this run is on the CPU)")
        # FSDP2 on several processes, or on one for its CPU offload; a world of one otherwise runs the
        # plain loop (FSDP2's wrapping cost 30% of one H200's throughput, bench/RESULTS.md)
        self.sharded = self.dist.launched and (self.dist.world > 1 or parallel.cpu_offload)
        if self.sharded:
            if cfg.compile:  # per block, before sharding (torchtitan's order): FSDP2's hooks stay outside
                for block in self.model.layers:
                    block.compile()
            self.ep_group = shard(self.model, self.dist, parallel)
        self.mc = self.model.config
        if self.train_data.vocab_size > self.mc.vocab_size:
            raise ValueError(f"the data's tokenizer has {self.train_data.vocab_size} tokens but the model's "
                             f"vocab_size is {self.mc.vocab_size}: set model_overrides.vocab_size")
        self.balance = balance_config(cfg, self.mc)
        if parallel.ep > 1 and self.balance.groups != parallel.ep:
            raise ValueError(f"parallel.ep = {parallel.ep} but the balance losses count {self.balance.groups} device "
                             f"groups: set device_groups (or the model's n_group) to {parallel.ep}, so that the "
                             "device-level and communication losses (and group-limited routing) are over EP ranks")
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
            fused=self.device.type == "cuda" and not self.sharded)
        self.forward = torch.compile(self.model) if cfg.compile and not self.sharded else self.model
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if start is not None:
            self._restore(start)
        elif self.dist.main:
            self.metrics_path.write_text("")
        if self.dist.main:
            cfg.save(self.run_dir / "train_config.json")

    def _restore(self, path: Path) -> None:
        saved = ckpt.load_trainer_state(path)
        saved_ep = saved["state"]["config"].get("parallel", {}).get("ep", 1)
        if saved_ep != ParallelConfig.from_dict(self.cfg.parallel).ep:  # experts split otherwise: regroup them
            with torch.device("meta"):
                unsplit = Transformer(self.mc)
            ckpt.load_any_layout(path, self.model, self.optimizer, unsplit, saved)
        elif ckpt.is_sharded(path):  # any world size: DCP reshards onto this one
            ckpt.load_sharded(path, self.model, self.optimizer)
        elif self.sharded:
            ckpt.load_full_optimizer(self.model, self.optimizer, saved["optimizer"])
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.train_data.load_state_dict(state["train_data"])
        ckpt.set_rng_state(saved["rng"])
        if not self.dist.main:
            return
        # the interrupted run may have logged steps past this checkpoint: they never happened now
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        kept = [ln for ln in lines if json.loads(ln)["step"] <= self.step]
        self.metrics_path.write_text("".join(ln + "\n" for ln in kept))
        print(f"dsv2: resumed from {path} (step {self.step}, {self.tokens_seen:,} tokens)")

    def _save(self) -> None:
        state = {"step": self.step, "tokens_seen": self.tokens_seen,
                 "train_data": self.train_data.state_dict(), "config": self.cfg.to_dict()}
        if self.sharded:
            self._finish_save()  # the previous background save first: one at a time, sealed in order
            finish = ckpt.save_sharded(self.run_dir, self.step, self.model, self.optimizer, state,
                                       self.cfg.keep_checkpoints, self.dist, self.mc, self.async_checkpoint)
            self.pending_save = finish if self.async_checkpoint else None
        else:
            ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, state,
                                 self.cfg.keep_checkpoints)

    def _finish_save(self) -> None:
        if self.pending_save is not None:
            self.pending_save()
            self.pending_save = None

    def _log(self, record: dict) -> None:
        if not self.dist.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _drop(self, batch: int) -> TokenDropping | None:
        if not self.cfg.capacity_factor or not self.mc.n_routed_experts:
            return None
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        protected = (torch.rand(batch, generator=g) < self.cfg.undropped_fraction).to(self.device)
        return TokenDropping(self.cfg.capacity_factor, self.balance.groups, protected)

    def train_step(self) -> dict:
        """One optimizer step. Values stay on the device (no host sync) until `_record` reads them."""
        cfg = self.cfg
        world, rank = self.dist.world, self.dist.rank
        bs = batch_size(self.tokens_seen, cfg.batch_start, cfg.batch_end, cfg.ramp_tokens, cfg.micro_batch * world)
        lr = learning_rate(self.step, self.tokens_seen, cfg.lr, cfg.warmup_steps, cfg.max_tokens,
                           tuple(cfg.decay_at), cfg.decay_factor)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = bs // cfg.micro_batch
        stats: dict[str, torch.Tensor] = {}
        # the step's micro-batches dealt round-robin: every rank reads the whole stream, keeps its share
        mine = range(rank, accum, world)
        for i in range(accum):
            inputs, targets = self.train_data.next_batch(cfg.micro_batch)
            if i % world != rank:
                continue
            sync_gradients(self.model, i == mine[-1])
            inputs, targets = inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            with self.autocast:
                out = self.forward(inputs, return_router=True, drop=self._drop(cfg.micro_batch),
                                   checkpoint_layers=cfg.activation_checkpointing)
            loss, parts = training_loss(out.logits, targets, out.router, self.mc.n_routed_experts or 1,
                                        self.mc.num_experts_per_tok or 1, self.balance)
            # FSDP2 averages the ranks' gradients: each rank's mean over its share is the step's mean
            (loss / len(mine)).backward()
            for k, v in parts.items():
                stats[k] = stats.get(k, 0.0) + v / accum
            if out.router:
                load = torch.stack([torch.bincount(r.topk_idx.flatten(), minlength=self.mc.n_routed_experts)
                                    for r in out.router])
                stats["expert_load"] = stats.get("expert_load", 0) + load
            kept = [r.kept for r in out.router if r.kept is not None]
            if kept:
                stats["dropped"] = stats.get("dropped", 0) + sum(int(k.numel()) - k.sum() for k in kept)
                stats["assigned"] = stats.get("assigned", 0) + sum(k.numel() for k in kept)
        self.dist.sum(stats)
        if self.sharded:
            if self.ep_group is not None:
                scale_expert_gradients(self.model, dist.get_world_size(self.ep_group))
            stats["grad_norm"] = clip_grad_norm_(self.model, cfg.grad_clip, self.ep_group)
        else:
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += bs * cfg.seq_len
        return {"step": self.step, "tokens": self.tokens_seen, "batch_size": bs, "lr": lr, "stats": stats}

    @staticmethod
    def _record(step: dict) -> dict:
        """A step's metrics as plain numbers (this reads the device values)."""
        stats = step.pop("stats")
        record = dict(step)
        for k in ("ce", "expert", "device", "comm"):
            if k in stats:
                record[k] = float(stats[k])
        record["loss"] = sum(record.get(k, 0.0) for k in ("ce", "expert", "device", "comm"))
        record["grad_norm"] = float(stats["grad_norm"])
        if "expert_load" in stats:
            load = stats["expert_load"].float()
            record["expert_load"] = (load / load.sum(-1, keepdim=True)).tolist()  # [moe layers, experts]
        if "assigned" in stats:
            record["dropped_fraction"] = float(stats["dropped"]) / float(stats["assigned"])
        return record

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        total, count = 0.0, 0
        for inputs, targets in self.val_data.iter_eval(self.cfg.micro_batch, self.cfg.eval_batches):
            with self.autocast:
                logits = self.forward(inputs.to(self.device))
            total += float(torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), targets.to(self.device).flatten(), reduction="sum"))
            count += targets.numel()
        self.model.train()
        loss = total / count
        return {"step": self.step, "tokens": self.tokens_seen, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))}

    def run(self) -> dict:
        cfg = self.cfg
        bar = tqdm(total=cfg.max_tokens, initial=self.tokens_seen, unit="tok", unit_scale=True,
                   disable=not (cfg.progress and self.dist.main), dynamic_ncols=True)
        last = {}
        window_tokens, window_start = 0, time.perf_counter()
        while self.tokens_seen < cfg.max_tokens:
            before = self.tokens_seen
            step = self.train_step()
            window_tokens += self.tokens_seen - before
            bar.update(self.tokens_seen - before)
            record = step
            if self.step % cfg.log_every == 0 or self.tokens_seen >= cfg.max_tokens:
                record = self._record(step)
                elapsed = time.perf_counter() - window_start
                record["tokens_per_s"] = window_tokens / elapsed
                window_tokens, window_start = 0, time.perf_counter()
                self._log(record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
            last = record
            done = self.tokens_seen >= cfg.max_tokens
            paused = time.perf_counter()
            if self.step % cfg.eval_every == 0 or done:
                ev = self.evaluate()
                self._log(ev)
                last = {**last, **ev}
            if self.step % cfg.checkpoint_every == 0 or done:
                self._save()
            window_start += time.perf_counter() - paused  # tokens/s counts training time only
        self._finish_save()
        bar.close()
        return last


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    trainer = Trainer(cfg, resume)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()
