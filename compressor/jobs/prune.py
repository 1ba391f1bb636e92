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

from compressor.compute.context import Compute, in_group, open_compute
from compressor.compute.failure import signals_ignored
from compressor.compute.group import World
from compressor.data.bundle import DataBundle
from compressor.errors import CompressorError, DeviceError, InputError
from compressor.fileio import check_output_dir, make_output_dir
from compressor.jobs.inputs import as_data, as_loaded, as_profile
from compressor.latency.profiles import Profile
from compressor.models.loaded import LoadedModel
from compressor.quantize import int8_available
from compressor.report import PruneRun, build_report, write_report
from compressor.search.target import Target
from compressor.stages.choose import choose, proposals, selection_for
from compressor.stages.deliver import deliver, verify
from compressor.stages.deliver_int8 import deliver_int8
from compressor.stages.options import PruneOptions
from compressor.stages.plan import plan as plan_units
from compressor.stages.precision import choose_precision
from compressor.stages.reach import check_reachable, settled_margin
from compressor.stages.recover import finetune_settings, recover
from compressor.stages.scores import score_candidates
from compressor.stages.state import STATE_DIR, RunState
from compressor.stages.table import given_table, latency_table, table_design
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


def check_job(options: PruneOptions, profile: Profile) -> None:
    """Refuse, in the first seconds, what cannot work: bad options (PruneOptions.check), and --precision int8
    on a profile whose runtime has no INT8 quantizer (torch, tensorrt)."""
    from compressor.quantize import check_runtime

    options.check()
    if options.precision == "int8":
        check_runtime(profile.runtime, profile.name)


def _undated(value: object) -> object:
    """`value` without its "date" entries, at any depth (a pool lists each device's)."""
    if isinstance(value, dict):
        return {k: _undated(v) for k, v in value.items() if k != "date"}
    if isinstance(value, list):
        return [_undated(v) for v in value]
    return value


def fingerprint(loaded: LoadedModel, data: DataBundle, target: Target, profile: Profile,
                options: PruneOptions, machine: dict, processes: int = 1) -> dict:
    """What a run is, for --resume to check: the same weights, data, profile, target, options, machine (its
    description without the dates; the number of processes, where there are several). Data from the user's own
    batches is named by a digest of what was read."""
    from compressor.stages.state import weights_digest

    run = {"model": {"arch": loaded.arch, "weights_sha256": weights_digest(loaded.model),
                     "input_shape": list(loaded.input_shape)},
           "data": data.spec if data.digest is None else {"spec": data.spec, "sha256": data.digest},
           "profile": {k: v for k, v in profile.to_dict().items() if k != "source"},
           "target": {"ms": target.ms, "speedup": target.speedup}, "options": options.to_dict(),
           "machine": _undated(machine)}
    return {**run, "processes": processes} if processes > 1 else run


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
    compute: Compute


def run(loaded: LoadedModel, data: DataBundle, target: Target, profile: Profile, options: PruneOptions,
        out: Path | None, log: Log = print, device=None, resume: bool = False,
        compute: Compute | None = None) -> PruneResult:
    """The whole job on resolved inputs; writes into `out` (new or empty; or a saved run's folder with
    `resume`) unless it is None.

    Learning and scoring run on `compute` (opened here from the options when None: the train device, and
    the process group of torchrun or of the caller). In a process group every rank calls this: rank 0 runs
    the job, measures, writes `out` and returns the result; every other rank scores and fine-tunes its
    share (_follow) and returns rank 0's report and recipe with its own copy of the fine-tuned model. A
    failure anywhere ends every rank (compute/failure.py)."""
    options.check()
    if compute is None:
        with in_group(open_compute(options.train_device, options.amp, options.loader_workers),
                      lambda: resume_hint(out)) as opened:
            return run(loaded, data, target, profile, options, out, log, device, resume, opened)
    world = compute.world
    if not world.is_main:
        return _follow(loaded, data, profile, options, compute)
    result = _lead(loaded, data, target, profile, options, out, log, device, resume, compute)
    world.share("result", (result.report, result.recipe))
    return result


def resume_hint(out: Path | None) -> str:
    """How to continue a stopped run, where it kept its state."""
    from compressor.stages.state import STATE_DIR

    if out is None or not (Path(out) / STATE_DIR).is_dir():
        return ""
    return f"; its state is kept in {out}: continue with the same command and --resume"


def _lead(loaded: LoadedModel, data: DataBundle, target: Target, profile: Profile, options: PruneOptions,
          out: Path | None, log: Log, device, resume: bool, compute: Compute) -> PruneResult:
    """Rank 0 (or the only process): the whole job."""
    from compressor.latency.device import close_device, device_for

    check_job(options, profile)
    check_processes(options, compute.world, out if resume else None)
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
        state = RunState(out, fingerprint(loaded, data, target, profile, options, machine, compute.world.size),
                         resume)
        compute.world.share("started", True)  # the other ranks wait for the checks above
        if compute.device.type != "cpu" or compute.world.parallel:
            log(f"learning and scoring on {compute.describe()}; rank 0 alone measures and writes")
        return _stages(Job(loaded, data, target, profile, options, out, work, log, device, state, compute))
    except DeviceError as e:  # the device failed, not the input: what was measured so far is kept
        if out is not None and (out / STATE_DIR).is_dir():
            msg = f"{e}; the run's state is kept in {out}: once the device is back, continue it with --resume"
            raise DeviceError(msg) from e
        raise
    except CompressorError as e:
        if created and e.exit_code == 2:  # bad input found on the way: leave no trace of this new run
            shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        # in a group, torchrun's SIGTERM follows a failure at once: it must not cut the cleanup short
        with signals_ignored(compute.world.parallel):
            if own:
                close_device(device)
            shutil.rmtree(work, ignore_errors=True)
            if created and out is not None and out.exists() and not any(out.iterdir()):
                out.rmdir()  # a run that failed before writing anything leaves no folder


def check_processes(options: PruneOptions, world: World, resuming: Path | None) -> None:
    """The global batch must share out evenly; a resumed run must have the processes it was saved with."""
    import json

    from compressor.stages.state import RUN_FILE, STATE_DIR

    if options.finetune_batch % world.size:
        msg = (f"the fine-tuning batch {options.finetune_batch} is not divisible by the {world.size} processes: "
               f"give --finetune-batch a multiple of {world.size}")
        raise InputError(msg)
    saved_run = resuming / STATE_DIR / RUN_FILE if resuming is not None else None
    if saved_run is None or not saved_run.is_file():
        return
    try:
        saved = int(json.loads(saved_run.read_text()).get("processes", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return  # RunState refuses an unreadable run.json with its own message
    if saved != world.size:
        how = f"torchrun with {saved} processes in all" if saved > 1 else "one process (no torchrun)"
        msg = (f"--resume: the run in {resuming} was started with {saved} process(es), this one has {world.size}; "
               f"its fine-tuning checkpoint shares every global batch among {saved}: resume with {how}")
        raise InputError(msg)


def _follow(loaded: LoadedModel, data: DataBundle, profile: Profile, options: PruneOptions,
            compute: Compute) -> PruneResult:
    """A rank other than 0: the same units, its share of the calibration batches and of every global batch;
    rank 0 measures, chooses, exports and writes, and hands over its choice and its report."""
    from compressor.compute.context import NoDevice

    world, quiet = compute.world, (lambda _: None)
    state = RunState(None, {}, False)  # rank 0 keeps the run's state
    world.share("started")
    torch.manual_seed(options.seed)
    plan = plan_units(loaded, profile, options.merge, quiet, NoDevice())
    score_candidates(plan, data, options, quiet, state, compute)
    names = world.share("chosen")
    removed = [u for u in plan.candidates if u.name in names]
    recovered = recover(plan, removed, data, options, quiet, state, compute)
    report, recipe = world.share("result")
    return PruneResult(recovered.deployed, report, recipe, None)


def _stages(job: Job) -> PruneResult:
    t_start = time.perf_counter()
    options, out, work, log, state = job.options, job.out, job.work, job.log, job.state
    torch.manual_seed(options.seed)
    plan = plan_units(job.loaded, job.profile, options.merge, log, job.device)
    add_width_units(plan, job.data, options, work, log, state)
    given = given_table(plan, options.latency_table, log)
    reach = check_reachable(plan, job.target, options.min_blocks_per_stage, work, log, state,
                            int8_may_help=options.precision != "fp32" and int8_available(job.profile.runtime))
    importance = score_candidates(plan, job.data, options, log, state, job.compute)
    table = latency_table(plan, given, work, log, state, *table_design(plan, reach, importance, job.target, options))
    if out is not None:
        table.save(out / "latency_table.json")
    reach = settled_margin(reach, table, log)
    proposed = proposals(plan, importance, table, job.data, options, log, job.compute.device)
    chosen = None if options.precision == "int8" or not reach.reaches else choose(
        plan, reach, importance, table, job.target, proposed, options, work, log, state)
    if options.precision != "fp32":
        chosen = choose_precision(plan, reach, importance, table, job.target, job.data, options, chosen, proposed,
                                  work, log, state)
    job.compute.world.share("chosen", [u.name for u in chosen.removed])
    if chosen.greedy is not None:
        job.compute.record("greedy_kl", chosen.greedy.evaluations * len(chosen.greedy.x), chosen.greedy.seconds)
    recovered = recover(plan, chosen.removed, job.data, options, log, state, job.compute)
    delivered = deliver(plan, recovered, chosen.removed, job.data, out or work,
                        {"profile": job.profile.name, "criterion": options.criterion})
    if chosen.precision == "int8":
        delivered = deliver_int8(plan, recovered, delivered, job.data, out or work, options.seed, log,
                                 options.int8_calibration_size)
    final = verify(plan, delivered, log)
    lr, freeze, mimic = recovered.settings
    config = {"model": job.loaded.arch, "data": job.data.spec, "profile": job.profile.name,
              "out": str(out) if out else None, "target_ms": job.target.ms, "target_speedup": job.target.speedup,
              **options.to_dict(), "selection": chosen.selection,
              "finetune_lr": lr, "freeze_batchnorm": freeze, "mimic": mimic}  # what ran, defaults resolved
    report = build_report(PruneRun(config, job.target, plan, importance, table, chosen, recovered, delivered, final,
                                   plan.deployment.device.provenance(), time.perf_counter() - t_start,
                                   job.compute.to_dict()))
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
    Learning and scoring run on train_device= ("auto": CUDA when available); under torchrun, or in a
    process group you initialised, call it on every rank with the same arguments: rank 0 measures and
    writes, every rank returns the same report (docs/scale.md).
    """
    if not isinstance(target, Target):
        msg = f"target must be compressor.Speedup(x) or compressor.Latency(ms=...), got {target!r}"
        raise InputError(msg)
    resolved_options = PruneOptions.from_kwargs(**options)
    resolved_options.check()
    resolved_profile = as_profile(profile)
    check_job(resolved_options, resolved_profile)
    if type(getattr(data, "sampler", None)).__name__ == "DistributedSampler":
        msg = ("give compressor.prune the whole data on every process, not a DistributedSampler's share: "
               "it shares the data out among the processes itself")
        raise InputError(msg)
    bundle = as_data(data)
    loaded = as_loaded(model, bundle, input_shape)
    return run(loaded, bundle, target, resolved_profile, resolved_options, Path(out) if out is not None else None,
               log or (lambda _: None), resume=resume)


__all__ = ["PruneOptions", "PruneResult", "check_job", "finetune_settings", "prune", "run", "selection_for"]
