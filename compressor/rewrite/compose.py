"""Compose linear ops into one nn.Conv2d (DepthShrinker / LayerFolding merges, RepVGG branches).

A conv is a cross-correlation, y[o, i] = b[o] + sum_{c,u} W[o, c, u] * xpad[c, s*i + u]
(per spatial axis). A first conv (kernel k1, stride s1, padding p1) followed by a
second (k2, s2, p2) is one conv with kernel k1 + s1*(k2 - 1), stride s1*s2 and padding
p1 + s1*p2; its kernel is sum_{s1*u2 + u1 = t} W2[., ., u2] W1[., ., u1], its bias
b2 + sum W2 b1, and its output has the same size as the original's. Whether it equals
the original everywhere depends on the second conv's zero padding:

- exact (fp32 round-off, everywhere) when the padding is 0 (kxk -> 1x1, conv -> BN) or
  when the first conv maps the padded ring to zero by itself: no bias and p1 >= k1 - 1
  (an unbiased 1x1 before a padded kxk, BN -> conv with no shift);
- exact only away from the border otherwise: the original pads the intermediate map
  with zeros, the merged conv sees the first conv's response there (its bias, the input
  near the edge). `Merged.border` is the width in output pixels of the ring that may
  differ: ceil((ring already wrong + p2) / s2) per merge;
- refused (MergeRefused, with the reason): dilation or non-zero padding modes next to
  anything but a plain pointwise conv (1x1, stride 1, unpadded), channel counts that do
  not chain, Conv2d subclasses (their forward may differ), 'same' padding that is
  asymmetric, branches whose outputs do not align.

Groups always compose: the result has gcd(g1, g2) groups, dense when a pointwise conv
meets a depthwise one (pw -> dw -> pw is one dense kxk conv). Kernels are composed in
float64 and rounded once to the conv's dtype.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import skip_init

from compressor.errors import MergeRefused

# |merged - original| <= MERGE_RTOL * max|original| on the interior: kernels are composed in
# float64 and rounded once, so the merged conv differs from the chain only by fp32 summation
# order (~1e-7 relative on these sizes); a wrong kernel or offset is off by O(1).
MERGE_RTOL = 1e-5

Pair = tuple[int, int]


@dataclass(frozen=True)
class Merged:
    """One nn.Conv2d standing for a chain of linear ops.

    exact: equal to the chain everywhere (fp32 round-off); otherwise only on the interior.
    border: width in output pixels of the ring where it may differ (0 when exact).
    notes: why it is not exact, one line per cause.
    """

    conv: nn.Conv2d
    exact: bool = True
    border: int = 0
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Geometry:
    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int
    mode: str

    @property
    def pointwise(self) -> bool:
        """A 1x1 conv with stride 1, no padding, no dilation: a per-pixel channel mix."""
        return self.kernel == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and self.dilation == (1, 1)


def _geometry(conv: nn.Conv2d, role: str) -> _Geometry:
    if type(conv) is not nn.Conv2d:
        raise MergeRefused(f"{role} is {type(conv).__name__}, not a plain nn.Conv2d (its forward may differ)")
    kernel, dilation = tuple(conv.kernel_size), tuple(conv.dilation)
    padding = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = (0, 0)
        else:  # "same" (stride 1): total padding d*(k-1), split evenly only when it is even
            total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
            if any(t % 2 for t in total):
                raise MergeRefused(f"{role} pads 'same' asymmetrically (even kernel {kernel}); "
                                   "one nn.Conv2d cannot express the merge")
            padding = tuple(t // 2 for t in total)
    return _Geometry(kernel, tuple(conv.stride), tuple(padding), dilation, conv.groups, conv.padding_mode)


def _f64(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def _new_conv(weight: Tensor, bias: Tensor | None, in_channels: int, geo: _Geometry, like: Tensor) -> nn.Conv2d:
    """An eval-mode nn.Conv2d with `geo` holding `weight`/`bias`, in `like`'s dtype and device."""
    conv = skip_init(nn.Conv2d, in_channels, weight.shape[0], geo.kernel, geo.stride, geo.padding, geo.dilation,
                     geo.groups, bias is not None, geo.mode, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv.eval()


def as_merged(op: nn.Conv2d | Merged) -> Merged:
    """A conv as an exact Merged (the same module, not a copy)."""
    if isinstance(op, Merged):
        return op
    _geometry(op, "layer")
    return Merged(op)


def bn_as_conv(bn: nn.BatchNorm2d) -> nn.Conv2d:
    """An eval-mode BatchNorm2d as the depthwise 1x1 conv it computes: x * scale + shift per channel."""
    if type(bn) is not nn.BatchNorm2d:
        raise MergeRefused(f"{type(bn).__name__} is not an nn.BatchNorm2d")
    if bn.running_mean is None or bn.running_var is None:
        raise MergeRefused("BatchNorm2d without running statistics normalises by the batch: not a fixed linear map")
    scale = 1.0 / torch.sqrt(_f64(bn.running_var) + bn.eps)
    if bn.weight is not None:
        scale = scale * _f64(bn.weight)
    shift = -_f64(bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + _f64(bn.bias)
    c = bn.num_features
    geo = _Geometry((1, 1), (1, 1), (0, 0), (1, 1), c, "zeros")
    return _new_conv(scale.reshape(c, 1, 1, 1), shift, c, geo, bn.running_mean)


def identity_conv(channels: int, like: Tensor | None = None) -> nn.Conv2d:
    """The identity map as a depthwise 1x1 conv (weight 1, no bias)."""
    like = torch.zeros(()) if like is None else like
    geo = _Geometry((1, 1), (1, 1), (0, 0), (1, 1), channels, "zeros")
    return _new_conv(torch.ones(channels, 1, 1, 1, dtype=torch.float64), None, channels, geo, like)


def _regroup(w: Tensor, groups: int, target: int) -> Tensor:
    """Weight [O, C/groups, ...] as [O, C/target, ...] for `target` dividing `groups` (zeros between groups)."""
    r = groups // target
    if r == 1:
        return w
    out_channels, cin = w.shape[:2]
    blocks = w.reshape(target, r, out_channels // groups, cin, *w.shape[2:])
    dense = w.new_zeros(target, r, out_channels // groups, r, cin, *w.shape[2:])
    idx = torch.arange(r, device=w.device)
    dense[:, idx, :, idx] = blocks.transpose(0, 1)  # sub-group i of a merged group reads its own columns
    return dense.reshape(out_channels, r * cin, *w.shape[2:])


def _channel_product(a: Tensor, g2: int, b: Tensor, g1: int, target: int) -> Tensor:
    """sum_m a[t, o, m] b[m, c, ...] for grouped a [T, O, M/g2] and b [M, C/g1, kh, kw] -> [T, O, C/target, kh, kw].

    Only the blocks that can be nonzero are multiplied (a depthwise conv stays cheap).
    """
    taps, out_channels, m = a.shape[0], a.shape[1], b.shape[0]
    tail = b.shape[2:]
    if g2 == target:  # a is dense inside each merged group; b's g1/target sub-groups stay apart
        r, o = g1 // target, out_channels // target
        lhs = a.reshape(taps, target, o, r, m // g1).permute(1, 3, 0, 2, 4).reshape(target, r, taps * o, m // g1)
        rhs = b.reshape(target, r, m // g1, -1)
        out = (lhs @ rhs).reshape(target, r, taps, o, b.shape[1], *tail).permute(2, 0, 3, 1, 4, 5, 6)
        return out.reshape(taps, out_channels, r * b.shape[1], *tail)
    dense = _regroup(b, g1, target)
    r, o = g2 // target, out_channels // g2
    lhs = a.reshape(taps, target, r, o, m // g2).permute(1, 2, 0, 3, 4).reshape(target, r, taps * o, m // g2)
    rhs = dense.reshape(target, r, m // g2, -1)
    out = (lhs @ rhs).reshape(target, r, taps, o, dense.shape[1], *tail).permute(2, 0, 1, 3, 4, 5, 6)
    return out.reshape(taps, out_channels, dense.shape[1], *tail)


def _compose_weights(w1: Tensor, g1: int, w2: Tensor, g2: int, s1: Pair) -> tuple[Tensor, int]:
    """Kernel of second(first(x)): K[o, c, s1*u2 + u1] = sum_m W2[o, m, u2] W1[m, c, u1]; and its groups."""
    target = math.gcd(g1, g2)
    (k1h, k1w), (k2h, k2w) = w1.shape[2:], w2.shape[2:]
    parts = _channel_product(w2.permute(2, 3, 0, 1).reshape(k2h * k2w, *w2.shape[:2]), g2, w1, g1, target)
    kernel = w1.new_zeros(*parts.shape[1:3], k1h + s1[0] * (k2h - 1), k1w + s1[1] * (k2w - 1))
    for u in range(k2h):
        for v in range(k2w):
            kernel[:, :, s1[0] * u:s1[0] * u + k1h, s1[1] * v:s1[1] * v + k1w] += parts[u * k2w + v]
    return kernel, target


def _compose_bias(b1: Tensor | None, w2: Tensor, g2: int, b2: Tensor | None) -> Tensor | None:
    """b2 + sum_{m,u} W2[o, m, u] b1[m] (None when neither conv has a bias)."""
    if b1 is None and b2 is None:
        return None
    out_channels = w2.shape[0]
    bias = w2.new_zeros(out_channels) if b2 is None else b2.clone()
    if b1 is not None:
        taps = w2.sum(dim=(2, 3)).reshape(g2, out_channels // g2, -1)
        bias += torch.einsum("jom,jm->jo", taps, b1.reshape(g2, -1)).reshape(out_channels)
    return bias


def compose(first: nn.Conv2d | Merged, second: nn.Conv2d | Merged) -> Merged:
    """One conv computing second(first(x)): exact, or exact away from a border ring; MergeRefused otherwise."""
    a, b = as_merged(first), as_merged(second)
    ga, gb = _geometry(a.conv, "first conv"), _geometry(b.conv, "second conv")
    if a.conv.out_channels != b.conv.in_channels:
        raise MergeRefused(f"first conv gives {a.conv.out_channels} channels, second conv takes {b.conv.in_channels}")
    if not (ga.pointwise or gb.pointwise):
        for geo, role in ((ga, "first"), (gb, "second")):
            if geo.dilation != (1, 1):
                raise MergeRefused(f"{role} conv is dilated {geo.dilation}; a dilated conv merges only with a "
                                   "pointwise (1x1, stride 1, unpadded) neighbour")
            if geo.mode != "zeros" and any(geo.padding):
                raise MergeRefused(f"{role} conv pads with {geo.mode!r}; only zero padding composes "
                                   "(or a pointwise neighbour)")
    s1 = ga.stride
    kernel = tuple(k1 + s * (k2 - 1) for k1, s, k2 in zip(ga.kernel, s1, gb.kernel, strict=True))
    stride = tuple(s * t for s, t in zip(s1, gb.stride, strict=True))
    padding = tuple(p1 + s * p2 for p1, s, p2 in zip(ga.padding, s1, gb.padding, strict=True))
    bias_zero = a.conv.bias is None or not bool(a.conv.bias.detach().any())
    border, notes = b.border, list(a.notes + b.notes)
    for d in range(2):
        p2, s2 = gb.padding[d], gb.stride[d]
        # the padded ring of the intermediate map is zero in the merged conv too only if the first
        # conv adds no bias and reads nothing but padding there (p1 >= k1 - 1)
        harmful = p2 > 0 and gb.mode == "zeros" and not (bias_zero and ga.padding[d] >= ga.kernel[d] - 1)
        if harmful or a.border:
            border = max(border, -(-(a.border + p2) // s2))
        if harmful and not notes[len(a.notes + b.notes):]:
            cause = "bias" if not bias_zero else "response to the input near the edge"
            notes.append(f"the zero padding {gb.padding} of a {gb.kernel[0]}x{gb.kernel[1]} conv sees the "
                         f"previous conv's {cause} instead of zeros")
    w1, w2 = _f64(a.conv.weight), _f64(b.conv.weight)
    weight, groups = _compose_weights(w1, ga.groups, w2, gb.groups, s1)
    bias = _compose_bias(_f64(a.conv.bias), w2, gb.groups, _f64(b.conv.bias))
    keep = gb if ga.pointwise else ga  # whose dilation and padding mode the result keeps
    geo = _Geometry(kernel, stride, padding, keep.dilation, groups, keep.mode)
    conv = _new_conv(weight, bias, a.conv.in_channels, geo, a.conv.weight)
    return Merged(conv, border == 0, border, tuple(dict.fromkeys(notes)))


def add_parallel(first: nn.Conv2d | Merged, second: nn.Conv2d | Merged) -> Merged:
    """One conv computing first(x) + second(x) (RepVGG): both kernels in one window, summed.

    Exact wherever both are: each branch's taps land on the same input pixels, the wider
    padding only adds taps of weight 0. The outputs must align: same channels and stride,
    and 2*padding - kernel equal per axis (e.g. a 1x1 at the centre of a 3x3 with padding 1).
    """
    a, b = as_merged(first), as_merged(second)
    ga, gb = _geometry(a.conv, "first branch"), _geometry(b.conv, "second branch")
    if (a.conv.in_channels, a.conv.out_channels) != (b.conv.in_channels, b.conv.out_channels):
        raise MergeRefused(f"branches map {a.conv.in_channels}->{a.conv.out_channels} and "
                           f"{b.conv.in_channels}->{b.conv.out_channels} channels; they cannot be added")
    if ga.stride != gb.stride:
        raise MergeRefused(f"branches have strides {ga.stride} and {gb.stride}; they cannot be added in one conv")
    for geo in (ga, gb):
        if geo.dilation != (1, 1):
            raise MergeRefused(f"a dilated branch {geo.dilation} cannot share a dense kernel window")
        if geo.mode != "zeros" and any(geo.padding):
            raise MergeRefused(f"a branch pads with {geo.mode!r}; only zero-padded branches add into one conv")
    offsets = [tuple(2 * p - k for p, k in zip(g.padding, g.kernel, strict=True)) for g in (ga, gb)]
    if offsets[0] != offsets[1]:
        raise MergeRefused(f"branch outputs do not align: kernel {ga.kernel} padding {ga.padding} vs kernel "
                           f"{gb.kernel} padding {gb.padding} (2*padding - kernel must match)")
    padding = tuple(max(p, q) for p, q in zip(ga.padding, gb.padding, strict=True))
    kernel = tuple(2 * p - o for p, o in zip(padding, offsets[0], strict=True))
    groups = math.gcd(ga.groups, gb.groups)
    weight = torch.zeros(a.conv.out_channels, a.conv.in_channels // groups, *kernel, dtype=torch.float64,
                         device=a.conv.weight.device)
    for m, g in ((a, ga), (b, gb)):
        top, left = padding[0] - g.padding[0], padding[1] - g.padding[1]
        weight[:, :, top:top + g.kernel[0], left:left + g.kernel[1]] += _regroup(_f64(m.conv.weight), g.groups, groups)
    biases = [_f64(m.conv.bias) for m in (a, b) if m.conv.bias is not None]
    bias = sum(biases[1:], biases[0]) if biases else None
    geo = _Geometry(kernel, ga.stride, padding, (1, 1), groups, "zeros")
    conv = _new_conv(weight, bias, a.conv.in_channels, geo, a.conv.weight)
    border = max(a.border, b.border)
    return Merged(conv, border == 0, border, tuple(dict.fromkeys(a.notes + b.notes)))


def add_identity(op: nn.Conv2d | Merged) -> Merged:
    """One conv computing op(x) + x: 1 added at the kernel centre of each channel's own tap (exact).

    Needs stride 1, as many output as input channels, and an odd kernel centred by its
    padding (padding = (k - 1) / 2), so that the centre tap reads the output's own pixel.
    """
    m = as_merged(op)
    geo = _geometry(m.conv, "branch")
    if m.conv.in_channels != m.conv.out_channels:
        raise MergeRefused(f"identity shortcut needs as many output as input channels, the branch maps "
                           f"{m.conv.in_channels}->{m.conv.out_channels}")
    if geo.stride != (1, 1):
        raise MergeRefused(f"identity shortcut needs stride 1, the branch has stride {geo.stride}")
    if any(k != 2 * p + 1 for k, p in zip(geo.kernel, geo.padding, strict=True)):
        raise MergeRefused(f"identity shortcut needs an odd kernel centred by its padding, the branch has kernel "
                           f"{geo.kernel} with padding {geo.padding}")
    return add_parallel(m, identity_conv(m.conv.in_channels, m.conv.weight))


def _as_linear(layer: nn.Module) -> nn.Conv2d | None:
    if type(layer) is nn.Conv2d:
        return layer
    if isinstance(layer, nn.BatchNorm2d):
        return bn_as_conv(layer)
    if isinstance(layer, nn.Identity):
        return None
    raise MergeRefused(f"{type(layer).__name__} is not a conv or BatchNorm2d; remove activations first")


def merge_chain(layers: Sequence[nn.Module], shortcut: Sequence[nn.Module] | None = None) -> Merged:
    """One conv for `layers` applied in order (Conv2d / BatchNorm2d / Identity; activations removed)
    plus `shortcut` added to the result: None = no shortcut, [] = identity, else a chain (a projection)."""
    ops = [op for op in map(_as_linear, layers) if op is not None]
    if not ops:
        raise MergeRefused("the chain has no conv or BatchNorm to merge")
    merged = as_merged(copy.deepcopy(ops[0]).eval())  # never hand back the caller's own module
    for op in ops[1:]:
        merged = compose(merged, op)
    if shortcut is None:
        return merged
    if not list(shortcut):
        return add_identity(merged)
    return add_parallel(merged, merge_chain(shortcut))


def conv_macs(conv: nn.Conv2d) -> int:
    """Multiply-adds per output pixel: out_channels * in_channels/groups * kh * kw."""
    return conv.out_channels * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
