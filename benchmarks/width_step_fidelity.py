"""Width steps: measured speedup against FLOP speedup of every channel count a run chose.

A width level is rounded to a channel count timed on the runtime (compressor/latency/steps.py). For
each run folder given (a `compressor prune --moves width|depth+width` output), this reads the counts
and their medians from report.json (`width.channel_steps`: the block, or CHAIN copies of it, timed on
its own against the unslimmed block) and counts the FLOPs of the same block slimmed to that count
(2 per multiply-add, torch's FLOP counter, one copy: the chain multiplies both alike). Per chosen
count: measured speedup (full median / count median), FLOP speedup (full / slimmed block FLOPs) and
their ratio. The goal (issue 24): a ratio of at least 0.95 for the counts chosen, on every runtime;
Torch-Pruning's uniform channel pruning keeps 0.36-0.98 (benchmarks/results/speedup_vs_flops.md).

Nothing is timed here: the timings are those the run made, on its profile's device.

    .venv/bin/python benchmarks/width_step_fidelity.py runs/effl-dw RUNS/convnext_tiny=torchvision.models:convnext_tiny
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch

from compressor.data import load_data
from compressor.graph.units import find_units
from compressor.graph.width import find_width_options
from compressor.latency.steps import StepStructure, slimmed_copy
from compressor.metrics.flops import count_cost
from compressor.models.sources import load_model

NAME = "width_step_fidelity"
TITLE = "Width steps: measured against FLOP speedup of the channel counts chosen"
GOAL = 0.95


def _structures(run: Path) -> tuple[dict, list[dict]]:
    report = json.loads((run / "report.json").read_text())
    if not report.get("width"):
        msg = f"{run}: no width moves in this run (report.json has no 'width')"
        raise SystemExit(msg)
    return report, report["width"]["channel_steps"]


def run_rows(run: Path, spec: str | None = None) -> list[dict]:
    """One row per (structure, level) with a chosen count: the measured and FLOP speedups of that count.
    `spec` rebuilds the model where the report's name cannot (a module pruned from Python)."""
    report, steps = _structures(run)
    loaded = load_model(spec or report["model"], load_data(report["data"]) if report.get("data") else None)
    model = loaded.model.eval()
    units = find_units(model, loaded.example_input(1))
    options, _ = find_width_options(model, units)
    by_name = {o.name: o for o in options}
    rows = []
    for step in steps:
        first = step["blocks"].split(",")[0].split(" ")[0]
        option = by_name[first]
        group = next(g for g in option.groups if g.root == step["root"])
        block = model.get_submodule(option.unit.path)
        shape = tuple(option.unit.input_shape)
        structure = StepStructure("", block, shape, group.root, group.channels, step["blocks"])
        x = torch.randn(1, *shape)
        full_flops = count_cost(block, x).flops
        for level in step["levels"]:
            chosen = level["chosen"]
            if chosen is None or level["full_ms"] is None:
                continue
            measured = level["full_ms"] / level["medians_ms"][str(chosen)]
            flops = full_flops / count_cost(slimmed_copy(structure, chosen), x).flops
            rows.append({"run": str(run), "model": report["model"], "profile": report["profile"]["name"],
                         "blocks": step["blocks"], "root": step["root"], "channels": step["channels"],
                         "level": level["level"], "count": chosen, "speedup_measured": measured,
                         "speedup_flops": flops, "fidelity": measured / flops})
    return rows


def render_markdown(result: dict) -> str:
    rows = result["rows"]
    lines = ["Per chosen channel count: the block timed alone (CHAIN copies where its output has its input's "
             "shape) against the unslimmed block, as the run timed it; FLOPs of one block.", "",
             "| model | profile | blocks | group (channels) | level | count | measured x | FLOP x | measured / FLOP |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['profile']} | {r['blocks']} | {r['root']} ({r['channels']}) | "
                     f"{r['level']:.0%} | {r['count']} | {r['speedup_measured']:.2f} | {r['speedup_flops']:.2f} | "
                     f"{r['fidelity']:.2f} |")
    lines.append("")
    for profile in sorted({r["profile"] for r in rows}):
        f = np.array([r["fidelity"] for r in rows if r["profile"] == profile])
        below = int((f < GOAL).sum())
        lines.append(f"- {profile}: measured / FLOP over {len(f)} chosen counts: median {np.median(f):.2f}, "
                     f"min {f.min():.2f}; {below} below {GOAL} (goal: none).")
    return common.document(TITLE, result, lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN[=MODEL]",
                        help="run folders of prune --moves width or depth+width; =MODEL rebuilds a model pruned "
                             "from Python (e.g. =torchvision.models:convnext_tiny)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for item in args.runs:
        run, _, spec = item.partition("=")
        rows += run_rows(Path(run), spec or None)
    result = {**common.provenance(NAME), "rows": rows}
    markdown = render_markdown(result)
    common.write_results(args.out, NAME, result, markdown)
    return common.finish(args.out, NAME, markdown, t0)


if __name__ == "__main__":
    sys.exit(main())
