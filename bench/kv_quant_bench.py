"""What quantizing the latent KV cache costs in quality: teacher-forced perplexity of the bundled
model and the logit error, for each engine kv_cache_dtype, beside the bytes each one stores.

Method: every validation window runs through the model once with the engine's own cache
(PagedLatentCache + PagedBatchCache, the prefill path): each layer writes its c_kv / k_rope into the
pages (quantized on write) and attends over what gather hands back (dequantized), so every key and
value any token sees has been through the cache, as in serving. The reference is a float32 cache
(no quantization; it equals the cache-free forward to rounding, checked below).

    PYTHONPATH=. python3 bench/kv_quant_bench.py --out kv_quant_bench.json

Data: the built-in corpus's validation split (data/builtin, Shakespeare/Milton + Python stdlib,
tokenized with the bundled model's tokenizer). Without it, the bundled sample texts
docs/bundled/samples_*.txt are tokenized instead (say so in the results).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv2.checkpoint import load_model
from dsv2.cli import bundled_model_dir
from dsv2.engine.cache import PagedLatentCache, latent_row_bytes
from dsv2.engine.runner import PagedBatchCache

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp8": "fp8", "6bit": "6bit"}


def windows(seq_len: int, max_windows: int) -> tuple[torch.Tensor, str]:
    """[N, seq_len + 1] token windows and where they came from."""
    data = ROOT / "data" / "builtin"
    if (data / "meta.json").exists():
        from dsv2.data.loader import TokenLoader

        loader = TokenLoader(data, "val", seq_len)
        rows = torch.cat([torch.cat([x, y[:, -1:]], 1) for x, y in loader.iter_eval(64)])
        return rows[:max_windows], f"data/builtin val split ({loader.num_tokens} tokens)"
    from dsv2.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(bundled_model_dir())
    text = "\n".join(p.read_text() for p in sorted((ROOT / "docs" / "bundled").glob("samples_*.txt")))
    ids = torch.tensor(tok.encode(text))
    n = min(max_windows, len(ids) // (seq_len + 1))
    return ids[: n * (seq_len + 1)].view(n, seq_len + 1), "docs/bundled/samples_*.txt"


@torch.inference_mode()
def logits_through_cache(model, tokens: torch.Tensor, kv_dtype, block_size: int = 64) -> torch.Tensor:
    """tokens [B, S] -> logits [B, S, V], each row a sequence in its own pages of the paged cache."""
    b, s = tokens.shape
    per_row = math.ceil(s / block_size)
    pages = PagedLatentCache(model.config, b * per_row, block_size, dtype=kv_dtype)
    tables = torch.arange(b * per_row).view(b, per_row)
    pos = torch.arange(s).expand(b, s)
    slots = tables[:, pos[0] // block_size] * block_size + pos % block_size
    cache = PagedBatchCache(pages, tables, torch.full((b,), s))
    return model(tokens, pos, torch.ones_like(tokens, dtype=torch.bool), cache, slots)


def window_parser(doc: str) -> argparse.ArgumentParser:
    """The options of a bench over validation windows of the bundled model."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=512)  # the bundled model's training length
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", type=str, default=None)
    return ap


def main() -> None:
    args = window_parser(__doc__).parse_args()
    torch.manual_seed(0)
    t0 = time.time()
    model = load_model(bundled_model_dir(), device="cpu", dtype="float32").eval()
    cfg = model.config
    rows, source = windows(args.seq_len, args.windows)
    r, dr, elements = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim

    fields = ("nll", "n", "max_abs", "abs_sum", "sq_diff", "sq_ref", "argmax_same", "rel_max")
    stats = {k: dict.fromkeys(fields, 0.0) for k in KINDS}
    cache_free_gap = 0.0
    for i in range(0, len(rows), args.batch):
        x, y = rows[i:i + args.batch, :-1], rows[i:i + args.batch, 1:]
        ref = None
        for name, kv_dtype in KINDS.items():
            out = logits_through_cache(model, x, kv_dtype).float()
            if ref is None:
                ref = out
                with torch.inference_mode():
                    cache_free_gap = max(cache_free_gap, (model(x).float() - ref).abs().max().item())
            st, diff = stats[name], (out - ref)
            st["nll"] += F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum").item()
            st["n"] += y.numel()
            st["max_abs"] = max(st["max_abs"], diff.abs().max().item())
            st["abs_sum"] += diff.abs().sum().item()
            st["sq_diff"] += diff.square().sum().item()
            st["sq_ref"] += ref.square().sum().item()
            # per position: the largest logit change relative to that position's largest logit
            st["rel_max"] = max(st["rel_max"], (diff.abs().amax(-1) / ref.abs().amax(-1)).max().item())
            st["argmax_same"] += (out.argmax(-1) == ref.argmax(-1)).sum().item()

    results = []
    for name, kv_dtype in KINDS.items():
        st = stats[name]
        row_bytes = latent_row_bytes(r, dr, kv_dtype)
        results.append({
            "kv_cache_dtype": name,
            "bytes_per_token": cfg.num_hidden_layers * row_bytes,
            "bits_per_element": round(8 * row_bytes / elements, 3),
            "bits_per_element_v2_576": round(8 * latent_row_bytes(512, 64, kv_dtype) / 576, 3),
            "perplexity": math.exp(st["nll"] / st["n"]),
            "logit_max_abs_diff": st["max_abs"],
            "logit_mean_abs_diff": st["abs_sum"] / (st["n"] * cfg.vocab_size),
            "logit_rel_l2_diff": math.sqrt(st["sq_diff"] / st["sq_ref"]),
            "logit_max_rel_diff_per_position": st["rel_max"],
            "argmax_agreement": st["argmax_same"] / st["n"],
        })
    ref_ppl = results[0]["perplexity"]
    print(f"bundled model ({cfg.num_hidden_layers} layers, kv_lora_rank {r}, rope {dr}), float32 weights, "
          f"{len(rows)} windows x {args.seq_len} tokens from {source}; cache-free vs float32 cache max |dlogit| "
          f"{cache_free_gap:.1e}")
    print(f"{'kv_cache_dtype':<14} {'B/token':>8} {'bits/elt':>8} {'(V2 576)':>8} {'ppl':>9} {'dppl %':>7} "
          f"{'max|dl|':>8} {'mean|dl|':>9} {'rel L2':>8} {'max rel':>8} {'argmax':>7}")
    for res in results:
        print(f"{res['kv_cache_dtype']:<14} {res['bytes_per_token']:>8} {res['bits_per_element']:>8.2f} "
              f"{res['bits_per_element_v2_576']:>8.2f} {res['perplexity']:>9.4f} "
              f"{100 * (res['perplexity'] / ref_ppl - 1):>7.3f} {res['logit_max_abs_diff']:>8.4f} "
              f"{res['logit_mean_abs_diff']:>9.5f} {res['logit_rel_l2_diff']:>8.5f} "
              f"{res['logit_max_rel_diff_per_position']:>8.4f} {res['argmax_agreement']:>7.4f}")
    print(f"{time.time() - t0:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "model": str(bundled_model_dir()), "data": source, "seq_len": args.seq_len, "windows": len(rows),
            "tokens_scored": int(stats["float32"]["n"]), "cache_free_vs_float32_cache_max_abs": cache_free_gap,
            "torch": torch.__version__, "device": f"CPU ({platform.processor() or platform.machine()})",
            "results": results,
        }, indent=2))


if __name__ == "__main__":
    main()
