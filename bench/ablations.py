"""The paper's architecture claims in small training runs: MLA against MHA, GQA and MQA; DeepSeekMoE
against GShard-style experts and a dense FFN; the balance losses on and off.

    python bench/ablations.py --suite attention --out runs/ablations    # a GPU: ~20 minutes a suite
    python bench/ablations.py --suite all --out runs/ablations
    python bench/ablations.py --suite moe --smoke --data DIR --out /tmp/ablations   # tiny, CPU

Each suite trains its variants (`dsv2 train`'s loop, in this process) at equal activated
parameters and equal tokens on a prepared corpus (default data/builtin: `dsv2 data prepare
--builtin --out data/builtin`), for --seeds seeds each, and writes under --out: results.json, a
table (<suite>.md: validation loss and perplexity as mean and spread over the seeds, activated and
total parameters, KV-cache bytes per token, training tokens/s, and for MoE the load balance) and
the loss curves (<suite>.png). A run whose final evaluation is on disk is not run again, so an
interrupted suite continues where it stopped.

The variants (the paper's appendix compares the first four at 7B and the MoE ones at its own
scale; here all share width, depth, heads and head dim):
- attention, every FFN dense: MHA (each head its own K and V), GQA (4 query heads a KV head), MQA
  (one KV head), MLA (latent of 4 head dims, decoupled RoPE key of half a head dim, as the paper
  sizes it); the dense FFN's width is set per variant so that the activated parameters match MHA's.
- moe, attention MLA: DeepSeekMoE (2 shared + 6 of 32 fine-grained routed experts), GShard-style
  (2 of 8 experts 4x as wide, no shared), and a dense FFN: each token activates the same FFN width
  (8 fine-grained experts' worth), and the MoE variants hold about the same total.
- balance, DeepSeekMoE with routing over 4 simulated devices (group-limited, 2 per token): the
  paper's three losses (expert 0.003, device 0.05, communication 0.02), the expert loss alone, none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from dsv2.config import ModelConfig, preset  # noqa: E402
from dsv2.data.prepare import read_meta  # noqa: E402
from dsv2.engine.cache import cache_row_bytes  # noqa: E402
from dsv2.info import count_params  # noqa: E402
from dsv2.train.config import TrainConfig  # noqa: E402
from dsv2.train.loop import train  # noqa: E402

SUITES = ("attention", "moe", "balance")


@dataclasses.dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    seq_len: int
    tokens: int
    batch: int
    micro_batch: int
    lr: float
    warmup: int
    eval_every: int
    eval_batches: int
    log_every: int
    expert: int  # a fine-grained expert's width (the moe and balance suites)


FULL = Size(hidden=512, layers=8, heads=8, seq_len=512, tokens=20_000_000, batch=64, micro_batch=32, lr=1.5e-3,
            warmup=100, eval_every=100, eval_batches=20, log_every=10, expert=128)
SMOKE = Size(hidden=64, layers=2, heads=8, seq_len=32, tokens=32 * 8 * 12, batch=8, micro_batch=8, lr=3e-3,
             warmup=3, eval_every=6, eval_batches=2, log_every=2, expert=16)


def _mha(s: Size, vocab: int, kv_heads: int) -> dict:
    return dict(attention_type="mha", vocab_size=vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, num_key_value_heads=kv_heads, max_position_embeddings=s.seq_len,
                intermediate_size=_ffn(s), initializer_range=0.02, bos_token_id=0, eos_token_id=1,
                torch_dtype="float32")


def _mla(s: Size, vocab: int) -> dict:
    hd = s.hidden // s.heads
    # the paper's proportions: d_c = 4 d_h, d_h^R = d_h / 2, no query compression at this size
    return dict(vocab_size=vocab, hidden_size=s.hidden, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                num_key_value_heads=s.heads, kv_lora_rank=4 * hd, q_lora_rank=None, qk_nope_head_dim=hd,
                qk_rope_head_dim=hd // 2, v_head_dim=hd, max_position_embeddings=s.seq_len, rope_scaling=None,
                intermediate_size=_ffn(s), n_routed_experts=None, n_shared_experts=None, first_k_dense_replace=0,
                initializer_range=0.02, bos_token_id=0, eos_token_id=1, torch_dtype="float32")


def _ffn(s: Size) -> int:
    return 8 * s.expert  # the FFN width every variant activates (attention suite: MHA's, before matching)


def _moe(s: Size, vocab: int, experts: int, width: int, top_k: int, shared: int, groups: int = 1) -> dict:
    return dict(_mla(s, vocab), n_routed_experts=experts, moe_intermediate_size=width, num_experts_per_tok=top_k,
                n_shared_experts=shared or None, first_k_dense_replace=1, moe_layer_freq=1,
                topk_method="group_limited_greedy" if groups > 1 else "greedy", n_group=groups,
                topk_group=min(2, groups), routed_scaling_factor=1.0, norm_topk_prob=False, scoring_func="softmax")


def variants(suite: str, s: Size, vocab: int) -> dict[str, tuple[dict, dict]]:
    """{name: (model config fields, train config changes)} for one suite."""
    if suite == "attention":
        models = {"MHA": _mha(s, vocab, s.heads), f"GQA ({s.heads // 4} KV heads)": _mha(s, vocab, s.heads // 4),
                  "MQA": _mha(s, vocab, 1), "MLA": _mla(s, vocab)}
        target = _activated(models["MHA"])
        return {name: (_match_ffn(fields, target), {}) for name, fields in models.items()}
    paper = {"expert_alpha": 0.003, "device_alpha": 0.05, "comm_alpha": 0.02}
    if suite == "moe":
        e = s.expert
        return {"DeepSeekMoE (2 shared + 6 of 32)": (_moe(s, vocab, 32, e, 6, 2), paper),
                "GShard-style (2 of 8, 4x wide)": (_moe(s, vocab, 8, 4 * e, 2, 0), paper),
                "dense": (_mla(s, vocab), {})}
    if suite == "balance":
        model = _moe(s, vocab, 32, s.expert, 6, 2, groups=4)
        return {"expert + device + communication (paper)": (model, paper),
                "expert only": (model, {**paper, "device_alpha": 0.0, "comm_alpha": 0.0}),
                "none": (model, {"expert_alpha": 0.0, "device_alpha": 0.0, "comm_alpha": 0.0})}
    raise ValueError(f"unknown suite {suite!r}: expected one of {', '.join(SUITES)}")


def _config(fields: dict) -> ModelConfig:
    base = "deepseek-llm-7b" if fields.get("attention_type") == "mha" else "dsv2-small"
    return preset(base, **fields)


def _activated(fields: dict) -> int:
    return count_params(_config(fields))["activated"]


def _match_ffn(fields: dict, target: int) -> dict:
    """The dense FFN width (a multiple of 8) that brings the activated parameters nearest `target`:
    they grow by 3 x hidden x layers per unit of width."""
    per_unit = 3 * fields["hidden_size"] * fields["num_hidden_layers"]
    width = fields["intermediate_size"] + (target - _activated(fields)) / per_unit
    return {**fields, "intermediate_size": max(8, round(width / 8) * 8)}


# --- running --------------------------------------------------------------------------------------
def run_variant(out: Path, fields: dict, changes: dict, s: Size, data: str, seed: int, device: str) -> dict:
    """Train one variant at one seed (or read its finished run) and summarize it."""
    if not (out / "done.json").exists():
        cfg = TrainConfig(model="deepseek-llm-7b" if fields.get("attention_type") == "mha" else "dsv2-small",
                          model_overrides=fields, data=data, seq_len=s.seq_len, max_tokens=s.tokens,
                          batch_start=s.batch, batch_end=s.batch, micro_batch=s.micro_batch, lr=s.lr,
                          warmup_steps=s.warmup, init_std=0.02, out=str(out), log_every=s.log_every,
                          eval_every=s.eval_every, eval_batches=s.eval_batches, checkpoint_every=10**9,
                          keep_checkpoints=1, progress=False, seed=seed, device=device, **changes)
        start = time.perf_counter()
        train(cfg)
        (out / "done.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return summarize(out, _config(fields))


def summarize(run: Path, config: ModelConfig) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    params = count_params(config)
    out = {"val_loss": evals[-1]["val_loss"], "val_ppl": evals[-1]["val_ppl"],
           "activated_params": params["activated"], "total_params": params["total"],
           "kv_bytes_per_token": cache_row_bytes(config, torch.bfloat16) * config.num_hidden_layers,
           "tokens_per_s": statistics.mean(r["tokens_per_s"] for r in steps[1:] or steps),
           "curve": [(r["tokens"], r["loss"]) for r in steps], "val_curve": [(r["tokens"], r["val_loss"]) for r in evals]}
    load = next((r["expert_load"] for r in reversed(steps) if "expert_load" in r), None)
    if load is not None:  # the last logged step's share of assignments per expert, per MoE layer
        out["expert_imbalance"] = statistics.mean(max(layer) * len(layer) for layer in load)
        if config.n_group and config.n_group > 1:
            per = config.n_routed_experts // config.n_group
            devices = [[sum(layer[g * per:(g + 1) * per]) for g in range(config.n_group)] for layer in load]
            out["device_imbalance"] = statistics.mean(max(d) * len(d) for d in devices)
    return out


def run_suite(suite: str, s: Size, data: str, seeds: int, out: Path, device: str) -> dict:
    vocab = read_meta(data)["vocab_size"]
    result = {}
    for name, (fields, changes) in variants(suite, s, vocab).items():
        runs = [run_variant(out / suite / _slug(name) / f"seed{k}", fields, changes, s, data, k, device)
                for k in range(seeds)]
        result[name] = {"runs": runs, "train": changes, "model": {k: v for k, v in fields.items()
                                                                    if k not in ("torch_dtype",)}}
        for key in ("val_loss", "val_ppl", "tokens_per_s", "expert_imbalance", "device_imbalance"):
            values = [r[key] for r in runs if key in r]
            if values:
                result[name][key] = statistics.mean(values)
                result[name][key + "_spread"] = (max(values) - min(values)) / 2
        for key in ("activated_params", "total_params", "kv_bytes_per_token"):
            result[name][key] = runs[0][key]
        print(f"[ablations] {suite} / {name}: val loss {result[name]['val_loss']:.4f}", flush=True)
    return result


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


# --- output ---------------------------------------------------------------------------------------
def table(suite: str, result: dict, seeds: int) -> str:
    moe = any("expert_imbalance" in r for r in result.values())
    device = any("device_imbalance" in r for r in result.values())
    head = ["variant", "val loss", "val ppl", "activated", "total", "KV bytes/token (bf16)", "train tok/s"]
    head += ["expert load max/mean"] * moe + ["device load max/mean"] * device
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
    spread = f" ± (over {seeds} seeds: half the range)" if seeds > 1 else ""
    for name, r in result.items():
        loss = f"{r['val_loss']:.4f}" + (f" ± {r['val_loss_spread']:.4f}" if seeds > 1 else "")
        cells = [name, loss, f"{r['val_ppl']:.2f}",
                 _count(r["activated_params"]), _count(r["total_params"]), f"{r['kv_bytes_per_token']:,}",
                 f"{r['tokens_per_s']:,.0f}"]
        cells += [f"{r['expert_imbalance']:.2f}" if "expert_imbalance" in r else "—"] * moe
        cells += [f"{r['device_imbalance']:.2f}" if "device_imbalance" in r else "—"] * device
        lines.append(f"| {' | '.join(cells)} |")
    return f"{suite}: validation loss{spread}\n\n" + "\n".join(lines) + "\n"


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def plot(suite: str, result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, r) in enumerate(result.items()):
        color = f"C{i}"
        for k, run in enumerate(r["runs"]):  # training loss, smoothed over a few logged steps
            tokens, loss = zip(*run["curve"], strict=True)
            w = max(1, len(loss) // 30)
            smooth = [statistics.mean(loss[max(0, j - w):j + 1]) for j in range(len(loss))]
            ax.plot(tokens, smooth, color=color, alpha=0.35, lw=1)
            vt, vl = zip(*run["val_curve"], strict=True)
            ax.plot(vt, vl, "o-", color=color, ms=3, lw=1.5, label=name if k == 0 else None)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss (lines: training, smoothed; dots: validation)")
    ax.set_title(f"Ablation: {suite}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--suite", default="all", help=f"{', '.join(SUITES)} or all")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", default="data/builtin", help="a `dsv2 data prepare` directory")
    ap.add_argument("--tokens", type=int, default=None, help="training tokens per run")
    ap.add_argument("--seeds", type=int, default=None, help="runs per variant (default 3; 1 with --smoke)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: a CPU check of the whole suite")
    args = ap.parse_args(argv)
    suites = SUITES if args.suite == "all" else tuple(args.suite.split(","))
    for suite in suites:
        if suite not in SUITES:
            ap.error(f"unknown suite {suite!r}: expected one of {', '.join(SUITES)} or all")
    if not (Path(args.data) / "meta.json").exists():
        ap.error(f"{args.data}: not a prepared corpus (dsv2 data prepare --builtin --out {args.data})")
    s = SMOKE if args.smoke else FULL
    if args.tokens:
        s = dataclasses.replace(s, tokens=args.tokens)
    seeds = args.seeds or (1 if args.smoke else 3)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    for suite in suites:
        result = run_suite(suite, s, args.data, seeds, args.out, args.device)
        results[suite] = {"size": dataclasses.asdict(s), "seeds": seeds,
                          "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                          "date": time.strftime("%Y-%m-%d"), "variants": result}
        md = table(suite, result, seeds)
        (args.out / f"{suite}.md").write_text(md)
        plot(suite, result, args.out / f"{suite}.png")
        print("\n" + md, flush=True)
        path.write_text(json.dumps(results, indent=1))
    print(f"JSON: {path}")
    return results


if __name__ == "__main__":
    main()
