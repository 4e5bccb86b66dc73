"""Text -> token shards: split documents into train/val, train a tokenizer if none is given, tokenize in
parallel and write raw token arrays with a meta.json that lets anyone re-check them.

Output directory:
    train-00000.bin ...  val-00000.bin ...   every document as BOS, its tokens, EOS, back to back
    tokenizer.json, tokenizer_config.json   the tokenizer that produced them
    meta.json                               dtype, vocab, EOS id, per-split and per-shard counts
                                            and sha256, provenance, settings

Everything written is a function of the inputs and settings only (no timestamps, no worker count),
so two runs give byte-identical directories.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import numpy as np
import tokenizers
from tqdm import tqdm

from ..tokenizer import Tokenizer, train_bpe
from .corpus import Document, sha256_file, source_stats

FORMAT = "dsv2-tokens/1"
SPLITS = ("train", "val")
DEFAULT_VOCAB_SIZE = 8192
# 2^27 tokens: 256 MiB per shard at uint16, small enough to copy around, few enough to list.
DEFAULT_SHARD_TOKENS = 1 << 27


def prepare(
    out_dir: str | Path,
    inputs: Iterable[Document | str | Path],
    tokenizer: Tokenizer | None = None,
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    val_fraction: float = 0.005,
    seed: int = 0,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    provenance: list[dict] | None = None,
) -> dict:
    """Tokenize `inputs` (Documents, or .txt/.jsonl files and folders of them) into out_dir; return meta.

    Without a tokenizer, a byte-level BPE of `vocab_size` is trained on the training documents only
    (so validation text stays unseen). `workers` processes tokenize (default: CPU count); the output
    does not depend on it. `provenance` goes into meta.json as it is; by default it lists each
    source's document count and bytes.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if tokenizer is not None and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; documents are separated by EOS")
    documents = collect_documents(inputs)
    train, val = split_documents(documents, val_fraction, seed)
    if not train:
        raise ValueError(f"all {len(documents)} documents fell into the validation split; lower val_fraction")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # No meta.json while shards are being rewritten: a half-written directory must not look complete.
    (out_dir / "meta.json").unlink(missing_ok=True)

    trained = tokenizer is None
    if trained:
        tokenizer = train_bpe((doc.text for doc in train), vocab_size)
    _save_tokenizer(tokenizer, out_dir)
    dtype = token_dtype(tokenizer.vocab_size)

    splits = {}
    with _encoder(tokenizer, dtype, workers) as encode:
        for split, docs in zip(SPLITS, (train, val)):
            with _ShardWriter(out_dir, split, dtype, shard_tokens) as writer:
                texts = [doc.text for doc in docs]
                for ids in tqdm(encode(texts), total=len(texts), desc=f"tokenize {split}", unit="doc",
                                disable=None):
                    writer.write(ids)
            splits[split] = {"documents": len(docs), "tokens": writer.tokens, "shards": writer.shards}
    _remove_stale_shards(out_dir, splits)

    meta = {
        "format": FORMAT,
        "dtype": np.dtype(dtype).name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_token_id,
        "tokenizer": {"file": "tokenizer.json", "sha256": sha256_file(out_dir / "tokenizer.json"),
                      "trained": trained},
        "splits": splits,
        "provenance": provenance if provenance is not None else
        [{"source": s, **stats} for s, stats in source_stats(documents).items()],
        "settings": {"vocab_size": vocab_size if trained else None, "val_fraction": val_fraction,
                     "seed": seed, "shard_tokens": shard_tokens},
    }
    _atomic_write(out_dir / "meta.json", (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
    return meta


def read_documents(paths: Iterable[str | Path]) -> list[Document]:
    """Documents from .txt files (one per file) and .jsonl files (one per line, field "text");
    a folder stands for every .txt and .jsonl file under it, in path order.

    Names, on which the train/val split depends, do not depend on where the corpus lies: a file
    given directly is named by its file name, a file found in a folder by its path from the folder's
    parent (corpus/sub/a.txt), a JSONL line by its file's name and line number (corpus/b.jsonl:7).
    """
    documents = []
    for path in map(Path, paths):
        if path.is_dir():
            top = path.resolve().parent
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not files:
                raise ValueError(f"no .txt or .jsonl files under {path}")
            named = [(file, file.resolve().relative_to(top).as_posix()) for file in files]
        elif path.is_file():
            if path.suffix not in (".txt", ".jsonl"):
                raise ValueError(f"{path}: expected a .txt or .jsonl file")
            named = [(path, path.name)]
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
        for file, name in named:
            documents += _read_jsonl(file, name) if file.suffix == ".jsonl" else [_read_txt(file, name)]
    return documents


def _read_txt(file: Path, name: str) -> Document:
    try:
        # Universal newlines: \r\n and \r become \n, as in the built-in corpus.
        return Document(name, file.read_text(encoding="utf-8"), name)
    except UnicodeDecodeError as e:
        raise ValueError(f"{file}: not UTF-8 ({e})") from e


def _read_jsonl(file: Path, name: str) -> list[Document]:
    documents = []
    with open(file, encoding="utf-8") as f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}:{number}: invalid JSON: {e}") from e
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f'{file}:{number}: expected an object with a string field "text"')
                documents.append(Document(f"{name}:{number}", record["text"], name))
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 ({e})") from e
    return documents


def collect_documents(inputs: Iterable[Document | str | Path]) -> list[Document]:
    """Every document of `inputs` (Documents, files, folders), names checked to be unique."""
    documents = []
    for item in inputs:
        documents += [item] if isinstance(item, Document) else read_documents([item])
    if not documents:
        raise ValueError("no documents to prepare")
    names = [doc.name for doc in documents]
    if len(set(names)) != len(names):
        duplicate = next(n for n in names if names.count(n) > 1)
        raise ValueError(f"document {duplicate!r} is given twice")
    return documents


def split_documents(
    documents: Sequence[Document], val_fraction: float, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """(train, val), each in the input order. A document is in val when a hash of (seed, name) falls
    below val_fraction: its side depends on nothing else, so adding documents moves none of the others.
    When val_fraction > 0 but no hash falls below it, the lowest-hash document is taken for val, so
    that a small corpus still gets a validation split."""
    scores = [_val_score(doc.name, seed) for doc in documents]
    in_val = [s < val_fraction for s in scores]
    if val_fraction > 0 and not any(in_val):
        in_val[scores.index(min(scores))] = True
    train = [doc for doc, v in zip(documents, in_val) if not v]
    val = [doc for doc, v in zip(documents, in_val) if v]
    return train, val


def _val_score(name: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in it (half the disk and page cache), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def verify(out_dir: str | Path) -> dict:
    """Re-check every shard's size and sha256, and the tokenizer's sha256, against meta.json."""
    out_dir = Path(out_dir)
    meta = read_meta(out_dir)
    itemsize = np.dtype(meta["dtype"]).itemsize
    files = [(meta["tokenizer"]["file"], None, meta["tokenizer"]["sha256"])]
    files += [(s["file"], s["tokens"] * itemsize, s["sha256"]) for split in meta["splits"].values()
              for s in split["shards"]]
    for name, size, sha256 in files:
        path = out_dir / name
        if not path.is_file():
            raise ValueError(f"{path} is missing")
        if size is not None and path.stat().st_size != size:
            raise ValueError(f"{path} has {path.stat().st_size} bytes; meta.json says {size}")
        if sha256_file(path) != sha256:
            raise ValueError(f"{path} does not match the sha256 in meta.json (modified or corrupt)")
    return meta


def read_meta(out_dir: str | Path) -> dict:
    path = Path(out_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no meta.json in {out_dir}: run `dsv2 data prepare` (or it was interrupted)")
    meta = json.loads(path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


class _Encode:
    """text -> BOS (when the tokenizer has one), its token ids, EOS; built from the tokenizer's JSON
    so it can cross processes. BOS opens every document as it opens every prompt at inference."""

    def __init__(self, tokenizer_json: str, bos_id: int | None, eos_id: int, dtype: np.dtype):
        self.tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(tokenizer_json))
        self.head = [] if bos_id is None else [bos_id]
        self.eos_id = eos_id
        self.dtype = dtype

    def __call__(self, text: str) -> np.ndarray:
        return np.array(self.head + self.tokenizer.encode(text) + [self.eos_id], dtype=self.dtype)


_worker_encode: _Encode | None = None


def _init_worker(*args) -> None:
    global _worker_encode
    _worker_encode = _Encode(*args)


def _encode_in_worker(text: str) -> np.ndarray:
    return _worker_encode(text)


@contextmanager
def _encoder(tokenizer: Tokenizer, dtype: np.dtype, workers: int | None) -> Iterator:
    """A function mapping a list of texts to their token arrays, in order, over `workers` processes."""
    args = (tokenizer.backend.to_str(), tokenizer.bos_token_id, tokenizer.eos_token_id, dtype)
    workers = workers or os.cpu_count() or 1
    if workers == 1:
        encode = _Encode(*args)
        yield lambda texts: map(encode, texts)
        return
    # spawn, not fork: forking after the tokenizer's Rust thread pool has run can deadlock. An executor,
    # not multiprocessing.Pool: a worker that dies breaks it with an error where a Pool would hang.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=args) as pool:

        def encode(texts: list[str]) -> Iterator[np.ndarray]:
            # A few chunks per worker keep all of them busy; chunks amortise the IPC of small documents.
            chunksize = max(1, min(64, len(texts) // (4 * workers)))
            try:
                yield from pool.map(_encode_in_worker, texts, chunksize=chunksize)
            except BrokenProcessPool as e:
                raise RuntimeError(
                    "a tokenizer worker process died. Workers are spawned and import the main module "
                    "again: a script that calls prepare() must do so under `if __name__ == \"__main__\":` "
                    "(or pass workers=1)"
                ) from e

        yield encode


class _ShardWriter:
    """Appends token arrays to {split}-00000.bin, {split}-00001.bin, ... of shard_tokens tokens each,
    every shard written to a temporary name and renamed when complete."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.tokens = 0
        self.shards: list[dict] = []
        self._file = None

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None:
                self._open()
            take = min(len(ids), self.shard_tokens - self._count)
            data = ids[:take].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += take
            self.tokens += take
            ids = ids[take:]
            if self._count == self.shard_tokens:
                self._close()

    def _open(self) -> None:
        self._name = f"{self.split}-{len(self.shards):05d}.bin"
        self._tmp = self.out_dir / f".{self._name}.tmp"
        self._file = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._count = 0

    def _close(self) -> None:
        self._file.close()
        os.replace(self._tmp, self.out_dir / self._name)
        self.shards.append({"file": self._name, "tokens": self._count, "sha256": self._hash.hexdigest()})
        self._file = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if self._file is not None:
            if exc_type is None:
                self._close()
            else:
                self._file.close()
                self._tmp.unlink(missing_ok=True)


def _remove_stale_shards(out_dir: Path, splits: dict) -> None:
    """Shards left by an earlier, larger run in the same directory."""
    keep = {s["file"] for split in splits.values() for s in split["shards"]}
    for split in SPLITS:
        for path in out_dir.glob(f"{split}-*.bin"):
            if path.name not in keep:
                path.unlink()


def _save_tokenizer(tokenizer: Tokenizer, out_dir: Path) -> None:
    tmp = out_dir / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save(tmp)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        os.replace(tmp / file, out_dir / file)
    tmp.rmdir()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
