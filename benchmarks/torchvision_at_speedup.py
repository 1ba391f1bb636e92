"""torchvision architectures pruned through the Python API, as a user's own nn.Modules, to a measured target.

Each model is built by torchvision (random initialisation, non-trivial BatchNorm statistics: no
weights are downloaded, and latency does not depend on them), handed to `compressor.prune` as a
plain nn.Module with the bundled photo crops at 224x224, and pruned to a measured speedup on the
profile without fine-tuning. Every exported artifact is validated against torch by the job itself
(its `checks.artifact_max_abs_error`). Top-1 agreement is meaningless on random weights and is not
reported.

Each model should land between the target and the most the search accepts, target / ((1 - margin) x
(1 - OVERSHOOT_BAND)) with the run's margin (1.40x to 1.46x at 1.3x); where it does not, the table
gives why the search stopped (the report's `search.ended`).

    .venv/bin/python benchmarks/torchvision_at_speedup.py --target 1.3 --profile ort-cpu
    .venv/bin/python benchmarks/torchvision_at_speedup.py --target 1.3 --moves depth+width --models convnext_tiny
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import common

import compressor
from compressor.search.target import OVERSHOOT_BAND

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf",
          "convnext_tiny")


def run_model(name: str, target: float, profile: str, calibration: int, moves: str, data,
              keep: Path | None = None) -> dict:
    """One model pruned into a temporary folder, or into `keep`/NAME where given (its report, table and
    artifacts kept for a closer look)."""
    import torchvision

    model = common.randomise_batchnorm(getattr(torchvision.models, name)(weights=None))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"tv-{name}-") as tmp:
        out = keep / name if keep is not None else Path(tmp) / "run"
        result = compressor.prune(model, data=data, target=compressor.Speedup(target), profile=profile, out=out,
                                  finetune_epochs=0, calibration_size=calibration, moves=moves,
                                  log=lambda s: common.log(f"    {s}"))
        files = sorted(p.name for p in out.iterdir())
    r = result.report
    ceiling = target / ((1 - r["search"]["margin"]) * (1 - OVERSHOOT_BAND))
    delivered = sorted(r["removed_units"])
    in_search = [t["speedup"] for t in r["search"]["trials"] if t["passed"] and sorted(t["removed"]) == delivered]
    return {"model": name, "units": len(r["units"]), "removed": r["removed_units"],
            "band": [target, ceiling], "in_band": target <= r["speedup_measured"] <= ceiling,
            "trials": len(r["search"]["trials"]), "search_ended": r["search"]["ended"],
            "search_speedup": in_search[-1] if in_search else None,
            "baseline_ms": r["baseline"]["latency_ms"]["median"], "pruned_ms": r["pruned"]["latency_ms"]["median"],
            "speedup_measured": r["speedup_measured"], "speedup_flops": r["speedup_flops"],
            "target_met": r["target_met"], "artifact_max_abs_error": r["checks"]["artifact_max_abs_error"],
            "artifact_tolerance": r["checks"]["artifact_tolerance"], "files": files,
            "noisy": r["pruned"]["latency_ms"]["noisy"] or r["baseline"]["latency_ms"]["noisy"],
            "seconds": time.perf_counter() - t0}


def render(result: dict) -> str:
    lines = [f"Target {result['target']}x on `{result['profile']}`, moves `{result['moves']}`, batch 1, 224x224, "
             "no fine-tuning, "
             f"{result['calibration_size']} calibration crops for `cka`; each model one `compressor.prune` call on "
             "a plain torchvision nn.Module (random weights: latency only).", "",
             "| model | units | removed | ms (unpruned -> pruned) | measured x | FLOP x | target | within band | "
             "candidates | ONNX vs torch max abs diff | wall time |",
             "|---|---:|---:|---|---:|---:|---|---|---:|---:|---:|"]
    why = []
    for r in result["models"]:
        if "error" in r:
            lines.append(common.failed_row([r["model"], "", ""], r["error"], 11))
            continue
        lines.append(f"| {r['model']} | {r['units']} | {len(r['removed'])} | {r['baseline_ms']:.2f} -> "
                     f"{r['pruned_ms']:.2f} | {r['speedup_measured']:.2f} | {r['speedup_flops']:.2f} | "
                     f"{'met' if r['target_met'] else 'MISSED'}{' (noisy)' if r['noisy'] else ''} | "
                     f"{'yes' if r['in_band'] else 'NO'} ({r['band'][0]:g}-{r['band'][1]:.2f}x) | {r['trials']} | "
                     f"{r['artifact_max_abs_error']:.1e} | {r['seconds']:.0f} s |")
        if not r["in_band"]:
            why.append(_why_outside(r))
    lines += ["", "Within band: between the target and target / ((1 - margin) x (1 - "
              f"{OVERSHOOT_BAND:g})), the most the search accepts without refining (the margin from the run's "
              "measured spread)."]
    if why:
        lines += ["", "Outside the band, and why no set closer was measured:", "", *why]
    for rerun in result.get("reruns", []):
        lines += ["", f"Measured again, replacing their rows ({rerun['date']}, source {rerun['git_commit']}): "
                      f"{', '.join(rerun['models'])}; {rerun['why']} Command: `{rerun['command']}`."]
    lines += ["", "Every artifact was validated against torch before it was written (tolerance atol 1e-4 + rtol 1e-3 "
              "on the logits)."]
    return common.document("torchvision architectures through the Python API", result, lines)


def _why_outside(r: dict) -> str:
    """Why a model landed outside the band: the search's own measurement of the set it delivered, then
    why the search stopped there."""
    found = r.get("search_speedup")
    within = found is not None and r["band"][0] <= found <= r["band"][1]
    measured = "" if found is None else (
        f"the search measured this set at {found:.3f}x ({'within' if within else 'outside'} the band), "
        f"the final measurement{' (flagged noisy)' if r['noisy'] else ''} at {r['speedup_measured']:.3f}x; ")
    return (f"- {r['model']}: {r['speedup_measured']:.3f}x, band {r['band'][0]:g}-{r['band'][1]:.3f}x; {measured}"
            f"the search stopped because {r['search_ended']}.")


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__, calibration=64)
    parser.add_argument("--models", type=common.comma_list, default=",".join(MODELS))
    parser.add_argument("--target", type=float, default=1.3, help="measured speedup (default: %(default)s)")
    parser.add_argument("--profile", default="ort-cpu")
    parser.add_argument("--moves", choices=("depth", "width", "depth+width"), default="depth",
                        help="what the search may remove: whole blocks, channel steps, or both (default: depth)")
    parser.add_argument("--runs", type=Path, help="keep each model's run folder in RUNS/MODEL (default: not kept)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    data = compressor.load_data("photos")
    result = {**common.provenance("torchvision_at_speedup"), "target": args.target, "profile": args.profile,
              "calibration_size": args.calibration_size, "moves": args.moves, "models": []}
    name = "torchvision_at_speedup" + ("" if args.moves == "depth" else "_" + args.moves.replace("+", "_"))
    for model in args.models:
        common.log(f"[{model}] pruning to {args.target}x on {args.profile} ({args.moves})")
        try:
            result["models"].append(run_model(model, args.target, args.profile, args.calibration_size, args.moves,
                                                data, args.runs))
        except compressor.CompressorError as e:
            result["models"].append({"model": model, "error": f"{type(e).__name__}: {e}"})
        markdown = render(result)
        common.write_results(args.out, name, result, markdown)
    return common.finish(args.out, name, markdown, t0)


if __name__ == "__main__":
    sys.exit(main())
