"""`compressor train`: a zoo architecture trained on a data source with its recipe (our own training code)."""

from __future__ import annotations

from pathlib import Path

from compressor.data.bundle import DataBundle
from compressor.fileio import refuse_existing_file
from compressor.models.checkpoint import save_checkpoint
from compressor.models.loaded import LoadedModel
from compressor.models.recipes import TrainSettings
from compressor.models.trained import train_recipe


def train_zoo_model(arch: str, data: DataBundle, out: str | Path, epochs: int | None = None,
                    lr: float | None = None, batch_size: int | None = None, seed: int = 0,
                    train_device: str = "cpu", amp: str = "auto") -> dict[str, float]:
    """Train `arch` on `data` with its recipe (None: the recipe's default) on `train_device`
    (compute/device.py; `amp`: mixed precision there), write the checkpoint to `out` (refused if it
    exists); returns what the recipe reports (settings used, figures on the held-out split, such as
    val_accuracy in %)."""
    from compressor.compute.amp import resolve_amp
    from compressor.compute.context import Compute
    from compressor.compute.device import resolve_device

    device = resolve_device(train_device)
    compute = Compute(device, resolve_amp(amp, device), workers=0)
    out = refuse_existing_file(out)
    model, record = train_recipe(arch, data, TrainSettings(epochs, lr, batch_size, seed, compute))
    loaded = LoadedModel(model, arch, data.num_classes, data.input_shape, f"trained on {data.spec}")
    save_checkpoint(out, loaded, trained_on=data.spec, seed=seed, **record)
    return record
