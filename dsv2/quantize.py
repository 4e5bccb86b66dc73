"""`dsv2 quantize IN_DIR OUT_DIR --method fp8`: an HF-format checkpoint to FP8 weights, shard by shard.

Each input shard is read one tensor at a time and written as one output shard of the same name,
so host memory peaks at about one shard (the 236B model's 5 GB shards, not its 472 GB). Weights
that model/fp8.py names are quantized in 128 x 128 blocks (weight + weight_scale_inv); the rest are
copied as they are. Packed experts (transformers' `mlp.experts.gate_up_proj` [E, 2I, d]) are
written per expert, the released layout. Everything else in IN_DIR that is not a safetensors file
or index (tokenizer files, generation_config.json, ...) is copied; config.json gains
quantization_config. The output is built in a temporary folder beside OUT_DIR and renamed into
place at the end, so a crash or an interrupt never leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import save_file
from tqdm import tqdm

from .checkpoint import INDEX, SINGLE, CheckpointError, open_shard, read_tensor, shard_files, shard_headers
from .config import ModelConfig
from .model import fp8

_WEIGHT_FILES = (INDEX, "config.json")


def register(sub) -> None:
    p = sub.add_parser("quantize", help="convert an HF-format checkpoint to FP8 weights (DeepSeek-V3's layout)")
    p.add_argument("input", type=Path, metavar="IN_DIR", help="HF-format model directory (bf16 / fp16 / fp32)")
    p.add_argument("output", type=Path, metavar="OUT_DIR", help="where to write the quantized checkpoint (must not exist)")
    p.add_argument("--method", default="fp8", choices=("fp8",), help="fp8: e4m3 weights, 128 x 128 block scales")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args) -> int:
    stats = quantize_checkpoint(args.input, args.output, args.method, progress=not args.no_progress)
    print(f"{args.output}: {stats['quantized']} of {stats['tensors']} tensors in FP8, "
          f"{stats['bytes_in'] / 1e9:.2f} GB -> {stats['bytes_out'] / 1e9:.2f} GB")
    return 0


def quantize_checkpoint(src: str | Path, dst: str | Path, method: str = "fp8", progress: bool = True) -> dict:
    """Convert `src` into the new directory `dst`; returns {tensors, quantized, bytes_in, bytes_out}."""
    src, dst = Path(src), Path(dst)
    if method != "fp8":
        raise ValueError(f"--method {method!r}: only 'fp8' is supported")
    if not src.is_dir():
        raise FileNotFoundError(f"checkpoint directory {src} does not exist")
    if dst.exists():
        raise ValueError(f"{dst} exists; give a new directory")
    config = ModelConfig.from_hf(src)  # a model's config, or a clear error
    if fp8.check_config(config.extra.get("quantization_config")) is not None:
        raise CheckpointError(f"{src} is already quantized ({config.extra['quantization_config']})")
    files = shard_files(src)
    found = shard_headers(src, files)
    stats = {"tensors": 0, "quantized": 0, "bytes_in": 0, "bytes_out": 0}
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        weight_map: dict[str, str] = {}
        bar = tqdm(total=len(found), unit="tensor", desc="quantizing", disable=not progress, file=sys.stderr)
        for fname in sorted(files):
            data = {}
            with open_shard(src / fname) as f:
                for key in sorted(f.keys()):
                    tensor = read_tensor(f, src / fname, key)
                    stats["tensors"] += 1
                    stats["bytes_in"] += tensor.numel() * tensor.element_size()
                    for name, t in _per_expert(key, tensor):
                        if fp8.is_quantized(name):
                            q, scale = fp8.quantize(t)
                            data[name], data[name + fp8.SCALE_SUFFIX] = q, scale
                            stats["quantized"] += 1
                        else:
                            data[name] = t.contiguous()
                    bar.update()
            save_file(data, str(work / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in data})
            stats["bytes_out"] += sum(t.numel() * t.element_size() for t in data.values())
            del data
        bar.close()
        for item in src.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and item.name not in _WEIGHT_FILES:
                shutil.copy2(item, work / item.name)
        hf = json.loads((src / "config.json").read_text())
        hf["quantization_config"] = dict(fp8.QUANTIZATION_CONFIG)
        (work / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        if set(files) != {SINGLE}:
            index = {"metadata": {"total_size": stats["bytes_out"]}, "weight_map": dict(sorted(weight_map.items()))}
            (work / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        umask = os.umask(0)
        os.umask(umask)
        for item in (work, *work.iterdir()):  # mkdtemp made it private; the files as any others
            item.chmod((0o777 if item.is_dir() else 0o666) & ~umask)
        os.replace(work, dst)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return stats


def _per_expert(key: str, tensor):
    """(name, tensor) pairs to write for one input tensor: packed experts split per expert."""
    parts = key.rsplit(".", 1)
    if len(parts) == 2 and parts[1] in ("gate_up_proj", "down_proj") and parts[0].endswith(".mlp.experts"):
        prefix = parts[0]
        if parts[1] == "down_proj":
            return [(f"{prefix}.{e}.down_proj.weight", tensor[e]) for e in range(tensor.shape[0])]
        inter = tensor.shape[1] // 2
        return [(f"{prefix}.{e}.{proj}.weight", tensor[e, rows]) for e in range(tensor.shape[0])
                for proj, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, None)))]
    return [(key, tensor)]
