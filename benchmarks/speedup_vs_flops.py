"""Measured vs FLOP-estimated speedup: our depth pruning against Torch-Pruning L1 channel pruning.

For each model and target speedup this script

1. prunes with compressor's Python API (criterion cka, profile ort-cpu, data digits32,
   no fine-tuning by default) into a temporary folder;
2. prunes the same unpruned model with Torch-Pruning (magnitude/L1 channel importance,
   uniform per-layer ratio, final classifier ignored, no fine-tuning), the ratio found by
   bisection so that its FLOPs match our pruned model's FLOPs;
3. exports unpruned, ours and TP to ONNX (BatchNorm folded) and times all three in one
   interleaved measurement (the profile's report policy) on ONNX Runtime;
4. writes speedup_vs_flops.json, .md and .png into --out.

Speedup fidelity = measured speedup / FLOP-estimated speedup (1.0: latency follows FLOPs).

    .venv/bin/python benchmarks/speedup_vs_flops.py --models resnet20,resnet56,resnet110 \
        --targets 1.5,2,3 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from compressor.data import DataBundle, load_data
from compressor.errors import CompressorError, UnreachableTargetError
from compressor.fileio import atomic_write, atomic_write_text
from compressor.finetune import accuracy
from compressor.flops import count_cost
from compressor.latency import Deployment, measure_latency_table
from compressor.machine import machine_info, source_revision
from compressor.profiles import Profile, load_profile
from compressor.prune import PruneConfig, prune
from compressor.units import find_units
from compressor.zoo import ZOO, LoadedModel, load_checkpoint, load_model

DATA = "digits32"
PROFILE = "ort-cpu"
CRITERION = "cka"
FLOP_TOLERANCE = 0.01  # bisection stops within 1% of our FLOPs; > 3% is flagged in the results
FLOP_ACCEPT = 0.03
MAX_BISECTIONS = 18
MAX_TP_RATIO = 0.9
FLOP_NOTE = "FLOPs = 2 x multiply-adds (torch FlopCounterMode, conv + matmul only), batch 1"


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------- Torch-Pruning


def _classifier_layers(model: nn.Module) -> list[nn.Module]:
    """The final nn.Linear (the classifier), which channel pruning must leave whole."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def tp_prune(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of `model` with `ratio` of the channels of every prunable group removed by
    Torch-Pruning, ranked by L1 weight magnitude (local pruning, default round_to)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    if ratio <= 0:
        return pruned
    pruner_cls = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MagnitudePruner
    pruner = pruner_cls(pruned, example, importance=tp.importance.MagnitudeImportance(p=1),
                        pruning_ratio=ratio, ignored_layers=_classifier_layers(pruned))
    pruner.step()
    return pruned.eval()


def tp_matching_flops(model: nn.Module, example: torch.Tensor, target_flops: int
                      ) -> tuple[nn.Module, float, int, list[tuple[float, int]]]:
    """Bisect Torch-Pruning's ratio until its FLOPs are within FLOP_TOLERANCE of `target_flops`.

    Returns (model, ratio, its FLOPs, every (ratio, FLOPs) tried); the closest ratio seen if
    none is within (FLOPs move in steps: each group loses whole channels of 16, 32 or 64).
    """
    lo, hi = 0.0, MAX_TP_RATIO
    best: tuple[float, nn.Module, float, int] | None = None  # (mismatch, model, ratio, flops)
    tried: list[tuple[float, int]] = []
    while len(tried) < MAX_BISECTIONS:
        ratio = (lo + hi) / 2
        candidate = tp_prune(model, example, ratio)
        flops = count_cost(candidate, example).flops
        tried.append((ratio, flops))
        mismatch = abs(flops / target_flops - 1)
        if best is None or mismatch < best[0]:
            best = (mismatch, candidate, ratio, flops)
        if mismatch <= FLOP_TOLERANCE:
            break
        if flops > target_flops:
            lo = ratio
        else:
            hi = ratio
    assert best is not None
    _, candidate, ratio, flops = best
    return candidate, ratio, flops, tried


# ---------------------------------------------------------------------------- one row


def _latency(stats) -> dict:
    return stats.to_dict()


def run_ours(model_name: str, target: float, finetune_epochs: int, workdir: Path, latency_table: Path,
             prune_log: Callable[[str], None]) -> tuple[dict, nn.Module]:
    """Our pruning through the Python API; returns (report dict, pruned model)."""
    out = workdir / "run"
    config = PruneConfig(model=model_name, data=DATA, profile=PROFILE, out=str(out), target_speedup=target,
                         criterion=CRITERION, finetune_epochs=finetune_epochs, latency_table=str(latency_table))
    report = prune(config, log=prune_log)
    return report, load_checkpoint(out / "model.pt").model.eval()


def measure_row(model_name: str, target: float, loaded: LoadedModel, data: DataBundle, profile: Profile,
                base_cost, base_accuracy: float, finetune_epochs: int, latency_table: Path) -> dict:
    """Prune both ways, time all three models interleaved; one result row."""
    t0 = time.perf_counter()
    row: dict = {"model": model_name, "target_speedup": target}
    with tempfile.TemporaryDirectory(prefix="speedup-vs-flops-") as tmp:
        work = Path(tmp)
        log(f"[{model_name} {target:g}x] compressor prune ({CRITERION}, {PROFILE}, "
            f"{finetune_epochs} fine-tune epochs)")
        try:
            report, ours = run_ours(model_name, target, finetune_epochs, work, latency_table,
                                    lambda s: log(f"    {s}"))
        except UnreachableTargetError as e:
            log(f"[{model_name} {target:g}x] unreachable: {e}")
            return {**row, "status": "unreachable", "message": str(e),
                    "seconds": time.perf_counter() - t0}
        except CompressorError as e:
            log(f"[{model_name} {target:g}x] prune failed: {type(e).__name__}: {e}")
            return {**row, "status": "error", "message": f"{type(e).__name__}: {e}",
                    "seconds": time.perf_counter() - t0}

        dep = Deployment(profile, loaded.input_shape)
        x = dep.example
        base = loaded.model.eval()
        ours_cost = count_cost(ours, x)

        log(f"[{model_name} {target:g}x] Torch-Pruning L1 ratio bisection to "
            f"{ours_cost.flops / 1e6:.2f} MFLOPs")
        tp_model, tp_ratio, tp_flops, tried = tp_matching_flops(base, x, ours_cost.flops)
        tp_cost = count_cost(tp_model, x)
        mismatch = tp_flops / ours_cost.flops - 1
        log(f"    ratio {tp_ratio:.4f} after {len(tried)} steps: {tp_flops / 1e6:.2f} MFLOPs ({mismatch:+.1%})")
        tp_accuracy = accuracy(tp_model, data.loader("val"))

        paths = [dep.export(base, work / "baseline.onnx"), dep.export(ours, work / "ours.onnx"),
                 dep.export(tp_model, work / "tp.onnx")]
        # the exported graphs must compute what the torch models compute
        val_x = torch.cat([b[0] for b in data.loader("val", batch_size=16, limit=16)])
        onnx_errors = [dep.validate(p, m, val_x) for p, m in zip(paths, (base, ours, tp_model), strict=True)]
        policy = profile.report_policy
        log(f"[{model_name} {target:g}x] interleaved timing of baseline, ours, TP "
            f"({policy.min_runs} runs / {policy.min_time_s:g} s per model)")
        timed = dep.time(paths, policy)

    def side(cost, stats_index: int, acc: float) -> dict:
        measured = timed.speedup(0, stats_index) if stats_index else 1.0
        flop_x = base_cost.flops / cost.flops
        return {"flops": cost.flops, "params": cost.params, "accuracy": acc,
                "latency_ms": _latency(timed.stats[stats_index]),
                "speedup_flops": flop_x, "speedup_measured": measured, "speedup_fidelity": measured / flop_x,
                **({"speedup_round_spread": timed.speedup_spread(0, stats_index)} if stats_index else {})}

    ours_side = side(ours_cost, 1, report["pruned"]["accuracy"])
    ours_side.update({
        "removed_units": len(report["removed_units"]), "units_total": len(report["units"]),
        "removed_unit_names": report["removed_units"],
        "prune_report": {  # what the prune run itself measured (its own final 2-model interleaving)
            "speedup_measured": report["speedup_measured"], "speedup_flops": report["speedup_flops"],
            "target_met": report["target_met"],
            "baseline": {"flops": report["baseline"]["flops"], "accuracy": report["baseline"]["accuracy"]},
            "pruned": {"flops": report["pruned"]["flops"], "accuracy": report["pruned"]["accuracy"]},
            "seconds": report["seconds"],
        },
    })
    tp_side = side(tp_cost, 2, tp_accuracy)
    tp_side.update({"pruning_ratio": tp_ratio, "bisection": [{"ratio": r, "flops": f} for r, f in tried],
                    "flops_vs_ours": mismatch,
                    "flops_matched": abs(mismatch) <= FLOP_ACCEPT, "finetuned": False,
                    "method": "torch_pruning BasePruner, MagnitudeImportance(p=1), local uniform ratio, "
                              "final Linear ignored, round_to=None"})
    row.update({
        "status": "ok",
        "baseline": side(base_cost, 0, base_accuracy),
        "ours": ours_side, "tp": tp_side,
        "onnx_max_abs_error": {"baseline": onnx_errors[0], "ours": onnx_errors[1], "tp": onnx_errors[2]},
        "timing_policy": vars(policy),
        "seconds": time.perf_counter() - t0,
    })
    log(f"[{model_name} {target:g}x] ours {ours_side['speedup_flops']:.2f}x FLOPs / "
        f"{ours_side['speedup_measured']:.2f}x measured; TP {tp_side['speedup_flops']:.2f}x / "
        f"{tp_side['speedup_measured']:.2f}x ({row['seconds']:.0f} s)")
    return row


# ---------------------------------------------------------------------------- output


def render_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Speedup fidelity: depth pruning (compressor) vs channel pruning (Torch-Pruning)",
        "",
        f"Machine: {m['cpu']} ({m['logical_cores']} logical / {m['physical_cores']} physical cores), "
        f"{m['system']}, Python {m['python']}, "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + f"; {result['date']}.",
        "",
        f"Profile {result['profile']}, data {result['data']}, criterion {result['criterion']}, "
        f"fine-tuning {result['finetune_epochs']} epochs (ours) / none (TP). "
        "Speedups from one interleaved ONNX Runtime measurement of baseline, ours and TP per row; "
        "ratio = measured / FLOP-estimated speedup.",
        "",
        "| model | target | ours FLOP x | ours measured x | ours ratio "
        "| TP FLOP x | TP measured x | TP ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        head = f"| {r['model']} | {r['target_speedup']:g}x"
        if r["status"] != "ok":
            lines.append(f"{head} | {r['status']} | | | | | |")
            continue
        o, t = r["ours"], r["tp"]
        lines.append(f"{head} | {o['speedup_flops']:.2f} | {o['speedup_measured']:.2f} | "
                     f"{o['speedup_fidelity']:.2f} | {t['speedup_flops']:.2f} | "
                     f"{t['speedup_measured']:.2f} | {t['speedup_fidelity']:.2f} |")
    lines += [
        "",
        "| model | target | units removed | TP channel ratio | TP FLOPs vs ours "
        "| baseline ms | ours ms | TP ms | acc. baseline | acc. ours | acc. TP (no fine-tune) "
        "| prune run: measured x (its own final measurement) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"| {r['model']} | {r['target_speedup']:g}x | {r['status']}: "
                         f"{r['message'].replace('|', '/')} | | | | | | | | | |")
            continue
        b, o, t = r["baseline"], r["ours"], r["tp"]
        flag = "" if t["flops_matched"] else " (not matched)"
        lines.append(
            f"| {r['model']} | {r['target_speedup']:g}x | {o['removed_units']}/{o['units_total']} | "
            f"{t['pruning_ratio']:.3f} | {t['flops_vs_ours']:+.1%}{flag} | {b['latency_ms']['median']:.3f} | "
            f"{o['latency_ms']['median']:.3f} | {t['latency_ms']['median']:.3f} | {b['accuracy']:.1f} | "
            f"{o['accuracy']:.1f} | {t['accuracy']:.1f} | {o['prune_report']['speedup_measured']:.2f}"
            f"{'' if o['prune_report']['target_met'] else ' (target missed)'} |")
    noisy = [f"{r['model']} {r['target_speedup']:g}x {k}" for r in result["rows"] if r["status"] == "ok"
             for k in ("baseline", "ours", "tp") if r[k]["latency_ms"]["noisy"]]
    lines += [
        "",
        f"- {result['flop_convention']}.",
        "- TP: Torch-Pruning magnitude (L1) channel pruning, one uniform ratio per layer group, "
        "classifier kept, ratio bisected so its FLOPs match ours (FLOPs move in steps of whole channels, "
        f"so a match within {FLOP_ACCEPT:.0%} is not always possible: 'not matched' rows); "
        "accuracy without fine-tuning.",
        "- Target: the prune job's target speedup; units are removed whole, so the reached speedup "
        "(columns above) can overshoot it.",
        "- Accuracy: % on the digits32 validation split (360 images).",
        f"- Noisy measurements (IQR/median above the profile's gate): {', '.join(noisy) or 'none'}.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(6, 5))
    models = sorted({r["model"] for r in rows}, key=lambda n: (len(n), n))
    colors = {name: f"C{i}" for i, name in enumerate(models)}
    top = 1.0
    methods = (("ours", "o", "depth (compressor)"), ("tp", "^", "channel L1 (Torch-Pruning)"))
    for method, marker, label in methods:
        for name in models:
            pts = [(r[method]["speedup_flops"], r[method]["speedup_measured"])
                   for r in rows if r["model"] == name]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            top = max(top, *xs, *ys)
            ax.scatter(xs, ys, marker=marker, color=colors[name], s=55,
                       facecolors=colors[name] if method == "ours" else "none", label=f"{name}: {label}")
            for r in rows:
                if r["model"] == name:
                    ax.annotate(f"{r['target_speedup']:g}x", (r[method]["speedup_flops"],
                                r[method]["speedup_measured"]), textcoords="offset points", xytext=(5, -9),
                                fontsize=7, color=colors[name])
    top *= 1.08
    ax.plot([1, top], [1, top], color="grey", linestyle="--", linewidth=1, label="measured = FLOP estimate")
    ax.set_xlim(0.9, top)
    ax.set_ylim(0.5, top)
    ax.set_xlabel("FLOP-estimated speedup (x)")
    ax.set_ylabel(f"measured speedup on {result['profile']} (x)")
    ax.set_title("Measured vs FLOP-estimated speedup")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_outputs(result: dict, out: Path) -> None:
    atomic_write_text(out / "speedup_vs_flops.json", json.dumps(result, indent=2))
    atomic_write_text(out / "speedup_vs_flops.md", render_markdown(result))
    plot(result, out / "speedup_vs_flops.png")


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet20,resnet56,resnet110",
                        help="comma-separated zoo names (default: %(default)s)")
    parser.add_argument("--targets", default="1.5,2,3",
                        help="comma-separated target speedups (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="output folder (default: benchmarks/results)")
    parser.add_argument("--finetune-epochs", type=int, default=0,
                        help="fine-tuning epochs of our pruned model (default: %(default)s)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in ZOO]
    if not args.models or unknown:
        parser.error(f"unknown model(s) {unknown}; zoo: {', '.join(ZOO)}")
    try:
        args.targets = [float(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--targets must be comma-separated numbers, got {args.targets!r}")
    if not args.targets or any(not t > 1 for t in args.targets):
        parser.error("every target speedup must be greater than 1")
    if args.finetune_epochs < 0:
        parser.error("--finetune-epochs must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    profile = load_profile(PROFILE)
    data = load_data(DATA)
    result = {
        "benchmark": "speedup_vs_flops",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]), "git_commit": source_revision(Path(__file__).parent),
        "machine": machine_info(), "profile": PROFILE, "profile_settings": profile.to_dict(), "data": DATA,
        "criterion": CRITERION, "finetune_epochs": args.finetune_epochs, "flop_convention": FLOP_NOTE,
        "flop_match_tolerance": FLOP_ACCEPT, "rows": [],
    }
    tables = tempfile.TemporaryDirectory(prefix="latency-tables-")
    for model_name in args.models:
        loaded = load_model(model_name, data)  # trains and caches on first use, before prune loads it
        deployment = Deployment(profile, loaded.input_shape)
        base_cost = count_cost(loaded.model, deployment.example)
        base_accuracy = accuracy(loaded.model, data.loader("val"))
        log(f"[{model_name}] latency table, measured once and shared by every target")
        units = find_units(loaded.model, deployment.example)
        table_path = measure_latency_table(loaded.model, units, deployment, model_name).save(
            Path(tables.name) / f"{model_name}.json")
        for target in args.targets:
            row = measure_row(model_name, target, loaded, data, profile, base_cost, base_accuracy,
                              args.finetune_epochs, table_path)
            result["rows"].append(row)
            result["seconds"] = time.perf_counter() - t0
            write_outputs(result, args.out)  # after every row, so an interrupted run keeps what it has
    write_outputs(result, args.out)
    log(f"wrote {args.out / 'speedup_vs_flops.json'}, .md, .png in {time.perf_counter() - t0:.0f} s")
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
