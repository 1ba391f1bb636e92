"""What each process of a torchrun group runs in tests/test_scale.py (or one process alone): score the
units of a small network and fine-tune it with a block removed, through the code the prune job uses, in
float32 (as a prune does) and again in float64; rank 0 saves the results into the folder given.

    python -m torch.distributed.run --nproc-per-node 2 tests/ranks.py OUT [--unsynced-batchnorm]
    python -m torch.distributed.run --nproc-per-node 2 tests/ranks.py OUT --prune PROFILE

--unsynced-batchnorm leaves every rank's BatchNorm on its own share of each batch (what data-parallel
fine-tuning does without compute/syncbn.py), in float64 only: the control showing that the test's
tolerance sees that difference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRAIN_IMAGES, VAL_IMAGES = 64, 32
GLOBAL_BATCH = 16  # 4 steps an epoch, 8 or 4 images per rank and step
EPOCHS = 2
CALIBRATION_BATCH = 16  # 4 calibration batches, 2 per rank
CRITERIA = ("cka", "sr_init", "taylor", "entropy")


def small_data():
    """The first 64 training and 32 held-out digits32 images."""
    from torch.utils.data import TensorDataset

    from compressor.data import load_digits32
    from compressor.data.bundle import DataBundle

    digits = load_digits32()
    train, val = digits.train.tensors, digits.val.tensors
    return DataBundle("digits32[:64]", TensorDataset(train[0][:TRAIN_IMAGES], train[1][:TRAIN_IMAGES]),
                      TensorDataset(val[0][:VAL_IMAGES], val[1][:VAL_IMAGES]), 10, (3, 32, 32))


def teacher_and_student():
    """A seeded ResNet-8 (three blocks; BatchNorm statistics set) and a copy without its first block."""
    from compressor.graph.surgery import remove_units
    from compressor.graph.units import find_units
    from compressor.models.cifar_resnet import CifarResNet
    from tests.helpers import randomise_batchnorm

    torch.manual_seed(0)
    teacher = randomise_batchnorm(CifarResNet(8, 10))
    x = torch.randn(1, 3, 32, 32)
    units = find_units(teacher, x)
    return teacher, remove_units(teacher, units[:1], x), units


def fine_tuned(dtype: torch.dtype, compute) -> dict[str, torch.Tensor]:
    """The student's weights after EPOCHS epochs of distillation in `dtype`, from the same start."""
    from compressor.stages.options import PruneOptions
    from compressor.stages.recover import FinetuneSettings, finetune

    data = small_data()
    data.train.tensors = (data.train.tensors[0].to(dtype), data.train.tensors[1])
    teacher, student, _ = teacher_and_student()
    teacher.to(dtype)
    student.to(dtype)
    options = PruneOptions(finetune_batch=GLOBAL_BATCH, seed=3, train_device="cpu")
    finetune(student, teacher, data, FinetuneSettings(0.05, False, False), None, EPOCHS, options, compute)
    return student.state_dict()


def main(out: Path, unsynced: bool) -> None:
    import compressor.finetune.training as training
    from compressor.compute.context import in_group, open_compute
    from compressor.compute.loaders import shard_batches
    from compressor.criteria import ScoringContext, score_units

    if unsynced:
        training.synchronise_batchnorm = lambda *_: []
    result: dict = {}
    with in_group(open_compute("cpu", "auto", 0)) as compute:
        world = compute.world
        if not unsynced:
            teacher, _, units = teacher_and_student()
            calibration = torch.utils.data.DataLoader(small_data().train, batch_size=CALIBRATION_BATCH)
            share = shard_batches(calibration, world)
            result["scores"] = {name: score_units(name, ScoringContext(teacher, units, share, seed=1, repeats=2,
                                                                      group=world)) for name in CRITERIA}
            result["batches"] = len(share)
            result["float32"] = fine_tuned(torch.float32, compute)
        result["float64"] = fine_tuned(torch.float64, compute)
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            torch.save({**result, "processes": world.size}, out / "result.pt")


def prune_on_every_rank(out: Path, profile: Path) -> None:
    """compressor.prune on the user's own module and DataLoader (the same on every rank), writing into
    OUT/run; every rank writes what it got back to OUT/rank-<r>.json."""
    import json
    import os

    import compressor
    from compressor.data import load_digits32
    from compressor.stages.state import weights_digest
    from tests.helpers import resnet20

    loader = torch.utils.data.DataLoader(load_digits32().train, batch_size=64)
    result = compressor.prune(resnet20(), data=loader, target=compressor.Speedup(1.2), profile=profile,
                              out=out / "run", log=None, finetune_epochs=1, calibration_size=64, max_trials=1,
                              train_device="cpu")
    rank = int(os.environ.get("RANK", 0))
    (out / f"rank-{rank}.json").write_text(json.dumps(
        {"report": result.report, "recipe": result.recipe, "weights": weights_digest(result.model)}, default=str))


if __name__ == "__main__":
    if "--prune" in sys.argv:
        prune_on_every_rank(Path(sys.argv[1]), Path(sys.argv[sys.argv.index("--prune") + 1]))
    else:
        main(Path(sys.argv[1]), "--unsynced-batchnorm" in sys.argv[2:])
