"""pytest-benchmark suite for exported artifacts: copy it into your CI to catch latency regressions.

Each artifact is opened with the session settings (docs/measurement.md) of a compressor
profile (explicit intra-op threads, sequential execution, ORT_ENABLE_ALL, no
spinning for ONNX Runtime; LATENCY hint and one sync request for OpenVINO),
its input prepared once outside the timed region, and one inference timed per
round with time.perf_counter after a warm-up.

    export COMPRESSOR_ARTIFACTS="runs/r56/model.onnx,runs/r56/baseline.onnx"
    export COMPRESSOR_PROFILE=ort-cpu          # optional: built-in name or YAML path (default ort-cpu)

    # on the reference commit: measure and store the run under .benchmarks/
    pytest benchmarks/test_latency.py --benchmark-autosave

    # on the candidate: compare with the last saved run and fail on a >10% slower median
    pytest benchmarks/test_latency.py --benchmark-compare --benchmark-compare-fail=median:10%

pytest-benchmark's comparison is a plain threshold on two separate runs; on
a shared CI machine medians drift 10% or more between runs (docs/measurement.md).
`compressor bench --artifact NEW --against OLD` times both in interleaved
rounds and applies asv's rule (ratio > threshold AND Mann-Whitney p < 0.002),
which is the sturdier gate. Not collected by the main test run
(testpaths = ["tests"]); with COMPRESSOR_ARTIFACTS unset every case is skipped.
"""

from __future__ import annotations

import os
import time

import pytest

ARTIFACTS = [a.strip() for a in os.environ.get("COMPRESSOR_ARTIFACTS", "").split(",") if a.strip()]
PROFILE = os.environ.get("COMPRESSOR_PROFILE", "ort-cpu")

CASES = [pytest.param(a, id=os.path.basename(a)) for a in ARTIFACTS] or [
    pytest.param(None, marks=pytest.mark.skip(reason="set COMPRESSOR_ARTIFACTS=a.onnx,b.onnx to benchmark artifacts"),
                 id="no-artifacts")]


@pytest.mark.parametrize("artifact", CASES)
@pytest.mark.benchmark(group="inference", min_rounds=200, warmup=True, warmup_iterations=10,
                       timer=time.perf_counter, disable_gc=True)
def test_inference_latency(benchmark, artifact):
    from compressor.jobs.bench import open_artifact
    from compressor.latency.profiles import load_profile

    profile = load_profile(PROFILE)
    opened = open_artifact(artifact, profile)  # session prepared with a fixed input, one untimed run done
    benchmark.extra_info.update({"profile": profile.to_dict(), "input_shape": list(opened.input_shape),
                                 "sha256": opened.files.get(str(opened.path)),
                                 "session": getattr(opened.session, "settings", {})})
    benchmark(opened.session)
