"""Attention heads as a width group: keep whole heads of a multi-head attention, drop the rest.

A head is a slice of the attention's inner width: head_dim rows of each of q, k and v
in the fused `qkv` Linear, and the same head_dim input columns of the output `proj`
Linear. Softmax runs within a head, so dropping heads computes exactly what zeroing
their columns of `proj` computes (the *muted reference*, graph/slim.py); the check
there verifies it on every slimmed block.

Torch-Pruning's dependency graph cannot do this: the reshape to (3, heads, head_dim)
couples qkv's rows to the head count, which it does not change, so its pruned
attention fails on its first input. Written here because no library slims heads of an
arbitrary attention module in place.

An attention module is recognised by its layout, not its class: a `qkv` Linear with
3 x A outputs, a `proj` Linear with A inputs, and a head count attribute (HEAD_COUNT_ATTRS)
dividing A. This is how timm's ViT, DeiT, Swin and this project's vit_digits hold their
heads. Its forward must read the head count and the head size from the module (not
from its input's width): one that does not fails the check and is refused with why.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

HEAD_COUNT_ATTRS = ("num_heads", "heads")  # where attention modules keep their head count
# attributes that hold the inner width (heads x head_dim) and follow the head count when heads are dropped
INNER_WIDTH_ATTRS = ("attn_dim",)


def _count_attr(module: nn.Module) -> str | None:
    return next((a for a in HEAD_COUNT_ATTRS if isinstance(getattr(module, a, None), int)), None)


def head_count(module: nn.Module) -> int | None:
    """The number of heads of `module` where it is an attention this surgery can slim by heads (None: not one)."""
    attr = _count_attr(module)
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if attr is None or not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        return None
    heads, inner = getattr(module, attr), proj.in_features
    if heads < 1 or inner % heads or qkv.out_features != 3 * inner:
        return None
    return heads


def head_dim(module: nn.Module) -> int:
    """The width of one head of an attention `head_count` recognises."""
    return module.proj.in_features // head_count(module)


def head_columns(module: nn.Module, heads: Iterable[int]) -> list[int]:
    """The input columns of `module.proj` that `heads` write (ascending)."""
    d = head_dim(module)
    return [h * d + i for h in sorted(heads) for i in range(d)]


def _qkv_rows(module: nn.Module, heads: Sequence[int]) -> list[int]:
    """The output rows of `module.qkv` that compute q, k and v of `heads`, in qkv's order."""
    inner = module.proj.in_features
    columns = head_columns(module, heads)
    return [part * inner + c for part in range(3) for c in columns]


def _per_head_parameters(module: nn.Module, heads: int) -> list[str]:
    """The module's own parameters with one entry per head along their last axis (Swin's relative position bias
    table), which keep the kept heads' entries."""
    return [name for name, p in module.named_parameters(recurse=False) if p.dim() >= 1 and p.shape[-1] == heads]


@torch.no_grad()
def slim_heads(module: nn.Module, keep: Sequence[int]) -> None:
    """Keep heads `keep` of attention `module` in place: qkv's rows, proj's columns and per-head parameters of
    those heads, and the head count (and inner width attributes) set to match."""
    heads = head_count(module)
    keep = sorted(keep)
    rows = torch.tensor(_qkv_rows(module, keep))
    columns = torch.tensor(head_columns(module, keep))
    qkv, proj = module.qkv, module.proj
    qkv.weight = nn.Parameter(qkv.weight[rows].clone())
    if qkv.bias is not None:
        qkv.bias = nn.Parameter(qkv.bias[rows].clone())
    qkv.out_features = len(rows)
    proj.weight = nn.Parameter(proj.weight[:, columns].clone())
    proj.in_features = len(columns)
    index = torch.tensor(keep)
    for name in _per_head_parameters(module, heads):
        setattr(module, name, nn.Parameter(getattr(module, name)[..., index].clone()))
    set_head_count(module, len(keep), len(columns))


def set_head_count(module: nn.Module, heads: int, inner: int) -> None:
    """Set attention `module`'s head count to `heads`, and its inner width attributes to `inner` (heads x head_dim),
    after its layers were cut to that many heads (here, or by Torch-Pruning's head pruning)."""
    setattr(module, _count_attr(module), heads)
    for attr in INNER_WIDTH_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, inner)


@torch.no_grad()
def mute_heads(module: nn.Module, dropped: Sequence[int]) -> None:
    """Zero the columns of `module.proj` that heads `dropped` write: what dropping them computes."""
    module.proj.weight[:, head_columns(module, dropped)] = 0


def attention_paths(block: nn.Module) -> dict[str, int]:
    """{path in `block`: head count} of every attention in `block` that slims by heads."""
    return {name: n for name, m in block.named_modules() if name and (n := head_count(m)) is not None}


def group_size(module: nn.Module) -> int | None:
    """A width group root's size: an attention's heads, a conv's or linear layer's output channels."""
    heads = head_count(module)
    if heads is not None:
        return heads
    return getattr(module, "out_channels", getattr(module, "out_features", None))


def head_sums(module: nn.Module, qkv_values: torch.Tensor, proj_values: torch.Tensor) -> torch.Tensor:
    """Per head of attention `module`: the sum of `qkv_values` (qkv.weight's shape) over the head's q, k and v
    rows plus the sum of `proj_values` (proj.weight's shape) over its columns, e.g. |w| for a magnitude."""
    heads, d = head_count(module), head_dim(module)
    rows = qkv_values.reshape(3, heads, d, -1).sum(dim=(0, 2, 3))
    return rows + proj_values.reshape(proj_values.shape[0], heads, d).sum(dim=(0, 2))


def attention_qkv_layers(block: nn.Module) -> dict[str, nn.Module]:
    """{path of its attention in `block`: qkv layer} of every module with a `qkv` and a `proj` conv or linear
    layer, slimmable by heads or not: their channel groups are never slimmed channel by channel (the head
    reshape couples them), and Torch-Pruning's index mapping through the reshape of a 1x1-convolution attention
    does not finish, so its dependency graph is never asked for their groups (graph/width.py)."""
    dense = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return {name: m.qkv for name, m in block.named_modules()
            if isinstance(getattr(m, "qkv", None), dense) and isinstance(getattr(m, "proj", None), dense)}
