"""Small torch models that tests/test_diff.py names as ``diff_models.py:Class`` targets.

Each pair differs the way real checkpoints differ: a fused attention projection against
separate q/k/v, a module renamed inside every block, a key two modules could claim.
"""

from __future__ import annotations

from torch import nn

D = 8


class Single(nn.Module):
    """One projection and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, 2)


class EncoderDecoder(nn.Module):
    """Two projections either of which could be Single's ``proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.proj = nn.Linear(D, D)
        self.decoder = nn.Module()
        self.decoder.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, 2)


class FusedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.out = nn.Linear(D, D)


class SplitAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(D, D)
        self.k_proj = nn.Linear(D, D)
        self.v_proj = nn.Linear(D, D)
        self.out = nn.Linear(D, D)


class Block(nn.Module):
    def __init__(self, attention: type[nn.Module], norm: str = "norm") -> None:
        super().__init__()
        self.attn = attention()
        self.add_module(norm, nn.LayerNorm(D))
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))


class FusedNet(nn.Module):
    """``blocks.N.attn.qkv``: q, k and v in one Linear (timm's layout)."""

    def __init__(self, depth: int = 3, num_classes: int = 4, norm: str = "norm") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(FusedAttention, norm) for _ in range(depth))
        self.head = nn.Linear(D, num_classes)


class SplitNet(nn.Module):
    """``layers.N.attn.{q,k,v}_proj``: separate projections (transformers' layout)."""

    def __init__(self, depth: int = 3, num_classes: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(SplitAttention) for _ in range(depth))
        self.head = nn.Linear(D, num_classes)


class RenamedAttentionNet(nn.Module):
    """SplitNet's blocks as ``layers.N.attention``: a rename inside every layer."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(SplitAttention) for _ in range(depth))
        for layer in self.layers:
            layer.attention = layer.attn
            del layer.attn
        self.head = nn.Linear(D, 4)


class SplitBlocksNet(nn.Module):
    """SplitNet with ``blocks`` for ``layers``."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(SplitAttention) for _ in range(depth))
        self.head = nn.Linear(D, 4)
