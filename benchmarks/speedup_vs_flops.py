"""Measured vs FLOP-estimated speedup per backend: depth pruning against Torch-Pruning.

For each model and FLOP-speedup level this script

1. removes residual units with compressor's surgery: the set of least importance
   (criterion `magnitude`, data-free) whose FLOP saving reaches the level, chosen by the
   same knapsack as `compressor prune` (with FLOPs in place of measured milliseconds, so
   one pruned model is compared across every backend);
2. prunes the unpruned model with Torch-Pruning's L1 channel pruning at round_to 1, 8 and
   16, each at the ratio whose FLOPs match ours (bisection), and on a grid of ratios;
3. per backend (torch eager, ONNX Runtime, OpenVINO; TensorRT where tensorrt and a GPU
   exist) exports every model (BatchNorm folded) and times all of them in ONE interleaved
   measurement (the profile's search policy);
4. from the grid, interpolates per round_to the ratio at which Torch-Pruning's latency
   equals ours, prunes at that ratio, and verifies it in a second interleaved measurement
   (baseline, ours, TP at matched latency): how many FLOPs TP must cut to be as fast;
5. writes speedup_vs_flops.json, .md and .png into --out after every model.

Speedup fidelity = measured speedup / FLOP-estimated speedup (1.0: latency follows FLOPs).
CIFAR ResNets are our digits32-trained weights; resnet18 and mobilenet_v2 at 224x224 are
random-init with randomised BatchNorm statistics (latency does not depend on the values).

    .venv/bin/python benchmarks/speedup_vs_flops.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import common
import torch
from common import log
from torch import nn
from tp_reference import METHOD, ROUND_TO, TPModel, tp_matching_flops, tp_prune  # benchmarks/, beside this file

from compressor.criteria import ScoringContext, score_units
from compressor.data import load_data
from compressor.graph.surgery import remove_units
from compressor.graph.units import find_units
from compressor.latency.deploy import Deployment
from compressor.latency.profiles import load_profile
from compressor.metrics.flops import count_cost
from compressor.models.loaded import LoadedModel
from compressor.models.sources import load_model
from compressor.models.zoo import ZOO, build
from compressor.search.knapsack import choose_units, most_removable

NAME = "speedup_vs_flops"
TITLE = "Measured vs FLOP-estimated speedup per backend: depth pruning vs Torch-Pruning"
BACKENDS = {"torch-cpu": "torch eager", "ort-cpu": "ONNX Runtime", "openvino-cpu": "OpenVINO",
            "tensorrt-gpu-fp16": "TensorRT"}
GRID = (0.25, 0.45, 0.65, 0.8)  # Torch-Pruning ratios timed to find its ratio at our latency
GRID_NOTE = (f"Matched latency: TP timed at ratios {', '.join(map(str, GRID))} and at its matched-FLOPs ratio, "
             "the ratio at our latency interpolated linearly, pruned and timed again.")
FLOP_NOTE = "FLOPs = 2 x multiply-adds (torch FlopCounterMode, conv + matmul only), batch 1"
CIFAR_DATA = "digits32"


def prepare(name: str) -> tuple[LoadedModel, str]:
    """The model to prune and where its weights come from."""
    size = ZOO[name].input_size
    if size == 32:
        return load_model(name, load_data(CIFAR_DATA)), f"trained on {CIFAR_DATA} by compressor"
    model = common.randomise_batchnorm(build(name, 1000))
    return LoadedModel(model, name, 1000, (3, size, size), "random init"), "random init, BatchNorm randomised"


@dataclass
class Level:
    """Our pruned model at one FLOP-speedup level."""

    target: float
    removed: list[str]
    model: nn.Module
    flops: int


def our_levels(loaded: LoadedModel, x: torch.Tensor, targets: list[float]) -> tuple[list[Level], list[dict]]:
    """Least-magnitude unit sets reaching each FLOP speedup; unreachable levels are listed apart."""
    model = loaded.model
    units = find_units(model, x)
    importance = score_units("magnitude", ScoringContext(model, units, calibration=None))
    base = count_cost(model, x).flops
    savings = {u.name: float(base - count_cost(remove_units(model, [u], x), x).flops) for u in units}
    levels, skipped = [], []
    for target in targets:
        choice = choose_units(units, importance, savings, base * (1 - 1 / target), min_per_stage=1)
        if choice is None:
            floor = remove_units(model, most_removable(units, 1), x)
            best = base / count_cost(floor, x).flops
            skipped.append({"target": target,
                            "reason": f"unreachable with one block kept per stage (at most {best:.2f}x)"})
            continue
        chosen = [u for u in units if u.name in choice.removed]
        pruned = remove_units(model, chosen, x)
        levels.append(Level(target, list(choice.removed), pruned, count_cost(pruned, x).flops))
    return levels, skipped


def backend_available(profile_name: str) -> str | None:
    """None if the backend can run here, else why not."""
    if profile_name.startswith("tensorrt"):
        if importlib.util.find_spec("tensorrt") is None or not torch.cuda.is_available():
            return "needs an NVIDIA GPU and the tensorrt package (neither is on this machine)"
    return None


def crossing_ratio(points: list[tuple[float, float]], latency: float) -> float | None:
    """The ratio at which latency(ratio) (piecewise linear through `points`) first drops to `latency`."""
    pts = sorted(points)
    for (r0, l0), (r1, l1) in zip(pts, pts[1:], strict=False):
        if l0 >= latency >= l1 and l0 != l1:
            return r0 + (r1 - r0) * (l0 - latency) / (l0 - l1)
    if pts and pts[0][1] <= latency:
        return pts[0][0]
    return None


def run_backend(profile_name: str, loaded: LoadedModel, x: torch.Tensor, base_flops: int, levels: list[Level],
                tp_flops: dict[tuple[float, int], TPModel], grid: dict[tuple[int, float], TPModel]) -> dict:
    """Both interleaved measurements of one model on one backend; the backend's part of the results."""
    profile = load_profile(profile_name)
    dep = Deployment(profile, loaded.input_shape)
    with tempfile.TemporaryDirectory(prefix="speedup-vs-flops-") as tmp:
        work = Path(tmp)
        models: list[tuple[str, nn.Module]] = [("baseline", loaded.model)]
        models += [(f"ours {lv.target:g}", lv.model) for lv in levels]
        models += [(f"tp {t:g} r{r}", m.model) for (t, r), m in tp_flops.items()]
        models += [(f"grid r{r} {ratio:g}", m.model) for (r, ratio), m in grid.items()]
        log(f"    {BACKENDS[profile_name]}: exporting and timing {len(models)} models interleaved")
        first = common.time_models(dep, models, work / "first")
        base_ms = first["baseline"]["latency_ms"]["median"]
        matched: list[tuple[str, nn.Module]] = [("baseline", loaded.model)]
        crossings: dict[tuple[float, int], dict] = {}
        for lv in levels:
            ours_ms = first[f"ours {lv.target:g}"]["latency_ms"]["median"]
            matched.append((f"ours {lv.target:g}", lv.model))
            for r in ROUND_TO:
                points = [(ratio, first[f"grid r{r} {ratio:g}"]["latency_ms"]["median"]) for ratio in GRID]
                at_flops = tp_flops[(lv.target, r)]
                points.append((at_flops.ratio, first[f"tp {lv.target:g} r{r}"]["latency_ms"]["median"]))
                points.append((0.0, base_ms))
                ratio = crossing_ratio(points, ours_ms)
                if ratio is None:
                    fastest = min(points, key=lambda p: p[1])
                    crossings[(lv.target, r)] = {"reached": False, "fastest_ratio": fastest[0],
                                                 "fastest_vs_ours": fastest[1] / ours_ms}
                    continue
                tp_model = tp_prune(loaded.model, x, ratio, r)
                crossings[(lv.target, r)] = {"reached": True, "ratio": ratio,
                                             "flops": count_cost(tp_model, x).flops}
                matched.append((f"tp@lat {lv.target:g} r{r}", tp_model))
        log(f"    {BACKENDS[profile_name]}: verifying Torch-Pruning at our latency ({len(matched)} models)")
        second = common.time_models(dep, matched, work / "second")
    rows = []
    for lv in levels:
        ours = first[f"ours {lv.target:g}"]
        flop_x = base_flops / lv.flops
        row = {"target": lv.target, "ours": {"speedup_flops": flop_x, "speedup_measured": ours["speedup"],
                                             "speedup_fidelity": ours["speedup"] / flop_x, **ours}, "tp": {}}
        verified_ours = second[f"ours {lv.target:g}"]["latency_ms"]["median"]
        for r in ROUND_TO:
            m = tp_flops[(lv.target, r)]
            t = first[f"tp {lv.target:g} r{r}"]
            tp_flop_x = base_flops / m.flops
            at_latency = crossings[(lv.target, r)]
            if at_latency["reached"]:
                v = second[f"tp@lat {lv.target:g} r{r}"]
                at_latency.update({"speedup_flops": base_flops / at_latency["flops"],
                                   "speedup_measured": v["speedup"], "latency_ms": v["latency_ms"],
                                   "latency_vs_ours": v["latency_ms"]["median"] / verified_ours})
            row["tp"][f"round_to_{r}"] = {
                "matched_flops": {"speedup_flops": tp_flop_x, "speedup_measured": t["speedup"],
                                  "speedup_fidelity": t["speedup"] / tp_flop_x, "flops_vs_ours": m.flops / lv.flops - 1,
                                  **t, **m.describe()},
                "matched_latency": at_latency,
            }
        rows.append(row)
    grid_out = [{"round_to": r, "ratio": ratio, "flops": m.flops, "speedup_flops": base_flops / m.flops,
                 **first[f"grid r{r} {ratio:g}"]} for (r, ratio), m in grid.items()]
    return {"profile": profile.to_dict(), "baseline": first["baseline"], "rows": rows, "grid": grid_out,
            "verification_baseline": second["baseline"]}


def run_model(name: str, targets: list[float], backends: list[str]) -> dict:
    t0 = time.perf_counter()
    loaded, weights = prepare(name)
    x = torch.randn(1, *loaded.input_shape, generator=torch.Generator().manual_seed(0))
    base = count_cost(loaded.model, x)
    log(f"[{name}] {base.flops / 1e6:.1f} MFLOPs; choosing unit sets for {targets}")
    levels, skipped = our_levels(loaded, x, targets)
    tp_flops: dict[tuple[float, int], TPModel] = {}
    for lv in levels:
        for r in ROUND_TO:
            tp_flops[(lv.target, r)] = tp_matching_flops(loaded.model, x, lv.flops, r)
            m = tp_flops[(lv.target, r)]
            log(f"    {lv.target:g}x: ours {base.flops / lv.flops:.2f}x FLOPs ({len(lv.removed)} units); "
                f"TP round_to {r} ratio {m.ratio:.3f} -> {base.flops / m.flops:.2f}x"
                f"{'' if m.matched else ' (FLOPs not matched)'}")
    grid = {(r, ratio): TPModel(m, ratio, r, count_cost(m, x).flops)
            for r in ROUND_TO for ratio in GRID for m in [tp_prune(loaded.model, x, ratio, r)]}
    result = {"model": name, "weights": weights, "input_shape": list(loaded.input_shape), "flops": base.flops,
              "params": base.params, "levels": [{"target": lv.target, "removed_units": lv.removed,
                                                 "flops": lv.flops} for lv in levels],
              "skipped_levels": skipped, "backends": {}}
    for profile_name in backends:
        why_not = backend_available(profile_name)
        if why_not:
            result["backends"][profile_name] = {"skipped": why_not}
            continue
        result["backends"][profile_name] = run_backend(profile_name, loaded, x, base.flops, levels, tp_flops, grid)
    result["seconds"] = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------- output


def timed_backends(result: dict) -> Iterator[tuple[dict, str, dict]]:
    """(model entry, backend, its results) for every backend that was not skipped."""
    for model in result["models"]:
        for backend, b in model["backends"].items():
            if "skipped" not in b:
                yield model, backend, b


def render_markdown(result: dict) -> str:
    lines = [
        "Ours: residual units removed (least `magnitude` importance reaching the FLOP level, no fine-tuning). "
        "TP: Torch-Pruning L1 channel pruning at matched FLOPs with round_to 1, 8, 16. "
        "Each model x backend is one interleaved measurement; ratio = measured / FLOP-estimated speedup.",
        "",
        "## At matched FLOPs",
        "",
        "| model | level | backend | ours FLOP x | ours measured x | ours ratio "
        "| TP r1 measured x (ratio) | TP r8 measured x (ratio) | TP r16 measured x (ratio) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for model in result["models"]:
        for backend, b in model["backends"].items():
            if "skipped" in b:
                lines.append(f"| {model['model']} | | {BACKENDS[backend]} | skipped: {b['skipped']} | | | | | |")
                continue
            for row in b["rows"]:
                o = row["ours"]
                tps = []
                for r in ROUND_TO:
                    t = row["tp"][f"round_to_{r}"]["matched_flops"]
                    flag = "" if t["matched"] else f", FLOPs {t['flops_vs_ours']:+.0%}"
                    tps.append(f"{t['speedup_measured']:.2f} ({t['speedup_fidelity']:.2f}{flag})")
                lines.append(f"| {model['model']} | {row['target']:g}x | {BACKENDS[backend]} | "
                             f"{o['speedup_flops']:.2f} | {o['speedup_measured']:.2f} | {o['speedup_fidelity']:.2f} | "
                             + " | ".join(tps) + " |")
    lines += [
        "",
        "## At matched measured latency",
        "",
        "The FLOP cut Torch-Pruning needs to be as fast as our pruned model (ratio interpolated from a grid, "
        "then the TP model at that ratio verified in a second interleaved measurement: TP/ours latency).",
        "",
        "| model | level | backend | ours FLOP x | TP r1 FLOP x (TP/ours ms) | TP r8 FLOP x (TP/ours ms) "
        "| TP r16 FLOP x (TP/ours ms) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for model, backend, b in timed_backends(result):
        for row in b["rows"]:
            cells = []
            for r in ROUND_TO:
                t = row["tp"][f"round_to_{r}"]["matched_latency"]
                cells.append(f"{t['speedup_flops']:.2f} ({t['latency_vs_ours']:.2f})" if t["reached"] else
                             f"not reached (fastest: ratio {t['fastest_ratio']:g}, "
                             f"{t['fastest_vs_ours']:.2f}x our latency)")
            lines.append(f"| {model['model']} | {row['target']:g}x | {BACKENDS[backend]} | "
                         f"{row['ours']['speedup_flops']:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "## Models", ""]
    for model in result["models"]:
        skipped = "; ".join(f"{s['target']:g}x {s['reason']}" for s in model["skipped_levels"])
        base = {BACKENDS[k]: v["baseline"]["latency_ms"]["median"] for k, v in model["backends"].items()
                if "skipped" not in v}
        lines.append(f"- {model['model']} ({'x'.join(map(str, model['input_shape']))}, {model['weights']}): "
                     f"{model['flops'] / 1e6:.1f} MFLOPs; unpruned "
                     + ", ".join(f"{k} {v:.3f} ms" for k, v in base.items())
                     + (f"; skipped levels: {skipped}" if skipped else "") + f"; {model['seconds']:.0f} s.")
    noisy = [f"{model['model']} {BACKENDS[k]}" for model, k, b in timed_backends(result)
             if any(r["ours"]["latency_ms"]["noisy"] for r in b["rows"])]
    lines += [
        "",
        f"- {result['flop_convention']}.",
        f"- TP: {METHOD}. {GRID_NOTE} FLOP matches worse than 3% are shown with their mismatch.",
        f"- Noisy measurements (IQR/median above 25% after re-measuring): {', '.join(noisy) or 'none'}.",
    ]
    return common.document(TITLE, result, lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    colors = {k: f"C{i}" for i, k in enumerate(BACKENDS)}
    markers = {1: "^", 8: "s", 16: "D"}
    top = 1.0
    seen: set[str] = set()
    for _, backend, b in timed_backends(result):
        for row in b["rows"]:
            o = row["ours"]
            label = f"{BACKENDS[backend]}"
            axes[0].scatter(o["speedup_flops"], o["speedup_measured"], color=colors[backend], s=40,
                            label=label if label not in seen else None)
            seen.add(label)
            top = max(top, o["speedup_flops"], o["speedup_measured"])
            for r in ROUND_TO:
                t = row["tp"][f"round_to_{r}"]["matched_flops"]
                key = f"{BACKENDS[backend]}, round_to {r}"
                axes[1].scatter(t["speedup_flops"], t["speedup_measured"], color=colors[backend],
                                marker=markers[r], facecolors="none", s=40,
                                label=key if key not in seen else None)
                seen.add(key)
                top = max(top, t["speedup_flops"], t["speedup_measured"])
    top *= 1.08
    for ax, title in zip(axes, ("depth pruning (compressor)", "channel L1 (Torch-Pruning), matched FLOPs"),
                         strict=True):
        ax.plot([1, top], [1, top], color="grey", linestyle="--", linewidth=1, label="measured = FLOP estimate")
        ax.set_xlim(0.9, top)
        ax.set_ylim(0.3, top)
        ax.set_xlabel("FLOP-estimated speedup (x)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("measured speedup, batch 1 (x)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_outputs(result: dict, out: Path, name: str = NAME) -> None:
    common.write_results(out, name, result, render_markdown(result), plot=lambda path: plot(result, path))


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = common.argument_parser(__doc__, models="resnet20,resnet56,resnet110,resnet18,mobilenet_v2")
    parser.add_argument("--targets", type=common.float_list, default="1.5,2,3",
                        help="comma-separated FLOP-speedup levels (default: %(default)s)")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated profiles (default: %(default)s; TensorRT is skipped without a GPU)")
    parser.add_argument("--name", default=NAME,
                        help="base name of the .json/.md/.png results (default: %(default)s)")
    args = parser.parse_args(argv)
    args.backends = common.known_list(parser, "--backends", args.backends, BACKENDS)
    if not args.targets or any(not t > 1 for t in args.targets):
        parser.error("every level must be greater than 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = {**common.provenance(NAME), "flop_convention": FLOP_NOTE, "tp_method": METHOD,
              "tp_grid": list(GRID), "models": []}
    for name in args.models:
        result["models"].append(run_model(name, args.targets, args.backends))
        result["seconds"] = time.perf_counter() - t0
        write_outputs(result, args.out, args.name)  # after every model, so an interrupted run keeps what it has
    return common.finish(args.out, args.name, render_markdown(result), t0, png=True)


if __name__ == "__main__":
    sys.exit(main())
