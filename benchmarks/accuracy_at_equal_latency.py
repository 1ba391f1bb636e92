"""Accuracy at equal measured latency: our depth-pruned model against Torch-Pruning's.

For each model x backend:

1. `compressor prune` (the product, Python API) to --target-speedup on the backend's
   profile, with its usual distillation fine-tuning (--epochs);
2. Torch-Pruning L1 channel pruning at round_to 1, 8 and 16, its ratio bisected on
   *measured* latency (each step timed interleaved against our pruned model) until it is
   as fast as ours (within 3%);
3. the TP models fine-tuned exactly like ours (same loop, epochs, learning rate,
   distillation from the unpruned model);
4. one final interleaved measurement of baseline, ours and every TP model (report policy),
   repeated up to --final-repeats times in all while a speedup's per-round spread is beyond
   the re-measure gate (the steadiest is kept),
   and accuracy on the held-out split (top-1 agreement with the unpruned model where the
   data has no labels).

Writes accuracy_at_equal_latency.json and .md into --out after every model x backend.

    .venv/bin/python benchmarks/accuracy_at_equal_latency.py --out benchmarks/results
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import common
import torch
from common import log
from torch import nn
from tp_reference import METHOD, ROUND_TO, bisect_ratio  # benchmarks/, beside this file

from compressor.data import DataBundle, load_data
from compressor.finetune.training import accuracy, train
from compressor.jobs.prune import prune
from compressor.latency.deploy import Deployment
from compressor.latency.profiles import load_profile
from compressor.metrics.flops import count_cost
from compressor.models.checkpoint import load_checkpoint
from compressor.models.sources import load_model
from compressor.search.target import Speedup

NAME = "accuracy_at_equal_latency"
TITLE = "Accuracy at equal measured latency: depth pruning (compressor) vs Torch-Pruning"
LATENCY_TOLERANCE = 0.03  # TP's ratio bisection stops within 3% of our measured latency
CASES = {  # model -> (data, target speedup)
    "resnet56": ("digits32", 2.0),
    "efficientnet_lite0": ("photos", 1.3),
}
PROFILES = ("ort-cpu", "openvino-cpu")


def quality(model: nn.Module, reference: nn.Module, data: DataBundle) -> dict:
    """Held-out accuracy (%) where the data has labels, else top-1 agreement with `reference` (%)."""
    if getattr(data, "labelled", True):
        return {"metric": "top-1 accuracy (%)", "value": accuracy(model, data.loader("val"))}
    from compressor.metrics.fidelity import fidelity

    f = fidelity(reference, model, data.loader("val"))
    return {"metric": "top-1 agreement with the unpruned model (%)", "value": f.top1_agreement, **asdict(f)}


def run_case(name: str, data_spec: str, target: float, profile_name: str, epochs: int, lr: float,
             final_repeats: int = 1) -> dict:
    t0 = time.perf_counter()
    data = load_data(data_spec)
    loaded = load_model(name, data)
    base = loaded.model.eval()
    profile = load_profile(profile_name)
    dep = Deployment(profile, loaded.input_shape)
    x = dep.example
    with tempfile.TemporaryDirectory(prefix="acc-at-latency-") as tmp:
        work = Path(tmp)
        log(f"[{name} {profile_name}] compressor prune to {target:g}x, {epochs} fine-tune epochs")
        report = prune(loaded, data, Speedup(target), profile, work / "run", finetune_epochs=epochs,
                       finetune_lr=lr, log=lambda s: log(f"    {s}")).report
        ours = load_checkpoint(work / "run" / "model.pt").model.eval()
        ours_path = dep.export(ours, work / "ours")
        tp_models: dict[int, tuple[nn.Module, dict]] = {}
        for r in ROUND_TO:
            def relative_latency(candidate: nn.Module, r: int = r) -> float:
                path = dep.export(candidate, work / f"tp-r{r}")
                timed = dep.time([ours_path, path], profile.search_policy)
                return timed.stats[1].median / timed.stats[0].median

            found = bisect_ratio(base, x, r, relative_latency, 1.0, LATENCY_TOLERANCE, steps=10)
            log(f"    TP round_to {r}: ratio {found.ratio:.3f} at "
                f"{found.tried[-1][1] if found.tried else float('nan'):.2f}x our latency "
                f"({'matched' if found.matched else 'NOT matched'}); fine-tuning {epochs} epochs")
            before = quality(found.model, base, data)
            train(found.model, data.loader("train", batch_size=32, shuffle=True, seed=0), epochs, lr,
                  teacher=base, desc=f"fine-tune TP r{r}")
            tp_models[r] = (found.model.eval(), {"before_finetune": before, **found.describe()})
        log(f"[{name} {profile_name}] final interleaved measurement: baseline, ours, TP r{ROUND_TO}")
        models = [("baseline", base), ("ours", ours), *((f"tp r{r}", m) for r, (m, _) in tp_models.items())]
        final = common.time_models(dep, models, work / "final", profile.report_policy, steady=final_repeats)
    base_flops = count_cost(base, x).flops

    def side(model: nn.Module, key: str) -> dict:
        flops = count_cost(model, x).flops
        return {"latency_ms": final[key]["latency_ms"], "speedup_measured": final[key]["speedup"],
                "speedup_round_spread": final[key]["speedup_round_spread"], "noisy": final[key]["noisy"],
                "flops": flops, "speedup_flops": base_flops / flops, "quality": quality(model, base, data)}

    return {
        "model": name, "data": data_spec, "profile": profile_name, "target_speedup": target,
        "finetune": {"epochs": epochs, "lr": lr, "loop": "compressor.finetune.train, distillation from unpruned"},
        "baseline": {**side(base, "baseline"), "speedup_measured": 1.0},
        "ours": {**side(ours, "ours"), "removed_units": report["removed_units"], "target_met": report["target_met"]},
        "tp": {f"round_to_{r}": {**side(m, f"tp r{r}"), **info} for r, (m, info) in tp_models.items()},
        "seconds": time.perf_counter() - t0,
    }


def render_markdown(result: dict) -> str:
    lines = [
        "Both fine-tuned the same way (distillation from the unpruned model, same epochs and learning rate). "
        "TP's ratio bisected on measured latency until within 3% of ours; latencies from one final "
        "interleaved measurement per row (report policy).",
        "",
        "| model | backend | model variant | ms | measured x | FLOP x | quality before fine-tune | quality |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        head = f"| {row['model']} ({row['data']}) | {row['profile']}"
        b, o = row["baseline"], row["ours"]
        lines.append(f"{head} | unpruned | {b['latency_ms']['median']:.3f} | 1.00 | 1.00 | | "
                     f"{b['quality']['value']:.2f} |")
        lines.append(f"{head} | ours ({len(o['removed_units'])} units removed) | {o['latency_ms']['median']:.3f} | "
                     f"{common.measured_speedup(o)} | {o['speedup_flops']:.2f} | | {o['quality']['value']:.2f} |")
        for r in ROUND_TO:
            t = row["tp"][f"round_to_{r}"]
            flag = "" if t["matched"] else " (latency not matched)"
            lines.append(f"{head} | TP round_to {r}, ratio {t['ratio']:.3f}{flag} | {t['latency_ms']['median']:.3f} | "
                         f"{common.measured_speedup(t)} | {t['speedup_flops']:.2f} | "
                         f"{t['before_finetune']['value']:.2f} | {t['quality']['value']:.2f} |")
    metrics = sorted({row["ours"]["quality"]["metric"] for row in result["rows"]})
    lines += ["", f"- Quality: {'; '.join(metrics)}, on the held-out split.", f"- TP: {METHOD}.",
              common.MEASURED_NOTE]
    return common.document(TITLE, result, lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__, final_repeats=3)
    parser.add_argument("--models", default=",".join(CASES), help="comma-separated (default: %(default)s)")
    parser.add_argument("--profiles", default=",".join(PROFILES), help="comma-separated (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs for both (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=0.02, help="fine-tuning learning rate (default: %(default)s)")
    args = parser.parse_args(argv)
    models = common.known_list(parser, "--models", args.models, CASES)
    t0 = time.perf_counter()
    result = {**common.provenance(NAME), "rows": []}
    for name in models:
        data_spec, target = CASES[name]
        for profile_name in common.comma_list(args.profiles):
            torch.manual_seed(0)
            result["rows"].append(run_case(name, data_spec, target, profile_name, args.epochs, args.lr,
                                           args.final_repeats))
            result["seconds"] = time.perf_counter() - t0
            common.write_results(args.out, NAME, result, render_markdown(result))
    return common.finish(args.out, NAME, render_markdown(result), t0)


if __name__ == "__main__":
    sys.exit(main())
