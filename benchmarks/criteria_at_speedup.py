"""What each criterion keeps of a pretrained model at a measured speedup, against random choices.

For one model and data source (default efficientnet_lite0 with its ImageNet weights on
`photos`) on one profile (default ort-cpu), this script

1. measures the latency table (every single-unit removal, interleaved) and the most
   removable set against the baseline, and calibrates the table's prediction on it
   (compressor.latency.predictor, kind "scale": what the search does after its first candidate);
2. scores the units with every criterion on the calibration crops;
3. per speedup level (default 1.3, 1.5, 2) chooses each criterion's removal set with the
   search's knapsack (least importance lost whose calibrated predicted saving reaches the
   level), and the same for --random-sets random importances;
4. evaluates every set without fine-tuning on the held-out crops (held-out photos never
   seen in scoring): top-1 agreement with the unpruned model, top-5 overlap, KL;
   The `greedy` row is the set that `prune --selection greedy` proposes (compressor.search.greedy: of
   the greedy order's set, by the measured KL of the whole set on --greedy-images crops, and the
   knapsack's over single-unit KL and over cka, the one with the least measured KL);
   with --all-sets-at L, every minimal allowed set reaching level L is also evaluated (the
   best any selection could have done without fine-tuning);
5. measures every criterion's set and a few random sets against the baseline in one
   interleaved measurement, so each row shows the speedup it really has;
6. writes criteria_at_speedup.json and .md into --out, with the unpruned model's top-1
   agreement with itself under a one-pixel shift (fidelity.shift_agreement) for scale.

    .venv/bin/python benchmarks/criteria_at_speedup.py --out benchmarks/results
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import common
import torch
from calibrated_table import load_setup, setup_parser, setup_provenance, setup_title
from common import log

from compressor.criteria import CRITERIA, ScoringContext, score_units
from compressor.finetune.training import teacher_labelled
from compressor.metrics.fidelity import fidelity, outputs, shift_agreement
from compressor.search.greedy import GreedyOrder, greedy_proposer
from compressor.search.knapsack import choose_units, removable_limits

NAME = "criteria_at_speedup"
MEASURED_RANDOM = 3  # random sets per level that are also timed


def main(argv: list[str] | None = None) -> int:
    parser = setup_parser(__doc__, speedups="1.3,1.5,2")
    parser.add_argument("--criteria", default=",".join(c for c in CRITERIA if c != "random"))
    parser.add_argument("--random-sets", type=int, default=10)
    parser.add_argument("--calibration-size", type=int, default=256)
    parser.add_argument("--min-per-stage", type=int, default=0,
                        help="units kept per stage (default 0: a stage's first, non-residual block always stays)")
    parser.add_argument("--greedy-images", type=int, default=128, help="calibration crops greedy selection runs on")
    parser.add_argument("--all-sets-at", type=common.float_list, default="",
                        help="levels at which every minimal set is evaluated, e.g. 1.3")
    args = parser.parse_args(argv)
    criteria = common.comma_list(args.criteria)
    t0 = time.perf_counter()

    setup = load_setup(args.model, args.data, args.profile)
    data, base, units = setup.data, setup.base, setup.units
    names = [u.name for u in units]
    with tempfile.TemporaryDirectory(prefix="criteria-at-speedup-") as tmp:
        work = Path(tmp)
        measured_table = setup.measure_table(args.model, work, args.min_per_stage)
        table, reach, calibration = measured_table.table, measured_table.reach, measured_table.calibration

        calib = data.loader("train", batch_size=64, limit=args.calibration_size, seed=0)
        if not data.labelled:  # sr_init and taylor read labels: the unpruned model's top-1 instead
            calib = teacher_labelled(calib, base)
        scores: dict[str, dict[str, float]] = {}
        for name in criteria:
            t = time.perf_counter()
            scores[name] = score_units(name, ScoringContext(base, units, calib))
            log(f"  scored {name} in {time.perf_counter() - t:.1f} s")
        for seed in range(args.random_sets):
            scores[f"random#{seed}"] = score_units("random", ScoringContext(base, units, calib, seed=seed))

        greedy_x = torch.cat([b[0] for b in data.loader("train", batch_size=128, limit=args.greedy_images, seed=0)])
        greedy = GreedyOrder(base, units, table.savings_ms, greedy_x, args.min_per_stage, log)
        greedy_propose = greedy_proposer(greedy, scores["cka"] if "cka" in scores else None)
        val = data.loader("val", batch_size=64)
        reference = outputs(base, val)
        stability = shift_agreement(base, val)
        log(f"unpruned model vs itself shifted one pixel: {stability:.1f}% top-1 agreement")
        rows: list[dict] = []
        to_time: dict[tuple[str, ...], None] = {}
        for level in args.speedups:
            need = 1 - 1 / level
            required = calibration.required_saving_ms(table, need, 0)
            proposals = {name: choose_units(units, importance, table.savings_ms, required, args.min_per_stage)
                         for name, importance in scores.items()}
            proposals["greedy"] = greedy_propose(required)
            if level in args.all_sets_at:
                for i, s in enumerate(minimal_sets(units, table.savings_ms, required, args.min_per_stage)):
                    proposals[f"all#{i}"] = s
            for name, choice in proposals.items():
                row = {"level": level, "criterion": name, "reachable": choice is not None}
                if choice is None:
                    rows.append(row)
                    continue
                removed = list(choice.removed)
                pruned = setup.pruned(removed)
                f = fidelity(base, pruned, val, reference=reference)
                row.update({"removed": removed, "predicted_speedup": 1 / (1 - calibration.saved_fraction(
                    sum(table.savings_ms[n] for n in removed) / table.baseline_ms, len(removed))),
                    "top1_agreement": f.top1_agreement, "top5_overlap": f.top5_overlap,
                    "kl_divergence": f.kl_divergence, "feature_cka": f.feature_cka})
                rows.append(row)
                if name.startswith("all#"):
                    continue
                is_random = name.startswith("random#")
                if not is_random or int(name.split("#")[1]) < MEASURED_RANDOM:
                    to_time[tuple(removed)] = None
        sets = list(to_time)
        measured = dict(zip(sets, setup.measured_speedups(sets, work / "timed"), strict=True))
    for row in rows:
        if row.get("removed") is not None and tuple(row["removed"]) in measured:
            row["measured_speedup"] = measured[tuple(row["removed"])]

    result = {**setup_provenance(NAME, args, setup), "units": names, "min_per_stage": args.min_per_stage,
              "calibration": calibration.to_dict(), "floor_speedup": reach.speedup(),
              "table": {"baseline_ms": table.baseline_ms, "savings_ms": table.savings_ms},
              "scores": scores, "rows": rows, "unpruned_shift_agreement": stability,
              "greedy": {"images": len(greedy_x), "sets_evaluated": greedy.evaluations,
                         "steps": [vars(s) for s in greedy.steps]},
              "seconds": time.perf_counter() - t0}
    markdown = render_markdown(result, criteria, args.speedups)
    common.write_results(args.out, NAME, result, markdown)
    return common.finish(args.out, NAME, markdown, t0)


def minimal_sets(units: list, savings_ms: dict[str, float], required_ms: float, min_per_stage: int):
    """Every allowed removal set (stage floors kept) whose table saving reaches `required_ms` and from
    which no unit can be dropped without falling short, as search.Choice objects."""
    import itertools

    from compressor.search.knapsack import Choice

    limits = removable_limits(units, min_per_stage)
    for k in range(1, len(units) + 1):
        for subset in itertools.combinations(units, k):
            total = sum(savings_ms[u.name] for u in subset)
            if total < required_ms or any(total - savings_ms[u.name] >= required_ms for u in subset):
                continue
            stages = [u.stage for u in subset]
            if any(stages.count(st) > limits.get(st, 0) for st in set(stages)):
                continue
            yield Choice(tuple(u.name for u in subset), 0.0, total)


def render_markdown(result: dict, criteria: list[str], speedups: list[float]) -> str:
    lines = [
        f"Weights: {result['source']}. Each criterion's removal set is chosen by the search's knapsack on the "
        f"latency table calibrated on the most removable set (scale {result['calibration']['scale']:.2f}; "
        f"that set measured {result['floor_speedup']:.2f}x). No fine-tuning: top-1 agreement with the unpruned "
        "model on held-out crops (photos never used for scoring). 'measured x' is the set's speedup in one "
        "interleaved measurement of every set against the baseline. `greedy`: the set `prune --selection greedy` "
        f"proposes: of the greedy order's set and the knapsack's over single-unit KL and over cka, the one whose "
        f"whole-set KL on {result['greedy']['images']} calibration crops is least "
        f"({result['greedy']['sets_evaluated']} sets evaluated for all levels). 'every minimal set': all allowed "
        "sets reaching the level from which no unit can be dropped, evaluated the same way. For scale: the "
        f"unpruned model agrees with itself on {result['unpruned_shift_agreement']:.1f}% of the held-out crops "
        "when each is shifted by one pixel.",
        "",
        "| level | criterion | units removed | predicted x | measured x | top-1 agreement (%) | top-5 overlap (%) "
        "| KL (nats) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    rows = result["rows"]
    for level in speedups:
        at = [r for r in rows if r["level"] == level]
        randoms = [r for r in at if r["criterion"].startswith("random#") and r["reachable"]]
        every = [r for r in at if r["criterion"].startswith("all#")]
        for r in at:
            if r["criterion"].startswith(("random#", "all#")):
                continue
            if not r["reachable"]:
                lines.append(f"| {level:g}x | {r['criterion']} | unreachable | | | | | |")
                continue
            lines.append(f"| {level:g}x | {r['criterion']} | {len(r['removed'])} | {r['predicted_speedup']:.2f} | "
                         f"{r.get('measured_speedup', float('nan')):.2f} | {r['top1_agreement']:.1f} | "
                         f"{r['top5_overlap']:.1f} | {r['kl_divergence']:.3f} |")
        if randoms:
            timed = [r["measured_speedup"] for r in randoms if "measured_speedup" in r]
            lines.append(_spread_row(level, f"random ({len(randoms)} sets)", randoms,
                                     f"{statistics.mean(len(r['removed']) for r in randoms):.1f}",
                                     f"{(statistics.mean(timed) if timed else float('nan')):.2f} "))
        if every:
            sizes = [len(r["removed"]) for r in every]
            lines.append(_spread_row(level, f"every minimal set ({len(every)})", every,
                                     f"{min(sizes)}-{max(sizes)}", "", kl_min=True))
    return common.document(setup_title("Criteria", result), result, lines)


def _spread_row(level: float, label: str, rows: list[dict], removed: str, measured: str,
                kl_min: bool = False) -> str:
    """A table row over several sets: mean predicted speedup, agreement (mean ± std, best), top-5
    overlap and KL (and the least KL where `kl_min`); `removed` and `measured` (with a trailing
    space where not empty) are the rows' cells as given."""
    agree = [r["top1_agreement"] for r in rows]
    sd = statistics.stdev(agree) if len(agree) > 1 else 0.0
    kl = [r["kl_divergence"] for r in rows]
    return (f"| {level:g}x | {label} | {removed} | {statistics.mean(r['predicted_speedup'] for r in rows):.2f} | "
            f"{measured}| {statistics.mean(agree):.1f} ± {sd:.1f} (max {max(agree):.1f}) | "
            f"{statistics.mean(r['top5_overlap'] for r in rows):.1f} | {statistics.mean(kl):.3f}"
            + (f" (min {min(kl):.3f})" if kl_min else "") + " |")


if __name__ == "__main__":
    sys.exit(main())
