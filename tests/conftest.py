from __future__ import annotations

import pytest
import torch

from compressor.data import load_digits32

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
"""


@pytest.fixture(scope="session")
def digits():
    return load_digits32()


@pytest.fixture
def fast_profile(tmp_path):
    path = tmp_path / "fast.yaml"
    path.write_text(FAST_PROFILE)
    return path


@pytest.fixture(autouse=True)
def _seed_and_cache(monkeypatch, tmp_path_factory):
    torch.manual_seed(0)
    # zoo models other than the bundled resnet56 would be trained and cached here
    monkeypatch.setenv("COMPRESSOR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def randomise_batchnorm(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so folds and removals are tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()
