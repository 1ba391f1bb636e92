"""The mean of every input channel of each dense layer in the blocks that slim, on calibration images.

A width unit's dropped channels are read as these means (graph/slim.py, Slim.fill) instead of as zero:
removing a channel then takes away its variation, not its average contribution, which a BatchNorm
after the consumer would otherwise see as a shifted sum. Forward hooks on the unpruned model, one
pass over the calibration images; written here because no library gathers per-channel input means
for a pruning surgery.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from compressor.graph.slim import is_dense

Fill = tuple[tuple[str, tuple[float, ...]], ...]  # (dense layer's path in its block, its input channels' means)


def _channel_sum(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Per-channel sum of `x` as `module` reads it (channels first for a conv, last for a linear layer), and the
    number of values summed per channel."""
    if isinstance(module, nn.Linear):
        flat = x.reshape(-1, x.shape[-1])
    else:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).T
    return flat.double().sum(0), flat.shape[0]


@torch.no_grad()
def dense_input_means(model: nn.Module, block_paths: Iterable[str], calibration: Iterable) -> dict[str, Fill]:
    """{block path: its Fill}: for every dense layer (groups 1) inside each block, the mean of each input channel
    over the calibration batches ((images, ...) tuples or image tensors), the model in eval mode."""
    layers: dict[nn.Module, tuple[str, str]] = {}
    for path in dict.fromkeys(block_paths):
        block = model.get_submodule(path)
        for name, module in block.named_modules():
            if is_dense(module):
                layers[module] = (path, name)
    sums: dict[nn.Module, list] = {}

    def record(module: nn.Module, inputs: tuple, _output: object) -> None:
        total, count = _channel_sum(module, inputs[0])
        if module in sums:
            sums[module][0] += total
            sums[module][1] += count
        else:
            sums[module] = [total, count]

    hooks = [m.register_forward_hook(record) for m in layers]
    mode = model.training
    model.eval()
    try:
        for batch in calibration:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(mode)
    found: dict[str, list] = {}
    for module, (path, name) in layers.items():
        if module in sums:
            total, count = sums[module]
            found.setdefault(path, []).append((name, tuple(float(v) for v in (total / max(count, 1)))))
    return {path: tuple(fill) for path, fill in found.items()}
