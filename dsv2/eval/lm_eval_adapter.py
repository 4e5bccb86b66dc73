"""dsv2 as an lm-evaluation-harness model, registered as "dsv2":

    from dsv2.eval.lm_eval_adapter import register
    register()
    lm_eval.simple_evaluate(model="dsv2", model_args="pretrained=DIR", tasks=[...])

(lm-eval's own command line only knows models imported before it parses its arguments.)

lm-eval hands over text; this adapter tokenizes it the way lm-eval's HF model does and passes token
ids to `EvalModel`, so both backends (engine and reference) serve the harness unchanged.

lm-eval is an optional dependency (the `eval` extra), and `DSV2LM` must subclass its `LM`; so the
methods live in `_DSV2LMBase`, which needs nothing from lm-eval, and the class itself is made (and
registered as "dsv2") on first use: `register()`, or `from dsv2.eval.lm_eval_adapter import DSV2LM`.
Code that merely imports dsv2 never pays for, or fails on, lm-eval.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .lm import EvalModel

DEFAULT_MAX_GEN_TOKS = 256

_registered: type | None = None
_log = logging.getLogger(__name__)


class _DSV2LMBase:
    """The body of `DSV2LM`; requests are lm-eval `Instance`s (only `.args` is read)."""

    def __init__(self, pretrained: str | Path | EvalModel, device: str | None = None, dtype: str | None = None,
                 backend: str = "auto", batch_size: int | str | None = 32, max_batch_size: int | None = None,
                 max_gen_toks: int | str = DEFAULT_MAX_GEN_TOKS, **unused: Any):
        super().__init__()  # lm_eval's LM.__init__: rank, world size, cache hook
        if unused:
            # model_args meant for HF models (trust_remote_code, revision, ...) should not stop a run
            _log.warning("dsv2 lm-eval adapter ignores model_args %s", sorted(unused))
        if isinstance(pretrained, EvalModel):
            self.model = pretrained
        else:
            # lm-eval passes batch_size="auto" (or "auto:N") for its own batch-size search; EvalModel
            # batches continuously on the engine and by a fixed size on the reference path.
            size = 32 if batch_size is None or str(batch_size).startswith("auto") else int(batch_size)
            if max_batch_size is not None:
                size = min(size, int(max_batch_size))
            self.model = EvalModel(str(pretrained), device=device or None, dtype=dtype or None,
                                   backend=str(backend), batch_size=size)
        self.max_gen_toks = int(max_gen_toks)

    @classmethod
    def from_eval_model(cls, model: EvalModel, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS):
        return cls(model, max_gen_toks=max_gen_toks)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def prefix_token_id(self) -> int:
        """What predicts a text's first token when nothing precedes it: BOS, else EOS (as lm-eval's HF model)."""
        tok = self.tokenizer
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if prefix is None:
            raise ValueError("the tokenizer has neither a BOS nor an EOS token to condition the first token on")
        return prefix

    @property
    def max_length(self) -> int:
        return self.model.max_len

    @property
    def rolling_width(self) -> int:
        """Tokens predicted per rolling window: EvalModel scores context + continuation within
        max_len - 1 positions (it feeds the last token too, and the engine keeps a slot for the
        token it generates), and one position goes to the conditioning token."""
        return self.model.max_len - 2

    @property
    def device(self):
        return self.model.device

    def tok_encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """`add_bos=None`: BOS when the tokenizer has one, as a HF tokenizer with add_bos_token does."""
        if add_bos is None:
            add_bos = self.tokenizer.bos_token_id is not None
        return self.tokenizer.encode(text, add_bos=add_bos)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's TemplateLM rules, so scores compare with HF runs of the same checkpoint."""
        if not context:
            cont = self.tok_encode(continuation, add_bos=False)
            if cont and cont[0] == self.prefix_token_id:
                return cont[:1], cont[1:]
            return [self.prefix_token_id], cont
        # " A" is one token where "... :" + " A" would split the space off: trailing whitespace of
        # the context belongs to the continuation.
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        # encode the whole and split it, so merges across the boundary fall in the continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        return ctx, whole[len(ctx):]

    # --- the three request types -----------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(*req.args) for req in requests]
        scored = [i for i, (_, cont) in enumerate(pairs) if cont]
        # longest first: the reference backend pads each batch to its longest row
        scored.sort(key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        out: list[tuple[float, bool]] = [(0.0, True)] * len(pairs)  # an empty continuation is certain
        for i, res in zip(scored, self.model.loglikelihood([pairs[i] for i in scored]), strict=True):
            out[i] = res
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Each string's total log-likelihood, every token predicted once: disjoint windows (lm-eval's
        rolling windows with context_len=1), each a single conditioning token (BOS for the first,
        else the token before the window) and up to `rolling_width` predicted ones."""
        width = self.rolling_width
        windows: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        for r, req in enumerate(requests):
            (text,) = req.args
            tokens = self.tok_encode(text, add_bos=False)
            before = [self.prefix_token_id] + tokens
            for start in range(0, len(tokens), width):
                windows.append(([before[start]], tokens[start:start + width]))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, self.model.loglikelihood(windows), strict=True):
            totals[r] += logprob
        return totals

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        # EvalModel.generate takes one budget, stop list and temperature per call: group by them
        groups: dict[str, list[int]] = {}
        settings: dict[str, tuple[list[str], int, float]] = {}
        for i, req in enumerate(requests):
            until, max_gen_toks, temperature = self._gen_settings(req.args[1])
            key = json.dumps([until, max_gen_toks, temperature])
            groups.setdefault(key, []).append(i)
            settings[key] = (until, max_gen_toks, temperature)
        out = [""] * len(requests)
        for key, idx in groups.items():
            until, max_gen_toks, temperature = settings[key]
            # keep the end of a long context and leave room for the generation (lm-eval's HF model
            # cuts the same way)
            keep = max(1, self.model.max_len - max_gen_toks)
            prompts = [self.tok_encode(requests[i].args[0])[-keep:] for i in idx]
            texts = self.model.generate(prompts, max_gen_toks, stop=until or None, temperature=temperature)
            for i, (text,) in zip(idx, texts, strict=True):
                out[i] = text
        return out

    def _gen_settings(self, gen_kwargs: dict | None) -> tuple[list[str], int, float]:
        kw = dict(gen_kwargs or {})
        until = kw.get("until") or []
        if isinstance(until, str):
            until = [until]
        max_gen_toks = int(kw.get("max_gen_toks", self.max_gen_toks))
        # HF semantics: greedy unless do_sample, and do_sample without a temperature means 1.0
        if kw.get("do_sample", False):
            temperature = float(kw.get("temperature", 1.0))
        else:
            temperature = 0.0 if "do_sample" in kw else float(kw.get("temperature", 0.0))
        return list(until), max_gen_toks, temperature


def register() -> type:
    """Import lm_eval, define `DSV2LM` (an `lm_eval.api.model.LM`) and register it as "dsv2"; idempotent."""
    global _registered
    if _registered is None:
        try:
            from lm_eval.api.model import LM
            from lm_eval.api.registry import register_model
        except ImportError as e:
            raise ImportError("the lm-eval adapter needs lm-evaluation-harness: pip install 'dsv2[eval]'") from e
        cls = type("DSV2LM", (_DSV2LMBase, LM), {"__module__": __name__, "__qualname__": "DSV2LM",
                                                  "__doc__": "dsv2 behind lm-evaluation-harness's LM interface."})
        _registered = register_model("dsv2")(cls)
    return _registered


def __getattr__(name: str):
    # `from dsv2.eval.lm_eval_adapter import DSV2LM` makes and registers the class on demand
    if name == "DSV2LM":
        return register()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
