"""The certified Lipschitz bounds of the attention layers (``acf.layers.attention``): each layer divides
its attention ``F`` by one of these, ``L >= Lip_2(F)``, so that ``A~ = F / L`` is 1-Lipschitz.

* ``l2_mha_lipschitz_bound``: L2 multi-head attention with tied keys (Kim et al. 2021; paper eq. 12),
  its N-dependent factor ``l2_attention_constant``;
* ``lipnorm_lipschitz_bound``: LipschitzNorm attention (Dasoulas et al. 2021; eq. 15);
* ``l2_tight_constant``: the factor ``f(Delta, N)`` of ``L2TightAttention``'s certificate (its
  docstring holds the proof sketch).

Spectral norms are exact (SVD, ``spectral_norm_exact``) and differentiable.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
from scipy.special import lambertw

LIPNORM_SCORE_BOUND = math.exp(math.sqrt(3.0)) + 2.0 * math.sqrt(6.0)  # eq. 15 with m = n


@lru_cache(maxsize=None)
@torch.compiler.assume_constant_result  # compiled: evaluated once while tracing, a constant
def l2_attention_constant(n: int, d: int) -> float:
    """``sqrt(N / d) * (4 W0((N - 1) / e) + 1)``: the N-dependent factor of Kim et al.'s bound.

    Kim et al. (2021, Thm 3.2) state it with ``phi^{-1}(N - 1)``, ``phi(x) = x e^{x+1}``, i.e.
    ``W0((N - 1) / e)``. The ACF paper (after eq. 12) writes ``W0(N / e)``, which is slightly larger
    and also valid; we use the exact inverse. ``d = D / H`` is the head dimension: the published
    code's ``sqrt(N / D)`` is too small by ``sqrt(H)``.
    """
    w0 = float(lambertw((n - 1) / math.e).real) if n > 1 else 0.0
    return math.sqrt(n / d) * (4.0 * w0 + 1.0)


def head_norms(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Spectral norms of the ``D x d`` column blocks ``W_h`` of ``w`` (one per head), exact (SVD)."""
    d_model = w.shape[0]
    blocks = w.reshape(d_model, heads, -1).transpose(0, 1)
    return spectral_norm_exact(blocks)


def spectral_norm_exact(w: torch.Tensor) -> torch.Tensor:
    """``||W||_2`` by SVD, in at least float32 (half-precision SVD does not exist), differentiable."""
    return torch.linalg.matrix_norm(w.to(torch.promote_types(w.dtype, torch.float32)), ord=2)


def l2_mha_lipschitz_bound(w_q: torch.Tensor, w_v: torch.Tensor, w_o: torch.Tensor, heads: int,
                           n: int) -> torch.Tensor:
    """Certified ``Lip_2`` of L2 multi-head attention with tied keys (eq. 12, Kim et al. Thm 3.2).

    ``L = c(N, d) * sqrt(sum_h (||W^Q_h||^2 ||W^V_h||)^2) * ||W^O||`` with exact spectral norms.
    The square on ``||W^Q_h||`` is required: ``f_h(X) = P_h X W^Q_h W^Q_h^T W^V_h / sqrt(d)`` obeys
    ``f(X; t W^Q) = t f(t X; W^Q)``, so its Lipschitz constant grows as ``t^2``; eq. 12 as printed
    (one power of ``||W^Q||``) fails whenever ``||W^Q||_2 > 1``.
    """
    d = w_q.shape[0] // heads
    per_head = head_norms(w_q, heads) ** 2 * head_norms(w_v, heads)
    return l2_attention_constant(n, d) * per_head.norm() * spectral_norm_exact(w_o)


def lipnorm_lipschitz_bound(w_qkv: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """Certified ``Lip_2`` of LipschitzNorm attention (Dasoulas et al. 2021; eq. 15 with m = n).

    Each head is ``e^{sqrt 3} + 2 sqrt 6``-Lipschitz in its ``(Q_h, K_h, V_h)``; the heads act on
    disjoint parts of ``X [W^Q W^K W^V]``, so ``L = (e^{sqrt 3} + 2 sqrt 6) ||[W^Q W^K W^V]||_2 ||W^O||_2``.
    """
    return LIPNORM_SCORE_BOUND * spectral_norm_exact(w_qkv) * spectral_norm_exact(w_o)


@lru_cache(maxsize=None)
@torch.compiler.assume_constant_result
def l2_tight_constant(delta: float, n: int) -> float:
    """``f(Delta, N) = sqrt(c) + Delta / 2 + sqrt(Delta G)``: ``Lip(F) <= ||M|| f`` for one attention
    map of ``L2TightAttention`` whose logits span at most ``Delta`` over ``N`` tokens (see its docstring).

    ``c = 1 / (1 + (N-1) e^-Delta) + (N-1) / (2 + (N-2) e^-Delta)`` bounds the column sums of P;
    ``G = (N-1) max_{0<=a<=Delta} a e^-a / (1 + e^-a + (N-2) e^-Delta)`` bounds ``sum_i P_ij a_ij``.
    The maximum is taken on a grid of step ``s`` and raised by ``(N-1) s / 2 * sup|h'|`` with
    ``|h'| <= 1.5 / (1 + (N-2) e^-Delta)``, so ``G`` is an upper bound, not an estimate.
    """
    if not (delta > 0 and math.isfinite(delta)) or n < 1:
        raise ValueError(f"l2_tight_constant needs Delta > 0 and N >= 1, got {delta!r}, {n!r}")
    if n == 1:
        return 1.0  # one token: F(x) = M^T x~
    k = (n - 2) * math.exp(-delta)
    c = 1.0 / (1.0 + (n - 1) * math.exp(-delta)) + (n - 1) / (2.0 + k)
    steps = 20_000
    a = torch.linspace(0.0, delta, steps + 1, dtype=torch.float64)
    h = a * torch.exp(-a) / (1.0 + torch.exp(-a) + k)
    g = (n - 1) * (float(h.max()) + (delta / steps) / 2 * 1.5 / (1.0 + k))
    return math.sqrt(c) + delta / 2.0 + math.sqrt(delta * g)
