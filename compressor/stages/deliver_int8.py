"""Stage `deliver_int8`: the chosen INT8 artifact of the fine-tuned model, re-calibrated and judged on held-out data.

The fine-tuned model changed since the search measured its INT8 candidate, so it is quantized again
by the runtime's own quantizer, calibrated on the calibration split and checked on the held-out split
against the fp32 model it was made from (compressor/quantize: the fidelity floor, the per-layer fp32
fallback). Its top-1 agreement with the unpruned model on the held-out split is what the report gives.
A final INT8 below the floor is refused, not written: the fp32 artifact is delivered instead, and the
report says why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from compressor.data.bundle import DataBundle
from compressor.errors import FidelityFloorError
from compressor.latency.deploy import deployable
from compressor.metrics.lossy import lossy_fidelity
from compressor.quantize import CALIBRATION_SIZE, quantization_images, quantize_checked
from compressor.search.greedy import class_logits
from compressor.stages.deliver import Delivered
from compressor.stages.plan import Plan
from compressor.stages.precision import int8_logits
from compressor.stages.recover import Recovered


def deliver_int8(plan: Plan, recovered: Recovered, delivered: Delivered, data: DataBundle, out: Path, seed: int,
                 log: Callable[[str], None], calibration_size: int | None = None) -> Delivered:
    """`delivered` with the INT8 artifact (model-int8.<suffix>), calibrated on `calibration_size` images (None:
    CALIBRATION_SIZE), as the one the final measurement times; the INT8 details in its checks ("int8"). Unchanged
    (fp32) if the final INT8 is refused."""
    images = quantization_images(data, calibration_size or CALIBRATION_SIZE, seed=seed)
    path = out / f"model-int8{plan.deployment.exporter.suffix}"
    log(f"INT8: quantizing the fine-tuned model ({len(images.calibration)} calibration images, "
        f"{len(images.held_out)} held-out)")
    try:
        quantized = quantize_checked(deployable(recovered.deployed, plan.example), plan.example,
                                     plan.deployment.runtime.name, path, images, opset=plan.deployment.profile.opset,
                                     log=lambda s: log(f"    {s}"))
    except FidelityFloorError as e:
        log(f"the final INT8 is refused ({e}); delivering fp32")
        return replace(delivered, checks={**delivered.checks, "int8": {"refused": str(e), "attempts": e.attempts}})
    held_out = torch.from_numpy(images.held_out)
    unpruned = class_logits(plan.model, held_out)
    int8 = int8_logits(plan, quantized.path, images.held_out)
    against_unpruned = lossy_fidelity(unpruned[:len(int8)].numpy(), int8.numpy(), images.labels[:len(int8)]
                                      if images.labels is not None else None)
    log(f"INT8 on {against_unpruned.images} held-out images: top-1 agreement with the unpruned model "
        f"{against_unpruned.top1_agreement:.1f}%, SQNR {against_unpruned.sqnr_db:.1f} dB")
    checks = {**delivered.checks, "int8": {**quantized.to_dict(), "against_unpruned": against_unpruned.to_dict(),
                                           "calibration_images": len(images.calibration)},
              "artifacts": [quantized.path.name, delivered.baseline_path.name]}
    return replace(delivered, model_path=quantized.path, checks=checks)
