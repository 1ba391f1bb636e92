"""Depth against width against both, at equal measured latency, with Torch-Pruning at the same latency.

For one model on each backend and each target speedup:

1. `compressor.prune` three times, `--moves depth`, `width` and `depth+width`, each with
   the same fine-tuning (--epochs distillation epochs at the model's default learning
   rate and BatchNorm handling, feature mimicking off so every variant trains alike);
   the depth latency table is measured once and reused for the other targets (a width run times
   its channel counts again, so its units, and its table, are its own);
2. Torch-Pruning's L1 channel pruning at round_to 1, 8 and 16 (benchmarks/tp_reference.py),
   its ratio bisected on *measured* latency against the unpruned model until it reaches
   the target speedup (within 3%), then fine-tuned exactly like ours;
3. one final interleaved measurement of the unpruned model and every variant (report
   policy), repeated up to --final-repeats times in all while any variant's per-round speedup
   spreads beyond the policy's re-measure gate (the steadiest is kept; a row still beyond it is
   marked noisy), FLOPs (2 per multiply-add) and held-out quality: top-1 accuracy where the
   data is labelled, else top-1 agreement with the unpruned model (KL to it for random weights).

Columns: measured speedup with the IQR/median of its per-round ratios, FLOP-estimated
speedup, measured / FLOP (speedup fidelity),
quality before and after fine-tuning. Models: resnet56 on digits32, mobilenet_v2 on
photos (torchvision, random weights: no pretrained weights here, so its quality is
KL to the unpruned random-weight model, whose BatchNorm statistics come from the
training crops), efficientnet_lite0 on photos,
vit_digits on digits32 (skipped where the zoo lacks it). One command per model:

    .venv/bin/python benchmarks/depth_width.py --models resnet56
    .venv/bin/python benchmarks/depth_width.py --models efficientnet_lite0
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import common
import torch
from common import log
from torch import nn
from tp_reference import METHOD, ROUND_TO, bisect_ratio  # benchmarks/, beside this file

from compressor.data import load_data
from compressor.errors import CompressorError
from compressor.finetune.training import accuracy, train
from compressor.jobs.prune import prune
from compressor.latency.deploy import Deployment
from compressor.latency.profiles import load_profile
from compressor.metrics.fidelity import fidelity
from compressor.metrics.flops import count_cost
from compressor.models.loaded import LoadedModel
from compressor.models.sources import from_module, load_model
from compressor.search.target import Speedup

NAME = "depth_width"
TITLE = "Depth, width and both at equal measured latency, against Torch-Pruning"
LATENCY_TOLERANCE = 0.03  # TP's ratio bisection stops within 3% of the target latency
MOVES = ("depth", "width", "depth+width")
TARGETS = (1.3, 1.5, 2.0, 3.0)
PROFILES = ("ort-cpu", "openvino-cpu")
STATISTICS_BATCHES = 8  # of 64 training crops, for a random-weight model's BatchNorm statistics


@dataclass(frozen=True)
class Case:
    model: str
    data: str
    random_weights: bool = False  # a torchvision architecture with random weights (no pretrained ones here)


CASES = {"resnet56": Case("resnet56", "digits32"), "mobilenet_v2": Case("mobilenet_v2", "photos", True),
         "efficientnet_lite0": Case("efficientnet_lite0", "photos"), "vit_digits": Case("vit_digits", "digits32")}


def _loaded(case: Case, data) -> LoadedModel:
    if not case.random_weights:
        return load_model(case.model, data)
    import torchvision

    model = common.randomise_batchnorm(getattr(torchvision.models, case.model)(weights=None))
    train = data.loader("train", batch_size=64, shuffle=True, seed=0)
    model = common.batchnorm_from_data(model, (x for x, _ in islice(train, STATISTICS_BATCHES)))
    return from_module(model, (3, 224, 224), arch=case.model)


def quality(model: nn.Module, reference: nn.Module, data, random_weights: bool = False) -> dict:
    """Held-out accuracy (%) where the data has labels; else top-1 agreement with `reference` (%), or for
    a random-weight reference KL(reference || model) in nats per image with the CKA of the penultimate
    features beside it. `key` names the figure in a report's fidelity dict (for the before-fine-tuning column).

    Why KL for random weights: the unpruned random mobilenet_v2 (seed 0) gives 9 distinct top-1 classes over
    the 128 held-out crops, with a median top-1 margin of 0.04 logits: its top-1 is a near tie that any
    change flips."""
    if getattr(data, "labelled", True):
        return {"metric": "top-1 accuracy (%)", "value": accuracy(model, data.loader("val"))}
    f = fidelity(reference, model, data.loader("val"))
    if random_weights:
        return {"metric": "KL(unpruned || pruned), nats per image, lower is better", "value": f.kl_divergence,
                "key": "kl_divergence", "feature_cka": f.feature_cka, "top1_agreement": f.top1_agreement}
    return {"metric": "top-1 agreement with the unpruned model (%)", "value": f.top1_agreement}


def _ours(loaded: LoadedModel, data, target: float, profile, moves: str, args, work: Path, tables: dict) -> dict:
    """One prune; its model and report figures (a depth run keeps its table for the next target)."""
    out = work / f"{moves}-{target:g}"
    try:
        result = prune(loaded, data, Speedup(target), profile, out, finetune_epochs=args.epochs, mimic=False,
                       calibration_size=args.calibration_size, moves=moves, latency_table=tables.get(moves),
                       log=lambda s: log(f"    {s}"))
    except CompressorError as e:
        return {"error": str(e)}
    if moves == "depth":  # width units follow the channel counts each run times: no table fits another run
        tables.setdefault(moves, str(out / "latency_table.json"))
    r = result.report
    return {"model": result.model.eval(), "removed_units": r["removed_units"], "target_met": r["target_met"],
            "quality_before_finetune": r["fidelity"]["before_finetune"], "finetune": {
                "lr": r["config"]["finetune_lr"], "freeze_batchnorm": r["config"]["freeze_batchnorm"]},
            "width": r.get("width"), "search": r["search"]}  # its trials and greedy order, to see why it chose


def _tp(base: nn.Module, dep: Deployment, base_path: Path, target: float, round_to: int, data, finetune: dict,
        args, work: Path, random_weights: bool) -> dict:
    """Torch-Pruning at the target's measured speedup, fine-tuned like ours."""
    def relative_latency(candidate: nn.Module) -> float:
        path = dep.export(candidate, work / f"tp-r{round_to}")
        timed = dep.time([base_path, path], dep.profile.search_policy)
        return timed.stats[1].median / timed.stats[0].median

    try:
        found = bisect_ratio(base, dep.example, round_to, relative_latency, 1 / target, LATENCY_TOLERANCE,
                             steps=args.tp_steps)
    except Exception as e:  # Torch-Pruning cannot prune every architecture (attention heads, for one)
        return {"error": f"Torch-Pruning failed: {type(e).__name__}: {str(e)[:200]}"}
    before = quality(found.model, base, data, random_weights)
    if args.epochs:
        train(found.model, data.loader("train", batch_size=32, shuffle=True, seed=0), args.epochs, finetune["lr"],
              teacher=base, freeze_batchnorm=finetune["freeze_batchnorm"], desc=f"fine-tune TP r{round_to}")
    return {"model": found.model.eval(), "quality_before_finetune": before, **found.describe()}


def run_target(loaded: LoadedModel, data, profile, dep: Deployment, target: float, args, work: Path,
               tables: dict, random_weights: bool = False) -> dict:
    base = loaded.model.eval()
    variants: dict[str, dict] = {}
    for moves in MOVES:
        log(f"[{loaded.arch} {profile.name} {target:g}x] compressor prune --moves {moves}")
        variants[moves] = _ours(loaded, data, target, profile, moves, args, work, tables)
    finetune = next((v["finetune"] for v in variants.values() if "finetune" in v),
                    {"lr": 0.02, "freeze_batchnorm": False})
    base_path = dep.export(base, work / "baseline")
    for r in args.tp_round_to:
        log(f"[{loaded.arch} {profile.name} {target:g}x] Torch-Pruning round_to {r}")
        variants[f"tp r{r}"] = _tp(base, dep, base_path, target, r, data, finetune, args, work,
                                      random_weights)
    timed = [(name, v["model"]) for name, v in variants.items() if "model" in v]
    final = common.time_models(dep, [("baseline", base), *timed], work / "final", profile.report_policy,
                               steady=args.final_repeats)
    base_flops = count_cost(base, dep.example).flops
    rows = {}
    for name, v in variants.items():
        if "model" not in v:
            rows[name] = {"error": v["error"]}
            continue
        flops = count_cost(v["model"], dep.example).flops
        measured = final[name]["speedup"]
        rows[name] = {**{k: x for k, x in v.items() if k != "model"}, "latency_ms": final[name]["latency_ms"],
                      "speedup_measured": measured, "speedup_round_spread": final[name]["speedup_round_spread"],
                      "noisy": final[name]["noisy"], "flops": flops, "speedup_flops": base_flops / flops,
                      "speedup_fidelity": measured / (base_flops / flops),
                      "quality": quality(v["model"], base, data, random_weights)}
    return {"target_speedup": target, "final_attempts_round_spread": final["baseline"]["attempts_round_spread"],
            "baseline": {"latency_ms": final["baseline"]["latency_ms"], "flops": base_flops,
                         "quality": quality(base, base, data, random_weights)}, "variants": rows}


def run_case(case: Case, profile_name: str, args) -> dict:
    t0 = time.perf_counter()
    data = load_data(case.data)
    loaded = _loaded(case, data)
    profile = load_profile(profile_name)
    dep = Deployment(profile, loaded.input_shape)
    tables: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="depth-width-") as tmp:
        targets = [run_target(loaded, data, profile, dep, t, args, Path(tmp) / f"t{t:g}", tables,
                              case.random_weights)
                   for t in args.targets]
    return {"model": case.model, "data": case.data, "random_weights": case.random_weights, "profile": profile.name,
            "finetune_epochs": args.epochs, "targets": targets, "seconds": time.perf_counter() - t0}


def _cell(v: dict, key: str, fmt: str) -> str:
    return format(v[key], fmt) if v.get(key) is not None else ""


def render_markdown(result: dict) -> str:
    lines = [
        "Every variant fine-tuned alike (distillation from the unpruned model, same epochs, learning rate and "
        "BatchNorm handling); TP's ratio bisected on measured latency to the target; latencies from one final "
        "interleaved measurement per target (report policy).", "",
        "| model | backend | target | variant | ms | measured x | FLOP x | measured / FLOP | quality before "
        "fine-tune | quality |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["rows"]:
        head = f"| {row['model']} ({row['data']}) | {row['profile']}"
        for t in row["targets"]:
            b = t["baseline"]
            lines.append(f"{head} | {t['target_speedup']:g}x | unpruned | {b['latency_ms']['median']:.3f} | 1.00 | "
                         f"1.00 | | | {b['quality']['value']:{'.4f' if 'key' in b['quality'] else '.2f'}} |")
            for name, v in t["variants"].items():
                if "error" in v:
                    lines.append(common.failed_row([row["model"] + f" ({row['data']})", row["profile"],
                                                    f"{t['target_speedup']:g}x", name], v["error"][:120], 10))
                    continue
                before = v.get("quality_before_finetune") or {}
                before = before.get(v["quality"].get("key", "top1_agreement"), before.get("value"))
                digits = ".4f" if "key" in v["quality"] else ".2f"
                label = name if not name.startswith("tp") else f"{name} (ratio {v['ratio']:.3f}"
                label += ")" if name.startswith("tp") else f" ({len(v['removed_units'])} units)"
                lines.append(f"{head} | {t['target_speedup']:g}x | {label} | {v['latency_ms']['median']:.3f} | "
                             f"{common.measured_speedup(v)} | {v['speedup_flops']:.2f} | {v['speedup_fidelity']:.2f} | "
                             f"{'' if before is None else format(before, digits)} | {v['quality']['value']:{digits}} |")
    metrics = sorted({v["quality"]["metric"] for row in result["rows"] for t in row["targets"]
                      for v in t["variants"].values() if "quality" in v})
    lines += ["", f"- Quality: {'; '.join(metrics)}, on the held-out split (before fine-tuning: top-1 agreement "
              "with the unpruned model, %, or the same KL for random weights).", f"- TP: {METHOD}.",
              common.MEASURED_NOTE,
              "- mobilenet_v2 has random weights (none are shipped): its quality is fidelity to that model only, "
              "as KL in nats per image before and after fine-tuning (its top-1 is a near tie on most crops), with "
              "BatchNorm statistics from 512 training crops so that its output depends on the image."]
    return common.document(TITLE, result, lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__, final_repeats=3)
    parser.add_argument("--models", default="resnet56", help=f"comma-separated, of {', '.join(CASES)} (default: "
                        "%(default)s); the results are named after them")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated (default: %(default)s)")
    parser.add_argument("--targets", type=common.float_list, default=list(TARGETS),
                        help="target speedups (default: 1.3,1.5,2,3)")
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs for all (default: %(default)s)")
    parser.add_argument("--calibration-size", type=int, default=512, help="scoring images (default: %(default)s)")
    parser.add_argument("--tp-round-to", type=lambda s: [int(v) for v in common.comma_list(s)], default=list(ROUND_TO),
                        help="Torch-Pruning round_to values (default: 1,8,16)")
    parser.add_argument("--tp-steps", type=int, default=10, help="TP ratio bisection steps (default: %(default)s)")
    args = parser.parse_args(argv)
    models = common.known_list(parser, "--models", args.models, CASES)
    name = f"{NAME}_{'_'.join(models)}"
    t0 = time.perf_counter()
    result = {**common.provenance(NAME), "rows": [], "skipped": []}
    for model in models:
        for profile_name in common.comma_list(args.profiles):
            torch.manual_seed(0)
            try:
                result["rows"].append(run_case(CASES[model], profile_name, args))
            except CompressorError as e:  # vit_digits where the zoo has no such model yet
                log(f"skipping {model} on {profile_name}: {e}")
                result["skipped"].append({"model": model, "profile": profile_name, "why": str(e)})
            result["seconds"] = time.perf_counter() - t0
            common.write_results(args.out, name, result, render_markdown(result))
    return common.finish(args.out, name, render_markdown(result), t0)


if __name__ == "__main__":
    sys.exit(main())
