"""The steps of the job for users who script them on their own nn.Module: score units, export.

`compressor.prune` (jobs/prune.py) runs the whole job; these run one part of it
through the same code the CLI uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from compressor.data.bundle import DataBundle
from compressor.jobs.inputs import as_data, as_loaded, as_profile
from compressor.latency.profiles import Profile
from compressor.models.loaded import LoadedModel


def score(model: nn.Module | LoadedModel | str, data: str | DataBundle | Iterable,
          criteria: str | Sequence[str] = "cka", profile: str | Path | Profile | None = None, k: int | None = None,
          calibration_size: int = 512, seed: int = 0, repeats: int = 3,
          input_shape: tuple[int, int, int] | None = None, log: Callable[[str], None] | None = print,
          train_device: str = "auto"):
    """Every unit's importance under each criterion (higher = keep) and how the criteria agree;
    with a profile, each unit's measured latency saving too. Scoring runs on `train_device` (auto: CUDA
    when available). Returns jobs.score.ScoredModel (.report: scores, ranks, agreement; .text: the tables)."""
    from compressor.criteria import CRITERIA
    from compressor.criteria.agreement import parse_criteria
    from compressor.jobs.score import score_model

    names = parse_criteria(criteria if isinstance(criteria, str) else ",".join(criteria), list(CRITERIA))
    bundle = as_data(data)
    loaded = as_loaded(model, bundle, input_shape)
    return score_model(loaded, bundle, names, as_profile(profile) if profile is not None else None, k,
                       calibration_size, seed, repeats, log or (lambda _: None), train_device)


def export(model: nn.Module, out: str | Path, formats: str | Sequence[str] = "onnx",
           input_shape: tuple[int, ...] | None = None, example_input: torch.Tensor | None = None,
           log: Callable[[str], None] | None = print, **options: object) -> dict:
    """Fold BatchNorm and export `model` to each format into the folder `out`, every artifact validated
    against torch first. The input is `example_input`, or a seeded random tensor of `input_shape`
    (C, H, W, batch 1; or N, C, H, W). Options: name, precision, opset, dynamic_batch, simplify,
    workspace_mb. Returns {format: {path, precision, outcome, files}}."""
    from compressor.errors import InputError
    from compressor.jobs.export import export as export_job

    if example_input is None:
        if input_shape is None:
            msg = "give example_input or input_shape"
            raise InputError(msg)
        shape = tuple(input_shape) if len(input_shape) == 4 else (1, *input_shape)
        example_input = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    return export_job(model, example_input, out, formats, log=log or (lambda _: None), **options)
