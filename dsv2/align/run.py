"""What SFT and GRPO runs share: their directory, device and autocast, resuming from the newest
valid checkpoint (metrics.jsonl cut back to it), and the final model saved with its tokenizer."""

from __future__ import annotations

import json
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch

from ..checkpoint import save_model
from ..model import Transformer
from ..train import checkpoint as ckpt

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class Run:
    def __init__(self, out: str, device: str, autocast: str, resume: bool):
        self.dir = Path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        bf16 = autocast == "bf16" or (autocast == "auto" and self.device.type == "cuda")
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        if not resume and ckpt.checkpoints(self.dir):
            raise ValueError(f"{self.dir} already holds checkpoints: pass --resume to continue that run, "
                             "or choose another out directory")
        self.start = ckpt.latest_valid(self.dir) if resume else None
        self.metrics_path = self.dir / "metrics.jsonl"

    def weights(self, model_dir: str) -> Path:
        """Where the trained model's weights come from: the checkpoint resumed, else `model_dir`."""
        return self.start / "model" if self.start else Path(model_dir)

    def restore(self, optimizer: torch.optim.Optimizer, seed: int) -> int:
        """The step to continue from: the checkpoint's (optimizer and RNG restored, later metrics
        dropped, as they never happened now), or 0 for a fresh run."""
        if self.start is None:
            torch.manual_seed(seed)
            self.metrics_path.write_text("")
            return 0
        saved = ckpt.load_trainer_state(self.start)
        optimizer.load_state_dict(saved["optimizer"])
        step = saved["state"]["step"]
        ckpt.set_rng_state(saved["rng"])
        lines = self.metrics_path.read_text().splitlines() if self.metrics_path.exists() else []
        self.metrics_path.write_text("".join(ln + "\n" for ln in lines if json.loads(ln)["step"] <= step))
        print(f"dsv2: resumed from {self.start} (step {step})")
        return step

    def log(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, step: int, model: Transformer, optimizer: torch.optim.Optimizer, keep: int) -> None:
        ckpt.save_checkpoint(self.dir, step, model, optimizer, {"step": step}, keep)

    def save_final(self, model: Transformer, tokenizer_dir: str) -> Path:
        """OUT/model with the tokenizer, ready for `dsv2 chat --model` and the engine; in fp32, as
        trained (a bf16 copy would round away updates smaller than 1/256 of a weight)."""
        final = self.dir / "model"
        save_model(model, final)
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, final / name)
        return final
