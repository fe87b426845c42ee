"""The contractive residual block ``y = x + g(x)`` with ``Lip(g) < 1`` (paper eq. 3)."""
from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import replace
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from .._checks import check_finite, check_same_dtype, check_tensor
from ..errors import ACFError
from .logdet import LogdetEstimator, logdet_estimate
from ..ops.fixed_point import FixedPointInfo, fixed_point_solve
from .spectral_norm import refresh_spectral_norms

# What a run with plain dot-product attention (the ablation) prints at its start and records in its
# config.json: it has no certificate, so nothing guarantees that its blocks invert.
UNCERTIFIED_WARNING = ("WARNING: --attention dot is an UNCERTIFIED ablation: plain dot-product attention is not "
                       "Lipschitz, so its residual blocks are NOT guaranteed invertible (the inverse may not "
                       "converge, log-det estimates may be wrong) and training does not stop when a bound reaches 1 "
                       "(its bounds are infinite)")


def uncertified_warning(attention: Optional[str]) -> Optional[str]:
    """``UNCERTIFIED_WARNING`` for the uncertified attention kind ``"dot"``, else None."""
    return UNCERTIFIED_WARNING if attention == "dot" else None


def _require_bound(module: nn.Module) -> None:
    if not hasattr(module, "lipschitz_bound"):
        raise TypeError(f"{type(module).__name__} does not report a Lipschitz bound (no lipschitz_bound())")


def lipschitz_bound(module: nn.Module) -> float:
    """Certified Lipschitz bound of a layer (``module.lipschitz_bound()``), as a float."""
    _require_bound(module)
    return float(module.lipschitz_bound())


class CertificateError(ACFError, RuntimeError):
    """A residual branch's certified Lipschitz bound reached 1: its block is no longer guaranteed
    invertible, and its log-det series may diverge."""


def certified_bounds(model: nn.Module) -> dict[str, float]:
    """``lipschitz_bound()`` of every ``ContractiveBlock`` in ``model``, by module name; raises
    ``CertificateError`` naming the first block whose bound is not below 1 (blocks built with
    ``allow_uncertified`` report theirs, usually infinite, without raising)."""
    blocks = {name or type(model).__name__: m for name, m in model.named_modules() if isinstance(m, ContractiveBlock)}
    bounds = {}
    for name, m in blocks.items():
        try:
            bounds[name] = m.lipschitz_bound()
        except ValueError as exc:  # e.g. a non-finite attention gamma: no certificate at all
            raise CertificateError(f"residual block {name!r} has no certified Lip(g): {exc}") from None
    for name, bound in bounds.items():
        if not bound < 1.0 and not blocks[name].uncertified:  # an ablation built without a certificate
            raise CertificateError(f"residual block {name!r} has certified Lip(g) = {bound:.6f} >= 1: it is no "
                                   f"longer guaranteed invertible")
    return bounds


@contextlib.contextmanager
def truncated_series(model: nn.Module, n_terms: int) -> Iterator[None]:
    """Inside the ``with``, every ``ContractiveBlock`` of ``model`` estimates its log-det by the first
    ``n_terms`` terms of eq. 6 (``method="series"``, its own probe law); its estimator is restored after."""
    blocks = [m for m in model.modules() if isinstance(m, ContractiveBlock)]
    saved = [m.estimator for m in blocks]
    try:
        for m in blocks:
            m.estimator = replace(m.estimator, method="series", n_terms=n_terms)
        yield
    finally:
        for m, est in zip(blocks, saved):
            m.estimator = est


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
        """Solve ``x + g(x) = y`` per sample (eq. 4-5); non-convergence is warned about or raised.

        Differentiable when autograd records (grad mode on, and ``y`` or a tensor ``g`` uses requires
        grad), by the implicit function theorem: ``dx = (I + J_g(x))^-1 (dy - dg/dtheta dtheta)``. The
        fixed point ``x*`` is found without a graph and returned as it is, recorded as the Banach step
        ``y - g(x*)``: its incoming gradient ``G`` becomes the solution ``u`` of ``u + J_g(x*)^T u = G``,
        and autograd gives ``dL/dy = u`` and ``dL/dtheta = -u^T dg/dtheta``, for the parameters of ``g``
        and anything else it reads (``torch.func.functional_call`` works). ``u`` comes from the same
        fixed-point iteration (``u <- G - J_g^T u``, one vector-Jacobian product per step, contractive
        with rate ``Lip(g)``), with this call's tolerance, cap, method and ``on_fail``. First order only:
        differentiating the gradient again raises. Recording costs one more evaluation of ``g``; the
        backward, one graph of ``g`` and one VJP per step."""
        check_tensor(y, "y")
        param = next(self.g.parameters(), None)
        if param is not None and param.is_floating_point():
            check_same_dtype(y, param, "y")
        refresh_spectral_norms(self.g, stale_only=True)  # then every iteration applies the same g
        settings = dict(tol=self.tol if tol is None else tol, max_iter=self.max_iter if max_iter is None else max_iter,
                        method=self.method if method is None else method, memory=self.memory,
                        on_fail=self.on_fail if on_fail is None else on_fail)
        x, info = fixed_point_solve(self.g, y, **settings)
        if torch.is_grad_enabled():
            x = _with_implicit_gradient(self.g, y, x, settings)
        return (x, info) if return_info else x


def _with_implicit_gradient(g: Callable[[torch.Tensor], torch.Tensor], y: torch.Tensor, x_star: torch.Tensor,
                            settings: dict) -> torch.Tensor:
    """``x*`` (the same values) recorded by autograd as one Banach step ``y - g(x*)``, whose gradient is
    mapped through ``(I + J_g(x*))^-T`` (see ``ContractiveBlock.inverse``); ``x*`` unrecorded if nothing
    ``g`` reads requires grad."""
    step = y - g(x_star)
    if not step.requires_grad:
        return x_star
    return _ImplicitGradient.apply(step, x_star, g, settings)


class _ImplicitGradient(torch.autograd.Function):
    """Forward: the fixed point ``x*`` itself. Backward: the incoming gradient ``G`` becomes the solution
    ``u`` of ``u + J_g(x*)^T u = G``, sent to ``step = y - g(x*)``, through which autograd gives
    ``dL/dy = u`` and ``dL/dtheta = -u^T dg/dtheta``."""

    @staticmethod
    def forward(ctx, step: torch.Tensor, x_star: torch.Tensor, g: Callable, settings: dict) -> torch.Tensor:
        ctx.g, ctx.settings = g, settings
        ctx.save_for_backward(x_star)
        return x_star.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph=True: u would silently be a constant to the next derivative
            raise RuntimeError("the inverse of a contractive block is differentiable once: its backward solves an "
                               "adjoint fixed-point problem that is not differentiated again (create_graph=True "
                               "through the inverse is not supported)")
        (x_star,) = ctx.saved_tensors
        with torch.enable_grad():
            x0 = x_star.detach().requires_grad_(True)
            gx = ctx.g(x0)

        def transposed_jacobian(u: torch.Tensor) -> torch.Tensor:  # u -> J_g(x*)^T u
            with torch.enable_grad():
                (out,) = torch.autograd.grad(gx, x0, u, retain_graph=True)
            return out

        u, _ = fixed_point_solve(transposed_jacobian, grad.contiguous(), **ctx.settings,
                                 what="adjoint solve of the fixed-point inverse (backward)")
        return u, None, None, None
