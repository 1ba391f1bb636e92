"""Fold BatchNorm into neighbouring layers, exact up to fp32 round-off.

conv -> BN and linear -> BN always fold: BN's per-channel affine rescales the layer's
output channels. BN -> conv folds into the conv's input channels (weight * scale, bias +
sum(weight * shift)), which is exact when the conv has no padding, pads by copying its
input (reflect, replicate, circular: the copies carry the shift too), or BN's shift is
exactly zero. With zero padding and a nonzero shift, the original pads BN's *output*
with zeros while the folded conv would pad its input with zeros, i.e. BN output `shift`
instead of 0 on the border: refused, and the BN stays (its reason is reported).

torch.onnx's TorchScript exporter folds conv -> BN itself in eval mode, but neither
BN -> conv nor a conv whose output is also used elsewhere; folding here makes the torch
model, its checkpoint and every exporter agree, and each fold is checked numerically.
"""

from __future__ import annotations

import copy
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.utils import skip_init
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from compressor.errors import InputError, MergeRefused, ValidationError
from compressor.graph.activations import trace_fx
from compressor.graph.capture import capture

FOLDABLE = (
    (nn.Conv1d, nn.BatchNorm1d, fuse_conv_bn_eval),
    (nn.Conv2d, nn.BatchNorm2d, fuse_conv_bn_eval),
    (nn.Conv3d, nn.BatchNorm3d, fuse_conv_bn_eval),
    (nn.Linear, nn.BatchNorm1d, fuse_linear_bn_eval),
)
BN_BEFORE_CONV = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# |folded - original| <= FOLD_RTOL * max|original|: folding rescales each weight once
# (w * gamma / sqrt(var + eps)), a ~1e-7 relative change per layer in fp32; over a
# 100-layer model that stays well below 1e-4, while a wrong fold is off by O(1).
FOLD_RTOL = 1e-4
# module types a folded checkpoint's structure may name (rebuilt by apply_structure)
STRUCTURE_TYPES: dict[str, type[nn.Module]] = {
    "Identity": nn.Identity, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d, "Linear": nn.Linear,
}


@dataclass
class FoldResult:
    """A folded copy of a model and what was done to it.

    folds: (kind, layer, batchnorm) for each fold, kind "layer<-bn" (BN after the layer)
    or "bn->layer" (BN before it); merges: (first, second) conv pairs merged exactly;
    left: BatchNorm modules still there -> why; structure: module path -> spec of every
    replaced module (see apply_structure); max_rel_error: the check on the example input.
    """

    model: nn.Module
    folds: list[tuple[str, str, str]] = field(default_factory=list)
    merges: list[tuple[str, str]] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)
    structure: dict[str, dict] = field(default_factory=dict)
    max_rel_error: float | None = None


def _fold_pair(layer: nn.Module, bn: nn.Module) -> nn.Module | None:
    for layer_type, bn_type, fuse in FOLDABLE:
        if type(layer) is layer_type and type(bn) is bn_type and bn.track_running_stats:
            return fuse(layer, bn)
    return None


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as x * scale + shift per channel (float64)."""
    scale = 1.0 / torch.sqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _pads(conv: nn.Module) -> bool:
    if conv.padding == "same":
        return any(k > 1 for k in conv.kernel_size)
    return conv.padding != "valid" and any(conv.padding)


def fold_bn_into_conv(bn: nn.Module, conv: nn.Module) -> nn.Module:
    """conv(bn(x)) as one conv of the same shape, now with a bias; MergeRefused where not exact."""
    if type(conv) not in BN_BEFORE_CONV or type(bn) is not BN_BEFORE_CONV[type(conv)]:
        raise MergeRefused(f"{type(bn).__name__} does not fold into a following {type(conv).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise MergeRefused("BatchNorm without running statistics normalises by the batch: not a fixed map")
    scale, shift = _bn_affine(bn)
    if _pads(conv) and conv.padding_mode == "zeros" and bool(shift.any()):
        shifted = int((shift != 0).sum())
        raise MergeRefused(f"BatchNorm before a zero-padded conv: the padding would skip BN's shift (nonzero on "
                           f"{shifted} of {shift.numel()} channels), so the border would change")
    w = conv.weight.detach().double()
    out_channels, cin, groups = w.shape[0], w.shape[1], conv.groups

    def per_output(v: torch.Tensor) -> torch.Tensor:  # [C] -> [O, C/groups]: each output's own input group
        return v.reshape(groups, 1, cin).expand(groups, out_channels // groups, cin).reshape(out_channels, cin)

    weight = w * per_output(scale).reshape(out_channels, cin, *[1] * (w.dim() - 2))
    bias = (w.sum(dim=tuple(range(2, w.dim()))) * per_output(shift)).sum(1)
    if conv.bias is not None:
        bias = bias + conv.bias.detach().double()
    folded = skip_init(type(conv), conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, groups, True, conv.padding_mode, device=w.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        folded.weight.copy_(weight)
        folded.bias.copy_(bias)
    return folded.eval()


class _Folder:
    """Folds on a traced copy; records every replaced module for the checkpoint's structure."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor | None) -> None:
        self.model = copy.deepcopy(model).eval()
        self.graph = capture(self.model, example_input) if example_input is not None else trace_fx(self.model)
        self.calls = Counter(n.target for n in self.graph.graph.nodes if n.op == "call_module")
        self.result = FoldResult(self.model)
        self.reasons: dict[str, list[str]] = defaultdict(list)

    def replace(self, name: str, module: nn.Module) -> None:
        self.model.set_submodule(name, module)
        self.result.structure[name] = module_spec(module)

    def live(self, node: fx.Node) -> nn.Module | None:
        return self.model.get_submodule(node.target) if node.op == "call_module" else None

    def bn_nodes(self) -> list[fx.Node]:
        return [n for n in self.graph.graph.nodes if isinstance(self.live(n), BATCHNORMS)]

    def after_layer(self) -> None:
        """layer -> BN: always exact when the layer feeds only its BN."""
        for node in self.bn_nodes():
            prev = node.all_input_nodes[0] if len(node.all_input_nodes) == 1 else None
            if prev is None or prev.op != "call_module":
                continue
            if len(prev.users) != 1:
                others = ", ".join(u.name for u in prev.users if u is not node)
                self.reasons[node.target].append(f"{prev.target} also feeds {others}")
            elif self.calls[node.target] != 1 or self.calls[prev.target] != 1:
                self.reasons[node.target].append(f"{prev.target} or the BatchNorm is called more than once")
            elif (fused := _fold_pair(self.live(prev), self.live(node))) is not None:
                self.replace(prev.target, fused)
                self.replace(node.target, nn.Identity())
                self.result.folds.append(("layer<-bn", prev.target, node.target))

    def before_conv(self) -> None:
        """BN -> conv, for the BatchNorms still there: exact unless zero padding meets a nonzero shift."""
        for node in self.bn_nodes():
            users = list(node.users)
            conv = self.live(users[0]) if len(users) == 1 else None
            if type(conv) not in BN_BEFORE_CONV or users[0].all_input_nodes != [node]:
                continue
            if self.calls[node.target] != 1 or self.calls[users[0].target] != 1:
                self.reasons[node.target].append(f"{users[0].target} or the BatchNorm is called more than once")
                continue
            try:
                folded = fold_bn_into_conv(self.live(node), conv)
            except MergeRefused as e:
                self.reasons[node.target].append(e.reason)
                continue
            self.replace(users[0].target, folded)
            self.replace(node.target, nn.Identity())
            self.result.folds.append(("bn->layer", users[0].target, node.target))

    def leftovers(self) -> dict[str, str]:
        left = {}
        for node in self.bn_nodes():
            bn = self.live(node)
            why = self.reasons.get(node.target) or (
                ["no running statistics (normalises by the batch)"] if bn.running_mean is None else
                ["no conv or linear layer right before it (feeding only it) or conv right after it"])
            left[node.target] = "; ".join(dict.fromkeys(why))
        return left


def fold_model(model: nn.Module, example_input: torch.Tensor | None = None,
               merge_exact: bool = False) -> FoldResult:
    """A copy of `model` (eval mode) with every BatchNorm that folds exactly folded away.

    `merge_exact` also merges adjacent convs where the merge is exact and costs no more
    multiply-adds (compressor.rewrite.pairs). With `example_input`, the model is captured on it
    (graph/capture.py) and the result checked against the original (ValidationError beyond
    FOLD_RTOL of the output's range); without one, only torch.fx can read its graph.
    """
    folder = _Folder(model, example_input)
    folder.after_layer()
    folder.before_conv()
    folder.result.left = folder.leftovers()
    if merge_exact:
        from compressor.rewrite.pairs import merge_exact_pairs

        folder.result.merges = merge_exact_pairs(folder.model, folder.replace, example_input)
    if example_input is not None:
        what = "BatchNorm folding" + (" and conv merging" if folder.result.merges else "")
        folder.result.max_rel_error = check_equivalent(model, folder.model, example_input, FOLD_RTOL, what)
    return folder.result


def fold_batchnorm(model: nn.Module, example_input: torch.Tensor | None = None) -> tuple[nn.Module, int]:
    """A copy of `model` (eval mode) with each conv->BN / linear->BN pair, and each exact BN->conv
    pair, folded into one layer; returns the model and the number of folds.

    The BN becomes nn.Identity; a layer whose output feeds anything besides its BN, or a
    module called more than once, is left alone. With `example_input`, the result is
    checked against the original (ValidationError beyond FOLD_RTOL).
    """
    result = fold_model(model, example_input)
    return result.model, len(result.folds)


@torch.no_grad()
def check_equivalent(original: nn.Module, changed: nn.Module, x: torch.Tensor, rtol: float,
                     what: str) -> float:
    """Max |changed - original| relative to max|original|, over every output (each against its own range:
    a detector's box map and class map differ in scale); ValidationError above `rtol`, naming the output."""
    from compressor.metrics.outputs import named_outputs

    original_mode = original.training
    original.eval()
    expected = named_outputs(original(x))
    original.train(original_mode)
    got = named_outputs(changed.eval()(x))
    rel = {name: float((got[name] - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
           for name, reference in expected.items()}
    worst_name = max(rel, key=lambda n: math.inf if math.isnan(rel[n]) else rel[n])  # NaN is the worst
    worst = rel[worst_name]
    if not worst <= rtol:
        where = f" {worst_name!r}" if len(expected) > 1 else ""
        msg = f"{what} changed the output{where} by {worst:.3g} of its range (allowed {rtol:g})"
        raise ValidationError(msg)
    return worst


def module_spec(module: nn.Module) -> dict:
    """Plain-data constructor arguments of a module that folding puts in place (Identity, conv, linear)."""
    kind = type(module).__name__
    if STRUCTURE_TYPES.get(kind) is not type(module):
        raise InputError(f"folding does not produce {kind} modules")
    if kind == "Identity":
        return {"type": kind}
    if kind == "Linear":
        return {"type": kind, "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    padding = module.padding if isinstance(module.padding, str) else list(module.padding)
    return {"type": kind, "in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel_size": list(module.kernel_size), "stride": list(module.stride), "padding": padding,
            "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None,
            "padding_mode": module.padding_mode}


def apply_structure(model: nn.Module, structure: dict[str, dict]) -> nn.Module:
    """Put uninitialised modules of the folded shapes into `model` (in place), so that a folded
    checkpoint's state_dict loads into the rebuilt architecture; returns `model`."""
    for name, spec in structure.items():
        kind = spec.get("type")
        if kind not in STRUCTURE_TYPES:
            raise InputError(f"folded structure names an unknown module type {kind!r} at {name}")
        args = {k: v for k, v in spec.items() if k != "type"}
        try:
            model.get_submodule(name)
        except AttributeError as e:
            raise InputError(f"folded structure names {name}, which the model does not have") from e
        model.set_submodule(name, skip_init(STRUCTURE_TYPES[kind], **args) if args else STRUCTURE_TYPES[kind]())
    return model.eval()
