from .attention import MLA
from .cache import LatentCache
from .moe import MLP, Experts, Gate, MoE, RouterOutput, TokenDropping
from .norm import RMSNorm
from .rope import RotaryEmbedding, apply_rope
from .transformer import Block, ModelOutput, Transformer

__all__ = [
    "MLA", "LatentCache", "MLP", "Experts", "Gate", "MoE", "RouterOutput", "TokenDropping", "RMSNorm",
    "RotaryEmbedding", "apply_rope", "Block", "ModelOutput", "Transformer",
]
