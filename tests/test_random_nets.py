"""Random residual architectures (tests/random_nets.py): removing any subset of units gives exactly the
model whose removed branches output zero, folds within its tolerance, and exports to ONNX that agrees
with torch in ONNX Runtime, on a derandomized sample (half with transformer and split-concat blocks);
benchmarks/random_architectures.py runs the same check on 1,000 nets."""

from __future__ import annotations

import random

import numpy as np
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from compressor.graph.surgery import remove_units
from compressor.graph.units import find_units
from compressor.rewrite.fold import FOLD_RTOL, check_equivalent, fold_batchnorm
from tests.random_nets import EXTRA_FAMILIES, muted_reference, random_net

SURGERY_RTOL = 1e-5  # removal is exact: only fp32 summation order may differ


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


@settings(max_examples=24, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(seed=st.integers(0, 10**6), subset_seed=st.integers(0, 10**6), extra=st.sampled_from(((), EXTRA_FAMILIES)))
@example(seed=7982, subset_seed=0, extra=())  # drew only two-addition blocks before the generator forced a unit
def test_pruned_random_net_equals_its_muted_reference(seed, subset_seed, extra):
    """Half the nets also hold transformer and split-concat blocks (branch units, block units of them)."""
    net = random_net(seed, extra=extra)
    x = torch.randn(3, *net.input_shape, generator=torch.Generator().manual_seed(seed))
    units = find_units(net.model, x)
    assert units, "every generated net has at least one unit"
    rng = random.Random(subset_seed)
    removed = [u for u in units if rng.random() < 0.5]
    pruned = remove_units(net.model, removed, x)
    with torch.no_grad():
        expected = muted_reference(net.model, [u.name for u in removed])(x)
        assert relative_error(pruned(x), expected) <= SURGERY_RTOL
    folded, _ = fold_batchnorm(pruned, x)
    assert check_equivalent(pruned, folded, x, FOLD_RTOL, "folding") <= FOLD_RTOL


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(seed=st.integers(0, 10**6), extra=st.sampled_from(((), EXTRA_FAMILIES)))
def test_random_net_onnx_export_agrees_with_torch(seed, extra, tmp_path_factory):
    import onnxruntime as ort

    from exporters import get_exporter

    net = random_net(seed, extra=extra)
    x = torch.randn(1, *net.input_shape, generator=torch.Generator().manual_seed(seed))
    units = find_units(net.model, x)
    removed = units[::2]
    pruned = fold_batchnorm(remove_units(net.model, removed, x), x)[0]
    path = get_exporter("onnx").export(pruned, x, tmp_path_factory.mktemp("onnx") / "m.onnx")  # validates itself
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = muted_reference(net.model, [u.name for u in removed])(x).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def test_generator_covers_the_block_shapes():
    """Over 16 seeds (the first 12 already cover all): identity and projection units, post-activation with
    each activation kind, and blocks with two residual additions, each giving a branch unit per addition
    ("path/f", "path/g") and a block unit ("path") that takes both."""
    from tests.random_nets import ACTIVATIONS, PreActBlock, TwoAddBlock

    kinds, acts, pre, two = set(), set(), 0, 0
    for seed in range(16):
        net = random_net(seed)
        units = find_units(net.model, torch.randn(1, *net.input_shape))
        kinds |= {u.kind for u in units}
        acts |= {type(m) for m in net.model.modules() if isinstance(m, ACTIVATIONS)}
        pre += sum(isinstance(m, PreActBlock) for m in net.model.modules())
        two += sum(isinstance(m, TwoAddBlock) for m in net.model.modules())
        by_name = {u.name: u for u in units}
        for path, m in net.model.named_modules():
            if isinstance(m, TwoAddBlock):
                assert by_name[f"{path}/f"].kind == by_name[f"{path}/g"].kind == "branch"
                assert by_name[path].kind == "block"
    assert kinds == {"identity", "projection", "branch", "block"}
    assert acts == set(ACTIVATIONS)
    assert pre and two
