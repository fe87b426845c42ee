"""Log-determinant of ``y = x + g(x)`` (paper eq. 6-7; Behrmann et al. 2019; Chen et al. 2019).

    log det(I + J_g) = sum_{k>=1} (-1)^{k+1} / k * tr(J_g^k)                       (eq. 6)

``tr(J^k)`` is estimated with Hutchinson's estimator ``E_v[v^T J^k v]``; ``w_k^T = v^T J^k`` costs k
vector-Jacobian products (VJPs) of one graph of ``g``:

* ``"series"`` (i-ResNet): the first ``n_terms`` terms (biased).
* ``"roulette"`` (Residual Flows): draw ``N ~ Poisson(lam)`` or ``Geometric(p)``, compute
  ``n_exact + N`` terms and weight term ``k > n_exact`` by ``1 / P(N >= k - n_exact)``: unbiased.
* ``"exact"``: brute-force Jacobian, for small inputs and tests.

Gradients (``grad``):

* ``"backprop"``: differentiate through every VJP (memory grows with the number of terms).
* ``"neumann"``: ``d log det = E[(sum_{k>=0} (-1)^k w_k^T) (dJ) v]`` (Chen et al. 2019, eq. 8): the VJPs run
  without a graph, then ONE differentiable VJP (``create_graph=True``) carries the gradient; its value
  also gives the series' last term, so a draw of K terms costs K VJPs in all (``_neumann_logdet``).
* ``"memory_efficient"``: the Neumann gradient computed inside the forward pass (backprop-in-
  forward); the log-det keeps no graph, only the gradients it already produced.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from typing import Callable, Optional, Sequence

import scipy.special
import torch
from torch import nn

from .._checks import check_choice, check_int, check_real

GFunc = Callable[[torch.Tensor], torch.Tensor]

DEFAULT_MAX_TERMS = 1000   # roulette: default cap on the terms one draw adds (see LogdetEstimator)
MAX_TERMS_LIMIT = 100_000  # the largest cap accepted


def _check_mean_draw(dist: str, lam: float, p: float, max_terms: int) -> None:
    """Refuse a roulette law whose mean draw exceeds ``max_terms`` (most draws would be cut)."""
    if dist == "poisson" and lam > max_terms:
        raise ValueError(f"lam={lam:g} draws {lam:g} terms on average, more than max_terms={max_terms} (the cap "
                         f"on the terms one draw adds; beyond it the estimate is truncated): lam must be in "
                         f"(0, {max_terms}] (or raise max_terms)")
    if dist == "geometric" and (1.0 - p) / p > max_terms:
        raise ValueError(f"p={p:g} draws (1 - p) / p = {(1.0 - p) / p:.3g} terms on average, more than "
                         f"max_terms={max_terms} (the cap on the terms one draw adds; beyond it the estimate is "
                         f"truncated): p must be in [{1.0 / (max_terms + 1):.3g}, 1) (or raise max_terms)")

METHODS = ("exact", "series", "roulette")
GRADS = ("backprop", "neumann", "memory_efficient")


@dataclass(frozen=True)
class LogdetEstimator:
    """Settings of the log-det estimator of one residual block.

    Russian roulette (``method="roulette"``): every draw computes ``n_exact`` terms, then ``N`` more,
    ``N ~ Poisson(lam)`` or ``Geometric(p)`` (failures before a success, on ``{0, 1, ...}``), term
    ``k > n_exact`` weighted by ``1 / P(N >= k - n_exact)``. The weights are computed stably for every
    accepted rate: ``P(N >= m)`` is the regularised lower incomplete gamma function ``P(m, lam)``
    (``scipy.special.gammainc``, no ``1 - cdf`` cancellation) for Poisson and ``exp(m log1p(-p))`` for
    the geometric law. A draw of no terms at all (``n_exact = 0`` and ``N = 0``) estimates 0.

    ``max_terms`` caps ``N``: a draw above it computes ``n_exact + max_terms`` terms. The estimator is
    then unbiased for the series up to term ``K = n_exact + max_terms`` and misses only its tail beyond
    ``K``: ``|bias| <= sum_{k > K} |tr(J^k)| / k <= D Lip^(K+1) / ((K+1) (1 - Lip))`` per sample
    (``D`` the dimension, ``Lip = Lip(g) < 1``), at most ``Lip^K / (1 - Lip)`` per dimension. At the
    default cap of 1000 and ``Lip <= 0.97`` that is below ``1e-14 D``; the default ``Poisson(2)``
    exceeds 1000 terms with probability below ``1e-2000`` (never), ``Geometric(0.5)`` with ``2^-1000``.
    Rates whose mean draw exceeds the cap are refused (``lam > max_terms``, or
    ``(1 - p) / p > max_terms``, i.e. ``p < 1 / (max_terms + 1)``): most of their draws would be cut,
    a truncated series in disguise (use ``method="series"`` for that, or raise ``max_terms``).
    ``max_terms`` is at most ``MAX_TERMS_LIMIT`` (one term is one vector-Jacobian product).
    """

    method: str = "roulette"
    n_terms: int = 8               # "series": number of terms
    dist: str = "poisson"          # "roulette": "poisson" or "geometric"
    lam: float = 2.0               # Poisson rate
    p: float = 0.5                 # Geometric success probability
    n_exact: int = 2               # "roulette": terms always computed in training ...
    n_exact_eval: int = 20         # ... and in evaluation
    probe: str = "gaussian"        # Hutchinson probe: "gaussian" or "rademacher"
    n_probes: int = 1
    grad: Optional[str] = None     # None: "backprop" for series, "neumann" for roulette
    max_exact_dim: int = 4096      # "exact": largest per-sample dimension allowed
    max_terms: int = DEFAULT_MAX_TERMS  # "roulette": cap on the terms a draw adds beyond n_exact

    def __post_init__(self) -> None:
        try:
            check_choice(self.method, "method", METHODS)
            check_choice(self.dist, "dist", ("poisson", "geometric"))
            check_choice(self.probe, "probe", ("gaussian", "rademacher"))
            check_choice(self.grad, "grad", (None,) + GRADS)
            for name in ("n_terms", "n_probes", "max_exact_dim"):
                check_int(getattr(self, name), name, minimum=1)
            for name in ("n_exact", "n_exact_eval"):
                check_int(getattr(self, name), name, minimum=0)
            check_real(self.lam, "lam", low=0.0, low_open=True)
            check_real(self.p, "p", low=0.0, high=1.0, low_open=True, high_open=True)
            check_int(self.max_terms, "max_terms", minimum=1)
            if self.max_terms > MAX_TERMS_LIMIT:
                raise ValueError(f"max_terms must be in [1, {MAX_TERMS_LIMIT}], got {self.max_terms}")
            if self.method == "roulette":
                _check_mean_draw(self.dist, self.lam, self.p, self.max_terms)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"LogdetEstimator: {exc}") from None

    @property
    def grad_mode(self) -> str:
        return self.grad or ("neumann" if self.method == "roulette" else "backprop")

    def evaluation(self) -> "LogdetEstimator":
        """The same estimator with the evaluation number of exact terms."""
        return replace(self, n_exact=self.n_exact_eval)


# ---------------------------------------------------------------------------------------------
# Russian roulette
# ---------------------------------------------------------------------------------------------

def survival(dist: str, m: int, lam: float = 2.0, p: float = 0.5) -> float:
    """``P(N >= m)`` for ``N ~ Poisson(lam)`` or ``N ~ Geometric(p)`` on ``{0, 1, ...}``, accurate to
    rounding at any rate and any ``m`` (no ``1 - cdf`` cancellation, no factorial overflow): Poisson by
    the regularised lower incomplete gamma function, ``P(N >= m) = P(m, lam)``. The result is at least
    the smallest normal float, so that ``1 / P`` stays finite (a draw that reaches a smaller
    probability has a probability below 1e-308: it does not happen)."""
    if m <= 0:
        return 1.0
    if dist == "geometric":
        value = math.exp(m * math.log1p(-p))
    else:
        value = float(scipy.special.gammainc(m, lam))
    return max(value, sys.float_info.min)


def draw_terms(est: LogdetEstimator, generator: Optional[torch.Generator] = None) -> int:
    """One roulette draw ``N`` (terms beyond ``n_exact``), capped at ``est.max_terms``."""
    if est.dist == "poisson":
        n = float(torch.poisson(torch.tensor(float(est.lam)), generator=generator))
    else:
        u = float(torch.rand((), generator=generator))
        n = math.floor(math.log1p(-u) / math.log1p(-est.p))  # failures before a success
    return int(min(max(n, 0), est.max_terms))


def term_weights(est: LogdetEstimator, training: bool = True,
                 generator: Optional[torch.Generator] = None) -> list[float]:
    """Coefficients ``c_k`` (k = 1..K) of ``log det ~= sum_k c_k v^T J^k v`` for one draw (``[]`` for a
    roulette draw of no terms: the estimate is 0)."""
    if est.method == "series":
        return [(-1) ** (k + 1) / k for k in range(1, est.n_terms + 1)]
    n_exact = est.n_exact if training else est.n_exact_eval
    n = draw_terms(est, generator)
    return [(-1) ** (k + 1) / k / survival(est.dist, k - n_exact, est.lam, est.p)
            for k in range(1, n_exact + n + 1)]


# ---------------------------------------------------------------------------------------------
# Estimators
# ---------------------------------------------------------------------------------------------

def _probe(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "gaussian":
        return torch.randn_like(x)
    return torch.randint_like(x, 2).mul_(2).sub_(1)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).flatten(1).sum(1)


def _vjp(gx: torch.Tensor, x: torch.Tensor, w: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """``w^T J_g``; zero where ``g`` does not depend on ``x`` (a branch whose attention is knocked out)."""
    if not gx.requires_grad:
        return torch.zeros_like(x)
    (out,) = torch.autograd.grad(gx, x, w, retain_graph=True, create_graph=create_graph, materialize_grads=True)
    return out


def exact_logdet(g: GFunc, x: torch.Tensor, create_graph: bool = False,
                 max_dim: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Brute-force ``log det(I + J_g(x))`` per sample from the full Jacobian (D VJPs).

    Returns ``(g(x), logdet)``; differentiable when ``create_graph``.
    """
    dim = x[0].numel()
    if dim > max_dim:
        raise ValueError(f"exact log-det needs the full {dim}x{dim} Jacobian per sample; "
                         f"it is meant for small inputs (at most {max_dim} dimensions)")
    gx = g(x)
    flat = gx.reshape(x.shape[0], dim)
    rows = [torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True, create_graph=create_graph,
                                materialize_grads=True)[0] if flat.requires_grad else torch.zeros_like(x)
            for i in range(dim)]
    jac = torch.stack([r.reshape(x.shape[0], dim) for r in rows], dim=1)  # (B, D_out, D_in)
    # Samples whose Jacobian is not finite get NaN: LAPACK's LU can hang on NaN input.
    finite = torch.isfinite(jac).flatten(1).all(1)
    eye = torch.eye(dim, dtype=jac.dtype, device=jac.device)
    sign, logabs = torch.linalg.slogdet(eye + torch.where(finite[:, None, None], jac, torch.zeros_like(jac)))
    if bool((sign[finite] <= 0).any()):
        raise ValueError("det(I + J_g) <= 0: g is not contractive at this input")
    return gx, torch.where(finite, logabs, torch.full_like(logabs, math.nan))


def _series(gx: torch.Tensor, x: torch.Tensor, v: torch.Tensor, weights: Sequence[float],
            create_graph: bool) -> torch.Tensor:
    """``sum_k c_k w_k^T v`` (k = 1..K, K VJPs), differentiable when ``create_graph``."""
    logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    w = v
    for c in weights:
        w = _vjp(gx, x, w, create_graph=create_graph)
        logdet = logdet + c * _dot(w, v)
    return logdet


def _neumann_logdet(gx: torch.Tensor, x: torch.Tensor, est: LogdetEstimator,
                    weights: Sequence[float]) -> torch.Tensor:
    """Log-det value with the Neumann gradient attached (value + surrogate - surrogate.detach()), in
    K - 1 VJPs without a graph and one with it: K in all, as many as the value alone takes.

    With ``t_k = w_k^T v`` and ``r_k = |c_k| k`` (the roulette reweighting of term k), the Neumann
    vector is ``n = sum_{k<K} (-1)^k r_{k+1} w_k`` (term k is the derivative of series term k + 1),
    and the surrogate ``n^T J v = sum_{k<=K} k c_k t_k`` carries the gradient. Only ``w_0 .. w_{K-1}``
    enter ``n`` (K - 1 VJPs); the last term ``t_K``, which only the value needs, is read off the
    surrogate's value instead of costing a VJP of its own."""
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    n_terms = len(weights)
    for _ in range(est.n_probes):
        v = _probe(x, est.probe)
        value = torch.zeros_like(total)  # sum_{k<K} c_k t_k ...
        weighted = torch.zeros_like(total)  # ... and sum_{k<K} k c_k t_k
        neumann, w = v * abs(weights[0]), v
        for k in range(1, n_terms):
            w = _vjp(gx, x, w)
            t = _dot(w, v)
            value, weighted = value + weights[k - 1] * t, weighted + k * weights[k - 1] * t
            neumann = neumann + (-1) ** k * abs(weights[k]) * (k + 1) * w
        surrogate = _dot(_vjp(gx, x, neumann, create_graph=True), v)
        last = (surrogate.detach() - weighted) / (n_terms * weights[-1])  # t_K
        total = total + value + weights[-1] * last + surrogate - surrogate.detach()
    return total / est.n_probes


def _backprop_logdet(gx: torch.Tensor, x: torch.Tensor, est: LogdetEstimator,
                     weights: Sequence[float], create_graph: bool) -> torch.Tensor:
    total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(est.n_probes):
        total = total + _series(gx, x, _probe(x, est.probe), weights, create_graph=create_graph)
    return total / est.n_probes


class _LogdetInForward(torch.autograd.Function):
    """Backprop-in-forward: log-det gradients are computed in the forward pass, no graph kept.

    The parameter gradient is stored summed over the batch, so the backward needs the same
    upstream gradient for every sample's log-det (true for any mean or sum of log-likelihoods).
    """

    @staticmethod
    def forward(ctx, x, g, est, weights, *params):
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            gx = g(x_)
            logdet = _neumann_logdet(gx, x_, est, weights)
            grads = torch.autograd.grad(logdet.sum(), [x_, *params], retain_graph=True, allow_unused=True)
        ctx.x, ctx.gx, ctx.params, ctx.ld_grads = x_, gx, params, grads
        return gx.detach(), logdet.detach()

    @staticmethod
    def backward(ctx, grad_gx, grad_logdet):
        x_, gx, params, ld_grads = ctx.x, ctx.gx, ctx.params, ctx.ld_grads
        w = grad_logdet.flatten()
        if not torch.allclose(w, w[:1].expand_as(w)):
            raise RuntimeError("grad='memory_efficient' needs the same upstream gradient for every sample's "
                               "log-det (a mean or sum of log-likelihoods); use grad='neumann' otherwise")
        with torch.enable_grad():
            g_grads = torch.autograd.grad(gx, [x_, *params], grad_gx, allow_unused=True)
        scale_x = grad_logdet.reshape((-1,) + (1,) * (x_.dim() - 1))
        out = [g_grads[0] + ld_grads[0] * scale_x]
        for gg, lg in zip(g_grads[1:], ld_grads[1:]):
            parts = [t for t in (gg, None if lg is None else lg * w[0]) if t is not None]
            out.append(sum(parts) if parts else None)
        ctx.x = ctx.gx = ctx.params = ctx.ld_grads = None
        return (out[0], None, None, None, *out[1:])


def logdet_estimate(g: nn.Module, x: torch.Tensor, est: LogdetEstimator,
                    training: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g(x), log det(I + J_g(x)))`` per sample with the estimator ``est``.

    Gradients flow to ``x`` and to ``g``'s parameters when autograd is on; with autograd off
    (evaluation) only the values are returned and no graph is kept.
    """
    need_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in g.parameters()))
    if est.method == "exact":
        with torch.enable_grad():
            xin = x if (need_grad and x.requires_grad) else x.detach().requires_grad_(True)
            gx, logdet = exact_logdet(g, xin, create_graph=need_grad, max_dim=est.max_exact_dim)
        return (gx, logdet) if need_grad else (gx.detach(), logdet.detach())
    weights = term_weights(est, training)
    if not weights:  # a roulette draw of no terms (n_exact = 0, N = 0): the estimate is 0
        gx = g(x)
        zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return (gx, zero) if need_grad else (gx.detach(), zero)
    if not need_grad:
        with torch.enable_grad():
            x_ = x.detach().requires_grad_(True)
            gx = g(x_)
            logdet = _backprop_logdet(gx, x_, est, weights, create_graph=False)
        return gx.detach(), logdet.detach()
    mode = est.grad_mode
    if mode == "memory_efficient":
        params = [p for p in g.parameters() if p.requires_grad]
        return _LogdetInForward.apply(x, g, est, weights, *params)
    x_ = x if x.requires_grad else x.detach().requires_grad_(True)
    gx = g(x_)
    if mode == "neumann":
        return gx, _neumann_logdet(gx, x_, est, weights)
    return gx, _backprop_logdet(gx, x_, est, weights, create_graph=True)
