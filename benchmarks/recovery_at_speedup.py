"""How much fine-tuning recovers of a pretrained model at each measured speedup, by recipe.

For one model and data source (default efficientnet_lite0 with its ImageNet weights on
`photos`) on one profile (default ort-cpu), this script

1. measures the latency table and the most removable set, and calibrates the table on it
   (as the search does), then scores the units with one criterion (default cka);
2. per speedup level chooses the removal set with the search's knapsack, and times every
   set against the baseline in one interleaved measurement;
3. fine-tunes each set with each recipe, as `compressor prune` does for this model
   (distillation at the model's default learning rate and BatchNorm setting):
   `logits` (distillation from the logits only) and `mimic` (plus every kept block's output
   and the penultimate features, prefix frozen; compressor.finetune.mimic);
4. reports, before and after, the top-1 agreement with the unpruned model on the held-out
   crops (photos never seen in scoring or fine-tuning), on the held-out crops where the
   unpruned model is confident (top-1 probability >= 0.5), and on fresh crops of the
   calibration photos (the same photos as fine-tuning, other crops): the gap between the
   last and the first is what the change of photos costs;
5. writes recovery_at_speedup.json and .md into --out.

    .venv/bin/python benchmarks/recovery_at_speedup.py --out benchmarks/results
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import common
from calibrated_table import load_setup, setup_parser, setup_provenance, setup_title
from common import log

from compressor.criteria import ScoringContext, score_units
from compressor.data.photos import load_photos
from compressor.finetune.mimic import plan_mimic
from compressor.finetune.training import train
from compressor.graph.surgery import remove_units
from compressor.metrics.fidelity import Fidelity, fidelity, outputs
from compressor.search.knapsack import choose_units
from compressor.stages.options import PruneOptions
from compressor.stages.recover import finetune_settings

NAME = "recovery_at_speedup"
RECIPES = ("logits", "mimic")
FRESH_SEED = 7  # seed of the fresh crops of the calibration photos (fine-tuning uses seed 0)


def summary(f: Fidelity) -> dict:
    return {"top1_agreement": f.top1_agreement, "confident_agreement": f.confident_agreement,
            "confident_images": f.confident_images, "kl_divergence": f.kl_divergence,
            "top5_overlap": f.top5_overlap}


def main(argv: list[str] | None = None) -> int:
    parser = setup_parser(__doc__, speedups="1.1,1.2,1.3,1.5")
    parser.add_argument("--criterion", default="cka")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs (prune's default: 4)")
    parser.add_argument("--min-per-stage", type=int, default=1)
    args = parser.parse_args(argv)
    recipes = common.comma_list(args.recipes)
    t0 = time.perf_counter()

    setup = load_setup(args.model, args.data, args.profile)
    data, loaded, base, units, x = setup.data, setup.loaded, setup.base, setup.units, setup.dep.example
    lr, freeze, _ = finetune_settings(PruneOptions(), loaded)
    with tempfile.TemporaryDirectory(prefix="recovery-at-speedup-") as tmp:
        work = Path(tmp)
        measured_table = setup.measure_table(args.model, work, args.min_per_stage)
        table, calibration = measured_table.table, measured_table.calibration
        importance = score_units(args.criterion, ScoringContext(
            base, units, data.loader("train", batch_size=64, limit=512, seed=0)))
        sets: dict[float, list[str]] = {}
        for level in args.speedups:
            required = calibration.required_saving_ms(table, 1 - 1 / level, 0)
            choice = choose_units(units, importance, table.savings_ms, required, args.min_per_stage)
            if choice is not None:
                sets[level] = list(choice.removed)
        measured = dict(zip(sets, setup.measured_speedups(list(sets.values()), work / "timed"), strict=True))

    val = data.loader("val", batch_size=64)
    fresh_bundle = load_photos(train_crops=256, seed=FRESH_SEED) if args.data == "photos" else None
    if fresh_bundle is not None:
        fresh_bundle.fit_to(loaded.input_shape[1], loaded.preprocessing)
    fresh = fresh_bundle.loader("train", batch_size=64) if fresh_bundle is not None else None
    reference = outputs(base, val)
    fresh_reference = outputs(base, fresh) if fresh is not None else None
    rows = []
    for level, removed_names in sets.items():
        removed = [u for u in units if u.name in removed_names]
        pruned = remove_units(base, removed, x)
        before = {"held_out": summary(fidelity(base, pruned, val, reference))}
        if fresh is not None:
            before["calibration_photos"] = summary(fidelity(base, pruned, fresh, fresh_reference))
        for recipe in recipes:
            student = copy.deepcopy(pruned)
            t = time.perf_counter()
            plan = plan_mimic(student, removed, x) if recipe == "mimic" else None
            train(student, data.loader("train", batch_size=32, shuffle=True, seed=0), args.epochs, lr,
                  teacher=base, desc=f"{level}x {recipe}", freeze_batchnorm=freeze, mimic=plan)
            after = {"held_out": summary(fidelity(base, student, val, reference))}
            if fresh is not None:
                after["calibration_photos"] = summary(fidelity(base, student, fresh, fresh_reference))
            rows.append({"level": level, "removed": removed_names, "measured_speedup": measured[level],
                         "recipe": recipe, "before": before, "after": after,
                         "finetune_seconds": time.perf_counter() - t})
            log(f"{level}x (-{len(removed)} units, {measured[level]:.2f}x measured) {recipe}: held-out agreement "
                f"{before['held_out']['top1_agreement']:.1f} -> {after['held_out']['top1_agreement']:.1f}%")

    result = {**setup_provenance(NAME, args, setup), "criterion": args.criterion, "epochs": args.epochs, "lr": lr,
              "freeze_batchnorm": freeze, "train_crops": len(data.train), "held_out_crops": len(data.val),
              "calibration": calibration.to_dict(), "rows": rows, "seconds": time.perf_counter() - t0}
    common.write_results(args.out, NAME, result, render_markdown(result))
    return common.finish(args.out, NAME, render_markdown(result), t0)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def render_markdown(result: dict) -> str:
    lines = [
        f"Weights: {result['source']}. Removal sets chosen by {result['criterion']} and the search's knapsack on "
        "the calibrated latency table; 'measured x' from one interleaved measurement of every set against the "
        f"baseline. Fine-tuning: {result['epochs']} epochs over {result['train_crops']} crops, lr {result['lr']:g}"
        f"{', BatchNorm statistics frozen' if result['freeze_batchnorm'] else ''}; `logits` = distillation "
        "from the logits; `mimic` = that plus every kept block's output and the penultimate features, prefix "
        f"frozen. Agreement = top-1 agreement with the unpruned model (%), before -> after fine-tuning, on the "
        f"{result['held_out_crops']} held-out crops, on those of them where the unpruned model is confident "
        "(top-1 probability >= 0.5), and on fresh crops of the calibration photos.",
        "",
        "| level | units removed | measured x | recipe | held-out agreement | confident held-out | "
        "fresh calibration-photo crops | held-out KL (nats) | fine-tune (s) |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        b, a = r["before"], r["after"]
        cal = (f"{_pct(b['calibration_photos']['top1_agreement'])} -> {_pct(a['calibration_photos']['top1_agreement'])}"
               if "calibration_photos" in a else "")
        lines.append(
            f"| {r['level']:g}x | {len(r['removed'])} | {r['measured_speedup']:.2f} | {r['recipe']} | "
            f"{_pct(b['held_out']['top1_agreement'])} -> {_pct(a['held_out']['top1_agreement'])} | "
            f"{_pct(b['held_out']['confident_agreement'])} -> {_pct(a['held_out']['confident_agreement'])} "
            f"(of {a['held_out']['confident_images']}) | {cal} | "
            f"{b['held_out']['kl_divergence']:.3f} -> {a['held_out']['kl_divergence']:.3f} | "
            f"{r['finetune_seconds']:.0f} |")
    return common.document(setup_title("Recovery", result), result, lines)


if __name__ == "__main__":
    sys.exit(main())
