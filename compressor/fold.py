"""Fold BatchNorm into the preceding convolution or linear layer (exact up to fp32 round-off)."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from compressor.errors import ValidationError
from compressor.units import trace

FOLDABLE = (
    (nn.Conv1d, nn.BatchNorm1d, fuse_conv_bn_eval),
    (nn.Conv2d, nn.BatchNorm2d, fuse_conv_bn_eval),
    (nn.Conv3d, nn.BatchNorm3d, fuse_conv_bn_eval),
    (nn.Linear, nn.BatchNorm1d, fuse_linear_bn_eval),
)
# |folded - original| <= FOLD_RTOL * max|original|: folding rescales each weight once
# (w * gamma / sqrt(var + eps)), a ~1e-7 relative change per layer in fp32.
FOLD_RTOL = 1e-4


def _fold_pair(layer: nn.Module, bn: nn.Module) -> nn.Module | None:
    for layer_type, bn_type, fuse in FOLDABLE:
        if type(layer) is layer_type and type(bn) is bn_type and bn.track_running_stats:
            return fuse(layer, bn)
    return None


def fold_batchnorm(model: nn.Module, example_input: torch.Tensor | None = None) -> tuple[nn.Module, int]:
    """A copy of `model` (eval mode) with each conv->BN / linear->BN pair folded into one layer.

    The BN becomes nn.Identity; a layer whose output feeds anything besides its
    BN, or a module called more than once, is left alone. Returns the model and
    the number of folds. With `example_input`, the result is checked against
    the original (ValidationError beyond FOLD_RTOL).
    """
    folded = copy.deepcopy(model).eval()
    gm = trace(folded)
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_module" or len(node.all_input_nodes) != 1:
            continue
        prev: fx.Node = node.all_input_nodes[0]
        if prev.op != "call_module" or len(prev.users) != 1:
            continue
        if calls[node.target] != 1 or calls[prev.target] != 1:
            continue
        fused = _fold_pair(folded.get_submodule(prev.target), folded.get_submodule(node.target))
        if fused is None:
            continue
        folded.set_submodule(prev.target, fused)
        folded.set_submodule(node.target, nn.Identity())
        count += 1
    if example_input is not None:
        check_equivalent(model, folded, example_input, FOLD_RTOL, "BatchNorm folding")
    return folded, count


@torch.no_grad()
def check_equivalent(original: nn.Module, changed: nn.Module, x: torch.Tensor, rtol: float,
                     what: str) -> float:
    """Max |changed - original| relative to max|original|; ValidationError above `rtol`."""
    original_mode = original.training
    original.eval()
    expected = original(x)
    original.train(original_mode)
    got = changed.eval()(x)
    scale = expected.abs().max().clamp_min(1e-12)
    rel = float((got - expected).abs().max() / scale)
    if not rel <= rtol:
        msg = f"{what} changed the output by {rel:.3g} of its range (allowed {rtol:g})"
        raise ValidationError(msg)
    return rel
