"""Do a prune's medians match what a user's own ONNX Runtime session reads? The demo's two models, re-timed.

Opens a finished run's `baseline.onnx` and `model.onnx` each in an ONNX Runtime session with default
options (`onnxruntime.InferenceSession(path)`: the runtime's own threads and spinning, as an application
opens it, nothing of compressor's), and times each on its own, back to back like an inference loop:
warm-up, then `--runs` runs, alternating the two models `--repeats` times with a pause between (so one's
spinning threads are idle before the other runs). Goal (issue 22): each median within 10% of the
run's report.json median. Run it on an idle machine, after the demo:

    make demo DEMO_OUT=runs/demo && .venv/bin/python benchmarks/ort_as_deployed.py runs/demo
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import common
import numpy as np

NAME = "ort_as_deployed"
GOAL = 0.10
PAUSE_S = 0.5  # between two models' turns: far longer than ONNX Runtime's spinning after a run (~40 ms)


def time_alone(path: Path, runs: int) -> list[float]:
    """`runs` timed inferences (ms) of a default session on `path` (a seeded input of its static shape),
    after 50 untimed ones."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    feed = {first.name: np.random.default_rng(0).standard_normal(first.shape).astype(np.float32)}
    for _ in range(50):
        session.run(None, feed)
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        samples.append((time.perf_counter_ns() - t0) / 1e6)
    return samples


def main() -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("run", type=Path, help="a finished prune's output folder (report.json, baseline.onnx, "
                                               "model.onnx)")
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    t0 = time.perf_counter()
    report = json.loads((args.run / "report.json").read_text())
    samples: dict[str, list[float]] = {"baseline": [], "pruned": []}
    for _ in range(args.repeats):
        for side, file in (("baseline", "baseline.onnx"), ("pruned", "model.onnx")):
            samples[side] += time_alone(args.run / file, args.runs)
            time.sleep(PAUSE_S)
    rows = {}
    for side in samples:
        here = float(np.median(samples[side]))
        theirs = report[side]["latency_ms"]["median"]
        rows[side] = {"default_session_ms": here, "report_ms": theirs, "difference": here / theirs - 1,
                      "n": len(samples[side]), "met": abs(here / theirs - 1) <= GOAL}
    result = {**common.provenance(NAME), "run": str(args.run), "rows": rows,
              "report_profile": {k: report["profile"].get(k) for k in ("name", "threads", "runtime_options")}}
    lines = [f"Run {args.run}: profile {result['report_profile']}. A default `onnxruntime.InferenceSession` per "
             f"model, {args.repeats} x {args.runs} runs each, the models alternated with {PAUSE_S:g} s pauses.", "",
             "| model | default session median (ms) | report.json median (ms) | difference | goal |",
             "|---|---:|---:|---:|---|",
             *[f"| {side} | {r['default_session_ms']:.3f} | {r['report_ms']:.3f} | {r['difference']:+.1%} | "
               f"within {GOAL:.0%}: **{'met' if r['met'] else 'MISSED'}** |" for side, r in rows.items()]]
    markdown = common.document("ONNX Runtime as deployed: a default session against the report", result, lines)
    common.write_results(args.out, NAME, result, markdown)
    return common.finish(args.out, NAME, markdown, t0)


if __name__ == "__main__":
    sys.exit(main())
