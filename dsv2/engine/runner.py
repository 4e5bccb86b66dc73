"""Runs the model over one scheduled batch: each row is one sequence's chunk (a prefill chunk or a
single decode token), its latents written into the sequence's pages and attention reading every
cached token of the sequence back from them.

The model is the same one training uses; only the cache differs. A batch with a prefill runs the
expanded form of MLA over the row's pages gathered into a dense view. A decode-only batch runs the
absorbed form: on CUDA through the Triton kernel straight over the pages, and there, for the batch
sizes it meets, as a captured CUDA graph, so a step costs one graph launch instead of a few thousand
kernel launches from Python.

The cache's last block is scratch: padding (positions past a row's chunk, and whole rows that
round a batch up to a captured size) writes there, so every write is unconditional (no boolean
indexing, no host sync) and no real page is touched. The block manager never hands it out.
"""

from __future__ import annotations

import functools
from array import array
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..model import Transformer
from ..model.kernels.fp8_gemm import fp8_supported
from ..model.kernels.small_linear import batched_small_linear
from ..model.moe import grouped_mm_supported
from ..model.rope import RotaryEmbedding
from .cache import PagedLatentCache
from .host import host_tensor, to_device
from .kernels import mla_prologue
from .kernels.mha_decode import mha_decode
from .kernels.mla_decode import mla_decode
from .sequence import PENDING, Sequence


# The decode kernels as custom ops (like the cache write, cache.store_rows): torch.compile treats
# them as opaque calls instead of tracing into the Triton launch, and fuses everything around them.
@torch.library.custom_op("dsv2::mla_decode", mutates_args=())
def mla_decode_op(q_latent: torch.Tensor, q_rope: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor,
                  context_lens: torch.Tensor, scale: float, kv_lora_rank: int,
                  w_uv: torch.Tensor | None) -> torch.Tensor:
    return mla_decode(q_latent, q_rope, kv, block_tables, context_lens, scale, kv_lora_rank, w_uv=w_uv)


@mla_decode_op.register_fake
def _(q_latent, q_rope, kv, block_tables, context_lens, scale, kv_lora_rank, w_uv):
    if w_uv is not None:
        return q_latent.new_empty(*q_latent.shape[:2], w_uv.shape[1], dtype=w_uv.dtype)
    return q_latent.new_empty(q_latent.shape, dtype=torch.float32)


@torch.library.custom_op("dsv2::mla_prologue", mutates_args=("cache",))
def mla_prologue_op(q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
                    attention_factor: float, norm_weight: torch.Tensor, eps: float, cache: torch.Tensor,
                    slots: torch.Tensor, kv_lora_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    return mla_prologue.launch(q, kv, positions, inv_freq, attention_factor, norm_weight, eps, cache, slots,
                               kv_lora_rank)


@mla_prologue_op.register_fake
def _(q, kv, positions, inv_freq, attention_factor, norm_weight, eps, cache, slots, kv_lora_rank):
    b, h, width = q.shape
    dr = kv.shape[-1] - kv_lora_rank
    return q.new_empty(h, b, width - dr), q.new_empty(b, h, dr)


@torch.library.custom_op("dsv2::mha_decode", mutates_args=())
def mha_decode_op(q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                  scale: float) -> torch.Tensor:
    return mha_decode(q, kv, block_tables, context_lens, scale)


@mha_decode_op.register_fake
def _(q, kv, block_tables, context_lens, scale):
    return q.new_empty(q.shape, dtype=torch.float32)


class PagedBatchCache:
    """A step's cache for the model (`begin`, then `layer(i)` for each block) over a PagedLatentCache."""

    def __init__(self, pages: PagedLatentCache, block_tables: torch.Tensor, context_lens: torch.Tensor,
                 decode_kernel: bool = False, fresh: bool = False, rotary: RotaryEmbedding | None = None):
        self.pages = pages
        self.block_tables = block_tables  # [B, max_blocks]
        self.context_lens = context_lens  # [B] tokens each row attends to after this step
        self.decode_kernel = decode_kernel  # the model then calls store + decode_attention
        # every row starts at position 0 and the pages store what they are given: attention runs
        # causally over this step's own latents (padding sits after each row's tokens, where no
        # real query looks)
        self.fresh = fresh
        self.slots: torch.Tensor | None = None
        # the model's RotaryEmbedding: MLA's decode prologue computes cos and sin from the positions
        self.rotary = rotary
        self.positions: torch.Tensor | None = None

    def begin(self, positions: torch.Tensor, valid: torch.Tensor, slots: torch.Tensor) -> torch.Tensor | None:
        self.slots = slots.flatten()
        self.positions = positions.flatten()
        if self.decode_kernel or self.fresh:
            return None  # the kernel bounds each row by context_lens itself; fresh rows are causal
        t = self.block_tables.shape[1] * self.pages.block_size
        key = torch.arange(t, device=positions.device)
        # a sequence's cached tokens sit at key index == position; causal within the row
        mask = (key[None, None, :] <= positions[:, :, None]) & (key[None, None, :] < self.context_lens[:, None, None])
        # padding queries see key 0 only, which every row has, so their rows stay finite
        mask = mask | (~valid[:, :, None] & (key[None, None, :] == 0))
        return mask[:, None]

    def layer(self, i: int) -> PagedLayer:
        return PagedLayer(self, i)


class PagedLayer:
    """Layer i's part of a step's PagedBatchCache (the model's LayerCache). It holds that layer's
    pages, not i: every layer's block then runs the same compiled program."""

    def __init__(self, step: PagedBatchCache, i: int):
        self.step = step
        self.decode_kernel = step.decode_kernel
        self.fields = step.pages.layer(i)

    def store(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        self.step.pages.write_fields(self.fields, self.step.slots, c_kv.flatten(0, 1), k_rope.flatten(0, 1))

    def write(self, c_kv: torch.Tensor, k_rope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.store(c_kv, k_rope)
        s = self.step
        if s.fresh:
            return c_kv, k_rope
        return s.pages.gather_fields(self.fields, s.block_tables, s.context_lens, c_kv.dtype)

    def decode_prologue(self, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """MLA's decode inputs (kernels/mla_prologue.py): q [B, H, nope + dr] and kv [B, r + dr] from
        the projections -> q_nope [H, B, nope], q_rope [B, H, dr], the latent normed by `norm`
        (kv_a_layernorm), rotated and stored in this step's slots. The kernel computes the rotation
        from the positions and the rotary module; `cos` and `sin` serve the reference path."""
        s = self.step
        r = s.pages.kv_lora_rank
        if mla_prologue.prologue_supported(q, kv, r) and s.rotary is not None:
            return mla_prologue_op(q, kv, s.positions, s.rotary.inv_freq, s.rotary.attention_factor,
                                   norm.weight, norm.eps, self.fields["kv"], s.slots, r)
        q_nope, q_rope, rows = mla_prologue.mla_prologue_reference(q, kv, cos, sin, norm.weight, norm.eps, r)
        s.pages.write_fields(self.fields, s.slots, rows[:, :r], rows[:, r:])
        return q_nope, q_rope

    def decode_attention(self, q_latent: torch.Tensor, q_rope: torch.Tensor, scale: float,
                         w_uv: torch.Tensor) -> torch.Tensor:
        """[B, H, v]: one decode token per row attending over the pages (the Triton kernel), its
        latent output per head taken through W^UV [H, v, r]. For one row the kernel's merge applies
        W^UV; more rows read it per head in one batched launch (heads as the batch, the fp32 latent
        outputs read as they are)."""
        s = self.step
        one = q_latent.shape[0] == 1
        o = mla_decode_op(q_latent, q_rope, self.fields["kv"], s.block_tables, s.context_lens, scale,
                          s.pages.kv_lora_rank, w_uv if one else None)
        return o if one else batched_small_linear(o.transpose(0, 1), w_uv).transpose(0, 1)

    def decode_attention_mha(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """[B, H, D] outputs of one decode token per row of a dense MHA model (q rotated), over the pages."""
        s = self.step
        return mha_decode_op(q, self.fields["kv"], s.block_tables, s.context_lens, scale)


@dataclass
class StepInputs:
    """One step's integer inputs, packed in one tensor so they cross to the GPU in one copy."""

    packed: torch.Tensor  # tokens, positions, slots [R*W each], tables [R*TW], context_lens, last [R each]
    rows: int
    width: int
    table_width: int
    # [2, P]: token places in `packed` filled on the device from the step in flight, and which of
    # its sampled tokens goes there (async scheduling)
    patch: torch.Tensor | None = None

    def fill_pending(self, packed: torch.Tensor, in_flight: torch.Tensor | None) -> None:
        if self.patch is not None:
            patch = self.patch.to(packed.device, non_blocking=True)
            packed.index_copy_(0, patch[0], in_flight[patch[1]])

    def views(self, packed: torch.Tensor) -> tuple[torch.Tensor, ...]:
        r, w, tw = self.rows, self.width, self.table_width
        tokens, positions, slots, tables, context, last = packed.split([r * w] * 3 + [r * tw, r, r])
        return (tokens.view(r, w), positions.view(r, w), slots.view(r, w), tables.view(r, tw), context, last)


def _token_ids(seq: Sequence, start: int, n: int) -> list[int]:
    # without building prompt + output (all_token_ids) for every decode token of every row
    p = len(seq.prompt_token_ids)
    if start >= p:
        return seq.output_token_ids[start - p:start - p + n]
    if start + n <= p:
        return seq.prompt_token_ids[start:start + n]
    return seq.all_token_ids[start:start + n]


_iota = array("q")


def _positions(start: int, n: int) -> array:
    """array('q', range(start, start + n)) as a slice of a shared one: a copy, not n Python steps."""
    global _iota
    if len(_iota) < start + n:
        _iota = array("q", range(max(2 * len(_iota), start + n, 4096)))
    return _iota[start:start + n]


def pack_inputs(items: list[tuple[Sequence, int]], rows: int, width: int, table_width: int,
                block_size: int, scratch: int, pending: dict[int, int] | None = None,
                device: torch.device = torch.device("cpu")) -> StepInputs:
    """Rows beyond len(items) and positions beyond a row's chunk are padding aimed at the scratch block.
    `pending` maps a sequence whose input token is still in flight to that token's row in the
    launched step's samples.

    Built as int64 arrays from slices and lists, with the slots computed by tensor ops from the
    positions and block tables: stepping through a 2048-token prefill token by token in Python
    (and torch.tensor of the list) took ~1.5 ms of host time before every such step."""
    tokens, positions, tables = array("q"), array("q"), array("q")
    context, last = array("q"), array("q")
    patch: list[tuple[int, int]] = []
    zeros = array("q", [0]) * width
    for row, (seq, n) in enumerate(items):
        start, table, pad = seq.num_computed_tokens, seq.block_table, width - n
        ids = _token_ids(seq, start, n)
        if ids[-1] == PENDING:  # only ever a decode row's one token
            patch.append((row * width, pending[seq.seq_id]))
            ids = [0]
        tokens += array("q", ids)
        positions += _positions(start, n)
        tables += array("q", table)
        tables += array("q", [scratch]) * (table_width - len(table))
        if pad:
            tokens += zeros[:pad]
            positions += zeros[:pad]
        context.append(start + n)
        last.append(n - 1)
    extra = rows - len(items)
    tokens += zeros * extra
    positions += zeros * extra
    tables += array("q", [scratch]) * (extra * table_width)
    context += array("q", [1]) * extra
    last += array("q", [0]) * extra
    tok, pos, tab, ctx, lst = (torch.frombuffer(a, dtype=torch.long) for a in (tokens, positions, tables, context, last))
    slots = tab.view(rows, table_width).gather(1, pos.view(rows, width) // block_size) * block_size
    slots += pos.view(rows, width) % block_size
    slots.masked_fill_(torch.arange(width) > lst[:, None], scratch * block_size)
    parts = (tok, pos, slots.flatten(), tab, ctx, lst)
    packed = torch.empty(sum(p.numel() for p in parts), dtype=torch.long, pin_memory=device.type == "cuda")
    torch.cat(parts, out=packed)
    patch = host_tensor([d for d, _ in patch] + [j for _, j in patch], device).view(2, -1) if patch else None
    return StepInputs(packed, rows, width, table_width, patch)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch sizes captured (a batch runs in the smallest that holds it), as vLLM picks."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_num_seqs] + list(range(16, max_num_seqs, 16))
    return sizes + [max_num_seqs]


@dataclass
class StepPlan:
    """What every rank of a tensor-parallel engine needs to run a step the leader scheduled: the
    packed inputs' layout and how the step runs (its graph's key, or none to run it uncaptured)."""

    rows: int  # real rows (the graph's batch may be larger)
    width: int
    table_width: int
    padded_rows: int
    decode: bool
    fresh: bool
    key: tuple | None = None
    every_position: bool = False

    @property
    def size(self) -> int:
        """Elements of the packed inputs."""
        return self.padded_rows * (3 * self.width + self.table_width + 2)

    def inputs(self, packed: torch.Tensor) -> StepInputs:
        """`packed` (this plan's inputs, on any device) with its layout."""
        return StepInputs(packed, self.padded_rows, self.width, self.table_width)


class StepGraph:
    """One step captured for a fixed shape: a decode batch size, or a prefill's rows and width
    (each row padded to the width), with its block-table width."""

    def __init__(self, step, inputs: StepInputs, device: torch.device, pool):
        self.step = step
        self.packed = inputs.packed.to(device)
        self.layout = inputs
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):  # compile Triton kernels and size workspaces off the graph
            for _ in range(2):
                step(*self.layout.views(self.packed))
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = step(*self.layout.views(self.packed))

    def replay(self, inputs: StepInputs, in_flight: torch.Tensor | None) -> torch.Tensor:
        self.packed.copy_(inputs.packed, non_blocking=True)
        inputs.fill_pending(self.packed, in_flight)
        self.graph.replay()
        return self.logits


class ModelRunner:
    def __init__(self, model: Transformer, pages: PagedLatentCache, max_num_seqs: int = 256,
                 max_model_len: int | None = None, use_kernel: bool = True, cuda_graphs: bool = True,
                 compile: bool = True, compile_prefill: bool = True, max_graph_tokens: int = 8192,
                 tp_group=None):
        """`tp_group`: the process group of a tensor-parallel model (model/tensor_parallel.py); its
        rank 0 (the leader) schedules and sends each step's plan and inputs to the others, which
        run it in `follow`."""
        self.model = model
        self.tp_group = tp_group
        self.pages = pages
        self.scratch = pages.num_blocks - 1
        self.device = next(model.parameters()).device
        bs = pages.block_size
        mc = model.config
        # the kernels read plain (unquantized) rows on CUDA: MLA's 576-wide latent (tl.dot wants
        # power-of-two dims >= 16), MHA's per-head slices (power-of-two head dims)
        dims = (pages.kv_lora_rank, pages.rope_dim) if mc.attention_type == "mla" else (mc.qk_rope_head_dim,)
        self.use_kernel = (use_kernel and self.device.type == "cuda" and pages.kv is not None
                           and all(d >= 16 and d & (d - 1) == 0 for d in (*dims, bs)))
        max_model_len = max_model_len or model.config.max_position_embeddings
        self.max_table_width = -(-max_model_len // bs)
        self.graph_sizes = graph_batch_sizes(max_num_seqs)
        self.use_graphs = cuda_graphs and self.use_kernel and _capturable(model)
        # a prefill with no cached tokens in any row attends causally over the latents it computed,
        # with no page gather and no mask, where those equal what the pages give back
        self.fresh_prefill = not pages.quantized and pages.kv.dtype == next(model.parameters()).dtype
        # a step mixing decodes and prefill chunks runs them as two forwards (`run`); data-parallel
        # attention needs one forward per step on every rank (engine/data_parallel.py)
        self.split_mixed = True
        # prefill graphs hold their activations in the graph pool: bounded by the tokens of a step
        self.max_graph_tokens = max_graph_tokens
        self.graphs: dict[tuple, StepGraph] = {}
        self._pool = None
        # Steps compiled on CUDA: a step is some hundred small kernels per layer (norms, rope,
        # routing, casts), and fused they cost a fraction of the GPU time. Then captured: launched
        # one by one from Python, even the compiled kernels of a 2048-token prefill kept the host
        # busy longer than the GPU (bench/RESULTS.md). Compiled block by block: the blocks of a
        # model are one program (each takes its layer's pages, not its index), so a new kind of
        # step compiles one dense and one MoE block instead of every layer unrolled. Captured at
        # each new bucketed shape.
        self.compiled = self.use_graphs and compile
        self.compile_prefill = self.compiled and compile_prefill
        if self.compiled:
            self._compile()

    def _compile(self, backend: str = "inductor") -> None:
        # each kind of step (decode or prefill, fresh or not, one row or many) is its own entry for
        # the one block program
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._compiled_embed = torch.compile(self._embed, dynamic=True, backend=backend)
        self._compiled_block = torch.compile(_block_stream, dynamic=True, backend=backend)
        self._compiled_logits = torch.compile(self.model.logits, dynamic=True, backend=backend)

    def _decode_step(self, *views: torch.Tensor) -> torch.Tensor:
        return self.forward(views, decode=True)

    def _prefill_step(self, *views: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        return self.forward(views, decode=False, fresh=fresh)

    def _embed(self, tokens, positions, slots, cache) -> tuple[torch.Tensor, ...]:
        valid = slots != self.scratch * self.pages.block_size
        return self.model.embed(tokens, positions, valid, cache, slots)

    def forward(self, views: tuple[torch.Tensor, ...], decode: bool, fresh: bool = False,
                every_position: bool = False) -> torch.Tensor:
        """The model's forward (Transformer.forward) over the pages, by its parts: compiled ones
        for the kinds of steps that are compiled."""
        tokens, positions, slots, tables, context, last = views
        cache = PagedBatchCache(self.pages, tables, context, decode and self.use_kernel, fresh, self.model.rotary)
        compiled = self.compiled and (decode or self.compile_prefill)
        embed, block, logits = ((self._compiled_embed, self._compiled_block, self._compiled_logits) if compiled
                                else (self._embed, _block_stream, self.model.logits))
        h, cos, sin, mask = embed(tokens, positions, slots, cache)
        for i, layer in enumerate(self.model.layers):
            h = block(layer, h, cos, sin, mask, cache.layer(i), decode)
        return logits(h, None if every_position else last)

    @torch.inference_mode()
    def run_every_position(self, items: list[tuple[Sequence, int]],
                           pending: tuple[torch.Tensor, dict[int, int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As `run`, and the logits at every position too, for prompt logprobs: ([B, V] at each
        row's last token, [B, W, V] where row i's first n_i positions are its chunk). One uncaptured
        prefill-form step over all the rows: such steps are for scoring, not for speed."""
        width, table_width = max(n for _, n in items), max(len(seq.block_table) for seq, _ in items)
        fresh = self.fresh_prefill and all(s.num_computed_tokens == 0 for s, _ in items)
        plan = StepPlan(len(items), width, table_width, len(items), False, fresh, every_position=True)
        views, packed = self._uncaptured_views(items, width, table_width, pending)
        self._lead(plan, packed)
        logits = self.forward(views, decode=False, fresh=fresh, every_position=True)
        return logits[torch.arange(len(items), device=logits.device), views[-1]], logits

    @torch.inference_mode()
    def run(self, items: list[tuple[Sequence, int]],
            pending: tuple[torch.Tensor, dict[int, int]] | None = None) -> torch.Tensor:
        """Compute each item's next tokens; return the logits [B, V] at each row's last token, in the
        model's dtype (a captured step's are its graph's output: read them before the next step).
        `pending`: the launched step's sampled tokens [S] on the device, and for each sequence
        (by seq_id) whose input token is among them, its row there.

        A step mixing single-token rows (decodes) with prefill chunks runs them as two batches:
        padded into one rectangle, every decode row would cost as much as the longest chunk."""
        single = [i for i, (_, n) in enumerate(items) if n == 1]
        if self.split_mixed and 0 < len(single) < len(items):
            chunks = [i for i, (_, n) in enumerate(items) if n > 1]
            logits = torch.empty(len(items), self.model.config.vocab_size, device=self.device,
                                 dtype=next(self.model.parameters()).dtype)
            for rows in (single, chunks):
                logits[to_device(rows, self.device)] = self._run([items[i] for i in rows], pending)
            return logits
        return self._run(items, pending)

    def _run(self, items: list[tuple[Sequence, int]], pending: tuple[torch.Tensor, dict[int, int]] | None) -> torch.Tensor:
        in_flight, rows_of = pending if pending is not None else (None, None)
        width = max(n for _, n in items)
        table_width = max(len(seq.block_table) for seq, _ in items)
        rows = len(items)
        decode = width == 1
        fresh = not decode and self.fresh_prefill and all(s.num_computed_tokens == 0 for s, _ in items)
        if self.use_graphs:
            size = next((s for s in self.graph_sizes if s >= rows), None)
            padded = 1 if decode else prefill_width(width)
            if size is not None and (decode or size * padded <= self.max_graph_tokens):
                # table widths in powers of two: the decode kernel's split count follows the width,
                # so a graph for the longest context allowed would split short contexts too thinly
                table_width = min(max(16, 1 << (table_width - 1).bit_length()),
                                  max(self.max_table_width, table_width))
                inputs = self._pack(items, size, padded, table_width, rows_of)
                plan = StepPlan(rows, padded, table_width, size, decode, fresh, key=(size, padded, table_width, fresh))
                if self.tp_group is None:
                    return self._graph(plan, inputs).replay(inputs, in_flight)[:rows]
                packed = inputs.packed.to(self.device, non_blocking=True)
                inputs.fill_pending(packed, in_flight)
                self._lead(plan, packed)
                return self._replay(plan, packed)
        views, packed = self._uncaptured_views(items, width, table_width, pending)
        self._lead(StepPlan(rows, width, table_width, rows, decode, fresh), packed)
        return self.forward(views, decode=decode, fresh=fresh)

    def _graph(self, plan: StepPlan, inputs: StepInputs) -> StepGraph:
        graph = self.graphs.get(plan.key)
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            step = self._decode_step if plan.decode else functools.partial(self._prefill_step, fresh=plan.fresh)
            graph = self.graphs[plan.key] = StepGraph(step, inputs, self.device, self._pool)
        return graph

    def _replay(self, plan: StepPlan, packed: torch.Tensor) -> torch.Tensor:
        """A captured step from inputs already on the device (tensor parallel: every rank's copy)."""
        graph = self.graphs.get(plan.key)
        if graph is None:  # captured from these inputs, in step with the other ranks
            graph = self._graph(plan, plan.inputs(packed.clone()))
        graph.packed.copy_(packed)
        graph.graph.replay()
        return graph.logits[:plan.rows]

    # --- tensor parallel: the leader's plans, followed by every other rank ------------------------
    def _lead(self, plan: StepPlan, packed: torch.Tensor) -> None:
        """Send a step's plan and its packed inputs (on the device) to the other ranks."""
        if self.tp_group is None:
            return
        dist.broadcast_object_list([plan], src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
        dist.broadcast(packed, src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)

    def stop_followers(self) -> None:
        """The leader's last word: every follower returns from `follow`."""
        if self.tp_group is not None:
            dist.broadcast_object_list([None], src=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)

    @torch.inference_mode()
    def follow(self) -> None:
        """A follower's life: run each step the leader plans, until it says stop."""
        src = dist.get_global_rank(self.tp_group, 0)
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=src, group=self.tp_group)
            plan: StepPlan | None = box[0]
            if plan is None:
                return
            packed = torch.empty(plan.size, dtype=torch.long, device=self.device)
            dist.broadcast(packed, src=src, group=self.tp_group)
            if plan.key is not None:
                self._replay(plan, packed)
            else:
                views = plan.inputs(packed).views(packed)
                self.forward(views, decode=plan.decode, fresh=plan.fresh, every_position=plan.every_position)

    def _uncaptured_views(self, items, width: int, table_width: int,
                          pending) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """A step's inputs on the device at its own shape, for a step run without a graph: the
        views the model takes, and the one tensor they are views of."""
        in_flight, rows_of = pending if pending is not None else (None, None)
        inputs = self._pack(items, len(items), width, table_width, rows_of)
        packed = inputs.packed.to(self.device, non_blocking=True)
        inputs.fill_pending(packed, in_flight)
        return inputs.views(packed), packed

    def _pack(self, items, rows: int, width: int, table_width: int, rows_of) -> StepInputs:
        return pack_inputs(items, rows, width, table_width, self.pages.block_size, self.scratch, rows_of, self.device)


def _block_stream(block: nn.Module, h, cos, sin, mask, cache, absorb: bool) -> torch.Tensor:
    """A block's output stream; its routing (for training's balance losses) is not needed here."""
    return block(h, cos, sin, mask, cache, absorb)[0]


def prefill_width(n: int) -> int:
    """The width a prefill of rows up to n tokens is captured at: the smallest power of two or
    1.5 x power of two that holds n (at least 16), so padding costs at most a third of a step."""
    p = 1 << max(4, (n - 1).bit_length())
    return p * 3 // 4 if p >= 32 and p * 3 // 4 >= n else p


def _capturable(model: Transformer) -> bool:
    """Graph capture needs a step without host syncs, which MoE layers have only on the grouped-GEMM
    paths: CUTLASS's for bf16 experts, the FP8 Triton kernel's for FP8 ones."""
    c = model.config
    p = next(model.parameters())
    moe = [layer.mlp.experts for layer in model.layers if layer.is_moe]
    if moe and moe[0].quantized:
        return fp8_supported(p.device)
    return not moe or grouped_mm_supported(p.device, p.dtype, c.hidden_size, c.moe_intermediate_size)
