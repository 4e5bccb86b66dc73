"""`dsv2 sft` and `dsv2 grpo`: every field of SFTConfig / GRPOConfig is a flag of the same name."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from .grpo import GRPOConfig
from .sft import SFTConfig


def _flag_type(hint: str):
    base = hint.replace(" | None", "")
    return {"int": int, "float": float, "str": str}[base]


def _add_fields(p: argparse.ArgumentParser, cls, defaults: dict) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        hint = str(f.type)
        if hints[f.name] is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
            continue
        default = defaults.get(f.name, f.default)
        required = default is dataclasses.MISSING
        p.add_argument(flag, type=_flag_type(hint), required=required, default=None if required else default,
                       help=None if required else f"default {default}")


def _config(cls, args) -> object:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _sft(args) -> int:
    from .sft import sft

    print(json.dumps(sft(_config(SFTConfig, args), resume=args.resume)))
    return 0


def _grpo(args) -> int:
    from .grpo import grpo

    print(json.dumps(grpo(_config(GRPOConfig, args), resume=args.resume)))
    return 0


def register(sub, bundled: str) -> None:
    p = sub.add_parser("sft", help="supervised fine-tuning on chat conversations (loss on assistant turns)")
    _add_fields(p, SFTConfig, {"model": bundled})
    p.add_argument("--resume", action="store_true", help="continue from the run's last valid checkpoint")
    p.set_defaults(func=_sft)

    p = sub.add_parser("grpo", help="GRPO reinforcement learning with a reward function")
    _add_fields(p, GRPOConfig, {"model": bundled})
    p.add_argument("--resume", action="store_true", help="continue from the run's last valid checkpoint")
    p.set_defaults(func=_grpo)
