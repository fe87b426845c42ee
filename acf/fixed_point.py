"""Inverse of a contractive residual block by Banach fixed-point iteration (paper eq. 4-5).

Solve ``x + g(x) = y`` per sample with ``x_{k+1} = y - g(x_k)``, ``x_0 = y``. With ``Lip(g) = L < 1``
the error contracts by ``L`` per step and ``||x_k - x*|| <= ||x_k + g(x_k) - y|| / (1 - L)``.
The stopping rule is that true residual, per sample (not a squared step size, which stops far
too early near ``L = 1``); what does not converge is reported, never silently returned.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ._checks import check_finite, check_tensor


class ConvergenceError(RuntimeError):
    """The fixed-point iteration hit its cap before every sample met the tolerance."""


@dataclass
class FixedPointInfo:
    """What a solve did: readable as ``info.g_evals`` or ``info["g_evals"]``."""

    iterations: int
    g_evals: int
    residual: torch.Tensor   # per sample: max |x + g(x) - y| of the returned x
    converged: torch.Tensor  # per sample, bool

    def __getitem__(self, key: str):
        return getattr(self, key)


def _threshold(y: torch.Tensor, tol: float) -> torch.Tensor:
    """Per-sample tolerance ``max(tol, 8 eps) * max(1, max|y|)``: never below what the dtype resolves."""
    eps = torch.finfo(y.dtype).eps
    scale = y.detach().abs().flatten(1).amax(1).clamp_min(1.0)
    return max(tol, 8 * eps) * scale


def report_nonconvergence(info: FixedPointInfo, on_fail: str, what: str = "fixed-point inverse") -> None:
    """Warn or raise when some samples did not converge (``on_fail`` in ``"warn"``, ``"raise"``, ``"ignore"``)."""
    if bool(info.converged.all()) or on_fail == "ignore":
        return
    bad = (~info.converged).nonzero().flatten().tolist()
    msg = (f"{what} did not converge for {len(bad)} of {info.converged.numel()} samples after "
           f"{info.iterations} iterations (max residual {float(info.residual.max()):.3e}; samples {bad[:10]})")
    if on_fail == "raise":
        raise ConvergenceError(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


@torch.no_grad()
def fixed_point_solve(
    g: Callable[[torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    tol: float = 1e-6,
    max_iter: int = 500,
    on_fail: str = "warn",
) -> tuple[torch.Tensor, FixedPointInfo]:
    """Banach iteration for ``x + g(x) = y`` (reference implementation, not differentiable).

    Args:
        g: the residual branch, contractive, mapping a batch to a batch of the same shape.
        y: ``(B, ...)`` right-hand side.
        tol: per-sample tolerance on ``max |x + g(x) - y|``, relative to ``max(1, max |y|)``.
        max_iter: cap on the number of ``g`` evaluations (>= 1).
        on_fail: ``"warn"`` (default), ``"raise"`` (``ConvergenceError``) or ``"ignore"``.

    Returns:
        ``(x, info)``; samples that converged stop moving as soon as they do.
    """
    check_tensor(y, "y")
    check_finite(y, "y")
    if y.dim() < 1 or y.shape[0] == 0:
        raise ValueError(f"y must be a non-empty batch, got shape {tuple(y.shape)}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if on_fail not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_fail must be 'warn', 'raise' or 'ignore', got {on_fail!r}")
    thr = _threshold(y, tol)
    x = y.clone()
    view = (-1,) + (1,) * (y.dim() - 1)
    for it in range(1, max_iter + 1):
        gx = g(x)
        if gx.shape != x.shape:
            raise ValueError(f"g changed the shape: {tuple(x.shape)} -> {tuple(gx.shape)}")
        r = x + gx - y
        residual = r.abs().flatten(1).amax(1)
        converged = residual <= thr  # NaN compares False: reported as not converged
        if bool(converged.all()) or it == max_iter:
            break
        x = torch.where(converged.view(view), x, y - gx)
    info = FixedPointInfo(iterations=it, g_evals=it, residual=residual, converged=converged)
    report_nonconvergence(info, on_fail)
    return x, info
