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

import argparse
import datetime as dt
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from calibrated_table import calibrated_table, load_setup  # benchmarks/, beside this file

from compressor.criteria import CRITERIA, ScoringContext, score_units
from compressor.fileio import atomic_write_text
from compressor.finetune.training import teacher_labelled
from compressor.graph.surgery import remove_units
from compressor.latency.machine import machine_info, source_revision
from compressor.metrics.fidelity import fidelity, outputs, shift_agreement
from compressor.search.greedy import GreedyOrder, greedy_proposer
from compressor.search.knapsack import choose_units, removable_limits

MEASURED_RANDOM = 3  # random sets per level that are also timed


def log(msg: str) -> None:
    print(msg, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--data", default="photos")
    parser.add_argument("--profile", default="ort-cpu")
    parser.add_argument("--speedups", default="1.3,1.5,2")
    parser.add_argument("--criteria", default=",".join(c for c in CRITERIA if c != "random"))
    parser.add_argument("--random-sets", type=int, default=10)
    parser.add_argument("--calibration-size", type=int, default=256)
    parser.add_argument("--min-per-stage", type=int, default=0,
                        help="units kept per stage (default 0: a stage's first, non-residual block always stays)")
    parser.add_argument("--greedy-images", type=int, default=128, help="calibration crops greedy selection runs on")
    parser.add_argument("--all-sets-at", default="", help="levels at which every minimal set is evaluated, e.g. 1.3")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    speedups = [float(s) for s in args.speedups.split(",")]
    criteria = [c for c in args.criteria.split(",") if c]
    t0 = time.perf_counter()

    setup = load_setup(args.model, args.data, args.profile)
    data, loaded, base, profile, dep, units = (setup.data, setup.loaded, setup.base, setup.profile, setup.dep,
                                               setup.units)
    x = dep.example
    names = [u.name for u in units]
    log(f"{args.model}: {len(units)} units; measuring the latency table on {profile.name}")
    with tempfile.TemporaryDirectory(prefix="criteria-at-speedup-") as tmp:
        work = Path(tmp)
        measured_table = calibrated_table(base, units, dep, args.model, work, args.min_per_stage)
        table, floor, reach, calibration = (measured_table.table, measured_table.floor, measured_table.reach,
                                            measured_table.calibration)
        log(f"floor ({len(floor)} units removed): {reach.speedup():.2f}x; calibration scale {calibration.scale:.2f}")

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
        all_sets_at = [float(v) for v in args.all_sets_at.split(",") if v]
        rows: list[dict] = []
        to_time: dict[tuple[str, ...], None] = {}
        for level in speedups:
            need = 1 - 1 / level
            required = calibration.required_saving_ms(table, need, 0)
            proposals = {name: choose_units(units, importance, table.savings_ms, required, args.min_per_stage)
                         for name, importance in scores.items()}
            proposals["greedy"] = greedy_propose(required)
            if level in all_sets_at:
                for i, s in enumerate(minimal_sets(units, table.savings_ms, required, args.min_per_stage)):
                    proposals[f"all#{i}"] = s
            for name, choice in proposals.items():
                row = {"level": level, "criterion": name, "reachable": choice is not None}
                if choice is None:
                    rows.append(row)
                    continue
                removed = list(choice.removed)
                pruned = remove_units(base, [u for u in units if u.name in removed], x)
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
        log(f"timing {len(to_time)} distinct removal sets against the baseline, interleaved")
        sets = list(to_time)
        paths = [dep.export(base, work / "t-baseline")]
        paths += [dep.export(remove_units(base, [u for u in units if u.name in s], x), work / f"t-{i}")
                  for i, s in enumerate(sets)]
        timed = dep.time(paths, profile.search_policy)
    measured = {s: timed.speedup(0, i + 1) for i, s in enumerate(sets)}
    for row in rows:
        if row.get("removed") is not None and tuple(row["removed"]) in measured:
            row["measured_speedup"] = measured[tuple(row["removed"])]

    result = {"benchmark": "criteria_at_speedup",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": shlex.join([sys.executable, *sys.argv]), "git_commit": source_revision(Path(__file__).parent),
              "machine": machine_info(), "model": args.model, "source": loaded.source, "data": args.data,
              "profile": profile.to_dict(), "units": names, "min_per_stage": args.min_per_stage,
              "calibration": calibration.to_dict(), "floor_speedup": reach.speedup(),
              "table": {"baseline_ms": table.baseline_ms, "savings_ms": table.savings_ms},
              "scores": scores, "rows": rows, "unpruned_shift_agreement": stability,
              "greedy": {"images": len(greedy_x), "sets_evaluated": greedy.evaluations,
                         "steps": [vars(s) for s in greedy.steps]},
              "seconds": time.perf_counter() - t0}
    atomic_write_text(args.out / "criteria_at_speedup.json", json.dumps(result, indent=2))
    atomic_write_text(args.out / "criteria_at_speedup.md", render_markdown(result, criteria, speedups))
    print(render_markdown(result, criteria, speedups))
    return 0


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
    m = result["machine"]
    lines = [
        f"# Criteria at a measured speedup: {result['model']} on {result['data']} ({result['profile']['name']})",
        "",
        f"Machine: {m['cpu']} ({m['logical_cores']} logical cores), "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f"; {result['date']}.",
        "",
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
            agree = [r["top1_agreement"] for r in randoms]
            timed = [r["measured_speedup"] for r in randoms if "measured_speedup" in r]
            sd = statistics.stdev(agree) if len(agree) > 1 else 0.0
            lines.append(f"| {level:g}x | random ({len(randoms)} sets) | "
                         f"{statistics.mean(len(r['removed']) for r in randoms):.1f} | "
                         f"{statistics.mean(r['predicted_speedup'] for r in randoms):.2f} | "
                         f"{(statistics.mean(timed) if timed else float('nan')):.2f} | "
                         f"{statistics.mean(agree):.1f} ± {sd:.1f} (max {max(agree):.1f}) | "
                         f"{statistics.mean(r['top5_overlap'] for r in randoms):.1f} | "
                         f"{statistics.mean(r['kl_divergence'] for r in randoms):.3f} |")
        if every:
            agree = [r["top1_agreement"] for r in every]
            lines.append(f"| {level:g}x | every minimal set ({len(every)}) | "
                         f"{min(len(r['removed']) for r in every)}-{max(len(r['removed']) for r in every)} | "
                         f"{statistics.mean(r['predicted_speedup'] for r in every):.2f} | | "
                         f"{statistics.mean(agree):.1f} ± {statistics.stdev(agree):.1f} (max {max(agree):.1f}) | "
                         f"{statistics.mean(r['top5_overlap'] for r in every):.1f} | "
                         f"{statistics.mean(r['kl_divergence'] for r in every):.3f} (min "
                         f"{min(r['kl_divergence'] for r in every):.3f}) |")
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
