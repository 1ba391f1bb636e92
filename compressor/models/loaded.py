"""A model with what the job needs to know about it: where it came from, its input, its classes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.data.bundle import Preprocessing


@dataclass
class LoadedModel:
    """A model with what is needed to rebuild, export and report on it.

    arch: the zoo name, or what rebuilds the user's architecture ("mynet:build", "timm:resnet18");
    preprocessing: the input normalisation it expects, where fixed (a model with its own,
    ImageNet-pretrained weights); removed_units: units already removed (a pruned checkpoint).
    """

    model: nn.Module
    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]
    source: str
    removed_units: list[str] = field(default_factory=list)
    preprocessing: Preprocessing | None = None

    @property
    def pretrained(self) -> bool:
        """Whether it carries its own fixed weights (ImageNet lineage) rather than weights trained here."""
        return self.preprocessing is not None

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.randn(batch, *self.input_shape, generator=torch.Generator().manual_seed(0))
