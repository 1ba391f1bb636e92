"""How zoo architectures are trained here: the settings a user may give, the default (SGD) recipe, the schedule.

A zoo entry names its own recipe where the default does not suit it (`vit_digits`:
AdamW and augmentation; `det_digits`: a detection loss on canvases); each returns
the figures it reaches on the held-out split, which the checkpoint records.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from compressor.data.bundle import DataBundle

if TYPE_CHECKING:
    from compressor.compute.context import Compute

SGD_EPOCHS = 20
SGD_LR = 0.1
SGD_BATCH = 32


@dataclass(frozen=True)
class TrainSettings:
    """What a user may set; None: the recipe's own default. `compute`: where it trains (compressor.compute:
    device and mixed precision; None: the CPU in fp32)."""

    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    seed: int = 0
    compute: Compute | None = None


# trains the model in place on the data; returns what a checkpoint records: the settings it used (epochs, lr,
# batch_size) and its figures on the held-out split ({"val_accuracy": %, ...})
Recipe = Callable[[nn.Module, DataBundle, TrainSettings], dict[str, float]]


def sgd_recipe(model: nn.Module, data: DataBundle, settings: TrainSettings) -> dict[str, float]:
    """The CIFAR ResNets' recipe (compressor.finetune.training.train: SGD, warm-up, cosine), 20 epochs at
    lr 0.1 and batch 32 by default; returns the settings used and {"val_accuracy": top-1 %}."""
    from compressor.compute.context import Compute
    from compressor.finetune.training import accuracy, train

    epochs, lr, batch_size = settings.epochs or SGD_EPOCHS, settings.lr or SGD_LR, settings.batch_size or SGD_BATCH
    compute = settings.compute or Compute.local()
    torch.manual_seed(settings.seed)
    loader = data.loader("train", batch_size=batch_size, shuffle=True, seed=settings.seed)
    with compute.placed(model):
        train(model, loader, epochs, lr, desc=f"train {type(model).__name__}", compute=compute)
        acc = accuracy(model, compute.batches(data.loader("val"), model))
    return {"epochs": epochs, "lr": lr, "batch_size": batch_size, "val_accuracy": acc}


def cosine_schedule(optimiser: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine from the full rate to zero at `steps` (stepped per batch)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, steps - warmup) / max(steps - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def optimiser_step(loss: torch.Tensor, optimiser: torch.optim.Optimizer,
                   schedule: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None = None) -> None:
    """One step of a recipe's loop: gradients of `loss` (scaled by `scaler` for fp16), the optimiser's update,
    the schedule's next rate."""
    optimiser.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimiser.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimiser)
        scaler.update()
    schedule.step()


def training_compute(settings: TrainSettings) -> tuple[Compute, torch.amp.GradScaler]:
    """The compute a recipe trains on (settings.compute, else the CPU in fp32) and its loss scaler
    (enabled for fp16 only)."""
    from compressor.compute.amp import grad_scaler
    from compressor.compute.context import Compute

    compute = settings.compute or Compute.local()
    return compute, grad_scaler(compute.amp, compute.device)
