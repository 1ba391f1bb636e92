"""Does the demo still meet 2x, measuring no more candidates than before? Two finished demo runs compared.

    make demo DEMO_OUT=runs/demo                       # on this branch
    (cd /path/to/main/checkout && make demo DEMO_OUT=runs/demo-main)
    .venv/bin/python benchmarks/demo_check.py runs/demo --before /path/to/main/checkout/runs/demo-main

Goal (issue 22): the target met, and no more candidates measured by the search than the run before.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import common

NAME = "demo_check"


def summary(folder: Path) -> dict:
    r = json.loads((folder / "report.json").read_text())
    search = r["search"]
    return {"run": str(folder), "target_speedup": r["target_speedup"], "target_met": r["target_met"],
            "speedup_measured": r["speedup_measured"], "candidates": len(search["trials"]),
            "removed": len(r["removed_units"]), "seconds": r["seconds"],
            "baseline_ms": r["baseline"]["latency_ms"]["median"], "pruned_ms": r["pruned"]["latency_ms"]["median"],
            "table_error": search.get("table_error", {})}


def main() -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("run", type=Path, help="the demo's output folder on this branch")
    parser.add_argument("--before", type=Path, help="a demo's output folder from before (main)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    now = summary(args.run)
    before = summary(args.before) if args.before else None
    ok = now["target_met"] and (before is None or now["candidates"] <= before["candidates"])
    result = {**common.provenance(NAME), "now": now, "before": before, "met": ok}
    rows = [("now", now)] + ([("before", before)] if before else [])
    lines = ["| run | target | met | measured speedup | candidates measured | units removed | baseline -> pruned "
             "(ms) | table MAPE (raw) | seconds |", "|---|---:|---|---:|---:|---:|---|---:|---:|",
             *[f"| {k} ({r['run']}) | {r['target_speedup']}x | {r['target_met']} | {r['speedup_measured']:.2f}x | "
               f"{r['candidates']} | {r['removed']} | {r['baseline_ms']:.3f} -> {r['pruned_ms']:.3f} | "
               f"{r['table_error'].get('mape', float('nan')):.1%} | {r['seconds']:.0f} |" for k, r in rows],
             "", f"Goal (met, and no more candidates than before): **{'met' if ok else 'MISSED'}**."]
    markdown = common.document("The demo: target and candidates measured", result, lines)
    common.write_results(args.out, NAME, result, markdown)
    return common.finish(args.out, NAME, markdown, t0)


if __name__ == "__main__":
    sys.exit(main())
