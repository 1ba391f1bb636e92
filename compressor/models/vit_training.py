"""The training recipe of `vit_digits`: AdamW, warm-up then cosine, label smoothing, random affine jitter.

A ViT trained from scratch on 1,437 digit images overfits without augmentation and
trains poorly with the SGD recipe the CIFAR ResNets use, so it has its own, after
DeiT's (Touvron et al. 2021): AdamW with decoupled weight decay (none on norms,
biases, embeddings and layer scales), linear warm-up then a per-step cosine schedule,
label smoothing, stochastic depth inside the model, and every batch randomly
rotated, scaled, sheared and shifted (affine_grid + grid_sample, batched).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from compressor.data.bundle import DataBundle
from compressor.models.recipes import TrainSettings, cosine_schedule, optimiser_step, training_compute

EPOCHS = 150
LR = 1e-3  # at batch 64
BATCH = 64
WEIGHT_DECAY = 0.05
WARMUP_EPOCHS = 10
LABEL_SMOOTHING = 0.1
ROTATE = 12.0  # degrees, either way
SCALE = (0.85, 1.15)
SHEAR = 0.15  # radians-ish: tan of the shear angle, either way
SHIFT = 0.15  # of the half-width (0.15 ~ 2.4 px on 32 px), either way


def affine_jitter(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image of the batch rotated, scaled, sheared and shifted at random (bilinear; borders repeated,
    so the standardised background stays background)."""
    n = x.shape[0]

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) * (hi - lo) + lo

    angle = uniform(-ROTATE, ROTATE) * math.pi / 180
    scale = uniform(*SCALE)
    shear = uniform(-SHEAR, SHEAR)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear * cos, uniform(-SHIFT, SHIFT)], 1),
                         torch.stack([sin, cos + shear * sin, uniform(-SHIFT, SHIFT)], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the weight matrices and kernels only (timm's rule: nothing of dimension < 2,
    no embeddings)."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (rest if p.dim() < 2 or name.endswith(("pos_embed", "cls_token")) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


@torch.no_grad()
def accuracy(model: nn.Module, data: DataBundle) -> float:
    """Top-1 accuracy (%) on the held-out split (on the model's device)."""
    model.eval()
    device = next(model.parameters(), torch.empty(0)).device  # an oracle may have none
    correct = total = 0
    for x, y in data.loader("val", batch_size=256):
        correct += int((model(x.to(device)).argmax(1).cpu() == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


def train_vit(model: nn.Module, data: DataBundle, settings: TrainSettings) -> dict[str, float]:
    """Train `model` on `data`'s labelled training split with the recipe above (settings left None: its
    defaults), on settings.compute's device and precision; returns the settings used and {"val_accuracy":
    top-1 % on the held-out split}."""
    from compressor.compute.amp import autocast

    epochs, lr = settings.epochs or EPOCHS, settings.lr or LR
    batch_size, seed = settings.batch_size or BATCH, settings.seed
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    loader = data.loader("train", batch_size=batch_size, shuffle=True, seed=seed)
    optimiser = torch.optim.AdamW(_parameter_groups(model, WEIGHT_DECAY), lr=lr)
    steps = epochs * len(loader)
    schedule = cosine_schedule(optimiser, steps, WARMUP_EPOCHS * len(loader))
    compute, scaler = training_compute(settings)
    with compute.placed(model), tqdm(total=steps, desc="train vit", unit="step", disable=None, leave=False) as bar:
        for _ in range(epochs):
            model.train()
            for x, y in loader:
                x = affine_jitter(x, generator).to(compute.device)
                with autocast(compute.amp, compute.device):
                    loss = F.cross_entropy(model(x), y.to(compute.device), label_smoothing=LABEL_SMOOTHING)
                optimiser_step(loss, optimiser, schedule, scaler)
                bar.update()
        model.eval()
        acc = accuracy(model, data)
    return {"epochs": epochs, "lr": lr, "batch_size": batch_size, "val_accuracy": acc}
