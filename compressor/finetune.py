"""Training loops: supervised training of zoo models and distillation fine-tuning."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(total, 1)


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
          weight_decay: float = 5e-4, desc: str = "train") -> nn.Module:
    """SGD (momentum 0.9, Nesterov), linear warm-up then a per-step cosine schedule.

    With a `teacher`, the loss is distillation from its logits mixed with the
    labels; without one, plain cross-entropy.
    """
    if epochs <= 0:
        return model
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=weight_decay)
    steps = epochs * len(loader)
    warmup = max(1, min(len(loader), steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    if teacher is not None:
        teacher.eval()
    with tqdm(total=steps, desc=desc, unit="step", disable=None, leave=False) as bar:
        for _ in range(epochs):
            model.train()
            for x, y in loader:
                logits = model(x)
                if teacher is None:
                    loss = F.cross_entropy(logits, y)
                else:
                    with torch.no_grad():
                        target = teacher(x)
                    loss = distillation_loss(logits, target, y, temperature, alpha)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
                bar.update()
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model
