"""`vit_digits`: a small Vision Transformer for 3x32x32 inputs, written like timm's.

Each block is pre-norm with two residual branches,
`x = x + drop_path1(ls1(attn(norm1(x))))` then `x = x + drop_path2(ls2(mlp(norm2(x))))`,
and its children carry timm's names (norm1, attn with qkv and proj, ls1, drop_path1,
norm2, mlp with fc1 and fc2, ls2, drop_path2), so what is found and removed here is
what is found and removed in a timm ViT or DeiT. Written here rather than built with
timm because timm is an optional dependency and the zoo must work without it.

Patch 4 (64 tokens) plus a class token, width 64, 12 blocks of 4 heads, MLP ratio 4,
layer scale and drop path: about 0.6 M parameters (2.4 MB in fp32).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

WIDTH = 64
DEPTH = 12
HEADS = 4
PATCH = 4
MLP_RATIO = 4
LAYER_SCALE = 0.1  # initial gamma of each branch's layer scale (CaiT's small initial scale)
DROP_PATH = 0.1  # stochastic depth rate of the last block (linear in depth from 0); identity in eval


class PatchEmbed(nn.Module):
    """Non-overlapping `patch` x `patch` patches projected to `dim`: B x C x H x W -> B x tokens x dim."""

    def __init__(self, patch: int, channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention: one qkv Linear, scaled dot-product attention, an output Linear. The head count
    and head size are the module's own (as in timm), not read from the input's width, so whole heads can be
    dropped (graph/heads.py)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(*qkv.unbind(0))
        return self.proj(x.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """x * gamma, one learned scale per channel (Touvron et al. 2021, CaiT)."""

    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drops the whole branch of a sample with probability p while training; identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """A pre-norm transformer block: an attention branch and an MLP branch, each added to its input."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int, layer_scale: float | None, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class VisionTransformer(nn.Module):
    """Patch embedding, class token and learned position embedding, `depth` blocks, final norm, Linear head
    on the class token. Input B x 3 x `image` x `image`, output B x `num_classes` logits."""

    def __init__(self, num_classes: int = 10, image: int = 32, patch: int = PATCH, dim: int = WIDTH,
                 depth: int = DEPTH, heads: int = HEADS, mlp_ratio: int = MLP_RATIO,
                 layer_scale: float | None = LAYER_SCALE, drop_path: float = DROP_PATH) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.patch_embed = PatchEmbed(patch, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, layer_scale, r) for r in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def _init_weights(m: nn.Module) -> None:
    """timm's ViT initialisation: truncated normal (std 0.02) Linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def vit_digits(num_classes: int = 10) -> VisionTransformer:
    """The zoo's `vit_digits` architecture (untrained)."""
    return VisionTransformer(num_classes)
