"""INT8 through each runtime's own quantizer, judged on held-out images against the fp32 model.

    quantization_images(data)      calibration images (training split) and held-out images (validation split)
    quantize_checked(model, ...)   quantize, validate against the floor, fall back to fp32 layers, or refuse
    rank_layers(...)               the fallback's ranking: SQNR gained per layer kept in fp32

The quantizers themselves live in exporters (exporters.get_quantizer, exporters.quantizer.QuantizeSettings);
the metrics and the floor in compressor.metrics.lossy. See docs/quantization.md.
"""

from compressor.quantize.checked import FALLBACK_STEPS, QuantizedModel, check_runtime, int8_available, quantize_checked
from compressor.quantize.fallback import rank_layers
from compressor.quantize.images import CALIBRATION_SIZE, QuantizationImages, quantization_images

__all__ = ["CALIBRATION_SIZE", "FALLBACK_STEPS", "QuantizationImages", "QuantizedModel", "check_runtime",
           "int8_available", "quantization_images", "quantize_checked", "rank_layers"]
