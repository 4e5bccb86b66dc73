"""Tolerances for results that two different op sequences compute, derived from the dtype's rounding.

Bitwise equality holds only where both sides run the very same operations (a resume, a save and a
load, a copy). Anything else (another summation order, a fused kernel, a batch of another size, or
the same code on another CPU, whose vector width changes how torch, oneDNN and MKL split a
reduction) rounds differently, so those comparisons count in ulps: units of the dtype's machine
epsilon, relative to the largest magnitude in play, since a sum's rounding error scales with its
terms rather than with the result. Each call says how many ulps it allows and why; the failure
message gives the error measured in ulps, so a bound can be judged against what it guards.

Greedy tokens are the discontinuous case: where the reference's two best logits are closer than the
rounding, either may win. `assert_greedy` therefore scores a generation under the reference by
teacher forcing and requires each token to be the best up to that rounding, which is plain equality
wherever the reference has a clear winner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# A model's forward in fp32 against another op sequence for the same weights (transformers, the
# absorbed form, the engine's paged path, another CPU): a few layers of sums over hundreds of terms
# move logits by up to ~1e-5 of the largest one; 2^10 ulps (1.2e-4 of it) leaves room without hiding
# a real error, which is of the size of the logits themselves.
MODEL_ULPS = 2**10


def tol(dtype: torch.dtype, ulps: float) -> float:
    """`ulps` units of `dtype`'s rounding (its machine epsilon)."""
    return ulps * torch.finfo(dtype).eps


def assert_close(got: torch.Tensor, want: torch.Tensor, ulps: float, scale: float | None = None) -> None:
    """max |got - want| <= `ulps` ulps of the coarser of the two dtypes (against a float64 reference,
    the other side's rounding) times `scale` (default: the largest |want|, at least 1)."""
    assert got.shape == want.shape, (got.shape, want.shape)
    eps = max(torch.finfo(got.dtype).eps, torch.finfo(want.dtype).eps)
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    err = (got - want).abs().max().item() if want.numel() else 0.0
    if scale is None:
        scale = max(1.0, want.abs().max().item() if want.numel() else 0.0)
    unit = eps * scale
    assert err <= ulps * unit, f"max error {err:.3g} is {err / unit:.0f} ulps of {scale:.3g}; allowed {ulps}"


def assert_greedy(logits_of: Callable[[torch.Tensor], torch.Tensor], prompt: Sequence[int],
                  tokens: Sequence[int], ulps: float = MODEL_ULPS) -> None:
    """Each of `tokens` is a greedy choice of the reference given the prompt and the tokens before it:
    its logit under `logits_of` ([1, T] ids -> [1, T, vocab] logits; a model is fed on its device)
    is within `ulps` ulps (of the
    row's largest |logit|) of the best."""
    assert len(tokens) > 0
    device = next(logits_of.parameters()).device if isinstance(logits_of, torch.nn.Module) else "cpu"
    ids = torch.tensor([list(prompt) + list(tokens)], device=device)
    with torch.no_grad():
        raw = logits_of(ids)[0, len(prompt) - 1: -1]
    logits = raw.double().cpu()
    chosen = logits.gather(-1, torch.tensor(list(tokens))[:, None])[:, 0]
    behind = logits.max(-1).values - chosen
    allowed = ulps * tol(raw.dtype, 1) * logits.abs().amax(-1)
    bad = (behind > allowed).nonzero().flatten().tolist()
    assert not bad, (f"token {bad[0]} of {len(tokens)} ({tokens[bad[0]]}) is {behind[bad[0]].item():.3g} behind the "
                     f"reference's best ({logits[bad[0]].argmax().item()}); allowed {allowed[bad[0]].item():.3g}")
