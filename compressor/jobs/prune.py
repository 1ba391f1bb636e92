"""The prune job: the stages of compressor/stages/ in order, behind one Python entry point.

    plan -> width -> reach -> scores -> table -> choose -> recover -> deliver -> verify -> report

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
from compressor.errors import CompressorError, InputError
from compressor.fileio import check_output_dir, make_output_dir
from compressor.jobs.inputs import as_data, as_loaded, as_profile
from compressor.latency.profiles import Profile
from compressor.models.loaded import LoadedModel
from compressor.report import PruneRun, build_report, write_report
from compressor.search.target import Target
from compressor.stages.choose import choose, proposals, selection_for
from compressor.stages.deliver import deliver, verify
from compressor.stages.deliver_int8 import deliver_int8
from compressor.stages.options import PruneOptions
from compressor.stages.plan import plan as plan_units
from compressor.stages.precision import choose_precision
from compressor.stages.reach import check_reachable
from compressor.stages.recover import finetune_settings, recover
from compressor.stages.scores import score_candidates
from compressor.stages.state import RunState
from compressor.stages.table import given_table, latency_table
from compressor.stages.width import add_width_units

Log = Callable[[str], None]


@dataclass
class PruneResult:
    """What a prune gives back: the pruned, fine-tuned module, the report, the recipe to redo it."""

    model: nn.Module  # linearised blocks merged into one conv; BatchNorm not yet folded
    report: dict  # what report.json holds
    recipe: dict  # JSON-ready: which units were removed or merged (graph/recipe.py)
    out: Path | None  # where the files were written (None: nothing was written)


def check_output(out: Path, resume: bool) -> None:
    """Refuse an output folder the run may not write: not new or empty (without --resume; the message
    suggests --resume where an unfinished run is saved there), or with nothing to resume."""
    from compressor.stages.state import STATE_DIR

    check_output_dir(out, must_be_empty=False)
    if not resume and (out / STATE_DIR).is_dir():
        msg = f"output {out} holds an unfinished run; continue it with --resume or choose a new --out"
        raise InputError(msg)
    if not resume:
        check_output_dir(out, must_be_empty=True)
    elif not (out / STATE_DIR).is_dir():
        msg = f"--resume: {out} holds no unfinished run to resume"
        raise InputError(msg)


def output_folder(out: Path, resume: bool) -> Path:
    """The run's output folder, created; with --resume, a killed run's leftovers are removed."""
    from compressor.stages.state import remove_leftovers

    check_output(out, resume)
    if resume:
        remove_leftovers(out)
        return out
    return make_output_dir(out)


def fingerprint(loaded: LoadedModel, data: DataBundle, target: Target, profile: Profile,
                options: PruneOptions, machine: dict) -> dict:
    """What a run is, for --resume to check: the same weights, data, profile, target, options, machine."""
    from compressor.stages.state import weights_digest

    return {"model": {"arch": loaded.arch, "weights_sha256": weights_digest(loaded.model),
                      "input_shape": list(loaded.input_shape)},
            "data": data.spec, "profile": {k: v for k, v in profile.to_dict().items() if k != "source"},
            "target": {"ms": target.ms, "speedup": target.speedup}, "options": options.to_dict(),
            "machine": {k: v for k, v in machine.items() if k != "date"}}


@dataclass
class Job:
    """One prune's resolved inputs and where it works."""

    loaded: LoadedModel
    data: DataBundle
    target: Target
    profile: Profile
    options: PruneOptions
    out: Path | None
    work: Path
    log: Log
    device: object | None
    state: RunState


def run(loaded: LoadedModel, data: DataBundle, target: Target, profile: Profile, options: PruneOptions,
        out: Path | None, log: Log = print, device=None, resume: bool = False) -> PruneResult:
    """The whole job on resolved inputs; writes into `out` (new or empty; or a saved run's folder with
    `resume`) unless it is None."""
    from compressor.latency.device import close_device, device_for

    options.check()
    created = out is not None and not Path(out).exists()
    if out is not None:
        out = output_folder(Path(out), resume)
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out))
    own = device is None
    try:
        if own:  # the profile's device: this machine, or its remote host(s), connected before anything slow
            device = device_for(profile, log=log)
        machine = device.provenance()
        if machine.get("predicted"):
            log(f"profile {profile.name} predicts every latency from the table {machine['predicted']['table']}: "
                "nothing is timed, and the report's figures are predictions")
        state = RunState(out, fingerprint(loaded, data, target, profile, options, machine), resume)
        return _stages(Job(loaded, data, target, profile, options, out, work, log, device, state))
    except CompressorError as e:
        if created and e.exit_code == 2:  # bad input found on the way: leave no trace of this new run
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        if own:
            close_device(device)
        shutil.rmtree(work, ignore_errors=True)
        if created and out is not None and out.exists() and not any(out.iterdir()):
            out.rmdir()  # a run that failed before writing anything leaves no folder


def _stages(job: Job) -> PruneResult:
    t_start = time.perf_counter()
    options, out, work, log, state = job.options, job.out, job.work, job.log, job.state
    torch.manual_seed(options.seed)
    plan = plan_units(job.loaded, job.profile, options.merge, log, job.device)
    add_width_units(plan, job.data, options, work, log, state)
    given = given_table(plan, options.latency_table, log)
    reach = check_reachable(plan, job.target, options.min_blocks_per_stage, work, log, state,
                            int8_may_help=options.precision != "fp32")
    importance = score_candidates(plan, job.data, options, log, state)
    table = latency_table(plan, given, work, log, state)
    if out is not None:
        table.save(out / "latency_table.json")
    proposed = proposals(plan, importance, table, job.data, options, log)
    chosen = None if options.precision == "int8" or not reach.reaches else choose(
        plan, reach, importance, table, job.target, proposed, options, work, log, state)
    if options.precision != "fp32":
        chosen = choose_precision(plan, reach, importance, table, job.target, job.data, options, chosen, proposed,
                                  work, log, state)
    recovered = recover(plan, chosen.removed, job.data, options, log, state)
    delivered = deliver(plan, recovered, chosen.removed, job.data, out or work,
                        {"profile": job.profile.name, "criterion": options.criterion})
    if chosen.precision == "int8":
        delivered = deliver_int8(plan, recovered, delivered, job.data, out or work, options.seed, log)
    final = verify(plan, delivered, log)
    lr, freeze, mimic = recovered.settings
    config = {"model": job.loaded.arch, "data": job.data.spec, "profile": job.profile.name,
              "out": str(out) if out else None, "target_ms": job.target.ms, "target_speedup": job.target.speedup,
              **options.to_dict(), "selection": chosen.selection,
              "finetune_lr": lr, "freeze_batchnorm": freeze, "mimic": mimic}  # what ran, defaults resolved
    report = build_report(PruneRun(config, job.target, plan, importance, table, chosen, recovered, delivered, final,
                                   plan.deployment.device.provenance(), time.perf_counter() - t_start))
    report["resumed"] = {"reused": list(dict.fromkeys(state.reused))} if state.reused else None
    if out is not None:
        write_report(report, out, final)
        state.finish()
    return PruneResult(recovered.deployed, report, delivered.recipe, out)


def prune(model: nn.Module | LoadedModel | str, data: str | DataBundle | Iterable, target: Target,
          profile: str | Path | Profile = "ort-cpu", out: str | Path | None = None, *,
          input_shape: tuple[int, int, int] | None = None, log: Log | None = print, resume: bool = False,
          **options: object) -> PruneResult:
    """Prune `model` until `target` (compressor.Speedup(x) or compressor.Latency(ms=...)) is met on
    `profile`, measured; fine-tune it on `data`; write the artifacts and report into `out`.

    model: your nn.Module (its input shape comes from the data), a zoo name, or a checkpoint;
    data: a DataLoader or any iterable of image tensors or (tensor, label) batches (labels optional),
    or a data spec string as on the command line ("digits32", "imagefolder:DIR", ...);
    profile: a built-in profile name, a YAML path, or a Profile; out: None writes nothing.
    Keyword options are PruneOptions' (criterion, selection, merge, finetune_epochs, finetune_lr, ...).
    resume=True continues an interrupted run saved in `out` (refused if anything differs).
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
               log or (lambda _: None), resume=resume)


__all__ = ["PruneOptions", "PruneResult", "finetune_settings", "prune", "run", "selection_for"]
