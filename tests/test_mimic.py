"""Feature mimicking: where the student is matched, what stays frozen, and that training honours both."""

from __future__ import annotations

import torch

from compressor.finetune.mimic import PENULTIMATE, Taps, mimic_loss, plan_mimic
from compressor.finetune.training import train
from compressor.graph.surgery import remove_units
from compressor.graph.units import find_units, units_by_name
from compressor.models.zoo import build


def _resnet20():
    torch.manual_seed(0)
    model = build("resnet20", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    return model, x, find_units(model, x)


def test_plan_freezes_the_prefix_and_matches_the_kept_blocks_after_it():
    model, x, units = _resnet20()
    removed = units_by_name(units, ["layer2.1", "layer3.2"])
    student = remove_units(model, removed, x)
    plan = plan_mimic(student, removed, x)
    # everything before layer2.1 is frozen: the stem, layer1 and layer2.0 (its projection too)
    frozen_owners = {name.rpartition(".")[0] for name in plan.frozen}
    assert {"conv1", "bn1", "layer1.0.conv1", "layer1.2.bn2", "layer2.0.conv1", "layer2.0.shortcut.0"} <= frozen_owners
    assert not any(name.startswith(("layer2.2", "layer3", "fc")) for name in plan.frozen)
    # the blocks of the units' parents that run after the first change, minus the removed ones
    assert plan.points == ("layer2.2", "layer3.0", "layer3.1")
    assert plan.penultimate == "fc"


def test_nothing_changed_means_nothing_to_match_or_freeze():
    model, x, _ = _resnet20()
    plan = plan_mimic(model, [], x)
    assert plan.points == () and plan.frozen == () and plan.penultimate == "fc"


def test_taps_and_loss():
    model, x, units = _resnet20()
    removed = units_by_name(units, ["layer2.1"])
    student = remove_units(model, removed, x)
    plan = plan_mimic(student, removed, x)
    with Taps(model, plan) as teacher_taps, Taps(student, plan) as student_taps, torch.no_grad():
        model(x)
        student(x)
        assert set(teacher_taps.values) == {*plan.points, PENULTIMATE}
        assert teacher_taps.values[PENULTIMATE].shape == (2, 64)
        assert mimic_loss(teacher_taps.values, teacher_taps.values).item() == 0.0
        assert mimic_loss(student_taps.values, teacher_taps.values).item() > 0.0
    assert not model._forward_hooks and not model.fc._forward_pre_hooks  # hooks removed on exit


def test_training_with_a_plan_keeps_the_prefix_and_lowers_the_feature_gap():
    model, x, units = _resnet20()
    removed = units_by_name(units, ["layer2.1", "layer3.1"])
    student = remove_units(model, removed, x)
    plan = plan_mimic(student, removed, x)
    images = torch.randn(64, 3, 32, 32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.full((64,), -1)),
                                         batch_size=16)

    def gap() -> float:
        with Taps(model, plan) as t, Taps(student, plan) as s, torch.no_grad():
            model(images)
            student(images)
            return mimic_loss(s.values, t.values).item()

    before_gap = gap()
    params = dict(student.named_parameters())
    before = {name: p.detach().clone() for name, p in params.items()}
    train(student, loader, epochs=3, lr=0.001, teacher=model, freeze_batchnorm=True, mimic=plan)
    for name in plan.frozen:
        assert torch.equal(params[name], before[name]), name
    assert not torch.equal(params["layer3.2.conv1.weight"], before["layer3.2.conv1.weight"])
    assert all(p.requires_grad for p in student.parameters())  # freezing lasts only while training
    assert gap() < 0.7 * before_gap


def test_the_frozen_prefix_keeps_its_batchnorm_statistics():
    model, x, units = _resnet20()
    removed = units_by_name(units, ["layer3.1"])
    student = remove_units(model, removed, x)
    plan = plan_mimic(student, removed, x)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32) * 2 + 1,
                                                                        torch.full((16,), -1)), batch_size=8)
    prefix_bn, late_bn = student.layer2[0].bn1, student.layer3[2].bn1
    prefix_stats, late_stats = prefix_bn.running_mean.clone(), late_bn.running_mean.clone()
    train(student, loader, epochs=1, lr=0.001, teacher=model, mimic=plan)  # BatchNorm not frozen otherwise
    assert torch.equal(prefix_bn.running_mean, prefix_stats)
    assert not torch.equal(late_bn.running_mean, late_stats)
