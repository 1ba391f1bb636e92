"""report.json, report.md and speedup.png for a prune run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compressor.fileio import atomic_write, atomic_write_text
from compressor.latency.table import LatencyTable
from compressor.latency.timing import Interleaved, LatencyStats
from compressor.metrics.fidelity import CONFIDENT
from compressor.metrics.flops import Cost, count_cost
from compressor.search.loop import Trial
from compressor.search.target import OVERSHOOT_BAND, Target
from compressor.stages.choose import Chosen
from compressor.stages.deliver import Delivered
from compressor.stages.plan import Plan
from compressor.stages.recover import Recovered

FLOP_CONVENTION = "FLOPs = 2 x multiply-adds (torch FlopCounterMode, conv + matmul only); MACs = FLOPs / 2"
FIDELITY_UNITS = {"top1_agreement": "%", "top5_overlap": "% (mean |top5 ∩ top5'| / 5)",
                  "kl_divergence": "nats per image, KL(unpruned || pruned)",
                  "feature_cka": "linear CKA of penultimate features, 0..1", "accuracy": "%",
                  "confident_agreement": "%, top-1 agreement over the images whose unpruned top-1 "
                                         f"probability is >= {CONFIDENT:g} (confident_images of them)",
                  "unpruned_shift_agreement": "%, the unpruned model's top-1 agreement with itself when every "
                                              "image is rolled one pixel along its width"}


def _latency(stats: LatencyStats) -> dict:
    return {"median": stats.median, "p90": stats.p90, "iqr": stats.iqr, "n": stats.n, "noisy": stats.noisy,
            "min": stats.min, "p99": stats.p99, "cold_ms": stats.cold_ms, "warning": stats.warning}


def _at_baseline(table: LatencyTable, removed, baseline_ms: float) -> tuple[float, float]:
    """The table's raw prediction of `removed` and the sd of a measurement about it (ms: the prediction's
    uncertainty and the scatter between measurements), as fractions of its baseline moved to a measured
    `baseline_ms` (the candidate's own interleaved baseline): no calibration on measured sets."""
    scale = baseline_ms / table.baseline_ms
    return table.predict_ms(removed) * scale, table.sd_new_ms(removed) * scale


def _prediction_error(trials: list[Trial], table: LatencyTable, calibration=None) -> dict:
    """MAPE and share within 10% of the table's raw prediction over every measured candidate, in the
    frame of the candidate's own interleaved baseline, and the share within 2 sd of a measurement about
    the prediction (the model's uncertainty and the scatter between measurements); with a `calibration`
    (compressor.latency.predictor, fitted on the floor candidate before the search), the calibrated
    prediction's error too. Candidates refused before timing (an INT8 artifact
    below the fidelity floor, recorded at an infinite latency) have no measurement to compare and are
    left out."""
    trials = [t for t in trials if not t.measured.refused]
    if not trials:
        return {"candidates": 0}
    measured = np.asarray([t.measured.candidate_ms for t in trials])
    raw, sd = np.asarray([_at_baseline(table, t.choice.removed, t.measured.baseline_ms) for t in trials]).T
    e = np.abs(raw - measured) / measured
    result = {"candidates": len(e), "mape": float(e.mean()), "within_10pct": float((e <= 0.10).mean()),
              "within_2sd": float((np.abs(raw - measured) <= 2 * sd).mean()) if table.version > 1 else None}
    if calibration is not None:
        fitted = [calibration.predict_ms(table, t.choice.removed, t.measured.baseline_ms) for t in trials]
        c = np.abs(np.asarray(fitted) - measured) / measured
        result["calibrated"] = {"mape": float(c.mean()), "within_10pct": float((c <= 0.10).mean()),
                                **calibration.to_dict()}
    return result


@dataclass
class PruneRun:
    """Everything one prune produced, stage by stage: what the report is built from."""

    config: dict  # the model, data and profile specs and every option, as run
    target: Target
    plan: Plan
    importance: dict[str, float]
    table: LatencyTable
    chosen: Chosen
    recovered: Recovered
    delivered: Delivered
    final: Interleaved
    machine: dict  # the device that measured
    seconds: float
    compute: dict | None = None  # where learning and scoring ran, and images/s per stage (Compute.to_dict)


def _side(cost: Cost, stats: LatencyStats, accuracy: float | None, batch: int) -> dict:
    """One model's row: FLOPs and MACs per input of the profile's batch, latency per batch (ms)."""
    return {"flops": cost.flops, "macs": cost.macs, "params": cost.params,
            "latency_ms": {**_latency(stats), "batch": batch}, "accuracy": accuracy}


def _trial(t: Trial, table: LatencyTable) -> dict:
    """One measured candidate; a refused one (below the INT8 fidelity floor) was not timed: no latency.
    predicted_ms: the search's prediction (table frame); model_ms, model_sd_ms: the latency model's raw
    prediction at the candidate's measured baseline, and the sd of a measurement about it."""
    timed = not t.measured.refused
    model_ms, model_sd = _at_baseline(table, t.choice.removed, t.measured.baseline_ms)
    return {"removed": list(t.choice.removed), "predicted_ms": t.predicted_ms, "model_ms": model_ms,
            "model_sd_ms": model_sd if np.isfinite(model_sd) else None,  # None: a group no set measured
            "measured_ms": t.measured.candidate_ms if timed else None, "baseline_ms": t.measured.baseline_ms,
            "speedup": t.measured.speedup if timed else None, "passed": t.passed, "refused": t.measured.refused,
            "overshot": t.overshot, "importance_lost": t.choice.importance_lost}


def _search(run: PruneRun) -> dict:
    search, greedy, table = run.chosen.search, run.chosen.greedy, run.table
    frame = "fp32" if run.chosen.precision == "fp32" else (
        "int8: baseline_ms is the fp32 baseline measured with each candidate over the probe's INT8 speedup")
    margin_from = {"floor_spread": run.chosen.floor.spread, "table_sets": run.chosen.margin_sets}
    return {"margin": search.margin, "margin_from": margin_from, "frame": frame, "table_baseline_ms": table.baseline_ms,
            "ended": search.ended,
            "floor": {"removed": run.chosen.floor_units, "baseline_ms": run.chosen.floor.baseline_ms,
                      "candidate_ms": run.chosen.floor.candidate_ms},
            "trials": [_trial(t, table) for t in search.trials],
            "table_error": _prediction_error(search.trials, table, run.chosen.calibration),
            "selection": run.chosen.selection,
            "greedy": None if greedy is None else {
                "images": len(greedy.x), "sets_evaluated": greedy.evaluations,
                "steps": [{"unit": s.unit, "table_saving_ms": s.saving_ms, "kl": s.kl} for s in greedy.steps],
                "alone": [{"unit": name, "table_saving_ms": table.savings_ms[name], "kl": kl}
                          for name, kl in greedy.evaluated_alone().items()]}}


def _precision(run: PruneRun) -> dict:
    """What was asked, what was delivered, and the INT8 probe and search behind the choice."""
    int8 = run.delivered.checks.get("int8") or {}
    delivered = "int8" if run.chosen.precision == "int8" and "refused" not in int8 else "fp32"
    return {"asked": run.config.get("precision", "fp32"), "delivered": delivered,
            "searched": run.chosen.int8, "final_int8": int8 or None}


def build_report(run: PruneRun) -> dict:
    """The report dict. Fidelity is measured on the held-out split before and after fine-tuning;
    accuracy (top-1, %) is None where that split is unlabelled."""
    plan, recovered, final = run.plan, run.recovered, run.final
    base_cost, pruned_cost = count_cost(plan.model, plan.example), count_cost(recovered.deployed, plan.example)
    base_stats, pruned_stats = final.stats
    speedup = final.speedup()
    goal_ms = run.target.goal_ms(base_stats.median)
    before, after = recovered.before, recovered.after
    accuracy = [a.top1 if a is not None else None for a in (after.original_accuracy, after.pruned_accuracy)]
    removed = run.chosen.removed
    batch = plan.deployment.input_shape[0]
    return {
        "model": plan.loaded.arch, "source": plan.loaded.source, "data": run.config["data"],
        "baseline": _side(base_cost, base_stats, accuracy[0], batch),
        "pruned": _side(pruned_cost, pruned_stats, accuracy[1], batch),
        "removed_units": [u.name for u in removed],
        "removed_unit_kinds": {u.name: u.kind for u in removed},
        "units": [{"name": u.name, "kind": u.kind, "stage": u.stage, "importance": run.importance[u.name],
                   "saving_ms": run.table.savings_ms[u.name]} for u in plan.candidates],
        "target_ms": goal_ms, "target_speedup": run.target.speedup, "target_met": pruned_stats.median <= goal_ms,
        "target_judged_on": ("interleaved rounds against the unpruned model" if run.target.speedup
                             else "protocol median of the pruned model (interleaved with the baseline)"),
        "speedup_measured": speedup, "speedup_flops": base_cost.flops / pruned_cost.flops,
        "speedup_fidelity": speedup / (base_cost.flops / pruned_cost.flops),
        "speedup_round_spread": final.speedup_spread(),
        "fidelity": {"split": "val (held out: never used for scoring or fine-tuning)", "images": after.images,
                     "labelled": after.original_accuracy is not None,
                     "before_finetune": before.to_dict(), "after_finetune": after.to_dict(),
                     "unpruned_shift_agreement": recovered.shift_agreement,
                     "definitions": FIDELITY_UNITS},
        "criterion": run.config["criterion"],
        "profile": {**plan.deployment.profile.to_dict(), "machine": run.machine},
        "latency_source": "predicted" if run.machine.get("predicted") else "measured",
        "search": _search(run), "recipe": run.delivered.recipe, "precision": _precision(run),
        "width": getattr(plan, "width_report", None),
        "checks": run.delivered.checks, "flop_convention": FLOP_CONVENTION, "config": run.config,
        "seconds": run.seconds, "compute": run.compute,
    }


def render_markdown(r: dict) -> str:
    b, p = r["baseline"], r["pruned"]
    lat = "latency_ms"
    rows = [
        ("FLOPs (2/MAC)", f"{b['flops'] / 1e6:.2f} M", f"{p['flops'] / 1e6:.2f} M"),
        ("MACs", f"{b['macs'] / 1e6:.2f} M", f"{p['macs'] / 1e6:.2f} M"),
        ("parameters", f"{b['params']:,}", f"{p['params']:,}"),
        ("latency median (ms)", f"{b[lat]['median']:.3f}", f"{p[lat]['median']:.3f}"),
        ("latency p90 (ms)", f"{b[lat]['p90']:.3f}", f"{p[lat]['p90']:.3f}"),
        ("latency IQR (ms)", f"{b[lat]['iqr']:.3f}", f"{p[lat]['iqr']:.3f}"),
        ("timed runs" if r.get("latency_source") != "predicted" else "runs (predicted: none timed)", str(b[lat]["n"]),
         str(p[lat]["n"])),
    ]
    if b["accuracy"] is not None:
        rows.append(("validation accuracy (%)", f"{b['accuracy']:.2f}", f"{p['accuracy']:.2f}"))
    prof = r["profile"]
    lines = [
        f"# Pruning report: {r['model']} on {r['data']}",
        "",
        f"Profile **{prof['name']}** ({prof['runtime']}, {prof['device']}, {prof['threads']} threads, "
        f"batch {prof['batch']}) on {_where(prof['machine'])}, {prof['machine']['date']}.",
        *_predicted_lines(prof["machine"]),
        *_device_warnings(prof["machine"]),
        "",
        "| | baseline | pruned |", "|---|---:|---:|",
        *[f"| {name} | {x} | {y} |" for name, x, y in rows],
        "",
        _speedup_line(r),
        f"- Target: {r['target_speedup'] or ''}{'x speedup' if r['target_speedup'] else ''}"
        f"{'' if r['target_speedup'] else str(round(r['target_ms'], 4)) + ' ms'} "
        f"(= {r['target_ms']:.3f} ms here): **{'met' if r['target_met'] else 'MISSED'}**.",
        *_precision_lines(r.get("precision")),
        *_compute_lines(r.get("compute")),
        f"- Criterion: {r['criterion']}; sets proposed by {r['search'].get('selection', 'knapsack')}; "
        f"removed {len(r['removed_units'])} of {len(r['units'])} units: "
        f"{', '.join(r['removed_units']) or 'none'}.",
        f"- Latency-model prediction error (raw, no calibration) over "
        f"{r['search']['table_error'].get('candidates', 0)} {r.get('latency_source', 'measured')} candidates: MAPE "
        f"{r['search']['table_error'].get('mape', float('nan')):.1%}, within 10%: "
        f"{r['search']['table_error'].get('within_10pct', float('nan')):.0%}"
        + (f", within 2 sd of its own uncertainty: {w:.0%}" if (w := r['search']['table_error'].get('within_2sd'))
           is not None else "")
        + (f" (calibrated on the most-pruned candidate, scale {cal['scale']:.2f}: MAPE {cal['mape']:.1%}, "
           f"within 10%: {cal['within_10pct']:.0%})" if (cal := r['search']['table_error'].get('calibrated'))
           else "") + ".",
        *_search_lines(r),
        *_width_lines(r),
        "- Predicted against measured, every timed candidate: ![latency model against measurement](prediction.png)",
        f"- Checks: BatchNorm folding max relative error {r['checks']['fold_max_rel_error']:.2e} "
        f"(tolerance {r['checks']['fold_tolerance_rel']:g}); {r['checks']['artifact_format']} vs torch max |diff| "
        f"{r['checks']['artifact_max_abs_error']:.2e} (atol {r['checks']['artifact_tolerance']['atol']:g} + "
        f"rtol {r['checks']['artifact_tolerance']['rtol']:g}).",
        f"- {r['flop_convention']}.",
        "",
        *render_fidelity(r["fidelity"]),
        _retime_line(r),
        "",
    ]
    warnings = [f"{k}: {r[k]['latency_ms']['warning']}" for k in ("baseline", "pruned")
                if r[k]["latency_ms"]["warning"]]
    if warnings:
        lines += ["Noise warnings: " + "; ".join(warnings), ""]
    return "\n".join(lines)


def _speedup_line(r: dict) -> str:
    if r.get("latency_source") == "predicted":
        return (f"- Predicted speedup: **{r['speedup_measured']:.2f}x** (by the latency table, not measured); "
                f"FLOP-estimated: {r['speedup_flops']:.2f}x; predicted / estimated = {r['speedup_fidelity']:.2f}.")
    return (f"- Measured speedup: **{r['speedup_measured']:.2f}x** (interleaved rounds; per-round spread "
            f"{r['speedup_round_spread']:.1%}); FLOP-estimated: {r['speedup_flops']:.2f}x; "
            f"measured / estimated = {r['speedup_fidelity']:.2f}.")


def _search_lines(r: dict) -> list[str]:
    """Why the search stopped; and where the delivered set is faster than the search aims at, why no set closer."""
    search = r["search"]
    if not search.get("ended"):
        return []
    lines = [f"- The search {r.get('latency_source', 'measured')} {len(search['trials'])} candidate(s) and stopped: "
             f"{search['ended']}."]
    if any(t.get("overshot") and t["removed"] == r["removed_units"] for t in search["trials"]):
        lines.append(f"- The delivered set is faster than needed (more than {OVERSHOOT_BAND:.0%} under the latency "
                     f"aimed at) because {search['ended']}.")
    return lines


def _width_lines(r: dict) -> list[str]:
    """With width moves: the units slimmed (channels or whole heads kept) and the counts the runtime was timed at."""
    width = r.get("width")
    if not width:
        return []
    slimmed = [u for u in r["recipe"]["units"] if u.get("kind") == "width"]
    groups = {u["name"]: ", ".join(f"{len(g['keep'])}/{g['channels']}{' heads' if g.get('heads') else ''}"
                                   for g in u["slim"]["groups"]) for u in slimmed}
    kept = "; ".join(f"{name} ({counts})" for name, counts in groups.items())
    return [f"- Moves {width['moves']}: {width['units']} width units (levels "
            f"{', '.join(f'{v:.0%}' for v in width['levels'])} at timed channel counts, channels ranked by "
            f"{width['channel_criterion']}); slimmed: {kept or 'none'}"
            + (f"; {len(width['refused_levels'])} levels refused (report.json: width)" if width['refused_levels']
               else "") + "."]


def _retime_line(r: dict) -> str:
    if r.get("latency_source") == "predicted":
        return ("Verify on the target before relying on these figures: time `baseline.onnx` and `model.onnx` of this "
                "folder there, e.g. `compressor bench --artifact model.onnx --against baseline.onnx --profile "
                "<the target's profile> --bundle DIR`, then `--results results.json` from the device.")
    return (f"Re-time both models yourself: `{r['checks']['artifacts'][1]}` and `{r['checks']['artifacts'][0]}` "
            "in this folder (and `baseline.onnx`, `model.onnx` on any ONNX runtime).")


def _predicted_lines(machine: dict) -> list[str]:
    """report.md's warning that no figure was measured, for a device that predicts (`runtime: table`)."""
    predicted = machine.get("predicted")
    if not predicted:
        return []
    return ["", f"**Every latency and speedup in this report is predicted, not measured**: the latency table "
                f"`{predicted['table']}` (sha256 {predicted['sha256'][:12]}, measured on profile "
                f"{predicted.get('profile')} ({predicted.get('runtime')}), {predicted.get('measured_at')}) was "
                "replayed for the units each model lacks (`runtime: table`); nothing was timed."]


def _where(machine: dict) -> str:
    """The machine that measured: this host, or the remote device(s) by profile name and hostname."""
    if machine.get("predicted"):
        return f"no device (latencies predicted for {machine.get('cpu', 'an unknown CPU')} by a latency table)"
    cpu = f"{machine.get('cpu', 'unknown CPU')} ({machine.get('logical_cores', '?')} logical cores)"
    if not machine.get("host"):
        return cpu
    pool = machine.get("pool") or [machine]
    hosts = ", ".join(f"{d.get('host')} ({d.get('hostname')})" for d in pool)
    return f"remote device{'s' if len(pool) > 1 else ''} {hosts} over SSH, {cpu}"


def _device_warnings(machine: dict) -> list[str]:
    """report.md lines on a device that throttled, changed or drifted while measuring, and its warnings."""
    flags = [name for key, name in (("throttled", "throttled"), ("changing_conditions", "under changing conditions"),
                                    ("drifted", "drifted against its reference")) if machine.get(key)]
    lines = [f"**The device {', '.join(flags)} during a measurement** (`report.json` profile.machine.measurements)."
             ] if flags else []
    lines += [f"- {w}" for w in machine.get("warnings") or []]
    return ["", *lines] if lines else []


STAGE_NAMES = {"scores": "scoring", "greedy_kl": "greedy KL", "finetune": "fine-tuning", "fidelity": "fidelity"}


def _compute_lines(c: dict | None) -> list[str]:
    """The report.md line on where learning and scoring ran and how fast (images/s per stage)."""
    if not c:
        return []
    rates = ", ".join(f"{STAGE_NAMES.get(k, k)} {v['images_per_s']:,.0f}" for k, v in c["stages"].items())
    return [f"- Learning and scoring on {c['device']}, {c['precision']}, {c['processes']} process"
            f"{'es (' + c['backend'] + ')' if c['processes'] > 1 else ''}"
            + (f"; images/s: {rates}" if rates else "") + "."]


def _precision_lines(p: dict | None) -> list[str]:
    """The precision line(s) of report.md: what was delivered and, where INT8 was weighed, why."""
    if not p or p["asked"] == "fp32":
        return []
    probe = (p.get("searched") or {}).get("probe") or {}
    lines = [f"- Precision: asked {p['asked']}, delivered **{p['delivered']}**."]
    if probe.get("declined"):
        lines.append(f"- INT8 declined: {probe['declined']}.")
    elif probe:
        lines.append(f"- INT8 probe (unpruned): fp32 {probe['fp32_ms']:.3f} ms, INT8 {probe['int8_ms']:.3f} ms "
                     f"({probe['speedup']:.2f}x); quantizer {probe['quantizer'].get('quantizer', '')}.")
    if probe.get("floor_refused"):
        lines.append("- The most-pruned model's INT8 was refused by the fidelity floor, so it was not timed: the "
                     "INT8 search calibrated the latency table on the saving removal measured in fp32.")
    final = p.get("final_int8") or {}
    if final.get("refused"):
        lines.append(f"- The final INT8 was refused: {final['refused']}")
    elif final:
        f, u = final["fidelity"], final["against_unpruned"]
        lines.append(f"- INT8 on the held-out split: against its fp32 model top-1 agreement "
                     f"{f['top1_agreement']:.1f}%, SQNR {f['sqnr_db'] or float('inf'):.1f} dB; "
                     f"against the unpruned model top-1 agreement {u['top1_agreement']:.1f}%, "
                     f"KL {u['kl_divergence']:.4f} nats"
                     + (f"; {len(final['excluded'])} layers kept in fp32" if final.get("excluded") else "") + ".")
    return lines


def render_fidelity(f: dict) -> list[str]:
    """Markdown table: the pruned model against the unpruned one on the held-out split."""
    before, after = f["before_finetune"], f["after_finetune"]
    rows = [
        ("top-1 agreement (%)", "top1_agreement", ".2f"), ("top-5 overlap (%)", "top5_overlap", ".2f"),
        ("KL(unpruned ‖ pruned) (nats/image)", "kl_divergence", ".4f"),
        ("linear CKA, penultimate features", "feature_cka", ".4f"),
    ]
    lines = [f"Fidelity to the unpruned model on the held-out split ({f['images']} images, never used for "
             f"scoring or fine-tuning{'' if f['labelled'] else '; unlabelled, so no accuracy'}):", "",
             "| | before fine-tuning | after fine-tuning |", "|---|---:|---:|"]
    lines += [f"| {name} | {before[key]:{spec}} | {after[key]:{spec}} |" for name, key, spec in rows
              if before.get(key) is not None and after.get(key) is not None]
    lines += _per_output_rows(before, after)
    if after.get("confident_agreement") is not None:
        lines.append(f"| top-1 agreement where the unpruned model is confident (%) | "
                     f"{before['confident_agreement']:.2f} | {after['confident_agreement']:.2f} |")
    if f["labelled"]:
        for which, label in (("original_accuracy", "unpruned"), ("pruned_accuracy", "pruned")):
            for k in ("top1", "top5"):
                lines.append(f"| {label} top-{k[-1]} accuracy (%) | {before[which][k]:.2f} | {after[which][k]:.2f} |")
    if after.get("confident_agreement") is not None:
        lines += ["", f"Confident: the unpruned model's top-1 probability is at least {CONFIDENT:g} "
                      f"({after['confident_images']} of {f['images']} images). On the others its top-1 is "
                      "close to a tie, and a small change to the model can flip it."]
    if f.get("unpruned_shift_agreement") is not None:
        lines += ["", f"For scale: the unpruned model agrees with itself on {f['unpruned_shift_agreement']:.1f}% "
                      "of these images when each is shifted by one pixel."]
    return [*lines, ""]


OUTPUT_FIGURES = (("kl_divergence", "KL (nats/item)", ".4f"), ("top1_agreement", "top-1 agreement (%)", ".2f"),
                  ("cosine_similarity", "cosine similarity", ".4f"), ("normalised_mse", "normalised MSE", ".4f"))


def _per_output_rows(before: dict, after: dict) -> list[str]:
    """One row per output and figure, for a model with several outputs (metrics/outputs.py)."""
    outputs = after.get("per_output") or {}
    if len(outputs) < 2:
        return []
    return [f"| output `{name}`: {label} | {before['per_output'][name][key]:{spec}} | {figures[key]:{spec}} |"
            for name, figures in outputs.items() for key, label, spec in OUTPUT_FIGURES if key in figures]


def plot_speedup(r: dict, final: Interleaved, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax1.boxplot([final.stats[0].samples, final.stats[1].samples], showfliers=False)
    ax1.set_xticks([1, 2], ["baseline", "pruned"])
    ax1.set_ylabel("latency per inference (ms)")
    ax1.set_title(f"{r['profile']['name']}: {final.stats[0].n} + {final.stats[1].n} runs")
    ax2.bar(["FLOP estimate", r.get("latency_source", "measured")], [r["speedup_flops"], r["speedup_measured"]],
            color=["#999999", "#1f77b4"])
    if r["target_speedup"]:
        ax2.axhline(r["target_speedup"], color="red", linestyle="--", label="target")
        ax2.legend()
    ax2.set_ylabel("speedup over unpruned (x)")
    ax2.set_title(f"{r['model']}: {len(r['removed_units'])} units removed")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plot_prediction(r: dict, path: Path) -> None:
    """Every timed candidate: measured latency against the latency model's raw prediction at the same
    baseline, with +-2 sd error bars (of a measurement about the prediction), the diagonal and +-10%."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [t for t in r["search"]["trials"] if t["measured_ms"] is not None]
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    if trials:
        x = [t["model_ms"] for t in trials]
        ax.errorbar(x, [t["measured_ms"] for t in trials], xerr=[2 * (t["model_sd_ms"] or 0) for t in trials], fmt="o",
                    color="#1f77b4", ecolor="#9ecae1", capsize=2, label="candidates (+-2 sd)")
        for t in trials:
            ax.annotate(f"-{len(t['removed'])}", (t["model_ms"], t["measured_ms"]), fontsize=6,
                        textcoords="offset points", xytext=(3, 3))
        values = [*x, *(t["measured_ms"] for t in trials)]
        lo, hi = 0.9 * min(values), 1.1 * max(values)
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1, label="measured = predicted")
        ax.plot([lo, hi], [lo * 1.1, hi * 1.1], color="grey", linestyle=":", linewidth=1, label="+-10%")
        ax.plot([lo, hi], [lo / 1.1, hi / 1.1], color="grey", linestyle=":", linewidth=1)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xlabel("latency model, raw (ms, at the candidate's baseline)")
    ax.set_ylabel("measured (ms)")
    ax.set_title(f"{r['model']} on {r['profile']['name']}: {len(trials)} timed candidates", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(report: dict, out: Path, final: Interleaved) -> None:
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.md", render_markdown(report))
    plot_speedup(report, final, out / "speedup.png")
    plot_prediction(report, out / "prediction.png")
