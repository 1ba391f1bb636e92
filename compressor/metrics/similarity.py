"""How alike two models' outputs are: linear CKA of features, KL divergence of logits."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two N x D feature matrices: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred."""
    x = x.double() - x.double().mean(0, keepdim=True)
    y = y.double() - y.double().mean(0, keepdim=True)
    num = torch.linalg.matrix_norm(y.T @ x) ** 2
    den = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(num / den) if den > 0 else 0.0


def kl_per_item(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(reference) || softmax(logits)) of each row of two logit matrices (nats, float64)."""
    log_p, log_q = F.log_softmax(reference.double(), 1), F.log_softmax(logits.double(), 1)
    return (log_p.exp() * (log_p - log_q)).sum(1)
