"""Depth, INT8 and both: `compressor prune --precision auto` at several speedups, per model and runtime.

Each case is one prune with precision as a search dimension (docs/quantization.md). Its report holds
what each way measured on the target runtime: depth alone (the fp32 search's best set), INT8 alone
(the probe: the unpruned model quantized), and depth with INT8 (the INT8 search's set), each with
the fidelity it loses before fine-tuning (KL from the unpruned model on check images); then what was
delivered after fine-tuning, with its final interleaved measurement and its held-out fidelity:
accuracy where the data is labelled (digits32), top-1 agreement with the unpruned model (also where
the unpruned model is confident) and KL on the photos.

    .venv/bin/python benchmarks/precision_at_speedup.py --cases resnet56:digits32,efficientnet_lite0:photos \\
        --profiles ort-cpu,openvino-cpu --levels 1.3,1.5,2,3

`--reports a/report.json,b/report.json` tabulates finished `compressor prune --precision auto` runs instead.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import common

import compressor


def run_case(model: str, data: str, profile: str, level: float, epochs: int | None) -> dict:
    options = {} if epochs is None else {"finetune_epochs": epochs}
    with tempfile.TemporaryDirectory(prefix="precision-") as tmp:
        report = compressor.prune(model, data=data, target=compressor.Speedup(level), profile=profile,
                                  out=Path(tmp) / "run", precision="auto", log=lambda s: common.log(f"    {s}"),
                                  **options).report
    return summarize(report)


def summarize(r: dict) -> dict:
    """One table row from a `prune --precision auto` report (report.json)."""
    searched = r["precision"]["searched"] or {}
    probe, final = searched.get("probe") or {}, r["precision"]["final_int8"] or {}
    int8_search = searched.get("search") or {}
    joint = next((t for t in int8_search.get("trials", []) if t["passed"] and t["removed"] == int8_search["removed"]),
                 None)  # the INT8 search's choice
    after = r["fidelity"]["after_finetune"]
    held_out = final.get("against_unpruned") if r["precision"]["delivered"] == "int8" else {
        "top1_agreement": after["top1_agreement"], "kl_divergence": after["kl_divergence"],
        "confident_agreement": after["confident_agreement"], "accuracy": r["pruned"]["accuracy"]}
    int8_only = {"speedup": probe.get("speedup"), "declined": probe.get("declined"), "fidelity": probe.get("fidelity")}
    depth = searched.get("fp32")
    if r["precision"]["asked"] == "fp32":  # a depth-only run: the trial of the set it removed is the depth figure
        chosen = next(t for t in r["search"]["trials"] if set(t["removed"]) == set(r["removed_units"]))
        depth = {"removed": r["removed_units"], "passed": chosen["passed"], "speedup": chosen["speedup"]}
        int8_only["declined"] = "not asked"
    return {"model": r["model"], "data": r["data"], "profile": r["profile"]["name"], "level": r["target_speedup"],
            "asked": r["precision"]["asked"], "delivered": r["precision"]["delivered"], "depth": depth,
            "int8_only": int8_only,
            "joint": None if joint is None else {"removed": joint["removed"], "kl": int8_search.get("kl"),
                                                 "speedup": _joint_speedup(joint, probe)},
            "fp32_floor": r["search"]["floor"]["baseline_ms"] / r["search"]["floor"]["candidate_ms"],
            "final": {"speedup_measured": r["speedup_measured"], "speedup_flops": r["speedup_flops"],
                      "target_met": r["target_met"], "removed": r["removed_units"], "held_out": held_out,
                      "baseline_accuracy": r["baseline"]["accuracy"]},
            "seconds": r["seconds"]}


def _joint_speedup(joint: dict, probe: dict) -> float:
    """The INT8 search's chosen set against fp32, as measured in the search (reports before the INT8
    candidates were timed against fp32 give it against the unpruned INT8 model: chained with the probe)."""
    if "speedup" in joint:
        return joint["speedup"]
    if not joint["removed"]:
        return probe["speedup"]
    return probe["fp32_ms"] / joint["int8_ms"] * (joint["int8_unpruned_ms"] / probe["int8_ms"])


def _fidelity(f: dict | None) -> str:
    if not f:
        return ""
    if f.get("accuracy") is not None:
        return f"acc {f['accuracy']:.1f}%"
    confident = f" ({f['confident_agreement']:.0f}% conf.)" if f.get("confident_agreement") is not None else ""
    return f"agree {f['top1_agreement']:.1f}%{confident}, KL {f['kl_divergence']:.3f}"


def render(result: dict) -> str:
    lines = ["Speedups are measured on the runtime in interleaved rounds (depth and joint: during the search, "
             "before fine-tuning; delivered: the final measurement). KL: nats per image from the unpruned model "
             "on check images, before fine-tuning. Held-out fidelity is of the delivered model after fine-tuning.",
             "", "| model | runtime | target | depth only: x (KL) | INT8 only: x | depth + INT8: x (KL) | delivered "
             "| measured x | FLOP x | held-out fidelity | time |", "|---|---|---:|---|---|---|---|---:|---:|---|---:|"]
    for c in result["cases"]:
        if "error" in c:
            lines.append(common.failed_row([c["model"], c["profile"], f"{c['level']:g}x"], c["error"], 11))
            continue
        d, i, j, f = c["depth"] or {}, c["int8_only"], c["joint"], c["final"]
        depth = f"{d['speedup']:.2f} ({d['kl']:.3f})" if d.get("kl") is not None else (
            f"{d['speedup']:.2f}" if d.get("speedup") else
            "not searched" if c.get("asked") == "int8" else
            f"unreachable ({c['fp32_floor']:.2f} at most)" if c.get("fp32_floor") else "")
        if d and d.get("passed") is False:
            depth += " (missed)"
        int8 = (i["declined"] if i["declined"] == "not asked" else "declined") if i["speedup"] in (None, 0.0) else (
            f"{i['speedup']:.2f}" + (" (declined)" if i["declined"] else ""))
        joint = ("INT8 alone, no removal" if j and not j["removed"] else
                 f"{j['speedup']:.2f}, {len(j['removed'])} units ({j['kl']:.3f})" if j and j.get("kl") is not None
                 else "-")
        asked = "" if c.get("asked", "auto") == "auto" else f" ({c['asked']})"
        lines.append(f"| {c['model']} | {c['profile']} | {c['level']:g}x{asked} | {depth} | {int8} | {joint} | "
                     f"{c['delivered']}, {len(f['removed'])} units | {f['speedup_measured']:.2f}"
                     f"{'' if f['target_met'] else ' (missed)'} | {f['speedup_flops']:.2f} | "
                     f"{_fidelity(f['held_out'])} | {c['seconds']:.0f} s |")
    return common.document("Depth, INT8 and both, chosen by measurement", result, lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--cases", type=common.comma_list, default="resnet56:digits32,efficientnet_lite0:photos",
                        help="comma-separated MODEL:DATA (default: %(default)s)")
    parser.add_argument("--profiles", type=common.comma_list, default="ort-cpu,openvino-cpu")
    parser.add_argument("--levels", type=common.float_list, default="1.3,1.5,2,3")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="default: prune's")
    parser.add_argument("--reports", type=common.comma_list, default=None,
                        help="report.json files of `compressor prune --precision auto` runs: tabulate them instead")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = {**common.provenance("precision_at_speedup"), "cases": []}
    if args.reports:
        result["cases"] = [summarize(json.loads(Path(p).read_text())) for p in args.reports]
        result["reports"] = args.reports
        markdown = render(result)
        common.write_results(args.out, "precision_at_speedup", result, markdown)
        return common.finish(args.out, "precision_at_speedup", markdown, t0)
    for case in args.cases:
        model, _, data = case.partition(":")
        for profile in args.profiles:
            for level in args.levels:
                common.log(f"[{model} {profile} {level:g}x] prune --precision auto")
                try:
                    result["cases"].append(run_case(model, data, profile, level, args.finetune_epochs))
                except compressor.CompressorError as e:
                    result["cases"].append({"model": model, "data": data, "profile": profile, "level": level,
                                            "error": f"{type(e).__name__}: {e}"})
                markdown = render(result)
                common.write_results(args.out, "precision_at_speedup", result, markdown)
    return common.finish(args.out, "precision_at_speedup", markdown, t0)


if __name__ == "__main__":
    sys.exit(main())
