"""The tensor-parallel engine's NCCL path on one GPU: a world of one, every hook, broadcast and
gather in place, the steps compiled and captured with their collectives inside, against the
plain engine on the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dsv2.checkpoint import load_model
from dsv2.cli import bundled_model_dir
from dsv2.engine import EngineConfig, LLMEngine

from .conftest import run_greedy
from .numerics import assert_greedy

pytestmark = pytest.mark.gpu


def test_nccl_world_of_one_engine_follows_the_plain_one(tmp_path):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        cfg = EngineConfig(block_size=16, num_blocks=128, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=128)
        plain = load_model(bundled_model_dir(), "cuda", torch.bfloat16)
        sharded = load_model(bundled_model_dir(), "cuda", torch.bfloat16, tensor_parallel="world")
        engine = LLMEngine(sharded, None, cfg, tp_group=dist.group.WORLD)
        assert engine.runner.use_graphs and engine.runner.compiled
        g = torch.Generator().manual_seed(3)
        prompts = [torch.randint(2, plain.config.vocab_size, (4 + 7 * i,), generator=g).tolist() for i in range(6)]
        outs = run_greedy(engine, prompts, 16)
        assert engine.runner.graphs, "decode steps ran as captured graphs"
        for p, tokens in zip(prompts, outs):
            assert_greedy(plain, p, tokens)
    finally:
        dist.destroy_process_group()
