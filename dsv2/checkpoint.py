"""HF-format checkpoints: config.json + safetensors shards (+ index), released tensor names.

Loading builds the model on the meta device, checks every shard's header against the tensors the
config implies (missing, unexpected, misshapen, files the index names but that are absent), and
only then copies tensors in one at a time, so a checkpoint loads in about its own size and a bad
one fails before any work with an error that names the tensor or file. Routed experts are stored
per expert on disk (`mlp.experts.E.gate_proj.weight`) and stacked in memory, gate and up in one
`gate_up_proj`; the packed `mlp.experts.gate_up_proj` / `down_proj` form some transformers versions
write reads too (it is the in-memory layout). FP8 checkpoints (config.json's quantization_config,
model/fp8.py) load too: each quantized weight is checked against its weight_scale_inv, then
copied in as it is where the model holds FP8 weights (model/fp8_layers.py) or dequantized into the
model's dtype where it does not; a bf16 checkpoint loaded with quantization="fp8" is quantized a
tensor at a time on the target device, so no full-precision copy of the model is ever held there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .model import Transformer, fp8
from .model.fp8_layers import quantize_model_
from .model.kernels.fp8_gemm import warn_if_unsupported
from .model.tensor_parallel import Shard, shard_

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PACKED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


class CheckpointError(RuntimeError):
    """A checkpoint that does not match its config or is damaged; the message names what."""


@dataclass(frozen=True)
class _Target:
    """Where one on-disk tensor goes: a parameter, or one expert of a stacked one (and within it
    `rows`: the gate or the up half of gate_up_proj)."""

    param: str
    shape: tuple[int, ...]
    expert: int | None = None
    rows: slice | None = None

    def view(self, param: torch.Tensor) -> torch.Tensor:
        """The part of the parameter this tensor is."""
        part = param if self.expert is None else param[self.expert]
        return part if self.rows is None else part[self.rows]

    def scale_view(self, scale: torch.Tensor) -> torch.Tensor:
        """The part of an FP8 parameter's block scales this tensor's are (gate's block rows, then up's)."""
        part = scale if self.expert is None else scale[self.expert]
        if self.rows is None:
            return part
        blocks = part.shape[0] // 2
        return part[:blocks] if self.rows.start == 0 else part[blocks:]


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _entries(model: Transformer) -> Iterator[tuple[str, _Target, torch.Tensor]]:
    """(released name, where it lives in the model, tensor) for every tensor of a checkpoint."""
    tied = model.config.tie_word_embeddings
    for name, p in model.named_parameters(remove_duplicate=False):
        if (tied and name == "lm_head.weight") or name.endswith(fp8.SCALE_SUFFIX):
            continue  # FP8 weights' scales travel with their weights
        m = _EXPERTS.match(name)
        if m:
            layer, kind = m.groups()
            inter = p.shape[1] // 2
            parts = ({"gate_proj": slice(0, inter), "up_proj": slice(inter, None)} if kind == "gate_up_proj"
                     else {"down_proj": None})
            for proj, rows in parts.items():
                for e in range(p.shape[0]):
                    hf = f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight"
                    t = _Target(name, tuple(p[e, rows].shape) if rows else tuple(p.shape[1:]), expert=e, rows=rows)
                    yield hf, t, t.view(p)
        else:
            hf = name if name.startswith("lm_head.") else f"model.{name}"
            yield hf, _Target(name, tuple(p.shape)), p


def checkpoint_tensors(model: Transformer) -> Iterator[tuple[str, torch.Tensor]]:
    """(released name, tensor) for every tensor a checkpoint of `model` holds, experts unstacked."""
    for hf, _, t in _entries(model):
        yield hf, t


def _targets(model: Transformer) -> dict[str, _Target]:
    return {hf: target for hf, target, _ in _entries(model)}


def shard_files(path: Path) -> dict[str, list[str] | None]:
    """file name -> tensor names the index assigns to it (None: read them from the file)."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            files.setdefault(fname, []).append(tensor)
        absent = sorted(f for f in files if not (path / f).is_file())
        if absent:
            raise CheckpointError(f"{index} names shard file(s) that do not exist: {', '.join(absent)}")
        return files
    if (path / SINGLE).is_file():
        return {SINGLE: None}
    found = sorted(p.name for p in path.glob("*.safetensors"))
    if found:
        raise CheckpointError(f"{path}: {len(found)} safetensors files but no {INDEX} to say what they hold")
    raise CheckpointError(f"{path}: no {SINGLE} and no {INDEX}")


def open_shard(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file (truncated or corrupt?): {e}") from None


def shard_headers(path: Path, files: dict[str, list[str] | None]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """tensor name -> (file, shape), from the shard headers alone."""
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    for fname, assigned in files.items():
        with open_shard(path / fname) as f:
            keys = set(f.keys())
            for key in keys:
                if key in found:
                    raise CheckpointError(f"tensor {key!r} appears in both {found[key][0]} and {fname}")
                found[key] = (fname, tuple(f.get_slice(key).get_shape()))
        if assigned is not None:
            gone = sorted(set(assigned) - keys)
            if gone:
                raise CheckpointError(f"{INDEX} places {_few(gone)} in {fname}, which does not hold it")
    return found


def _few(names: list[str], n: int = 5) -> str:
    shown = ", ".join(names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


@dataclass(frozen=True)
class _Copy:
    """One tensor to copy in: from `file`, into `target`, dequantized with `scale` (a tensor name)
    from `scale_file` when it is FP8."""

    file: str
    key: str
    target: _Target
    scale: str | None = None
    scale_file: str | None = None


def _plan(targets: dict[str, _Target], found: dict[str, tuple[str, tuple[int, ...]]],
          config: ModelConfig, quantized: bool = False) -> list[_Copy]:
    """Match the files against the model: a _Copy for each tensor; raises on anything missing,
    extra or misshapen (the scales of an FP8 checkpoint included)."""
    plan: list[_Copy] = []
    covered: set[str] = set()
    unexpected, misshapen = [], []
    scales = {k: found.pop(k) for k in list(found) if quantized and k.endswith(fp8.SCALE_SUFFIX)}
    for key, (fname, shape) in sorted(found.items()):
        m = _PACKED.match(key)
        if key in targets:
            t = targets[key]
            if shape != t.shape:
                misshapen.append(f"{key}: file has {list(shape)}, config implies {list(t.shape)}")
            scale = key + fp8.SCALE_SUFFIX if quantized and fp8.is_quantized(key) else None
            if scale is not None:
                if scale not in scales:
                    misshapen.append(f"{key}: FP8 weight without its {scale}")
                    continue
                scale_file, scale_shape = scales.pop(scale)
                if scale_shape != fp8.scale_shape(t.shape):
                    misshapen.append(f"{scale}: file has {list(scale_shape)}, a {list(t.shape)} weight in "
                                     f"{fp8.BLOCK} x {fp8.BLOCK} blocks needs {list(fp8.scale_shape(t.shape))}")
                plan.append(_Copy(fname, key, t, scale, scale_file))
            else:
                plan.append(_Copy(fname, key, t))
            covered.add(key)
        elif m and quantized:
            unexpected.append(f"{key} (packed experts: an FP8 checkpoint stores them per expert)")
        elif m and config.is_moe_layer(int(m[1])):  # transformers' packing: our parameters' own layout
            layer, kind = m.groups()
            projs = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
            per = targets[f"model.layers.{layer}.mlp.experts.0.{projs[0]}.weight"].shape
            want = (config.n_routed_experts, per[0] * len(projs), per[1])
            if shape != want:
                misshapen.append(f"{key}: file has {list(shape)}, config implies {list(want)}")
                continue
            plan.append(_Copy(fname, key, _Target(f"layers.{layer}.mlp.experts.{kind}", want)))
            covered.update(f"model.layers.{layer}.mlp.experts.{e}.{p}.weight"
                           for p in projs for e in range(config.n_routed_experts))
        else:
            unexpected.append(key)
    unexpected += sorted(scales)  # scales of no quantized weight
    missing = sorted(set(targets) - covered)
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_few(unexpected)}")
    if misshapen:
        problems.append(f"misshapen {len(misshapen)} tensor(s): {'; '.join(misshapen[:5])}")
    if problems:
        raise CheckpointError("checkpoint does not match its config.json: " + " | ".join(problems))
    return plan


QUANTIZATIONS = ("auto", "none", "fp8")


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    quantization: str | None = "auto",
    tensor_parallel=None,
    config: ModelConfig | None = None,
    data_parallel_attention: bool = False,
) -> Transformer:
    """Load an HF-format DeepSeek-V2 directory; dtype (of the activations and the unquantized
    weights) defaults to the checkpoint's torch_dtype. quantization: "auto" holds the weights as
    the checkpoint stores them (FP8 or not), "fp8" holds them in FP8 (quantizing a bf16 checkpoint
    as it loads), "none" (or None) in `dtype` (dequantizing an FP8 one: training, references).
    `tensor_parallel`: a process group (or "world" for the default one): this rank's part of the
    model (model/tensor_parallel.py), reading only its slices of the files (with
    `data_parallel_attention`, only the MoE layers' slices: the rest whole). `config`: the model's
    config in place of the directory's (the same tensors, other settings: a longer context, say)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    quantization = quantization or "none"
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    config = config or ModelConfig.from_hf(path)
    quantized = fp8.check_config(config.extra.get("quantization_config")) is not None
    dtype = _dtype(dtype) or _dtype(config.torch_dtype) or torch.float32
    files = shard_files(path)
    found = shard_headers(path, files)
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
        if quantization == "fp8" or (quantization == "auto" and quantized):
            quantize_model_(model)
    plan = _plan(_targets(model), found, config, quantized)
    held: dict[str, Shard] = {}
    if tensor_parallel is not None:
        held = shard_(model, None if tensor_parallel == "world" else tensor_parallel,
                      data_parallel_attention=data_parallel_attention)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary.reset_parameters()
    params = dict(model.named_parameters())
    by_file: dict[str, list[_Copy]] = {}
    for c in plan:
        by_file.setdefault(c.file, []).append(c)
    with torch.no_grad():
        for fname in sorted(by_file):
            with open_shard(path / fname) as f:
                for c in by_file[fname]:
                    target, part = _held_part(c.target, held.get(c.target.param))
                    if target is None:
                        continue  # another rank's expert
                    tensor = read_tensor(f, path / fname, c.key, part)
                    scale = None
                    if c.scale is not None:
                        scale_part = part and part.blocks(target.shape[part.dim], c.key)
                        if c.scale_file == fname:
                            scale = read_tensor(f, path / fname, c.scale, scale_part)
                        else:
                            with open_shard(path / c.scale_file) as g:
                                scale = read_tensor(g, path / c.scale_file, c.scale, scale_part)
                    _place(target, tensor, scale, params)
                    del tensor
    if quantization == "fp8" or (quantization == "auto" and quantized):
        warn_if_unsupported(device)  # FP8 weights on a GPU without FP8: weight-only dequantization
    return model.eval()


def _place(target: _Target, tensor: torch.Tensor, scale: torch.Tensor | None, params: dict) -> None:
    """Copy one checkpoint tensor (FP8 with `scale`, or not) into its parameter, converting between
    FP8 and the model's dtype as the parameter needs."""
    param = params[target.param]
    if param.dtype != fp8.FP8:
        if scale is not None:
            tensor = fp8.dequantize(tensor, scale, param.dtype)
        target.view(param).copy_(tensor)
        return
    param_scale = params[target.param + fp8.SCALE_SUFFIX]
    if scale is not None:
        target.view(param).copy_(tensor)
        target.scale_view(param_scale).copy_(scale)
        return
    tensor = tensor.to(param.device)  # quantized where the model lives: one tensor at a time
    if tensor.dim() == 3:  # packed experts: each expert's matrices (gate and up apart) on their own
        half = tensor.shape[1] // 2 if target.param.endswith("gate_up_proj") else None
        for e in range(tensor.shape[0]):
            for rows in ([slice(0, half), slice(half, None)] if half else [None]):
                part = _Target(target.param, (), expert=e, rows=rows)
                _place(part, tensor[e] if rows is None else tensor[e, rows], None, params)
        return
    q, s = fp8.quantize(tensor)
    target.view(param).copy_(q)
    target.scale_view(param_scale).copy_(s)


def _held_part(target: _Target, shard: Shard | None) -> tuple[_Target | None, Shard | None]:
    """What this rank reads of a checkpoint tensor: (its target, the part of the tensor); no target
    for another rank's expert, no part for a whole tensor."""
    if shard is None:
        return target, None
    if target.expert is not None:  # one expert of a stacked parameter split by experts
        if not shard.start <= target.expert < shard.stop:
            return None, None
        return replace(target, expert=target.expert - shard.start), None
    return target, shard  # a linear's rows or columns, or a run of transformers' packed experts


def read_tensor(f, file: Path, key: str, part: Shard | None = None) -> torch.Tensor:
    """A tensor of an open shard, or `part` of it (read from the file alone)."""
    try:
        if part is None:
            return f.get_tensor(key)
        index = (slice(None),) * part.dim + (slice(part.start, part.stop),)
        return f.get_slice(key)[index]
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read tensor {key!r}: {e}") from None


def random_model(config: ModelConfig, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                 seed: int = 0, quantization: str | None = None) -> Transformer:
    """A model of `config`'s shape with random weights (init_weights), built on the meta device and
    materialized where it runs: benchmarks of the released shapes without their checkpoints.
    quantization="fp8" then holds its weights in FP8 (quantized a layer at a time)."""
    if quantization not in (None, "none", "auto", "fp8"):
        raise ValueError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    dtype = _dtype(dtype) or _dtype(config.torch_dtype) or torch.float32
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config).to(dtype)
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_weights()  # also recomputes the rotary buffer lost on the meta device
    if quantization == "fp8":
        quantize_model_(model)
    return model.eval()


def _shard_bytes(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or a size like '5GB', '500MiB'")
    unit = (m[2] or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m[1]) * mult)


def save_model(
    model: Transformer,
    path: str | Path,
    max_shard_size: int | str = "5GB",
    dtype: str | torch.dtype | None = None,
    quantization: str | None = None,
) -> None:
    """Write config.json, generation_config.json and safetensors shards (+ index when sharded);
    quantization="fp8" stores the weights model/fp8.py names in FP8 with their block scales.

    Every file is written under a temporary name and renamed into place, the index last, so a
    crash never leaves an index that points at a half-written shard.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = _dtype(dtype)
    if quantization not in (None, "fp8"):
        raise ValueError(f"quantization {quantization!r}: expected None or 'fp8'")
    limit = _shard_bytes(max_shard_size)
    params = dict(model.named_parameters())
    entries = {hf: (target, t) for hf, target, t in _entries(model)}
    tensors = [(hf, t) for hf, (_, t) in entries.items()]
    out_dtype = dtype or tensors[0][1].dtype

    def stored(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        if t.dtype == fp8.FP8:  # held in FP8: written as it is, or dequantized
            target = entries[name][0]
            scale = target.scale_view(params[target.param + fp8.SCALE_SUFFIX]).detach().cpu()
            if quantization == "fp8":
                return [(name, t.detach().cpu().clone().contiguous()), (name + fp8.SCALE_SUFFIX, scale.clone())]
            return [(name, fp8.dequantize(t.detach().cpu(), scale, out_dtype))]
        if quantization == "fp8" and fp8.is_quantized(name):
            q, scale = fp8.quantize(t.detach().cpu())
            return [(name, q), (name + fp8.SCALE_SUFFIX, scale)]
        # clone: expert slices share storage, which safetensors refuses to write
        return [(name, t.detach().to("cpu", out_dtype).clone().contiguous())]

    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in tensors:
        nbytes = t.numel() * (1 if quantization == "fp8" and fp8.is_quantized(name) else out_dtype.itemsize)
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += nbytes
    n = len(shards)
    names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for fname, shard in zip(names, shards):
        data = dict(item for name, t in shard for item in stored(name, t))
        _atomic(path / fname, lambda tmp, data=data: save_file(data, str(tmp), metadata={"format": "pt"}))
        weight_map.update({k: fname for k in data})
        total += sum(t.numel() * t.element_size() for t in data.values())
        del data
    config = model.config.replace(torch_dtype=str(out_dtype).removeprefix("torch."))
    extra = {k: v for k, v in config.extra.items() if k != "quantization_config"}
    if quantization == "fp8":
        extra["quantization_config"] = dict(fp8.QUANTIZATION_CONFIG)
    config = config.replace(extra=extra)
    _atomic(path / "config.json", lambda tmp: config.save(tmp))
    gen = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    _atomic(path / "generation_config.json", lambda tmp: tmp.write_text(json.dumps(gen, indent=2) + "\n"))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        _atomic(path / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=2) + "\n"))
    elif (path / INDEX).exists():
        (path / INDEX).unlink()  # a stale index from an earlier sharded save would shadow the new file


def _atomic(dest: Path, write) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
