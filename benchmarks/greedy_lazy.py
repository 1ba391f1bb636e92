"""Lazy greedy evaluation against evaluating every unit at every step, on one model's units and table.

Greedy selection (compressor/search/greedy.py) takes, at each step, the unit whose removal
together with those taken raises the KL divergence from the unpruned model least per ms of
table saving. Evaluating every allowed unit at every step costs U + (U-1) + ... passes over
the calibration images; lazy evaluation tries units in the order of their last figure and
stops where the next cannot win. This runs both orders `--steps` steps on the same units,
table and images, and reports each step's unit, its set's KL, the passes and the seconds.

The inputs are a run's width units (its `widths` state: each unit with its Slim) and its
latency table; the model's depth units are found again. Those of an EfficientNet-Lite0
`--moves depth+width` run on OpenVINO are kept beside the results:

    .venv/bin/python benchmarks/greedy_lazy.py --model efficientnet_lite0 --data photos \\
        --units benchmarks/results/greedy_lazy/effl-dw4_width_units.json \\
        --table benchmarks/results/greedy_lazy/effl-dw4_latency_table.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import common
import torch

from compressor.data import load_data
from compressor.graph.units import find_units
from compressor.models.sources import load_model
from compressor.search.greedy import GreedyOrder
from compressor.stages.choose import GREEDY_IMAGES
from compressor.stages.width import unit_from_dict

NAME = "greedy_lazy"
TITLE = "Lazy greedy evaluation against evaluating every unit at every step"


def run_order(order: GreedyOrder, steps: int) -> dict:
    """`steps` steps of `order`: each step's unit, KL and saving, the set held at the end (a deepening step
    replaces its block's option), the passes and the seconds spent running models (the reference pass too)."""
    for _ in range(steps):
        if not order.extend():
            break
    paths = {u.name: u.path for u in order.units}
    held = {paths[s.unit]: s.unit for s in order.steps}
    return {"steps": [{"unit": s.unit, "kl": s.kl, "table_saving_ms": s.saving_ms} for s in order.steps],
            "last_set": sorted(held.values()), "evaluations": order.evaluations, "seconds": order.seconds}


def render(result: dict) -> str:
    lazy, full = result["lazy"], result["full"]
    lines = [f"{result['model']} on {result['data']}: {result['units']} units ({result['width_units']} width), "
             f"{result['images']} calibration images.", "",
             "| step | lazy: unit | KL (nats) | every unit: unit | KL (nats) | lazy KL / full KL |",
             "|---:|---|---:|---|---:|---:|"]
    for i, (a, b) in enumerate(zip(lazy["steps"], full["steps"], strict=False), 1):
        ratio = a["kl"] / b["kl"] if b["kl"] else float("nan")
        lines.append(f"| {i} | {a['unit']} | {a['kl']:.4f} | {b['unit']} | {b['kl']:.4f} | {ratio:.3f} |")
    lines += ["", f"- Passes over the calibration images: lazy {lazy['evaluations']}, every unit "
              f"{full['evaluations']}; seconds (with the reference pass): lazy {lazy['seconds']:.0f}, "
              f"every unit {full['seconds']:.0f} (running models).",
              f"- Same units taken in the same order: {'yes' if result['same_order'] else 'no'}; the same set "
              f"after the last step: {'yes' if result['same_last_set'] else 'no'}."]
    return common.document(TITLE, result, lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default="efficientnet_lite0", help="zoo model (default: %(default)s)")
    parser.add_argument("--data", default="photos", help="built-in data (default: %(default)s)")
    parser.add_argument("--units", type=Path, required=True, help="a run's width units (JSON: {units: [...]})")
    parser.add_argument("--table", type=Path, required=True, help="the same run's latency_table.json")
    parser.add_argument("--steps", type=int, default=8, help="greedy steps (default: %(default)s)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    data = load_data(args.data)
    loaded = load_model(args.model, data)
    model = loaded.model.eval()
    widths = [unit_from_dict(d) for d in json.loads(args.units.read_text())["units"]]
    units = list(find_units(model, loaded.example_input(1))) + widths
    savings = json.loads(args.table.read_text())["savings_ms"]
    images = torch.cat([b[0] for b in data.loader("train", batch_size=128, limit=GREEDY_IMAGES, seed=0)])
    orders = {name: run_order(GreedyOrder(model, units, savings, images, 1, common.log, lazy=lazy), args.steps)
              for name, lazy in (("lazy", True), ("full", False))}
    names = {k: [s["unit"] for s in v["steps"]] for k, v in orders.items()}
    result = {**common.provenance(NAME), "model": args.model, "data": args.data, "units": len(units),
              "width_units": len(widths), "images": len(images), **orders,
              "same_order": names["lazy"] == names["full"],
              "same_last_set": orders["lazy"]["last_set"] == orders["full"]["last_set"],
              "seconds": time.perf_counter() - t0}
    common.write_results(args.out, NAME, result, render(result))
    return common.finish(args.out, NAME, render(result), t0)


if __name__ == "__main__":
    sys.exit(main())
