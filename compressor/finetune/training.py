"""Training loops: supervised training of zoo models and distillation fine-tuning.

Unlabelled items carry label -1 (compressor.data.UNLABELLED): a batch of them is
fine-tuned by pure distillation from the teacher, and never counted in accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from compressor.errors import InputError
from compressor.finetune.mimic import MimicPlan, Taps, freeze, mimic_loss


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in percent over the labelled items; InputError if every item is unlabelled."""
    model.eval()
    correct = total = unlabelled = 0
    for x, y in loader:
        labelled = y >= 0
        unlabelled += int((~labelled).sum())
        if labelled.all():
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
        elif labelled.any():
            correct += (model(x[labelled]).argmax(1) == y[labelled]).sum().item()
            total += int(labelled.sum())
    if total == 0 and unlabelled:
        msg = "no labelled images to compute accuracy on"
        raise InputError(msg)
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def teacher_labelled(loader: DataLoader, teacher: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches with every unlabelled item (-1) labelled by the teacher's top-1,
    for criteria that need labels (sr_init, taylor) on an unlabelled source."""
    teacher.eval()
    batches = []
    for x, y in loader:
        missing = y < 0
        if missing.any():
            from compressor.metrics.outputs import first_logits

            y = torch.where(missing, first_logits(teacher(x), why="a criterion that reads labels").argmax(1), y)
        batches.append((x, y))
    return batches


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor | None, temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels) (Hinton et al. 2015)."""
    kd = F.kl_div(F.log_softmax(student_logits / temperature, 1),
                  F.log_softmax(teacher_logits / temperature, 1),
                  reduction="batchmean", log_target=True) * temperature**2
    if labels is None or alpha >= 1.0:
        return kd
    return alpha * kd + (1 - alpha) * F.cross_entropy(student_logits, labels)


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float,
          teacher: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.7,
          weight_decay: float = 5e-4, desc: str = "train", freeze_batchnorm: bool = False,
          mimic: MimicPlan | None = None, mimic_weight: float = 1.0,
          on_epoch: Callable[[dict], None] | None = None, resume: dict | None = None) -> nn.Module:
    """SGD (momentum 0.9, Nesterov), linear warm-up then a per-step cosine schedule.

    With a `teacher`, the loss is distillation from its logits mixed with the
    labels (pure distillation for a batch with unlabelled items); without one,
    plain cross-entropy, which needs labels (InputError otherwise). With
    `freeze_batchnorm`, BatchNorm layers normalise with their running statistics
    and keep them (their affine parameters still learn): for fine-tuning on
    few images, whose statistics would overwrite the pretrained ones. With a
    `mimic` plan (and a teacher), `mimic_weight` x the feature-mimicking loss
    (compressor.finetune.mimic) is added and the plan's prefix parameters stay frozen.

    `on_epoch(state)` gets, after every epoch, {"epoch": epochs done, "model", "optimiser", "schedule":
    state_dicts}; `resume` is such a state, from which training continues (the model's weights, the
    optimiser's momentum and the schedule's step are restored, and the finished epochs are skipped).
    """
    if epochs <= 0:
        return model
    if mimic is not None and teacher is None:
        msg = "feature mimicking needs a teacher"
        raise InputError(msg)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    if mimic is not None:
        freeze(model, mimic.frozen)
    try:
        _train(model, loader, epochs, lr, teacher, temperature, alpha, weight_decay, desc, freeze_batchnorm,
               mimic, mimic_weight, on_epoch, resume)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
    model.eval()
    return model


def _train(model: nn.Module, loader: DataLoader, epochs: int, lr: float, teacher: nn.Module | None,
           temperature: float, alpha: float, weight_decay: float, desc: str, freeze_batchnorm: bool,
           mimic: MimicPlan | None, mimic_weight: float, on_epoch: Callable[[dict], None] | None,
           resume: dict | None) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=weight_decay)
    steps = epochs * len(loader)
    warmup = max(1, min(len(loader), steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    done = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimiser.load_state_dict(resume["optimiser"])
        schedule.load_state_dict(resume["schedule"])
        done = int(resume["epoch"])
    if teacher is not None:
        teacher.eval()
    student_taps = Taps(model, mimic) if mimic is not None else None
    teacher_taps = Taps(teacher, mimic) if mimic is not None else None
    bar = tqdm(total=steps, initial=done * len(loader), desc=desc, unit="step", disable=None, leave=False)
    with student_taps or nullcontext(), teacher_taps or nullcontext(), bar:
        for epoch in range(done, epochs):
            model.train()
            frozen = set(mimic.frozen) if mimic is not None else set()
            for name, m in model.named_modules():
                # frozen statistics: all of them, or those of the frozen prefix (it must stay the teacher's)
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and (freeze_batchnorm or f"{name}.weight" in frozen):
                    m.eval()
            for x, y in loader:
                labels = y if bool((y >= 0).all()) else None
                if teacher is None and labels is None:
                    msg = "cannot train on unlabelled images without a teacher to distil from"
                    raise InputError(msg)
                logits = model(x)
                if teacher is None:
                    loss = F.cross_entropy(logits, labels)
                else:
                    with torch.no_grad():
                        target = teacher(x)
                    loss = distillation_loss(logits, target, labels, temperature, alpha)
                    if student_taps is not None:
                        loss = loss + mimic_weight * mimic_loss(student_taps.values, teacher_taps.values)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
            if on_epoch is not None:
                on_epoch({"epoch": epoch + 1, "model": model.state_dict(), "optimiser": optimiser.state_dict(),
                          "schedule": schedule.state_dict()})
