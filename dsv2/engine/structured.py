"""Structured outputs: a request's JSON schema, regex, choice or grammar (StructuredOutputsParams)
compiled by llguidance into a matcher that tells, before each token, which tokens keep the output
inside the language; the sampler sets every other token's logit to -inf.

- GrammarCompiler: the tokenizer as llguidance sees it (built from the same tokenizer.json, nothing
  downloaded) and an LRU of compiled grammars keyed by the spec, so that a schema many requests
  share is compiled once. Each sequence takes a copy of the compiled matcher: a clone of the parser
  state that shares the lexer and the token trie, a microsecond where compiling takes milliseconds
  (up to a second for a large schema). Thread-safe: a server compiles in its worker threads, before
  a request is queued, and the engine thread then finds the grammar compiled.
- Grammar: one sequence's matcher, advanced by every token the engine reads back.
- GrammarCompiler.fill_bitmask: the masks of a batch's constrained rows, computed by llguidance's
  thread pool into one host tensor of packed bits (token t is bit t % 32 of int32 word t // 32).

A matcher that fails (a grammar nothing can complete, a token it refuses, a parser limit) allows
only EOS from then on, as vLLM's guidance backend does; the engine ends such a sequence with
"stop" and logs the matcher's error.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from ..tokenizer import Tokenizer
from .params import StructuredOutputsParams

_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
# JSON's whitespace between two tokens: one space, or a line break and its indentation, which is
# what JSON written compactly or pretty-printed has. vLLM allows any run, which a small model can
# fill until max_tokens, leaving the object unfinished (the bundled model did, for a third of its
# sampled requests).
JSON_WHITESPACE = r"(\x20|\r?\n[\x20\x09]{0,32})?"


def _llguidance():
    # imported on first use: an engine that never sees a constrained request does not load it
    import llguidance

    return llguidance


def _first_lines(message: str, limit: int = 600) -> str:
    """llguidance's error without its trailing parser-state dump, bounded for a response body."""
    message = message.split("<state>")[0].split("<non-verbose/>")[0].strip()
    return message if len(message) <= limit else message[:limit] + "..."


class Grammar:
    """One sequence's position in its grammar."""

    def __init__(self, matcher):
        self.matcher = matcher
        self.error: str | None = None  # set once the matcher has failed: the sequence ends

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False once the matcher has failed."""
        if self.error is None and not self.matcher.consume_token(token_id):
            self.fail(f"token {token_id} refused: {_first_lines(self.matcher.get_error())}")
        return self.error is None

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = _first_lines(message) or "the grammar cannot go on"


class GrammarCompiler:
    """Compiles StructuredOutputsParams for one tokenizer and a model's vocabulary (the logits'
    width, which may exceed the tokenizer's); keeps the last `cache_size` compiled specs, and the
    errors of malformed ones, so that a bad schema sent again is refused as cheaply."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 128):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, object] = OrderedDict()  # key -> compiled matcher or error text
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._executor = None
        self.compiled = 0  # grammars compiled (cache misses), for tests and benchmarks

    def _setup(self):
        """The llguidance tokenizer and thread pool, built on first use."""
        with self._lock:
            if self._ll_tokenizer is None:
                eos = self.tokenizer.eos_token_id
                if eos is None or eos >= self.vocab_size:
                    raise ValueError("structured outputs need a tokenizer with an EOS token in the model's "
                                     "vocabulary (it ends a completed output)")
                llg = _llguidance()
                n_vocab = max(self.vocab_size, self.tokenizer.vocab_size)
                self._ll_tokenizer = llg.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=eos)
                self._executor = llg.LLExecutor()
            return self._ll_tokenizer

    def compile(self, spec: StructuredOutputsParams):
        """The compiled matcher of `spec` (shared: copy it, as `grammar` does), from the cache when
        it is there; ValueError with llguidance's reason for a spec that does not compile."""
        key = spec.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
        if hit is None:
            # compiled outside the lock (llguidance drops the GIL while it compiles): another
            # thread compiling the same spec meanwhile costs a duplicate, never a wait
            hit = self._compile(key)
            with self._lock:
                self._cache[key] = hit
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
                self.compiled += 1
        if isinstance(hit, str):
            raise ValueError(hit)
        return hit

    def _compile(self, key: tuple[str, str, bool]):
        kind, text, compact = key
        ll_tokenizer = self._setup()
        llg = _llguidance()
        what = {"json": "JSON schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}[kind]
        try:
            if kind == "json":
                options = {"whitespace_flexible": False} if compact else {"whitespace_pattern": JSON_WHITESPACE}
                grammar = llg.LLMatcher.grammar_from_json_schema(text, defaults=options)
            else:
                grammar = llg.grammar_from(_KINDS[kind], text)
        except (ValueError, TypeError) as e:  # GBNF that cannot be read, a schema that is not an object
            return f"invalid {what}: {_first_lines(str(e))}"
        limits = llg.LLParserLimits(verbose_errors=False)  # errors without the grammar's text and state
        matcher = llg.LLMatcher(ll_tokenizer, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            return f"invalid {what}: {_first_lines(matcher.get_error())}"
        return matcher

    def grammar(self, spec: StructuredOutputsParams) -> Grammar:
        """A fresh matcher for one sequence."""
        return Grammar(self.compile(spec).deep_copy())

    def fill_bitmask(self, grammars: list[Grammar]) -> torch.Tensor:
        """[len(grammars), ceil(V / 32)] int32 on the host: row j the tokens grammars[j] allows
        next, V the model's vocabulary. A grammar whose matcher has failed, or that allows no token
        of the vocabulary, is failed and allowed EOS alone: no row is left with nothing to draw."""
        self._setup()
        words = -(-max(self.vocab_size, self._ll_tokenizer.vocab_size) // 32)
        mask = torch.empty(len(grammars), words, dtype=torch.int32)
        # llguidance's own helper (llguidance.torch.fill_next_token_bitmask_par) does this call
        # too, but importing that module compiles a torch function at import time
        self._executor.unsafe_compute_mask_ptr([(g.matcher, j) for j, g in enumerate(grammars)],
                                               mask.data_ptr(), words * 4, len(grammars))
        mask = mask[:, : -(-self.vocab_size // 32)]
        if self.vocab_size % 32:  # tokens past the logits' width cannot be drawn
            mask[:, -1] &= (1 << (self.vocab_size % 32)) - 1
        empty = (~mask.any(dim=1)).tolist()
        for j, g in enumerate(grammars):
            if g.matcher.is_error():  # llguidance's reason is terse ("NoExtensionBias"): say what it means
                g.fail(f"no text can complete the grammar from here ({_first_lines(g.matcher.get_error())})")
            if g.error is not None or empty[j]:
                g.fail("no token of the vocabulary can continue the grammar")
                mask[j] = 0
                eos = self.tokenizer.eos_token_id
                mask[j, eos // 32] = _bit(eos)
        return mask


def _bit(token_id: int) -> int:
    """Token token_id's bit in its int32 word, as a signed value (bit 31 is the sign)."""
    b = 1 << (token_id % 32)
    return b - (1 << 32) if b >= 1 << 31 else b


def allows(mask: torch.Tensor, token_id: int) -> bool:
    """Whether a packed row of fill_bitmask allows token_id."""
    return token_id < 32 * mask.shape[-1] and bool((int(mask[token_id // 32]) >> (token_id % 32)) & 1)


def allows_other_than(mask: torch.Tensor, token_ids: list[int]) -> bool:
    """Whether a packed row allows any token outside token_ids."""
    words = [w & 0xFFFFFFFF for w in mask.tolist()]
    for t in token_ids:
        if t < 32 * len(words):
            words[t // 32] &= ~(1 << (t % 32))
    return any(words)


def unpack(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Packed rows [C, W] int32 -> bool [C, vocab_size], on the mask's device. Through the bytes
    (little-endian: token t is bit t % 8 of byte t // 8), so the intermediate is C x V bytes."""
    as_bytes = mask.contiguous().view(torch.uint8)
    shifts = torch.arange(8, device=mask.device, dtype=torch.uint8)
    bits = (as_bytes.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :vocab_size].bool()
