"""TensorRT: a real engine where `tensorrt` and an NVIDIA GPU are present, else a device bundle.

Either way the ONNX file is exported and validated in ONNX Runtime against
torch first. With TensorRT here, the engine is built, validated and timed by
exporters/trt_build.py (the TensorRT Python API). Without it, the same file
goes into a bundle as build_engine.py, beside model.onnx, reference.npz
(inputs + ONNX Runtime outputs), trtexec.sh and bundle.json, to be built and
checked on the device. `outcome` says which happened. Nothing is faked: no
engine and no timing is ever reported without TensorRT.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from compressor.errors import ExportError, FidelityFloorError, InputError, MissingBackendError, ValidationError
from exporters.base import Runtime, Session, Staging, as_numpy, boundary
from exporters.exporter import Exporter
from exporters.reference import reference_output

BUILD_SCRIPT = Path(__file__).with_name("trt_build.py")
OPSETS = range(9, 21)  # what the ONNX parsers of TensorRT 8.6 - 10.x accept
REFERENCE_SAMPLES = 4
HINT = ("TensorRT needs an NVIDIA GPU and NVIDIA's libraries; on a machine without them "
        "`compressor export --format tensorrt` writes a device bundle to build there")


def tensorrt_status() -> tuple[bool, str]:
    """(usable, reason): `tensorrt` imports and the CUDA runtime sees a GPU."""
    from exporters import trt_build

    try:
        trt = trt_build.load_tensorrt()
        trt_build.Cuda()
    except trt_build.BuildError as e:
        return False, str(e)
    return True, f"TensorRT {trt.__version__} with an NVIDIA GPU"


def check_onnx_for_tensorrt(path: Path) -> dict:
    """What TensorRT needs from the ONNX file: a supported opset, float32 inputs, static shapes
    (or a dynamic batch only, given an optimisation profile), standard-domain operators."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    problems = []
    if opset not in OPSETS:
        problems.append(f"opset {opset} is outside what TensorRT parses ({OPSETS.start}-{OPSETS.stop - 1})")
    inputs = {}
    for tensor in model.graph.input:
        shape = tensor.type.tensor_type.shape.dim
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in shape]
        inputs[tensor.name] = dims
        if tensor.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            problems.append(f"input {tensor.name!r} is not float32")
        if any(not isinstance(d, int) for d in dims[1:]):
            problems.append(f"input {tensor.name!r} has dynamic dimensions beyond the batch: {dims}")
    custom = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if custom:
        problems.append(f"operators from custom domains need TensorRT plugins: {', '.join(custom)}")
    if problems:
        msg = f"{path} is not ready for TensorRT: {'; '.join(problems)}"
        raise InputError(msg)
    dynamic = any(not isinstance(d[0], int) for d in inputs.values() if d)
    return {"opset": opset, "inputs": inputs, "outputs": [o.name for o in model.graph.output],
            "dynamic_batch": dynamic}


class TensorRTExporter(Exporter):
    """Engine (.engine) or device bundle (`<stem>-tensorrt-bundle/`).

    Tolerances: fp32 (TF32 off) atol 1e-4 + rtol 1e-3 + 1e-5*max|logits|
    (other kernels, other summation order); fp16 activations round to an
    11-bit mantissa at every layer: atol 1e-3 + rtol 2e-2 + 1e-2*max|logits|;
    int8: atol 1e-2 + rtol 0.1 + 0.1*max|logits| catches a broken engine only: an INT8 engine is judged
    like every INT8 artifact, on `held_out` images (N x C x H x W, never calibration ones) against the fp32
    model's logits, by top-1 agreement and logit SQNR against `floor` ({"min_top1_agreement": %,
    "min_sqnr_db": dB}; default the documented 70% and 10 dB), here where TensorRT runs (below the floor:
    FidelityFloorError, nothing written) or on the device by build_engine.py (heldout.npz; the engine is
    deleted below the floor). INT8 calibrates on `calibration` (N x C x H x W images preprocessed as at
    inference, run the example's batch at a time; without it, on the reference inputs) through TensorRT's
    entropy calibrator, whose cache is written beside the engine or, in a bundle, by build_engine.py
    on the device (calibration.npz + calibration.cache).
    """

    name = "tensorrt"
    suffix = ".engine"
    TOLERANCES = {"fp32": (1e-4, 1e-3, 1e-5), "fp16": (1e-3, 2e-2, 1e-2), "int8": (1e-2, 1e-1, 1e-1)}

    def __init__(self, precision: str = "fp32", workspace_mb: int = 1024, dynamic_batch: bool = False,
                 calibration: np.ndarray | None = None, held_out: np.ndarray | None = None,
                 floor: dict | None = None) -> None:
        from exporters import trt_build

        super().__init__(precision)
        self.workspace_mb = workspace_mb
        self.dynamic_batch = dynamic_batch
        self.calibration = calibration
        self.held_out = held_out
        self.floor = {"min_top1_agreement": trt_build.MIN_TOP1_AGREEMENT, "min_sqnr_db": trt_build.MIN_SQNR_DB,
                      **{k: v for k, v in (floor or {}).items() if k in ("min_top1_agreement", "min_sqnr_db")}}

    def _int8_batches(self, images: np.ndarray | None, x: np.ndarray, what: str) -> np.ndarray | None:
        """INT8 `images` (calibration or held-out) as (k, *example shape) batches; None for fp32/fp16 or none."""
        if self.precision != "int8" or images is None:
            return None
        images = as_numpy(images)
        k = len(images) // x.shape[0]
        if k == 0 or images.shape[1:] != x.shape[1:]:
            msg = f"INT8 {what} needs images of shape {list(x.shape[1:])}, got {list(images.shape)}"
            raise InputError(msg)
        return images[:k * x.shape[0]].reshape(k, *x.shape)

    def write(self, model, example_input, staged: Path, opset: int) -> list[str]:
        raise NotImplementedError("TensorRTExporter.export builds an engine or a bundle itself")

    def run_staged(self, staged: Path, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError("TensorRTExporter.export validates the engine with trt_build")

    def bundle_path(self, path: Path) -> Path:
        path = self.artifact_path(path)
        return path.with_name(f"{path.stem}-tensorrt-bundle")

    def export(self, model, example_input, path: Path, opset: int = 17) -> Path:
        """The engine's path when TensorRT is usable here, else the bundle folder's path.

        Overrides the common export path: the artifact is either an engine, validated by the
        real TensorRT here, or a bundle whose validation happens on the device, so `write` /
        `run_staged` do not apply."""
        from exporters.onnx import OnnxExporter
        from exporters.onnxruntime import OnnxRuntimeSession

        path = self.artifact_path(path)
        x = as_numpy(example_input)
        with Staging(path) as stage:
            onnx_path = stage.dir / "model.onnx"
            onnx_exporter = OnnxExporter(dynamic_batch=self.dynamic_batch)
            with boundary(f"ONNX export of {path.name} for TensorRT"):
                onnx_exporter.write(model, example_input, onnx_path, opset)
            facts = check_onnx_for_tensorrt(onnx_path)
            rng = np.random.default_rng(0)
            inputs = np.stack([x] + [rng.standard_normal(x.shape, dtype=np.float32)
                                     for _ in range(REFERENCE_SAMPLES - 1)])
            session = OnnxRuntimeSession(onnx_path, 1)
            outputs = np.stack([session.run(xi) for xi in inputs])
            for xi, got in zip(inputs, outputs, strict=True):  # the reference itself is checked against torch
                onnx_exporter.check_close(got, reference_output(model, xi), f"{path} (ONNX for TensorRT)")
            usable, reason = tensorrt_status()
            calibration = self._int8_batches(self.calibration, x, "calibration")
            held_out = self._int8_batches(self.held_out, x, "held-out judging")
            if held_out is not None:  # the fp32 model's logits of them, what the engine is judged against
                held_out = (held_out, np.stack([session.run(b) for b in held_out]))
            if usable:
                return self._engine(stage, path, onnx_path, inputs, outputs, reason, calibration, held_out)
            return self._bundle(stage, path, facts, inputs, outputs, opset, reason, calibration, held_out)

    def _flags(self) -> tuple[bool, bool]:
        return self.precision in ("fp16", "int8"), self.precision == "int8"

    def _engine(self, stage: Staging, path: Path, onnx_path: Path, inputs: np.ndarray, outputs: np.ndarray,
                reason: str, calibration: np.ndarray | None = None,
                held_out: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
        from exporters import trt_build

        trt, cuda = trt_build.load_tensorrt(), trt_build.Cuda()
        fp16, int8 = self._flags()
        staged = stage.dir / path.name
        cache = stage.dir / f"{path.stem}-calibration.cache"
        try:
            trt_build.build_engine(trt, str(onnx_path), str(staged), fp16, int8, self.workspace_mb,
                                   str(stage.dir / "timing.cache"), inputs if calibration is None else calibration,
                                   cuda, str(cache) if int8 else None)
            runner = trt_build.EngineRunner(trt, str(staged), inputs.shape[1:], cuda)
            trt_build.validate(runner, inputs, {"logits": outputs}, self.atol, self.rtol, self.range_rtol)
            judged = "" if held_out is None else self._judge(runner, held_out, path)
        except trt_build.BuildError as e:
            raise ExportError(str(e)) from e
        except trt_build.MismatchError as e:
            raise ValidationError(f"{path}: {e}") from e
        stage.commit([cache.name, staged.name] if cache.is_file() else [staged.name])
        self.outcome = f"built TensorRT engine {path} ({reason}) and validated it against ONNX Runtime{judged}"
        return path

    def _judge(self, runner, held_out: tuple[np.ndarray, np.ndarray], path: Path) -> str:
        """The INT8 engine on the held-out batches against the floor: FidelityFloorError below it (nothing is
        written), else the outcome's words."""
        from exporters import trt_build

        fidelity, _ = trt_build.judge_held_out(runner, *held_out, self.floor["min_top1_agreement"],
                                               self.floor["min_sqnr_db"])
        if fidelity["floor"]["below"]:
            msg = f"{trt_build.floor_message(fidelity)}; {path} not written"
            raise FidelityFloorError(msg)
        return (f"; INT8 on {fidelity['images']} held-out images: top-1 agreement {fidelity['top1_agreement']:.1f}%, "
                f"SQNR {fidelity['sqnr_db']:.1f} dB")

    def _bundle(self, stage: Staging, path: Path, facts: dict, inputs: np.ndarray, outputs: np.ndarray,
                opset: int, reason: str, calibration: np.ndarray | None = None,
                held_out: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
        import onnx

        final = self.bundle_path(path)
        if final.exists() and (not final.is_dir() or any(final.iterdir())):
            msg = f"bundle folder {final} already exists and is not empty; choose a new output"
            raise InputError(msg)
        folder = stage.dir / final.name
        folder.mkdir()
        shutil.move(str(stage.dir / "model.onnx"), folder / "model.onnx")
        shutil.copyfile(BUILD_SCRIPT, folder / "build_engine.py")
        np.savez(folder / "reference.npz", input=inputs, logits=outputs)
        fp16, int8 = self._flags()
        calibrate = ""
        if calibration is not None:
            np.savez(folder / "calibration.npz", input=calibration)
            calibrate = " --calibration calibration.npz --calibration-cache calibration.cache"
        if held_out is not None:
            np.savez(folder / "heldout.npz", input=held_out[0], logits=held_out[1])
            calibrate += (f" --held-out heldout.npz --min-agreement {self.floor['min_top1_agreement']:g} --min-sqnr "
                          f"{self.floor['min_sqnr_db']:g} --held-out-outputs heldout_outputs.npz")
        tol = f"--atol {self.atol:g} --rtol {self.rtol:g} --range-rtol {self.range_rtol:g}"
        build = ("python3 build_engine.py --onnx model.onnx --engine model.engine"
                 f"{' --fp16' if fp16 else ''}{' --int8' if int8 else ''}{calibrate}"
                 f" --workspace-mb {self.workspace_mb} "
                 f"--timing-cache timing.cache --inputs reference.npz --outputs reference.npz {tol} "
                 "--report engine_report.json")
        shape = "x".join(str(d) for d in inputs.shape[1:])
        shapes = (f" --minShapes=input:1x{'x'.join(str(d) for d in inputs.shape[2:])} --optShapes=input:{shape}"
                  f" --maxShapes=input:{shape}" if facts["dynamic_batch"] else "")
        trtexec = ("trtexec --onnx=model.onnx --saveEngine=model.engine"
                   f"{' --fp16' if fp16 else ''}{' --int8' if int8 else ''}"
                   f"{' --calib=calibration.cache' if calibration is not None else ''}"
                   f" --memPoolSize=workspace:{self.workspace_mb} --timingCacheFile=timing.cache{shapes}"
                   " --warmUp=500 --iterations=200 --duration=5")
        (folder / "trtexec.sh").write_text(
            "#!/bin/sh\n# Build and time with trtexec (workspace in MiB); it reports GPU compute and host latency\n"
            "# separately. trtexec does not compare outputs: build_engine.py does (see README.txt).\n"
            f"cd \"$(dirname \"$0\")\"\n{trtexec} \"$@\"\n")
        os.chmod(folder / "trtexec.sh", 0o755)
        (folder / "README.txt").write_text(
            f"TensorRT device bundle: no engine was built here ({reason}).\n\n"
            "On the device (TensorRT 8.5+, NVIDIA GPU, numpy), in this folder:\n\n"
            f"  {build}\n\nbuilds model.engine, checks it against reference.npz (ONNX Runtime outputs of model.onnx,\n"
            "themselves checked against torch) and times GPU compute and host-to-host latency separately.\n"
            f"Or with trtexec (no output check): sh trtexec.sh\n"
            + ("\nINT8: build_engine.py calibrates on calibration.npz (images preprocessed as at inference) and\n"
               "writes calibration.cache; trtexec reads that cache (--calib), so run build_engine.py first.\n"
               if calibration is not None else "")
            + ("It then judges the engine on heldout.npz (held-out images and the fp32 model's logits of them):\n"
               "below the floor (top-1 agreement, SQNR of the logits) it deletes model.engine and exits 3; the\n"
               "engine's logits are kept in heldout_outputs.npz, the figures in engine_report.json.\n"
               if held_out is not None else ""))
        manifest = {
            "format": "compressor-tensorrt-bundle", "version": 1, "engine_built": False, "reason": reason,
            "precision": self.precision, "fp16": fp16, "int8": int8, "workspace_mb": self.workspace_mb,
            "onnx": {"file": "model.onnx", "opset": facts["opset"], "inputs": facts["inputs"],
                     "outputs": facts["outputs"], "dynamic_batch": facts["dynamic_batch"],
                     "onnx_version": onnx.__version__},
            "reference": {"file": "reference.npz", "inputs": "input", "outputs": ["logits"],
                          "samples": int(len(inputs)), "source": "onnxruntime, checked against torch"},
            "tolerance": {"atol": self.atol, "rtol": self.rtol, "range_rtol": self.range_rtol},
            "build_command": build, "trtexec_command": trtexec, "requested_opset": opset,
            "calibration": None if calibration is None else {
                "file": "calibration.npz", "batches": int(len(calibration)), "batch_shape": list(calibration.shape[1:]),
                "cache": "calibration.cache", "calibrator": "IInt8EntropyCalibrator2 (written by build_engine.py)"},
            "held_out": None if held_out is None else {
                "file": "heldout.npz", "images": int(held_out[0].shape[0] * held_out[0].shape[1]),
                "logits": "the fp32 model's, from onnxruntime", "floor": self.floor,
                "outputs": "heldout_outputs.npz (written by build_engine.py)"},
        }
        (folder / "bundle.json").write_text(json.dumps(manifest, indent=2) + "\n")
        for f in folder.iterdir():
            os.chmod(f, 0o755 if f.suffix in (".sh", ".py") else 0o644)
        stage.commit([final.name])
        self.outcome = (f"TensorRT is not usable here ({reason}); no engine was built. Wrote a device bundle "
                        f"{final}: build and validate it on the device with `{build}`")
        return final


class TensorRTSession(Session):
    """An engine run host-to-host (copy in, compute, copy out) per timed call."""

    def __init__(self, artifact: Path, threads: int, options: dict | None = None) -> None:
        from exporters import trt_build

        try:
            self.trt, self.cuda = trt_build.load_tensorrt(), trt_build.Cuda()
        except trt_build.BuildError as e:
            raise MissingBackendError(f"{e}. {HINT}") from e
        if not Path(artifact).is_file():
            msg = f"TensorRT engine not found: {artifact}"
            raise InputError(msg)
        self.artifact = Path(artifact)
        self.runner = None
        self.settings = {"runtime": "tensorrt", "version": self.trt.__version__, "timed": "host-to-host"}

    def _runner(self, shape: tuple[int, ...]):
        from exporters import trt_build

        if self.runner is None:
            try:
                self.runner = trt_build.EngineRunner(self.trt, str(self.artifact), shape, self.cuda)
            except trt_build.BuildError as e:
                raise InputError(f"TensorRT cannot load {self.artifact}: {e}") from e
        return self.runner

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self._runner(x.shape).infer(x)
        return out[self.runner.outputs[0]]

    def prepare(self, x: np.ndarray) -> None:
        self._runner(x.shape)
        self._input = np.ascontiguousarray(x, np.float32)

    def __call__(self) -> object:
        return self.runner.infer(self._input)


class TensorRTRuntime(Runtime):
    name = "tensorrt"
    artifact_format = "tensorrt"

    def __init__(self) -> None:
        usable, reason = tensorrt_status()
        if not usable:
            msg = f"the tensorrt runtime is not usable here: {reason}. {HINT}"
            raise MissingBackendError(msg)

    def open(self, artifact: Path, threads: int, options: dict | None = None) -> Session:
        return TensorRTSession(artifact, threads, options)
