import pytest
import torch

from dsv2.generate import generate, sample, stream

from .conftest import PARITY_CONFIGS, hf_model, random_model, tiny_config
from .numerics import assert_greedy


def _prompts(n, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 30, (n,), generator=g).tolist()
    return [torch.randint(2, vocab, (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module", params=["qlora-grouplimited-scaled-1dense-yarn", "noqlora-greedy-0dense"])
def pair(request, tmp_path_factory):
    config = tiny_config(**PARITY_CONFIGS[request.param])
    model = random_model(config, seed=11, std=0.2)
    return model, hf_model(model, tmp_path_factory.mktemp("hf"))


def test_greedy_matches_transformers_with_and_without_cache(pair):
    """Every way of generating picks, at each step, transformers' greedy token for the same weights
    (up to rounding, numerics.assert_greedy), and the prompts' continuations are distinct."""
    model, hf = pair
    prompts = _prompts(4, model.config.vocab_size)
    want = [hf.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert len(set(map(tuple, want))) == len(want)  # distinct continuations: a real test
    for kwargs in ({}, {"use_cache": False}, {"padding_side": "right"}, {"absorb": True},
                   {"use_cache": False, "padding_side": "right"}):
        for p, got in zip(prompts, generate(model, prompts, 32, **kwargs), strict=True):
            assert len(got) == 32, kwargs
            assert_greedy(lambda ids: hf(ids).logits, p, got)


def test_batched_equals_one_at_a_time():
    model = random_model(tiny_config(), seed=12, std=0.2)
    prompts = _prompts(6, 512, seed=3)
    batched = generate(model, prompts, 12)
    alone = [generate(model, [p], 12)[0] for p in prompts]
    for p, a, b in zip(prompts, batched, alone, strict=True):  # padded rows: other GEMM shapes
        assert_greedy(model, p, a)
        assert_greedy(model, p, b)


def test_stop_tokens_end_a_row_and_are_kept():
    model = random_model(tiny_config(), seed=13, std=0.2)
    prompts = _prompts(3, 512, seed=4)
    free = generate(model, prompts, 16)
    stop = free[0][5]
    out = generate(model, prompts, 16, stop_token_ids=[stop])
    for row, full in zip(out, free):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]


def test_seeded_sampling_is_reproducible():
    model = random_model(tiny_config(), seed=14, std=0.2)
    prompts = _prompts(3, 512, seed=5)
    kw = dict(temperature=1.0, top_p=0.9, top_k=40)
    a = generate(model, prompts, 20, seed=7, **kw)
    assert a == generate(model, prompts, 20, seed=7, **kw)
    assert a != generate(model, prompts, 20, seed=8, **kw)
    assert list(stream(model, prompts[0], 20, seed=7, **kw)) == a[0]


def test_sample_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(500, 1)
    gens = [torch.Generator().manual_seed(i) for i in range(500)]
    assert set(sample(logits, 1.0, top_k=2, generators=gens).tolist()) == {3, 4}
    probs = logits[0].softmax(-1)  # 0.64, 0.23, ...: top_p 0.7 keeps the two best
    assert probs[-1] < 0.7 < probs[-2:].sum()
    assert set(sample(logits, 1.0, top_p=0.7, generators=gens).tolist()) == {3, 4}
    assert set(sample(logits, 1.0, top_p=0.5, generators=gens).tolist()) == {4}
    assert sample(logits[:1], 0.0).item() == 4
    with pytest.raises(ValueError, match="top_p"):
        sample(logits, 1.0, top_p=0.0)


def test_bad_requests():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 9999]], 4)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[1, 2]], 5000)
    with pytest.raises(ValueError, match="padding_side"):
        generate(model, [[1, 2]], 4, padding_side="middle")
    assert generate(model, [[3, 4]], 0) == [[]]
