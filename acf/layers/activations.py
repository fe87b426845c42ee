"""1-Lipschitz activations of contractive residual branches.

- ELU (i-ResNet): Lipschitz constant 1.
- LipSwish (Residual Flows, Chen et al. 2019): ``x * sigmoid(x * softplus(beta)) / 1.1``. The
  derivative of ``x * sigmoid(b x)`` never exceeds 1.0998 for any ``b > 0``, so dividing by 1.1
  keeps the constant below 1.
- CLipSwish (invertible DenseNet, Perugachi-Diaz et al. 2021): ``LipSwish([x, -x]) / 1.004`` along
  channels. Per element the Jacobian is the column ``(s'(x), -s'(-x))`` of norm at most 1.1043/1.1,
  hence the extra 1.004. It doubles the number of channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LipSwish(nn.Module):
    """``x * sigmoid(x * softplus(beta)) / 1.1`` with learnable ``beta`` (one per module)."""

    def __init__(self, beta: float = 0.5) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.tensor(float(beta)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x * F.softplus(self.beta)) / 1.1

    def lipschitz_bound(self) -> float:
        return 1.0


class CLipSwish(nn.Module):
    """Concatenated LipSwish ``LipSwish([x, -x]) / 1.004`` along ``dim`` (doubles that size)."""

    def __init__(self, beta: float = 0.5, dim: int = 1) -> None:
        super().__init__()
        self.swish = LipSwish(beta)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swish(torch.cat([x, -x], dim=self.dim)) / 1.004

    def lipschitz_bound(self) -> float:
        return 1.0


class ELU(nn.ELU):
    """ELU with its Lipschitz bound (1) exposed like the other branch layers."""

    def lipschitz_bound(self) -> float:
        return 1.0


ACTIVATIONS = {"elu": ELU, "lipswish": LipSwish, "clipswish": CLipSwish}


def make_activation(name: str) -> nn.Module:
    """Build an activation by name: ``"elu"``, ``"lipswish"`` or ``"clipswish"``."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]()
