"""BatchNorm folding: exact on zoo models, BN -> conv where exact, refused where the conv output is shared
or the padding would meet BN's shift, gone from ONNX for every zoo model."""

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compressor.errors import ValidationError
from compressor.models.zoo import ZOO, build
from compressor.rewrite.fold import FOLD_RTOL, apply_structure, check_equivalent, fold_batchnorm, fold_model
from exporters import get_exporter
from tests.helpers import randomise_batchnorm


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


def _input(shape=(2, 3, 32, 32), seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["resnet20", "resnet18", "mobilenet_v2"])
def test_zoo_models_fold_completely_and_exactly(arch):
    model = randomise_batchnorm(build(arch, 10))
    n_bn = _count(model, nn.BatchNorm2d)
    assert n_bn > 0
    x = _input()
    with torch.no_grad():
        expected = model(x)
    folded, count = fold_batchnorm(model)
    assert count == n_bn
    assert _count(folded, nn.BatchNorm2d) == 0
    with torch.no_grad():
        got = folded(x)
    rel = float((got - expected).abs().max() / expected.abs().max())
    assert rel <= 1e-4
    # folding works on a copy: the original keeps its BatchNorms and its output
    assert _count(model, nn.BatchNorm2d) == n_bn
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_fold_with_example_input_checks_itself():
    model = randomise_batchnorm(build("resnet20", 10))
    folded, count = fold_batchnorm(model, _input())
    assert count == _count(model, nn.BatchNorm2d)
    assert not folded.training


class SharedConv(nn.Module):
    """conv -> bn, but the conv's output also feeds the residual add: not foldable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        c = self.conv(x)
        return self.bn(c) + c


class ReusedConv(SharedConv):
    """The same conv is called twice; folding its BN would change the first call too."""

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))


class MixedFoldable(nn.Module):
    """One foldable pair (conv_a -> bn_a) next to a shared one (conv_b feeds bn_b and the add)."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.conv_b = nn.Conv2d(4, 4, 1)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x):
        y = torch.relu(self.bn_a(self.conv_a(x)))
        z = self.conv_b(y)
        return self.bn_b(z) * z


@pytest.mark.parametrize("cls", [SharedConv, ReusedConv])
def test_bn_after_shared_conv_is_not_folded(cls):
    torch.manual_seed(0)
    model = randomise_batchnorm(cls())
    x = _input((2, 3, 8, 8))
    with torch.no_grad():
        expected = model(x)
    folded, count = fold_batchnorm(model)
    assert count == 0
    assert isinstance(folded.bn, nn.BatchNorm2d)
    assert torch.equal(folded.conv.weight, model.conv.weight)
    with torch.no_grad():
        assert torch.allclose(folded(x), expected, atol=1e-6)


def test_only_the_foldable_pair_is_folded():
    torch.manual_seed(0)
    model = randomise_batchnorm(MixedFoldable())
    x = _input((2, 3, 8, 8))
    folded, count = fold_batchnorm(model, x)
    assert count == 1
    assert isinstance(folded.bn_a, nn.Identity)
    assert isinstance(folded.bn_b, nn.BatchNorm2d)


def test_bn_without_running_stats_is_not_folded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    folded, count = fold_batchnorm(model)
    assert count == 0
    assert isinstance(folded[1], nn.BatchNorm2d)


def test_linear_bn1d_is_folded():
    torch.manual_seed(0)
    model = randomise_batchnorm(nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.BatchNorm1d(5)))
    x = _input((4, 3, 2, 2))
    folded, count = fold_batchnorm(model, x)
    assert count == 1
    assert isinstance(folded[2], nn.Identity)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)


def test_check_equivalent_rejects_a_changed_model():
    torch.manual_seed(0)
    model = randomise_batchnorm(build("resnet20", 10))
    folded, _ = fold_batchnorm(model)
    with torch.no_grad():
        folded.fc.bias.add_(1.0)
    with pytest.raises(ValidationError, match="BatchNorm folding"):
        check_equivalent(model, folded, _input(), FOLD_RTOL, "BatchNorm folding")


def _onnx_ops(path):
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def test_exported_folded_model_has_no_batchnorm(tmp_path):
    model = randomise_batchnorm(build("resnet20", 10))
    folded, _ = fold_batchnorm(model)
    x = _input((1, 3, 32, 32))
    path = get_exporter("onnx").export(folded, x, tmp_path / "folded.onnx", 17)
    ops = _onnx_ops(path)
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == _count(model, nn.Conv2d)

    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()


def test_exported_unfoldable_batchnorm_stays_in_onnx(tmp_path):
    # control for the tests above: a BN that cannot fold (its shift would meet the next conv's
    # zero padding, and no conv precedes it) reaches the ONNX graph: torch.onnx does not fold it either
    model = randomise_batchnorm(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 2, 3, padding=1)))
    result = fold_model(model)
    assert not result.folds
    assert "padding would skip BN's shift" in result.left["0"]
    path = get_exporter("onnx").export(result.model, _input((1, 3, 4, 4)), tmp_path / "bn.onnx", 17)
    assert "BatchNormalization" in _onnx_ops(path)


@pytest.mark.parametrize(("conv", "shift"), [
    (nn.Conv2d(3, 4, 1), True),  # no padding: exact with any shift
    (nn.Conv2d(3, 4, 3, padding=1, padding_mode="replicate"), True),  # the copied border carries the shift
    (nn.Conv2d(3, 6, 3, padding=1, groups=3), False),  # zero padding, but BN has no shift
    (nn.Conv2d(3, 4, 3, stride=2, padding="valid", bias=False), True),
])
def test_bn_before_a_conv_folds_where_exact(tmp_path, conv, shift):
    torch.manual_seed(0)
    model = randomise_batchnorm(nn.Sequential(nn.BatchNorm2d(3), conv, nn.ReLU()))
    if not shift:
        model[0].running_mean.zero_()
        model[0].bias.data.zero_()
    x = _input((2, 3, 9, 9))
    result = fold_model(model, x)
    assert result.folds == [("bn->layer", "1", "0")] and not result.left
    assert isinstance(result.model[0], nn.Identity) and result.model[1].bias is not None
    assert result.max_rel_error <= 1e-5
    path = get_exporter("onnx").export(result.model, x[:1], tmp_path / "m.onnx", 17)
    assert "BatchNormalization" not in _onnx_ops(path)


def test_bn_between_two_convs_folds_backwards_first():
    torch.manual_seed(0)
    model = randomise_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)))
    result = fold_model(model, _input((2, 3, 8, 8)))
    assert result.folds == [("layer<-bn", "0", "1")]


def test_bn_before_a_1d_conv_folds():
    torch.manual_seed(0)
    model = randomise_batchnorm(nn.Sequential(nn.BatchNorm1d(3), nn.Conv1d(3, 5, 3, stride=2)))
    x = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    result = fold_model(model, x)
    assert result.folds == [("bn->layer", "1", "0")] and result.max_rel_error <= 1e-5


def test_leftover_batchnorms_say_why():
    torch.manual_seed(0)
    result = fold_model(randomise_batchnorm(SharedConv()))
    assert result.left == {"bn": "conv also feeds add"}
    result = fold_model(nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)).eval())
    assert "no conv or linear layer" in result.left["1"]


# ---- every zoo model: folds completely, exports to ONNX without BatchNormalization, agrees ----

@pytest.mark.parametrize("arch", list(ZOO))
def test_every_zoo_model_folds_and_exports_without_batchnorm(tmp_path, arch):
    """Small inputs keep this fast: 32x32 for CIFAR models, 64x64 for the 224-pixel ones (all accept it).
    vit_digits normalises with LayerNorm only (nothing to fold); det_digits returns two maps, all compared."""
    import onnxruntime as ort

    from compressor.metrics.outputs import named_outputs

    model = randomise_batchnorm(build(arch, 10))
    size = 32 if ZOO[arch].input_size <= 32 else 64
    x = _input((1, 3, size, size))
    result = fold_model(model, x)
    assert not result.left, result.left
    assert len(result.folds) == _count(model, nn.modules.batchnorm._BatchNorm)
    assert result.folds or arch == "vit_digits"
    assert result.max_rel_error <= FOLD_RTOL
    path = get_exporter("onnx").export(result.model, x, tmp_path / f"{arch}.onnx", 17)
    assert "BatchNormalization" not in _onnx_ops(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        references = list(named_outputs(model(x)).values())
    assert len(outputs) == len(references)
    for got, expected in zip(outputs, references, strict=True):
        # ONNX Runtime sums in its own order: ~1e-6 relative per layer; a wrong fold is off by O(1)
        assert np.abs(got - expected.numpy()).max() <= FOLD_RTOL * np.abs(expected.numpy()).max()


def test_folded_structure_rebuilds_the_architecture_for_the_state_dict():
    model = randomise_batchnorm(build("mobilenet_v3_small", 10))
    x = _input((1, 3, 64, 64))
    result = fold_model(model, x, merge_exact=True)
    rebuilt = apply_structure(build("mobilenet_v3_small", 10), result.structure)
    rebuilt.load_state_dict(result.model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(x), result.model(x))


# ---- exact conv merges (compressor fold) ----

def test_exact_conv_pairs_merge_when_no_more_costly():
    torch.manual_seed(0)
    model = randomise_batchnorm(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1),  # 3x3 -> 1x1: exact, cheaper
        nn.ReLU(),
        nn.Conv2d(4, 2, 1), nn.Conv2d(2, 16, 1),  # a linear bottleneck: exact but merging costs more
        nn.Conv2d(16, 16, 3, padding=1),  # biased 1x1 before a padded 3x3: not exact, kept
    ))
    x = _input((2, 3, 10, 10))
    result = fold_model(model, x, merge_exact=True)
    assert result.merges == [("0", "2")]
    assert isinstance(result.model[0], nn.Identity) and result.model[2].kernel_size == (3, 3)
    assert result.max_rel_error <= 1e-5
    assert fold_model(model, x).merges == []  # fold_batchnorm and prune never merge


def test_folding_a_model_with_two_outputs_is_checked_on_each():
    """Each output against its own range: the box map's scale does not hide an error in the other."""
    from compressor.rewrite.fold import check_equivalent

    class TwoMaps(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.conv, self.scale = nn.Conv2d(3, 4, 1), scale

        def forward(self, x):
            y = self.conv(x)
            return y * 1000.0, y * self.scale

    x = _input((1, 3, 8, 8))
    original, off = TwoMaps(1.0).eval(), TwoMaps(1.01).eval()
    off.load_state_dict(original.state_dict())
    assert check_equivalent(original, original, x, FOLD_RTOL, "nothing") == 0.0
    with pytest.raises(ValidationError, match="output 'output1' by 0.01"):
        check_equivalent(original, off, x, FOLD_RTOL, "a change")
