"""The prune job: units -> criteria -> latency table -> measured search -> surgery ->
fine-tune -> fold -> export -> final interleaved measurement -> report.

Fidelity to the unpruned model (compressor.metrics.fidelity) is measured on the
held-out split before and after fine-tuning; accuracy only where labelled.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch

from compressor.criteria import ScoringContext, get_criterion, score_units
from compressor.criteria.merges import check_criterion, score_merge_units
from compressor.data import DataBundle, load_data
from compressor.errors import InputError, UnreachableTargetError
from compressor.fileio import check_output_dir, make_output_dir
from compressor.finetune.mimic import plan_mimic
from compressor.finetune.training import teacher_labelled, train
from compressor.graph.merge_units import find_merge_units
from compressor.graph.surgery import remove_units
from compressor.graph.units import Unit, find_units
from compressor.latency.deploy import Deployment
from compressor.latency.machine import machine_info
from compressor.latency.predictor import Observation, fit_calibration
from compressor.latency.profiles import Profile, load_profile
from compressor.latency.table import LatencyTable, measure_latency_table
from compressor.latency.timing import TimingPolicy
from compressor.metrics.fidelity import fidelity, outputs, shift_agreement
from compressor.metrics.flops import count_cost
from compressor.models.checkpoint import save_checkpoint
from compressor.models.loaded import LoadedModel
from compressor.models.sources import load_model
from compressor.rewrite.fold import FOLD_RTOL, check_equivalent, fold_batchnorm
from compressor.rewrite.linearised import merge_linearised, verify_merges
from compressor.search.greedy import GreedyOrder, greedy_proposer
from compressor.search.knapsack import most_removable
from compressor.search.target import Measured, Target, margin_from, search_under_target
from exporters import get_exporter

# criteria that read labels: on an unlabelled source they get the unpruned model's top-1 instead
NEEDS_LABELS = ("sr_init", "taylor")
FINETUNE_LR = 0.02
# A model with its own (ImageNet) weights is fine-tuned on a few hundred crops of other photos: at
# lr 0.02 it drifts away from the original on held-out photos (efficientnet_lite0, 3 blocks removed,
# photos: top-1 agreement 63% before fine-tuning, 50% after; 1% with BatchNorm frozen), at 0.002
# with BatchNorm statistics frozen it stays closer (66%; 62% with them updated). One run each.
PRETRAINED_FINETUNE_LR = 0.002


@dataclass
class PruneConfig:
    """Everything `compressor prune` takes; round-trips to a dict for the report."""

    model: str
    data: str
    profile: str
    out: str
    target_ms: float | None = None
    target_speedup: float | None = None
    criterion: str = "cka"
    calibration_size: int = 512
    finetune_epochs: int = 4
    finetune_lr: float | None = None  # None: FINETUNE_LR, or PRETRAINED_FINETUNE_LR for pretrained models
    freeze_batchnorm: bool | None = None  # None: frozen exactly when PRETRAINED_FINETUNE_LR is chosen
    mimic: bool | None = None  # also match block outputs (compressor.finetune.mimic); None: for pretrained models
    selection: str | None = None  # "knapsack" or "greedy" (compressor.search.greedy); None: greedy for pretrained models
    min_blocks_per_stage: int = 1
    max_trials: int = 8
    merge: bool = False  # also offer "linearise and merge" units (criterion cka or random)
    seed: int = 0
    latency_table: str | None = None  # reuse a table from `compressor profile` (same model, profile)
    repeats: int = 3  # SR-init seeds


# how the search proposes removal sets: the knapsack over the criterion's single-unit scores, or
# greedy removal scored by the whole set's measured KL (compressor.search.greedy) on GREEDY_IMAGES images
SELECTIONS = ("knapsack", "greedy")
GREEDY_IMAGES = 128


def selection_for(config: PruneConfig, loaded: LoadedModel) -> str:
    """The config's selection, else greedy for a model with its own (ImageNet) weights, whose every
    removal costs held-out fidelity that single-unit scores misjudge in combination, and the
    knapsack for models trained here, where it is cheaper (greedy costs U + (U-1) + ... passes)."""
    if config.selection is None:
        return "greedy" if loaded.preprocessing is not None else "knapsack"
    if config.selection not in SELECTIONS:
        msg = f"unknown selection {config.selection!r}; known: {', '.join(SELECTIONS)}"
        raise InputError(msg)
    return config.selection


class FinetuneSettings(NamedTuple):
    lr: float
    freeze_batchnorm: bool
    mimic: bool


def finetune_settings(config: PruneConfig, loaded: LoadedModel) -> FinetuneSettings:
    """How to fine-tune: the config's choices, or the defaults for the model's lineage. A model with
    its own (ImageNet) weights, fine-tuned on a few hundred crops of other photos, gets the gentle
    learning rate, frozen BatchNorm statistics and feature mimicking; one trained here on labelled
    data gets plain distillation mixed with its labels."""
    pretrained = loaded.preprocessing is not None
    mimic = pretrained if config.mimic is None else config.mimic
    if config.finetune_lr is None and pretrained:
        freeze = True if config.freeze_batchnorm is None else config.freeze_batchnorm
        return FinetuneSettings(PRETRAINED_FINETUNE_LR, freeze, mimic)
    lr = FINETUNE_LR if config.finetune_lr is None else config.finetune_lr
    return FinetuneSettings(lr, bool(config.freeze_batchnorm), mimic)


def _timed_pair(deployment: Deployment, base: Path, candidate: Path, policy: TimingPolicy) -> Measured:
    result = deployment.time([base, candidate], policy)
    return Measured(result.stats[0].median, result.stats[1].median, result.speedup_spread(),
                    result.stats[1].noisy)


def reuse_latency_table(path: str, units: list, deployment: Deployment, log: Callable[[str], None]) -> LatencyTable:
    """A saved table, refused unless it was measured for these units, this profile and input shape."""
    table = LatencyTable.load(path)
    profile = deployment.profile
    problems = []
    if set(table.savings_ms) != {u.name for u in units}:
        problems.append("its units differ from the model's")
    if table.profile.get("name") != profile.name or table.profile.get("runtime") != profile.runtime:
        problems.append(f"it was measured on profile {table.profile.get('name')!r}, not {profile.name!r}")
    if list(table.input_shape) != list(deployment.input_shape):
        problems.append(f"its input shape {table.input_shape} is not {list(deployment.input_shape)}")
    if problems:
        msg = f"latency table {path} does not fit this run: {'; '.join(problems)}"
        raise InputError(msg)
    here = machine_info()
    if (table.machine.get("cpu"), table.machine.get("logical_cores")) != (here["cpu"], here["logical_cores"]):
        log(f"warning: latency table {path} was measured on {table.machine.get('cpu')}, "
            f"this machine is {here['cpu']}; candidates are still measured here")
    log(f"reusing latency table {path} (measured {table.machine.get('date')})")
    return table


def prune(config: PruneConfig, log: Callable[[str], None] = print) -> dict:
    """Run the whole job; returns the report dict (also written to `config.out`)."""
    target = Target(config.target_ms, config.target_speedup)
    get_criterion(config.criterion)
    if config.merge:
        check_criterion(config.criterion)
    out = check_output_dir(config.out, must_be_empty=True)
    profile = load_profile(config.profile)
    data = load_data(config.data)
    loaded = load_model(config.model, data)
    selection_for(config, loaded)  # an unknown selection fails before any output is made
    make_output_dir(out)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    try:
        report = _run(config, target, profile, data, loaded, out, work, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def _run(config: PruneConfig, target: Target, profile: Profile, data: DataBundle, loaded: LoadedModel,
         out: Path, work: Path, log: Callable[[str], None]) -> dict:
    t_start = time.perf_counter()
    torch.manual_seed(config.seed)
    model = loaded.model.eval()
    deployment = Deployment(profile, loaded.input_shape)
    x = deployment.example
    units = find_units(model, x)
    if not units:
        msg = f"{config.model}: no removable residual units found in its traced graph"
        raise InputError(msg)
    log(f"{len(units)} removable units in {loaded.arch}: "
        f"{sum(u.kind == 'identity' for u in units)} identity, {sum(u.kind == 'projection' for u in units)} projection")
    merges: list[Unit] = []
    if config.merge:
        merges, refused = find_merge_units(model, units)
        log(f"{len(merges)} blocks can also be linearised and merged into one conv"
            + "".join(f"; {name} cannot: {why}" for name, why in list(refused.items())[:3])
            + (f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""))
    candidates = units + merges

    table = reuse_latency_table(config.latency_table, candidates, deployment, log) if config.latency_table else None
    # reachability first: the unpruned model against the most that may be removed
    suffix = deployment.exporter.suffix
    baseline_path = deployment.export(model, work / f"baseline{suffix}")
    floor_model = remove_units(model, most_removable(units, config.min_blocks_per_stage), x)
    floor_path = deployment.export(floor_model, work / f"floor{suffix}")
    reach = _timed_pair(deployment, baseline_path, floor_path, profile.search_policy)
    margin = margin_from(reach.spread)
    log(f"baseline {reach.baseline_ms:.3f} ms; fastest reachable {reach.candidate_ms:.3f} ms "
        f"({reach.speedup:.2f}x) with {config.min_blocks_per_stage} block(s) kept per stage")
    goal = target.goal_ms(reach.baseline_ms)
    if reach.candidate_ms > goal:
        msg = (f"target {target.describe()} is unreachable on {profile.name}: the fastest reachable "
               f"latency is {reach.candidate_ms:.3f} ms ({reach.speedup:.2f}x; unpruned {reach.baseline_ms:.3f} ms)")
        raise UnreachableTargetError(msg)

    log(f"scoring units with {config.criterion} on {config.calibration_size} calibration images")
    calibration = data.loader("train", batch_size=128, limit=config.calibration_size, seed=config.seed)
    if not data.labelled and config.criterion in NEEDS_LABELS:
        log(f"{data.spec} is unlabelled: {config.criterion} scores against the unpruned model's top-1")
        calibration = teacher_labelled(calibration, model)
    context = ScoringContext(model, units, calibration, config.seed, repeats=config.repeats)
    importance = score_units(config.criterion, context)
    if merges:
        importance.update(score_merge_units(config.criterion, context, merges))

    if table is None:
        log("measuring the latency table (each unit removed, exported, timed interleaved)")
        table = measure_latency_table(model, candidates, deployment, loaded.arch, work)
    table.save(out / "latency_table.json")

    def measure(removed: tuple[str, ...]) -> Measured:
        chosen = [u for u in candidates if u.name in removed]
        path = deployment.export(remove_units(model, chosen, x), work / f"candidate{suffix}")
        m = _timed_pair(deployment, baseline_path, path, profile.search_policy)
        log(f"  candidate -{len(removed)} units: predicted {table.predict(removed):.3f} ms, "
            f"measured {m.candidate_ms:.3f} ms vs {m.baseline_ms:.3f} ms ({m.speedup:.2f}x)")
        return m

    selection = selection_for(config, loaded)
    config = replace(config, selection=selection)
    choose, order = None, None
    if selection == "greedy":
        images = torch.cat([b[0] for b in data.loader("train", batch_size=128, limit=GREEDY_IMAGES,
                                                      seed=config.seed)])
        order = GreedyOrder(model, candidates, table.savings_ms, images, config.min_blocks_per_stage, log)
        choose = greedy_proposer(order, importance)
        log(f"proposing sets greedily by their measured KL on {len(images)} calibration images")
    log(f"searching for {target.describe()} (aiming {margin:.0%} under it)")
    floor_units = [u.name for u in most_removable(units, config.min_blocks_per_stage)]
    floor_saving = sum(table.savings_ms[name] for name in floor_units)
    table_calibration = fit_calibration([Observation.measured(table, floor_units, reach.baseline_ms,
                                                              reach.candidate_ms)])
    result = search_under_target(candidates, importance, table.savings_ms, table.baseline_ms, target, measure,
                                 margin, (floor_saving, reach), config.min_blocks_per_stage, config.max_trials,
                                 choose)
    chosen_trial = result.best or (min(result.trials, key=lambda t: t.measured.candidate_ms)
                                   if result.trials else None)
    if chosen_trial is None:
        msg = f"no removal set reaches {target.describe()} by the latency table"
        raise UnreachableTargetError(msg)
    removed = [u for u in candidates if u.name in chosen_trial.choice.removed]
    pruned = remove_units(model, removed, x)  # merged blocks linearised, BatchNorm kept for fine-tuning
    val = data.loader("val")
    reference = outputs(model, val)
    stability = shift_agreement(model, val)
    log(f"the unpruned model agrees with itself on {stability:.1f}% of the held-out images shifted by one pixel")
    before = fidelity(model, merge_linearised(pruned), val, reference)
    log(f"held-out fidelity before fine-tuning: top-1 agreement {before.top1_agreement:.1f}%, "
        f"KL {before.kl_divergence:.4f} nats, CKA {before.feature_cka:.3f}")

    lr, freeze, mimic = finetune_settings(config, loaded)
    config = replace(config, finetune_lr=lr, freeze_batchnorm=freeze, mimic=mimic)  # the report shows what ran
    plan = plan_mimic(pruned, removed, x) if mimic else None
    log(f"fine-tuning {len(removed)}-unit-smaller model by distillation for {config.finetune_epochs} epochs "
        f"(lr {lr:g}{', BatchNorm statistics frozen' if freeze else ''}"
        f"{', mimicking ' + plan.describe() if plan else ''})")
    train(pruned, data.loader("train", batch_size=32, shuffle=True, seed=config.seed), config.finetune_epochs,
          lr, teacher=model, desc="fine-tune", freeze_batchnorm=freeze, mimic=plan)
    merge_checks = verify_merges(pruned, x)  # the deployed merge of each linearised block, interior exact
    deployed = merge_linearised(pruned)  # what is exported: linearised blocks merged into one conv
    after = fidelity(model, deployed, val, reference)
    log(f"held-out fidelity after fine-tuning: top-1 agreement {after.top1_agreement:.1f}%, "
        f"KL {after.kl_divergence:.4f} nats, CKA {after.feature_cka:.3f}")

    folded, folds = fold_batchnorm(deployed)
    fold_error = check_equivalent(deployed, folded, x, FOLD_RTOL, "BatchNorm folding")
    model_path = deployment.export(pruned, out / f"model{suffix}")
    final_baseline = deployment.export(model, out / f"baseline{suffix}")
    if deployment.exporter.name != "onnx":  # model.onnx and baseline.onnx always, for re-timing anywhere
        onnx = get_exporter("onnx")
        onnx.export(folded, x, out / "model.onnx", profile.opset)
        onnx.export(fold_batchnorm(model)[0], x, out / "baseline.onnx", profile.opset)
    val_x = torch.cat([b[0] for b in data.loader("val", batch_size=64, limit=64)])
    artifact_error = deployment.validate(model_path, pruned, val_x)
    artifact_error_base = deployment.validate(final_baseline, model, val_x)

    log(f"final measurement ({profile.report_policy.min_runs} runs / {profile.report_policy.min_time_s:g} s "
        "per model, interleaved)")
    final = deployment.time([final_baseline, model_path], profile.report_policy)
    pruned_loaded = replace(loaded, model=pruned, source=f"pruned from {loaded.source}",
                            removed_units=[u.name for u in removed])
    save_checkpoint(out / "model.pt", pruned_loaded, profile=profile.name, criterion=config.criterion)

    from compressor.report import build_report, write_report

    report = build_report(
        config=asdict(config), target=target, profile=profile, machine=machine_info(), loaded=loaded,
        units=candidates, removed=removed, importance=importance, table=table, search=result,
        final=final, costs=(count_cost(model, x), count_cost(deployed, x)),
        fidelity=(before, after),
        checks={"fold_max_rel_error": fold_error, "folds": folds, "fold_tolerance_rel": FOLD_RTOL,
                "merges": merge_checks,
                "artifact_format": deployment.exporter.name, "artifacts": [model_path.name, final_baseline.name],
                "artifact_max_abs_error": artifact_error, "artifact_baseline_max_abs_error": artifact_error_base,
                "artifact_tolerance": {"atol": deployment.exporter.atol, "rtol": deployment.exporter.rtol,
                                       "range_rtol": deployment.exporter.range_rtol}},
        seconds=time.perf_counter() - t_start, calibration=table_calibration, greedy=order,
        shift_agreement=stability)
    write_report(report, out, final)
    return report
