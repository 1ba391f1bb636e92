"""Latency, FLOPs and accuracy before and after BatchNorm folding and block merging (issue 5).

For each model this script

1. finds the residual units (compressor.graph.units) and asks merge_block to linearise each one
   into a single conv (activations inside the block removed, the trailing one kept); every
   accepted merge is checked against the linearised block on real block inputs (check_merge:
   interior error within 1e-5 of the range, the border ring's error reported);
2. builds the variants: (a) unfolded, exported as is (torch.onnx's TorchScript exporter
   fuses conv -> BN by itself in eval mode: the ONNX BatchNormalization node count says
   whether it did); (b) BN folded (fold_model, checked exact), plus (b+) fold_model with the
   exact conv -> conv merges where it finds any; (c) each accepted unit merged alone, the
   rest folded; (d) all merges that reduce multiply-adds, together; (e) all accepted merges;
3. records per variant FLOPs (2 per multiply-add), ONNX node / Conv / BatchNormalization
   counts and, per backend (ONNX Runtime, OpenVINO), the latency of every variant from ONE
   interleaved measurement (the profile's search policy): speedup vs the folded model and
   the spread of the per-round ratios;
4. for the digits32-trained models: validation accuracy and top-1 agreement with the
   unmerged model for every variant, then after a short distillation fine-tune (teacher =
   the unmerged model) for (d), (e) and --finetune-sample single merges chosen evenly. The
   fine-tune trains the units linearised with their BatchNorms still in place, then merges
   them again (the merged model has no normalisation left and diverges to NaN even at lr
   1e-3); accuracy is measured on the re-merged model, which is what deploys;
5. writes fold_merge.json and .md into --out after every step, with a summary generated
   from the numbers: which merges pay (faster than the folded model by more than the
   measured spread) and which cost time.

Models: resnet56 and mobilenet_v2 trained on digits32 (3x32x32; mobilenet_v2 is trained on
first use and cached, a few minutes), and mobilenet_v2 at 224x224 with random weights and
randomised BatchNorm statistics for latency only (no accuracy: its weights mean nothing).

    .venv/bin/python benchmarks/fold_merge.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from fold_merge_report import render_markdown, summarise
from fold_merge_variants import (
    BACKENDS,
    CHECK_IMAGES,
    COSTS_S,
    DATA,
    FLOP_NOTE,
    FT_BATCH,
    FT_LR,
    MODELS,
    NAME,
    UNITS_GUESS,
    analyse_units,
    build_variants,
    evenly,
    export_onnx,
    finetune,
    log,
    onnx_counts,
    predictions,
    prepare,
    score,
    time_backend,
    with_linearised,
)

from compressor.data import DataBundle, load_data
from compressor.finetune.training import accuracy
from compressor.graph.units import find_units
from compressor.metrics.flops import count_cost
from compressor.models.trained import cache_dir
from compressor.rewrite.compose import MERGE_RTOL
from compressor.rewrite.fold import FOLD_RTOL


def write_outputs(result: dict, out: Path) -> None:
    common.write_results(out, NAME, result, render_markdown(result))


# ---------------------------------------------------------------------------- main


def expected_seconds(key: str, singles: int, profiles: list[str], epochs: int, ft_runs: int,
                     pretrained: bool) -> float:
    """Rough run time of one model (s) on a quiet 2-core machine, from COSTS_S."""
    c = COSTS_S[key]
    n = 3 + singles  # unfolded, folded, (d)/(e), the single merges
    seconds = c["fixed"] + n * c["onnx"] + (0 if pretrained else c["pretrain"])
    for p in profiles:
        seconds += n * (c["time"] + (c["openvino"] if p == "openvino-cpu" else 0.0))
    if MODELS[key][2]:  # accuracy of every variant (merged and linearised), fine-tunes
        seconds += 2 * n * c["eval"] + ft_runs * (epochs * c["epoch"] + 2 * c["eval"])
    return seconds


def _pretrained(key: str) -> bool:
    arch, _, trained = MODELS[key]
    bundled = Path(__file__).resolve().parent.parent / "compressor" / "weights" / f"{arch}-{DATA}.pt"
    return not trained or bundled.is_file() or (cache_dir() / f"{arch}-{DATA}.pt").is_file()


def run_model(key: str, args: argparse.Namespace, data: DataBundle, result: dict, workdir: Path) -> None:
    t0 = time.perf_counter()
    subject = prepare(key, data if MODELS[key][2] else None)
    x = torch.randn(1, *subject.input_shape, generator=torch.Generator().manual_seed(0))
    entry: dict = {"model": key, "arch": subject.arch, "input_shape": list(subject.input_shape),
                   "weights": subject.weights, "backends": {}}
    result["models"].append(entry)
    if subject.data is not None:
        check_x = torch.cat([b[0] for b in subject.data.loader("val", batch_size=CHECK_IMAGES, limit=CHECK_IMAGES)])
    else:
        check_x = torch.randn(2, *subject.input_shape, generator=torch.Generator().manual_seed(1))
    units = find_units(subject.model, x)
    rows, merged = analyse_units(subject, units, check_x, x)
    entry["units"] = rows
    variants, notes = build_variants(subject, rows, merged, x, args.limit_units)
    entry["notes"] = notes
    singles = sum(v.kind == "single" for v in variants)
    ft_plan = [v for v in variants if v.kind in ("cheaper", "all", "cheaper+all")]
    ft_plan += evenly([v for v in variants if v.kind == "single"], args.finetune_sample)
    ft_runs = len(ft_plan) if args.epochs > 0 and subject.data is not None else 0
    log(f"[{key}] {len(units)} units, {notes['mergeable']} merge ({notes['refused']} refused), "
        f"{len(notes['cheaper'])} reduce MACs; {len(variants)} variants; expected "
        f"~{expected_seconds(key, singles, args.profiles, args.epochs, ft_runs, True) / 60:.1f} min")
    entry["variants"] = []
    for v in variants:
        cost = count_cost(v.exported, x)
        entry["variants"].append({"key": v.key, "kind": v.kind, "label": v.label, "units": v.units,
                                  "flops": cost.flops, "macs": cost.macs, "params": cost.params, "info": v.info})
    log(f"[{key}] exporting {len(variants)} ONNX graphs")
    onnx_paths = export_onnx(variants, x, workdir / key / "onnx")
    for d, p in zip(entry["variants"], onnx_paths, strict=True):
        d["onnx"] = onnx_counts(p)
    write_outputs(result, args.out)
    for profile_name in args.profiles:
        entry["backends"][profile_name] = time_backend(profile_name, subject, variants, onnx_paths, workdir / key)
        entry["summary"] = summarise(entry)
        write_outputs(result, args.out)
    if subject.data is not None:
        val = subject.data.loader("val")
        reference = predictions(subject.model, val)
        entry["accuracy"] = accuracy(subject.model, val)
        log(f"[{key}] accuracy of {len(variants)} variants before fine-tuning")
        for v, d in zip(variants, entry["variants"], strict=True):
            d["before"] = score(v.model, val, reference)
            if v.units:
                d["before"]["linearised"] = score(with_linearised(subject.model, v.units), val, reference)
            if v.kind == "folded":
                d["before_exported"] = score(v.exported, val, reference)
        entry["summary"] = summarise(entry)
        write_outputs(result, args.out)
        if args.epochs > 0:
            by_key = {d["key"]: d for d in entry["variants"]}
            for i, v in enumerate(ft_plan):
                log(f"[{key}] fine-tuning {v.key} ({i + 1}/{len(ft_plan)}, {args.epochs} epochs)")
                by_key[v.key]["after"] = finetune(subject, v, args.epochs, args.lr, check_x, x)
                entry["summary"] = summarise(entry)
                write_outputs(result, args.out)
    entry["summary"] = summarise(entry)
    entry["seconds"] = time.perf_counter() - t0
    write_outputs(result, args.out)
    for line in entry["summary"]:
        log(f"[{key}] {line}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated, from: " + ", ".join(MODELS) + " (default: all)")
    parser.add_argument("--profiles", default=",".join(BACKENDS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2,
                        help="distillation epochs after merging; 0 skips fine-tuning (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=FT_LR, help="fine-tuning learning rate (default: %(default)s)")
    parser.add_argument("--finetune-sample", type=int, default=4,
                        help="single merges fine-tuned, chosen evenly across stages (default: %(default)s)")
    parser.add_argument("--limit-units", type=int, default=None,
                        help="time at most N single merges, chosen evenly (smoke runs; default: all)")
    args = parser.parse_args(argv)
    args.models = common.known_list(parser, "--models", args.models, MODELS)
    args.profiles = common.known_list(parser, "--profiles", args.profiles, BACKENDS, allow_empty=True)
    if args.epochs < 0 or args.finetune_sample < 0 or (args.limit_units is not None and args.limit_units < 0):
        parser.error("--epochs, --finetune-sample and --limit-units must not be negative")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    total = 0.0
    for key in args.models:
        units = UNITS_GUESS[key]
        singles = units if args.limit_units is None else min(units, args.limit_units)
        # resnet56: no merge reduces MACs, mobilenet_v2: all do; either way one (d)/(e) model to fine-tune
        ft_runs = (1 + min(args.finetune_sample, singles)) if args.epochs > 0 and MODELS[key][2] else 0
        total += expected_seconds(key, singles, args.profiles, args.epochs, ft_runs, _pretrained(key))
    log(f"expected run time: ~{total / 60:.0f} min on a quiet 2-core machine (rough; export, one interleaved "
        f"measurement per model x backend, {args.epochs}-epoch fine-tunes; several times longer on a busy machine"
        + ("" if _pretrained("mobilenet_v2") or "mobilenet_v2" not in args.models else
           ", mobilenet_v2 trained on digits32 first (cached afterwards)") + ")")
    result: dict = {
        **common.provenance(NAME), "torch_threads": torch.get_num_threads(), "flop_convention": FLOP_NOTE,
        "settings": {"models": args.models, "profiles": args.profiles, "epochs": args.epochs, "lr": args.lr,
                     "finetune_batch": FT_BATCH, "finetune_sample": args.finetune_sample,
                     "limit_units": args.limit_units, "data": DATA, "merge_rtol": MERGE_RTOL, "fold_rtol": FOLD_RTOL},
        "models": [],
    }
    data = load_data(DATA)
    with tempfile.TemporaryDirectory(prefix="fold-merge-") as tmp:
        for key in args.models:
            run_model(key, args, data, result, Path(tmp))
            result["seconds"] = time.perf_counter() - t0
            write_outputs(result, args.out)
    common.finish(args.out, NAME, render_markdown(result), t0)
    failed = [f"{m['model']} {r['unit']}" for m in result["models"] for r in m.get("units", [])
              if r.get("check_failed")]
    failed += [f"{m['model']} {v['key']} after fine-tuning" for m in result["models"] for v in m.get("variants", [])
               if v.get("after", {}).get("check_failed")]
    if failed:
        print(f"FAIL: check_merge rejected {', '.join(failed)}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
