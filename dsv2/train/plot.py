"""`dsv2 plot RUN`: PNGs of a run's metrics.jsonl — loss curves and the expert-load heatmap."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r], [r for r in rows if "val_loss" in r]


def plot_run(run_dir: str | Path) -> list[Path]:
    run_dir = Path(run_dir)
    train, val = read_metrics(run_dir)
    if not train:
        raise ValueError(f"{run_dir}/metrics.jsonl has no training records yet")
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    tokens = [r["tokens"] for r in train]
    ax = axes[0]
    ax.plot(tokens, [r["ce"] for r in train], label="train CE", lw=1)
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation CE", ms=3)
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title="language-model loss")
    ax.legend()
    ax = axes[1]
    for name, label in (("expert", "expert balance"), ("device", "device balance"), ("comm", "communication")):
        if name in train[0]:
            ax.plot(tokens, [r[name] for r in train], label=label, lw=1)
    ax.set(xlabel="tokens", title="auxiliary balance losses (weighted)")
    ax.legend()
    ax = axes[2]
    ax.plot(tokens, [r["lr"] for r in train], color="tab:green")
    ax.set(xlabel="tokens", ylabel="learning rate", title="schedule")
    fig.tight_layout()
    path = run_dir / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    loads = [r["expert_load"] for r in train if "expert_load" in r]
    if loads:
        last = np.asarray(loads[-max(1, len(loads) // 10):]).mean(0)  # last tenth of the run
        n_experts = last.shape[1]
        fig, ax = plt.subplots(figsize=(max(6, n_experts * 0.35), max(3, last.shape[0] * 0.5)))
        im = ax.imshow(last * n_experts, aspect="auto", cmap="viridis")
        ax.set(xlabel="routed expert", ylabel="MoE layer", title="expert load (1 = perfectly balanced)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        path = run_dir / "expert_load.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
