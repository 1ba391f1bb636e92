"""Stages `deliver` and `verify`: fold, export and validate the artifacts, write the checkpoint, then
the final, longer interleaved measurement of the baseline and pruned artifacts."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from compressor.data.bundle import DataBundle
from compressor.fileio import atomic_write_text
from compressor.graph.recipe import make_recipe
from compressor.graph.units import Unit
from compressor.latency.timing import Interleaved
from compressor.models.checkpoint import save_checkpoint
from compressor.rewrite.fold import FOLD_RTOL, check_equivalent, fold_batchnorm
from compressor.stages.plan import Plan
from compressor.stages.recover import Recovered

VALIDATION_IMAGES = 64  # held-out images every artifact is checked on against torch


@dataclass
class Delivered:
    """What was written, and the numerical checks each transformation passed."""

    model_path: Path  # the pruned artifact on the profile's runtime
    baseline_path: Path  # the unpruned one, exported the same way
    recipe: dict
    checks: dict


def _onnx_copies(plan: Plan, folded: torch.nn.Module, out: Path) -> None:
    """model.onnx and baseline.onnx beside another runtime's artifacts, for re-timing anywhere."""
    from exporters import get_exporter

    onnx = get_exporter("onnx")
    onnx.export(folded, plan.example, out / "model.onnx", plan.deployment.profile.opset)
    baseline = fold_batchnorm(plan.model, plan.example)[0]
    onnx.export(baseline, plan.example, out / "baseline.onnx", plan.deployment.profile.opset)


def _program(plan: Plan, recovered: Recovered, out: Path) -> dict:
    """model.pt2: the pruned model as a torch.export program, which loads without the model's source code."""
    from exporters import get_exporter

    exporter = get_exporter("torch", dynamic_batch=True)
    path = exporter.export(recovered.deployed, plan.example, out / "model.pt2")
    return {"file": path.name, "batch": "dynamic", "tolerance": {"atol": exporter.atol, "rtol": exporter.rtol}}


def deliver(plan: Plan, recovered: Recovered, removed: list[Unit], data: DataBundle, out: Path,
            checkpoint_extra: dict) -> Delivered:
    """Fold BatchNorm (checked to FOLD_RTOL), export both models (each validated against torch on
    held-out images), write model.pt (state_dict and recipe), recipe.json and model.pt2."""
    deployment, x = plan.deployment, plan.example
    folded, folds = fold_batchnorm(recovered.deployed, plan.example)
    fold_error = check_equivalent(recovered.deployed, folded, x, FOLD_RTOL, "BatchNorm folding")
    suffix = deployment.exporter.suffix
    model_path = deployment.export(recovered.pruned, out / f"model{suffix}")
    baseline_path = deployment.export(plan.model, out / f"baseline{suffix}")
    if deployment.exporter.name != "onnx":
        _onnx_copies(plan, folded, out)
    val_x = torch.cat([b[0] for b in data.loader("val", batch_size=VALIDATION_IMAGES, limit=VALIDATION_IMAGES)])
    artifact_error = deployment.validate(model_path, recovered.pruned, val_x)
    baseline_error = deployment.validate(baseline_path, plan.model, val_x)
    recipe = make_recipe(removed, plan.loaded.input_shape)
    pruned_loaded = replace(plan.loaded, model=recovered.pruned, source=f"pruned from {plan.loaded.source}",
                            removed_units=[u.name for u in removed])
    save_checkpoint(out / "model.pt", pruned_loaded, recipe, **checkpoint_extra)
    atomic_write_text(out / "recipe.json", json.dumps(recipe, indent=2) + "\n")
    program = _program(plan, recovered, out)
    exporter = deployment.exporter
    checks = {"fold_max_rel_error": fold_error, "folds": folds, "fold_tolerance_rel": FOLD_RTOL,
              "merges": recovered.merge_checks,
              "artifact_format": exporter.name, "artifacts": [model_path.name, baseline_path.name],
              "artifact_max_abs_error": artifact_error, "artifact_baseline_max_abs_error": baseline_error,
              "artifact_tolerance": {"atol": exporter.atol, "rtol": exporter.rtol, "range_rtol": exporter.range_rtol},
              "program": program}
    return Delivered(model_path, baseline_path, recipe, checks)


def verify(plan: Plan, delivered: Delivered, log: Callable[[str], None]) -> Interleaved:
    """The final measurement: baseline and pruned artifacts in interleaved rounds at the report floors."""
    policy = plan.deployment.profile.report_policy
    log(f"final measurement ({policy.min_runs} runs / {policy.min_time_s:g} s per model, interleaved)")
    return plan.deployment.time([delivered.baseline_path, delivered.model_path], policy)
