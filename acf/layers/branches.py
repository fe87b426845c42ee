"""Residual branches ``g`` of the three contractive flows, optionally carrying attention.

Each builder returns a module with ``lipschitz_bound()``: the product of its layers' certified
bounds (spectral norms of the normalised convolutions; activations and the normalised attention
contribute 1). The attention layer sits between the convolutions, after the first one (paper fig. 2).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from .._checks import check_image, check_real
from .activations import CLipSwish, make_activation
from .attention import make_attention
from .block import LipschitzChain
from .lifted import attend_lifted, attends_lifted
from .spectral_norm import SpectralConv2d


def _conv_stack(channels: int, hidden: int, input_hw: tuple[int, int], kernels: Sequence[int], coeff: float,
                activation: str, preactivation: bool, attention: Optional[str], heads: int,
                attention_options: Optional[dict]) -> LipschitzChain:
    widths = [channels] + [hidden] * (len(kernels) - 1) + [channels]
    layers: list[nn.Module] = []
    for i, k in enumerate(kernels):
        width = widths[i]
        if preactivation or i > 0:
            layers.append(make_activation(activation))
        if i == 1 and attention is not None:
            layers.append(make_attention(attention, width, heads, **(attention_options or {})))
            width = layers[-1].out_channels  # the quadrature form doubles it
        layers.append(SpectralConv2d(width, widths[i + 1], k, input_hw, coeff=coeff))
    return LipschitzChain(*layers)


def iresnet_branch(channels: int, input_hw: tuple[int, int], hidden: int = 32, coeff: float = 0.97,
                   attention: Optional[str] = None, heads: int = 4, kernels: Sequence[int] = (3, 1, 3),
                   attention_options: Optional[dict] = None) -> LipschitzChain:
    """i-ResNet ``g = W3 . ELU . W2 . ELU . [SA] . W1`` (3-1-3 convolutions, Behrmann et al. 2019);
    ``attention_options`` go to ``make_attention``."""
    return _conv_stack(channels, hidden, input_hw, kernels, coeff, "elu", False, attention, heads, attention_options)


def resflow_branch(channels: int, input_hw: tuple[int, int], hidden: int = 32, coeff: float = 0.97,
                   attention: Optional[str] = None, heads: int = 4, kernels: Sequence[int] = (3, 1, 3),
                   attention_options: Optional[dict] = None, preactivation: bool = True) -> LipschitzChain:
    """Residual Flow ``g = W3 . LS . W2 . LS . [SA] . W1 . LS`` with LipSwish (Chen et al. 2019);
    ``preactivation=False`` drops the first ``LS`` (``g = W3 . LS . W2 . LS . [SA] . W1``), so the branch
    sees the sign of its input; ``attention_options`` go to ``make_attention``."""
    return _conv_stack(channels, hidden, input_hw, kernels, coeff, "lipswish", preactivation, attention, heads,
                       attention_options)


class DenseLayer(nn.Module):
    """``h(x) = [eta1 x ; eta2 CLipSwish(W x)]`` with ``eta1^2 + eta2^2 = c^2`` (i-DenseNet).

    ``Lip(h)^2 <= eta1^2 + eta2^2 ||W||^2`` (the two parts are orthogonal blocks), so ``Lip(h) <= c``.
    """

    def __init__(self, channels: int, growth: int, input_hw: tuple[int, int], coeff: float) -> None:
        super().__init__()
        if growth % 2:
            raise ValueError(f"growth must be even (CLipSwish doubles channels), got {growth}")
        self.conv = SpectralConv2d(channels, growth // 2, 3, input_hw, coeff=coeff)
        self.act = CLipSwish()
        self.coeff = coeff
        self.theta = nn.Parameter(torch.tensor(math.pi / 4))  # eta1 = c cos(theta), eta2 = c sin(theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eta1, eta2 = self.coeff * torch.cos(self.theta), self.coeff * torch.sin(self.theta)
        return torch.cat([eta1 * x, eta2 * self.act(self.conv(x))], dim=1)

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        eta1, eta2 = self.coeff * math.cos(float(self.theta)), self.coeff * math.sin(float(self.theta))
        return math.sqrt(eta1**2 + (eta2 * float(self.conv.lipschitz_bound())) ** 2)


def idensenet_branch(channels: int, input_hw: tuple[int, int], growth: int = 16, depth: int = 3,
                     coeff: float = 0.97, attention: Optional[str] = None, heads: int = 4,
                     attention_options: Optional[dict] = None) -> LipschitzChain:
    """invertible DenseNet ``g = W_out . [SA] . h_depth ... h_1`` (Perugachi-Diaz et al. 2021);
    ``attention_options`` go to ``make_attention``."""
    layers: list[nn.Module] = []
    width = channels
    for _ in range(depth):
        layers.append(DenseLayer(width, growth, input_hw, coeff))
        width += growth
    if attention is not None:
        layers.append(make_attention(attention, width, heads, **(attention_options or {})))
        width = layers[-1].out_channels
    layers.append(SpectralConv2d(width, channels, 1, input_hw, coeff=coeff))
    return LipschitzChain(*layers)


class Gate(nn.Module):
    """Multiplication by a learnt ``w = sigmoid(theta)`` in (0, 1): ``Lip = w``."""

    def __init__(self, weight: float) -> None:
        super().__init__()
        w = check_real(weight, "gamma_init (the gated attention block's weight)", 0.0, 1.0, True, True)
        self.theta = nn.Parameter(torch.tensor(math.log(w / (1.0 - w))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.theta)

    @torch.no_grad()
    def lipschitz_bound(self) -> float:
        return float(torch.sigmoid(self.theta))


GATED_WEIGHT = 0.5  # the gate's initial weight w (``gamma_init=None``)


def attention_branch(channels: int, input_hw: tuple[int, int], attention: str, hidden: int = 32, heads: int = 4,
                     coeff: float = 0.97, gamma_init: Optional[float] = None,
                     attention_options: Optional[dict] = None) -> LipschitzChain:
    """The branch of a gated attention block ``y = x + g(x)`` (after Zha et al., with a sound bound):
    ``g = w . W_out . A~ . W_in`` with 1x1 convolutions ``W_in`` (``channels -> hidden``) and ``W_out``
    (back), the certified attention ``A~ = F / L`` on the ``hidden`` channels (form ``"normalized"``)
    and a learnt gate ``w = sigmoid(theta)`` (``Gate``, starting at ``gamma_init``, default
    ``GATED_WEIGHT``). ``Lip(g) <= w c^2 < 1``; the attention competes with no identity path inside
    ``g``: the block's own ``x`` is the identity, and ``w`` has a gradient at any value (no dead zone)."""
    options = {k: v for k, v in (attention_options or {}).items() if k != "gamma_init"}
    return AttentionBranch(SpectralConv2d(channels, hidden, 1, input_hw, coeff=coeff),
                           make_attention(attention, hidden, heads, form="normalized", **options),
                           SpectralConv2d(hidden, channels, 1, input_hw, coeff=coeff),
                           Gate(GATED_WEIGHT if gamma_init is None else gamma_init))


class AttentionBranch(LipschitzChain):
    """``W_out . A~ . W_in`` then the gate (``attention_branch``). Where the attention can (``attends_lifted``:
    L2 or grouped L2-tight attention whose head dim exceeds the block's channels, as at full resolution),
    ``A~ . W_in`` runs at the rank of the block's input (``acf.layers.lifted``): the same function, with
    attention passes of head dim ``channels`` (or ``channels + 1``) instead of ``hidden / heads``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lift, attention, *rest = self
        if not attends_lifted(attention, lift.in_channels):
            return super().forward(x)
        check_image(x, lift.in_channels)
        bsz, _, height, width = x.shape
        y = attend_lifted(attention, x.flatten(2), lift.normalized_weight().flatten(1), lift.bias)
        if y is None:  # a rank-deficient lift
            return super().forward(x)
        y = y.reshape(bsz, -1, height, width)
        for layer in rest:
            y = layer(y)
        return y


BRANCHES = {"iresnet": iresnet_branch, "resflow": resflow_branch, "idensenet": idensenet_branch}
