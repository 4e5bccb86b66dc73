"""Checkpoint loading at the DeepSeek-V2-Lite shape: time and peak memory, dsv2 against
transformers, beside the physical limit (checkpoint bytes / host-to-device bandwidth measured in
the same run).

    python bench/load_bench.py --dir /tmp/v2lite --out results.json

Writes a random bf16 V2-Lite checkpoint (31 GB, released tensor names, 5 GB shards) once, then
loads it in fresh processes so each peak-RSS figure is that loader's alone. The page cache is warm
(the files were just written), so the figures measure the loader, not the disk. Also compares the
two models' logits on the same tokens in bf16.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS = 256


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, TOKENS), generator=torch.Generator().manual_seed(0))


def stage_make(path: Path) -> dict:
    from dsv2.checkpoint import save_model
    from dsv2.config import preset
    from dsv2.model import Transformer

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(preset("deepseek-v2-lite")).to(torch.bfloat16)
    model.init_weights()
    t = time.perf_counter()
    save_model(model, path, max_shard_size="5GB")
    return {"save_s": time.perf_counter() - t,
            "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))}


def stage_ours(path: Path, device: str) -> dict:
    from dsv2.checkpoint import load_model

    rss0 = _peak_rss_gb()
    t = time.perf_counter()
    model = load_model(path, device=device, dtype=torch.bfloat16)
    if device == "cuda":
        torch.cuda.synchronize()
    out = {"load_s": time.perf_counter() - t, "peak_rss_gb": _peak_rss_gb(), "rss_before_gb": rss0}
    if device == "cuda":
        out["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        with torch.no_grad():
            tokens = _tokens(model.config.vocab_size).cuda()
            logits = model(tokens).float()
            absorbed = model(tokens, absorb=True).float()
        out["absorbed_vs_expanded_rel"] = ((absorbed - logits).norm() / logits.norm()).item()
        torch.save(logits.cpu(), path.parent / "ours_logits.pt")
    return out


def stage_hf(path: Path) -> dict:
    import transformers

    rss0 = _peak_rss_gb()
    t = time.perf_counter()
    model = transformers.DeepseekV2ForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    torch.cuda.synchronize()
    out = {"load_s": time.perf_counter() - t, "peak_rss_gb": _peak_rss_gb(), "rss_before_gb": rss0,
           "gpu_peak_gb": torch.cuda.max_memory_allocated() / 2**30, "version": transformers.__version__}
    with torch.no_grad():
        logits = model(_tokens(model.config.vocab_size).cuda()).logits.float().cpu()
    ours = torch.load(path.parent / "ours_logits.pt")
    out["logits_rel_diff_vs_dsv2"] = ((logits - ours).norm() / ours.norm()).item()
    out["argmax_agreement"] = (logits.argmax(-1) == ours.argmax(-1)).float().mean().item()
    return out


def stage_bandwidth(path: Path) -> dict:
    """Host->device copy bandwidth (pinned and pageable) and page-cache read bandwidth."""
    n = 2**30
    host = torch.empty(n, dtype=torch.uint8).fill_(1)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    out = {}
    for name, src in (("h2d_pinned_gbs", pinned), ("h2d_pageable_gbs", host)):
        dev.copy_(src)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            dev.copy_(src)
        torch.cuda.synchronize()
        out[name] = 5 * n / (time.perf_counter() - t) / 1e9
    buf = bytearray(256 * 2**20)
    total, t = 0, time.perf_counter()
    for f in sorted(path.glob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while (got := fh.readinto(buf)):
                total += got
    out["page_cache_read_gbs"] = total / (time.perf_counter() - t) / 1e9
    return out


def _run(stage: str, path: Path, extra: list[str] = ()) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--stage", stage, "--dir", str(path), *extra],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path("/tmp/v2lite/ckpt"))
    ap.add_argument("--out", type=Path, default=Path("load_bench.json"))
    ap.add_argument("--stage", default=None)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    if args.stage:
        fn = {"make": lambda: stage_make(args.dir), "ours": lambda: stage_ours(args.dir, args.device),
              "hf": lambda: stage_hf(args.dir), "bandwidth": lambda: stage_bandwidth(args.dir)}[args.stage]
        print(json.dumps(fn()))
        return
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d")}
    if not (args.dir / "config.json").exists():
        results["make"] = _run("make", args.dir)
    results["bandwidth"] = _run("bandwidth", args.dir)
    results["dsv2_cpu"] = _run("ours", args.dir, ["--device", "cpu"])
    results["dsv2_cuda"] = _run("ours", args.dir, ["--device", "cuda"])
    results["transformers_cuda"] = _run("hf", args.dir)
    size_gb = sum(f.stat().st_size for f in args.dir.glob("*.safetensors")) / 1e9
    results["checkpoint_gb"] = size_gb
    bw = results["bandwidth"]
    if "h2d_pageable_gbs" in bw:
        results["limit_load_s"] = size_gb / min(bw["h2d_pageable_gbs"], bw["page_cache_read_gbs"])
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nV2-Lite checkpoint {size_gb:.1f} GB on {results['device']} (torch {results['torch']})")
    print(f"{'loader':<22}{'load s':>9}{'peak RSS GB':>13}{'GPU peak GB':>13}")
    for name in ("dsv2_cpu", "dsv2_cuda", "transformers_cuda"):
        r = results[name]
        if "error" in r:
            print(f"{name:<22} error: {r['error'][-300:]}")
            continue
        print(f"{name:<22}{r['load_s']:>9.1f}{r['peak_rss_gb']:>13.1f}{r.get('gpu_peak_gb', 0):>13.1f}")
    if "limit_load_s" in results:
        print(f"{'limit (bytes / bw)':<22}{results['limit_load_s']:>9.1f}   "
              f"(h2d pageable {bw['h2d_pageable_gbs']:.1f} GB/s, pinned {bw['h2d_pinned_gbs']:.1f}, "
              f"page cache {bw['page_cache_read_gbs']:.1f})")
    hf = results["transformers_cuda"]
    if "logits_rel_diff_vs_dsv2" in hf:
        print(f"bf16 logits dsv2 vs transformers: rel diff {hf['logits_rel_diff_vs_dsv2']:.2e}, "
              f"argmax agreement {hf['argmax_agreement']:.3f}; absorbed vs expanded rel "
              f"{results['dsv2_cuda']['absorbed_vs_expanded_rel']:.2e}")


if __name__ == "__main__":
    main()
