"""Latency-model accuracy: predicted against measured latency of random removal sets.

For each model and profile (backend) this script

1. measures the latency table as `compressor profile` does (compressor.latency.designed: units
   grouped by structure, savings fitted on designed removal sets timed with the baseline
   round-robin, measured until random sets are predicted within --uncertainty);
2. draws --sets random removal sets (seeded, the same for every profile; size uniform from 1
   to the most removable with one unit kept per stage, units drawn at random within those
   per-stage limits) and adds the floor set (compressor.search.most_removable, what `prune`
   measures first);
3. exports the baseline, the floor and every random set and times them all in ONE interleaved
   measurement with the profile's search policy;
4. scores the table's predictions on the random sets (the floor is only ever a fitting point):
   raw (the model's prediction in ms, in the table's own frame), raw in the measured baseline's
   frame (the saved fraction applied to this measurement's baseline: no measured candidate used),
   the count null model (every removal saves the same, fitted on the table's own design), the
   share within 2 sd of the model's own uncertainty, and calibrated (compressor.latency.predictor:
   scale / offset / affine) on the floor, the floor plus one other set, and leave-one-out;
5. writes predictor_accuracy.json, .md and .png into --out after every model x profile.

resnet20/32/44/56/110 are the digits32-trained models (32x32); 224x224 zoo models
(mobilenet_v2, ...) have random-init weights with randomised BatchNorm statistics: latency
on these runtimes does not depend on the weights' values.

    .venv/bin/python benchmarks/predictor_accuracy.py --models resnet56,mobilenet_v2,efficientnet_lite0 \
        --profiles ort-cpu,openvino-cpu --sets 20 --out benchmarks/results

Goals (issue 22): raw @ measured baseline MAPE at most 5% on every row, and below the count null
model's on mobilenet_v2, whose units differ.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common
import numpy as np
from common import log

from compressor.data import load_data
from compressor.errors import CompressorError
from compressor.graph.surgery import remove_units
from compressor.graph.units import Unit, find_units
from compressor.latency.deploy import Deployment
from compressor.latency.designed import DesignOptions, measure_latency_table
from compressor.latency.model import LatencyModel, UnitInfo, measurements_of
from compressor.latency.predictor import Observation, compare, fit_calibration, prediction_errors
from compressor.latency.profiles import Profile, load_profile
from compressor.latency.records import probe_summary
from compressor.latency.table import LatencyTable
from compressor.latency.timing import LatencyStats, TimingPolicy
from compressor.models.loaded import LoadedModel
from compressor.models.sources import load_model
from compressor.models.zoo import ZOO, build
from compressor.search.knapsack import most_removable, removable_limits

NAME = "predictor_accuracy"
TITLE = "Lookup-table predictor accuracy on random removal sets"
DATA = "digits32"
MIN_PER_STAGE = 1
KINDS = ("none", "scale", "offset", "affine", "count")
RANDOM_INIT_NOTE = ("random-init weights with randomised BatchNorm statistics (latency on these runtimes "
                    "does not depend on the weights' values)")
MEASURE_TEXT = {
    "one": "all timed in one interleaved measurement with the baseline",
    "pairs": "each timed interleaved with the baseline in its own pair, as `prune` measures candidates",
}
# rough costs on a 2-core machine for the a-priori run-time estimate: seconds per export, ms per run
EXPORT_S = {"onnxruntime": 0.6, "openvino": 2.5, "torch": 0.4}
EXPORT_S_224 = {"onnxruntime": 6.0, "openvino": 8.0, "torch": 2.5}
RUN_MS = {"onnxruntime": 0.01, "openvino": 0.02, "torch": 0.06}  # per MFLOP (2 x MACs)


# ---------------------------------------------------------------------------- models and sets


def prepare_model(name: str, seed: int) -> tuple[LoadedModel, str]:
    """The model to time and a note on its weights: 32x32 zoo models trained on digits32,
    others random-init at their native size."""
    size = ZOO[name].input_size
    if size == 32:
        loaded = load_model(name, load_data(DATA))
        return loaded, loaded.source
    model = common.randomise_batchnorm(build(name, 1000), seed)
    return LoadedModel(model, name, 1000, (3, size, size), f"{name} (random init)"), RANDOM_INIT_NOTE


def random_sets(units: list[Unit], n: int, rng: random.Random, exclude: set[tuple[str, ...]]
                ) -> list[tuple[str, ...]]:
    """`n` distinct removal sets (unit names in graph order), none in `exclude`: size uniform from 1
    to the most removable, units drawn in random order within the per-stage limits."""
    limits = removable_limits(units, MIN_PER_STAGE)
    most = sum(limits.values())
    if most == 0:
        return []
    seen = set(exclude)
    out: list[tuple[str, ...]] = []
    for _ in range(1000 * max(n, 1)):
        if len(out) >= n:
            break
        k = rng.randint(1, most)
        taken: dict[str, int] = {}
        chosen: list[Unit] = []
        for u in rng.sample(units, len(units)):
            if len(chosen) == k:
                break
            if taken.get(u.stage, 0) < limits[u.stage]:
                taken[u.stage] = taken.get(u.stage, 0) + 1
                chosen.append(u)
        key = tuple(u.name for u in sorted(chosen, key=lambda u: u.order))
        if key not in seen:
            seen.add(key)
            out.append(key)
    return out


# ---------------------------------------------------------------------------- one model x profile


def _pct(e: dict | None, bias: bool = True) -> str:
    if not e or not e.get("n"):
        return "-"
    text = f"{e['mape']:.1%} / {e['within_10pct']:.0%}"
    return text + (f" / {e['bias']:+.1%}" if bias else "")


@dataclass
class Timed:
    """One candidate's interleaved measurement against the baseline (ms)."""

    baseline: LatencyStats
    candidate: LatencyStats
    spread: float  # IQR/median of the per-round speedups


def time_candidates(dep: Deployment, baseline: Path, candidates: list[Path], policy: TimingPolicy,
                    mode: str) -> tuple[list[Timed], int]:
    """`one`: baseline and all candidates in one interleaved measurement; `pairs`: each candidate
    interleaved with the baseline on its own, as `prune` measures. Returns the timings and how many
    medians stayed above the noise gate."""
    if mode == "one":
        t = dep.time([baseline, *candidates], policy)
        timed = [Timed(t.stats[0], s, t.speedup_spread(0, i)) for i, s in enumerate(t.stats[1:], start=1)]
        return timed, sum(s.noisy for s in t.stats)
    timed = []
    for path in candidates:
        t = dep.time([baseline, path], policy)
        timed.append(Timed(t.stats[0], t.stats[1], t.speedup_spread()))
    return timed, sum(t.baseline.noisy + t.candidate.noisy for t in timed)


def count_model(table: LatencyTable, units: list[Unit]) -> LatencyModel:
    """The null model "every removal saves the same", fitted on the table's own design measurements."""
    infos = [UnitInfo(u.name, "all", u.stage, u.order, u.path, u.kind) for u in units]
    measurements = [m for s in table.design["sessions"] for m in measurements_of(s)]
    return LatencyModel.fit(infos, measurements, table.baseline_ms, interactions=False)


def score_row(table: LatencyTable, units: list[Unit], records: list[dict]) -> dict:
    """Each record's predictions (raw in the table's frame, raw and null at its measured baseline, the sd of
    a measurement about it) added in place; the errors on the random sets (records[1:])."""
    null = count_model(table, units)
    for r in records:
        scale = r["baseline_ms"] / table.baseline_ms
        r["predicted_table_ms"] = table.predict_ms(r["removed"])
        r["predicted_rescaled_ms"] = r["predicted_table_ms"] * scale
        r["predicted_sd_ms"] = table.sd_new_ms(r["removed"]) * scale
        r["count_null_ms"] = null.predict_ms(r["removed"]) * scale
    observations = [Observation.measured(table, r["removed"], r["baseline_ms"], r["measured_ms"]) for r in records]
    on_floor = fit_calibration([observations[0]], "scale")
    for r, o in zip(records, observations, strict=True):
        r["predicted_fraction"], r["measured_fraction"] = o.predicted_fraction, o.measured_fraction
        r["predicted_scale_on_floor_ms"] = on_floor.predict_ms(table, r["removed"], r["baseline_ms"])
    tests = records[1:]
    measured = [r["measured_ms"] for r in tests]
    within = [abs(r["predicted_rescaled_ms"] - r["measured_ms"]) <= 2 * r["predicted_sd_ms"] for r in tests]
    return {
        "raw_table": prediction_errors([r["predicted_table_ms"] for r in tests], measured),
        "raw_measured_baseline": prediction_errors([r["predicted_rescaled_ms"] for r in tests], measured),
        "count_null": prediction_errors([r["count_null_ms"] for r in tests], measured),
        "within_2sd": float(np.mean(within)) if within else None,
        "floor_raw_measured_baseline": prediction_errors([records[0]["predicted_rescaled_ms"]],
                                                         [records[0]["measured_ms"]]),
        **compare(observations[1:], observations[0], KINDS),
        "scale_on_floor_c": on_floor.scale,
    }


def measure_row(name: str, loaded: LoadedModel, weights: str, profile: Profile, n_sets: int, seed: int,
                mode: str = "one", design: DesignOptions | None = None) -> dict:
    """Table, random sets, their measurement (see time_candidates), errors; one result row."""
    t0 = time.perf_counter()
    tag = f"[{name} {profile.name}]"
    model = loaded.model.eval()
    dep = Deployment(profile, loaded.input_shape)
    units = find_units(model, dep.example)
    by_name = {u.name: u for u in units}
    row: dict = {"model": name, "profile": profile.name, "weights": weights, "input_shape": list(dep.input_shape),
                 "units": len(units), "profile_settings": profile.to_dict()}
    with tempfile.TemporaryDirectory(prefix="predictor-accuracy-") as tmp:
        work = Path(tmp)
        log(f"{tag} latency table: designed removal sets, as `compressor profile` measures it")
        t1 = time.perf_counter()
        table: LatencyTable = measure_latency_table(model, units, dep, name, work, design, log=log)
        row["table"] = {"baseline_ms": table.baseline_ms, "groups": table.groups(), "design_sets": table.design["sets"],
                        "stopped": table.design["stopped"], "seconds": time.perf_counter() - t1,
                        "latency_table": table.to_dict()}
        floor = tuple(u.name for u in most_removable(units, MIN_PER_STAGE))
        sets = random_sets(units, n_sets, random.Random(f"{seed}:{name}"), {floor, ()})
        candidates = [floor, *sets]
        log(f"{tag} exporting baseline, floor (-{len(floor)}) and {len(sets)} random sets "
            f"(sizes {sorted(len(s) for s in sets)})")
        t1 = time.perf_counter()
        suffix = dep.exporter.suffix
        paths = [dep.export(model, work / f"baseline{suffix}")]
        for i, removed in enumerate(candidates):
            pruned = remove_units(model, [by_name[n] for n in removed], dep.example)
            paths.append(dep.export(pruned, work / f"set{i}{suffix}"))
        export_s = time.perf_counter() - t1
        policy = profile.search_policy
        how = (f"one interleaved measurement of {len(paths)} models" if mode == "one"
               else f"{len(candidates)} interleaved pairs (baseline, candidate)")
        log(f"{tag} {how} ({policy.min_runs} runs / {policy.min_time_s:g} s per model per pass)")
        t1 = time.perf_counter()
        probed = len(getattr(dep.device, "measurements", []))
        timed, noisy = time_candidates(dep, paths[0], paths[1:], policy, mode)
        timing_s = time.perf_counter() - t1
        check_speed = probe_summary(getattr(dep.device, "measurements", [])[probed:])
    records = [{"kind": "random" if i else "floor", "removed": list(removed), "k": len(removed),
                "baseline_ms": t.baseline.median, "measured_ms": t.candidate.median,
                "measured_iqr_ms": t.candidate.iqr, "noisy": t.candidate.noisy,
                "speedup": t.baseline.median / t.candidate.median, "speedup_spread": t.spread}
               for i, (removed, t) in enumerate(zip(candidates, timed, strict=True))]
    errors = score_row(table, units, records)
    base_ms = float(np.median([r["baseline_ms"] for r in records]))
    row.update({
        "status": "ok", "measure": mode, "baseline_ms": base_ms,
        "baseline": timed[0].baseline.to_dict() if mode == "one" else None, "timing_policy": vars(policy),
        "floor": records[0], "sets": records[1:], "errors": errors,
        "noisy": noisy, "medians_timed": len(paths) if mode == "one" else 2 * len(candidates),
        "parallel_speedup": {"table": table.machine.get("parallel_speedup"), "check": check_speed},
        "seconds": {"total": time.perf_counter() - t0, "table": row["table"]["seconds"], "export": export_s,
                    "timing": timing_s},
    })
    log(f"{tag} baseline {table.baseline_ms:.3f} ms (table) / {base_ms:.3f} ms (measured); floor -{len(floor)} "
        f"units: predicted {records[0]['predicted_rescaled_ms']:.3f}, measured {records[0]['measured_ms']:.3f} ms")
    log(f"{tag} on {len(records) - 1} random sets, MAPE / within 10% / bias: raw {_pct(errors['raw_table'])}; "
        f"raw at measured baseline {_pct(errors['raw_measured_baseline'])}; count null model "
        f"{_pct(errors['count_null'])}; within 2 sd {errors['within_2sd']:.0%}; scale on floor "
        f"{_pct(errors['on_floor']['scale'])} ({row['seconds']['total']:.0f} s)")
    return row


# ---------------------------------------------------------------------------- estimate


def estimate_seconds(units: int, sets: int, mflops: float, runtime: str, native_size: int,
                     profile: Profile, mode: str = "one", passes: float = 1.0) -> float:
    """Rough wall time (s) of one model x profile: exports plus the table's and the sets'
    measurements, each of `passes` passes (1 on a quiet machine, up to max_repeats when noisy)."""
    export_s = (EXPORT_S_224 if native_size > 32 else EXPORT_S).get(runtime, 2.0)
    run_ms = RUN_MS.get(runtime, 0.02) * mflops
    policy = profile.search_policy
    per_model = (max(policy.warmup_s, policy.warmup_runs * run_ms / 1e3)
                 + passes * max(policy.min_time_s, policy.min_runs * run_ms / 1e3))
    n_table, n_sets = min(units, 14) + 2, sets + 2  # the design: about 13 sets and a baseline per 6
    timed_sets = n_sets if mode == "one" else 2 * (sets + 1)
    return (n_table + n_sets) * export_s + (n_table + timed_sets) * per_model


# ---------------------------------------------------------------------------- output


_SCHEMES = {"on_floor": "floor", "floor_plus_one": "floor+1", "leave_one_out": "LOO"}
KIND_COLUMNS = [("on_floor", "scale"), ("on_floor", "offset"), ("on_floor", "count"),
                ("floor_plus_one", "scale"), ("floor_plus_one", "offset"), ("floor_plus_one", "affine"),
                ("leave_one_out", "scale"), ("leave_one_out", "offset"), ("leave_one_out", "affine"),
                ("leave_one_out", "count")]


def render_markdown(result: dict) -> str:
    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    lines = [
        "Per model and profile: the latency table as `compressor profile` measures it (units grouped by "
        "structure, one saving per group fitted on designed removal sets timed with the baseline round-robin, "
        f"measured until random sets are predicted within {result.get('uncertainty', 0.015):.1%}), then "
        f"{result['sets']} random removal sets (seed {result['seed']}; size uniform from 1 to "
        f"the most removable with {MIN_PER_STAGE} unit kept per stage) plus the floor set (the most removable, "
        "what `prune` measures first), " + MEASURE_TEXT[result["measure"]] + " (the "
        "profile's search policy). Errors are relative to the measured median, on the random sets only: "
        "MAPE / share within 10% / bias (mean signed error; positive = predicted slower).",
        "",
        "- raw: the table's own prediction in ms (its baseline, no calibration);",
        "- raw @ measured baseline: the table's predicted saved fraction applied to this measurement's baseline "
        "(no measured candidate used);",
        "- count null: every removal saves the same, fitted on the table's own design measurements;",
        "- within 2 sd: the share of sets whose measured latency lies within 2 sd of the prediction (the model's "
        "uncertainty and the scatter between measurements);",
        "- scale on floor: saved fraction x c, c = measured / predicted on the floor set "
        "(what `prune` has before its first candidate).",
        "",
        "| model | profile | sets | raw | raw @ measured baseline | count null @ measured baseline | within 2 sd "
        "| scale on floor |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        e = r["errors"]
        lines.append(
            f"| {r['model']} | {r['profile']} | {len(r['sets'])} | {_pct(e['raw_table'])} | "
            f"{_pct(e['raw_measured_baseline'])} | {_pct(e['count_null'])} | {e['within_2sd']:.0%} | "
            f"{_pct(e['on_floor']['scale'])} |")
    lines += [
        "",
        "Calibration kinds compared on the table's per-unit savings, MAPE / within 10% on the random sets "
        "(count ignores the table):",
        "",
        "| model | profile | " + " | ".join(f"{_SCHEMES[a]} {b}" for a, b in KIND_COLUMNS) + " |",
        "|---|---|" + "---:|" * len(KIND_COLUMNS),
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['profile']} | "
                     + " | ".join(_pct(r["errors"][a][b], bias=False) for a, b in KIND_COLUMNS) + " |")
    lines += [
        "",
        "| model | profile | units | groups | design sets | table s | table baseline ms | measured baseline ms "
        "| floor: k, predicted / measured ms | why the table stopped | noisy | parallel probe: table / check "
        "| seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|",
    ]
    for r in rows:
        t, f = r["table"], r["floor"]
        probe = " / ".join(f"{s['median']:.2f}x" if s else "-"  # the parallel probe's medians
                           for s in ((r.get("parallel_speedup") or {}).get(k) for k in ("table", "check")))
        groups = sum(g["kind"] == "group" for g in t["groups"])
        lines.append(
            f"| {r['model']} | {r['profile']} | {r['units']} | {groups} | {t['design_sets']} | {t['seconds']:.0f} | "
            f"{t['baseline_ms']:.3f} | {r['baseline_ms']:.3f} | "
            f"{f['k']}: {f['predicted_rescaled_ms']:.3f} / {f['measured_ms']:.3f} | {t['stopped']} | "
            f"{r['noisy']}/{r['medians_timed']} | {probe} | "
            f"{r['seconds']['total']:.0f} |")
    failed = [r for r in result["rows"] if r.get("status") != "ok"]
    lines += [""] + [f"- {r['model']} {r['profile']}: {r['status']}: {r.get('message', '')}" for r in failed]
    weights = sorted({f"{r['model']}: {r['weights']}" for r in result["rows"]})
    lines += [
        *(f"- {w}." for w in weights),
        "- 'noisy': medians still above the re-measure gate (IQR/median > 25%) after repeats, of all medians "
        "timed for the sets.",
        *([] if result["measure"] != "one" else [
            "- The floor and the random sets share one interleaved measurement here, so baseline drift between "
            "the floor's and a candidate's measurement (separate pairs in `prune`) is not part of these errors; "
            "the table is a separate, earlier measurement (`--measure pairs` times each set as `prune` does)."]),
    ]
    return common.document(TITLE, result, lines, source=True)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("status") == "ok"]
    profiles = list(dict.fromkeys(r["profile"] for r in rows)) or ["(none)"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    colors = {name: f"C{i}" for i, name in enumerate(models)}
    fig, axes = plt.subplots(1, len(profiles), figsize=(4.6 * len(profiles), 4.6), squeeze=False)
    for ax, prof in zip(axes[0], profiles, strict=True):
        low = 1.0
        for r in rows:
            if r["profile"] != prof:
                continue
            ys = [s["measured_ms"] / s["baseline_ms"] for s in r["sets"]]
            raw = [s["predicted_rescaled_ms"] / s["baseline_ms"] for s in r["sets"]]
            cal = [s["predicted_scale_on_floor_ms"] / s["baseline_ms"] for s in r["sets"]]
            f = r["floor"]
            floor_xy = (f["predicted_rescaled_ms"] / f["baseline_ms"], f["measured_ms"] / f["baseline_ms"])
            low = min(low, *ys, *raw, *cal, *floor_xy)
            c = colors[r["model"]]
            ax.scatter(raw, ys, s=22, facecolors="none", edgecolors=c, label=f"{r['model']}: latency model, raw")
            ax.scatter(cal, ys, s=22, color=c, label=f"{r['model']}: scale on floor")
            ax.scatter(*floor_xy, marker="x", color=c, s=40, label=f"{r['model']}: floor set (raw)")
        low = max(0.0, low - 0.05)
        line = [low, 1.02]
        ax.plot(line, line, color="grey", linewidth=1, label="measured = predicted")
        ax.plot(line, [v * 1.1 for v in line], color="grey", linestyle=":", linewidth=1, label="+-10%")
        ax.plot(line, [v / 1.1 for v in line], color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(*line)
        ax.set_ylim(*line)
        ax.set_title(prof)
        ax.set_xlabel("predicted latency / measured baseline")
        ax.set_ylabel("measured latency / measured baseline")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("Latency table: predicted vs measured", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    common.write_results(out, NAME, result, render_markdown(result),
                         plot=lambda path: plot(result, path))


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__, models="resnet56,mobilenet_v2,efficientnet_lite0")
    parser.add_argument("--profiles", default="ort-cpu,openvino-cpu",
                        help="comma-separated profile names or YAML paths (default: %(default)s)")
    parser.add_argument("--sets", type=int, default=20, help="random removal sets per model and profile "
                        "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random sets (default: %(default)s)")
    parser.add_argument("--measure", choices=("one", "pairs"), default="one",
                        help="one: baseline, floor and all sets in one interleaved measurement; pairs: each "
                        "set interleaved with the baseline on its own, as prune measures (default: %(default)s)")
    parser.add_argument("--uncertainty", type=float, default=DesignOptions.target_sd,
                        help="the table is measured until random sets are predicted within this relative sd "
                        "(compressor profile --uncertainty; default: %(default)s)")
    parser.add_argument("--table-seed", type=int, default=0, help="seed of the table's design (default: 0)")
    parser.add_argument("--dry-run", action="store_true", help="print the expected run time and exit")
    args = parser.parse_args(argv)
    args.profiles = common.comma_list(args.profiles)
    if not args.profiles:
        parser.error("--profiles needs at least one profile")
    if args.sets < 2:
        parser.error("--sets must be at least 2 (leave-one-out needs another set)")
    return args


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}" if seconds < 600 else f"{seconds / 60:.0f}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        profiles = [load_profile(p) for p in args.profiles]
    except CompressorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from compressor.metrics.flops import count_cost

    prepared: dict[str, tuple[LoadedModel, str]] = {}
    estimates: dict[tuple[str, str], float] = {}
    worst = 0.0
    for name in args.models:
        prepared[name] = prepare_model(name, args.seed)
        loaded = prepared[name][0]
        x = loaded.example_input()
        n_units = len(find_units(loaded.model, x))
        mflops = count_cost(loaded.model, x).flops / 1e6
        for profile in profiles:
            shape = (n_units, args.sets, mflops, profile.runtime, ZOO[name].input_size, profile, args.measure)
            estimates[name, profile.name] = estimate_seconds(*shape)
            worst += estimate_seconds(*shape, passes=profile.search_policy.max_repeats)
    total = sum(estimates.values())
    log(f"expected run time: about {_minutes(total)} min on a quiet machine, up to {_minutes(worst)} min when "
        "every measurement is noisy and repeated (rough): "
        + ", ".join(f"{m} {p} {s / 60:.1f}" for (m, p), s in estimates.items()) + " min")
    if args.dry_run:
        return 0
    result = {**common.provenance(NAME), "sets": args.sets, "seed": args.seed, "uncertainty": args.uncertainty,
              "min_per_stage": MIN_PER_STAGE, "data": DATA, "measure": args.measure,
              "estimated_seconds": [total, worst], "rows": []}
    done_estimate, done_actual = 0.0, 0.0
    for name in args.models:
        loaded, weights = prepared[name]
        for profile in profiles:
            t1 = time.perf_counter()
            try:
                row = measure_row(name, loaded, weights, profile, args.sets, args.seed, args.measure,
                                  DesignOptions(target_sd=args.uncertainty, seed=args.table_seed))
            except CompressorError as e:
                log(f"[{name} {profile.name}] failed: {type(e).__name__}: {e}")
                row = {"model": name, "profile": profile.name, "weights": weights, "status": "error",
                       "message": f"{type(e).__name__}: {e}"}
            result["rows"].append(row)
            result["seconds"] = time.perf_counter() - t0
            write_outputs(result, args.out)  # after every row, so an interrupted run keeps what it has
            done_estimate += estimates[name, profile.name]
            done_actual += time.perf_counter() - t1
            left = (total - done_estimate) * done_actual / done_estimate
            if left > 0:
                log(f"about {left / 60:.0f} min left (estimate scaled by {done_actual / done_estimate:.2f})")
    write_outputs(result, args.out)
    return common.finish(args.out, NAME, render_markdown(result), t0, png=True)


if __name__ == "__main__":
    sys.exit(main())
