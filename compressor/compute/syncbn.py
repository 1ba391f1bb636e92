"""BatchNorm over the global batch while data-parallel fine-tuning, so that N processes of B/N images
normalise as one process of B images does (and their result matches it within rounding).

On CUDA this is torch.nn.SyncBatchNorm. torch's refuses CPU tensors, so on CPU (gloo) GlobalBatchNorm
does the same by hand: per-channel sums and the count all-reduced, then the centred sum of squares (two
passes, as torch's own BatchNorm computes the variance), through an all-reduce that autograd follows (its
gradient is the all-reduced gradient; torch.distributed.nn.functional.all_reduce did this but is
deprecated in torch 2.14). The replacements share their parameters and statistics with the modules they
stand in for, which are put back afterwards.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group; the gradient of each rank's input is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: object) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A BatchNorm whose training-mode statistics are those of the batch across every rank of `group`
    (same parameters and buffers as the `original` it stands in for)."""

    def __init__(self, original: nn.modules.batchnorm._BatchNorm, group: object) -> None:
        super().__init__(original.num_features, original.eps, original.momentum, original.affine,
                         original.track_running_stats)
        self.group = group
        self.weight, self.bias = original.weight, original.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(self, name, getattr(original, name))
        self.train(original.training)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        """Any N x C x ... input, as the BatchNorm it stands in for took."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch_stats = self.training or self.running_mean is None
        if not batch_stats:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_tensor([x.numel() // x.shape[1]])
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), self.group)
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply(centred.pow(2).sum(dims), self.group) / n
        if self.training and self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), float(n.detach()))
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: float) -> None:
        """As torch's BatchNorm: momentum (or the cumulative average when it is None), unbiased variance."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
        self.running_var.mul_(1 - factor).add_(var * n / max(n - 1, 1), alpha=factor)


def _sync_for(module: nn.modules.batchnorm._BatchNorm, group: object, device: torch.device) -> nn.Module:
    if device.type != "cpu":
        sync = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group=group)
        sync.weight, sync.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(sync, name, getattr(module, name))
        return sync.train(module.training)
    return GlobalBatchNorm(module, group)


def synchronise_batchnorm(model: nn.Module, group: object, device: torch.device) -> list[tuple[str, nn.Module]]:
    """Replace every BatchNorm of `model` (in place) by one normalising over the global batch; returns
    (path, original) pairs for restore_batchnorm."""
    originals = [(name, m) for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)]
    for name, module in originals:
        model.set_submodule(name, _sync_for(module, group, device))
    return originals


def restore_batchnorm(model: nn.Module, originals: list[tuple[str, nn.Module]]) -> None:
    """Put the original BatchNorms back (they share the trained parameters and statistics)."""
    for name, module in originals:
        module.train(model.get_submodule(name).training)
        model.set_submodule(name, module)
