"""Affine coupling (Dinh et al. 2017): the uncertified reference flow, with or without attention.

A coupling layer splits the pixels by a checkerboard mask ``m`` and maps

    y = m x + (1 - m) (x exp(s(m x)) + t(m x)),      log det = sum over (1 - m) of s      (RealNVP, eq. 7-9)

Its inverse and log-determinant are exact whatever the conditioner ``(s, t)`` computes, so attention
in the conditioner needs no Lipschitz certificate: this is where attention helps flows in the
literature (Flow++, TarFlow). ``acf experiment attention`` trains it with a convolutional conditioner
and with the same conditioner plus dot-product attention whose output projection starts at zero, to
tell whether attention has anything to add on a data set at all.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_image


def checkerboard(hw: tuple[int, int], parity: int) -> torch.Tensor:
    """``(1, 1, H, W)`` mask, 1 where ``(i + j) % 2 == parity``."""
    i, j = torch.meshgrid(torch.arange(hw[0]), torch.arange(hw[1]), indexing="ij")
    return ((i + j) % 2 == parity).float()[None, None]


class ConditionerAttention(nn.Module):
    """``h + W_o MHA(h)`` with ``W_o`` starting at zero: standard (uncertified) multi-head dot-product
    self-attention over the ``H x W`` positions, as a transformer layer adds it; the zero start makes
    the layer the identity at initialisation with a non-zero gradient for ``W_o`` (no dead zone)."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or channels % heads:
            raise ValueError(f"heads={heads} must divide channels={channels}")
        self.heads = heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = h.shape
        q, k, v = (t.reshape(b, self.heads, c // self.heads, hh * ww).transpose(-1, -2)
                   for t in self.qkv(h).chunk(3, dim=1))
        o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return h + self.out(o.transpose(-1, -2).reshape(b, c, hh, ww))


class AffineCoupling(nn.Module):
    """One checkerboard affine coupling layer; ``attention_heads`` > 0 adds ``ConditionerAttention``
    between the conditioner's convolutions."""

    def __init__(self, channels: int, hw: tuple[int, int], parity: int, hidden: int = 32,
                 attention_heads: int = 0) -> None:
        super().__init__()
        self.channels = channels
        self.register_buffer("mask", checkerboard(hw, parity))
        layers: list[nn.Module] = [nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(hidden, hidden, 1), nn.ReLU()]
        if attention_heads:
            layers.append(ConditionerAttention(hidden, attention_heads))
        last = nn.Conv2d(hidden, 2 * channels, 3, padding=1)
        nn.init.zeros_(last.weight)  # starts as the identity map
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)
        self.scale = nn.Parameter(torch.zeros(1, channels, 1, 1))  # s = scale * tanh(.): bounded log-scales

    def _st(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = self.net(x * self.mask).chunk(2, dim=1)
        free = 1.0 - self.mask
        return self.scale * torch.tanh(s) * free, t * free

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_image(x, self.channels)
        s, t = self._st(x)
        return x * torch.exp(s) + t, s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor, **_: object) -> torch.Tensor:
        s, t = self._st(y)  # the masked half passes unchanged, so the conditioner sees the same input
        return (y - t) * torch.exp(-s)

    def lipschitz_bound(self) -> float:
        """Not certified (and not needed: the inverse is exact)."""
        return math.inf
