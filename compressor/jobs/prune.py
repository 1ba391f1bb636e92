"""The prune job: the stages of compressor/stages/ in order, behind one Python entry point.

    plan -> reach -> scores -> table -> choose -> recover -> deliver -> verify -> report

`prune(model, data, target, profile, out)` is what `compressor prune` runs, and
what a user calls on their own nn.Module; `run` is the same sequence on inputs
already resolved.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compressor.data.bundle import DataBundle
from compressor.errors import InputError
from compressor.fileio import check_output_dir, make_output_dir
from compressor.jobs.inputs import as_data, as_loaded, as_profile
from compressor.latency.profiles import Profile
from compressor.models.loaded import LoadedModel
from compressor.report import PruneRun, build_report, write_report
from compressor.search.target import Target
from compressor.stages.choose import choose, selection_for
from compressor.stages.deliver import deliver, verify
from compressor.stages.options import PruneOptions
from compressor.stages.plan import plan as plan_units
from compressor.stages.reach import check_reachable
from compressor.stages.recover import finetune_settings, recover
from compressor.stages.scores import score_candidates
from compressor.stages.table import latency_table

Log = Callable[[str], None]


@dataclass
class PruneResult:
    """What a prune gives back: the pruned, fine-tuned module, the report, the recipe to redo it."""

    model: nn.Module  # linearised blocks merged into one conv; BatchNorm not yet folded
    report: dict  # what report.json holds
    recipe: dict  # JSON-ready: which units were removed or merged (graph/recipe.py)
    out: Path | None  # where the files were written (None: nothing was written)


def run(loaded: LoadedModel, data: DataBundle, target: Target, profile: Profile, options: PruneOptions,
        out: Path | None, log: Log = print, device=None) -> PruneResult:
    """The whole job on resolved inputs; writes into `out` (new or empty) unless it is None."""
    options.check()
    created = out is not None and not Path(out).exists()
    if out is not None:
        out = make_output_dir(check_output_dir(out, must_be_empty=True))
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    try:
        return _stages(loaded, data, target, profile, options, out, work, log, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if created and not any(out.iterdir()):  # a run that failed before writing anything leaves no folder
            out.rmdir()


def _stages(loaded: LoadedModel, data: DataBundle, target: Target, profile: Profile, options: PruneOptions,
            out: Path | None, work: Path, log: Log, device) -> PruneResult:
    t_start = time.perf_counter()
    torch.manual_seed(options.seed)
    plan = plan_units(loaded, profile, options.merge, log, device)
    reach = check_reachable(plan, target, options.min_blocks_per_stage, work, log)
    importance = score_candidates(plan, data, options, log)
    table = latency_table(plan, options.latency_table, work, log)
    if out is not None:
        table.save(out / "latency_table.json")
    chosen = choose(plan, reach, importance, table, target, data, options, work, log)
    recovered = recover(plan, chosen.removed, data, options, log)
    delivered = deliver(plan, recovered, chosen.removed, data, out or work,
                        {"profile": profile.name, "criterion": options.criterion})
    final = verify(plan, delivered, log)
    lr, freeze, mimic = recovered.settings
    config = {"model": loaded.arch, "data": data.spec, "profile": profile.name, "out": str(out) if out else None,
              "target_ms": target.ms, "target_speedup": target.speedup,
              **options.to_dict(), "selection": chosen.selection,
              "finetune_lr": lr, "freeze_batchnorm": freeze, "mimic": mimic}  # what ran, defaults resolved
    report = build_report(PruneRun(config, target, plan, importance, table, chosen, recovered, delivered, final,
                                   plan.deployment.device.provenance(), time.perf_counter() - t_start))
    if out is not None:
        write_report(report, out, final)
    return PruneResult(recovered.deployed, report, delivered.recipe, out)


def prune(model: nn.Module | LoadedModel | str, data: str | DataBundle | Iterable, target: Target,
          profile: str | Path | Profile = "ort-cpu", out: str | Path | None = None, *,
          input_shape: tuple[int, int, int] | None = None, log: Log | None = print,
          **options: object) -> PruneResult:
    """Prune `model` until `target` (compressor.Speedup(x) or compressor.Latency(ms=...)) is met on
    `profile`, measured; fine-tune it on `data`; write the artifacts and report into `out`.

    model: your nn.Module (its input shape comes from the data), a zoo name, or a checkpoint;
    data: a DataLoader or any iterable of image tensors or (tensor, label) batches (labels optional),
    or a data spec string as on the command line ("digits32", "imagefolder:DIR", ...);
    profile: a built-in profile name, a YAML path, or a Profile; out: None writes nothing.
    Keyword options are PruneOptions' (criterion, selection, merge, finetune_epochs, finetune_lr, ...).
    """
    if not isinstance(target, Target):
        msg = f"target must be compressor.Speedup(x) or compressor.Latency(ms=...), got {target!r}"
        raise InputError(msg)
    resolved_options = PruneOptions.from_kwargs(**options)
    resolved_options.check()
    resolved_profile = as_profile(profile)
    bundle = as_data(data)
    loaded = as_loaded(model, bundle, input_shape)
    return run(loaded, bundle, target, resolved_profile, resolved_options, Path(out) if out is not None else None,
               log or (lambda _: None))


__all__ = ["PruneOptions", "PruneResult", "finetune_settings", "prune", "run", "selection_for"]
