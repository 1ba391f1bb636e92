"""Stage `scores`: every unit's importance under the criterion, on calibration data (higher = keep)."""

from __future__ import annotations

from collections.abc import Callable

from compressor.compute.context import Compute
from compressor.compute.loaders import shard_batches
from compressor.criteria import ScoringContext, score_units
from compressor.data.bundle import DataBundle
from compressor.finetune.training import teacher_labelled
from compressor.stages.options import PruneOptions
from compressor.stages.plan import Plan
from compressor.stages.state import RunState

# criteria that read labels: on an unlabelled source they get the unpruned model's top-1 instead
NEEDS_LABELS = ("sr_init", "taylor")


def score_candidates(plan: Plan, data: DataBundle, options: PruneOptions, log: Callable[[str], None],
                     state: RunState, compute: Compute | None = None) -> dict[str, float]:
    """{unit name: importance} for every unit, merge unit and width unit (a resumed run's saved scores, if any).

    On `compute`'s device (default: the CPU); in a process group each rank scores a contiguous share of
    the calibration batches and the criterion combines them (ScoringContext.group), so every rank ends
    with the scores one process would have computed, up to the order of floating-point sums."""
    compute = compute or Compute.local()
    saved = compute.world.share("saved-scores", state.load("scores"))  # rank 0 holds the run's state
    if saved is not None:
        state.note_reused(f"{options.criterion} scores of {len(saved)} units")
        return saved
    log(f"scoring units with {options.criterion} on {options.calibration_size} calibration images"
        + (f" ({compute.describe()})" if compute.device.type != "cpu" or compute.world.parallel else ""))
    calibration = data.loader("train", batch_size=128, limit=options.calibration_size, seed=options.seed)
    images = len(calibration.dataset)
    workers = compute.loader_workers(calibration.dataset, "scores")
    share = shard_batches(calibration, compute.world, workers, compute.pin_memory)
    with compute.placed(plan.model), compute.timed("scores", images):
        batches = compute.batches(share, plan.model)
        if not data.labelled and options.criterion in NEEDS_LABELS:
            log(f"{data.spec} is unlabelled: {options.criterion} scores against the unpruned model's top-1")
            batches = teacher_labelled(batches, plan.model)
        context = ScoringContext(plan.model, plan.removals, batches, options.seed, repeats=options.repeats,
                                 group=compute.world)
        importance = score_units(options.criterion, context) if plan.removals else {}
        if plan.widths:
            from compressor.criteria.width import score_width_units

            importance.update(score_width_units(options.criterion, ScoringContext(
                plan.model, plan.widths, batches, options.seed, repeats=options.repeats, group=compute.world)))
        if plan.merges:
            from compressor.criteria.merges import score_merge_units

            importance.update(score_merge_units(options.criterion, context, plan.merges))
    state.save("scores", importance)
    return importance
