from .attention import MLA
from .cache import LatentCache
from .mha import MHA
from .moe import MLP, Experts, Gate, MoE, RouterOutput, TokenDropping
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rope, apply_rope_rotate_half
from .transformer import Block, ModelOutput, Transformer

__all__ = [
    "MHA",
    "MLA",
    "MLP",
    "Block",
    "Experts",
    "Gate",
    "LatentCache",
    "MoE",
    "ModelOutput",
    "RMSNorm",
    "RotaryEmbedding",
    "RouterOutput",
    "TokenDropping",
    "Transformer",
    "apply_rope",
    "apply_rope_rotate_half",
]
