"""Stage `recover`: surgery, then fine-tuning by distillation from the unpruned model.

Fidelity to the unpruned model is measured on the held-out split before and
after fine-tuning (metrics/fidelity.py); accuracy only where it is labelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from compressor.compute.context import Compute
from compressor.compute.group import World
from compressor.compute.loaders import global_batch, shard_batches, training_loader
from compressor.data.bundle import DataBundle
from compressor.errors import InputError
from compressor.finetune.mimic import MimicPlan, plan_mimic
from compressor.finetune.training import train
from compressor.graph.surgery import remove_units
from compressor.graph.units import Unit
from compressor.metrics.fidelity import Fidelity, fidelity, outputs, shift_agreement
from compressor.models.loaded import LoadedModel
from compressor.rewrite.linearised import merge_linearised, verify_merges
from compressor.stages.options import PruneOptions
from compressor.stages.plan import Plan
from compressor.stages.state import RunState

FINETUNE_LR = 0.02
# A model with its own (ImageNet) weights is fine-tuned on a few hundred crops of other photos: at
# lr 0.02 it drifts away from the original on held-out photos (efficientnet_lite0, 3 blocks removed,
# photos: top-1 agreement 63% before fine-tuning, 50% after; 1% with BatchNorm frozen), at 0.002
# with BatchNorm statistics frozen it stays closer (66%; 62% with them updated). One run each.
PRETRAINED_FINETUNE_LR = 0.002
# A model without BatchNorm (a transformer, normalised by LayerNorm) is trained with AdamW at about 1e-3;
# SGD with momentum at 0.02 throws it off (vit_digits, 9 branches removed: held-out top-1 agreement 99.2%
# before fine-tuning, 96.7% after, the loss rising in the second epoch); it gets the gentle rate too.
NO_BATCHNORM_FINETUNE_LR = 0.002


class FinetuneSettings(NamedTuple):
    lr: float
    freeze_batchnorm: bool
    mimic: bool


def finetune_settings(options: PruneOptions, loaded: LoadedModel) -> FinetuneSettings:
    """How to fine-tune: the options' choices, or the defaults for the model's lineage. A model with
    its own (ImageNet) weights, fine-tuned on a few hundred crops of other photos, gets the gentle
    learning rate, frozen BatchNorm statistics and feature mimicking; one trained here on labelled
    data gets plain distillation mixed with its labels, at the gentle rate where it has no BatchNorm."""
    pretrained = loaded.pretrained
    mimic = pretrained if options.mimic is None else options.mimic
    if options.finetune_lr is None and pretrained:
        freeze = True if options.freeze_batchnorm is None else options.freeze_batchnorm
        return FinetuneSettings(PRETRAINED_FINETUNE_LR, freeze, mimic)
    default = FINETUNE_LR if has_batchnorm(loaded.model) else NO_BATCHNORM_FINETUNE_LR
    lr = default if options.finetune_lr is None else options.finetune_lr
    return FinetuneSettings(lr, bool(options.freeze_batchnorm), mimic)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@dataclass
class Recovered:
    """The pruned, fine-tuned model and how closely it follows the unpruned one."""

    pruned: nn.Module  # linearised merge blocks still in their trainable form, BatchNorm in place
    deployed: nn.Module  # what is exported: linearised blocks merged into one conv
    before: Fidelity | None  # held-out fidelity before fine-tuning (None on ranks other than 0)
    after: Fidelity | None  # and after
    shift_agreement: float | None  # the unpruned model's own agreement under a one-pixel shift (%)
    settings: FinetuneSettings
    merge_checks: dict[str, dict]


def _log_fidelity(log: Callable[[str], None], when: str, f: Fidelity) -> None:
    log(f"held-out fidelity {when} fine-tuning: {f.summary()}, CKA {f.feature_cka:.3f}")


def recover(plan: Plan, removed: list[Unit], data: DataBundle, options: PruneOptions,
            log: Callable[[str], None], state: RunState, compute: Compute | None = None) -> Recovered:
    """Remove `removed` from the model and fine-tune the result by distillation; a checkpoint after every
    epoch lets a resumed run continue from the last finished one (for the same units).

    `compute` says where (default: the CPU, one process). Fidelity is measured by rank 0 alone; in a
    process group every rank fine-tunes its share of each global batch, and ranks other than 0 return a
    Recovered without fidelity (None)."""
    compute = compute or Compute.local()
    main = compute.world.is_main
    model, x = plan.model, plan.example
    pruned = remove_units(model, removed, x)  # merged blocks linearised, BatchNorm kept for fine-tuning
    val = None
    if main:  # fidelity is rank 0's; with loader workers, pinned memory, on the device
        workers = compute.loader_workers(data.val, "fidelity")
        held_out = shard_batches(data.loader("val"), World(), workers, compute.pin_memory)
        val = compute.batches(held_out, model)
    passes = len(data.val) if main else 0  # held-out images per pass of one model
    reference = before = stability = None
    with compute.placed(model):
        if main:
            with compute.timed("fidelity", 4 * passes):
                reference = outputs(model, val, options.logits)
                stability = shift_agreement(model, val)
                before = fidelity(model, compute.on_device(merge_linearised(pruned)), val, reference)
            if stability is not None:
                log(f"the unpruned model agrees with itself on {stability:.1f}% of the held-out images shifted by "
                    "one pixel")
            _log_fidelity(log, "before", before)
        settings = finetune_settings(options, plan.loaded)
        mimic = plan_mimic(pruned, removed, x) if settings.mimic and removed else None
        epochs = options.finetune_epochs if removed else 0  # nothing removed (INT8 alone met the target): a copy
        log(f"fine-tuning {len(removed)}-unit-smaller model by distillation for {epochs} epochs "
            f"(lr {settings.lr:g}{', BatchNorm statistics frozen' if settings.freeze_batchnorm else ''}"
            f"{', mimicking ' + mimic.describe() if mimic else ''}; {compute.describe()})" if removed
            else "nothing removed: the model is the unpruned one, not fine-tuned")
        names = [u.name for u in removed]
        resume = _resume(state, names, options, compute)

        def on_epoch(epoch: dict) -> None:
            state.save_tensors("finetune", {**epoch, "removed": names})
            log(f"  fine-tune epoch {epoch['epoch']}/{epochs}: loss {epoch['loss']:.4f}, "
                f"{epoch['images_per_s']:,.0f} images/s")

        finetune(pruned, model, data, settings, mimic, epochs, options, compute, on_epoch, resume)
        merge_checks = verify_merges(pruned, x)  # the deployed merge of each linearised block, interior exact
        deployed = merge_linearised(pruned)
        after = None
        if main:
            with compute.timed("fidelity", passes):
                after = fidelity(model, compute.on_device(deployed), val, reference)
            _log_fidelity(log, "after", after)
    return Recovered(pruned, deployed, before, after, stability, settings, merge_checks)


def _resume(state: RunState, names: list[str], options: PruneOptions, compute: Compute) -> dict | None:
    """Rank 0's fine-tuning checkpoint of the same units, on every rank; InputError if it was saved by
    another number of processes (the global batch is the same, but not how it was shared out: resume
    with the same torchrun --nproc-per-node and --nnodes)."""
    world = compute.world
    resume = state.load_tensors("finetune") if world.is_main else None
    if resume is not None and resume.get("removed") != names:
        resume = None
    if resume is not None:
        saved = int(resume.get("world_size", 1))
        if saved != world.size:
            msg = (f"--resume: the fine-tuning checkpoint was saved by {saved} process(es), this run has "
                   f"{world.size}: each would fine-tune another share of every global batch, with BatchNorm "
                   f"statistics and sums reduced another way; resume with {saved} process(es)")
            raise InputError(msg)
        state.note_reused(f"fine-tuning, {int(resume['epoch'])} of {options.finetune_epochs} epochs done")
    if not world.share("finetune-resume", resume is not None):
        return None
    return world.broadcast(resume)


def finetune(pruned: nn.Module, teacher: nn.Module, data: DataBundle, settings: FinetuneSettings,
             mimic: MimicPlan | None, epochs: int, options: PruneOptions, compute: Compute,
             on_epoch: Callable[[dict], None] | None = None, resume: dict | None = None) -> nn.Module:
    """Distil `teacher` (already on compute's device) into `pruned` for `epochs` epochs of
    options.finetune_batch images per step, all processes together, in DistributedSampler's order seeded
    by options.seed (the same global batches on any number of processes: compute/loaders.py)."""
    if epochs <= 0:
        return pruned
    batch = global_batch(options.finetune_batch, len(data.train), compute.world)
    workers = compute.loader_workers(data.train, "finetune")
    loader = training_loader(data.train, batch, options.seed, compute.world, workers, compute.pin_memory,
                             data.loader("train", batch_size=1).collate_fn)
    with compute.placed(pruned):
        train(pruned, loader, epochs, settings.lr, teacher=teacher, desc="fine-tune",
              freeze_batchnorm=settings.freeze_batchnorm, mimic=mimic, on_epoch=on_epoch, resume=resume,
              compute=compute, logits=options.logits)
    return pruned
