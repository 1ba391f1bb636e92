"""The fallback's ranking: layers ordered by how much the logits' SQNR rises when only that layer is fp32.

Measured, not guessed: one ONNX Runtime QDQ quantization with the caller's settings, then one variant per
quantized layer with only that layer in fp32 (exporters/int8_ranking.py), each run on `rank_images`
selection images (QuantizationImages.ranking_images: never the held-out images that then judge the
fallback's tries) and compared with the fp32 logits. For OpenVINO the ranking runs in ONNX Runtime on its
QDQ graph (same ONNX node names, the same kind of per-channel symmetric int8 weights); it only orders the
candidates: every fallback try is quantized by the target runtime's own quantizer and measured again.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from compressor.metrics.lossy import sqnr_db
from compressor.quantize.images import QuantizationImages

MIN_GAIN_DB = 0.1  # a layer whose fp32 raises the logits' SQNR by less is not what breaks the INT8 model


def rank_layers(fp32: Path, images: QuantizationImages, batch: int, reference: Callable[[np.ndarray], np.ndarray],
                settings, rank_images: int = 64) -> dict[str, float]:
    """{layer (ONNX node name): SQNR gained in dB by keeping it alone in fp32}, largest gain first, layers
    gaining less than MIN_GAIN_DB left out (when none is left, no fallback try is made: where every
    layer is equally broken, as with one activation scale swamped by an outlier, keeping a few in fp32
    changes nothing). Measured on the first `rank_images` of `images.ranking_images()`; `reference(x)`:
    the fp32 model's logits of images `x`."""
    from exporters.int8_ranking import layer_effects
    from exporters.quantizer import batches

    chosen = images.ranking_images()
    n = max(batch, min(rank_images, len(chosen)) // batch * batch)
    x = chosen[:n]
    expected = reference(x)
    base, effects = layer_effects(fp32, list(batches(images.calibration, batch)), x, batch,
                                  lambda logits: sqnr_db(expected, logits), settings)
    gains = {layer: score - base for layer, score in effects.items()}
    return {layer: gain for layer, gain in sorted(gains.items(), key=lambda kv: -kv[1]) if gain >= MIN_GAIN_DB}
