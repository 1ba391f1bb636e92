"""Stage `width` (after `plan`, with --moves width or depth+width): the width units the search may take.

1. Every block or branch whose inner channels slim exactly is found (graph/width.py);
   the others are listed with the reason.
2. Each level (75%, 50%, 25% of a group's channels) is rounded to a count the runtime
   runs at full efficiency, timed on the profile's device (latency/steps.py); a level
   whose count is the full width, or the same as a higher level's, is refused with why.
3. Within each group, the channels kept are the most important by the channel criterion
   (criteria/channels.py: PEEL's by default).
The units join the plan's candidates: the table measures each one's saving, the
criterion scores it on the removals' scale (criteria/width.py), and the knapsack takes
at most one option per block, so it may slim a weak block to keep a strong one whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from compressor.criteria.channels import ChannelContext, channel_criterion_for, kept_channels, rank_channels
from compressor.criteria.means import Fill, dense_input_means
from compressor.data.bundle import DataBundle
from compressor.errors import InputError
from compressor.graph.signature import module_cost_key
from compressor.graph.units import Slim, Unit
from compressor.graph.width import LEVELS, WidthOption, find_width_options, level_name, width_unit
from compressor.latency.steps import StepChoice, StepStructure, measure_channel_steps, untimed_choices
from compressor.stages.options import PruneOptions
from compressor.stages.plan import Plan
from compressor.stages.state import RunState

NEEDS_LABELS = ("taylor",)  # channel criteria that read labels: on unlabelled data, the unpruned model's top-1


def step_structures(model, options: list[WidthOption]) -> list[StepStructure]:
    """One StepStructure per distinct (block structure, group), naming the blocks that share it."""
    found: dict[str, StepStructure] = {}
    where: dict[str, list[str]] = {}
    for option in options:
        block = model.get_submodule(option.unit.path)
        for group in option.groups:
            key = _step_key(block, option, group.root)
            where.setdefault(key, []).append(option.name)
            if key not in found:
                found[key] = StepStructure(key, block, tuple(option.unit.input_shape), group.root, group.channels, "")
    return [StepStructure(s.key, s.block, s.input_shape, s.root, s.channels, _where(where[s.key]))
            for s in found.values()]


def _step_key(block, option: WidthOption, root: str) -> str:
    """Blocks with this key slim at the same measured counts: the same kernels on the same shapes, one group."""
    return f"{module_cost_key(block, tuple(option.unit.input_shape))}|{root}"


def _where(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} ... {names[-1]} ({len(names)} blocks)"


def channel_steps(plan: Plan, structures: list[StepStructure], work: Path, log: Callable[[str], None]
                  ) -> dict[str, list[StepChoice]]:
    """Each structure's count per level: timed on the profile's device, or rounded where nothing is timed."""
    if plan.deployment.profile.runtime == "table":
        why = "the profile replays a latency table"
        return {s.key: untimed_choices(s, LEVELS, why) for s in structures}
    log(f"timing channel counts around each width level ({len(structures)} block structures)")
    return measure_channel_steps(structures, LEVELS, plan.deployment, plan.deployment.profile.search_policy, work,
                                 log)


def level_units(model, options: list[WidthOption], steps: dict[str, list[StepChoice]], scores: dict,
                fills: dict[str, Fill] | None = None) -> tuple[list[Unit], dict[str, str]]:
    """The width units at each level whose measured counts leave something to slim, the channels kept by
    `scores`, dropped channels read as their means in `fills` (per block path: criteria/means.py); and each
    refused level with why."""
    units: list[Unit] = []
    refused: dict[str, str] = {}
    for option in options:
        block = model.get_submodule(option.unit.path)
        keys = [_step_key(block, option, g.root) for g in option.groups]
        seen: dict[tuple, str] = {}
        for li, level in enumerate(LEVELS):
            name = level_name(option.name, level)
            choices = [steps[k][li] for k in keys]
            counts = tuple(c.chosen for c in choices)
            if all(c is None for c in counts):
                refused[name] = "; ".join(f"{g.root}: {c.note}" for g, c in zip(option.groups, choices, strict=True))
                continue
            if counts in seen:
                refused[name] = f"its measured channel counts {counts} are those of {seen[counts]}"
                continue
            seen[counts] = name
            groups = [(i, c) for i, c in enumerate(counts) if c is not None]
            part = WidthOption(option.unit, tuple(option.groups[i] for i, _ in groups))
            keep = tuple(kept_channels(scores[option.name][i], c) for i, c in groups)
            units.append(width_unit(part, level, keep, timed_share([choices[i] for i, _ in groups]),
                                    (fills or {}).get(option.unit.path, ())))
    return units, refused


def timed_share(choices: list[StepChoice]) -> float | None:
    """The share of its block's latency a slimming saves, from its groups' step timings (each group timed
    slimmed alone against the full block: the shares add, at most 1); None where a count was not timed."""
    shares = []
    for c in choices:
        if c.full_ms is None or c.chosen not in c.medians_ms or c.full_ms <= 0:
            return None
        shares.append(max(0.0, 1.0 - c.medians_ms[c.chosen] / c.full_ms))
    return min(1.0, sum(shares))


def unit_to_dict(unit: Unit) -> dict:
    return asdict(unit)


def _slim_from_dict(slim: dict) -> Slim:
    return Slim(tuple(slim["roots"]), tuple(slim["channels"]), tuple(tuple(k) for k in slim["keep"]), slim["level"],
                slim.get("timed_share"), tuple((layer, tuple(means)) for layer, means in slim.get("fill", ())),
                tuple(slim.get("head_roots", ())))


def unit_from_dict(d: dict) -> Unit:
    slim = d.get("slim")
    return Unit(**{**d, "post_add": tuple(d["post_add"]), "branches": tuple(d["branches"]),
                   "input_shape": tuple(d["input_shape"]), "members": tuple(d["members"]),
                   "slim": _slim_from_dict(slim) if slim else None})


def _calibration_images(data: DataBundle, options: PruneOptions):
    return data.loader("train", batch_size=128, limit=options.calibration_size, seed=options.seed)


def _calibration(plan: Plan, data: DataBundle, options: PruneOptions, name: str):
    """The calibration batches channel criterion `name` ranks on (labelled by the model where it needs labels)."""
    calibration = _calibration_images(data, options)
    if name in NEEDS_LABELS and not data.labelled:
        from compressor.finetune.training import teacher_labelled

        return teacher_labelled(calibration, plan.model)
    return calibration


def add_width_units(plan: Plan, data: DataBundle, options: PruneOptions, work: Path, log: Callable[[str], None],
                    state: RunState) -> None:
    """Set the plan's moves and, unless they are depth only, its width units (a resumed run's, if saved).
    InputError for --moves width on a model with nothing to slim."""
    plan.moves = options.moves
    if options.moves == "depth":
        return
    saved = state.load("widths")
    if saved is not None:
        plan.widths = [unit_from_dict(d) for d in saved["units"]]
        plan.width_report = saved["report"]
        state.note_reused(f"{len(plan.widths)} width units and their measured channel steps")
        return
    options_found, refused = find_width_options(plan.model, plan.units)
    log(f"{len(options_found)} blocks or branches can be slimmed"
        + "".join(f"; {name} cannot: {why}" for name, why in list(refused.items())[:3])
        + (f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""))
    if not options_found and options.moves == "width":
        why = "; ".join(f"{k}: {v}" for k, v in list(refused.items())[:3])
        msg = f"{plan.loaded.arch}: no block or branch has inner channels that can be slimmed ({why or 'no units'})"
        raise InputError(msg)
    structures = step_structures(plan.model, options_found)
    steps = channel_steps(plan, structures, work, log)
    name = channel_criterion_for(options.criterion, options.channel_criterion)
    log(f"ranking channels with {name} on {options.calibration_size} calibration images")
    scores = rank_channels(name, ChannelContext(plan.model, options_found, _calibration(plan, data, options, name),
                                                options.seed))
    fills = dense_input_means(plan.model, [o.unit.path for o in options_found], _calibration_images(data, options))
    plan.widths, levels_refused = level_units(plan.model, options_found, steps, scores, fills)
    plan.width_report = {
        "moves": options.moves, "channel_criterion": name, "levels": list(LEVELS),
        "units": len(plan.widths), "refused_blocks": refused, "refused_levels": levels_refused,
        "channel_steps": [{"blocks": s.where, "root": s.root, "channels": s.channels,
                           "levels": [c.to_dict() for c in steps[s.key]]} for s in structures]}
    log(f"{len(plan.widths)} width units" + (f"; {len(levels_refused)} levels refused" if levels_refused else ""))
    state.save("widths", {"units": [unit_to_dict(u) for u in plan.widths], "report": plan.width_report})
