"""The `dsv2` command: info, generate, chat, train, plot, data, sft, grpo, eval, quantize, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import PRESETS, ConfigError, ModelConfig, preset
from .resources import bundled_model_dir


def _positive(text: str) -> int:
    """argparse type: a positive integer (the error names the flag)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _info(args) -> int:
    from .info import model_info

    config = preset(args.preset) if args.preset else ModelConfig.from_hf(args.model)
    if args.data_parallel_attention and not args.tensor_parallel_size:
        raise ValueError("--data-parallel-attention needs --tensor-parallel-size")
    print(json.dumps(model_info(config, args.quantization, args.cache_tokens, args.kv_cache_dtype,
                                args.tensor_parallel_size, args.data_parallel_attention), indent=2))
    return 0


def _load(args):
    import torch

    from .checkpoint import load_model
    from .tokenizer import Tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype == "auto" else args.dtype
    path = args.model or bundled_model_dir()
    if args.model is None and device == "cpu" and dtype is None:
        dtype = "float32"  # the bundled weights are bf16; CPU matmuls are faster and exact in fp32
    model = load_model(path, device=device, dtype=dtype)
    return model, Tokenizer.from_dir(path)


def _sampling(args, tokenizer) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                stop_token_ids=[tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None)


def _print_stream(model, tokenizer, ids: list[int], args) -> str:
    """Stream the completion of `ids` to stdout; return its text."""
    from .generate import stream
    from .tokenizer import StreamDecoder

    decoder = StreamDecoder(tokenizer, skip_special_tokens=True)
    budget = min(args.max_new_tokens, model.config.max_position_embeddings - len(ids))
    if budget <= 0:
        raise ValueError(f"the prompt ({len(ids)} tokens) fills the model's context "
                         f"({model.config.max_position_embeddings})")
    pieces = []
    for token in stream(model, ids, budget, **_sampling(args, tokenizer)):
        piece = decoder.push(token)
        pieces.append(piece)
        print(piece, end="", flush=True)
    tail = decoder.flush()
    print(tail, flush=True)
    return "".join(pieces) + tail


def _generate(args) -> int:
    model, tokenizer = _load(args)
    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True)
    else:
        ids = tokenizer.encode(args.prompt, add_bos=tokenizer.bos_token_id is not None)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    _print_stream(model, tokenizer, ids, args)
    return 0


def _chat(args) -> int:
    model, tokenizer = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("dsv2 chat: /reset clears the conversation, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return 0
        if text == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": text})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        print("assistant> " if interactive else "", end="", flush=True)
        reply = _print_stream(model, tokenizer, ids, args)
        messages.append({"role": "assistant", "content": reply.strip()})


def _train(args) -> int:
    from .train.config import TrainConfig
    from .train.loop import train

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"out={json.dumps(args.out)}")
    cfg = TrainConfig.load(args.config, overrides)
    summary = train(cfg, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank has the summary; one prints it
        print(json.dumps({k: v for k, v in summary.items() if k != "expert_load"}))
    return 0


def _export(args) -> int:
    from .train.checkpoint import export

    out = Path(args.out_dir)
    if out.exists():
        print(f"dsv2 export: {out} already exists", file=sys.stderr)
        return 1
    export(Path(args.checkpoint), out)
    print(f"dsv2 export: wrote {out}")
    return 0


def _plot(args) -> int:
    from .train.plot import plot_run

    for path in plot_run(args.run):
        print(path)
    return 0


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF-format model directory (default: the bundled model)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bfloat16, float32, ...")
    p.add_argument("--max-new-tokens", type=_positive, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv2", description="DeepSeek-V2: model, training, inference")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters and KV-cache cost of a model or preset, as JSON")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HF-format model directory (or its config.json)")
    src.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--quantization", choices=("fp8",), default=None,
                   help="count the weights as `dsv2 quantize` stores them (default: bf16)")
    p.add_argument("--cache-tokens", type=int, default=None, metavar="N",
                   help="KV-cache tokens to fit beside the weights (default: one max-length sequence)")
    p.add_argument("--kv-cache-dtype", default="bfloat16", choices=("bfloat16", "fp8", "6bit"))
    p.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="one rank's weight bytes and cache tokens with the model split over N GPUs")
    p.add_argument("--data-parallel-attention", action="store_true",
                   help="with --tensor-parallel-size: each rank attends over its own requests' cache")
    p.set_defaults(func=_info)

    p = sub.add_parser("generate", help="complete a prompt, streaming the tokens")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn in the chat template")
    _add_sampling(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("chat", help="interactive chat (chat template, streamed answers)")
    p.add_argument("--system", default=None, help="system message")
    _add_sampling(p)
    p.set_defaults(func=_chat)

    p = sub.add_parser("export", help="a training checkpoint (sharded or not) as an HF-format model directory")
    p.add_argument("checkpoint", help="a run's checkpoints/step-N directory")
    p.add_argument("out_dir", help="the model directory to write (must not exist)")
    p.set_defaults(func=_export)
    p = sub.add_parser("train", help="pre-train a model (the paper's recipe; under torchrun, on every rank)")
    p.add_argument("--config", default=None, help="TOML file of TrainConfig keys")
    p.add_argument("--out", default=None, help="run directory (checkpoints, metrics.jsonl)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last valid checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")
    p.set_defaults(func=_train)

    p = sub.add_parser("plot", help="PNGs of a run: loss curves, expert-load heatmap")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=_plot)

    from .align.cli import register as register_align
    from .data.cli import register
    from .eval.cli import register as register_eval
    from .quantize import register as register_quantize
    from .server import register as register_serve

    register(sub)
    register_align(sub, str(bundled_model_dir()))
    register_eval(sub)
    register_quantize(sub)
    register_serve(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "model", None) and not Path(args.model).exists():
        print(f"dsv2: error: {args.model} does not exist", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except (ConfigError, ValueError, FileNotFoundError, KeyError, RuntimeError) as e:
        print(f"dsv2: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
