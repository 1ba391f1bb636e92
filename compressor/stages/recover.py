"""Stage `recover`: surgery, then fine-tuning by distillation from the unpruned model.

Fidelity to the unpruned model is measured on the held-out split before and
after fine-tuning (metrics/fidelity.py); accuracy only where it is labelled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from torch import nn

from compressor.data.bundle import DataBundle
from compressor.finetune.mimic import plan_mimic
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


class FinetuneSettings(NamedTuple):
    lr: float
    freeze_batchnorm: bool
    mimic: bool


def finetune_settings(options: PruneOptions, loaded: LoadedModel) -> FinetuneSettings:
    """How to fine-tune: the options' choices, or the defaults for the model's lineage. A model with
    its own (ImageNet) weights, fine-tuned on a few hundred crops of other photos, gets the gentle
    learning rate, frozen BatchNorm statistics and feature mimicking; one trained here on labelled
    data gets plain distillation mixed with its labels."""
    pretrained = loaded.pretrained
    mimic = pretrained if options.mimic is None else options.mimic
    if options.finetune_lr is None and pretrained:
        freeze = True if options.freeze_batchnorm is None else options.freeze_batchnorm
        return FinetuneSettings(PRETRAINED_FINETUNE_LR, freeze, mimic)
    lr = FINETUNE_LR if options.finetune_lr is None else options.finetune_lr
    return FinetuneSettings(lr, bool(options.freeze_batchnorm), mimic)


@dataclass
class Recovered:
    """The pruned, fine-tuned model and how closely it follows the unpruned one."""

    pruned: nn.Module  # linearised merge blocks still in their trainable form, BatchNorm in place
    deployed: nn.Module  # what is exported: linearised blocks merged into one conv
    before: Fidelity  # held-out fidelity before fine-tuning
    after: Fidelity  # and after
    shift_agreement: float  # the unpruned model's own agreement under a one-pixel shift (%)
    settings: FinetuneSettings
    merge_checks: dict[str, dict]


def _log_fidelity(log: Callable[[str], None], when: str, f: Fidelity) -> None:
    log(f"held-out fidelity {when} fine-tuning: {f.summary()}, CKA {f.feature_cka:.3f}")


def recover(plan: Plan, removed: list[Unit], data: DataBundle, options: PruneOptions,
            log: Callable[[str], None], state: RunState) -> Recovered:
    """Remove `removed` from the model and fine-tune the result by distillation; a checkpoint after every
    epoch lets a resumed run continue from the last finished one (for the same units)."""
    model, x = plan.model, plan.example
    pruned = remove_units(model, removed, x)  # merged blocks linearised, BatchNorm kept for fine-tuning
    val = data.loader("val")
    reference = outputs(model, val, options.logits)
    stability = shift_agreement(model, val)
    if stability is not None:
        log(f"the unpruned model agrees with itself on {stability:.1f}% of the held-out images shifted by one pixel")
    before = fidelity(model, merge_linearised(pruned), val, reference)
    _log_fidelity(log, "before", before)
    settings = finetune_settings(options, plan.loaded)
    mimic = plan_mimic(pruned, removed, x) if settings.mimic and removed else None
    epochs = options.finetune_epochs if removed else 0  # nothing removed (INT8 alone met the target): a copy
    log(f"fine-tuning {len(removed)}-unit-smaller model by distillation for {epochs} epochs "
        f"(lr {settings.lr:g}{', BatchNorm statistics frozen' if settings.freeze_batchnorm else ''}"
        f"{', mimicking ' + mimic.describe() if mimic else ''})" if removed
        else "nothing removed: the model is the unpruned one, not fine-tuned")
    names = [u.name for u in removed]
    resume = state.load_tensors("finetune")
    if resume is not None and resume.get("removed") == names:
        state.note_reused(f"fine-tuning, {int(resume['epoch'])} of {options.finetune_epochs} epochs done")
    else:
        resume = None
    train(pruned, data.loader("train", batch_size=32, shuffle=True, seed=options.seed), epochs,
          settings.lr, teacher=model, desc="fine-tune", freeze_batchnorm=settings.freeze_batchnorm, mimic=mimic,
          on_epoch=lambda epoch: state.save_tensors("finetune", {**epoch, "removed": names}), resume=resume)
    merge_checks = verify_merges(pruned, x)  # the deployed merge of each linearised block, interior exact
    deployed = merge_linearised(pruned)
    after = fidelity(model, deployed, val, reference)
    _log_fidelity(log, "after", after)
    return Recovered(pruned, deployed, before, after, stability, settings, merge_checks)
