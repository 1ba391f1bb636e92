"""Scoring time of the unit-importance criteria: prefix caching against the naive way.

For each model (default resnet56 and resnet20, trained on digits32) this script

1. takes a fixed calibration subset of the training split (default 256 images, seed 0);
2. for every criterion that supports prefix caching (cka, sr_init) runs score_units with
   use_cache=True and use_cache=False on the same images: one untimed warm-up pair, then
   interleaved timed runs (cached, naive, cached, naive, ...; --repeats of each, default 5,
   time.perf_counter_ns; sr_init with --sr-init-repeats, default 1 re-initialisation seed per
   unit to keep the naive runs short), and reports the median of each, the ratio cached / naive
   (goal for resnet56: at most 0.6) and the largest absolute difference between the two
   paths' scores (must be ~0: above 1e-6 the script writes its results and exits 3);
3. times every other criterion once (after one untimed warm-up call);
4. writes criteria_scoring_time.json and .md into --out, with each criterion's cost
   string from compressor.criteria.COSTS and the machine.

    .venv/bin/python benchmarks/criteria_scoring_time.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import common
import torch
from common import log

from compressor.criteria import COSTS, CRITERIA, ScoringContext, score_units
from compressor.data import load_data
from compressor.graph.units import find_units
from compressor.models.sources import load_model

NAME = "criteria_scoring_time"
TITLE = "Criterion scoring time: prefix caching vs naive"
DATA = "digits32"
CACHED_CRITERIA = ("cka", "sr_init")  # criteria whose ScoringContext.use_cache changes the computation
GOAL_MODEL = "resnet56"
GOAL_RATIO = 0.6
MAX_SCORE_DIFF = 1e-6


def timed_score(name: str, ctx: ScoringContext) -> tuple[float, float, dict[str, float]]:
    """(wall seconds, process CPU seconds, scores) of one score_units call."""
    c0, t0 = time.process_time_ns(), time.perf_counter_ns()
    scores = score_units(name, ctx)
    t1, c1 = time.perf_counter_ns(), time.process_time_ns()
    return (t1 - t0) / 1e9, (c1 - c0) / 1e9, scores


def max_abs_diff(a: dict[str, float], b: dict[str, float]) -> float:
    if a.keys() != b.keys():
        msg = f"the two paths scored different units: {sorted(a.keys() ^ b.keys())}"
        raise RuntimeError(msg)
    return max((abs(a[k] - b[k]) for k in a), default=0.0)


def time_cached_vs_naive(name: str, model, units, calibration, repeats: int, sr_repeats: int) -> dict:
    """Warm-up pair, then `repeats` interleaved (cached, naive) pairs of one criterion."""

    def ctx(use_cache: bool) -> ScoringContext:
        return ScoringContext(model, units, calibration, seed=0, use_cache=use_cache, repeats=sr_repeats)

    load_before = os.getloadavg()[0]
    warm_cached, _, reference = timed_score(name, ctx(True))
    warm_naive, _, naive_scores = timed_score(name, ctx(False))
    diffs = [max_abs_diff(reference, naive_scores)]
    wall: dict[bool, list[float]] = {True: [], False: []}
    cpu: dict[bool, list[float]] = {True: [], False: []}
    for i in range(repeats):
        for use_cache in (True, False):
            seconds, cpu_seconds, scores = timed_score(name, ctx(use_cache))
            wall[use_cache].append(seconds)
            cpu[use_cache].append(cpu_seconds)
            diffs.append(max_abs_diff(reference, scores))
        log(f"    {name} pair {i + 1}/{repeats}: cached {wall[True][-1]:.2f} s, naive {wall[False][-1]:.2f} s "
            f"(load average {os.getloadavg()[0]:.2f})")
    cached, naive = statistics.median(wall[True]), statistics.median(wall[False])
    pair_ratios = [c / n for c, n in zip(wall[True], wall[False], strict=True)]
    return {
        "criterion": name, "cost": COSTS[name],
        "sr_init_repeats": sr_repeats if name == "sr_init" else None,
        "warmup_s": {"cached": warm_cached, "naive": warm_naive},
        "cached_s": wall[True], "naive_s": wall[False], "cached_cpu_s": cpu[True], "naive_cpu_s": cpu[False],
        "cached_median_s": cached, "naive_median_s": naive, "ratio": cached / naive,
        "pair_ratios": pair_ratios, "median_pair_ratio": statistics.median(pair_ratios),
        "cpu_ratio": statistics.median(cpu[True]) / statistics.median(cpu[False]),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "max_abs_score_diff": max(diffs), "scores_match": max(diffs) <= MAX_SCORE_DIFF,
        "scores": reference,
    }


def time_once(name: str, model, units, calibration) -> dict:
    """One warm-up call, then one timed call (criteria without a cached path)."""
    ctx = ScoringContext(model, units, calibration, seed=0)
    timed_score(name, ctx)
    seconds, _, scores = timed_score(name, ctx)
    return {"criterion": name, "cost": COSTS[name], "seconds": seconds, "scores": scores}


# ---------------------------------------------------------------------------- output


def render_markdown(result: dict) -> str:
    lines = [
        f"Data {result['data']}: {result['calibration_size']} calibration images from the training split "
        f"(seed 0), batches of {result['batch_size']}. Each cached/naive pair: one untimed warm-up pair, then "
        f"{result['repeats']} interleaved timed pairs (cached, naive, cached, naive, ...); medians. "
        f"SR-init timed with ScoringContext.repeats = {result['sr_init_repeats']} re-initialisation seed(s) per "
        "unit (its default is 3, used by prune and score; repeats multiply the suffix work of both paths alike, "
        "so fewer keep the naive runs short without favouring either path). "
        f"Goal: cached / naive <= {GOAL_RATIO} for cka and sr_init on {GOAL_MODEL}.",
        "",
        "| model | units | criterion | cached median (s) | naive median (s) | cached / naive | goal "
        "| median of per-pair ratios | CPU-time ratio | max abs score diff |",
        "|---|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for model in result["models"]:
        for r in model["cached_vs_naive"]:
            goal = ("met" if r["ratio"] <= GOAL_RATIO else "**missed**") if model["model"] == GOAL_MODEL else "-"
            diff = f"{r['max_abs_score_diff']:.1e}" + ("" if r["scores_match"] else " **FAIL**")
            lines.append(f"| {model['model']} | {model['units']} | {r['criterion']} | {r['cached_median_s']:.2f} | "
                         f"{r['naive_median_s']:.2f} | {r['ratio']:.2f} | {goal} | {r['median_pair_ratio']:.2f} | "
                         f"{r['cpu_ratio']:.2f} | {diff} |")
    lines += [
        "",
        "Every timed run (s):",
        "",
    ]
    for model in result["models"]:
        for r in model["cached_vs_naive"]:
            lines.append(f"- {model['model']} {r['criterion']}: cached "
                         + ", ".join(f"{s:.2f}" for s in r["cached_s"]) + "; naive "
                         + ", ".join(f"{s:.2f}" for s in r["naive_s"])
                         + f" (warm-up pair, not counted: {r['warmup_s']['cached']:.2f} / "
                         f"{r['warmup_s']['naive']:.2f}; 1-min load average {r['load_average_1min']['before']:.1f} "
                         f"before, {r['load_average_1min']['after']:.1f} after)")
    lines += [
        "",
        "## Every criterion",
        "",
        "Criteria without a cached path timed once (after one untimed call); cka and sr_init: the cached median.",
        "",
        "| criterion | cost (COSTS) | " + " | ".join(f"{m['model']} (s)" for m in result["models"]) + " |",
        "|---|---|" + "---:|" * len(result["models"]),
    ]
    for name in result["criteria"]:
        cells = []
        for model in result["models"]:
            cached = {r["criterion"]: r["cached_median_s"] for r in model["cached_vs_naive"]}
            once = {r["criterion"]: r["seconds"] for r in model["once"]}
            value = cached.get(name, once.get(name))
            cells.append("-" if value is None else (f"{value:.2f}" if value >= 0.01 else f"{value:.4f}"))
        lines.append(f"| {name} | {result['costs'][name]} | " + " | ".join(cells) + " |")
    failed = [f"{m['model']} {r['criterion']}" for m in result["models"] for r in m["cached_vs_naive"]
              if not r["scores_match"]]
    lines += [
        "",
        "- Score difference: largest |cached - naive| over units and over every run (warm-up included), "
        f"against the warm-up cached scores; required <= {MAX_SCORE_DIFF:g}. "
        + (f"**Failed: {', '.join(failed)}.**" if failed else "All within."),
        "- Goal and 'cached / naive': ratio of the wall-clock medians (time.perf_counter_ns). Also shown: the "
        "median of the per-pair ratios (each cached run against the naive run right after it) and the ratio "
        "of median process CPU time, which other processes on the machine disturb less than wall time.",
        "- Absolute seconds on this shared 2-core machine move by 10-30% between runs (more while other jobs "
        "run: see the load averages); the interleaved ratio is the figure to compare.",
        f"- Total wall time of this script: {result.get('seconds', 0):.0f} s.",
    ]
    return common.document(TITLE, result, lines, machine_extra=f", torch threads {result['torch_threads']}")


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__, models="resnet56,resnet20")
    parser.add_argument("--calibration-size", type=int, default=256,
                        help="calibration images from the training split (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="calibration batch size (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs of each path, interleaved (default: %(default)s; at least 3)")
    parser.add_argument("--sr-init-repeats", type=int, default=1,
                        help="ScoringContext.repeats for sr_init: seeds per unit (default: %(default)s, to keep "
                             "the naive runs short; the criterion's own default is 3, which multiplies both "
                             "paths' suffix work alike)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's own choice)")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be at least 3")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be positive")
    if args.calibration_size < 1 or args.batch_size < 1 or args.sr_init_repeats < 1:
        parser.error("--calibration-size, --batch-size and --sr-init-repeats must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data = load_data(DATA)
    criteria = list(CRITERIA)
    missing = [c for c in CACHED_CRITERIA if c not in CRITERIA]
    if missing:
        log(f"criteria not registered: {missing}")
        return 2
    result: dict = {
        **common.provenance(NAME), "torch_threads": torch.get_num_threads(), "data": DATA,
        "calibration_size": args.calibration_size, "batch_size": args.batch_size, "calibration_seed": 0,
        "repeats": args.repeats, "sr_init_repeats": args.sr_init_repeats,
        "goal": {"model": GOAL_MODEL, "criteria": list(CACHED_CRITERIA), "max_ratio": GOAL_RATIO},
        "max_score_diff": MAX_SCORE_DIFF, "criteria": criteria, "costs": {c: COSTS[c] for c in criteria},
        "models": [],
    }
    for model_name in args.models:
        loaded = load_model(model_name, data)
        model = loaded.model.eval()
        units = find_units(model, loaded.example_input())
        calibration = data.loader("train", batch_size=args.batch_size, limit=args.calibration_size, seed=0)
        entry: dict = {"model": model_name, "units": len(units), "cached_vs_naive": [], "once": []}
        result["models"].append(entry)
        for name in CACHED_CRITERIA:
            log(f"[{model_name}] {name}: warm-up pair, then {args.repeats} interleaved cached/naive pairs")
            row = time_cached_vs_naive(name, model, units, calibration, args.repeats, args.sr_init_repeats)
            entry["cached_vs_naive"].append(row)
            log(f"[{model_name}] {name}: cached {row['cached_median_s']:.2f} s, naive {row['naive_median_s']:.2f} s, "
                f"ratio {row['ratio']:.2f}, max |diff| {row['max_abs_score_diff']:.1e}")
            result["seconds"] = time.perf_counter() - t0
            common.write_results(args.out, NAME, result, render_markdown(result))
        for name in (c for c in criteria if c not in CACHED_CRITERIA):
            row = time_once(name, model, units, calibration)
            entry["once"].append(row)
            log(f"[{model_name}] {name}: {row['seconds']:.4f} s")
        result["seconds"] = time.perf_counter() - t0
        common.write_results(args.out, NAME, result, render_markdown(result))
    common.finish(args.out, NAME, render_markdown(result), t0)
    failed = [f"{m['model']} {r['criterion']} ({r['max_abs_score_diff']:.3g})" for m in result["models"]
              for r in m["cached_vs_naive"] if not r["scores_match"]]
    if failed:
        print(f"FAIL: cached and naive scores differ by more than {MAX_SCORE_DIFF:g}: {', '.join(failed)}",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
