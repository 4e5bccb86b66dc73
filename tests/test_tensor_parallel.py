"""Tensor and expert parallelism for inference (model/tensor_parallel.py) on several gloo processes
against one process: each rank loads only its slices of the checkpoint, and the logits equal the
whole model's up to fp32 summation order."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv2.checkpoint import load_model, random_model, save_model
from dsv2.config import preset
from dsv2.model.tensor_parallel import LocalExperts, VocabParallelEmbedding, check_config

TOKENS = torch.randint(0, 320, (3, 11), generator=torch.Generator().manual_seed(1))


def _tiny(world: int):
    # group-limited routing with one expert group per rank: a token's experts on topk_group ranks
    return preset("dsv2-tiny", vocab_size=320, n_group=world, topk_group=1)


def _aligned():
    """Every cut on a 128 boundary at world 2, as FP8's blocks need."""
    return preset("dsv2-tiny", vocab_size=320, num_attention_heads=4, qk_nope_head_dim=64, qk_rope_head_dim=64,
                  v_head_dim=128, hidden_size=256, moe_intermediate_size=128, n_shared_experts=2,
                  intermediate_size=256, q_lora_rank=None, kv_lora_rank=64, n_group=2, topk_group=1)


def _rank(rank: int, world: int, store: str, ckpt: str, quantization: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = load_model(ckpt, "cpu", torch.float32, quantization=quantization, tensor_parallel="world")
        with torch.no_grad():
            logits = model(TOKENS)
        full = sum(p.numel() for p in load_model(ckpt, "cpu", torch.float32, quantization=quantization).parameters())
        held = sum(p.numel() for p in model.parameters())
        experts = [m for m in model.modules() if isinstance(m, LocalExperts)]
        torch.save({"logits": logits, "held": held, "full": full, "experts": [e.start for e in experts],
                    "vocab": model.embed_tokens.start if isinstance(model.embed_tokens, VocabParallelEmbedding)
                    else None}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, config, world: int, quantization: str = "none", dtype=torch.float32):
    ckpt = tmp_path / "model"
    if not ckpt.exists():
        save_model(random_model(config, "cpu", dtype, seed=0), ckpt)
    out = tmp_path / f"out{world}"
    mp.spawn(_rank, args=(world, str(tmp_path / f"store{world}"), str(ckpt), quantization, str(out)), nprocs=world)
    whole = load_model(ckpt, "cpu", torch.float32, quantization=quantization)
    with torch.no_grad():
        want = whole(TOKENS)
    return want, [torch.load(f"{out}.{r}") for r in range(world)]


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_logits_equal_the_whole_model(tmp_path, world):
    want, ranks = _run(tmp_path, _tiny(world), world)
    for r, got in enumerate(ranks):
        torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)
        # heads, experts, vocabulary and MLP widths split; the latent projections and norms are whole
        assert got["held"] < 0.6 * got["full"] if world == 2 else got["held"] < 0.4 * got["full"]
        assert got["experts"] == [r * 8 // world] * 2  # both MoE layers: this rank's run of experts
        assert got["vocab"] == r * 320 // world


def test_fp8_checkpoint_slices_keep_their_blocks(tmp_path):
    """A bf16 checkpoint quantized to FP8 as each rank loads its slices: the same 128 x 128 blocks (and
    logits, the FP8 weights dequantized on the CPU) as the whole model quantized."""
    want, ranks = _run(tmp_path, _aligned(), 2, quantization="fp8", dtype=torch.bfloat16)
    for got in ranks:
        torch.testing.assert_close(got["logits"], want, rtol=1e-5, atol=1e-5)


def test_what_does_not_split_is_named():
    with pytest.raises(ValueError, match="num_attention_heads = 4 does not split over tensor_parallel_size 3"):
        check_config(_tiny(1), 3)
    with pytest.raises(ValueError, match="MHA baseline"):
        check_config(preset("dsv2-tiny-mha"), 2)
    with pytest.raises(ValueError, match="n_routed_experts = 8 does not split over tensor_parallel_size 16"):
        check_config(preset("dsv2-tiny", num_attention_heads=16, vocab_size=512, intermediate_size=160), 16)
