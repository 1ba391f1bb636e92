"""Shared test helpers: hand-set weights with known answers, a fast timing profile, ONNX agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

FAST_PROFILE = """\
name: ort-cpu-fast
description: ONNX Runtime CPU with short timing floors, for tests only
runtime: onnxruntime
device: cpu
threads: null
batch: 1
opset: 17
runtime_options: {allow_spinning: false}
timing:
  search: {min_runs: 20, min_time_s: 0.15}
  report: {min_runs: 40, min_time_s: 0.4}
  warmup_runs: 3
  warmup_s: 0.05
  parallel_probe: false  # its own tests (test_parallel_probe.py) and the built-in profiles' runs probe
"""


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so folds and removals are tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def resnet20() -> nn.Module:
    """A ResNet-20 for 32x32 inputs (9 blocks, 10 classes) with seeded random weights and BatchNorm
    statistics: a whole model a third the depth of resnet56, for end-to-end prunes that test how sets
    are chosen rather than what a trained model keeps (`--model tests.helpers:resnet20`)."""
    from compressor.models.cifar_resnet import CifarResNet

    torch.manual_seed(0)
    return randomise_batchnorm(CifarResNet(20, 10))


def zero_branch(model: nn.Module, name: str) -> None:
    """Zero the last BatchNorm of a block's residual branch: the branch then outputs 0."""
    block = model.get_submodule(name)
    bns = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.BatchNorm2d)
           and not n.startswith(("shortcut", "downsample", "skip"))]
    last = bns[-1][1]
    last.weight.data.zero_()
    last.bias.data.zero_()


def assert_onnx_matches(model: nn.Module, onnx_path: Path, x: torch.Tensor) -> None:
    """`model` and the exported `onnx_path` (batch 1, input "input") agree on every image of `x` in ONNX
    Runtime within the export check's tolerance (atol 1e-4 + rtol 1e-3)."""
    import onnxruntime as ort

    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(None, {"input": x[i:i + 1].numpy()})[0] for i in range(len(x))])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)


def assert_exit_matches_target(code: int, report: dict, speedup: float | None = None, ms: float | None = None) -> None:
    """A prune timed on a loaded machine may miss its target in the final measurement (exit 1), but where it
    exits 0 the measured speedup (or latency) meets the target asked for: `speedup` (x) or `ms`, judged here
    from the report's medians, not from its own verdict."""
    assert code == (0 if report["target_met"] else 1)
    if code == 0:
        base, pruned = report["baseline"]["latency_ms"]["median"], report["pruned"]["latency_ms"]["median"]
        assert (base / pruned >= speedup) if speedup is not None else (pruned <= ms), (base, pruned, speedup, ms)
