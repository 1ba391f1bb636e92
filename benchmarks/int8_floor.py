"""INT8 as each runtime's own quantizer makes it: fidelity to fp32 on held-out images, and fp32 vs INT8 latency.

The figures behind the default fidelity floor (compressor.metrics.lossy.Floor, docs/quantization.md).
For each model/data case and each runtime (ONNX Runtime `quantize_static` QDQ S8S8 per-channel;
OpenVINO `nncf.quantize` PERFORMANCE/CPU), the folded model is quantized calibrated on 300 images of
the calibration (training) split, with the floor switched off and no fallback, and measured on the
held-out (validation) split against the fp32 model: top-1 agreement (all images, and those the fp32
model is confident about), SQNR of the logits, KL, accuracy where labelled; then the fp32 and INT8
artifacts are timed in one interleaved measurement on the runtime's profile (ort-cpu, openvino-cpu),
so the speedup is a ratio within one run. Speed figures from a busy machine are provisional.

    .venv/bin/python benchmarks/int8_floor.py --out benchmarks/results
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import common

from compressor.data import load_data
from compressor.latency.deploy import Deployment, deployable
from compressor.latency.profiles import load_profile
from compressor.metrics.lossy import Floor
from compressor.models.sources import load_model
from compressor.quantize import quantization_images, quantize_checked
from exporters.quantizer import QuantizeSettings

PROFILES = {"onnxruntime": "ort-cpu", "openvino": "openvino-cpu"}
OFF = Floor(min_top1_agreement=0.0, min_sqnr_db=-math.inf)  # measure everything, refuse nothing


def measure(case: str, runtime: str, method: str, calibration: int, workdir: Path) -> dict:
    """One case on one runtime: fidelity of the INT8 artifact and the interleaved fp32 / INT8 timing."""
    arch, data_spec = case.split(":", 1)
    data = load_data(data_spec)
    loaded = load_model(arch, data)
    images = quantization_images(data, calibration)
    dep = Deployment(load_profile(PROFILES[runtime]), loaded.input_shape)
    fp32 = dep.export(loaded.model, workdir / f"{arch}-{runtime}-fp32")
    t0 = time.perf_counter()
    q = quantize_checked(deployable(loaded.model), dep.example, runtime, workdir / f"{arch}-{runtime}-{method}",
                         images, QuantizeSettings(method=method), floor=OFF, fallback=())
    seconds = time.perf_counter() - t0
    timed = common.time_paths(dep, ["fp32", "int8"], [fp32, q.path])
    f = q.fidelity
    return {"case": case, "runtime": runtime, "method": method, "quantize_s": round(seconds, 1),
            "quantizer": q.quantizer, "fidelity": f.to_dict(), "floor_refuses": Floor().shortfalls(f),
            "fp32_ms": timed["fp32"]["latency_ms"]["median"], "int8_ms": timed["int8"]["latency_ms"]["median"],
            "speedup": timed["int8"]["speedup"], "speedup_round_spread": timed["int8"]["speedup_round_spread"]}


def row(r: dict) -> str:
    f = r["fidelity"]
    confident = (f"{f['confident_agreement']:.1f}% of {f['confident_images']}"
                 if f["confident_agreement"] is not None else "-")
    accuracy = (f"{f['reference_accuracy']:.1f} -> {f['accuracy']:.1f}%" if f["accuracy"] is not None else "-")
    sqnr = "inf" if f["sqnr_db"] is None else f"{f['sqnr_db']:.1f}"
    verdict = "refused: " + "; ".join(r["floor_refuses"]) if r["floor_refuses"] else "written"
    return (f"| {r['case']} | {r['runtime']} ({r['method']}) | {f['top1_agreement']:.1f}% | {confident} | {sqnr} | "
            f"{f['kl_divergence']:.4f} | {accuracy} | {r['fp32_ms']:.3f} -> {r['int8_ms']:.3f} ms: "
            f"{r['speedup']:.2f}x | {verdict} |")


def main(argv: list[str] | None = None) -> int:
    parser = common.argument_parser(__doc__)
    parser.add_argument("--cases", type=common.comma_list,
                        default="resnet56:digits32,efficientnet_lite0:photos,mobilenet_v2:digits32",
                        help="comma-separated MODEL:DATA (default: %(default)s)")
    parser.add_argument("--runtimes", type=common.comma_list, default="onnxruntime,openvino")
    parser.add_argument("--methods", type=common.comma_list, default="minmax",
                        help="ONNX Runtime calibration methods (minmax, entropy, percentile; NNCF uses its own)")
    parser.add_argument("--calibration-size", type=int, default=300)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = {**common.provenance("int8_floor"), "floor": Floor().to_dict(), "rows": []}
    lines = ["| model / data | runtime | top-1 agreement | confident agreement | SQNR dB | KL nats | accuracy "
             "| fp32 -> INT8 (interleaved) | default floor |", "|---|---|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="int8-floor-") as folder:
        for case in args.cases:
            for runtime in args.runtimes:
                for method in (args.methods if runtime == "onnxruntime" else ["minmax"]):
                    r = measure(case, runtime, method, args.calibration_size, Path(folder))
                    result["rows"].append(r)
                    lines.append(row(r))
                    common.log(lines[-1])
                    markdown = common.document("INT8 fidelity and speed per runtime", result, lines)
                    common.write_results(args.out, "int8_floor", result, markdown)
    return common.finish(args.out, "int8_floor", markdown, t0)


if __name__ == "__main__":
    sys.exit(main())
