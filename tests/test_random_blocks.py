"""The random-network generator itself (tests/random_nets.py), with its transformer and split-concat families:
every net runs and exports to ONNX that agrees with torch, and muting a branch is what it claims to be
(the branch's output replaced by zeros), so the muted reference is a sound oracle for surgery."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tests.random_nets import (
    C3,
    EXTRA_FAMILIES,
    C2f,
    TransformerBlock,
    TwoAddBlock,
    muted_reference,
    random_net,
    residual_branches,
)

SEEDS = range(10)  # nets with both extra families, run and exported here (about 16 inserted blocks)
COVERAGE_SEEDS = range(30)  # nets built (not run) to see every variant drawn


class Zeros(nn.Module):
    """What a muted branch must equal: the wrapped module's output replaced by zeros."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(self.inner(x))


def _net(seed: int):
    net = random_net(seed, extra=EXTRA_FAMILIES)
    return net, torch.randn(2, *net.input_shape, generator=torch.Generator().manual_seed(seed))


def _params(m: nn.Module | None) -> int:
    return sum(p.numel() for p in m.parameters()) if m is not None else 0


@pytest.mark.parametrize("seed", SEEDS)
def test_muting_a_branch_zeroes_it(seed):
    """Muting "path/key" equals the net with that branch's key module outputting zeros; the key is the
    branch's module with the most parameters (the name units give); a block's path mutes all its branches."""
    net, x = _net(seed)
    with torch.no_grad():
        full = net.model(x)
        for path, names in residual_branches(net.model).items():
            block = net.model.get_submodule(path)
            for name in names:
                key = name.split("/")[1]
                children = block.branches[key]
                assert _params(getattr(block, key)) == max(_params(getattr(block, c, None)) for c in children)
                zeroed = copy.deepcopy(net.model)
                setattr(zeroed.get_submodule(path), key, Zeros(getattr(block, key)))
                muted = muted_reference(net.model, [name])(x)
                torch.testing.assert_close(muted, zeroed(x), rtol=0, atol=0)  # the same ops: exact
                assert not torch.equal(muted, full)
            torch.testing.assert_close(muted_reference(net.model, [path])(x), muted_reference(net.model, names)(x),
                                       rtol=0, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_net_exports_to_onnx(seed, tmp_path):
    """ONNX opset 17 (TorchScript exporter), run in ONNX Runtime, within the ONNX exporter's tolerance."""
    import onnxruntime as ort

    net, x = _net(seed)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"])
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, net.model(x).numpy(), atol=1e-4, rtol=1e-3)


def test_extra_families_cover_their_variants():
    """Over COVERAGE_SEEDS: transformer blocks on tokens and on maps, fused and explicit attention, layer scale
    and drop path, C2f (chunk and split) and C3, bottlenecks with and without their shortcut, two-addition blocks."""
    seen: set[str] = set()
    for seed in COVERAGE_SEEDS:
        for m in random_net(seed, extra=EXTRA_FAMILIES).model.modules():
            if isinstance(m, TransformerBlock):
                seen |= {m.attn.layout, "fused" if m.attn.fused else "softmax"}
                seen |= {"layer_scale"} if not isinstance(m.ls1, nn.Identity) else set()
                seen |= {"drop_path"} if not isinstance(m.drop_path1, nn.Identity) else set()
            elif isinstance(m, C2f):
                seen.add(f"c2f_{m.split}")
                seen.add("shortcut" if m.m[0].add else "no_shortcut")
            elif isinstance(m, C3):
                seen.add("c3")
            elif isinstance(m, TwoAddBlock):
                seen.add("two_add")
    assert seen == {"tokens", "map", "fused", "softmax", "layer_scale", "drop_path", "c2f_chunk", "c2f_split",
                    "c3", "shortcut", "no_shortcut", "two_add"}


def test_extra_families_keep_the_conv_draw():
    """The conv blocks of a seed are the same with or without the extra families."""
    for seed in (7982, *range(10)):
        plain = random_net(seed).model
        mixed = random_net(seed, extra=EXTRA_FAMILIES).model
        kept = [m for m in mixed if not isinstance(m, (TransformerBlock, C2f, C3, nn.Sequential))]
        assert [repr(m) for m in kept] == [repr(m) for m in plain]
        assert len(mixed) >= len(plain)


def test_muted_reference_refuses_a_name_it_cannot_mute():
    net, _ = _net(0)
    path = next(iter(residual_branches(net.model)))
    with pytest.raises(KeyError, match="no residual branch"):
        muted_reference(net.model, [f"{path}/nothing"])
    with pytest.raises(KeyError, match="no mutable residual branch"):
        muted_reference(net.model, ["0"])  # the stem's conv
