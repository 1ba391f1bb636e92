"""Fidelity of a pruned model to the original: known answers on hand-made outputs and models."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from compressor.metrics.fidelity import Outputs, compare, fidelity, outputs, shift_agreement
from compressor.report import render_fidelity


def _net(seed: int = 0, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, classes)).eval()


def _loader(labels: torch.Tensor) -> DataLoader:
    x = torch.randn(len(labels), 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return DataLoader(TensorDataset(x, labels), batch_size=16)


def _outputs(logits, labels=None, features=None) -> Outputs:
    logits = torch.tensor(logits, dtype=torch.float64)
    labels = torch.full((len(logits),), -1) if labels is None else torch.tensor(labels)
    return Outputs(logits if features is None else features, logits, labels)


def test_identical_models_agree_fully():
    model = _net()
    result = fidelity(model, copy.deepcopy(model), _loader(torch.arange(40) % 10))
    assert result.images == 40
    assert result.top1_agreement == 100.0
    assert result.top5_overlap == 100.0
    assert result.kl_divergence == pytest.approx(0.0, abs=1e-12)
    assert result.feature_cka == pytest.approx(1.0, abs=1e-9)
    assert result.original_accuracy == result.pruned_accuracy
    assert result.original_accuracy.images == 40


def test_a_perturbed_model_agrees_less():
    model = _net()
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    result = fidelity(model, perturbed, _loader(torch.full((64,), -1)))
    assert result.top1_agreement < 100.0
    assert result.top5_overlap < 100.0
    assert result.kl_divergence > 1e-3
    assert result.feature_cka < 0.999
    assert result.original_accuracy is None and result.pruned_accuracy is None


def test_kl_and_agreement_known_answers():
    # softmax of log-probabilities gives the probabilities back: p = (0.5, 0.5), q = (0.9, 0.1)
    p, q = [math.log(0.5), math.log(0.5)], [math.log(0.9), math.log(0.1)]
    result = compare(_outputs([p, p]), _outputs([q, p]))
    expected_kl = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert result.kl_divergence == pytest.approx(expected_kl / 2)  # one image differs, one is identical
    assert result.top5_overlap == 100.0  # two classes: top-k is both of them


def test_top5_overlap_and_accuracy_known_answers():
    a = [[6.0, 5, 4, 3, 2, 1, 0]]  # top-5 {0..4}
    b = [[0.0, 5, 4, 3, 2, 1, 6]]  # top-5 {6, 1, 2, 3, 4}: 4 shared, top-1 differs
    result = compare(_outputs(a, labels=[0]), _outputs(b, labels=[0]))
    assert result.top5_overlap == pytest.approx(80.0)
    assert result.top1_agreement == 0.0
    assert (result.original_accuracy.top1, result.original_accuracy.top5) == (100.0, 100.0)
    assert (result.pruned_accuracy.top1, result.pruned_accuracy.top5) == (0.0, 0.0)


def test_cka_ignores_rotation_and_scale():
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    logits = [[0.0, 1.0]] * 50
    result = compare(_outputs(logits, features=features), _outputs(logits, features=3 * features @ rotation))
    assert result.feature_cka == pytest.approx(1.0)


def test_outputs_are_in_loader_order():
    model = _net()
    loader = _loader(torch.arange(20) % 10)
    got = outputs(model, loader)
    x = torch.cat([b[0] for b in loader])
    with torch.no_grad():
        torch.testing.assert_close(got.logits, model(x))
    assert got.features.shape == (20, 16)


def test_report_lines_show_accuracy_only_when_labelled():
    model = _net()
    labelled = fidelity(model, _net(seed=1), _loader(torch.arange(16) % 10)).to_dict()
    unlabelled = fidelity(model, _net(seed=1), _loader(torch.full((16,), -1))).to_dict()

    def section(f):
        return {"images": 16, "labelled": f["original_accuracy"] is not None, "before_finetune": f,
                "after_finetune": f}

    text = "\n".join(render_fidelity(section(labelled)))
    assert "top-1 agreement" in text and "pruned top-1 accuracy" in text
    text = "\n".join(render_fidelity(section(unlabelled)))
    assert "accuracy (%)" not in text and "unlabelled" in text


def test_confident_agreement_counts_only_confident_originals():
    def logs(*p):
        return [math.log(v) for v in p]

    sure, unsure = logs(0.8, 0.1, 0.1), logs(0.4, 0.35, 0.25)  # top-1 probability 0.8 and 0.4
    sure_flipped, unsure_flipped = logs(0.1, 0.8, 0.1), logs(0.35, 0.4, 0.25)
    result = compare(_outputs([sure, sure, unsure, unsure]),
                     _outputs([sure, sure_flipped, unsure_flipped, unsure_flipped]))
    assert result.top1_agreement == 25.0
    assert (result.confident_images, result.confident_agreement) == (2, 50.0)
    assert compare(_outputs([unsure]), _outputs([unsure])).confident_agreement is None


class _Column(nn.Module):
    """Classifies by which column of the image is brightest: a one-pixel roll moves every answer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2))  # batch x width: one class per column


def test_shift_agreement_known_answers():
    x = torch.zeros(6, 1, 4, 5)
    x[torch.arange(6), 0, :, torch.tensor([0, 1, 2, 3, 4, 0])] = 1.0
    loader = DataLoader(TensorDataset(x, torch.zeros(6)), batch_size=4)
    assert shift_agreement(_Column(), loader) == 0.0  # every bright column moves
    invariant = nn.Sequential(nn.Conv2d(1, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # a roll changes nothing
    assert shift_agreement(invariant, loader) == 100.0


def test_report_gives_the_shift_reference_when_known():
    f = {"images": 4, "labelled": False, "unpruned_shift_agreement": 87.5,
         "before_finetune": compare(_outputs([[1.0, 0.0]]), _outputs([[1.0, 0.0]])).to_dict(),
         "after_finetune": compare(_outputs([[1.0, 0.0]]), _outputs([[1.0, 0.0]])).to_dict()}
    assert any("agrees with itself on 87.5%" in line for line in render_fidelity(f))
    assert not any("agrees with itself" in line for line in render_fidelity({**f, "unpruned_shift_agreement": None}))
