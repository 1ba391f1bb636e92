"""Random residual networks, for checking unit finding, surgery, folding and export on many architectures.

`random_net(seed)` builds a small image classifier from a seeded draw of block shapes:
identity and projection shortcuts (1x1 conv, avgpool + conv, conv + BN), post- and
pre-activation blocks, ReLU/ReLU6/SiLU/Hardswish/GELU, squeeze-excite inside the branch,
additions written as `x + y`, `torch.add` or in-place `+=`, nested Sequentials, blocks
with two residual additions, stochastic-depth wrappers, odd channel counts and strides.

`random_net(seed, families=FAMILIES)` also inserts, between those blocks, blocks of two
more families, drawn from a second stream of the seed (so the blocks above are drawn
exactly as with the default `families=("conv",)`):

- transformer: pre-norm blocks with two residual branches, `x + attn(norm1(x))` then
  `x + mlp(norm2(x))`, each with optional layer scale and drop path, on tokens
  (N x HW x C between flatten and reshape, nn.LayerNorm over channels, Linear layers, an
  optional position embedding) or on the map (LayerNorm over the channels of
  N x C x H x W, 1x1 convolutions); attention by F.scaled_dot_product_attention or by
  an explicit softmax; one to four heads; a fused attention on tokens keeps its head count
  and head size as timm's does (its heads slim whole), the others derive the head size
  from the input width (their heads cannot slim: refused);
- split_concat: YOLOv8's C2f (`cv1(x).chunk(2, 1)` or `.split`, a ModuleList of
  bottlenecks each appended to the list, `torch.cat`, `cv2`) and YOLOv5's C3 (two 1x1
  convolutions, a Sequential of bottlenecks on one, `torch.cat`, a 1x1); bottlenecks
  with or without their shortcut (without, they are not units).

Every residual branch can be muted (its block's `muted` set holds the branch: the branch
outputs zeros), which is what removing it as a unit must equal: the reference for
surgery. `muted_reference(model, names)` takes a block's path (every branch of the
block muted: the block removed), or `path/child` for one branch, the child being any
module of that branch (by convention the one with the most parameters: "attn", "mlp";
"branch" in the conv blocks; "cv2" in a bottleneck, whose path alone names it too).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU)
ADD_FORMS = ("plus", "torch_add", "inplace")


def _add(form: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if form == "torch_add":
        return torch.add(a, b)
    if form == "inplace":
        a += b
        return a
    return a + b


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, act: type[nn.Module]) -> None:
        super().__init__()
        hidden = max(1, channels // 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.act = act()
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.expand(self.act(self.reduce(self.pool(x)))))


class StochasticDepth(nn.Module):
    """Drops the whole branch with probability p while training; the identity in eval mode."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = (torch.rand(x.shape[0], *[1] * (x.dim() - 1)) >= self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class PostActBlock(nn.Module):
    """act(branch(x) + shortcut(x)) (or without the act)."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None, act: nn.Module | None, form: str,
                 drop: nn.Module | None) -> None:
        super().__init__()
        self.branch = branch
        if shortcut is not None:
            self.shortcut = shortcut
        self.drop = drop
        self.act = act
        self.form = form
        self.branches = {"branch": ("branch", "drop")}
        self.muted: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        if self.drop is not None:
            y = self.drop(y)
        if "branch" in self.muted:
            y = torch.zeros_like(y)
        s = self.shortcut(x) if hasattr(self, "shortcut") else x
        out = _add(self.form, y, s)  # in place: onto the branch's own output, as torchvision's blocks do
        return self.act(out) if self.act is not None else out


class PreActBlock(nn.Module):
    """shortcut(x) + branch(act(bn(x))): the pre-activation form (He et al. 2016)."""

    def __init__(self, channels: int, branch: nn.Module, act: type[nn.Module], form: str) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.act = act()
        self.branch = branch
        self.form = form
        self.branches = {"branch": ("bn", "act", "branch")}
        self.muted: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(self.act(self.bn(x)))
        if "branch" in self.muted:
            y = torch.zeros_like(y)
        return _add(self.form, y, x)


class TwoAddBlock(nn.Module):
    """Two residual additions in one forward: x + f(x), then + g(.). Not one removable unit as a whole
    module of the form act(branch(x) + shortcut(x)); two branches ("f", "g"), each mutable."""

    def __init__(self, channels: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                               act())
        self.g = nn.Sequential(nn.Conv2d(channels, channels, 1), act())
        self.branches = {"f": ("f",), "g": ("g",)}
        self.muted: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.f(x)
        x = x + (torch.zeros_like(y) if "f" in self.muted else y)
        y = self.g(x)
        return x + (torch.zeros_like(y) if "g" in self.muted else y)



class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an N x C x H x W map, as ConvNeXt's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class LayerScale(nn.Module):
    """x * gamma, one scale per channel (of tokens: the last axis; of a map: axis 1)."""

    def __init__(self, dim: int, layout: str) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(dim if layout == "tokens" else (dim, 1, 1)) * 0.9 + 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention over tokens (N x L x C; Linear qkv and proj) or over the positions of a map
    (N x C x H x W; 1x1 convolutions); F.scaled_dot_product_attention (`fused`) or an explicit softmax."""

    def __init__(self, dim: int, heads: int, layout: str, fused: bool) -> None:
        super().__init__()
        self.heads, self.layout, self.fused = heads, layout, fused
        linear = (lambda i, o: nn.Linear(i, o)) if layout == "tokens" else (lambda i, o: nn.Conv2d(i, o, 1))
        self.qkv = linear(dim, 3 * dim)
        self.proj = linear(dim, dim)
        self.head_dim = dim // heads if layout == "tokens" and fused else None  # timm's: its own head size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_dim is not None:
            n, length, _ = x.shape
            qkv = self.qkv(x).reshape(n, length, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
            out = nn.functional.scaled_dot_product_attention(*qkv.unbind(0))
            return self.proj(out.transpose(1, 2).reshape(n, length, self.heads * self.head_dim))
        if self.layout == "tokens":
            n, length, c = x.shape
            q, k, v = self.qkv(x).reshape(n, length, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            n, c, h, w = x.shape
            q, k, v = self.qkv(x).reshape(n, 3, self.heads, c // self.heads, h * w).permute(1, 0, 2, 4, 3).unbind(0)
        if self.fused:
            out = nn.functional.scaled_dot_product_attention(q, k, v)
        else:
            out = ((q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        if self.layout == "tokens":
            return self.proj(out.transpose(1, 2).reshape(n, length, c))
        return self.proj(out.permute(0, 1, 3, 2).reshape(n, c, h, w))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module], layout: str) -> None:
        super().__init__()
        linear = (lambda i, o: nn.Linear(i, o)) if layout == "tokens" else (lambda i, o: nn.Conv2d(i, o, 1))
        self.fc1 = linear(dim, hidden)
        self.act = act()
        self.fc2 = linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """A pre-norm transformer block, as timm writes it: x + drop_path1(ls1(attn(norm1(x)))), then
    + drop_path2(ls2(mlp(norm2(.)))); two residual branches, "attn" and "mlp", each mutable."""

    def __init__(self, dim: int, heads: int, hidden: int, act: type[nn.Module], layout: str, fused: bool,
                 layer_scale: bool, drop_path: bool, forms: tuple[str, str]) -> None:
        super().__init__()
        norm = nn.LayerNorm if layout == "tokens" else LayerNorm2d
        self.norm1 = norm(dim)
        self.attn = Attention(dim, heads, layout, fused)
        self.ls1 = LayerScale(dim, layout) if layer_scale else nn.Identity()
        self.drop_path1 = StochasticDepth(0.1) if drop_path else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, hidden, act, layout)
        self.ls2 = LayerScale(dim, layout) if layer_scale else nn.Identity()
        self.drop_path2 = StochasticDepth(0.1) if drop_path else nn.Identity()
        self.forms = forms
        self.branches = {"attn": ("norm1", "attn", "ls1", "drop_path1"), "mlp": ("norm2", "mlp", "ls2", "drop_path2")}
        self.muted: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = _add(self.forms[0], torch.zeros_like(y) if "attn" in self.muted else y, x)
        y = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return _add(self.forms[1], torch.zeros_like(y) if "mlp" in self.muted else y, x)


class ToTokens(nn.Module):
    """N x C x H x W -> N x HW x C, plus a learned position embedding (an addition that is not a residual
    branch) where drawn."""

    def __init__(self, dim: int, tokens: int, position: bool) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.2) if position else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)
        return x + self.pos_embed if self.pos_embed is not None else x


class ToMap(nn.Module):
    """N x HW x C -> N x C x H x W, for a square map of side `side`."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side = side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], self.side, self.side)


class ConvBnAct(nn.Module):
    """Conv2d (no bias), BatchNorm, activation: YOLO's Conv."""

    def __init__(self, cin: int, cout: int, k: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, 1, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """YOLO's bottleneck: cv2(cv1(x)), added to x when `shortcut` (then one mutable branch, "cv2")."""

    def __init__(self, channels: int, hidden: int, k1: int, act: type[nn.Module], shortcut: bool, form: str) -> None:
        super().__init__()
        self.cv1 = ConvBnAct(channels, hidden, k1, act)
        self.cv2 = ConvBnAct(hidden, channels, 3, act)
        self.add = shortcut
        self.form = form
        self.branches = {"cv2": ("cv1", "cv2")} if shortcut else {}
        self.muted: set[str] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        if not self.add:
            return y
        return _add(self.form, torch.zeros_like(y) if "cv2" in self.muted else y, x)  # in place: onto y, not x


class C2f(nn.Module):
    """YOLOv8's C2f: cv1, split in two halves, each bottleneck of `m` run on the last piece and appended,
    everything concatenated, cv2. Removing a bottleneck makes it the identity: the concat keeps its width."""

    def __init__(self, channels: int, hidden: int, bottlenecks: list[Bottleneck], act: type[nn.Module],
                 split: str) -> None:
        super().__init__()
        self.c = hidden
        self.split = split
        self.cv1 = ConvBnAct(channels, 2 * hidden, 1, act)
        self.cv2 = ConvBnAct((2 + len(bottlenecks)) * hidden, channels, 1, act)
        self.m = nn.ModuleList(bottlenecks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1) if self.split == "chunk" else self.cv1(x).split((self.c, self.c), 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class C3(nn.Module):
    """YOLOv5's C3: cv3(cat(m(cv1(x)), cv2(x))), `m` a Sequential of bottlenecks."""

    def __init__(self, channels: int, hidden: int, bottlenecks: list[Bottleneck], act: type[nn.Module]) -> None:
        super().__init__()
        self.cv1 = ConvBnAct(channels, hidden, 1, act)
        self.cv2 = ConvBnAct(channels, hidden, 1, act)
        self.cv3 = ConvBnAct(2 * hidden, channels, 1, act)
        self.m = nn.Sequential(*bottlenecks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))

def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]


def _branch(rng: random.Random, cin: int, cout: int, stride: int, act: type[nn.Module], se: bool) -> nn.Module:
    """A conv branch: basic (3x3, 3x3), bottleneck (1x1, 3x3, 1x1) or inverted residual (1x1, dw 3x3, 1x1)."""
    kind = rng.choice(("basic", "bottleneck", "inverted"))
    mid = rng.choice((3, 5, 7, 8, 11, 16)) if kind != "inverted" else cin * rng.choice((2, 3))
    if kind == "basic":
        layers = [*_conv_bn(cin, mid, 3, stride), act(), *_conv_bn(mid, cout, 3, 1)]
    elif kind == "bottleneck":
        layers = [*_conv_bn(cin, mid, 1, 1), act(), *_conv_bn(mid, mid, 3, stride), act(), *_conv_bn(mid, cout, 1, 1)]
    else:
        layers = [*_conv_bn(cin, mid, 1, 1), act(), *_conv_bn(mid, mid, 3, stride, groups=mid), act(),
                  *_conv_bn(mid, cout, 1, 1)]
    if se:
        layers.insert(len(layers) - 2, SqueezeExcite(mid, act))
    if rng.random() < 0.3:  # nested Sequentials
        half = len(layers) // 2
        return nn.Sequential(nn.Sequential(*layers[:half]), nn.Sequential(*layers[half:]))
    return nn.Sequential(*layers)


def _shortcut(rng: random.Random, cin: int, cout: int, stride: int) -> nn.Module:
    kind = rng.choice(("conv1x1", "pool_conv", "conv_bn"))
    if kind == "pool_conv" and stride > 1:
        return nn.Sequential(nn.AvgPool2d(stride, stride, ceil_mode=True), nn.Conv2d(cin, cout, 1, bias=False))
    if kind == "conv_bn":
        return nn.Sequential(*_conv_bn(cin, cout, 1, stride))
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


def _block(rng: random.Random, cin: int, stride: int, act: type[nn.Module], two_add: bool = True
           ) -> tuple[nn.Module, int]:
    """One random block and its output channels (`two_add`: a TwoAddBlock, not a unit, may be drawn)."""
    form = rng.choice(ADD_FORMS)
    shape = rng.random()
    if shape < 0.15 and stride == 1 and two_add:
        return TwoAddBlock(cin, act), cin
    if shape < 0.35 and stride == 1:
        return PreActBlock(cin, _branch(rng, cin, cin, 1, act, rng.random() < 0.3), act, form), cin
    cout = cin if stride == 1 and rng.random() < 0.6 else rng.choice((5, 7, 9, 12, 13, 16, 24))
    projection = _shortcut(rng, cin, cout, stride) if (stride != 1 or cout != cin) else None
    post = act() if rng.random() < 0.8 else None
    drop = StochasticDepth(0.1) if rng.random() < 0.2 else None
    return PostActBlock(_branch(rng, cin, cout, stride, act, rng.random() < 0.3), projection, post, form, drop), cout


def _heads(rng: random.Random, dim: int) -> int:
    return rng.choice([h for h in (1, 2, 3, 4) if dim % h == 0])


def _transformer(rng: random.Random, channels: int, side: int, act: type[nn.Module]) -> nn.Module:
    """A transformer block on the map, or a Sequential of one to three on tokens (flatten, blocks, reshape)."""
    layout = rng.choice(("tokens", "map"))

    def block() -> TransformerBlock:
        return TransformerBlock(channels, _heads(rng, channels), channels * rng.choice((1, 2, 4)),
                                rng.choice((nn.GELU, act)), layout, fused=rng.random() < 0.5,
                                layer_scale=rng.random() < 0.5, drop_path=rng.random() < 0.3,
                                forms=(rng.choice(ADD_FORMS), rng.choice(ADD_FORMS)))

    if layout == "map":
        return block()
    position = rng.random() < 0.5
    blocks = [block() for _ in range(rng.randint(1, 3))]
    return nn.Sequential(ToTokens(channels, side * side, position), *blocks, ToMap(side))


def _split_concat(rng: random.Random, channels: int, act: type[nn.Module]) -> nn.Module:
    """A C2f or a C3 of one to three bottlenecks, all with their shortcut or (one time in five) none."""
    hidden = max(2, round(channels * rng.choice((0.5, 0.75, 1.0))))
    shortcut = rng.random() < 0.8
    bottlenecks = [Bottleneck(hidden, max(2, round(hidden * rng.choice((0.5, 1.0)))), rng.choice((1, 3)), act,
                              shortcut, rng.choice(ADD_FORMS)) for _ in range(rng.randint(1, 3))]
    if rng.random() < 0.6:
        return C2f(channels, hidden, bottlenecks, act, rng.choice(("chunk", "split")))
    return C3(channels, hidden, bottlenecks, act)


EXTRA_FAMILIES = ("transformer", "split_concat")
INSERT_P = 0.35  # chance of a block of an extra family after the stem and after each conv block


def _inserted(rng: random.Random, extra: tuple[str, ...], channels: int, side: int, act: type[nn.Module]
              ) -> list[nn.Module]:
    """Nothing, or one block of a family in `extra` (channels and size kept), drawn from `rng`."""
    if not extra or rng.random() >= INSERT_P:
        return []
    family = rng.choice(extra)
    return [_transformer(rng, channels, side, act) if family == "transformer" else _split_concat(rng, channels, act)]


@dataclass
class RandomNet:
    """A random network, the seed that built it, and its input shape (C, H, W)."""

    model: nn.Module
    seed: int
    input_shape: tuple[int, int, int]


def random_net(seed: int, num_classes: int = 7, extra: tuple[str, ...] = ()) -> RandomNet:
    """A seeded random residual classifier with non-trivial BatchNorm and LayerNorm parameters, in eval mode.

    `extra`: families of blocks (EXTRA_FAMILIES) inserted between the conv blocks, drawn from a second
    stream of the seed, so the conv blocks of a seed are the same with or without them.
    """
    unknown = set(extra) - set(EXTRA_FAMILIES)
    if unknown:
        msg = f"unknown block families {sorted(unknown)}; known: {EXTRA_FAMILIES}"
        raise ValueError(msg)
    rng, more = random.Random(seed), random.Random(f"{seed}/extra")
    torch.manual_seed(seed)  # the layers' initial weights, drawn as they are built, come from the seed too
    act = rng.choice(ACTIVATIONS)
    size = rng.choice((12, 16, 19, 24))
    channels = rng.choice((3, 6, 8, 11))
    layers: list[nn.Module] = [*_conv_bn(3, channels, 3, 1), act()]
    side = size
    layers += _inserted(more, extra, channels, side, act)
    count, units = rng.randint(2, 6), 0
    for i in range(count):
        stride = 2 if rng.random() < 0.25 else 1
        block, channels = _block(rng, channels, stride, act, two_add=units > 0 or i < count - 1)
        units += not isinstance(block, TwoAddBlock)  # the last block is a unit if none before it was
        side = (side + 1) // 2 if stride == 2 else side  # every strided path rounds up (padding 1, ceil_mode)
        layers += [block, *_inserted(more, extra, channels, side, act)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    model = nn.Sequential(*layers)
    _randomise_norms(model, seed)
    return RandomNet(model.eval(), seed, (3, size, size))


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """BatchNorm statistics and affine parameters, then LayerNorm's, drawn from the seed."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)


def residual_branches(model: nn.Module) -> dict[str, list[str]]:
    """Every block with mutable residual branches: its path -> its branches as "path/child" (child: the
    branch's module with the most parameters, the first of a tie)."""
    return {name: [f"{name}/{key}" for key in m.branches] for name, m in model.named_modules()
            if getattr(m, "branches", None)}


def muted_reference(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of `model` with the residual branches `names` muted (output zeros): a block's path mutes
    every branch of the block, "path/child" the branch holding that child module."""
    import copy

    reference = copy.deepcopy(model)
    for name in names:
        path, _, child = name.partition("/")
        block = reference.get_submodule(path)
        branches = getattr(block, "branches", None)
        if not branches:
            msg = f"{path} ({type(block).__name__}) has no mutable residual branch"
            raise KeyError(msg)
        keys = list(branches) if not child else [k for k, children in branches.items() if child in children]
        if not keys:
            msg = f"{child!r} is in no residual branch of {path}: {branches}"
            raise KeyError(msg)
        block.muted.update(keys)
    return reference.eval()
