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

import math
from functools import lru_cache

import torch
from scipy.special import lambertw
from torch import nn

from ._checks import check_image
from .functional import l2_attention

LIPNORM_SCORE_BOUND = math.exp(math.sqrt(3.0)) + 2.0 * math.sqrt(6.0)  # eq. 15 with m = n


@lru_cache(maxsize=None)
def l2_attention_constant(n: int, d: int) -> float:
    """``sqrt(N / d) * (4 W0((N - 1) / e) + 1)``: the N-dependent factor of Kim et al.'s bound.

    Kim et al. (2021, Thm 3.2) state it with ``phi^{-1}(N - 1)``, ``phi(x) = x e^{x+1}``, i.e.
    ``W0((N - 1) / e)``. The ACF paper (after eq. 12) writes ``W0(N / e)``, which is slightly larger
    and also valid; we use the exact inverse. ``d = D / H`` is the head dimension: the published
    code's ``sqrt(N / D)`` is too small by ``sqrt(H)``.
    """
    w0 = float(lambertw((n - 1) / math.e).real) if n > 1 else 0.0
    return math.sqrt(n / d) * (4.0 * w0 + 1.0)


def _head_norms(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Spectral norms of the ``D x d`` column blocks ``W_h`` of ``w`` (one per head), exact (SVD)."""
    d_model = w.shape[0]
    blocks = w.reshape(d_model, heads, -1).transpose(0, 1)
    return _spectral_norm_exact(blocks)


def channel_mix(w: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """``(X W)^T = W^T X^T`` for ``X^T`` of shape ``(B, D, N)``: one batched product on the expanded
    weight, which keeps the result and its input gradient contiguous (``W^T @ X^T`` would fold the
    batch into a copied ``(B N, D)`` matrix, forward and in every VJP)."""
    return torch.bmm(w.t().expand(xt.shape[0], -1, -1), xt)


def _spectral_norm_exact(w: torch.Tensor) -> torch.Tensor:
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
    per_head = _head_norms(w_q, heads) ** 2 * _head_norms(w_v, heads)
    return l2_attention_constant(n, d) * per_head.norm() * _spectral_norm_exact(w_o)


def lipnorm_lipschitz_bound(w_qkv: torch.Tensor, w_o: torch.Tensor) -> torch.Tensor:
    """Certified ``Lip_2`` of LipschitzNorm attention (Dasoulas et al. 2021; eq. 15 with m = n).

    Each head is ``e^{sqrt 3} + 2 sqrt 6``-Lipschitz in its ``(Q_h, K_h, V_h)``; the heads act on
    disjoint parts of ``X [W^Q W^K W^V]``, so ``L = (e^{sqrt 3} + 2 sqrt 6) ||[W^Q W^K W^V]||_2 ||W^O||_2``.
    """
    return LIPNORM_SCORE_BOUND * _spectral_norm_exact(w_qkv) * _spectral_norm_exact(w_o)


class _ContractiveAttention(nn.Module):
    """NCHW <-> (B, N, D) plumbing, learnable gamma and the normalised eq. 13 output."""

    certified = True

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if heads < 1 or channels % heads != 0:
            raise ValueError(f"heads={heads} must divide channels={channels} (head dim = channels / heads)")
        self.channels, self.heads, self.head_dim = channels, heads, channels // heads
        self.gamma = nn.Parameter(torch.zeros(()))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.channels)
        xt = x.flatten(2)  # (B, D, N) = X^T: channel-major, a view of the image
        norm = 1.0 + self.gamma.abs()
        out = torch.addcmul(self.attend(xt, self.gamma / norm), 1.0 / norm, xt)  # (gamma F/L + X) / norm
        return out.reshape(x.shape)

    def lipschitz_bound(self) -> float:
        """Certified ``Lip_2`` of the layer: 1 for the normalised output (see module docstring)."""
        return 1.0 if self.certified else math.inf


class L2MultiheadAttention(_ContractiveAttention):
    """L2 multi-head self-attention with keys tied to queries (Kim et al. 2021; paper eq. 9-12).

    ``q_h = X W^Q_h``, ``P_h = softmax(-||q_i - q_j||^2 / sqrt(d))``,
    ``f_h = P_h X A_h W^V_h = P_h q_h M_h`` with ``M_h = W^Q_h^T W^V_h / sqrt(d)`` (d x d, so the
    D x D matrix ``A_h`` is never formed), ``F = [f_1 ... f_H] W^O``.
    """

    def __init__(self, channels: int, heads: int = 4, backend: str = "auto") -> None:
        super().__init__(channels, heads)
        self.w_q, self.w_v, self.w_o = self._weight(channels), self._weight(channels), self._weight(channels)
        self.backend = backend  # l2_attention backend: "auto", "triton", "sdpa" or "reference"

    def bound(self, n: int) -> torch.Tensor:
        return l2_mha_lipschitz_bound(self.w_q, self.w_v, self.w_o, self.heads, n)

    def attend(self, xt: torch.Tensor, out_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        b, _, n = xt.shape
        d, h = self.head_dim, self.heads
        qt = channel_mix(self.w_q, xt)                               # (B, D, N) = Q^T
        wq = self.w_q.reshape(self.channels, h, d).permute(1, 2, 0)  # (H, d, D) = W^Q_h^T
        wv = self.w_v.reshape(self.channels, h, d).transpose(0, 1)   # (H, D, d) = W^V_h
        m = wq @ wv / math.sqrt(d)                                   # (H, d, d) = M_h
        mt = m.transpose(1, 2).expand(b, h, d, d).reshape(b * h, d, d)
        vt = torch.bmm(mt, qt.reshape(b * h, d, n)).reshape(b, h, d, n)  # (Q_h M_h)^T
        o = l2_attention(self._split_heads(qt), vt.transpose(-1, -2), scale=1.0 / math.sqrt(d), backend=self.backend)
        return channel_mix(self.w_o * (out_scale / self.bound(n)), self._merge_heads(o))


class LipNormAttention(_ContractiveAttention):
    """Dot-product attention with LipschitzNorm (Dasoulas et al. 2021; paper eq. 14-15).

    Per head, ``S = Q K^T / max(u v, u w, v w)`` with ``u = ||Q||_F`` and ``v``, ``w`` the largest
    row 2-norms of ``K`` and ``V``, recomputed on every forward from the current input and weights.
    """

    eps = 1e-12

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__(channels, heads)
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
        return channel_mix(self.w_o * (out_scale / self.bound()), self._merge_heads(p @ v))


class DotProductAttention(_ContractiveAttention):
    """Plain ``softmax(Q K^T / sqrt(d)) V`` (ablation only): not Lipschitz, so no certificate.

    ``out = (X + gamma F) / (1 + |gamma|)``; its Jacobian grows with the input scale.
    """

    certified = False

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__(channels, heads)
        self.w_qkv, self.w_o = self._weight(3 * channels), self._weight(channels)

    def attend(self, xt: torch.Tensor, out_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
        q, k, v = (self._split_heads(t) for t in channel_mix(self.w_qkv, xt).chunk(3, dim=1))
        p = torch.softmax((q / math.sqrt(self.head_dim)) @ k.transpose(-1, -2), dim=-1)
        return channel_mix(self.w_o * out_scale, self._merge_heads(p @ v))


def set_attention_backend(module: nn.Module, backend: str) -> nn.Module:
    """Use ``backend`` for the L2 attention of every ``L2MultiheadAttention`` inside ``module``."""
    for m in module.modules():
        if isinstance(m, L2MultiheadAttention):
            m.backend = backend
    return module


ATTENTIONS = {"l2": L2MultiheadAttention, "lipnorm": LipNormAttention, "dot": DotProductAttention}


def make_attention(kind: str, channels: int, heads: int = 4) -> nn.Module:
    """Build an attention layer by name: ``"l2"``, ``"lipnorm"`` or ``"dot"`` (ablation)."""
    if kind not in ATTENTIONS:
        raise ValueError(f"unknown attention {kind!r}; choose one of {sorted(ATTENTIONS)} or None")
    return ATTENTIONS[kind](channels, heads)
