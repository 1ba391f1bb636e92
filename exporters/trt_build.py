#!/usr/bin/env python3
"""Build a TensorRT engine from an ONNX file, check it against reference outputs, and time it.

Standalone (written into every TensorRT device bundle as build_engine.py):
needs Python 3.8+, numpy, the `tensorrt` package and an NVIDIA GPU with the
CUDA runtime library (libcudart). Timing follows the compressor protocol:
first run timed alone (cold start), warm-up (>= 10 runs and 0.5 s), then at
least --min-runs runs and --min-time-s seconds; GPU compute (CUDA events
around the enqueue) and host-to-host (input copy + compute + output copy,
perf_counter_ns) are reported separately, as trtexec does.

INT8 engines are judged like every INT8 artifact of compressor: on held-out images
(--held-out, their fp32 logits beside them) by top-1 agreement with the fp32 model and
the SQNR of the logits, against the floor (--min-agreement, --min-sqnr); below it the
engine is deleted, not kept. The engine's held-out logits are recorded (--held-out-outputs)
so that compressor can judge them again where the figures come back.

Exit codes: 0 ok, 2 bad input or tensorrt/GPU missing (one line on stderr),
3 the engine's outputs differ from the reference beyond tolerance, or an INT8
engine is below the fidelity floor on the held-out images.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from pathlib import Path

import numpy as np


class BuildError(Exception):
    """Bad input, or what this machine lacks (exit 2)."""


class MismatchError(Exception):
    """The engine disagrees with the reference outputs (exit 3)."""


class BelowFloorError(Exception):
    """An INT8 engine kept less fidelity to the fp32 model on the held-out images than the floor asks (exit 3)."""


# compressor.metrics.lossy's default floor and its two measures, again: this script runs on a device that has
# no compressor (tests/test_quantize_tensorrt.py checks that the two agree)
MIN_TOP1_AGREEMENT = 70.0  # %
MIN_SQNR_DB = 10.0  # dB


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Build, validate and time a TensorRT engine from an ONNX file.")
    p.add_argument("--onnx", required=True, help="ONNX model file")
    p.add_argument("--engine", required=True, help="engine file to write (refused if it exists, unless --force)")
    p.add_argument("--fp16", action="store_true", help="allow fp16 kernels (BuilderFlag.FP16)")
    p.add_argument("--int8", action="store_true",
                   help="allow int8 kernels, calibrated on --calibration (default: the reference inputs)")
    p.add_argument("--calibration", help=".npz of calibration batches, shape (k, *input shape), preprocessed as at "
                                         "inference (INT8 entropy calibration)")
    p.add_argument("--calibration-cache", help="INT8 calibration cache: read if present (no calibration run), "
                                               "written after calibrating")
    p.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace limit (MiB, default 1024)")
    p.add_argument("--timing-cache", help="timing cache file: read if present, written after the build")
    p.add_argument("--inputs", help=".npz of reference inputs, one array per input name, shape (k, *shape)")
    p.add_argument("--outputs", help=".npz of reference outputs, one array per output name, shape (k, *shape)")
    p.add_argument("--atol", type=float, default=1e-3, help="absolute tolerance")
    p.add_argument("--rtol", type=float, default=2e-2, help="tolerance relative to each reference value")
    p.add_argument("--range-rtol", type=float, default=1e-2, help="tolerance relative to max|reference|")
    p.add_argument("--min-runs", type=int, default=200, help="timed runs at least (default 200)")
    p.add_argument("--min-time-s", type=float, default=5.0, help="timed seconds at least (default 5)")
    p.add_argument("--held-out", help=".npz of held-out images in batches, shape (k, *input shape) ('input'), and the "
                                      "fp32 model's logits of them ('logits'): an INT8 engine is judged on them")
    p.add_argument("--min-agreement", type=float, default=MIN_TOP1_AGREEMENT,
                   help="INT8 floor: least top-1 agreement with fp32 on --held-out, %% (default: %(default)s)")
    p.add_argument("--min-sqnr", type=float, default=MIN_SQNR_DB,
                   help="INT8 floor: least SQNR of the logits against fp32, dB (default: %(default)s)")
    p.add_argument("--held-out-outputs", help=".npz to record the engine's logits of --held-out in ('logits')")
    p.add_argument("--report", help="JSON file for the validation and timing results")
    p.add_argument("--force", action="store_true", help="overwrite an existing engine file")
    args = p.parse_args(argv)
    if args.workspace_mb <= 0 or args.min_runs <= 0 or args.min_time_s < 0:
        p.error("--workspace-mb and --min-runs must be positive, --min-time-s non-negative")
    if (args.inputs is None) != (args.outputs is None):
        p.error("--inputs and --outputs go together")
    return args


def check_files(args: argparse.Namespace) -> None:
    """Every input file exists and every output folder is writable; BuildError otherwise."""
    for flag in ("onnx", "inputs", "outputs", "calibration", "held_out"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_file():
            raise BuildError(f"--{flag.replace('_', '-')} {value}: file not found")
    if Path(args.engine).exists() and not args.force:
        raise BuildError(f"--engine {args.engine} already exists; choose another path or pass --force")
    for value in (args.engine, args.timing_cache, args.report, args.calibration_cache, args.held_out_outputs):
        if value is not None and not Path(value).resolve().parent.is_dir():
            raise BuildError(f"{value}: its folder does not exist")


def load_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BuildError(f"the 'tensorrt' package is not importable here ({e}); run this on the device that has "
                         "TensorRT (JetPack on a Jetson, or `pip install tensorrt` beside an NVIDIA driver)") from e
    if int(trt.__version__.split(".")[0]) < 8:
        raise BuildError(f"TensorRT {trt.__version__} is too old; this script needs 8.5 or newer")
    return trt


class Cuda:
    """The few CUDA runtime calls needed, through ctypes (no pycuda / cuda-python needed)."""

    H2D, D2H = 1, 2

    def __init__(self) -> None:
        for name in ("libcudart.so", "libcudart.so.12", "libcudart.so.11.0", "cudart64_12.dll", "cudart64_110.dll"):
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        else:
            raise BuildError("the CUDA runtime library (libcudart) is not found; is the CUDA toolkit installed?")
        count = ctypes.c_int(0)
        if self.lib.cudaGetDeviceCount(ctypes.byref(count)) != 0 or count.value == 0:
            raise BuildError("no NVIDIA GPU is visible to the CUDA runtime")
        self.stream = ctypes.c_void_p()
        self._check(self.lib.cudaStreamCreate(ctypes.byref(self.stream)), "cudaStreamCreate")

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with CUDA error {status}")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(max(nbytes, 1))), "cudaMalloc")
        return ptr.value

    def copy(self, dst: int, src: int, nbytes: int, kind: int) -> None:
        self._check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), ctypes.c_size_t(nbytes),
                                             kind, self.stream), "cudaMemcpyAsync")

    def sync(self) -> None:
        self._check(self.lib.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def event(self) -> ctypes.c_void_p:
        ev = ctypes.c_void_p()
        self._check(self.lib.cudaEventCreate(ctypes.byref(ev)), "cudaEventCreate")
        return ev

    def record(self, ev: ctypes.c_void_p) -> None:
        self._check(self.lib.cudaEventRecord(ev, self.stream), "cudaEventRecord")

    def elapsed_ms(self, start: ctypes.c_void_p, end: ctypes.c_void_p) -> float:
        ms = ctypes.c_float()
        self._check(self.lib.cudaEventSynchronize(end), "cudaEventSynchronize")
        self._check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), start, end), "cudaEventElapsedTime")
        return float(ms.value)


def build_engine(trt, onnx_path: str, engine_path: str, fp16: bool = False, int8: bool = False,
                 workspace_mb: int = 1024, timing_cache: str | None = None,
                 calibration: np.ndarray | None = None, cuda: Cuda | None = None,
                 calibration_cache: str | None = None) -> dict:
    """Parse the ONNX file, build a serialized engine and write it; returns the build settings. INT8 calibrates
    on `calibration` (k batches), or reads `calibration_cache` where it exists (and writes it otherwise)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {onnx_path}: {errors[:400]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # fp32 means fp32; fp16/int8 are asked for explicitly
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        if calibration is None or cuda is None:
            raise BuildError("--int8 needs images to calibrate on (--calibration or --inputs)")
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = _calibrator(trt, calibration, cuda, calibration_cache)
    dynamic = [network.get_input(i) for i in range(network.num_inputs) if -1 in tuple(network.get_input(i).shape)]
    if dynamic:
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            shape = tuple(tensor.shape)
            if -1 in shape[1:]:
                raise BuildError(f"input {tensor.name!r} has dynamic dimensions other than the batch: {shape}")
            fixed = shape[1:]
            opt = calibration.shape[1] if calibration is not None else 1
            profile.set_shape(tensor.name, (1, *fixed), (opt, *fixed), (max(opt, 1), *fixed))
        config.add_optimization_profile(profile)
    cache_bytes = Path(timing_cache).read_bytes() if timing_cache and Path(timing_cache).is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT could not build an engine from {onnx_path} (see its log above)")
    Path(engine_path).write_bytes(bytes(serialized))
    if timing_cache:
        Path(timing_cache).write_bytes(bytes(config.get_timing_cache().serialize()))
    return {"tensorrt": trt.__version__, "fp16": fp16, "int8": int8, "tf32": False, "workspace_mb": workspace_mb,
            "timing_cache": timing_cache, "build_s": round(time.perf_counter() - t0, 2),
            "calibration": {"batches": int(len(calibration)), "cache": calibration_cache} if int8 else None}


def _calibrator(trt, batches: np.ndarray, cuda: Cuda, cache: str | None = None):
    """An entropy calibrator over `batches` (k, *input_shape): one batch per get_batch call; `cache` is the
    calibration cache file, read instead of calibrating where it exists, written after calibrating."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.batches = np.ascontiguousarray(batches, np.float32)
            self.index = 0
            self.device = cuda.malloc(self.batches[0].nbytes)

        def get_batch_size(self) -> int:
            return int(self.batches.shape[1])

        def get_batch(self, names):
            if self.index >= len(self.batches):
                return None
            batch = self.batches[self.index]
            cuda.copy(self.device, batch.ctypes.data, batch.nbytes, Cuda.H2D)
            cuda.sync()
            self.index += 1
            return [int(self.device)]

        def read_calibration_cache(self):
            return Path(cache).read_bytes() if cache and Path(cache).is_file() else None

        def write_calibration_cache(self, data) -> None:
            if cache:
                Path(cache).write_bytes(bytes(data))

    return Calibrator()


class EngineRunner:
    """One deserialized engine with device buffers for a fixed input shape."""

    def __init__(self, trt, engine_path: str, input_shape: tuple[int, ...], cuda: Cuda) -> None:
        self.cuda = cuda
        self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            Path(engine_path).read_bytes())
        if self.engine is None:
            raise BuildError(f"{engine_path} is not a TensorRT engine built for this TensorRT and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        if len(self.inputs) != 1:
            raise BuildError(f"expected one input tensor, the engine has {self.inputs}")
        self.context.set_input_shape(self.inputs[0], tuple(input_shape))
        self.host = {self.inputs[0]: np.zeros(input_shape, np.float32)}
        for n in self.outputs:
            self.host[n] = np.zeros(tuple(self.context.get_tensor_shape(n)), np.float32)
        self.device = {n: cuda.malloc(a.nbytes) for n, a in self.host.items()}
        for n, ptr in self.device.items():
            self.context.set_tensor_address(n, ptr)

    def compute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream.value or 0):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def infer(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Host-to-host: copy in, compute, copy out, synchronise."""
        src = np.ascontiguousarray(x, np.float32)
        self.cuda.copy(self.device[self.inputs[0]], src.ctypes.data, src.nbytes, Cuda.H2D)
        self.compute()
        for n in self.outputs:
            self.cuda.copy(self.host[n].ctypes.data, self.device[n], self.host[n].nbytes, Cuda.D2H)
        self.cuda.sync()
        return {n: self.host[n].copy() for n in self.outputs}


def compare(got: np.ndarray, expected: np.ndarray, name: str, atol: float, rtol: float, range_rtol: float) -> float:
    """Largest |difference| (inf where `got` holds NaN or Inf); MismatchError naming the output unless,
    elementwise, |got - expected| <= atol + rtol * |expected| + range_rtol * max|expected|. The one tolerance
    check: every exporter's (exporters.Exporter.check_close) calls it too."""
    if got.shape != expected.shape:
        raise MismatchError(f"output {name!r} has shape {got.shape}, the reference has {expected.shape}")
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    worst = float(np.nanmax(diff)) if diff.size else 0.0
    if diff.size and not np.all(np.isfinite(got)):
        worst = float("inf")
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    if not np.all(diff <= atol + rtol * np.abs(expected) + range_rtol * scale):
        ranged = f" + {range_rtol:g}*max|reference|" if range_rtol else ""
        raise MismatchError(f"output {name!r} differs from the reference by up to {worst:.3g} "
                            f"(tolerance {atol:g} + {rtol:g}*|reference|{ranged})")
    return worst


def validate(runner: EngineRunner, inputs: np.ndarray, outputs: dict[str, np.ndarray], atol: float, rtol: float,
             range_rtol: float) -> dict[str, float]:
    """Run every reference input; the largest difference per output."""
    worst = {n: 0.0 for n in outputs}
    for i, x in enumerate(inputs):
        got = runner.infer(x)
        for n, expected in outputs.items():
            if n not in got:
                raise MismatchError(f"the engine has no output {n!r}; it has {sorted(got)}")
            worst[n] = max(worst[n], compare(got[n], expected[i], n, atol, rtol, range_rtol))
    return worst


def lossy_fidelity(reference: np.ndarray, logits: np.ndarray) -> dict:
    """Top-1 agreement (%) and logit SQNR (dB: 10 log10(sum r^2 / sum (r - q)^2)) of `logits` against the fp32
    `reference` (N x classes each), as compressor.metrics.lossy measures them."""
    r, q = np.asarray(reference, np.float64), np.asarray(logits, np.float64)
    if r.shape != q.shape or r.ndim != 2 or len(r) == 0:
        raise MismatchError(f"held-out logits of shape {q.shape} for fp32 logits of shape {r.shape}")
    noise, signal = float(np.sum((r - q) ** 2)), float(np.sum(r ** 2))
    sqnr = float("inf") if noise == 0 else (10.0 * float(np.log10(signal / noise)) if signal > 0 else float("-inf"))
    return {"images": len(r), "top1_agreement": 100.0 * float(np.mean(r.argmax(1) == q.argmax(1))), "sqnr_db": sqnr}


def shortfalls(fidelity: dict, min_agreement: float, min_sqnr: float) -> list[str]:
    """Why `fidelity` is below the floor, one phrase per measure missed (compressor's Floor.shortfalls)."""
    out = []
    if not fidelity["top1_agreement"] >= min_agreement:  # `not >=`: NaN fails
        out.append(f"top-1 agreement {fidelity['top1_agreement']:.1f}% < {min_agreement:g}%")
    if not fidelity["sqnr_db"] >= min_sqnr:
        out.append(f"SQNR {fidelity['sqnr_db']:.1f} dB < {min_sqnr:g} dB")
    return out


def judge_held_out(runner: EngineRunner, batches: np.ndarray, reference: np.ndarray, min_agreement: float,
                   min_sqnr: float) -> tuple[dict, np.ndarray]:
    """Run the engine on every held-out batch (k, *input shape): (fidelity against `reference`, the fp32 logits
    (k x batch x classes or N x classes), with fidelity["floor"]["below"] listing what misses the floor (empty:
    it clears); the engine's logits, N x classes)."""
    logits = np.concatenate([runner.infer(b)[runner.outputs[0]] for b in batches])
    fidelity = lossy_fidelity(np.asarray(reference).reshape(len(logits), -1), logits)
    fidelity["floor"] = {"min_top1_agreement": min_agreement, "min_sqnr_db": min_sqnr,
                         "below": shortfalls(fidelity, min_agreement, min_sqnr)}
    return fidelity, logits


def floor_message(fidelity: dict) -> str:
    """The one line refusing an engine below the floor."""
    return (f"INT8 engine is below the fidelity floor on {fidelity['images']} held-out images: "
            f"{'; '.join(fidelity['floor']['below'])}")


def _stats(samples: list[float]) -> dict:
    a = np.asarray(samples)
    q25, q50, q75, q90, q99 = np.percentile(a, [25, 50, 75, 90, 99])
    return {"median": float(q50), "min": float(a.min()), "p90": float(q90), "p99": float(q99),
            "iqr": float(q75 - q25), "n": len(a)}


def time_engine(runner: EngineRunner, x: np.ndarray, min_runs: int, min_time_s: float) -> dict:
    """GPU compute (CUDA events) and host-to-host (perf_counter_ns) latency in ms, measured separately."""
    t0 = time.perf_counter_ns()
    runner.infer(x)
    cold = (time.perf_counter_ns() - t0) / 1e6
    end, n = time.perf_counter() + 0.5, 0
    while n < 10 or time.perf_counter() < end:
        runner.infer(x)
        n += 1
    host: list[float] = []
    end = time.perf_counter() + min_time_s
    while len(host) < min_runs or time.perf_counter() < end:
        t0 = time.perf_counter_ns()
        runner.infer(x)
        host.append((time.perf_counter_ns() - t0) / 1e6)
    start_ev, end_ev = runner.cuda.event(), runner.cuda.event()
    gpu: list[float] = []
    end = time.perf_counter() + min_time_s
    while len(gpu) < min_runs or time.perf_counter() < end:
        runner.cuda.record(start_ev)
        runner.compute()
        runner.cuda.record(end_ev)
        gpu.append(runner.cuda.elapsed_ms(start_ev, end_ev))
    return {"cold_ms": cold, "host_to_host_ms": _stats(host), "gpu_compute_ms": _stats(gpu)}


def held_out_verdict(args: argparse.Namespace, runner: EngineRunner, report: dict) -> dict:
    """Judge the INT8 engine on --held-out against the floor, recording its logits (--held-out-outputs) either
    way; below the floor the engine file is deleted, the figures written (--report), BelowFloorError raised."""
    with np.load(args.held_out) as f:
        batches, reference = f["input"], f["logits"]
    fidelity, logits = judge_held_out(runner, batches, reference, args.min_agreement, args.min_sqnr)
    if args.held_out_outputs:
        np.savez(args.held_out_outputs, logits=logits)
    if fidelity["floor"]["below"]:
        Path(args.engine).unlink(missing_ok=True)
        if args.report:
            Path(args.report).write_text(json.dumps({**report, "held_out": fidelity, "refused": True}, indent=2))
        raise BelowFloorError(floor_message(fidelity))
    print(f"INT8 on {fidelity['images']} held-out images: top-1 agreement {fidelity['top1_agreement']:.1f}%, "
          f"SQNR {fidelity['sqnr_db']:.1f} dB (floor {args.min_agreement:g}%, {args.min_sqnr:g} dB)")
    return fidelity


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        check_files(args)
        trt = load_tensorrt()
        cuda = Cuda()
        inputs = outputs = None
        if args.inputs:
            with np.load(args.inputs) as f:
                inputs = f["input"] if "input" in f else f[f.files[0]]
            with np.load(args.outputs) as f:
                outputs = {k: f[k] for k in f.files if k != "input"}
        calibration = inputs
        if args.calibration:
            with np.load(args.calibration) as f:
                calibration = f["input"] if "input" in f else f[f.files[0]]
        build = build_engine(trt, args.onnx, args.engine, args.fp16, args.int8, args.workspace_mb,
                             args.timing_cache, calibration, cuda, args.calibration_cache)
        print(f"built {args.engine} in {build['build_s']} s (TensorRT {trt.__version__}, fp16={args.fp16}, "
              f"int8={args.int8}, workspace {args.workspace_mb} MiB)")
        shape = tuple(inputs.shape[1:]) if inputs is not None else None
        if shape is None:
            raise BuildError("--inputs is needed to validate and time the engine (it fixes the input shape)")
        runner = EngineRunner(trt, args.engine, shape, cuda)
        worst = validate(runner, inputs, outputs, args.atol, args.rtol, args.range_rtol)
        print("validated against the reference outputs: " + ", ".join(f"{n} max |diff| {d:.3g}"
                                                                      for n, d in worst.items()))
        report = {"build": build, "max_abs_diff": worst}
        if args.int8 and args.held_out:
            report["held_out"] = held_out_verdict(args, runner, report)
        timing = time_engine(runner, inputs[0], args.min_runs, args.min_time_s)
        print(f"GPU compute median {timing['gpu_compute_ms']['median']:.4f} ms, host-to-host median "
              f"{timing['host_to_host_ms']['median']:.4f} ms (n={timing['host_to_host_ms']['n']})")
        if args.report:
            Path(args.report).write_text(json.dumps({**report, "timing": timing}, indent=2))
        return 0
    except BuildError as e:
        print(f"build_engine: error: {e}", file=sys.stderr)
        return 2
    except MismatchError as e:
        print(f"build_engine: validation failed: {e}", file=sys.stderr)
        return 3
    except BelowFloorError as e:
        print(f"build_engine: refused: {e}; {args.engine} removed", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
