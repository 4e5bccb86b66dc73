"""SFT and GRPO: the losses against hand computations, the masks, bad rows, and short runs that
checkpoint and resume exactly (CPU, a tiny model with the bundled tokenizer)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dsv2.align import arith
from dsv2.align.chat_data import BadRow, encode_chat, read_chats
from dsv2.align.grpo import GRPOConfig, GRPOTrainer, group_advantages, grpo_loss, kl_estimate
from dsv2.align.sft import SFTConfig, SFTTrainer, sft_loss
from dsv2.checkpoint import load_model
from dsv2.cli import bundled_model_dir, main
from dsv2.tokenizer import Tokenizer

from .numerics import assert_greedy, tol

# fp32 losses and gradients of O(1) against float64 hand computations: a few ulps
FP32 = tol(torch.float32, 2**4)



@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(bundled_model_dir())


@pytest.fixture(scope="module")
def arith_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("arith")
    arith.main(["--out", str(path), "--train", "64", "--heldout", "8", "--seed", "0", "--level", "1"])
    return path


# --- GRPO's pieces against hand computations ---------------------------------------------------

def test_group_advantages_normalize_within_each_group():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]])
    a = group_advantages(r, eps=0.0)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert torch.allclose(a[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / std)
    assert torch.equal(group_advantages(r)[1], torch.zeros(4))  # no signal in an all-equal group


def test_kl_estimator_is_the_unbiased_form_and_nonnegative():
    logp = torch.tensor([math.log(0.5), math.log(0.2), math.log(0.3)])
    ref = torch.tensor([math.log(0.25), math.log(0.2), math.log(0.6)])
    want = [0.5 - math.log(0.5) - 1, 0.0, 2.0 - math.log(2.0) - 1]
    assert torch.allclose(kl_estimate(logp, ref), torch.tensor(want), atol=FP32)
    # its expectation under pi_theta is KL(pi_theta || pi_ref)
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    expected = (p * kl_estimate(p.log(), q.log())).sum()
    assert torch.allclose(expected, (p * (p / q).log()).sum(), atol=FP32)


def test_grpo_loss_and_gradient_match_a_hand_computed_case():
    # two completions: one of 2 tokens (A = +1), one of 1 token (A = -0.5) then padding
    logp = torch.tensor([[math.log(0.5), math.log(0.3)], [math.log(0.2), 0.0]], requires_grad=True)
    old = torch.tensor([[math.log(0.4), math.log(0.3)], [math.log(0.24), 0.0]])
    ref = torch.tensor([[math.log(0.5), math.log(0.2)], [math.log(0.2), 0.0]])
    adv = torch.tensor([1.0, -0.5])
    mask = torch.tensor([[True, True], [True, False]])
    eps, beta = 0.2, 0.1
    loss, stats = grpo_loss(logp, old, ref, adv, mask, eps, beta)

    # by hand. Token (0,0): rho = 0.5/0.4 = 1.25 > 1.2 with A > 0, so the clipped 1.2 A is the min.
    # Token (0,1): rho = 1. Token (1,0): rho = 0.2/0.24, inside the clip range, A < 0.
    def kl(p, r):
        return r / p - math.log(r / p) - 1
    obj0 = ((1.2 * 1.0 - beta * kl(0.5, 0.5)) + (1.0 * 1.0 - beta * kl(0.3, 0.2))) / 2
    rho = 0.2 / 0.24
    obj1 = rho * -0.5 - beta * kl(0.2, 0.2)
    assert loss.item() == pytest.approx(-(obj0 + obj1) / 2, abs=FP32)
    loss.backward()
    # d(-J)/d logp: the clipped token's surrogate has no gradient, only its KL term does;
    # d/dlogp [rho A] = rho A; d/dlogp [-beta kl] = -beta (1 - pi_ref / pi)
    g = logp.grad
    assert g[0, 0].item() == pytest.approx(-(-beta * (1 - 0.5 / 0.5)) / 2 / 2, abs=FP32)
    assert g[0, 1].item() == pytest.approx(-(1.0 - beta * (1 - 0.2 / 0.3)) / 2 / 2, abs=FP32)
    assert g[1, 0].item() == pytest.approx(-(rho * -0.5 - beta * (1 - 0.2 / 0.2)) / 2, abs=FP32)
    assert g[1, 1].item() == 0.0  # padding
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)


def test_grpo_loss_ignores_prompt_and_padding_positions():
    torch.manual_seed(0)
    logp = torch.randn(3, 6).clamp(max=0)
    old, ref = logp + 0.1 * torch.randn(3, 6), logp + 0.1 * torch.randn(3, 6)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 0.5])
    base, _ = grpo_loss(logp, old, ref, adv, mask, 0.2, 0.04)
    noise = torch.where(mask, 0.0, 5.0 * torch.randn(3, 6))
    moved, _ = grpo_loss(logp + noise, old - noise, ref + noise, adv, mask, 0.2, 0.04)
    assert moved.item() == pytest.approx(base.item(), abs=FP32)


# --- SFT ---------------------------------------------------------------------------------------

def test_only_assistant_tokens_and_their_eos_are_trained(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4"}]
    tokens, trained = encode_chat(tokenizer, messages)
    assert tokens == tokenizer.apply_chat_template(messages)
    spans = "".join(tokenizer.decode([t]) for t, m in zip(tokens, trained) if m)
    eos = tokenizer.eos_token
    assert spans == f" Hello.{eos} 4{eos}"
    # the context of each answer is the engine's prompt for it, token for token
    prompt = tokenizer.apply_chat_template(messages[:2], add_generation_prompt=True)
    assert tokens[: len(prompt)] == prompt and not any(trained[: len(prompt)])


def test_sft_loss_is_cross_entropy_over_assistant_tokens_only(tokenizer):
    rows = [[{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Blue."}],
            [{"role": "user", "content": "Count to three, please, slowly"}, {"role": "assistant", "content": "1 2 3"}]]
    enc = [encode_chat(tokenizer, m) for m in rows]
    width = max(len(t) for t, _ in enc)
    tokens = torch.zeros(2, width, dtype=torch.long)
    trained = torch.zeros(2, width, dtype=torch.bool)
    for i, (t, m) in enumerate(enc):
        tokens[i, : len(t)], trained[i, : len(m)] = torch.tensor(t), torch.tensor(m)
    logits = torch.randn(2, width, tokenizer.vocab_size)
    total, count = sft_loss(logits, tokens, trained)
    # by hand: for each row, the prompt's length from the chat template; targets after it
    want, n = 0.0, 0
    for i, messages in enumerate(rows):
        p = len(tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True))
        t = len(enc[i][0])
        want += F.cross_entropy(logits[i, p - 1:t - 1], tokens[i, p:t], reduction="sum").item()
        n += t - p
    assert count.item() == n
    assert total.item() == pytest.approx(want, rel=tol(torch.float32, 2**7))  # fp32 sums of ~100 terms


def test_bad_rows_are_reported_with_their_line_and_skipped(tmp_path, tokenizer):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    lines = [json.dumps(good), "{not json", json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
             json.dumps({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"messages": [{"role": "user", "content": "long " * 300}, {"role": "assistant", "content": "z"}]}),
             json.dumps(good)]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(lines) + "\n")
    said = []
    rows = read_chats(path, tokenizer, max_len=128, report=said.append)
    assert [r.line for r in rows] == [1, 6]
    assert [s.split("chats.jsonl:")[1].split(":")[0] for s in said] == ["2", "3", "4", "5"]
    assert "no assistant turn" in said[1] and "unknown role 'robot'" in said[2] and "over the maximum length" in said[3]
    with pytest.raises(BadRow, match=r"chats.jsonl:2: not valid JSON"):
        read_chats(path, tokenizer, max_len=128, strict=True)


def _sft_cfg(tiny_model_dir, arith_dir, out, **kw):
    kw = {"epochs": 0.5, **kw}
    return SFTConfig(model=str(tiny_model_dir), data=str(arith_dir / "sft_train.jsonl"), out=str(out),
                     val_data=str(arith_dir / "sft_heldout.jsonl"), batch_size=8, micro_batch=4,
                     lr=3e-3, eval_every=2, checkpoint_every=2, progress=False, **kw)


def test_sft_learns_and_resumes_exactly(tiny_model_dir, arith_dir, tmp_path):
    whole = SFTTrainer(_sft_cfg(tiny_model_dir, arith_dir, tmp_path / "whole"))
    first_val = whole.evaluate()["val_loss"]
    out = whole.run()
    assert whole.step == 4 and out["val_loss"] < first_val
    part = SFTTrainer(_sft_cfg(tiny_model_dir, arith_dir, tmp_path / "part"))
    part.total_steps = 2  # stop after the first checkpoint, as an interrupted run would
    part.run()
    resumed = SFTTrainer(_sft_cfg(tiny_model_dir, arith_dir, tmp_path / "part"), resume=True)
    assert resumed.step == 2
    resumed.run()
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    final = load_model(tmp_path / "whole" / "model")
    assert torch.equal(final.lm_head.weight, whole.model.lm_head.weight)
    assert (tmp_path / "whole" / "model" / "tokenizer.json").is_file()


def test_sft_refuses_an_existing_run_without_resume(tiny_model_dir, arith_dir, tmp_path):
    SFTTrainer(_sft_cfg(tiny_model_dir, arith_dir, tmp_path / "r", epochs=0.25)).run()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        SFTTrainer(_sft_cfg(tiny_model_dir, arith_dir, tmp_path / "r"))


# --- GRPO runs ---------------------------------------------------------------------------------

def _grpo_cfg(tiny_model_dir, arith_dir, out, **kw):
    kw = {"steps": 2, **kw}
    return GRPOConfig(model=str(tiny_model_dir), prompts=str(arith_dir / "prompts_train.jsonl"), out=str(out),
                      eval_prompts=str(arith_dir / "prompts_heldout.jsonl"), eval_limit=4,
                      prompts_per_step=2, group_size=4, updates_per_step=2, micro_batch=4, max_new_tokens=8,
                      lr=1e-3, eval_every=1, checkpoint_every=1, progress=False, **kw)


def test_grpo_steps_log_and_resume_exactly(tiny_model_dir, arith_dir, tmp_path):
    whole = GRPOTrainer(_grpo_cfg(tiny_model_dir, arith_dir, tmp_path / "whole"))
    whole.run()
    records = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("reward_std", "kl", "clip_fraction", "length_mean", "groups_with_signal"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert steps[0]["kl"] == pytest.approx(0.0, abs=FP32)  # the first update starts at the reference
    assert [r["step"] for r in records if "eval_reward" in r] == [0, 1, 2]
    part = GRPOTrainer(_grpo_cfg(tiny_model_dir, arith_dir, tmp_path / "part", steps=1))
    part.run()
    resumed = GRPOTrainer(_grpo_cfg(tiny_model_dir, arith_dir, tmp_path / "part"), resume=True)
    resumed.run()
    for a, b in zip(whole.policy.parameters(), resumed.policy.parameters(), strict=True):
        assert torch.equal(a, b)


def test_grpo_cli_rejects_unknown_reward(tiny_model_dir, arith_dir, capsys):
    code = main(["grpo", "--model", str(tiny_model_dir), "--prompts", str(arith_dir / "prompts_train.jsonl"),
                 "--reward", "no-such-reward"])
    assert code == 1 and "no-such-reward" in capsys.readouterr().err


def test_engine_rollouts_follow_the_policy_after_sync(tiny_model_dir, tokenizer):
    """The engine backend samples from its own copy of the policy: greedy, it gives the policy's
    greedy tokens, and after the policy changes and `sync`, the changed policy's tokens."""
    from dsv2.align.rollout import Rollout

    policy = load_model(tiny_model_dir, dtype=torch.float32)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in ("Tom has 3 pens. He buys 4 more pens. How many pens does Tom have now?", "Hi")]
    engine = Rollout(policy, tokenizer, "engine", max_len=128)
    for p, [got] in zip(prompts, engine.sample(prompts, 1, 6, 0.0), strict=True):
        assert_greedy(policy, p, got)
    torch.manual_seed(0)
    with torch.no_grad():
        policy.lm_head.weight.add_(0.05 * torch.randn_like(policy.lm_head.weight))
    before = engine.sample(prompts, 1, 6, 0.0)
    engine.sync()
    after = engine.sample(prompts, 1, 6, 0.0)
    assert after != before
    for p, [got] in zip(prompts, after, strict=True):
        assert_greedy(policy, p, got)
    sampled = engine.sample(prompts, 3, 6, 1.0, seed=5)
    assert [len(g) for g in sampled] == [3, 3] and sampled == engine.sample(prompts, 3, 6, 1.0, seed=5)


def test_sft_cli_trains_and_prints_its_last_record(tiny_model_dir, arith_dir, tmp_path, capsys):
    code = main(["sft", "--model", str(tiny_model_dir), "--data", str(arith_dir / "sft_train.jsonl"),
                 "--out", str(tmp_path / "cli"), "--epochs", "0.125", "--batch-size", "8", "--micro-batch", "8",
                 "--no-progress"])
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["step"] == 1 and math.isfinite(record["val_loss"])
    assert (tmp_path / "cli" / "model" / "config.json").is_file()
