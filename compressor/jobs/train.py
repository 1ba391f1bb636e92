"""`compressor train`: a zoo architecture trained on a data source with our own training loop."""

from __future__ import annotations

from pathlib import Path

import torch

from compressor.data.bundle import DataBundle
from compressor.fileio import refuse_existing_file
from compressor.finetune.training import accuracy, train
from compressor.models.checkpoint import save_checkpoint
from compressor.models.loaded import LoadedModel
from compressor.models.zoo import build


def train_zoo_model(arch: str, data: DataBundle, out: str | Path, epochs: int, lr: float, batch_size: int,
                    seed: int, train_device: str = "cpu", amp: str = "auto") -> float:
    """Train `arch` on `data` on `train_device` (compute/device.py; `amp`: mixed precision there), write the
    checkpoint to `out` (refused if it exists); returns validation accuracy (%)."""
    from compressor.compute.amp import resolve_amp
    from compressor.compute.context import Compute
    from compressor.compute.device import resolve_device

    device = resolve_device(train_device)
    compute = Compute(device, resolve_amp(amp, device), workers=0)
    out = refuse_existing_file(out)
    torch.manual_seed(seed)
    model = build(arch, data.num_classes)
    with compute.placed(model):
        train(model, data.loader("train", batch_size=batch_size, shuffle=True, seed=seed), epochs, lr,
              desc=f"train {arch}", compute=compute)
        acc = accuracy(model, compute.batches(data.loader("val"), model))
    loaded = LoadedModel(model, arch, data.num_classes, data.input_shape, f"trained on {data.spec}")
    save_checkpoint(out, loaded, trained_on=data.spec, epochs=epochs, val_accuracy=acc)
    return acc
