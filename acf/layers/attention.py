"""Lipschitz-constrained self-attention layers of ACF (paper section 3).

Every layer reads an NCHW image ``x`` as ``X^T`` in ``R^{D x N}`` (``N = H*W`` positions, ``D``
channels: ``x.flatten(2)``, a view; never a reshape to ``(N, D)``, which would scramble positions
and channels), computes a multi-head attention ``F(X)`` divided by a certified bound
``L >= Lip_2(F)``, and returns the contractive output of eq. 13 normalised by ``1 + |gamma|``::

    out = (X + gamma * F(X) / L) / (1 + |gamma|)          (eq. 13, divided by 1 + |gamma|)

Eq. 13 alone has ``Lip(out) <= 1 + |gamma|``, which breaks the contraction of the residual
branch as soon as gamma moves away from 0 (the published code ignores this). Dividing by
``1 + |gamma|`` gives ``Lip(out) <= (1 + |gamma| Lip(F)/L) / (1 + |gamma|) <= 1`` for every
gamma, so the branch's certificate is the product of its convolutions' norms alone. At
``gamma = 0`` the layer is the identity, as in the paper.

Layout: the layers compute the transposes (``Q^T = W^Q^T X^T`` and so on), so every tensor stays
channel-major like the image around it; a head's ``(N, d)`` queries are a transposed view of a
contiguous ``(d, N)`` block, which the CPU kernels read and write in place. Nothing is copied between
the image and the attention, and the convolutions and activations around the layer keep contiguous
NCHW tensors in the forward pass and in every VJP.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from .._checks import check_choice, check_finite_parameter, check_gamma_init, check_image, check_int, check_real
from ..ops.l2_attention import l2_attention
from .attention_bounds import (head_norms, l2_mha_lipschitz_bound, l2_tight_constant, lipnorm_lipschitz_bound,
                               spectral_norm_exact)


def channel_mix(w: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """``(X W)^T = W^T X^T`` for ``X^T`` of shape ``(B, D, N)``: one batched product on the expanded
    weight, which keeps the result and its input gradient contiguous (``W^T @ X^T`` would fold the
    batch into a copied ``(B N, D)`` matrix, forward and in every VJP)."""
    return torch.bmm(w.t().expand(xt.shape[0], -1, -1), xt)


# How a layer's certified attention ``A~ = F / L`` (``||J_A~|| <= 1``) joins its input ``X``: the form's
# output, its channels, and the initial weight of the attention path (``weight=None``). Every form is
# 1-Lipschitz for every value of its learnt weight (docs/design.md, section 3).
#   "residual"   (X + gamma A~) / (1 + |gamma|): eq. 13 normalised; weight gamma, 0 = the identity (the paper)
#   "quadrature" [eta1 X ; eta2 A~] (channels doubled), eta1 = cos theta, eta2 = sin theta: weight eta2
#   "normalized" A~ alone: the attention inside a gated attention block (``acf.layers.branches``)
LAYER_FORMS = {"residual": 0.0, "quadrature": 0.2, "normalized": None}
POSITION_INIT = 0.1  # standard deviation of the positional embedding's entries at initialisation
# L2TightAttention: its head layouts, its defaults (a model's too: ``acf.models.AttentionSettings``; the class
# docstring says why), and the widest logit range it accepts.
HEAD_LAYOUTS = ("grouped", "multihead")
DEFAULT_DELTA_MAX, DEFAULT_RADIUS, DEFAULT_LAYOUT = 0.5, 1.0, "grouped"
DELTA_LIMIT = 20.0


def _over_bound(out_scale: torch.Tensor | float, bound: torch.Tensor) -> torch.Tensor:
    """``out_scale / L`` for a certified bound ``L > 0``, and 0 (gradients 0) for ``L = 0``: a zero weight
    makes ``F`` identically 0 and ``L = 0``, and ``F / L`` must then be 0, not ``0 / 0 = NaN``, so that the
    layer outputs exactly its identity part ``X / (1 + |gamma|)``."""
    positive = bound > 0
    return torch.where(positive, out_scale / torch.where(positive, bound, torch.ones_like(bound)),
                       torch.zeros_like(bound))


class _ContractiveAttention(nn.Module):
    """NCHW <-> (B, D, N) plumbing, and the form that joins ``A~ = F / L`` to its input (``LAYER_FORMS``).

    With ``ablated = True`` the attention path is zeroed (``A~ = 0``): the knock-out that measures what
    the attention contributes to a trained model (``attention_ablated``). ``pull = (a, b)``, two scalar
    tensors (normally None), adds ``a X`` to the identity part of the output and ``b A~`` to the
    attention part: at ``a = b = 0`` their gradients are the loss's derivatives along the identity and
    the attention directions (``acf.experiments.measurements.attention_pull``)."""

    certified = True
    label = ""  # how tables name the kind (``acf.experiments``)

    def __init__(self, channels: int, heads: int, form: str = "residual", weight: float | None = None,
                 tokens: int = 0) -> None:
        super().__init__()
        check_int(channels, "channels", minimum=1)
        check_int(heads, "heads", minimum=1)
        if heads < 1 or channels % heads != 0:
            raise ValueError(f"heads={heads} must divide channels={channels} (head dim = channels / heads)")
        check_choice(form, "attention form", tuple(LAYER_FORMS))
        self.channels, self.heads, self.head_dim = channels, heads, channels // heads
        self.form, self.ablated = form, False
        self.pull: tuple[torch.Tensor, torch.Tensor] | None = None
        check_int(tokens, "tokens", minimum=0)  # N > 0: a learnt positional embedding P (D x N)
        self.positions = nn.Parameter(POSITION_INIT * torch.randn(channels, tokens)) if tokens else None
        w0 = LAYER_FORMS[form] if weight is None else weight
        if form == "residual":
            self.gamma = nn.Parameter(torch.tensor(check_gamma_init(w0)))
        elif form == "quadrature":  # eta2 = sin(theta) in [0, 1)
            self.theta = nn.Parameter(torch.tensor(math.asin(check_real(w0, "gamma_init (the quadrature form's "
                                                                          "eta2)", 0.0, 1.0, high_open=True))))
        elif weight is not None:
            raise ValueError("the normalized attention form has no weight of its own (its block's gate has)")

    @property
    def out_channels(self) -> int:
        """Channels of the layer's output: the input's, doubled by the quadrature form."""
        return 2 * self.channels if self.form == "quadrature" else self.channels

    def _check_weight(self) -> None:
        """A non-finite learnt weight (gamma, or theta of the quadrature form) would make the output NaN
        and has no certificate: ``NonFiniteError`` naming it."""
        if self.form != "normalized":
            check_finite_parameter(self, "gamma" if self.form == "residual" else "theta")

    def attention_weight(self) -> torch.Tensor:
        """The learnt weight of the attention path: gamma (residual), eta2 (quadrature), 1 (normalized)."""
        if self.form == "residual":
            return self.gamma
        return torch.sin(self.theta) if self.form == "quadrature" else torch.ones(())

    def _weight(self, cols: int) -> nn.Parameter:
        return nn.Parameter(torch.randn(self.channels, cols) / math.sqrt(self.channels))

    def _split_heads(self, yt: torch.Tensor) -> torch.Tensor:
        """``(B, D', N)`` transposed features -> ``(B, H, N, D'/H)`` per-head views (no copy)."""
        b, cols, n = yt.shape
        return yt.reshape(b, self.heads, cols // self.heads, n).transpose(-1, -2)

    def _merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, e)`` -> ``(B, H e, N)`` transposed features (a view for column-major heads)."""
        b, h, n, e = y.shape
        return y.transpose(-1, -2).reshape(b, h * e, n)

    def attend(self, xt: torch.Tensor, out_scale: torch.Tensor | float = 1.0) -> torch.Tensor:  # pragma: no cover
        """``out_scale * (F(X) / L)^T`` on ``X^T`` of shape ``(B, D, N)`` (the scalar is folded into
        ``W^O``, which saves a pass over the output in the forward and in every VJP)."""
        raise NotImplementedError

    def attention(self, xt: torch.Tensor, out_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        """``out_scale * A~(X)^T``: ``F(X + P) / L`` with the positional embedding ``P`` (if any; a
        translation of the input, which leaves the Lipschitz constant as it is); zero when ablated."""
        if self.ablated:
            return torch.zeros_like(xt)
        return self.attend(xt if self.positions is None else xt + self.positions, out_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.channels)
        self._check_weight()
        xt = x.flatten(2)  # (B, D, N) = X^T: channel-major, a view of the image
        b, _, h, w = x.shape
        a, p = self.pull if self.pull is not None else (0.0, 0.0)
        if self.form == "residual":
            norm = 1.0 + self.gamma.abs()
            out = torch.addcmul(self.attention(xt, self.gamma / norm + p), 1.0 / norm + a, xt)  # (gamma A~ + X) / norm
        elif self.form == "quadrature":
            out = torch.cat([(torch.cos(self.theta) + a) * xt, self.attention(xt, torch.sin(self.theta) + p)], dim=1)
        else:
            out = self.attention(xt, 1.0 + p)
        return out.reshape(b, -1, h, w)

    def lipschitz_bound(self) -> float:
        """Certified ``Lip_2`` of the layer: 1 for every form (docs/design.md, section 3); a non-finite
        learnt weight has no certificate (``NonFiniteError`` naming it)."""
        self._check_weight()
        return 1.0 if self.certified else math.inf


class L2MultiheadAttention(_ContractiveAttention):
    """L2 multi-head self-attention with keys tied to queries (Kim et al. 2021; paper eq. 9-12).

    ``q_h = X W^Q_h``, ``P_h = softmax(-||q_i - q_j||^2 / sqrt(d))``,
    ``f_h = P_h X A_h W^V_h = P_h q_h M_h`` with ``M_h = W^Q_h^T W^V_h / sqrt(d)`` (d x d, so the
    D x D matrix ``A_h`` is never formed), ``F = [f_1 ... f_H] W^O``.
    """

    label = "L2"

    def __init__(self, channels: int, heads: int = 4, backend: str = "auto", form: str = "residual",
                 weight: float | None = None, tokens: int = 0) -> None:
        super().__init__(channels, heads, form, weight, tokens)
        self.w_q, self.w_v, self.w_o = self._weight(channels), self._weight(channels), self._weight(channels)
        self.backend = backend  # the l2_attention backend (acf.ops.backends.BACKENDS)

    def bound(self, n: int) -> torch.Tensor:
        return l2_mha_lipschitz_bound(self.w_q, self.w_v, self.w_o, self.heads, n)

    def _head_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``W^Q_h^T`` ``(H, d, D)`` and ``M_h = W^Q_h^T W^V_h / sqrt(d)`` ``(H, d, d)``."""
        d, h = self.head_dim, self.heads
        wq = self.w_q.reshape(self.channels, h, d).permute(1, 2, 0)
        return wq, wq @ self.w_v.reshape(self.channels, h, d).transpose(0, 1) / math.sqrt(d)

    def attend(self, xt: torch.Tensor, out_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        b, _, n = xt.shape
        d, h = self.head_dim, self.heads
        qt = channel_mix(self.w_q, xt)                               # (B, D, N) = Q^T
        _, m = self._head_maps()
        mt = m.transpose(1, 2).expand(b, h, d, d).reshape(b * h, d, d)
        vt = torch.bmm(mt, qt.reshape(b * h, d, n)).reshape(b, h, d, n)  # (Q_h M_h)^T
        o = l2_attention(self._split_heads(qt), vt.transpose(-1, -2), scale=1.0 / math.sqrt(d), backend=self.backend)
        return channel_mix(self.w_o * _over_bound(out_scale, self.bound(n)), self._merge_heads(o))


class LipNormAttention(_ContractiveAttention):
    """Dot-product attention with LipschitzNorm (Dasoulas et al. 2021; paper eq. 14-15).

    Per head, ``S = Q K^T / max(u v, u w, v w)`` with ``u = ||Q||_F`` and ``v``, ``w`` the largest
    row 2-norms of ``K`` and ``V``, recomputed on every forward from the current input and weights."""

    label = "LipNorm"
    eps = 1e-12

    def __init__(self, channels: int, heads: int = 4, form: str = "residual", weight: float | None = None,
                 tokens: int = 0) -> None:
        super().__init__(channels, heads, form, weight, tokens)
        self.w_qkv, self.w_o = self._weight(3 * channels), self._weight(channels)

    def bound(self) -> torch.Tensor:
        return lipnorm_lipschitz_bound(self.w_qkv, self.w_o)

    def attend(self, xt: torch.Tensor, out_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        q, k, v = (self._split_heads(t) for t in channel_mix(self.w_qkv, xt).chunk(3, dim=1))
        u = torch.linalg.vector_norm(q, dim=(-2, -1))  # ||Q||_F          (B, H)
        kv = k.norm(dim=-1).amax(dim=-1)               # max_j ||k_j||_2  (B, H)
        vw = v.norm(dim=-1).amax(dim=-1)               # max_j ||v_j||_2  (B, H)
        denom = torch.maximum(torch.maximum(u * kv, u * vw), kv * vw).clamp_min(self.eps)
        p = torch.softmax((q / denom[..., None, None]) @ k.transpose(-1, -2), dim=-1)  # scale Q, not N x N
        return channel_mix(self.w_o * _over_bound(out_scale, self.bound()), self._merge_heads(p @ v))


class DotProductAttention(_ContractiveAttention):
    """Plain ``softmax(Q K^T / sqrt(d)) V`` (ablation only): not Lipschitz (its Jacobian grows with the
    input scale), so no certificate."""

    certified = False
    label = "dot"

    def __init__(self, channels: int, heads: int = 4, form: str = "residual", weight: float | None = None,
                 tokens: int = 0) -> None:
        super().__init__(channels, heads, form, weight, tokens)
        self.w_qkv, self.w_o = self._weight(3 * channels), self._weight(channels)

    def attend(self, xt: torch.Tensor, out_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        q, k, v = (self._split_heads(t) for t in channel_mix(self.w_qkv, xt).chunk(3, dim=1))
        p = torch.softmax((q / math.sqrt(self.head_dim)) @ k.transpose(-1, -2), dim=-1)
        return channel_mix(self.w_o * out_scale, self._merge_heads(p @ v))


def ball_projection(xt: torch.Tensor, radius: float) -> torch.Tensor:
    """Each token (a column of ``X^T``, ``(..., D, N)``) projected onto the ball of radius ``R``:
    ``x min(1, R / ||x||)``, the metric projection (1-Lipschitz per token, so in the Frobenius norm)."""
    norms = torch.linalg.vector_norm(xt, dim=-2, keepdim=True)
    return xt * (radius / norms.clamp_min(radius))


class L2TightAttention(_ContractiveAttention):
    """L2 attention with a certificate within a few times of the truth (``"l2-tight"``).

    Kim et al.'s bound for L2 attention must hold for inputs of any size and pays
    ``sqrt(N) W0(N)``; at our sizes it is 100-500x above what any input reaches, so ``F / L`` is tiny
    and ``gamma`` cannot make the layer act. This layer bounds what the attention can see instead.
    On ``X^T`` (``D x N``), with ``H`` heads:

    1. tokens projected onto a ball: ``x~_i = x_i min(1, R / ||x_i||)`` (``ball_projection``; with
       ``layout="grouped"`` each head's part of the token onto its own ball, a projection onto a
       product of balls, also 1-Lipschitz);
    2. per head ``h``, queries ``q_i = Q_h^T x~_i`` and tied-key logits ``l_ij = -||q_i - q_j||^2 / tau_h``
       with ``tau_h = 4 ||Q_h||^2 R^2 / Delta``: since ``||q_i - q_j|| <= 2 ||Q_h|| R``, every logit lies
       in ``[-Delta, 0]``;
    3. ``P = softmax_j(l)``, values ``m_j = M_h^T x~_j``, ``f_h(X) = P m``;
    4. ``layout="grouped"``: head ``h`` reads and writes its own ``D / H`` channels (``Q_h``, ``M_h``
       square; ``heads=1`` is one shared map over all channels) and ``L = f(Delta, N) max_h ||M_h||``;
       ``layout="multihead"``: every head reads all channels, ``M_h = V_h O_h`` with
       ``F = [f_1 .. f_H] O`` and ``L = f(Delta, N) min(sum_h ||V_h O_h||, ||O|| sqrt(sum_h ||V_h||^2))``.

    Certificate (one map; ``f = l2_tight_constant``). With ``y_i = sum_j P_ij m_j``,
    ``dy_i = sum_j P_ij M^T dx~_j + sum_j P_ij dl_ij (m_j - y_i)`` and
    ``dl_ij = -(2 / tau) a_ij^T (dq_i - dq_j)``, ``a_ij = q_i - q_j``:

    * value term: ``||P (x) M^T|| <= ||P|| ||M||``, ``||P||_2 <= sqrt(||P||_1 ||P||_inf) = sqrt(c)``: rows
      sum to 1 and, the logits spanning ``Delta`` (``l_ii = 0``), ``P_ii <= 1 / (1 + (N-1) e^-Delta)``,
      ``P_ij <= 1 / (2 + (N-2) e^-Delta)`` for ``j != i``, which bounds every column sum by ``c``;
    * self term (``dq_i``): ``-(2/tau) sum_j P_ij (m_j - y_i) a_ij^T = (2/tau) M^T C_i Q`` with ``C_i`` the
      covariance of ``x~`` under ``P_i.``, ``||C_i|| <= R^2`` inside the ball: norm
      ``<= (2/tau) ||M|| R^2 ||Q||^2 = (Delta / 2) ||M||``, block-diagonal over tokens;
    * cross term (``dq_j``): by Cauchy-Schwarz over ``j``, ``||sum_j P_ij (m_j - y_i) a_ij^T dq_j||^2 <=
      Var_{P_i}(m) sum_j P_ij ||a_ij||^2 ||dq_j||^2`` with ``Var <= ||M||^2 R^2`` and
      ``||a_ij||^2 = tau t_ij``, ``t_ij = -l_ij in [0, Delta]``; summing over ``i``, the column sums
      ``sum_i P_ij t_ij <= G`` give ``(4 / tau^2) ||M||^2 R^2 tau G ||Q||^2 = Delta G ||M||^2``.

    So ``Lip <= ||M|| (sqrt(c) + Delta/2 + sqrt(Delta G))``, independent of ``R`` and of the scale of
    ``Q`` (the layer is invariant to both). ``tests/test_l2_tight.py`` searches adversarially for the
    Jacobian's norm and reports the tightness (found / certified). The price: attention weights within
    a factor ``e^Delta`` of each other (soft attention), and tokens longer than ``R`` are shortened.

    Args:
        channels, heads: ``D`` and ``H`` (``H`` divides ``D``).
        delta_max: the logit range ``Delta``. Default 0.5: the adversarial search reaches 0.49-0.51 of
            the certificate there (0.32-0.35 at 1, 0.19-0.24 at 2); attention weights then differ by at
            most a factor ``e^0.5 = 1.65`` (``acf experiment tight`` compares 0.5, 1 and 2 in training).
        radius: ``R``, in units of the square root of the channels a head reads (``D / H`` grouped,
            ``D`` multihead): the norm of such a token with unit entries. Default 1: measured on the
            default run, 99% of the tokens reaching the attention have norms below 0.85-1.8 of it
            (medians 0.12-0.35).
        layout: ``"grouped"`` or ``"multihead"`` (see above).
        backend: the ``l2_attention`` backend (the fused kernels compute ``softmax(l) m`` unchanged).
    """

    label = "L2-tight"

    def __init__(self, channels: int, heads: int = 4, delta_max: float = DEFAULT_DELTA_MAX,
                 radius: float = DEFAULT_RADIUS, layout: str = DEFAULT_LAYOUT, backend: str = "auto",
                 form: str = "residual", weight: float | None = None, tokens: int = 0) -> None:
        super().__init__(channels, heads, form, weight, tokens)
        if not (isinstance(delta_max, (int, float)) and 0 < delta_max <= DELTA_LIMIT):
            raise ValueError(f"delta_max must be in (0, {DELTA_LIMIT:g}], got {delta_max!r}")
        if not (isinstance(radius, (int, float)) and 0 < radius < math.inf):
            raise ValueError(f"radius must be a positive number, got {radius!r}")
        if layout not in HEAD_LAYOUTS:
            raise ValueError(f"layout must be {' or '.join(map(repr, HEAD_LAYOUTS))}, got {layout!r}")
        self.delta_max, self.layout, self.backend = float(delta_max), layout, backend
        d = self.head_dim
        self.radius = float(radius) * math.sqrt(d if layout == "grouped" else channels)  # R, absolute
        if layout == "grouped":  # per head: Q_h, M_h (d x d) on the head's own channels
            self.w_q = nn.Parameter(torch.randn(heads, d, d) / math.sqrt(d))
            self.w_m = nn.Parameter(torch.randn(heads, d, d) / math.sqrt(d))
        else:  # per head: Q_h, V_h (D x d) on all channels; O (D x D)
            self.w_q, self.w_v, self.w_o = self._weight(channels), self._weight(channels), self._weight(channels)

    def value_norm(self) -> torch.Tensor:
        """The ``||M||`` factor of the bound (exact spectral norms, differentiable)."""
        if self.layout == "grouped":
            return spectral_norm_exact(self.w_m).amax()
        v_h = self.w_v.reshape(self.channels, self.heads, self.head_dim).transpose(0, 1)  # (H, D, d)
        o_h = self.w_o.reshape(self.heads, self.head_dim, self.channels)                   # (H, d, D)
        summed = spectral_norm_exact(v_h @ o_h).sum()
        concat = spectral_norm_exact(self.w_o) * spectral_norm_exact(v_h).norm()
        return torch.minimum(summed, concat)

    def bound(self, n: int) -> torch.Tensor:
        """Certified ``Lip_2(F)`` on ``N`` tokens: ``f(Delta, N) ||M||``."""
        return l2_tight_constant(self.delta_max, n) * self.value_norm()

    def inv_sqrt_tau(self) -> torch.Tensor:
        """``1 / sqrt(tau_h) = sqrt(Delta) / (2 ||Q_h|| R)`` per head, shaped ``(H, 1, 1)``."""
        grouped = self.layout == "grouped"
        q_norm = spectral_norm_exact(self.w_q) if grouped else head_norms(self.w_q, self.heads)  # (H,)
        return (math.sqrt(self.delta_max) / (2.0 * self.radius * q_norm.clamp_min(1e-12))).view(self.heads, 1, 1)

    def _queries(self, xt: torch.Tensor) -> torch.Tensor:
        """``q / sqrt(tau_h)`` per head, ``(B, H, N, d)`` (column-major views), so the kernels' scale is 1;
        ``xt`` is ``(B, H, d, N)`` (grouped) or ``(B, D, N)`` (multihead), projected."""
        if self.layout == "grouped":
            qt = self.w_q.mT @ xt                                          # (B, H, d, N) = (Q_h^T x~)
        else:
            qt = channel_mix(self.w_q, xt).reshape(xt.shape[0], self.heads, self.head_dim, xt.shape[-1])
        return (qt * self.inv_sqrt_tau()).transpose(-1, -2)

    def attend(self, xt: torch.Tensor, out_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        b, _, n = xt.shape
        h, d = self.heads, self.head_dim
        scale = _over_bound(out_scale, self.bound(n))
        if self.layout == "grouped":
            xt = ball_projection(xt.reshape(b, h, d, n), self.radius)     # (B, H, d, N): each head's tokens
            q = self._queries(xt)
            vt = (self.w_m * scale).mT @ xt                                # (B, H, d, N) = (M_h^T x~)
            o = l2_attention(q, vt.transpose(-1, -2), scale=1.0, backend=self.backend)
            return self._merge_heads(o)
        xt = ball_projection(xt, self.radius)
        q = self._queries(xt)
        vt = channel_mix(self.w_v, xt)                                     # (B, D, N) = (X~ V)^T
        o = l2_attention(q, self._split_heads(vt), scale=1.0, backend=self.backend)
        return channel_mix(self.w_o * scale, self._merge_heads(o))


def set_attention_backend(module: nn.Module, backend: str) -> nn.Module:
    """Use ``backend`` for the L2 attention of every ``L2MultiheadAttention`` and ``L2TightAttention``
    inside ``module``."""
    for m in module.modules():
        if isinstance(m, (L2MultiheadAttention, L2TightAttention)):
            m.backend = backend
    return module


# The attention kinds by name, in the order they are offered: the one list (a model's ``attention``, the
# command line's ``--attention``, the experiments' layer classes all come from it).
ATTENTIONS = {"l2": L2MultiheadAttention, "l2-tight": L2TightAttention, "lipnorm": LipNormAttention,
              "dot": DotProductAttention}


def make_attention(kind: str, channels: int, heads: int = 4, gamma_init: float | None = None,
                   form: str = "residual", **options) -> nn.Module:
    """Build an attention layer by name: ``"l2"``, ``"l2-tight"``, ``"lipnorm"`` or ``"dot"``
    (ablation), joined to its input by ``form`` (``LAYER_FORMS``), the attention path's weight starting
    at ``gamma_init`` (None: the form's default; residual: 0, the paper's choice, starts as the
    identity); ``options`` go to its constructor (e.g. ``delta_max`` for ``"l2-tight"``). Its weights are
    drawn without advancing the global random stream, so that a model with attention initialises every
    other layer as its twin without attention does (paired comparisons)."""
    if kind not in ATTENTIONS:
        raise ValueError(f"unknown attention {kind!r}; choose one of {sorted(ATTENTIONS)} or None")
    with torch.random.fork_rng(devices=[]):  # the layers built after it start as they would without it
        return ATTENTIONS[kind](channels, heads, form=form, weight=gamma_init, **options)


def attention_layers(module: nn.Module) -> list[_ContractiveAttention]:
    """Every attention layer inside ``module``, in order."""
    return [m for m in module.modules() if isinstance(m, _ContractiveAttention)]


@contextlib.contextmanager
def attention_ablated(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every attention path of ``module`` is zeroed (``A~ = 0``; the residual form then
    returns ``X / (1 + |gamma|)``, the quadrature form ``[eta1 X ; 0]``, a gated attention block the
    identity): the knock-out that shows what the attention contributes. Every form stays 1-Lipschitz,
    so the ablated model is still a certified flow and its bits/dim are a likelihood."""
    layers = attention_layers(module)
    before = [layer.ablated for layer in layers]  # nested knock-outs restore what they found
    for layer in layers:
        layer.ablated = True
    try:
        yield module
    finally:
        for layer, was in zip(layers, before):
            layer.ablated = was
