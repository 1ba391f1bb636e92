"""FLOPs and parameters. Convention: 2 FLOPs per multiply-add (torch's FlopCounterMode);
convolutions and matmuls only. MACs = FLOPs / 2 (what fvcore, thop and ptflops call FLOPs)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Cost:
    flops: int
    macs: int
    params: int


def count_cost(model: nn.Module, example_input: torch.Tensor) -> Cost:
    """FLOPs/MACs of one forward pass on `example_input` (its batch included), and parameters."""
    from torch.utils.flop_counter import FlopCounterMode  # here: it loads triton, a GPU compiler, on import

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example_input)
    model.train(was_training)
    flops = int(counter.get_total_flops())
    return Cost(flops, flops // 2, sum(p.numel() for p in model.parameters()))
