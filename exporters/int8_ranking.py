"""Which layers hurt most when quantized: each layer's measured effect on the held-out logits.

One ONNX Runtime QDQ quantization (exporters/int8_onnxruntime.py, the caller's settings), then, for
every candidate layer, a variant of that graph in which only this layer computes in fp32: its
weights and bias are the fp32 originals and its quantized inputs are clipped to the calibrated range
instead of rounded (the range stays: ONNX Runtime drops a ReLU / ReLU6 before a QuantizeLinear and
lets the range do its clipping). Each variant runs on the held-out images in ONNX Runtime and the
caller's `score` judges its logits. No re-calibration per layer: one quantization, one session per
layer. The ranking only orders the fallback's candidates; the fallback quantizes again with the
chosen layers excluded and measures that on the target runtime.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from compressor.errors import InputError
from exporters.quantizer import QuantizeSettings, run_batched


def _producers(graph) -> dict:
    return {out: node for node in graph.node for out in node.output}


def _initializers(graph) -> dict:
    return {t.name: t for t in graph.initializer}


def _clip_range(graph, quantize) -> tuple[float, float]:
    """The fp32 interval a QuantizeLinear node represents: scale * ([qmin, qmax] - zero_point)."""
    from onnx import numpy_helper

    inits = _initializers(graph)
    scale = float(numpy_helper.to_array(inits[quantize.input[1]]).reshape(-1)[0])
    zero = numpy_helper.to_array(inits[quantize.input[2]]) if len(quantize.input) > 2 else np.zeros((), np.int8)
    info = np.iinfo(zero.dtype)
    z = float(zero.reshape(-1)[0])
    return scale * (info.min - z), scale * (info.max - z)


def fp32_variant(qdq, fp32, layer: str):
    """A copy of the QDQ model `qdq` in which node `layer` computes in fp32 (weights from `fp32`, the
    model it was quantized from; quantized inputs clipped to their calibrated range, not rounded)."""
    import onnx
    from onnx import helper, numpy_helper

    variant = onnx.ModelProto()
    variant.CopyFrom(qdq)
    graph = variant.graph
    node = next((n for n in graph.node if n.name == layer), None)
    source = next((n for n in fp32.graph.node if n.name == layer), None)
    if node is None or source is None:
        msg = f"layer {layer!r} is not in the quantized graph"
        raise InputError(msg)
    producers, fp32_inits = _producers(graph), _initializers(fp32.graph)
    for j, name in enumerate(node.input):
        dq = producers.get(name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":  # a quantized activation: clip, do not round
            lo, hi = _clip_range(graph, q)
            bounds = [f"{layer}_fp32_in{j}_min", f"{layer}_fp32_in{j}_max"]
            graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), b)
                                     for v, b in zip((lo, hi), bounds, strict=True))
            clipped = f"{layer}_fp32_in{j}"
            graph.node.append(helper.make_node("Clip", [q.input[0], *bounds], [clipped], name=clipped))
            node.input[j] = clipped
        elif j < len(source.input) and source.input[j] in fp32_inits:  # a quantized weight or bias
            weight = onnx.TensorProto()  # renamed: ONNX Runtime may give the DequantizeLinear output its name
            weight.CopyFrom(fp32_inits[source.input[j]])
            weight.name = f"{layer}_fp32_in{j}"
            graph.initializer.append(weight)
            node.input[j] = weight.name
    _sort_topologically(graph)
    return variant


def _sort_topologically(graph) -> None:
    """Reorder `graph.node` so every node follows the producers of its inputs (the Clip nodes appended)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            msg = "the quantized graph has a cycle or an undefined input"
            raise InputError(msg)
        ordered += done
        ready |= {o for n in done for o in n.output}
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def layer_effects(fp32: Path, calibration: list[np.ndarray], held_out: np.ndarray, batch: int,
                  score: Callable[[np.ndarray], float], settings: QuantizeSettings | None = None,
                  layers: Sequence[str] | None = None) -> tuple[float, dict[str, float]]:
    """(score of the fully quantized model, {layer: score with only that layer in fp32}) over `held_out`,
    for `layers` (default: every quantized Conv / Gemm / MatMul). `score` maps logits to a number,
    higher = closer to fp32 (e.g. SQNR in dB)."""
    import onnx

    from exporters.int8_onnxruntime import OnnxRuntimeQuantizer
    from exporters.onnxruntime import OnnxRuntimeSession

    quantizer = OnnxRuntimeQuantizer(settings)
    candidates = list(layers) if layers is not None else quantizer.layers(fp32)
    with tempfile.TemporaryDirectory(prefix="compressor-rank-") as folder:
        qdq_path = Path(folder) / "ranked.onnx"
        with contextlib.redirect_stdout(io.StringIO()):  # ONNX Runtime's calibration prints to stdout
            prepared = quantizer.prepare(fp32, Path(folder) / "prepared.onnx")
            quantizer.quantize_prepared(prepared, calibration, qdq_path)
        qdq, original = onnx.load(str(qdq_path)), onnx.load(str(prepared))
        base = score(run_batched(OnnxRuntimeSession(qdq_path, 1).run, held_out, batch))
        effects = {}
        for layer in candidates:
            if layer in quantizer.settings.exclude:
                continue
            path = Path(folder) / "variant.onnx"
            onnx.save_model(fp32_variant(qdq, original, layer), str(path))
            effects[layer] = score(run_batched(OnnxRuntimeSession(path, 1).run, held_out, batch))
    return base, effects
