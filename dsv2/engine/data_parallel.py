"""Data-parallel attention: N engines, one per rank, that share their MoE layers.

Under plain tensor parallelism every rank computes every token's latent, so each rank's cache
holds all of them and capacity does not grow with N. Here each rank runs a whole engine of its
own (scheduler, paged cache, sampler) over the requests rank 0 hands it, with the model cut by
`shard_(..., data_parallel_attention=True)`: attention, dense MLPs and the head whole on every
rank, each MoE layer's experts split, its tokens gathered from every rank and the results sent back
(model/tensor_parallel.py). The cache holds each token once across the ranks: N times the
sequences.

The MoE layers' collectives need every rank in the same forward, so the ranks step together: at
each step rank 0 broadcasts the requests it has placed and the aborts since the last one, every
rank steps its engine (one forward; a rank with nothing to run a one-token forward of its own, so
the layers still meet), and rank 0 gathers the outputs. A request goes to the rank with the fewest
unfinished requests. Each rank's steps run eagerly and synchronously (no graphs, no async
scheduling): the tokens a layer exchanges change from step to step.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from .engine import LLMEngine, RequestOutput, StepError
from .params import SamplingParams

_STOP = "stop"


class DataParallelEngine:
    """LLMEngine's surface over the ranks of `group`: rank 0 takes requests and steps every rank;
    ranks 1 .. N-1 call `follow`."""

    def __init__(self, engine: LLMEngine, group=None):
        self.local = engine
        self.group = group
        self.rank, self.size = dist.get_rank(group), dist.get_world_size(group)
        self.owner: dict[str, int] = {}  # rank 0: each unfinished request's rank
        self._load = [0] * self.size
        self._commands: list[tuple] = []
        self._carried: list[RequestOutput] = []  # outputs of a step that raised for other requests
        self.guard = None  # the workers (engine/workers.py), watched around each step
        self._stats = [self._local_stats()] * self.size
        self._forwards = 0
        # every forward, the engine's by its parts (runner.py) or a whole one, embeds its tokens once
        engine.model.embed_tokens.register_forward_pre_hook(self._count_forward)
        engine.runner.split_mixed = False
        self._probe = torch.zeros(1, 1, dtype=torch.long, device=engine.runner.device)

    # --- LLMEngine's surface (rank 0) ----------------------------------------------------------
    @property
    def requests(self) -> dict[str, int]:
        return self.owner

    def __getattr__(self, name: str):
        # the rest (tokenizer, model, cfg, max_model_len, grammars, runner, ...) is the local engine's
        if name == "local":
            raise AttributeError(name)
        return getattr(self.local, name)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        if request_id in self.owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.local.check_request(prompt_token_ids, params)  # every rank's engine has the same limits
        rank = min(range(self.size), key=lambda r: (self._load[r], r))
        self.owner[request_id] = rank
        self._load[rank] += 1
        self._commands.append(("add", rank, request_id, list(prompt_token_ids), params, prompt))

    def abort_request(self, request_id: str) -> None:
        rank = self.owner.pop(request_id, None)
        if rank is not None:
            self._load[rank] -= 1
            self._commands.append(("abort", rank, request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self.owner) or bool(self._commands)

    def step(self) -> list[RequestOutput]:
        """One step of every rank; the outputs of all of them."""
        commands, self._commands = self._commands, []
        guard = self.guard
        if guard is not None:
            guard.check()
        try:
            if guard is not None:
                guard.__enter__()
            dist.broadcast_object_list([commands], src=0, group=self.group)
            mine = self._run(commands)
            gathered = [None] * self.size
            dist.gather_object(mine, gathered, dst=0, group=self.group)
        except Exception as e:
            if guard is not None:
                guard.check(e)
            raise
        finally:
            if guard is not None:
                guard.__exit__(None, None, None)
        outputs, self._carried = self._carried, []
        failed, cause = [], None
        for rank, (outs, stats, error) in enumerate(gathered):
            self._stats[rank] = stats
            for out in outs:
                if out.finished and self.owner.pop(out.request_id, None) is not None:
                    self._load[rank] -= 1
                outputs.append(out)
            if error is not None:
                failed += error[0]
                cause = cause or RuntimeError(f"rank {rank}: {error[1]}")
        if cause is not None:  # the other requests' outputs come with the next step
            self._carried = outputs
            raise StepError(sorted(failed), cause)
        return outputs

    def stop_followers(self) -> None:
        dist.broadcast_object_list([[(_STOP,)]], src=0, group=self.group)

    # the totals a server's metrics read (AsyncLLM.stats), as of the last step
    @property
    def scheduler(self) -> SimpleNamespace:
        return SimpleNamespace(running=range(sum(s["running"] for s in self._stats)),
                               waiting=range(sum(s["waiting"] for s in self._stats)),
                               num_preemptions=sum(s["num_preemptions"] for s in self._stats))

    @property
    def blocks(self) -> SimpleNamespace:
        total, free = (sum(s[k] for s in self._stats) for k in ("num_blocks", "num_free_blocks"))
        return SimpleNamespace(num_blocks=total, num_free_blocks=free, usage=1 - free / total if total else 0.0)

    def warmup(self, batch_sizes: list[int] | None = None) -> dict:
        raise RuntimeError("data-parallel attention runs eagerly: there is nothing to warm up")

    # --- every rank ------------------------------------------------------------------------------
    def follow(self) -> None:
        """Ranks 1 .. N-1: step with rank 0 until it stops."""
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=self.group)
            if any(c[0] == _STOP for c in box[0]):
                return
            dist.gather_object(self._run(box[0]), None, dst=0, group=self.group)

    def _run(self, commands: list[tuple]) -> tuple[list[RequestOutput], dict, tuple | None]:
        """This rank's part of a step: its outputs, its cache's state, and what failed (a step that
        raises here must still meet the others' collectives, so the error travels to rank 0)."""
        for kind, rank, rid, *rest in commands:
            if rank != self.rank:
                continue
            if kind == "add":
                self.local.add_request(rid, *rest)
            else:
                self.local.abort_request(rid)
        before, outputs, error = self._forwards, [], None
        try:
            if self.local.has_unfinished_requests():
                outputs = self.local.step()
        except StepError as e:
            error = (e.request_ids, f"{type(e.cause).__name__}: {e.cause}")
        ran = self._forwards - before
        if ran == 0:  # nothing of its own to run: a one-token forward meets the others' MoE layers
            with torch.inference_mode():
                self.local.model(self._probe)
        elif ran > 1:
            raise RuntimeError(f"rank {self.rank} ran {ran} forwards in one step: the ranks' MoE layers would "
                               "no longer meet")
        return outputs, self._local_stats(), error

    def _count_forward(self, module, args) -> None:
        self._forwards += 1

    def _local_stats(self) -> dict:
        sched, blocks = self.local.scheduler, self.local.blocks
        return {"running": len(sched.running), "waiting": len(sched.waiting), "num_preemptions": sched.num_preemptions,
                "num_blocks": blocks.num_blocks, "num_free_blocks": blocks.num_free_blocks}
