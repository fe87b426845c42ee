"""The contractive residual block ``y = x + g(x)`` with ``Lip(g) < 1`` (paper eq. 3)."""
from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import torch
from torch import nn

from .._checks import check_finite, check_tensor
from .logdet import LogdetEstimator, logdet_estimate
from ..ops.fixed_point import FixedPointInfo, fixed_point_solve
from .spectral_norm import refresh_spectral_norms


def _require_bound(module: nn.Module) -> None:
    if not hasattr(module, "lipschitz_bound"):
        raise TypeError(f"{type(module).__name__} does not report a Lipschitz bound (no lipschitz_bound())")


def lipschitz_bound(module: nn.Module) -> float:
    """Certified Lipschitz bound of a layer (``module.lipschitz_bound()``), as a float."""
    _require_bound(module)
    return float(module.lipschitz_bound())


class CertificateError(RuntimeError):
    """A residual branch's certified Lipschitz bound reached 1: its block is no longer guaranteed
    invertible, and its log-det series may diverge."""


def certified_bounds(model: nn.Module) -> dict[str, float]:
    """``lipschitz_bound()`` of every ``ContractiveBlock`` in ``model``, by module name; raises
    ``CertificateError`` naming the first block whose bound is not below 1 (blocks built with
    ``allow_uncertified`` report theirs, usually infinite, without raising)."""
    blocks = {name or type(model).__name__: m for name, m in model.named_modules() if isinstance(m, ContractiveBlock)}
    bounds = {name: m.lipschitz_bound() for name, m in blocks.items()}
    for name, bound in bounds.items():
        if not bound < 1.0 and not blocks[name].uncertified:  # an ablation built without a certificate
            raise CertificateError(f"residual block {name!r} has certified Lip(g) = {bound:.6f} >= 1: it is no "
                                   f"longer guaranteed invertible")
    return bounds


class LipschitzChain(nn.Sequential):
    """Composition of layers; its certified bound is the product of theirs."""

    def lipschitz_bound(self) -> float:
        return math.prod(lipschitz_bound(m) for m in self)


class ContractiveBlock(nn.Module):
    """``y = x + g(x)``: log-det by ``estimator``, inverse by Banach fixed-point iteration.

    Args:
        g: residual branch reporting ``lipschitz_bound()``; construction fails if it holds a layer
            without certificate unless ``allow_uncertified`` (only for ablations such as plain
            dot-product attention).
        estimator: log-det estimator settings (``LogdetEstimator``) or a method name.
        tol, max_iter, on_fail, method, memory: defaults of ``inverse`` (see
            ``acf.ops.fixed_point.fixed_point_solve``; ``method`` is ``"banach"`` or ``"anderson"``).
    """

    def __init__(self, g: nn.Module, estimator: Union[LogdetEstimator, str] = "roulette",
                 tol: float = 1e-6, max_iter: int = 500, on_fail: str = "warn", method: str = "banach",
                 memory: int = 5, allow_uncertified: bool = False) -> None:
        super().__init__()
        self.g = g
        self.estimator = LogdetEstimator(method=estimator) if isinstance(estimator, str) else estimator
        self.tol, self.max_iter, self.on_fail = tol, max_iter, on_fail
        self.method, self.memory = method, memory
        # Cheap structural check at construction (the numeric certificate, lipschitz_bound(), runs
        # a Lanczos solve per convolution and is computed on demand): every layer's coefficient is
        # already < 1 (checked by the layer), so only layers without a certificate can break it.
        _require_bound(g)
        uncertified = sorted({type(m).__name__ for m in g.modules() if getattr(m, "certified", True) is False})
        self.uncertified = uncertified
        if uncertified:
            if not allow_uncertified:
                raise ValueError(f"residual branch contains {', '.join(uncertified)}, which has no Lipschitz "
                                 f"certificate: the block would not be guaranteed invertible")
            warnings.warn(f"residual branch is not certified contractive ({', '.join(uncertified)}); "
                          f"inverse and log-det may be wrong", RuntimeWarning, stacklevel=2)

    def lipschitz_bound(self) -> float:
        """Certified Lipschitz bound of ``g`` (must be < 1)."""
        return lipschitz_bound(self.g)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(x + g(x), log det(I + J_g(x)))``, the log-det per sample."""
        check_tensor(x, "x")
        check_finite(x, "x")
        refresh_spectral_norms(self.g, stale_only=True)  # one batched call for the branch's layers
        est = self.estimator if self.training else self.estimator.evaluation()
        gx, logdet = logdet_estimate(self.g, x, est, training=self.training)
        return x + gx, logdet

    def inverse(self, y: torch.Tensor, tol: Optional[float] = None, max_iter: Optional[int] = None,
                on_fail: Optional[str] = None, method: Optional[str] = None, return_info: bool = False
                ) -> Union[torch.Tensor, tuple[torch.Tensor, FixedPointInfo]]:
        """Solve ``x + g(x) = y`` per sample (eq. 4-5); non-convergence is warned about or raised."""
        refresh_spectral_norms(self.g, stale_only=True)  # then every iteration applies the same g
        x, info = fixed_point_solve(self.g, y, tol=self.tol if tol is None else tol,
                                    max_iter=self.max_iter if max_iter is None else max_iter,
                                    method=self.method if method is None else method, memory=self.memory,
                                    on_fail=self.on_fail if on_fail is None else on_fail)
        return (x, info) if return_info else x
