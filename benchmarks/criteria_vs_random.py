"""Do the unit-importance criteria beat random block removal? One-shot, no fine-tuning.

For each model (default resnet20 and resnet56, trained on digits32) and each number k of
blocks to remove, this script

1. scores the units with every criterion (default: all registered but `random`) on a fixed
   calibration subset of the training split (default 512 images, seed 0);
2. removes the k least important units, taking units in order of importance but skipping a
   unit whose stage would be left without a block (at least --min-per-stage, default 1, of
   every stage survive; compressor.search.removable_limits);
3. evaluates the pruned model, without fine-tuning, on the validation split: top-1 accuracy,
   top-1 agreement with the unpruned model (share of identical argmax) and the mean
   KL(unpruned || pruned) of the softmax outputs (nats per image);
4. does the same for --random-sets (default 20) random removal sets of the same k: the
   `random` criterion with seeds 0..19 and the same selection rule;
5. calls a criterion "beats" random where its accuracy is above the random mean + 1 std,
   "worse than random" below mean - 1 std, else "no better than random" (the same for
   agreement, and for KL with the sign reversed), and writes criteria_vs_random.json and
   .md into --out.

    .venv/bin/python benchmarks/criteria_vs_random.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import common
import torch
from common import log
from torch import nn
from torch.nn import functional as F

from compressor.criteria import COSTS, CRITERIA, ScoringContext, score_units
from compressor.data import DataBundle, load_data
from compressor.graph.surgery import remove_units
from compressor.graph.units import Unit, find_units
from compressor.models.sources import load_model
from compressor.models.zoo import ZOO
from compressor.search.knapsack import removable_limits

NAME = "criteria_vs_random"
TITLE = "Criteria vs random block removal (one-shot, no fine-tuning)"
DATA = "digits32"
DEFAULT_KS = {"resnet20": [2, 3, 4], "resnet56": [6, 9, 13]}
METRICS = ("accuracy", "agreement", "kl")
HIGHER_IS_BETTER = {"accuracy": True, "agreement": True, "kl": False}
METRIC_LABELS = {"accuracy": "top-1 accuracy (%)", "agreement": "top-1 agreement with the unpruned model (%)",
                 "kl": "mean KL(unpruned || pruned) (nats)"}
VERDICT_METRIC = "accuracy"
FLOOR_MARGIN = 5.0  # percentage points above chance accuracy: the random sets are at the floor


# ---------------------------------------------------------------------------- selection and evaluation


def least_important(units: Sequence[Unit], scores: dict[str, float], k: int, min_per_stage: int) -> list[Unit]:
    """The k least important units, in order of importance (ties: graph order), skipping a unit
    whose stage has no removal left so that `min_per_stage` units of every stage survive."""
    left = removable_limits(units, min_per_stage)
    if k > sum(left.values()):
        msg = f"cannot remove {k} units keeping {min_per_stage} per stage (at most {sum(left.values())})"
        raise ValueError(msg)
    chosen: list[Unit] = []
    for unit in sorted(units, key=lambda u: (scores[u.name], u.order)):
        if len(chosen) == k:
            break
        if left[unit.stage] > 0:
            chosen.append(unit)
            left[unit.stage] -= 1
    return sorted(chosen, key=lambda u: u.order)


def tied_at_cut(units: Sequence[Unit], scores: dict[str, float], chosen: Sequence[Unit]) -> bool:
    """Whether a kept unit has the same score as the most important removed one, so that the
    removal set may depend on how ties are broken."""
    removed = {u.name for u in chosen}
    worst_removed = max(scores[n] for n in removed) if removed else None
    return any(scores[u.name] == worst_removed for u in units if u.name not in removed)


@torch.no_grad()
def logits_on(model: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x) for x in batches]).double()


def metrics(reference: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy and agreement (%) and mean KL(reference || pruned) per image (nats)."""
    log_p, log_q = F.log_softmax(reference, 1), F.log_softmax(logits, 1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1).mean()
    pred = logits.argmax(1)
    return {"accuracy": 100.0 * float((pred == labels).double().mean()),
            "agreement": 100.0 * float((pred == reference.argmax(1)).double().mean()),
            "kl": float(kl)}


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def verdict(value: float, stats: dict[str, float], higher_is_better: bool) -> str:
    """'beats' beyond mean + 1 std in the good direction, 'worse than random' beyond 1 std in the bad one."""
    sign = 1.0 if higher_is_better else -1.0
    margin = sign * (value - stats["mean"])
    if margin > stats["std"]:
        return "beats"
    if margin < -stats["std"]:
        return "worse than random"
    return "no better than random"


def share_of_random_beaten(value: float, samples: list[float], higher_is_better: bool) -> float:
    """Share of random sets strictly worse than `value` (ties count half)."""
    better = sum((value > s) if higher_is_better else (value < s) for s in samples)
    ties = sum(value == s for s in samples)
    return (better + 0.5 * ties) / len(samples)


# ---------------------------------------------------------------------------- one model


def run_model(model_name: str, ks: list[int], data: DataBundle, criteria: list[str], args: argparse.Namespace
              ) -> dict:
    t0 = time.perf_counter()
    loaded = load_model(model_name, data)
    model = loaded.model.eval()
    x_example = loaded.example_input()
    units = find_units(model, x_example)
    val = [(x, y) for x, y in data.loader("val", batch_size=256)]
    val_x, labels = [b[0] for b in val], torch.cat([b[1] for b in val])
    reference = logits_on(model, val_x)
    base = metrics(reference, reference, labels)
    calibration = data.loader("train", batch_size=128, limit=args.calibration_size, seed=0)
    log(f"[{model_name}] {len(units)} units, unpruned validation accuracy {base['accuracy']:.2f}%")

    evaluated: dict[frozenset[str], dict[str, float]] = {}

    def evaluate(chosen: list[Unit]) -> dict[str, float]:
        key = frozenset(u.name for u in chosen)
        if key not in evaluated:
            pruned = remove_units(model, chosen, x_example)
            evaluated[key] = metrics(reference, logits_on(pruned, val_x), labels)
        return evaluated[key]

    scores: dict[str, dict[str, float]] = {}
    scoring_s: dict[str, float] = {}
    for name in criteria:
        t = time.perf_counter()
        scores[name] = score_units(name, ScoringContext(model, units, calibration, seed=0))
        scoring_s[name] = time.perf_counter() - t
        log(f"[{model_name}] scored {name} in {scoring_s[name]:.1f} s")
    random_scores = [score_units("random", ScoringContext(model, units, calibration, seed=s))
                     for s in range(args.random_sets)]

    rows = []
    for k in ks:
        random_sets = [least_important(units, rs, k, args.min_per_stage) for rs in random_scores]
        random_metrics = [evaluate(s) for s in random_sets]
        random_stats = {m: summary([r[m] for r in random_metrics]) for m in METRICS}
        row: dict = {
            "k": k,
            "random": {"sets": [[u.name for u in s] for s in random_sets],
                       "distinct_sets": len({frozenset(u.name for u in s) for s in random_sets}),
                       "per_set": random_metrics, **random_stats},
            "criteria": {},
        }
        for name in criteria:
            chosen = least_important(units, scores[name], k, args.min_per_stage)
            result = evaluate(chosen)
            row["criteria"][name] = {
                "removed": [u.name for u in chosen],
                "tied_at_cut": tied_at_cut(units, scores[name], chosen),
                **result,
                "verdict": {m: verdict(result[m], random_stats[m], HIGHER_IS_BETTER[m]) for m in METRICS},
                "share_of_random_beaten": {m: share_of_random_beaten(result[m], [r[m] for r in random_metrics],
                                                                     HIGHER_IS_BETTER[m]) for m in METRICS},
            }
        rows.append(row)
        acc = random_stats["accuracy"]
        log(f"[{model_name}] k={k}: random accuracy {acc['mean']:.2f} +- {acc['std']:.2f}; "
            + ", ".join(f"{n} {row['criteria'][n]['accuracy']:.2f} ({row['criteria'][n]['verdict']['accuracy']})"
                        for n in criteria))
    return {
        "model": model_name, "units": [{"name": u.name, "kind": u.kind, "stage": u.stage} for u in units],
        "removable_limits": removable_limits(units, args.min_per_stage), "unpruned": base,
        "scores": scores, "scoring_s": scoring_s, "ks": ks, "rows": rows,
        "pruned_models_evaluated": len(evaluated), "seconds": time.perf_counter() - t0,
    }


# ---------------------------------------------------------------------------- output


def model_sentence(entry: dict, criteria: list[str], metric: str = VERDICT_METRIC) -> str:
    """Which criteria do not beat random (by `metric`), in plain words."""
    per_k = {r["k"]: [n for n in criteria if r["criteria"][n]["verdict"][metric] != "beats"]
             for r in entry["rows"]}
    never = [n for n in criteria if all(n in v for v in per_k.values())]
    always = [n for n in criteria if not any(n in v for v in per_k.values())]
    worse = {n: [r["k"] for r in entry["rows"] if r["criteria"][n]["verdict"][metric] == "worse than random"]
             for n in criteria}
    ks = ", ".join(str(k) for k in per_k)
    parts = [f"**{entry['model']}** (k = {ks}): "]
    if not any(per_k.values()):
        parts.append("every criterion beats random at every k.")
    else:
        detail = "; ".join(f"k = {k}: {', '.join(v) if v else 'none'}" for k, v in per_k.items())
        parts.append(f"criteria that do not beat random: {detail}. ")
        parts.append(f"Not at any k: {', '.join(never) or 'none'}. "
                     f"Beat random at every k: {', '.join(always) or 'none'}.")
        worse_text = [f"{n} (k = {', '.join(map(str, ks_))})" for n, ks_ in worse.items() if ks_]
        if worse_text:
            parts.append(f" Worse than random: {', '.join(worse_text)}.")
    return "".join(parts)


def render_markdown(result: dict) -> str:
    criteria = result["criteria"]
    lines = [
        f"Data {result['data']}: criteria score on {result['calibration_size']} training images (seed 0); "
        f"metrics on the {result['val_size']} validation images. The k least important units are removed "
        f"(at least {result['min_per_stage']} block per stage survives), no fine-tuning. Random: "
        f"{result['random_sets']} removal sets (random criterion, seeds 0..{result['random_sets'] - 1}, same "
        "stage rule). Verdict on accuracy: **beats** = above the random mean + 1 std, **worse** = below "
        "mean - 1 std, else **no better** (than random). KL = mean KL(unpruned || pruned) of the softmax "
        "outputs, nats per image (lower is better).",
        "",
        "## Summary: which criteria do not beat random (by top-1 accuracy)",
        "",
    ]
    lines += [f"- {model_sentence(e, criteria)}" for e in result["models"]]
    lines += ["", "The same by KL(unpruned || pruned), which does not saturate at chance accuracy "
              "(beats = KL below the random mean - 1 std):", ""]
    lines += [f"- {model_sentence(e, criteria, 'kl')}" for e in result["models"]]
    for entry in result["models"]:
        base = entry["unpruned"]
        lines += [
            "",
            f"## {entry['model']} ({len(entry['units'])} units; unpruned accuracy {base['accuracy']:.2f}%)",
            "",
            "| k | removal set | accuracy (%) | verdict | agreement (%) | verdict | KL | verdict "
            "| random sets beaten (acc.) |",
            "|---:|---|---:|---|---:|---|---:|---|---:|",
        ]
        for row in entry["rows"]:
            r = row["random"]
            lines.append(
                f"| {row['k']} | random ({len(r['per_set'])} sets, {r['distinct_sets']} distinct): mean +- std "
                f"[min, max] | {r['accuracy']['mean']:.2f} +- {r['accuracy']['std']:.2f} "
                f"[{r['accuracy']['min']:.2f}, {r['accuracy']['max']:.2f}] | | "
                f"{r['agreement']['mean']:.2f} +- {r['agreement']['std']:.2f} "
                f"[{r['agreement']['min']:.2f}, {r['agreement']['max']:.2f}] | | "
                f"{r['kl']['mean']:.3f} +- {r['kl']['std']:.3f} [{r['kl']['min']:.3f}, {r['kl']['max']:.3f}] | | |")
            for name in criteria:
                c = row["criteria"][name]
                tie = " (tie at cut)" if c["tied_at_cut"] else ""
                short = {"beats": "beats", "worse than random": "worse", "no better than random": "no better"}
                lines.append(
                    f"| {row['k']} | {name}{tie} | {c['accuracy']:.2f} | {short[c['verdict']['accuracy']]} | "
                    f"{c['agreement']:.2f} | {short[c['verdict']['agreement']]} | {c['kl']:.3f} | "
                    f"{short[c['verdict']['kl']]} | {c['share_of_random_beaten']['accuracy']:.0%} |")
        lines += ["", "Removed units:", ""]
        for row in entry["rows"]:
            for name in criteria:
                lines.append(f"- k = {row['k']}, {name}: {', '.join(row['criteria'][name]['removed'])}")
        lines += ["", "Scoring time on the calibration set: "
                  + ", ".join(f"{n} {s:.1f} s" for n, s in entry["scoring_s"].items()) + "."]
    chance = result["chance_accuracy"]
    floor = [f"{e['model']} k = {r['k']}" for e in result["models"] for r in e["rows"]
             if r["random"]["accuracy"]["mean"] < chance + FLOOR_MARGIN]
    lines += [
        "",
        "## Notes",
        "",
        f"- Chance accuracy is {chance:.0f}%. Where the random sets average within {FLOOR_MARGIN:g} points of it "
        f"({', '.join(floor) or 'nowhere'}), accuracy and agreement can barely separate a criterion from random "
        "(a pruned model at chance level is 'no better' whatever else it keeps); the KL column still can.",
        "- 'random sets beaten': share of the random removal sets with lower accuracy (ties count half).",
        "- 'tie at cut': a removed unit scores the same as a kept one, so the set depends on tie-breaking "
        "(graph order here).",
        "- Criterion costs (COSTS): " + "; ".join(f"{n}: {result['costs'][n]}" for n in criteria) + ".",
        f"- sr_init with ScoringContext.repeats = {result['sr_init_repeats']}; all criteria with seed 0.",
        f"- Total wall time: {result.get('seconds', 0):.0f} s.",
    ]
    return common.document(TITLE, result, lines)


# ---------------------------------------------------------------------------- main


def _parse_k(spec: str) -> tuple[str, list[int]]:
    model, _, ks = spec.partition("=")
    try:
        values = [int(k) for k in ks.split(",") if k.strip()]
    except ValueError:
        values = []
    if not model or not values or any(k < 1 for k in values):
        msg = f"expected MODEL=K1,K2,... with positive integers, got {spec!r}"
        raise argparse.ArgumentTypeError(msg)
    return model.strip(), values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--k", dest="ks", action="append", type=_parse_k, metavar="MODEL=K1,K2,...",
                        help="blocks to remove per model, repeatable (default: "
                             + " ".join(f"{m}={','.join(map(str, k))}" for m, k in DEFAULT_KS.items()) + ")")
    parser.add_argument("--criteria", default=",".join(c for c in CRITERIA if c != "random"),
                        help="comma-separated criteria (default: %(default)s)")
    parser.add_argument("--random-sets", type=int, default=20, help="random removal sets per k (default: 20)")
    parser.add_argument("--calibration-size", type=int, default=512,
                        help="training images the criteria score on (default: %(default)s)")
    parser.add_argument("--min-per-stage", type=int, default=1,
                        help="blocks of every stage that survive (default: %(default)s)")
    args = parser.parse_args(argv)
    args.ks = dict(args.ks) if args.ks else dict(DEFAULT_KS)
    unknown = [m for m in args.ks if m not in ZOO]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; zoo: {', '.join(ZOO)}")
    args.criteria = common.known_list(parser, "--criteria", args.criteria, CRITERIA)
    if args.random_sets < 2:
        parser.error("--random-sets must be at least 2 (a standard deviation is needed)")
    if args.calibration_size < 1 or args.min_per_stage < 0:
        parser.error("--calibration-size must be positive and --min-per-stage non-negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    data = load_data(DATA)
    result: dict = {
        **common.provenance(NAME), "data": DATA, "calibration_size": args.calibration_size,
        "calibration_seed": 0, "val_size": len(data.val), "min_per_stage": args.min_per_stage,
        "random_sets": args.random_sets, "criteria": args.criteria, "chance_accuracy": 100.0 / data.num_classes,
        "costs": {c: COSTS[c] for c in args.criteria}, "sr_init_repeats": ScoringContext.repeats,
        "verdict_rule": "beats: value better than the random mean by more than 1 std; worse than random: worse "
                        "by more than 1 std; else no better than random",
        "verdict_metric": VERDICT_METRIC, "metrics": METRIC_LABELS, "finetuned": False, "models": [],
    }
    for model_name, ks in args.ks.items():
        result["models"].append(run_model(model_name, ks, data, args.criteria, args))
        result["seconds"] = time.perf_counter() - t0
        common.write_results(args.out, NAME, result, render_markdown(result))
    return common.finish(args.out, NAME, render_markdown(result), t0)


if __name__ == "__main__":
    sys.exit(main())
