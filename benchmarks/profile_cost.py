"""Wall time of `compressor profile`: the latency table of a model, per unit, as a user runs it.

Each model is loaded once first (a zoo model other than the bundled resnet56 is trained on digits32 and
cached on first use), so the figure is the command's own: starting Python, finding the units, exporting
and timing the designed removal sets, fitting, writing the table. Goals (issue 22): at most 1 s per
unit on resnet110 (54 units) and at most 30 s on resnet56, on ort-cpu. Run it on an idle machine:

    .venv/bin/python benchmarks/profile_cost.py --models resnet56,resnet110 --profile ort-cpu
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

from compressor.data import load_data
from compressor.models.sources import load_model

NAME = "profile_cost"
GOALS = {"resnet56": ("total", 30.0), "resnet110": ("per_unit", 1.0)}


def profile_once(model: str, profile: str, data: str, folder: Path, run: int = 0) -> dict:
    """`compressor profile` in a fresh process: its wall time and what the table says of itself."""
    out = folder / f"{model}-{run}.json"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "compressor.cli.main", "profile", "--model", model, "--data", data,
                           "--profile", profile, "--out", str(out)], capture_output=True, text=True,
                          cwd=common.HERE.parent)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        common.log(done.stderr[-3000:])
        msg = f"compressor profile {model} failed with exit {done.returncode}"
        raise SystemExit(msg)
    table = json.loads(out.read_text())
    units = len(table["savings_ms"])
    common.log(f"{model}: {seconds:.1f} s for {units} units ({seconds / units:.2f} s per unit); "
               f"{table['design']['sets']} sets; {table['design']['stopped']}")
    return {"model": model, "seconds": seconds, "units": units, "per_unit": seconds / units,
            "table_seconds": table["seconds"], "sets": table["design"]["sets"],
            "sessions": len(table["design"]["sessions"]), "stopped": table["design"]["stopped"],
            "groups": sum(t["kind"] == "group" for t in table["latency_model"]["terms"]), "run": run,
            "parallel_speedup": table["machine"].get("parallel_speedup"),
            "log": done.stderr.strip().splitlines()[-12:]}


def markdown(result: dict) -> str:
    lines = [f"`compressor profile --profile {result['profile']}` per model, in a fresh process, after the model "
             "was loaded (and cached) once.", "",
             "| model | run | units | groups | designed sets | sessions | parallel probe (median) | wall time (s) | "
             "s per unit | goal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        goal = GOALS.get(r["model"])
        verdict = "-" if goal is None else (
            f"{'total' if goal[0] == 'total' else 'per unit'} <= {goal[1]:g} s: "
            f"**{'met' if r[goal[0] if goal[0] == 'per_unit' else 'seconds'] <= goal[1] else 'MISSED'}**")
        probe = (r.get("parallel_speedup") or {}).get("median")
        lines.append(f"| {r['model']} | {r.get('run', 0) + 1} | {r['units']} | {r['groups']} | {r['sets']} | "
                     f"{r['sessions']} | {'-' if probe is None else f'{probe:.2f}x'} | {r['seconds']:.1f} | "
                     f"{r['per_unit']:.2f} | {verdict} |")
    lines += ["", *(f"- {r['model']} run {r.get('run', 0) + 1}: stopped: {r['stopped']}." for r in result["rows"])]
    lines += ["- Parallel probe: the runtime's threads' speed over one thread's during the table "
              "(docs/measurement.md); the slow state of this VM reads about 0.44x."]
    return common.document("Cost of a latency table", result, lines, source=True)


def main() -> int:
    parser = common.argument_parser(__doc__, models="resnet56,resnet110")
    parser.add_argument("--profile", default="ort-cpu")
    parser.add_argument("--data", default="digits32")
    parser.add_argument("--repeats", type=int, default=1, help="runs per model, the models in turn")
    args = parser.parse_args()
    t0 = time.perf_counter()
    data = load_data(args.data)
    for model in args.models:
        load_model(model, data)  # trained and cached now, not inside the timed command
    result = {**common.provenance(NAME), "profile": args.profile, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.repeats):
            for model in args.models:
                result["rows"].append(profile_once(model, args.profile, args.data, Path(tmp), run))
    common.write_results(args.out, NAME, result, markdown(result))
    return common.finish(args.out, NAME, markdown(result), t0)


if __name__ == "__main__":
    sys.exit(main())
