"""`compressor` command line: a thin layer over the Python API.

Exit codes: 0 ok, 1 target missed, 2 bad input (one line on stderr), 3 a
transformed model failed its numerical check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from compressor.errors import CompressorError, TargetMissedError


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def cmd_prune(args: argparse.Namespace) -> int:
    from compressor.jobs.prune import PruneConfig, prune

    config = PruneConfig(
        model=args.model, data=args.data, profile=args.profile, out=args.out,
        target_ms=args.target_ms, target_speedup=args.target_speedup, criterion=args.criterion,
        calibration_size=args.calibration_size, finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr, min_blocks_per_stage=args.min_blocks_per_stage, seed=args.seed,
        latency_table=args.latency_table, repeats=args.repeats, merge=args.merge, mimic=args.mimic,
        selection=args.selection)
    report = prune(config, log=_log)
    if args.json:
        print(json.dumps(report, indent=2))
    b, p = report["baseline"], report["pruned"]
    quality = f"top-1 agreement {report['fidelity']['after_finetune']['top1_agreement']:.1f}%"
    if b["accuracy"] is not None and p["accuracy"] is not None:
        quality = f"accuracy {b['accuracy']:.2f} -> {p['accuracy']:.2f}%, {quality}"
    _log(f"{report['model']}: {b['latency_ms']['median']:.3f} -> {p['latency_ms']['median']:.3f} ms "
         f"({report['speedup_measured']:.2f}x measured, {report['speedup_flops']:.2f}x by FLOPs), "
         f"{quality}; report in {args.out}/report.md")
    if not report["target_met"]:
        median = report["pruned"]["latency_ms"]["median"]
        msg = f"target missed in the final measurement: {median:.3f} ms > {report['target_ms']:.3f} ms"
        raise TargetMissedError(msg)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from compressor.data import load_data
    from compressor.fileio import refuse_existing_file
    from compressor.graph.units import find_units
    from compressor.latency.deploy import Deployment
    from compressor.latency.profiles import load_profile
    from compressor.latency.table import measure_latency_table
    from compressor.models.sources import load_model

    out = refuse_existing_file(args.out)
    profile = load_profile(args.profile)
    data = load_data(args.data) if args.data else None
    loaded = load_model(args.model, data)
    deployment = Deployment(profile, loaded.input_shape)
    units = find_units(loaded.model, deployment.example)
    _log(f"timing {len(units) + 1} exported models on {profile.name}")
    table = measure_latency_table(loaded.model, units, deployment, loaded.arch)
    table.save(out)
    if args.json:
        print(table.to_json())
    for name, saving in table.savings_ms.items():
        _log(f"  {name:<24} saves {saving:7.4f} ms")
    _log(f"baseline {table.baseline_ms:.4f} ms; table written to {out}")
    return 0


def cmd_units(args: argparse.Namespace) -> int:
    from compressor.graph.units import find_units
    from compressor.models.sources import load_model

    loaded = load_model(args.model)
    units = find_units(loaded.model, loaded.example_input())
    rows = [{"name": u.name, "kind": u.kind, "stage": u.stage, "becomes": u.removable_to} for u in units]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<24} {r['kind']:<11} stage {r['stage']:<12} -> {r['becomes']}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from compressor.data import load_data
    from compressor.fileio import refuse_existing_file
    from compressor.finetune.training import accuracy, train
    from compressor.models.checkpoint import save_checkpoint
    from compressor.models.loaded import LoadedModel
    from compressor.models.zoo import build

    out = refuse_existing_file(args.out)
    data = load_data(args.data)
    torch.manual_seed(args.seed)
    model = build(args.model, data.num_classes)
    train(model, data.loader("train", batch_size=args.batch_size, shuffle=True, seed=args.seed),
          args.epochs, args.lr, desc=f"train {args.model}")
    acc = accuracy(model, data.loader("val"))
    loaded = LoadedModel(model, args.model, data.num_classes, data.input_shape, f"trained on {data.spec}")
    save_checkpoint(out, loaded, trained_on=data.spec, epochs=args.epochs, val_accuracy=acc)
    _log(f"{args.model} on {data.spec}: validation accuracy {acc:.2f}% -> {out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from compressor.criteria import CRITERIA
    from compressor.criteria.agreement import ScoreConfig, parse_criteria, plot_heatmap, score_model
    from compressor.errors import InputError
    from compressor.fileio import atomic_write_text, refuse_existing_file

    criteria = parse_criteria(args.criterion, list(CRITERIA))
    outputs = [refuse_existing_file(p).resolve() for p in (args.heatmap, args.out) if p]
    if len(set(outputs)) < len(outputs):
        msg = "--heatmap and --out name the same file"
        raise InputError(msg)
    config = ScoreConfig(model=args.model, data=args.data, criteria=criteria, profile=args.profile, k=args.k,
                         calibration_size=args.calibration_size, seed=args.seed, repeats=args.repeats)
    scored = score_model(config, log=_log)
    document = json.dumps(scored.report, indent=2, allow_nan=False)
    if args.json:
        print(document)
    else:
        print(scored.text)
    if args.out:
        written = atomic_write_text(args.out, document + "\n")
        _log(f"JSON written to {written}")
    if args.heatmap:
        title = f"{args.model} on {args.data}, {args.calibration_size} calibration images"
        _log(f"heatmap written to {plot_heatmap(scored.agreement, args.heatmap, title=title)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:

    import torch

    from compressor.data import load_data
    from compressor.errors import InputError
    from compressor.fileio import check_output_dir, make_output_dir
    from compressor.models.sources import load_model
    from compressor.rewrite.fold import fold_batchnorm
    from exporters import EXPORTERS, get_exporter

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in EXPORTERS]
    if not formats or unknown:
        msg = f"unknown export format {', '.join(unknown) or repr(args.format)}; known: {', '.join(sorted(EXPORTERS))}"
        raise InputError(msg)
    out = make_output_dir(check_output_dir(args.out, must_be_empty=False))
    options = {"onnx": {"dynamic_batch": args.dynamic_batch, "simplify": args.simplify},
               "tensorrt": {"workspace_mb": args.workspace_mb, "dynamic_batch": args.dynamic_batch}}
    exporters = [get_exporter(f, precision=args.precision if f in ("openvino", "tensorrt") else "fp32",
                              **options.get(f, {})) for f in formats]
    loaded = load_model(args.model, load_data(args.data) if args.data else None)
    shape = tuple(args.input_shape) if args.input_shape else loaded.input_shape
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0))
    folded, folds = fold_batchnorm(loaded.model.eval(), x)
    _log(f"{loaded.arch}: {folds} BatchNorm layers folded; input {list(x.shape)}")
    written = {}
    for exporter in exporters:
        target = exporter.artifact_path(out / args.name)
        candidates = exporter.artifact_files(target)
        if exporter.name == "tensorrt":
            candidates.append(exporter.bundle_path(target))
        clash = [p for p in candidates if p.exists()]
        if clash:
            msg = f"{clash[0]} already exists; choose a new --out or --name"
            raise InputError(msg)
        try:
            path = exporter.export(folded, x, target, args.opset)
        except OSError as e:
            msg = f"cannot write {target}: {e.strerror or e}"
            raise InputError(msg) from e
        outcome = getattr(exporter, "outcome", "") or (f"wrote {path}, validated against torch (atol "
                                                       f"{exporter.atol:g} + rtol {exporter.rtol:g})")
        _log(f"{exporter.name} ({exporter.precision}): {outcome}")
        written[exporter.name] = {"path": str(path), "precision": exporter.precision, "outcome": outcome,
                                  "files": [str(p) for p in exporter.artifact_files(path)] if path.is_file()
                                  else sorted(str(p) for p in path.iterdir())}
    if args.json:
        print(json.dumps(written, indent=2))
    return 0


def cmd_fold(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    import onnx

    from compressor.data import load_data
    from compressor.errors import MergeRefused, ValidationError
    from compressor.fileio import check_output_dir, make_output_dir
    from compressor.models.checkpoint import save_checkpoint
    from compressor.models.sources import load_model
    from compressor.rewrite.fold import FOLD_RTOL, fold_model
    from exporters import get_exporter

    out = check_output_dir(args.out, must_be_empty=True)
    loaded = load_model(args.model, load_data(args.data) if args.data else None)
    x = loaded.example_input()
    result = fold_model(loaded.model.eval(), x, merge_exact=True)
    if result.left:
        reasons = "; ".join(f"{name}: {why}" for name, why in result.left.items())
        raise MergeRefused(f"{len(result.left)} BatchNorm layer(s) cannot be folded exactly: {reasons}")
    out = make_output_dir(out)
    exporter = get_exporter("onnx")
    staging = Path(tempfile.mkdtemp(prefix=".fold.", dir=out))
    try:
        staged = exporter.export(result.model, x, staging / "model.onnx", args.opset)
        graph = onnx.load(str(staged), load_external_data=False).graph
        if any(node.op_type == "BatchNormalization" for node in graph.node):
            raise ValidationError("the exported ONNX still has BatchNormalization nodes after folding")
        folded = replace(loaded, model=result.model, source=f"folded from {loaded.source}")
        save_checkpoint(out / "model.pt", folded, folded_structure=result.structure,
                        fold_max_rel_error=result.max_rel_error, fold_tolerance_rel=FOLD_RTOL)
        written = [p.name for p in exporter.artifact_files(staged)]
        for name in written:  # the graph file last, each by an atomic rename
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    summary = {"model": loaded.arch, "source": loaded.source, "batchnorm_folds": len(result.folds),
               "exact_merges": len(result.merges), "max_rel_error": result.max_rel_error,
               "tolerance_rel": FOLD_RTOL, "onnx_batchnorm_nodes": 0, "onnx_opset": args.opset,
               "input_shape": list(x.shape), "files": [str(out / "model.pt")] + [str(out / n) for n in written]}
    text = (f"{loaded.arch}: folded {len(result.folds)} BatchNorm layers into their neighbouring layers and "
            f"merged {len(result.merges)} conv pairs exactly; the folded model differs from the original by at "
            f"most {result.max_rel_error:.2g} of its output range on a {list(x.shape)} input (tolerance "
            f"{FOLD_RTOL:g}); model.onnx (opset {args.opset}) has no BatchNormalization node and matches "
            f"torch in ONNX Runtime (atol {exporter.atol:g} + rtol {exporter.rtol:g}); written to {out}.")
    if args.json:
        print(json.dumps(summary, indent=2))
        _log(text)
    else:
        print(text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from compressor.jobs.bench import BenchConfig, run_bench
    from compressor.latency.profiles import load_profile

    config = BenchConfig(artifact=args.artifact, profile=load_profile(args.profile), baseline=args.baseline,
                         against=args.against, threshold=args.threshold, save_baseline=args.save_baseline,
                         allow_foreign_baseline=args.allow_foreign_baseline, runs=args.runs,
                         min_time_s=args.min_time, out=args.out)
    result = run_bench(config)
    if args.json:
        print(json.dumps(result.report, indent=2))
        _log(result.text)
    else:
        print(result.text)
    for key, what in (("saved_baseline", "baseline"), ("out", "report")):
        if key in result.report:
            _log(f"{what} written to {result.report[key]}")
    return result.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compressor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="remove residual units until a measured latency target is met")
    p.add_argument("--model", required=True, help="zoo name (e.g. resnet56) or checkpoint file")
    p.add_argument("--data", required=True, help="digits32 | photos | cifar10:DIR | imagefolder:DIR | npz:FILE")
    p.add_argument("--profile", required=True, help="built-in profile name (ort-cpu) or YAML path")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-ms", type=float, help="median latency to reach (ms)")
    target.add_argument("--target-speedup", type=float, help="speedup over the unpruned model (x)")
    p.add_argument("--criterion", default="cka",
                   help="unit importance: cka, sr_init, entropy, taylor, magnitude, magnitude_l2, random "
                        "(default: cka)")
    p.add_argument("--out", required=True, help="new output folder (refused if not empty)")
    p.add_argument("--finetune-epochs", type=_non_negative_int, default=4, help="distillation epochs (default: 4)")
    p.add_argument("--finetune-lr", type=float, default=None,
                   help="fine-tuning learning rate (default: 0.02; 0.002 with BatchNorm statistics frozen "
                        "for pretrained models such as efficientnet_lite0)")
    p.add_argument("--mimic", action=argparse.BooleanOptionalAction, default=None,
                   help="also match every kept block's output and the penultimate features while fine-tuning, "
                        "with the unchanged prefix frozen (default: on for pretrained models)")
    p.add_argument("--selection", choices=("knapsack", "greedy"), default=None,
                   help="how removal sets are proposed: knapsack over the criterion's single-unit scores, or "
                        "greedy removal by the whole set's measured KL on 128 calibration images "
                        "(default: greedy for pretrained models, knapsack otherwise)")
    p.add_argument("--calibration-size", type=_positive_int, default=512, help="images for scoring")
    p.add_argument("--min-blocks-per-stage", type=_non_negative_int, default=1,
                   help="blocks each stage keeps, counting a stage's blocks that are not units (default: 1)")
    p.add_argument("--merge", action="store_true",
                   help="also offer 'linearise and merge into one conv' for each block (criterion cka or random)")
    p.add_argument("--latency-table", help="reuse a table from `compressor profile` instead of measuring")
    p.add_argument("--repeats", type=_positive_int, default=3, help="seeds averaged by sr_init (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    p.set_defaults(run=cmd_prune)

    p = sub.add_parser("profile", help="measure each unit's latency saving (lookup table JSON)")
    p.add_argument("--model", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--data", help="data source the zoo model is trained on (sets the input shape)")
    p.add_argument("--out", required=True, help="JSON file to write (refused if it exists)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_profile)

    p = sub.add_parser("units", help="list the removable units found by tracing")
    p.add_argument("--model", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_units)

    p = sub.add_parser("score", help="score every unit under several criteria and compare their rankings")
    p.add_argument("--model", required=True, help="zoo name (e.g. resnet56) or checkpoint file")
    p.add_argument("--data", required=True, help="digits32 | cifar10:DIR | imagefolder:DIR | npz:FILE")
    p.add_argument("--criterion", required=True, help="comma-separated criteria, e.g. cka,magnitude,random")
    p.add_argument("--profile", help="also measure each unit's latency saving (ms) on this profile")
    p.add_argument("--k", type=_positive_int, help="size of the least-important sets compared (default: units / 3)")
    p.add_argument("--calibration-size", type=_positive_int, default=512, help="images for scoring")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=_positive_int, default=3, help="seeds averaged by sr_init (default: 3)")
    p.add_argument("--heatmap", help="PNG of the agreement matrices (refused if it exists)")
    p.add_argument("--json", action="store_true", help="print the result as JSON to stdout")
    p.add_argument("--out", help="JSON file to write (refused if it exists)")
    p.set_defaults(run=cmd_score)

    p = sub.add_parser("train", help="train a zoo model on a data source (our own training code)")
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=_positive_int, default=20)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=_positive_int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("export", help="export a model to ONNX, OpenVINO IR, TensorRT (or a device bundle), torch")
    p.add_argument("--model", required=True, help="zoo name (e.g. resnet56) or checkpoint file")
    p.add_argument("--format", required=True, help="comma-separated: onnx,openvino,tensorrt,torch")
    p.add_argument("--out", required=True, help="output folder (created; existing artifacts are refused)")
    p.add_argument("--data", help="data source a zoo model is trained on (sets weights and input shape)")
    p.add_argument("--name", default="model", help="artifact file stem (default: model)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="openvino: fp16 = FP16-compressed weights; tensorrt: fp16/int8 builder flags")
    p.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size of the exported input (default: 1)")
    p.add_argument("--input-shape", type=_positive_int, nargs=3, metavar=("C", "H", "W"),
                   help="input shape (default: the model's)")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX/TensorRT: symbolic batch axis")
    p.add_argument("--simplify", action="store_true", help="ONNX: simplify with onnxslim")
    p.add_argument("--workspace-mb", type=_positive_int, default=1024, help="TensorRT builder workspace (MiB)")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("fold", help="fold BatchNorm (and merge convs where exact) and export ONNX without BatchNorm")
    p.add_argument("--model", required=True, help="zoo name (e.g. resnet56) or checkpoint file")
    p.add_argument("--out", required=True, help="new output folder (refused if not empty)")
    p.add_argument("--data", help="data source a zoo model is trained on (sets weights and input shape)")
    p.add_argument("--opset", type=_positive_int, default=17, help="ONNX opset (default: 17)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON to stdout")
    p.set_defaults(run=cmd_fold)

    p = sub.add_parser("bench", help="time an exported artifact and gate it against a baseline (asv's rule)")
    p.add_argument("--artifact", required=True, help="exported artifact: .onnx (onnxruntime) or .xml (openvino)")
    p.add_argument("--profile", required=True, help="built-in profile name (ort-cpu) or YAML path")
    p.add_argument("--baseline", help="baseline JSON from --save-baseline to compare with")
    p.add_argument("--against", help="another artifact timed interleaved with --artifact, as the reference")
    p.add_argument("--threshold", type=float, default=1.10,
                   help="regression if median ratio exceeds this AND Mann-Whitney p < 0.002 (default: 1.10)")
    p.add_argument("--save-baseline", help="write this measurement as a baseline JSON (refused if it exists)")
    p.add_argument("--allow-foreign-baseline", action="store_true",
                   help="compare with a baseline from another profile or machine (flagged in the report)")
    p.add_argument("--runs", type=_positive_int, help="minimum timed runs (default: the profile's report floor)")
    p.add_argument("--min-time", type=float, help="minimum timed seconds (default: the profile's report floor)")
    p.add_argument("--json", action="store_true", help="print the report as JSON to stdout")
    p.add_argument("--out", help="report JSON file to write (refused if it exists)")
    p.set_defaults(run=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except CompressorError as e:
        print(f"compressor {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
