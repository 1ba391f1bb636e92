"""Transformers and a YOLO-style detector pruned to a measured speedup, by residual branches and blocks.

Models: `vit_digits` (trained here on digits32, fine-tuned after pruning), timm's
`deit_tiny_patch16_224`, `swin_tiny_patch4_window7_224` and `mobilevit_xxs` (random
weights, nothing downloaded: latency and FLOPs only, no fine-tuning, fidelity not
reported) and `det_digits` (trained here on digit canvases, two outputs, pruned on
images alone). Each is one `compressor.prune` call per target and profile; every
artifact is validated against torch by the job itself.

    .venv/bin/python benchmarks/transformers_at_speedup.py --targets 1.3,1.5 --profiles ort-cpu,openvino-cpu

`--reports NAME=runs/x/report.json,...` tabulates finished prunes (the CLI's or `compressor.prune`'s)
instead, NAME being one of the models above.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common

import compressor


@dataclass(frozen=True)
class Subject:
    """A model as the CLI names it, its data, and how it is pruned."""

    model: str
    data: str
    trained: bool  # weights trained here: fine-tuned after pruning, fidelity reported
    finetune_epochs: int = 0


SUBJECTS = {
    "vit_digits": Subject("vit_digits", "digits32", True, 4),
    "deit_tiny": Subject("timm:deit_tiny_patch16_224", "photos", False),
    "swin_tiny": Subject("timm:swin_tiny_patch4_window7_224", "photos", False),
    "mobilevit_xxs": Subject("timm:mobilevit_xxs", "photos", False),
    "det_digits": Subject("det_digits", "digit_canvas", True, 4),
}


def _fidelity(report: dict) -> str:
    f = report["fidelity"]["after_finetune"]
    if report["pruned"].get("accuracy") is not None and report["baseline"].get("accuracy") is not None:
        return f"accuracy {report['baseline']['accuracy']:.2f} -> {report['pruned']['accuracy']:.2f}%"
    if f.get("top1_agreement") is not None:
        return f"top-1 agreement {f['top1_agreement']:.1f}%"
    return "; ".join(f"{name}: cosine {v['cosine_similarity']:.3f}, NMSE {v['normalised_mse']:.3f}"
                     for name, v in (f.get("per_output") or {}).items())


def run_one(name: str, subject: Subject, target: float, profile: str, calibration: int) -> dict:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"tf-{name}-") as tmp:
        result = compressor.prune(subject.model, data=subject.data, target=compressor.Speedup(target),
                                  profile=profile, out=Path(tmp) / "run", finetune_epochs=subject.finetune_epochs,
                                  calibration_size=calibration, log=lambda s: common.log(f"    {s}"))
    return summarize(name, subject, result.report, time.perf_counter() - t0)


def summarize(name: str, subject: Subject, r: dict, seconds: float) -> dict:
    """One row from a prune's report."""
    kinds: dict[str, int] = {}
    for u in r["units"]:
        kinds[u["kind"]] = kinds.get(u["kind"], 0) + 1
    return {"model": name, "spec": subject.model, "target": r["target_speedup"], "profile": r["profile"]["name"],
            "units": kinds,
            "removed": r["removed_units"], "baseline_ms": r["baseline"]["latency_ms"]["median"],
            "pruned_ms": r["pruned"]["latency_ms"]["median"], "speedup_measured": r["speedup_measured"],
            "speedup_flops": r["speedup_flops"], "target_met": r["target_met"],
            "artifact_max_abs_error": r["checks"]["artifact_max_abs_error"],
            "fidelity": _fidelity(r) if subject.trained else None, "seconds": seconds}


def render(result: dict) -> str:
    lines = ["Batch 1; `cka` on the calibration images; timm models have random weights (latency and FLOPs only, "
             "no fine-tuning), the models trained here are fine-tuned by distillation after pruning.", "",
             "| model | profile | target | units | removed | ms (unpruned -> pruned) | measured x | FLOP x | "
             "measured / FLOP | met | fidelity | wall time |",
             "|---|---|---:|---|---|---|---:|---:|---:|---|---|---:|"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(common.failed_row([r["model"], r["profile"], r["target"], "", ""], r["error"], 12))
            continue
        units = ", ".join(f"{n} {k}" for k, n in r["units"].items())
        lines.append(f"| {r['model']} | {r['profile']} | {r['target']} | {units} | {', '.join(r['removed'])} | "
                     f"{r['baseline_ms']:.3f} -> {r['pruned_ms']:.3f} | {r['speedup_measured']:.2f} | "
                     f"{r['speedup_flops']:.2f} | {r['speedup_measured'] / r['speedup_flops']:.2f} | "
                     f"{'yes' if r['target_met'] else 'NO'} | {r['fidelity'] or '(random weights)'} | "
                     f"{r['seconds']:.0f} s |")
    lines += ["", "Every artifact was validated against torch before it was written (ONNX and OpenVINO: atol 1e-4 + "
              "rtol 1e-3 on every output)."]
    return common.document("Transformers and a detector at a measured speedup", result, lines)


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__, calibration=128)
    parser.add_argument("--models", type=common.comma_list, default=",".join(SUBJECTS))
    parser.add_argument("--targets", type=common.float_list, default=[1.3, 1.5])
    parser.add_argument("--profiles", type=common.comma_list, default=["ort-cpu", "openvino-cpu"])
    parser.add_argument("--reports", type=common.comma_list, default=None,
                        help="NAME=report.json,...: tabulate finished prunes instead of running them")
    args = parser.parse_args(argv)
    if args.reports:
        return _tabulate(parser, args)
    unknown = [m for m in args.models if m not in SUBJECTS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(SUBJECTS)}")
    t0 = time.perf_counter()
    result = {**common.provenance("transformers_at_speedup"), "runs": []}
    markdown = render(result)
    for name in args.models:
        for profile in args.profiles:
            for target in args.targets:
                common.log(f"[{name}] {target}x on {profile}")
                try:
                    result["runs"].append(run_one(name, SUBJECTS[name], target, profile, args.calibration_size))
                except compressor.CompressorError as e:
                    result["runs"].append({"model": name, "profile": profile, "target": target,
                                           "error": f"{type(e).__name__}: {e}"})
                markdown = render(result)
                common.write_results(args.out, "transformers_at_speedup", result, markdown)
    return common.finish(args.out, "transformers_at_speedup", markdown, t0)


def _tabulate(parser, args) -> int:
    t0 = time.perf_counter()
    result = {**common.provenance("transformers_at_speedup"), "runs": [], "reports": args.reports}
    for item in args.reports:
        name, _, path = item.partition("=")
        if name not in SUBJECTS or not path:
            parser.error(f"--reports: {item!r} is not NAME=report.json with NAME one of {', '.join(SUBJECTS)}")
        report = json.loads(Path(path).read_text())
        result["runs"].append(summarize(name, SUBJECTS[name], report, report["seconds"]))
    markdown = render(result)
    common.write_results(args.out, "transformers_at_speedup", result, markdown)
    return common.finish(args.out, "transformers_at_speedup", markdown, t0)


if __name__ == "__main__":
    sys.exit(main())
