"""ModelConfig: the released DeepSeek-V2 config.json as one dataclass.

Field names are the checkpoint's, so a config.json reads in and writes out unchanged. RoPE settings
come in two spellings: the released `rope_theta` + `rope_scaling: {type: yarn, ...}` and the
`rope_parameters: {rope_type, rope_theta, ...}` that transformers 5.x writes; both read into
`rope_theta` + `RopeScaling`, and `to_hf` writes the released spelling, which both readers accept.

`attention_type: "mha"` is the paper's dense baseline, DeepSeek LLM (LLaMA's architecture): its
config.json is LLaMA's (`model_type: llama`), read and written in that spelling; with fewer
`num_key_value_heads` than heads it is grouped-query attention (1: multi-query), as LLaMA has it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config that is malformed or inconsistent; the message names the field."""


TOPK_METHODS = ("greedy", "group_limited_greedy")
ROPE_TYPES = ("yarn", "linear")  # linear: position interpolation (positions / factor), the ablation of YaRN
ATTENTION_TYPES = ("mla", "mha")


@dataclass(frozen=True)
class RopeScaling:
    """YaRN settings of the released models (applied to the decoupled rope dims only); with type
    "linear", plain position interpolation by `factor` (no ramp, no attention temperature)."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.707
    mscale_all_dim: float = 0.707
    type: str = "yarn"


# Fields every config must state: there is no sensible default for a model's shape.
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
# ... and MLA's own widths, which MHA derives from the heads
MLA_REQUIRED = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# What LLaMA's config.json holds: an MHA config writes these and nothing MLA or MoE
LLAMA_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_theta", "max_position_embeddings",
    "attention_bias", "attention_dropout", "tie_word_embeddings", "initializer_range", "bos_token_id",
    "eos_token_id", "pad_token_id", "torch_dtype", "use_cache", "pretraining_tp",
)


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int | None = None
    qk_rope_head_dim: int | None = None
    v_head_dim: int | None = None
    # "mla", or "mha" (DeepSeek LLM's dense LLaMA attention). MHA in MLA's terms, so RoPE, the
    # softmax scale and the caches need no second code path: the whole head rotates
    # (qk_rope_head_dim = v_head_dim = hidden_size / heads, derived, qk_nope_head_dim = 0) and
    # there is no latent (kv_lora_rank and q_lora_rank null)
    attention_type: str = "mla"
    # LLaMA's field: under "mha", fewer key/value heads than query heads is grouped-query attention
    # (GQA; 1 is multi-query, MQA), query head h reading key/value head h // (heads / kv heads). MLA
    # derives every head's key and value from its latent: there it is only checked to divide the heads
    num_key_value_heads: int | None = None
    q_lora_rank: int | None = None
    # DeepSeekMoE; n_routed_experts None makes every FFN dense
    moe_intermediate_size: int = 1408
    n_shared_experts: int | None = None
    n_routed_experts: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    ep_size: int = 1
    # the rest of the block
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    use_cache: bool = True
    pretraining_tp: int = 1
    # keys of a config.json this class does not model (auto_map, quantization_config, ...):
    # carried so that to_hf(from_hf(d)) keeps them
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = _read_rope_scaling(self.rope_scaling)
        mha_shape = _positive_int(self.hidden_size) and _positive_int(self.num_attention_heads)
        if self.attention_type == "mha" and mha_shape:
            # always re-derived, so that replace(hidden_size=...) cannot leave stale head widths
            head_dim = self.hidden_size // self.num_attention_heads
            self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = 0, head_dim, head_dim
        self.validate()

    # --- derived sizes -------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(d_h + d_h^R), times mscale^2 under YaRN (the released models' attention scale)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling
        if rs is not None and rs.mscale_all_dim:
            m = yarn_mscale(rs.factor, rs.mscale_all_dim)
            scale *= m * m
        return scale

    def cache_widths(self) -> tuple[int, int]:
        """The two parts of a token's cache row per layer: MLA's (c_kv, k_rope), (d_c, d_h^R) = (512, 64)
        for the released models, or MHA's (k, v) of every key/value head, (n_kv d_h, n_kv d_h): n_h of
        them for plain MHA, fewer under GQA, one under MQA."""
        if self.attention_type == "mha":
            width = self.num_key_value_heads * self.qk_rope_head_dim
            return width, width
        return self.kv_lora_rank, self.qk_rope_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return (
            self.n_routed_experts is not None
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    # --- validation ----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, name: str, why: str) -> None:
            if not cond:
                raise ConfigError(f"config field {name!r} = {getattr(self, name, None)!r}: {why}")

        need(self.attention_type in ATTENTION_TYPES, "attention_type", f"expected one of {ATTENTION_TYPES}")
        mha = self.attention_type == "mha"
        shape = REQUIRED + (() if mha else MLA_REQUIRED)
        for name in shape + ("num_key_value_heads", "moe_intermediate_size", "max_position_embeddings"):
            need(_positive_int(getattr(self, name)), name, "must be a positive integer")
        need(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
             f"must divide hidden_size ({self.hidden_size})")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads ({self.num_attention_heads})" + (
                 ": each group of query heads shares one key/value head (1 is MQA, "
                 f"{self.num_attention_heads} plain MHA)" if mha else ""))
        if mha:
            for name in ("kv_lora_rank", "q_lora_rank", "n_routed_experts"):
                need(getattr(self, name) is None, name, "must be null for attention_type 'mha' "
                     "(LLaMA's dense architecture: no latents, no experts)")
            need(self.rope_scaling is None, "rope_scaling", "must be null for attention_type 'mha' "
                 "(YaRN is implemented as DeepSeek-V2 applies it to MLA)")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even (rope rotates pairs)")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", "must be null or a positive integer")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' (SwiGLU experts) is supported")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "must be positive")
        need(self.rope_theta > 0, "rope_theta", "must be positive")
        need(isinstance(self.first_k_dense_replace, int) and self.first_k_dense_replace >= 0,
             "first_k_dense_replace", "must be a non-negative integer")
        need(isinstance(self.moe_layer_freq, int) and self.moe_layer_freq >= 1, "moe_layer_freq",
             "must be a positive integer")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if rs.type not in ROPE_TYPES:
                raise ConfigError(f"config field 'rope_scaling.type' = {rs.type!r}: expected one of {ROPE_TYPES}")
            if not rs.factor >= 1.0:
                raise ConfigError(f"config field 'rope_scaling.factor' = {rs.factor!r}: must be >= 1")
        if self.n_routed_experts is None:
            return
        need(isinstance(self.n_routed_experts, int) and self.n_routed_experts > 0, "n_routed_experts",
             "must be null (dense model) or a positive integer")
        need(isinstance(self.num_experts_per_tok, int) and 0 < self.num_experts_per_tok <= self.n_routed_experts,
             "num_experts_per_tok", f"must be in 1..n_routed_experts ({self.n_routed_experts})")
        need(self.n_shared_experts is None or (isinstance(self.n_shared_experts, int) and self.n_shared_experts >= 0),
             "n_shared_experts", "must be null or a non-negative integer")
        need(self.topk_method in TOPK_METHODS, "topk_method", f"expected one of {TOPK_METHODS}")
        need(self.scoring_func == "softmax", "scoring_func", "only 'softmax' gating is supported (DeepSeek-V2)")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "must be positive")
        if self.topk_method == "group_limited_greedy":
            need(isinstance(self.n_group, int) and self.n_group > 0 and self.n_routed_experts % self.n_group == 0,
                 "n_group", f"must be a positive divisor of n_routed_experts ({self.n_routed_experts})")
            need(isinstance(self.topk_group, int) and 0 < self.topk_group <= self.n_group, "topk_group",
                 f"must be in 1..n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            need(self.num_experts_per_tok <= self.topk_group * per_group, "num_experts_per_tok",
                 f"must be <= topk_group x experts per group ({self.topk_group * per_group})")
        if self.n_group is not None:
            need(isinstance(self.n_group, int) and self.n_group > 0 and self.n_routed_experts % self.n_group == 0,
                 "n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
            if self.topk_group is not None:
                need(isinstance(self.topk_group, int) and 0 < self.topk_group <= self.n_group, "topk_group",
                     f"must be in 1..n_group ({self.n_group})")

    # --- HF json --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | Path | dict) -> "ModelConfig":
        """Read a config.json (a directory holding one, the file, or its parsed dict)."""
        if isinstance(source, dict):
            d = dict(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                d = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{path} must hold a JSON object")
        return cls._from_dict(d)

    @classmethod
    def _from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        if d.pop("model_type", None) == "llama":  # DeepSeek LLM 7B/67B
            d.setdefault("attention_type", "mha")
        d.pop("architectures", None)
        d.pop("transformers_version", None)
        if "dtype" in d and "torch_dtype" not in d:  # transformers 5 renamed it
            d["torch_dtype"] = d.pop("dtype")
        d.pop("dtype", None)
        # transformers 5 writes these as derived values; they are properties here
        derived = {k: d.pop(k) for k in ("qk_head_dim", "head_dim", "num_experts") if k in d}
        params = d.pop("rope_parameters", None)
        if params is not None:
            if not isinstance(params, dict):
                raise ConfigError("config field 'rope_parameters' must be an object")
            params = dict(params)
            if "rope_theta" in params:
                d.setdefault("rope_theta", params.pop("rope_theta"))
            kind = params.get("rope_type", params.get("type", "default"))
            if kind != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = params
        rs = d.get("rope_scaling")
        if rs is not None and not isinstance(rs, (dict, RopeScaling)):
            raise ConfigError("config field 'rope_scaling' must be an object or null")
        if isinstance(rs, dict):
            d["rope_scaling"] = _read_rope_scaling(rs)
        names = {f.name for f in dataclasses.fields(cls)}
        required = REQUIRED + (MLA_REQUIRED if d.get("attention_type", "mla") == "mla" else ())
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ConfigError(f"config is missing required field(s): {', '.join(missing)}")
        extra = dict(d.pop("extra", {}) or {})
        extra.update({k: d.pop(k) for k in list(d) if k not in names})
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if isinstance(d.get(key), list):  # transformers allows lists; keep the first, carry all
                extra[f"{key}_list"] = d[key]
                d[key] = d[key][0]
        if extra.get("mlp_bias"):
            raise ConfigError("config field 'mlp_bias' = True: MLP biases are not supported")
        config = cls(**d, extra=extra)
        head_dim = derived.get("head_dim")
        if config.attention_type == "mha" and head_dim is not None and head_dim != config.qk_rope_head_dim:
            raise ConfigError(f"config field 'head_dim' = {head_dim!r}: attention_type 'mha' needs "
                              f"hidden_size / num_attention_heads ({config.qk_rope_head_dim})")
        return config

    def to_hf(self) -> dict:
        if self.attention_type == "mha":  # LLaMA's config.json: transformers loads it as LlamaForCausalLM
            d: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
            names = LLAMA_FIELDS
        else:
            d = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2"}
            names = tuple(f.name for f in dataclasses.fields(self)
                          if f.name not in ("extra", "rope_scaling", "attention_type"))
        for name in names:
            d[name] = getattr(self, name)
        rs = self.rope_scaling
        d["rope_scaling"] = (None if rs is None else {"type": "linear", "factor": rs.factor} if rs.type == "linear"
                             else dataclasses.asdict(rs))
        for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if f"{key}_list" in self.extra:
                d[key] = self.extra[f"{key}_list"]
        d.update({k: v for k, v in self.extra.items() if not k.endswith("_id_list")})
        return dict(sorted(d.items()))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        path.write_text(json.dumps(self.to_hf(), indent=2) + "\n")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _read_rope_scaling(d: dict) -> RopeScaling:
    d = dict(d)
    kind = d.pop("type", None) or d.pop("rope_type", None)
    d.pop("rope_type", None)
    d.pop("rope_theta", None)
    if kind is None:
        raise ConfigError("config field 'rope_scaling' has no 'type'")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"config field 'rope_scaling.type' = {kind!r}: expected one of {ROPE_TYPES}")
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"config field 'rope_scaling' has unknown key(s): {', '.join(unknown)}")
    if d.get("factor") is None:
        raise ConfigError(f"config field 'rope_scaling.factor' is required for {kind}")
    # transformers 5 fills unset beta/mscale keys with null; null means the YaRN default
    d = {k: v for k, v in d.items() if v is not None}
    if kind == "linear":  # the factor alone: no attention temperature
        d = {"factor": d["factor"], "mscale": 0.0, "mscale_all_dim": 0.0}
    return RopeScaling(type=kind, **d)


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(s) + 1 (1 for s <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


_LITE = dict(
    vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
    n_routed_experts=64, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
    kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
    scoring_func="softmax", aux_loss_alpha=0.001, seq_aux=True, hidden_act="silu", rms_norm_eps=1e-6,
    rope_theta=10000.0, max_position_embeddings=163840,
    rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32,
                      beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
    tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001, attention_bias=False,
    torch_dtype="bfloat16", initializer_range=0.02,
)
_V2 = dict(
    _LITE, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
    num_attention_heads=128, num_key_value_heads=128, n_routed_experts=160, q_lora_rank=1536,
    topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0,
    aux_loss_alpha=0.003,
)
# Small research sizes with the full architecture (q compression, shared + routed experts,
# group-limited routing, YaRN), for tests, the bundled model and training benchmarks.
_TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=160, moe_intermediate_size=32,
    num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
    num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, topk_method="group_limited_greedy",
    n_group=4, topk_group=2, routed_scaling_factor=2.0, max_position_embeddings=1024,
    rope_scaling=dict(type="yarn", factor=4, original_max_position_embeddings=256, beta_fast=32,
                      beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
    bos_token_id=0, eos_token_id=1, initializer_range=0.006, torch_dtype="float32",
)
_SMALL = dict(  # ~ the size of the bundled model: tens of millions of parameters
    _TINY, vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
    num_hidden_layers=6, num_attention_heads=8, n_shared_experts=1, n_routed_experts=16,
    num_experts_per_tok=4, kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, n_group=4, topk_group=2, routed_scaling_factor=1.0, max_position_embeddings=4096,
    rope_scaling=None, torch_dtype="bfloat16",
)
_MOE_1B = dict(  # ~1B total parameters: the training benchmark's size
    _LITE, vocab_size=32768, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512,
    num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
    n_routed_experts=64, num_experts_per_tok=6, kv_lora_rank=256, q_lora_rank=None,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, max_position_embeddings=4096,
    rope_scaling=None, bos_token_id=0, eos_token_id=1,
)
_LITE_1B = dict(  # ~1B total with V2-Lite's widths and head dims: fewer layers and experts
    _LITE, vocab_size=32768, num_hidden_layers=8, n_routed_experts=32, num_experts_per_tok=4,
    moe_intermediate_size=704, intermediate_size=5632, max_position_embeddings=4096, rope_scaling=None,
    bos_token_id=0, eos_token_id=1,
)
# DeepSeek LLM 7B: dense MHA in LLaMA's architecture, the shape of the paper's dense baselines, so
# the engine can compare MLA's and MHA's generation throughput on one code path. num_key_value_heads
# is left to default to the heads (as released: 32), so preset(..., num_attention_heads=n) stays MHA
_LLM_7B = dict(
    attention_type="mha", vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=30,
    num_attention_heads=32, hidden_act="silu", rms_norm_eps=1e-6, rope_theta=10000.0,
    rope_scaling=None, max_position_embeddings=4096, attention_bias=False, tie_word_embeddings=False,
    bos_token_id=100000, eos_token_id=100001, initializer_range=0.02, torch_dtype="bfloat16",
)
_TINY_MHA = dict(  # dsv2-tiny's width and depth with dense MHA, for tests
    _LLM_7B, vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
    num_attention_heads=4, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
    initializer_range=0.006, torch_dtype="float32",
)
# ... and with its 4 heads sharing 2 key/value heads (GQA) or 1 (MQA): the paper's other baselines
_TINY_GQA = dict(_TINY_MHA, num_key_value_heads=2)
_TINY_MQA = dict(_TINY_MHA, num_key_value_heads=1)
PRESETS: dict[str, dict] = {
    "deepseek-v2": _V2,
    "deepseek-v2-lite": _LITE,
    "dsv2-tiny": _TINY,
    "dsv2-small": _SMALL,
    "dsv2-1b-moe": _MOE_1B,
    "dsv2-1b-lite": _LITE_1B,
    "deepseek-llm-7b": _LLM_7B,
    "dsv2-tiny-mha": _TINY_MHA,
    "dsv2-tiny-gqa": _TINY_GQA,
    "dsv2-tiny-mqa": _TINY_MQA,
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig._from_dict({**PRESETS[name], **overrides})
