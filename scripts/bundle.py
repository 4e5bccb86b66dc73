"""Turn a training run into the bundled model: bf16 weights in shards under 16 MB, the data's
tokenizer beside them, and a few greedy samples for the docs.

    python scripts/bundle.py --run runs/bundled --data data/builtin --out dsv2/bundled
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsv2.checkpoint import load_model, save_model  # noqa: E402
from dsv2.generate import generate  # noqa: E402
from dsv2.tokenizer import Tokenizer  # noqa: E402
from dsv2.train.checkpoint import latest_valid  # noqa: E402

PROMPTS = [
    "ROMEO. O gentle night,",
    "HAMLET. To be, or not to be,",
    "Of Man's first disobedience, and the fruit",
    "def binary_search(items, target):\n",
    "import os\n\n\ndef read_lines(path):\n",
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--max-new-tokens", type=int, default=80)
    args = ap.parse_args()
    ckpt = latest_valid(args.run)
    if ckpt is None:
        raise SystemExit(f"no valid checkpoint in {args.run}")
    model = load_model(ckpt / "model", dtype=torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    save_model(model, args.out, max_shard_size="15MB", dtype=torch.bfloat16)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(args.data / name, args.out / name)
    tok = Tokenizer.from_dir(args.out)
    bundled = load_model(args.out, dtype=torch.float32)
    lines = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt, add_bos=True)
        new = generate(bundled, [ids], args.max_new_tokens, stop_token_ids=[tok.eos_token_id])[0]
        lines.append(f"### prompt: {prompt!r}\n{prompt}{tok.decode(new, skip_special_tokens=True)}\n")
    (args.out.parent / "samples.txt").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
