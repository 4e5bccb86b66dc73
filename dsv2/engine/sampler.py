"""Sampler: next-token logits [B, V] -> one token per row, each row under its own SamplingParams;
Detokenizer: one request's text with stop strings; check_stop: when a request ends.

The sampler follows vLLM's order: the grammar's mask of a structured output (tokens it does not
allow next at -inf), logit_bias added, penalties (repetition over prompt + output, then frequency
and presence over the output), min_tokens (EOS and stop_token_ids masked), then greedy rows take the
argmax and the others go through temperature, top-k, top-p and min-p before the draw. Every step is
one tensor operation over the batch, over only the rows a rule concerns (a batch where no row has a
grammar or a bias does no work for them); only the draw of a seeded row is per row, from that
request's own generator, so its tokens do not depend on which requests share its batch.

Logprobs are those of the raw model distribution, log_softmax of the logits as they come in, before
the grammar's mask, bias, penalties and temperature: vLLM's default (logprobs_mode="raw_logprobs"),
and what a user comparing against the model expects.

`reference_process` is the slow twin of `Sampler.process`: one row, one rule at a time, in loops.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..tokenizer import StreamDecoder, Tokenizer
from .host import to_device
from .kernels import greedy as greedy_kernel
from .params import SamplingParams
from .structured import allows, allows_other_than, unpack


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A request's own generator (None without a seed); created once, when the request arrives."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class RowState:
    """What the sampler needs of one sequence in the batch."""

    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]  # generated so far, for penalties and min_tokens
    generator: torch.Generator | None = None  # make_generator(params.seed, device)
    eos_id: int | None = None
    # a structured output's next-token mask: packed bits on the host, [ceil(V / 32)] int32
    # (GrammarCompiler.fill_bitmask's row); None for a free row
    allowed: torch.Tensor | None = None


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64, on the logits' device
    # [2, B] float64 on the device: the token ids, then each chosen token's logprob under the raw
    # model distribution; what the engine copies back to the host
    host: torch.Tensor
    # Per row: None when the row did not ask, else its top params.logprobs (token id, logprob) pairs
    # of the raw distribution, most likely first ([] for logprobs=0).
    top_logprobs: list[list[tuple[int, float]] | None]

    @property
    def logprobs(self) -> torch.Tensor:
        return self.host[1].float()


class Sampler:
    """`generator` serves the unseeded rows (None: torch's default generator for the device)."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, rows: Sequence[RowState]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [B, V] with B = len(rows) = {len(rows)}, got {tuple(logits.shape)}")
        if logits.is_cuda and greedy_kernel.triton is not None and _plain_greedy(rows) \
                and all(r.params.logprobs is None for r in rows):
            token_ids, host = greedy_kernel.greedy(logits)
            return SamplerOutput(token_ids, host, [None] * len(rows))
        logits = logits.float()
        # the chosen tokens' logprobs need only each row's logsumexp; the whole log_softmax
        # (a [B, V] write and read, 0.045 ms of a 3.3 ms batch-1 step at V = 102,400) only for top N
        log_z = logits.logsumexp(dim=-1)

        processed = self.process(logits, rows)
        token_ids = processed.argmax(dim=-1)  # the greedy rows' answer; sampled rows overwrite it
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            index = to_device(sampled, logits.device)
            probs = processed[index].softmax(dim=-1)
            token_ids[index] = self._draw(probs, [rows[i].generator for i in sampled])

        chosen_logprobs = logits.gather(1, token_ids[:, None]).squeeze(1) - log_z
        top_logprobs = [None] * len(rows)
        if any(r.params.logprobs is not None for r in rows):
            n = min(max(r.params.logprobs or 0 for r in rows), logits.shape[1])
            values, ids = logits.topk(n, dim=-1)  # sorted, most likely first
            values = values - log_z[:, None]
            values, ids = values.tolist(), ids.tolist()
            for i, r in enumerate(rows):
                if r.params.logprobs is not None:
                    k = r.params.logprobs
                    top_logprobs[i] = list(zip(ids[i][:k], values[i][:k]))
        return SamplerOutput(token_ids, torch.stack([token_ids.double(), chosen_logprobs.double()]), top_logprobs)

    @torch.no_grad()
    def process(self, logits: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
        """The logits each row picks from, [B, V] float32, -inf where excluded. Greedy rows stop
        after penalties and min_tokens (their argmax is the token); sampled rows are divided by
        their temperature and filtered by top-k, top-p and min-p. The input is not modified (and
        comes back as it is, in fp32, where no rule applies: plain greedy batches)."""
        if _plain_greedy(rows):
            return logits.float()
        logits = logits.to(torch.float32, copy=True)
        _apply_allowed(logits, rows)
        _apply_logit_bias(logits, rows)
        _apply_penalties(logits, rows)
        _apply_min_tokens(logits, rows)

        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not sampled:
            return logits
        everyone = len(sampled) == len(rows)
        device = logits.device
        index = None if everyone else to_device(sampled, device)
        sub = logits if everyone else logits[index]
        params = [rows[i].params for i in sampled]
        sub = sub / to_device([p.temperature for p in params], device, torch.float32)[:, None]
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            top_k = to_device([p.top_k for p in params], device)
            top_p = to_device([p.top_p for p in params], device, torch.float32)
            sub = _top_k_top_p(sub, top_k, top_p)
        if any(p.min_p > 0 for p in params):
            sub = _min_p(sub, to_device([p.min_p for p in params], device, torch.float32))
        if everyone:
            return sub
        logits[index] = sub
        return logits

    def _draw(self, probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        tokens = torch.empty(len(generators), dtype=torch.long, device=probs.device)
        shared = [j for j, g in enumerate(generators) if g is None]
        if len(shared) == len(generators):
            return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        if shared:
            index = to_device(shared, probs.device)
            tokens[index] = torch.multinomial(probs[index], 1, generator=self.generator).squeeze(1)
        for j, g in enumerate(generators):
            if g is not None:
                tokens[j] = torch.multinomial(probs[j], 1, generator=g)[0]
        return tokens


def _plain_greedy(rows: Sequence[RowState]) -> bool:
    """Every row takes the argmax of its logits as they come (no penalties, no min_tokens, no
    grammar, no bias)."""
    return all(r.params.greedy and not r.params.has_penalties and not r.params.min_tokens
               and r.allowed is None and not r.params.logit_bias for r in rows)


def _apply_allowed(logits: torch.Tensor, rows: Sequence[RowState]) -> None:
    """In place, for the rows with a grammar: the tokens it does not allow next to -inf. The packed
    masks cross to the device (from pinned memory, without waiting) and are unpacked there."""
    which = [i for i, r in enumerate(rows) if r.allowed is not None]
    if not which:
        return
    device = logits.device
    packed = torch.stack([rows[i].allowed for i in which])
    if device.type == "cuda":
        packed = packed.pin_memory()
    allowed = unpack(packed.to(device, non_blocking=True), logits.shape[1])
    if len(which) == len(rows):
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = to_device(which, device)
    logits[index] = logits[index].masked_fill(~allowed, float("-inf"))


def _apply_logit_bias(logits: torch.Tensor, rows: Sequence[RowState]) -> None:
    """In place, for the rows with a logit_bias: each bias added to its token's logit."""
    entries = [(i, t, b) for i, r in enumerate(rows) if r.params.logit_bias
               for t, b in r.params.logit_bias.items() if t < logits.shape[1]]
    if not entries:
        return
    device = logits.device
    index = to_device([(i, t) for i, t, _ in entries], device).T
    bias = to_device([b for _, _, b in entries], device, torch.float32)
    logits.index_put_((index[0], index[1]), bias, accumulate=True)


def _apply_penalties(logits: torch.Tensor, rows: Sequence[RowState]) -> None:
    """In place, for the rows that have penalties: token counts scattered into [b, V] (one extra
    column takes the padding), then vLLM's rules."""
    which = [i for i, r in enumerate(rows) if r.params.has_penalties]
    if not which:
        return
    vocab, device = logits.shape[1], logits.device
    seen = _counts([list(rows[i].prompt_ids) + list(rows[i].output_ids) for i in which], vocab, device) > 0
    output_counts = _counts([rows[i].output_ids for i in which], vocab, device)

    def column(name: str) -> torch.Tensor:
        return to_device([getattr(rows[i].params, name) for i in which], device, torch.float32)[:, None]

    sub = logits[which]
    # Repetition (CTRL, Keskar et al. 2019): seen tokens get less likely whatever their sign.
    rep = column("repetition_penalty")
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    # OpenAI's: frequency per occurrence in the output, presence once per token in the output.
    sub = sub - column("frequency_penalty") * output_counts
    sub = sub - column("presence_penalty") * (output_counts > 0)
    logits[which] = sub


def _counts(seqs: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), vocab, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    ids = ids.to(device, non_blocking=True)
    counts = torch.zeros(len(seqs), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
    return counts[:, :vocab]


def _min_tokens_banned(row: RowState) -> list[int]:
    """The tokens a row may not draw yet: those that would end it before min_tokens.
    With ignore_eos, EOS ends nothing, so it stays allowed (vLLM masks it regardless). A grammar
    that allows nothing but these (a completed JSON object allows only EOS) wins over min_tokens:
    banning them would leave the row nothing to draw."""
    p = row.params
    if len(row.output_ids) >= p.min_tokens:
        return []
    eos = [row.eos_id] if row.eos_id is not None and not p.ignore_eos else []
    banned = eos + list(p.stop_token_ids)
    if banned and row.allowed is not None and not allows_other_than(row.allowed, banned):
        return []
    return banned


def _apply_min_tokens(logits: torch.Tensor, rows: Sequence[RowState]) -> None:
    pairs = [(i, t) for i, r in enumerate(rows) for t in _min_tokens_banned(r) if t < logits.shape[1]]
    if pairs:
        index = to_device(pairs, logits.device).T
        logits[index[0], index[1]] = float("-inf")


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """One descending sort serves both. top_k 0 is off; ties with the k-th value stay (as vLLM).
    top-p keeps the smallest head whose mass reaches p: a token goes when the tokens ranked
    above it already hold p (the first always stays); p is taken after top-k renormalizes."""
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = sorted_logits.gather(1, (k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (top_p[:, None] < 1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Keep the tokens at least min_p times as likely as the most likely one (Nguyen et al. 2024)."""
    probs = logits.softmax(dim=-1)
    keep = probs >= min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(~keep, float("-inf"))


def reference_process(logits: torch.Tensor, row: RowState) -> torch.Tensor:
    """Slow twin of Sampler.process for one row: logits [V] -> [V], one rule at a time."""
    x = logits.to(torch.float32, copy=True)
    p = row.params
    if row.allowed is not None:
        for t in range(len(x)):
            if not allows(row.allowed, t):
                x[t] = float("-inf")
    for t, bias in (p.logit_bias or {}).items():
        x[t] = x[t] + bias
    if p.repetition_penalty != 1:
        for t in set(row.prompt_ids) | set(row.output_ids):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, count in Counter(row.output_ids).items():
        x[t] = x[t] - p.frequency_penalty * count - p.presence_penalty
    for t in _min_tokens_banned(row):
        x[t] = float("-inf")
    if p.greedy:
        return x
    x = x / p.temperature
    if p.top_k > 0:
        kth = sorted(x.tolist(), reverse=True)[min(p.top_k, len(x)) - 1]
        x[x < kth] = float("-inf")
    if p.top_p < 1:
        probs = x.softmax(dim=0).tolist()
        mass = 0.0
        for rank, t in enumerate(sorted(range(len(x)), key=lambda t: -probs[t])):
            if rank > 0 and mass >= p.top_p:
                x[t] = float("-inf")
            mass += probs[t]
    if p.min_p > 0:
        probs = x.softmax(dim=0)
        x[probs < p.min_p * probs.max()] = float("-inf")
    return x


def _ends_on_token(params: SamplingParams, token_id: int, num_output_tokens: int, eos_id: int | None) -> bool:
    # Before min_tokens the sampler masks these tokens; a forced one (or EOS under ignore_eos)
    # does not end the request.
    if num_output_tokens <= params.min_tokens:
        return False
    return (token_id == eos_id and not params.ignore_eos) or token_id in params.stop_token_ids


def check_stop(params: SamplingParams, token_id: int, num_output_tokens: int, eos_id: int | None) -> str | None:
    """The finish reason after appending token_id, the num_output_tokens-th generated token:
    "stop" for EOS (unless ignore_eos) or a stop_token_id, "length" at max_tokens, else None.
    A stop token that is also the last allowed token reports "stop", as vLLM's V0 engine did (V1
    checks length first). Stop strings are the Detokenizer's: its stopped_by also means "stop"."""
    if _ends_on_token(params, token_id, num_output_tokens, eos_id):
        return "stop"
    if num_output_tokens >= params.max_tokens:
        return "length"
    return None


class Detokenizer:
    """One request's output text, streamed: StreamDecoder plus stop strings, as vLLM outputs them.

    Everything push and flush return, joined, is vLLM's final text: the decoded output cut before
    the first stop string (or after it, with include_stop_str_in_output), where "first" is the one
    completed first reading left to right (earliest end, then the longer), whatever the tokens'
    boundaries; vLLM takes the first of its stop list found in the newest text, which agrees
    whenever one token completes at most one stop string. As in vLLM, stop strings count only once
    more than min_tokens tokens are out, and the text of the EOS / stop token that ends a request is
    left out unless include_stop_str_in_output.

    Text is never retracted: the last len(longest stop) - 1 characters are held back while they
    could still begin a stop string (not needed when stop strings stay in the output). Call flush()
    when the request ends, whatever the reason, for the held-back text and any incomplete UTF-8
    character (U+FFFD, as decode gives it).
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos_id: int | None = None):
        self.params = params
        self.eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens=params.skip_special_tokens)
        self.text = ""  # the output so far, cut at a stop string; text[:_sent] has been returned
        self.stopped_by: str | None = None
        self.finished = False
        self.num_tokens = 0
        hold = params.stop and not params.include_stop_str_in_output
        self._hold = max(len(s) for s in params.stop) - 1 if hold else 0
        self._sent = 0
        self._ended = False  # by an EOS / stop token: only flush() may follow

    def push(self, token_id: int) -> tuple[str, str | None]:
        """The text now final and the stop string that ended the request here (None if none)."""
        if self.finished or self._ended:
            raise RuntimeError("Detokenizer.push after the request finished")
        self.num_tokens += 1
        self._ended = _ends_on_token(self.params, token_id, self.num_tokens, self.eos_id)
        if self._ended and not self.params.include_stop_str_in_output:
            return "", None
        return self._advance(self.decoder.push(token_id), final=False)

    def flush(self) -> str:
        """The rest of the text. A stop string can still complete here, in text the decoder held
        back behind an incomplete character: the text is cut and self.stopped_by says which."""
        if self.finished:
            return ""
        return self._advance(self.decoder.flush(), final=True)[0]

    def _advance(self, new: str, final: bool) -> tuple[str, str | None]:
        start = len(self.text)
        self.text += new
        stopped_by = None
        if new and self.params.stop and self.num_tokens > self.params.min_tokens:
            hit = _first_stop(self.text, start, self.params.stop)
            if hit is not None:
                stopped_by, begin = hit
                end = begin + len(stopped_by) if self.params.include_stop_str_in_output else begin
                self.text = self.text[:end]
                self.stopped_by = stopped_by
        self.finished = final or stopped_by is not None
        end = len(self.text) if self.finished else len(self.text) - self._hold
        if end <= self._sent:
            return "", stopped_by
        out, self._sent = self.text[self._sent : end], end
        return out, stopped_by


def _first_stop(text: str, start: int, stops: Sequence[str]) -> tuple[str, int] | None:
    """The stop string completed first in text, looking only at occurrences that end past start
    (earlier text was searched before); ties in the end go to the earlier start."""
    best = None
    for s in stops:
        begin = text.find(s, max(0, start - len(s) + 1))
        if begin != -1 and (best is None or (begin + len(s), begin) < (best[1] + len(best[0]), best[1])):
            best = (s, begin)
    return best
