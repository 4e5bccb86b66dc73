"""Training data: the built-in corpus, text -> token shards, and the resumable batch loader.

The loader (`dsv2.data.loader.TokenLoader`) is not imported here: it needs torch, and prepare's worker
processes import this package, which would then pay for torch on every start.
"""

from .corpus import Document, builtin_corpus, builtin_provenance, literature_documents, stdlib_documents
from .prepare import prepare, read_documents, read_meta, split_documents, token_dtype, verify

__all__ = [
    "Document", "builtin_corpus", "builtin_provenance", "literature_documents", "prepare", "read_documents",
    "read_meta", "split_documents", "stdlib_documents", "token_dtype", "verify",
]
