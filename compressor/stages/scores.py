"""Stage `scores`: every unit's importance under the criterion, on calibration data (higher = keep)."""

from __future__ import annotations

from collections.abc import Callable

from compressor.criteria import ScoringContext, score_units
from compressor.data.bundle import DataBundle
from compressor.finetune.training import teacher_labelled
from compressor.stages.options import PruneOptions
from compressor.stages.plan import Plan
from compressor.stages.state import RunState

# criteria that read labels: on an unlabelled source they get the unpruned model's top-1 instead
NEEDS_LABELS = ("sr_init", "taylor")


def score_candidates(plan: Plan, data: DataBundle, options: PruneOptions, log: Callable[[str], None],
                     state: RunState) -> dict[str, float]:
    """{unit name: importance} for every unit, merge unit and width unit (a resumed run's saved scores, if any)."""
    saved = state.load("scores")
    if saved is not None:
        state.note_reused(f"{options.criterion} scores of {len(saved)} units")
        return saved
    log(f"scoring units with {options.criterion} on {options.calibration_size} calibration images")
    calibration = data.loader("train", batch_size=128, limit=options.calibration_size, seed=options.seed)
    if not data.labelled and options.criterion in NEEDS_LABELS:
        log(f"{data.spec} is unlabelled: {options.criterion} scores against the unpruned model's top-1")
        calibration = teacher_labelled(calibration, plan.model)
    context = ScoringContext(plan.model, plan.removals, calibration, options.seed, repeats=options.repeats)
    importance = score_units(options.criterion, context) if plan.removals else {}
    if plan.widths:
        from compressor.criteria.width import score_width_units

        importance.update(score_width_units(options.criterion, ScoringContext(
            plan.model, plan.widths, calibration, options.seed, repeats=options.repeats)))
    if plan.merges:
        from compressor.criteria.merges import score_merge_units

        importance.update(score_merge_units(options.criterion, context, plan.merges))
    state.save("scores", importance)
    return importance
