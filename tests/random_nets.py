"""Random residual networks, for checking unit finding, surgery, folding and export on many architectures.

`random_net(seed)` builds a small image classifier from a seeded draw of block shapes:
identity and projection shortcuts (1x1 conv, avgpool + conv, conv + BN), post- and
pre-activation blocks, ReLU/ReLU6/SiLU/Hardswish/GELU, squeeze-excite inside the branch,
additions written as `x + y`, `torch.add` or in-place `+=`, nested Sequentials, blocks
with two residual additions, stochastic-depth wrappers, odd channel counts and strides.

Every residual block can mute its branch (`muted = True`: the branch outputs zeros), which
is what removing the block as a unit must equal: the reference for surgery.
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
        keep = (torch.rand(x.shape[0], 1, 1, 1) >= self.p).to(x.dtype)
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
        self.muted = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        if self.drop is not None:
            y = self.drop(y)
        if self.muted:
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
        self.muted = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(self.act(self.bn(x)))
        if self.muted:
            y = torch.zeros_like(y)
        return _add(self.form, y, x)


class TwoAddBlock(nn.Module):
    """Two residual additions in one forward: x + f(x), then + g(.). Not one removable unit."""

    def __init__(self, channels: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                               act())
        self.g = nn.Sequential(nn.Conv2d(channels, channels, 1), act())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.f(x)
        return x + self.g(x)


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


@dataclass
class RandomNet:
    """A random network, the seed that built it, and its input shape (C, H, W)."""

    model: nn.Module
    seed: int
    input_shape: tuple[int, int, int]


def random_net(seed: int, num_classes: int = 7) -> RandomNet:
    """A seeded random residual classifier with non-trivial BatchNorm statistics, in eval mode."""
    rng = random.Random(seed)
    act = rng.choice(ACTIVATIONS)
    size = rng.choice((12, 16, 19, 24))
    channels = rng.choice((3, 6, 8, 11))
    layers: list[nn.Module] = [*_conv_bn(3, channels, 3, 1), act()]
    count, units = rng.randint(2, 6), 0
    for i in range(count):
        stride = 2 if rng.random() < 0.25 else 1
        block, channels = _block(rng, channels, stride, act, two_add=units > 0 or i < count - 1)
        units += not isinstance(block, TwoAddBlock)  # the last block is a unit if none before it was
        layers.append(block)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes)]
    torch.manual_seed(seed)
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return RandomNet(model.eval(), seed, (3, size, size))


def muted_reference(model: nn.Module, names: list[str]) -> nn.Module:
    """A copy of `model` whose blocks `names` output their shortcut alone (the branch muted)."""
    import copy

    reference = copy.deepcopy(model)
    for name in names:
        reference.get_submodule(name).muted = True
    return reference.eval()
