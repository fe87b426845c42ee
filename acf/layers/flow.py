"""Flow plumbing: ActNorm, squeeze, logit transform, dequantisation, and the sequential container.

Every flow layer maps ``x -> (y, logdet)`` with the log-det per sample, and has ``inverse(y)``.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_finite, check_image, check_same_dtype, check_tensor, check_unit_interval
from .block import ContractiveBlock


def _zeros(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)


class ActNorm(nn.Module):
    """Per-channel affine ``y = (x + b) * exp(s)`` initialised from the first batch (Kingma & Dhariwal 2018)
    so that ``y`` has zero mean and unit variance per channel. ``log det = H W sum_c s_c``."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.channels, self.eps = channels, eps
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _init(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False) if x[:, 0].numel() > 1 else torch.ones_like(mean)
        self.bias.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.eps))
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_image(x, self.channels)
        check_same_dtype(x, self.bias)
        if not bool(self.initialized):
            self._init(x)
        y = (x + self.bias) * torch.exp(self.log_scale)
        return y, _zeros(x) + self.log_scale.sum() * x.shape[2] * x.shape[3]

    def inverse(self, y: torch.Tensor, **_: object) -> torch.Tensor:
        check_image(y, self.channels)
        return y * torch.exp(-self.log_scale) - self.bias


class Squeeze(nn.Module):
    """Space-to-depth by ``factor`` (pixel-unshuffle): ``(C, H, W) -> (C f^2, H/f, W/f)``; log-det 0."""

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor(x, "x", ndim=4)
        if x.shape[2] % self.factor or x.shape[3] % self.factor:
            raise ValueError(f"squeeze by {self.factor} needs H and W divisible by it, got shape {tuple(x.shape)}")
        return F.pixel_unshuffle(x, self.factor), _zeros(x)

    def inverse(self, y: torch.Tensor, **_: object) -> torch.Tensor:
        return F.pixel_shuffle(y, self.factor)


class LogitTransform(nn.Module):
    """``y = logit(alpha + (1 - 2 alpha) x)`` for ``x`` in ``[0, 1]`` (Dinh et al. 2017).

    ``log |dy/dx| = log(1 - 2 alpha) - log s - log(1 - s)`` per element, ``s = alpha + (1 - 2 alpha) x``.
    """

    def __init__(self, alpha: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"alpha must be in [0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor(x, "x")
        check_unit_interval(x, "x")
        s = self.alpha + (1 - 2 * self.alpha) * x
        y = torch.log(s) - torch.log1p(-s)
        logdet = (math.log(1 - 2 * self.alpha) - torch.log(s) - torch.log1p(-s)).flatten(1).sum(1)
        return y, logdet

    def inverse(self, y: torch.Tensor, **_: object) -> torch.Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)


def uniform_dequantize(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(x * 255 + u) / 256`` with ``u ~ U[0, 1)``: 8-bit images in ``[0, 1]`` to continuous ``[0, 1)``."""
    u = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=generator)
    return (x * 255.0 + u) / 256.0


def standard_normal_logprob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed per sample."""
    return (-0.5 * (z**2 + math.log(2 * math.pi))).flatten(1).sum(1)


def _flat_with_means(z: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``z`` flattened per sample, after checking that ``means`` is ``(K, D)`` for its ``D``."""
    z = z.flatten(1)
    if means.dim() != 2 or means.shape[1] != z.shape[1]:
        raise ValueError(f"means must have shape (K, {z.shape[1]}), got {tuple(means.shape)}")
    return z


def gaussian_component_logprob(z: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``log N(z; mu_k, I)`` per sample and component, ``(B, K)``, for ``means`` ``(K, D)`` and ``z`` ``(B, D...)``;
    under equal weights its softmax over ``k`` is the posterior of the components."""
    z = _flat_with_means(z, means)
    # |z - mu_k|^2 = |z|^2 - 2 z.mu_k + |mu_k|^2 (B, K): one matmul instead of a (B, K, D) difference (3x faster at
    # 32 x 50 x 784); the rounding is relative to |z|^2, below 1e-4 nats in float32 at D = 784; clamped at 0
    sq = (z.pow(2).sum(1, keepdim=True) - 2.0 * z @ means.t() + means.pow(2).sum(1)).clamp_min(0.0)
    return -0.5 * sq - 0.5 * z.shape[1] * math.log(2 * math.pi)


def gaussian_mixture_logprob(z: torch.Tensor, means: torch.Tensor, component: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """``log (1/K) sum_k N(z; mu_k, I)`` summed per sample, for ``means`` ``(K, D)`` and ``z`` ``(B, D...)``: an
    equal mixture of unit Gaussians around learnt means (the prior of FlowGMM, Izmailov et al. 2020). With
    ``component`` (``(B,)`` indices, a class-conditional model's labels) the joint ``log p(z, k) = log N(z; mu_k, I)
    - log K`` of each sample and its component instead."""
    if component is None:
        return torch.logsumexp(gaussian_component_logprob(z, means), dim=1) - math.log(means.shape[0])
    z = _flat_with_means(z, means)
    if component.shape != z.shape[:1] or component.dtype != torch.int64:
        raise ValueError(f"component must be an int64 tensor of shape ({z.shape[0]},), got {component.dtype} "
                         f"{tuple(component.shape)}")
    if len(component) and not 0 <= int(component.min()) <= int(component.max()) < means.shape[0]:
        raise ValueError(f"component indices must lie in [0, {means.shape[0]}), got {component.tolist()}")
    return standard_normal_logprob(z - means[component]) - math.log(means.shape[0])


def bits_per_dim(logp: torch.Tensor, dims: int, n_bins: int = 256) -> torch.Tensor:
    """``-(log p(x) - D log n_bins) / (D log 2)`` for ``log p`` of data dequantised to ``[0, 1)``."""
    return -(logp - dims * math.log(n_bins)) / (dims * math.log(2.0))


class SequentialFlow(nn.Module):
    """Chain of flow layers: ``forward(x) -> (z, logdet)``, ``inverse(z)``."""

    def __init__(self, layers: Iterable[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_tensor(x, "x")
        check_finite(x, "x")
        logdet = _zeros(x)
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Invert layer by layer; ``kwargs`` (``tol``, ``max_iter``, ``on_fail``, ``method``) reach the
        residual blocks."""
        check_tensor(z, "z")
        check_finite(z, "z")
        for layer in reversed(self.layers):
            z = layer.inverse(z, **kwargs)
        return z

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x) = log N(f(x)) + log |det J_f(x)|`` per sample."""
        z, logdet = self(x)
        return standard_normal_logprob(z) + logdet

    def lipschitz_bounds(self) -> list[float]:
        """Certified bound of every residual branch, in order."""
        return [m.lipschitz_bound() for m in self.modules() if isinstance(m, ContractiveBlock)]
