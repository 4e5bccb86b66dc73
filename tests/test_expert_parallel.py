"""Expert parallelism (train/expert_parallel.py) on 2 and 4 gloo processes against one process: a
MoE layer whose routed experts are split over the ranks gives each rank's tokens the outputs, and
every parameter the gradient, of the whole layer run on all tokens at once, with and without token
dropping."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv2.model.moe import MoE, TokenDropping

from .conftest import tiny_config
from .numerics import assert_close

TOKENS = 12  # per rank


def _layer() -> MoE:
    config = tiny_config(n_routed_experts=8, num_experts_per_tok=3)
    torch.manual_seed(0)
    layer = MoE(config)
    for p in layer.parameters():
        p.data.normal_(0, 0.3)
    return layer.double()


def _inputs(world: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(world * TOKENS, _layer().gate.weight.shape[1], generator=g, dtype=torch.float64)
    grad = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x, grad


def _run(layer: MoE, x: torch.Tensor, grad: torch.Tensor, drop: bool):
    x = x.clone().requires_grad_()
    layer.train()
    dropping = TokenDropping(capacity_factor=1.0, groups=2) if drop else None
    y, _ = layer(x[None], dropping)
    (y[0] * grad).sum().backward()
    return y[0].detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


def _worker(rank: int, world: int, init: str, drop: bool, results) -> None:
    from dsv2.train.expert_parallel import ExpertParallel

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        reference = _layer()
        x, grad = _inputs(world)
        want_y, want_dx, want_grads = _run(copy.deepcopy(reference), x, grad, drop)
        layer = reference
        layer.experts = ExpertParallel(layer.experts)
        mine = slice(rank * TOKENS, (rank + 1) * TOKENS)
        y, dx, grads = _run(layer, x[mine], grad[mine], drop)
        # capacity is computed over the tokens each call sees: with dropping, the reference is the
        # whole layer on this rank's tokens (the experts' gradients then also hold the other ranks'
        # tokens, which that reference does not see, so only the rest is compared)
        if drop:
            want_y, want_dx, want_grads = _run(_layer(), x[mine], grad[mine], drop)
        else:
            want_y, want_dx = want_y[mine], want_dx[mine]
        # the layer routes and sums each token's k outputs in fp32 whatever its dtype: fp32 ulps
        assert_close(y.float(), want_y.float(), 2**8)
        assert_close(dx.float(), want_dx.float(), 2**8)
        per = 8 // world
        for name, g in grads.items():
            if name.startswith(f"experts.part{rank}."):  # this rank's experts: every rank's tokens' gradient
                if not drop:
                    full = want_grads[name.replace(f"experts.part{rank}.", "experts.")]
                    assert_close(g.float(), full[rank * per:(rank + 1) * per].float(), 2**8)
                continue
            if not drop:  # replicated (gate, shared experts): this rank's tokens' part, summed over ranks
                dist.all_reduce(g)
            assert_close(g.float(), want_grads[name].float(), 2**8)
        results.put((rank, "ok"))
    except BaseException as e:  # report, then fail the process
        results.put((rank, repr(e)))
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, drop", [(2, False), (4, False), (2, True)])
def test_expert_parallel_layer_equals_the_whole_layer(tmp_path, world, drop):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, world, f"file://{tmp_path}/pg", drop, results))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    got = dict(results.get(timeout=5) for _ in procs)
    assert got == {r: "ok" for r in range(world)}, got
