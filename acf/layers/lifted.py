"""Attention on a lifted input: ``A~(K x + b)`` computed at the rank of ``x``.

In a gated attention block (``acf.layers.branches.AttentionBranch``) the attention reads ``K x + b``, the
block's ``c`` channels lifted to ``D`` by a 1x1 convolution. When ``c`` is below the head dim ``d`` (at
full resolution an MNIST block has one channel, a head 16 to 64 dimensions), every head's queries and
values lie in a ``c``- or ``(c + 1)``-dimensional space, and the attention passes (forward, VJPs, double
VJPs), whose cost grows with the head dim, run there instead: the same function, to rounding.

* L2 (``L2MultiheadAttention``, eq. 9-12): ``Q_h = X A_h + 1 beta_h^T`` with ``A_h = K^T W^Q_h`` (c x d) and
  ``beta_h = W^Q_h^T b``. The logits see ``||A_h^T (x_i - x_j)|| = ||R_h (x_i - x_j)||`` (reduced QR
  ``A_h^T = U_h R_h``; the bias cancels), so the attention runs on queries ``R_h x_i`` and values ``x_i``:
  ``Y_h = P_h X``. Rows of ``P_h`` sum to 1, so ``P_h V_h = Y_h A_h M_h + 1 beta_h^T M_h`` and
  ``F = sum_h Y_h A_h M_h W^O_h + 1 sum_h beta_h^T M_h W^O_h``.
* L2-tight, grouped heads (``L2TightAttention``): head ``h`` reads ``x_hi = K_h x_i + b_h = [K_h b_h] z_i``,
  ``z_i = [x_i; 1]``; the ball projection scales it by ``s_i = R / max(R, ||x_hi||)``, queries and values
  are linear in ``s_i z_i``, so the attention runs on queries ``T_h s_i z_i`` (``||[A b] u|| = ||T u||``,
  ``gram_factor``) and values ``s_i z_i``; ``F_h = Y_h ([K_h b_h]^T M_h) / L``. The bias does not cancel here
  (the per-token ``s_i``), hence ``c + 1``.

Elsewhere (``c`` at least the head dim, positional embeddings, a knock-out or a pull, other kinds and
layouts: ``attends_lifted`` is False; a rank-deficient lift: ``attend_lifted`` returns None) the layer runs
on ``K x + b`` as usual.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.l2_attention import l2_attention
from .attention import L2MultiheadAttention, L2TightAttention, _ContractiveAttention, _over_bound, channel_mix


def attends_lifted(layer: nn.Module, c: int) -> bool:
    """Whether ``attend_lifted`` computes ``layer`` on ``c`` lifted channels at a lower head dim."""
    if not isinstance(layer, _ContractiveAttention) or layer.form != "normalized" or layer.ablated \
            or layer.positions is not None or layer.pull is not None:
        return False
    if isinstance(layer, L2MultiheadAttention):
        return c < layer.head_dim
    return isinstance(layer, L2TightAttention) and layer.layout == "grouped" and c + 1 < layer.head_dim


def attend_lifted(layer: nn.Module, xc: torch.Tensor, k: torch.Tensor,
                  b: torch.Tensor | None) -> torch.Tensor | None:
    """``layer``'s normalized attention ``A~(K xc + b)^T``, ``(B, D, N)``, for ``xc`` ``(B, c, N)``, ``K``
    ``(D, c)`` and ``b`` ``(D,)`` (or None), computed at the rank of ``xc`` (``attends_lifted`` must hold);
    None where a factor is rank deficient (a zeroed input channel: QR's derivative would divide by 0)."""
    b = k.new_zeros(k.shape[0]) if b is None else b
    return (_l2 if isinstance(layer, L2MultiheadAttention) else _l2_tight)(layer, xc, k, b)


def _full_rank(r: torch.Tensor) -> bool:
    """Whether the triangular factors ``r`` have no diagonal entry below ``sqrt(eps)`` of their norm."""
    diagonal = r.diagonal(dim1=-2, dim2=-1).abs()
    floor = torch.finfo(r.dtype).eps ** 0.5 * torch.linalg.matrix_norm(r).unsqueeze(-1)
    return bool((diagonal > floor).all())


def gram_factor(m: torch.Tensor) -> torch.Tensor:
    """An upper-triangular ``T`` with ``||m u|| = ||T u||`` for every ``u``, for ``m = [A beta]`` ``(..., d, c + 1)``
    with ``A`` of full column rank: ``R`` of ``A``'s reduced QR, ``beta``'s coordinates in its span and the
    norm ``rho`` of the rest. ``rho`` enters the attention only squared (through distances), so its
    derivative at 0 (the bias starts at 0) may be taken as 0, where ``m``'s own QR would divide by it."""
    a, beta = m[..., :-1], m[..., -1:]
    u, r = torch.linalg.qr(a)
    gamma = u.mT @ beta
    rho = torch.linalg.vector_norm(beta - u @ gamma, dim=-2, keepdim=True)
    bottom = torch.cat([torch.zeros_like(gamma.mT), rho], dim=-1)
    return torch.cat([torch.cat([r, gamma], dim=-1), bottom], dim=-2)


def _l2(layer: L2MultiheadAttention, xc: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    bsz, c, n = xc.shape
    d, h, dim = layer.head_dim, layer.heads, layer.channels
    wq, m = layer._head_maps()                                 # (H, d, D) = W^Q_h^T, (H, d, d) = M_h
    a_t = wq @ k                                               # (H, d, c) = A_h^T
    _, r = torch.linalg.qr(a_t)                                # (H, c, c) = R_h
    if not _full_rank(r):
        return None
    queries = (r @ xc.unsqueeze(1)).transpose(-1, -2)          # (B, H, N, c): R_h x_i
    values = xc.unsqueeze(1).expand(bsz, h, c, n).transpose(-1, -2)
    y = l2_attention(queries, values, scale=1.0 / math.sqrt(d), backend=layer.backend)  # (B, H, N, c) = Y_h
    w_o = (layer.w_o * _over_bound(1.0, layer.bound(n))).reshape(h, d, dim)  # (H, d, D) = W^O_h / L
    e = a_t.mT @ m @ w_o                                       # (H, c, D) = A_h M_h W^O_h
    out = channel_mix(e.reshape(h * c, dim), y.transpose(-1, -2).reshape(bsz, h * c, n))
    return out + ((wq @ b).unsqueeze(1) @ m @ w_o).sum(0).reshape(1, dim, 1)


def _l2_tight(layer: L2TightAttention, xc: torch.Tensor, k: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    bsz, c, n = xc.shape
    d, h, radius = layer.head_dim, layer.heads, layer.radius
    lift = torch.cat([k, b[:, None]], dim=1).reshape(h, d, c + 1)     # (H, d, c + 1) = [K_h b_h]
    z = torch.cat([xc, torch.ones_like(xc[:, :1])], dim=1).unsqueeze(1)  # (B, 1, c + 1, N) = z_i
    ball = gram_factor(lift)
    t = gram_factor(layer.w_q.mT @ lift * layer.inv_sqrt_tau())        # queries Q_h^T x~ / sqrt(tau_h)
    if not _full_rank(torch.cat([ball[..., :c, :c], t[..., :c, :c]])):
        return None
    norms_sq = (ball @ z).square().sum(-2, keepdim=True)               # ||x_hi||^2, (B, H, 1, N)
    zs = z * (radius / norms_sq.clamp_min(radius ** 2).sqrt())         # s_i z_i
    y = l2_attention((t @ zs).transpose(-1, -2), zs.transpose(-1, -2), scale=1.0, backend=layer.backend)
    e = (layer.w_m * _over_bound(1.0, layer.bound(n))).mT @ lift      # (H, d, c + 1) = M_h^T [K_h b_h] / L
    return (e @ y.transpose(-1, -2)).reshape(bsz, h * d, n)
