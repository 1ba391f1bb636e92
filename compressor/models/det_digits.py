"""`det_digits`: a detector-shaped network with YOLOv8-style C2f stages and two heads at two scales.

Built by hand, no detector library: YOLOv8's blocks as its own source writes them
(Conv = conv-BN-SiLU; Bottleneck = `x + cv2(cv1(x))`; C2f = `cv1(x).chunk(2, 1)`, each
bottleneck of a ModuleList appended to the list, `torch.cat`, `cv2`), and a decoupled
head per scale (a box branch and a class branch, concatenated as YOLOv8's Detect does
while training).

Input B x 3 x 64 x 64 (compressor.data.canvas); output a tuple of two maps, one per
scale: B x (4 + classes + 1) x 8 x 8 (stride 8) and B x (4 + classes + 1) x 4 x 4
(stride 16). Channels 0-3 regress the box of the digit whose centre falls in the cell
(centre offset in the cell, log width and height in cells); the rest are class logits,
the last one "no digit here" (compressor.models.det_training decodes and trains them).
"""

from __future__ import annotations

import torch
from torch import nn

WIDTHS = (16, 32, 64, 128)  # stem, then the three C2f stages (strides 2, 4, 8, 16)
DEPTHS = (2, 3, 2)  # bottlenecks per C2f stage
HEAD_WIDTH = 32
BOX = 4  # box channels of each head's output
STRIDES = (8, 16)  # pixels per cell of the two heads


class Conv(nn.Module):
    """Conv2d (no bias), BatchNorm, SiLU: YOLO's basic layer."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 Convs, added to the input when `shortcut` (YOLOv8's Bottleneck with e = 1)."""

    def __init__(self, channels: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = Conv(channels, channels, 3)
        self.cv2 = Conv(channels, channels, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cv2(self.cv1(x)) if self.add else self.cv2(self.cv1(x))


class C2f(nn.Module):
    """CSP bottleneck with two convolutions (YOLOv8): split in two halves, run `n` bottlenecks on the
    second half one after another, concatenate both halves and every bottleneck's output, fuse with a 1x1."""

    def __init__(self, cin: int, cout: int, n: int, shortcut: bool = True) -> None:
        super().__init__()
        self.c = cout // 2
        self.cv1 = Conv(cin, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = list(self.cv1(x).chunk(2, 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class Head(nn.Module):
    """A decoupled head for one scale: box branch and class branch, concatenated (box first)."""

    def __init__(self, cin: int, outputs: int) -> None:
        super().__init__()
        self.box = nn.Sequential(Conv(cin, HEAD_WIDTH, 3), nn.Conv2d(HEAD_WIDTH, BOX, 1))
        self.cls = nn.Sequential(Conv(cin, HEAD_WIDTH, 3), nn.Conv2d(HEAD_WIDTH, outputs, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.box(x), self.cls(x)], 1)


class DigitDetector(nn.Module):
    """Stem (stride 2), three stages of a strided Conv and a C2f (strides 4, 8, 16), heads on the last two."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = WIDTHS,
                 depths: tuple[int, ...] = DEPTHS) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.stem = Conv(3, widths[0], 3, 2)
        self.stage1 = nn.Sequential(Conv(widths[0], widths[1], 3, 2), C2f(widths[1], widths[1], depths[0]))
        self.stage2 = nn.Sequential(Conv(widths[1], widths[2], 3, 2), C2f(widths[2], widths[2], depths[1]))
        self.stage3 = nn.Sequential(Conv(widths[2], widths[3], 3, 2), C2f(widths[3], widths[3], depths[2]))
        self.heads = nn.ModuleList([Head(widths[2], num_classes + 1), Head(widths[3], num_classes + 1)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p3 = self.stage2(self.stage1(self.stem(x)))
        p4 = self.stage3(p3)
        return self.heads[0](p3), self.heads[1](p4)


def det_digits(num_classes: int = 10) -> DigitDetector:
    """The zoo's `det_digits` architecture (untrained)."""
    return DigitDetector(num_classes)
