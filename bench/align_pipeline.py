"""The paper's alignment pipeline in miniature, on the bundled model: SFT, then GRPO.

Generated arithmetic word problems (dsv2/align/arith.py, a train / held-out split by question
hash); held-out accuracy (greedy, exact numeric answer) of the bundled base model, after SFT on
worked solutions, and after GRPO from the SFT model with several seeds, so the gain can be set
against the run-to-run spread. Prints a table, writes JSON and a plot of reward over steps.

    python bench/align_pipeline.py --out runs/align            # CUDA when available
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsv2.align import arith, rewards  # noqa: E402
from dsv2.align.grpo import GRPOConfig, GRPOTrainer, read_prompts, score  # noqa: E402
from dsv2.align.rollout import Rollout  # noqa: E402
from dsv2.align.sft import SFTConfig, SFTTrainer  # noqa: E402
from dsv2.checkpoint import load_model  # noqa: E402
from dsv2.cli import bundled_model_dir  # noqa: E402
from dsv2.tokenizer import Tokenizer  # noqa: E402


def log(msg: str) -> None:
    print(f"[align {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def accuracy(model_dir: Path, prompts: Path, device: str, rollout: str, max_new_tokens: int) -> float:
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, device, torch.float32).eval()
    rows = read_prompts(prompts, tokenizer)
    return score(Rollout(model, tokenizer, rollout, max_len=256 + max_new_tokens), tokenizer, rows,
                 rewards.get("math"), max_new_tokens)["eval_reward"]


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for seed, run in res["grpo"].items():
        steps = [r for r in run["metrics"] if "reward_mean" in r]
        ax1.plot([r["step"] for r in steps], [r["reward_mean"] for r in steps], label=f"seed {seed}", alpha=0.8)
        evals = [r for r in run["metrics"] if "eval_reward" in r]
        ax2.plot([r["step"] for r in evals], [r["eval_reward"] for r in evals], marker="o", label=f"seed {seed}")
    ax2.axhline(res["accuracy"]["sft"], color="gray", ls="--", label="after SFT")
    ax2.axhline(res["accuracy"]["base"], color="black", ls=":", label="base model")
    ax1.set(xlabel="GRPO step", ylabel="mean reward of the rollouts", title="training reward (G samples per prompt)")
    ax2.set(xlabel="GRPO step", ylabel="held-out accuracy (greedy)", title="held-out arithmetic accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/align"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rollout", default="auto", help="engine, reference or auto (engine on CUDA)")
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--heldout", type=int, default=300)
    ap.add_argument("--sft-epochs", type=float, default=2.0)
    ap.add_argument("--sft-lr", type=float, default=None)
    ap.add_argument("--grpo-steps", type=int, default=150)
    ap.add_argument("--grpo-lr", type=float, default=1e-5)
    ap.add_argument("--prompts-per-step", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--updates-per-step", type=int, default=1)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7, help="GRPO rollouts' sampling temperature")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--json", type=Path, default=None, help="default OUT/align_pipeline.json")
    ap.add_argument("--plot", type=Path, default=None, help="default OUT/align_reward.png")
    args = ap.parse_args(argv)
    out = args.out
    data = out / "data"
    arith.main(["--out", str(data), "--train", str(args.train), "--heldout", str(args.heldout),
                "--level", str(args.level)])
    heldout = data / "prompts_heldout.jsonl"
    base = bundled_model_dir()
    res = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "args": {k: str(v) for k, v in vars(args).items()}, "accuracy": {}}
    path = args.json or out / "align_pipeline.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage: a run cut short keeps what it measured
        path.write_text(json.dumps(res, indent=1))

    t = time.perf_counter()
    res["accuracy"]["base"] = accuracy(base, heldout, args.device, args.rollout, args.max_new_tokens)
    log(f"base model: held-out accuracy {res['accuracy']['base']:.3f}")

    sft_dir = out / "sft"
    if not (sft_dir / "model" / "config.json").is_file():
        SFTTrainer(SFTConfig(model=str(base), data=str(data / "sft_train.jsonl"), val_data=str(data / "sft_heldout.jsonl"),
                             out=str(sft_dir), epochs=args.sft_epochs, lr=args.sft_lr, device=args.device,
                             eval_every=25, checkpoint_every=10_000, progress=False)).run()
    res["sft"] = {"metrics": metrics(sft_dir), "seconds": time.perf_counter() - t}
    res["accuracy"]["sft"] = accuracy(sft_dir / "model", heldout, args.device, args.rollout, args.max_new_tokens)
    log(f"after SFT: held-out accuracy {res['accuracy']['sft']:.3f}")
    save()

    res["grpo"] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        t = time.perf_counter()
        run = out / f"grpo-seed{seed}"
        cfg = GRPOConfig(model=str(sft_dir / "model"), prompts=str(data / "prompts_train.jsonl"),
                         eval_prompts=str(heldout), reward="math", out=str(run), steps=args.grpo_steps,
                         prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                         updates_per_step=args.updates_per_step, micro_batch=128, lr=args.grpo_lr, beta=args.beta,
                         max_new_tokens=args.max_new_tokens, temperature=args.temperature, rollout=args.rollout, eval_every=10,
                         checkpoint_every=10_000, device=args.device, seed=seed, progress=False)
        last = GRPOTrainer(cfg, resume=(run / "checkpoints").is_dir()).run()
        res["grpo"][seed] = {"metrics": metrics(run), "final_accuracy": last.get("eval_reward"),
                             "seconds": time.perf_counter() - t}
        log(f"GRPO seed {seed}: held-out accuracy {last.get('eval_reward'):.3f} ({time.perf_counter() - t:.0f} s)")
        save()
    finals = [r["final_accuracy"] for r in res["grpo"].values()]
    res["accuracy"]["grpo_mean"] = statistics.mean(finals)
    res["accuracy"]["grpo_spread"] = statistics.stdev(finals) if len(finals) > 1 else 0.0
    res["accuracy"]["grpo_gain"] = res["accuracy"]["grpo_mean"] - res["accuracy"]["sft"]

    a = res["accuracy"]
    print(f"\nheld-out arithmetic accuracy ({args.heldout} problems, level {args.level}, greedy) on {res['device']}")
    print(f"{'stage':<28}{'accuracy':>10}")
    print(f"{'bundled base model':<28}{a['base']:>10.3f}")
    print(f"{'after SFT':<28}{a['sft']:>10.3f}")
    for seed, r in res["grpo"].items():
        print(f"{f'after GRPO, seed {seed}':<28}{r['final_accuracy']:>10.3f}")
    print(f"GRPO gain over SFT {a['grpo_gain']:+.3f}, run-to-run spread (std over seeds) {a['grpo_spread']:.3f}")
    save()
    plot(res, args.plot or out / "align_reward.png")
    print(f"JSON: {path}")
    return res


if __name__ == "__main__":
    main()
