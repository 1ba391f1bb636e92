"""Spread of interleaved timing under each runtime's session settings: identical copies of one model, timed
round-robin as a latency table's session times its sets.

Copies of one artifact must read the same median, so how far their medians spread (largest / smallest - 1),
their IQR/median and how many stay above the re-measure gate (25%) measure the timing path itself. Variants:

- onnxruntime, spinning off, no cool-down: the ort-cpu profile before issue 22;
- onnxruntime, its default spinning, no cool-down: what interleaving does to a spinning pool;
- onnxruntime, its default spinning, the measured cool-down: the ort-cpu profile now;
- openvino, CPU pinning on (its default): the openvino-cpu profile before issue 22;
- openvino, CPU pinning off: the openvino-cpu profile now.

Run it on an idle machine (the figures for docs/measurement.md):

    .venv/bin/python benchmarks/timing_spread.py --model resnet56 --copies 22
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import common
import numpy as np
from predictor_accuracy import prepare_model

from compressor.latency.deploy import Deployment
from compressor.latency.profiles import load_profile
from compressor.latency.timing import measure_interleaved

NAME = "timing_spread"
# (label, profile, runtime_options, cooldown_s: None = measured, 0 = none)
VARIANTS = [
    ("onnxruntime, spinning off, no cool-down (before)", "ort-cpu", {"allow_spinning": False}, 0.0),
    ("onnxruntime, default spinning, no cool-down", "ort-cpu", {}, 0.0),
    ("onnxruntime, default spinning, measured cool-down (now)", "ort-cpu", {}, None),
    ("openvino, CPU pinning on: its default (before)", "openvino-cpu", {}, None),
    ("openvino, CPU pinning off (now)", "openvino-cpu", {"ENABLE_CPU_PINNING": False}, None),
]


def spread(loaded, profile_name: str, options: dict, cooldown: float | None, copies: int, work: Path) -> dict:
    profile = dataclasses.replace(load_profile(profile_name), runtime_options=options)
    deployment = Deployment(profile, loaded.input_shape)
    artifact = deployment.export(loaded.model, work / f"{profile_name}{deployment.exporter.suffix}")
    sessions = [deployment.open(artifact) for _ in range(copies)]
    t0 = time.perf_counter()
    result = measure_interleaved(sessions, profile.search_policy, cooldown_s=cooldown)
    medians = np.array([s.median for s in result.stats])
    relative = np.array([s.relative_iqr for s in result.stats])
    return {"median_ms": float(np.median(medians)), "spread_of_medians": float(medians.max() / medians.min() - 1),
            "relative_iqr_median": float(np.median(relative)), "relative_iqr_max": float(relative.max()),
            "noisy": int(sum(s.noisy for s in result.stats)), "copies": copies, "cooldown_s": result.cooldown_s,
            "burst": result.burst, "rounds": len(result.round_medians[0]), "seconds": time.perf_counter() - t0,
            "settings": sessions[0].settings}


def markdown(result: dict) -> str:
    lines = [f"Model {result['model']}: {result['copies']} sessions of one artifact, timed interleaved with each "
             "profile's search policy (identical models: any difference between their medians is the timing "
             "path's).", "",
             "| variant | median (ms) | spread of medians | IQR/median (median, max) | noisy | cool-down (ms) "
             "| runs per block | rounds |", "|---|---:|---:|---|---:|---:|---:|---:|",
             *[f"| {label} | {r['median_ms']:.3f} | {r['spread_of_medians']:.1%} | {r['relative_iqr_median']:.1%}, "
               f"{r['relative_iqr_max']:.1%} | {r['noisy']}/{r['copies']} | {1e3 * r['cooldown_s']:.0f} | "
               f"{r['burst']} | {r['rounds']} |" for label, r in result["rows"].items()]]
    return common.document("Spread of interleaved timing by session settings", result, lines, source=True)


def main() -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--copies", type=int, default=22, help="sessions timed together (default: %(default)s, "
                                                               "a table's session of the old benchmark)")
    parser.add_argument("--variants", default="", help="comma-separated indices into the list above (default: all)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    loaded, _ = prepare_model(args.model, 0)
    chosen = [VARIANTS[int(i)] for i in common.comma_list(args.variants)] if args.variants else VARIANTS
    result = {**common.provenance(NAME), "model": args.model, "copies": args.copies, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, profile, options, cooldown in chosen:
            common.log(f"{label} ...")
            result["rows"][label] = spread(loaded, profile, options, cooldown, args.copies, Path(tmp))
            common.log(f"  {result['rows'][label]}")
    common.write_results(args.out, NAME, result, markdown(result))
    return common.finish(args.out, NAME, markdown(result), t0)


if __name__ == "__main__":
    sys.exit(main())
