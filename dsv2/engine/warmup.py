"""Warm-up: the kinds of steps a server runs, compiled and captured before its first request.

Compilation happens at the first step of each new kind of shape (a decode batch of one row, of a
few, of many; a prefill of one row or several, over fresh or cached pages; the MoE path each token
count takes) and capture at each new bucketed shape. Left to live traffic, that first minute or two
per kind lands on the requests that meet it: under a burst of requests, one after another. So the
server runs through them on its own first, with real requests on the real paths: every decode
batch size that has a graph, and a prompt longer than one step's token budget (a fresh chunk, then
one over cached pages). Afterwards the cache is all free and the prefix cache forgotten.
"""

from __future__ import annotations

import itertools
import time

from .params import SamplingParams


def warmup(engine, batch_sizes: list[int] | None = None) -> dict:
    """Run `engine` (an idle LLMEngine) through its step kinds; return what was run and how long."""
    if engine.has_unfinished_requests():
        raise RuntimeError("warm-up needs an idle engine")
    start = time.perf_counter()
    vocab = engine.model.config.vocab_size
    # each warm-up sequence fits one block: a 2-token prompt and 4 tokens
    capacity = min(engine.blocks.num_blocks, engine.cfg.max_num_seqs)
    sizes = [s for s in (batch_sizes or engine.runner.graph_sizes) if s <= capacity]
    ids = itertools.count()
    # 4 tokens: whatever the prefill's split over steps, the last decodes run the whole batch
    params = SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)

    def run(prompts: list[list[int]], params: SamplingParams) -> None:
        for prompt in prompts:
            engine.add_request(f"warmup-{next(ids)}", prompt, params)
        while engine.has_unfinished_requests():
            engine.step()

    for size in sizes:
        run([[(7 * i + k) % vocab for k in range(2)] for i in range(size)], params)
    long_prompt = min(engine.max_model_len - 1, engine.cfg.max_num_batched_tokens + engine.cfg.block_size)
    blocks_needed = engine.blocks.blocks_needed(long_prompt + 1)
    if engine.cfg.max_num_batched_tokens < long_prompt and blocks_needed <= engine.blocks.num_blocks:
        run([[t % vocab for t in range(long_prompt)]], SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0))
    else:
        long_prompt = 0
    engine.blocks.reset_prefix_cache()
    engine.scheduler.num_preemptions = 0
    return {"batch_sizes": sizes, "long_prompt": long_prompt, "seconds": time.perf_counter() - start}
