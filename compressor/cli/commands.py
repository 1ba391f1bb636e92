"""One function per command: turn the arguments into the objects the jobs take, run the job, print.

Every command is a thin layer over the same Python API a user scripts against
(compressor/jobs/); the checks that need no model (target, options, output
folder) run first, so bad input is refused before anything slow happens.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from compressor.cli.signals import raise_pending
from compressor.errors import CompressorError, InputError, TargetMissedError


def log(message: str) -> None:
    """A progress line on stderr; first, a SIGINT or SIGTERM whose exception Python dropped is raised again."""
    raise_pending()
    print(message, file=sys.stderr, flush=True)


def _data(args: argparse.Namespace):
    from compressor.data import load_data

    return load_data(args.data) if getattr(args, "data", None) else None


def _loaded(args: argparse.Namespace, data=None):
    """The model `--model` names (with --weights, --input-shape), fitted to the data where given."""
    from compressor.models.sources import load_model

    return load_model(args.model, data, weights=getattr(args, "weights", None),
                      input_shape=getattr(args, "input_shape", None))


def prune_options(args: argparse.Namespace):
    from compressor.stages.options import PruneOptions

    return PruneOptions(
        criterion=args.criterion, calibration_size=args.calibration_size, finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr, mimic=args.mimic, selection=args.selection,
        min_blocks_per_stage=args.min_blocks_per_stage, max_trials=args.max_trials, merge=args.merge, seed=args.seed,
        latency_table=args.latency_table, repeats=args.repeats, precision=args.precision,
        int8_calibration_size=args.int8_calibration_size,
        logits=[n for n in args.logits.split(",") if n] if args.logits else None,
        moves=args.moves, channel_criterion=args.channel_criterion, train_device=args.train_device, amp=args.amp,
        finetune_batch=args.finetune_batch, loader_workers=args.workers)


def _summary(report: dict, out: str) -> str:
    """The run in one line: latency, speedups, and the delivered artifact's fidelity (of the INT8 one when
    INT8 is delivered, measured on the held-out split against the unpruned model)."""
    b, p = report["baseline"], report["pruned"]
    fidelity, accuracy, label = report["fidelity"]["after_finetune"], p["accuracy"], ""
    if report["precision"]["delivered"] == "int8":
        fidelity = report["precision"]["final_int8"]["against_unpruned"]
        accuracy, label = fidelity["accuracy"], "INT8 "
    if fidelity.get("top1_agreement") is not None:
        quality = f"{label}top-1 agreement {fidelity['top1_agreement']:.1f}%"
    else:  # no class logits: each output's cosine similarity to the unpruned model's
        quality = ", ".join(f"{name} cosine {v['cosine_similarity']:.3f}"
                            for name, v in (fidelity.get("per_output") or {}).items())
    if b["accuracy"] is not None and accuracy is not None:
        quality = f"{label}accuracy {b['accuracy']:.2f} -> {accuracy:.2f}%, {quality.removeprefix(label)}"
    how = "measured"
    if report.get("latency_source") == "predicted":  # runtime: table: nothing was timed
        how = "PREDICTED by the latency table, not measured"
    return (f"{report['model']}: {b['latency_ms']['median']:.3f} -> {p['latency_ms']['median']:.3f} ms "
            f"({report['speedup_measured']:.2f}x {how}, {report['speedup_flops']:.2f}x by FLOPs), "
            f"{quality}; report in {out}/report.md")


def cmd_prune(args: argparse.Namespace) -> int:
    """The prune job; under torchrun every process runs this, and only rank 0 checks --out, prints and
    writes (the others' errors are silent where rank 0 reports them: compute/failure.py)."""
    from compressor.compute.group import is_rank0
    from compressor.search.target import Target

    rank0 = is_rank0()
    try:
        target = Target(args.target_ms, args.target_speedup)
        options = prune_options(args)
        options.check()  # the train device first, before anything slow is loaded
        from compressor.compute.context import in_group, open_compute

        compute = open_compute(options.train_device, options.amp, options.loader_workers)
    except CompressorError as e:
        e.silent = not rank0  # every process finds the same: rank 0 says it
        raise
    from compressor.jobs.prune import check_job, check_output, resume_hint, run
    from compressor.latency.profiles import load_profile

    with in_group(compute, lambda: resume_hint(Path(args.out))):
        if rank0:
            check_output(Path(args.out), args.resume)
        profile = load_profile(args.profile)
        check_job(options, profile)  # before the data and the model load
        data = _data(args)
        loaded = _loaded(args, data)
        result = run(loaded, data, target, profile, options, Path(args.out), log if rank0 else _quiet,
                     resume=args.resume, compute=compute)
    report = result.report
    report["config"]["model"] = args.model
    if args.json and rank0:
        print(json.dumps(report, indent=2))
    if rank0:
        log(_summary(report, args.out))
    if not report["target_met"]:
        median = report["pruned"]["latency_ms"]["median"]
        final = "final prediction" if report.get("latency_source") == "predicted" else "final measurement"
        msg = f"target missed in the {final}: {median:.3f} ms > {report['target_ms']:.3f} ms"
        missed = TargetMissedError(msg)
        missed.silent = not rank0
        raise missed
    return 0


def _quiet(_: str) -> None:
    """The log of a rank other than 0: rank 0 speaks for the job."""


def cmd_profile(args: argparse.Namespace) -> int:
    from compressor.fileio import refuse_existing_file
    from compressor.jobs.profile import describe, measure_table
    from compressor.latency.designed import DesignOptions
    from compressor.latency.profiles import load_profile

    out = refuse_existing_file(args.out) if args.out else None
    profile = load_profile(args.profile)
    loaded = _loaded(args, _data(args))
    if args.bundle:
        return _profile_bundle(args, profile, loaded)
    options = DesignOptions(min_per_stage=args.min_blocks_per_stage, target_sd=args.uncertainty,
                            max_sets=args.max_sets)
    log(f"measuring the latency model of {loaded.arch} on {profile.name}")
    table = measure_table(loaded, profile, options, log)
    table.save(out)
    if args.json:
        print(table.to_json())
    for line in describe(table):
        log(line)
    log(f"table written to {out}")
    return 0


def _profile_bundle(args: argparse.Namespace, profile, loaded) -> int:
    """`profile --bundle DIR`: the candidates exported for the profile, to be timed on the device offline."""
    import dataclasses

    from compressor.graph.units import find_units
    from compressor.latency.deploy import Deployment
    from compressor.latency.device import LocalDevice
    from compressor.latency.remote.bundle import write_table_bundle

    local = dataclasses.replace(profile, remote=None)  # nothing is timed here: no connection to a device
    deployment = Deployment(local, loaded.input_shape, LocalDevice(None))
    units = find_units(loaded.model, deployment.example)
    folder = write_table_bundle(args.bundle, loaded.model, units, deployment, loaded.arch)
    log(f"bundle of {len(units) + 1} models for {profile.name} written to {folder}; on the device run "
        f"`python3 {folder.name}/measure.py --out results.json`, then `compressor prune ... --latency-table "
        "results.json`")
    return 0


def cmd_units(args: argparse.Namespace) -> int:
    from compressor.graph.units import find_units

    loaded = _loaded(args, _data(args))
    units = find_units(loaded.model, loaded.example_input())
    rows = [{"name": u.name, "kind": u.kind, "stage": u.stage, "becomes": u.removable_to} for u in units]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max([24, *(len(r["name"]) + 1 for r in rows)])
        for r in rows:
            print(f"{r['name']:<{width}} {r['kind']:<11} stage {r['stage']:<12} -> {r['becomes']}")
        kinds = Counter(r["kind"] for r in rows)
        print(f"{len(rows)} units of {loaded.arch} on a {'x'.join(map(str, loaded.input_shape))} input: "
              + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from compressor.compute.amp import resolve_amp
    from compressor.compute.device import resolve_device
    from compressor.data import load_data
    from compressor.fileio import refuse_existing_file
    from compressor.jobs.train import train_zoo_model

    resolve_amp(args.amp, resolve_device(args.train_device))  # refused before anything is loaded
    refuse_existing_file(args.out)
    data = load_data(args.data)
    record = train_zoo_model(args.model, data, args.out, args.epochs, args.lr, args.batch_size, args.seed,
                             args.train_device, args.amp)
    figures = ", ".join(f"{k} {v:.2f}" for k, v in record.items() if k not in ("epochs", "lr", "batch_size"))
    log(f"{args.model} on {data.spec}, {record['epochs']} epochs: {figures} (held-out split) -> {args.out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from compressor.compute.device import resolve_device
    from compressor.criteria import CRITERIA
    from compressor.criteria.agreement import parse_criteria, plot_heatmap
    from compressor.fileio import atomic_write_text, refuse_existing_file
    from compressor.jobs.score import score_model
    from compressor.latency.profiles import load_profile

    resolve_device(args.train_device)  # refused before anything is loaded
    criteria = parse_criteria(args.criterion, list(CRITERIA))
    outputs = [refuse_existing_file(p).resolve() for p in (args.heatmap, args.out) if p]
    if len(set(outputs)) < len(outputs):
        msg = "--heatmap and --out name the same file"
        raise InputError(msg)
    profile = load_profile(args.profile) if args.profile else None
    data = _data(args)
    scored = score_model(_loaded(args, data), data, criteria, profile, args.k, args.calibration_size, args.seed,
                         args.repeats, log, args.train_device)
    scored.report["model"] = args.model
    document = json.dumps(scored.report, indent=2, allow_nan=False)
    print(document if args.json else scored.text)
    if args.out:
        log(f"JSON written to {atomic_write_text(args.out, document + chr(10))}")
    if args.heatmap:
        title = f"{args.model} on {args.data}, {args.calibration_size} calibration images"
        log(f"heatmap written to {plot_heatmap(scored.agreement, args.heatmap, title=title)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from compressor.jobs.export import export, parse_formats

    formats = parse_formats(args.format)  # an unknown format is refused before the model loads
    int8 = {}
    if args.precision == "int8":
        from compressor.jobs.export_int8 import int8_options

        int8 = int8_options(args, formats)  # no --data, a bad floor or format: refused before the model loads
    data = _data(args)
    loaded = _loaded(args, data)
    shape = tuple(args.input_shape) if args.input_shape else loaded.input_shape
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0))
    log(f"{loaded.arch}: input {list(x.shape)}")
    if int8:
        from compressor.quantize import quantization_images

        int8["images"] = quantization_images(data, args.calibration_size)
    written = export(loaded.model, x, args.out, args.format, args.name, args.precision, args.opset,
                     args.dynamic_batch, args.simplify, args.workspace_mb, log, **int8)
    if args.json:
        print(json.dumps(written, indent=2))
    return 0


def cmd_fold(args: argparse.Namespace) -> int:
    from compressor.fileio import check_output_dir
    from compressor.jobs.fold import fold_job

    check_output_dir(args.out, must_be_empty=True)
    summary, text = fold_job(_loaded(args, _data(args)), args.out, args.opset)
    if args.json:
        print(json.dumps(summary, indent=2))
        log(text)
    else:
        print(text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from compressor.jobs.bench import BenchConfig, run_bench
    from compressor.latency.profiles import load_profile

    config = BenchConfig(artifact=args.artifact, profile=load_profile(args.profile), baseline=args.baseline,
                         against=args.against, threshold=args.threshold, save_baseline=args.save_baseline,
                         allow_foreign_baseline=args.allow_foreign_baseline, runs=args.runs,
                         min_time_s=args.min_time, out=args.out, bundle=args.bundle, results=args.results)
    result = run_bench(config)
    if args.json:
        print(json.dumps(result.report, indent=2))
        log(result.text)
    else:
        print(result.text)
    for key, what in (("saved_baseline", "baseline"), ("out", "report")):
        if key in result.report:
            log(f"{what} written to {result.report[key]}")
    return result.exit_code
