"""Spectral normalisation by power iteration (Miyato et al. 2018; Behrmann et al. 2019).

A layer with weight ``W`` is used as ``W_hat = W / max(1, sigma / c)`` where ``sigma`` estimates
``||W||_2`` (dense) or the operator norm of the convolution at the layer's input size (kxk
kernels), so that ``Lip(W_hat) <= c < 1``. ``u``, ``v`` persist between calls (warm start):
a fixed number of iterations in training mode, iteration to a relative tolerance in eval mode.
``sigma = u^T W v`` is differentiable in ``W`` (u, v are constants), as in i-ResNet.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_coefficient, check_image, check_tensor

LinearOp = Callable[[torch.Tensor], torch.Tensor]

_frozen_depth = 0


@contextlib.contextmanager
def frozen_power_iteration() -> Iterator[None]:
    """Keep every ``u``/``v`` as it is: the layers then apply exactly the same map on every call.

    Used while inverting a block (each fixed-point step must see the same ``g``).
    """
    global _frozen_depth
    _frozen_depth += 1
    try:
        yield
    finally:
        _frozen_depth -= 1


def _normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    return x / x.norm().clamp_min(eps)


@torch.no_grad()
def power_iteration(
    op: LinearOp,
    op_t: LinearOp,
    v: torch.Tensor,
    n_iter: Optional[int] = None,
    tol: Optional[float] = None,
    max_iter: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Power iteration on ``op^T op`` from the unit vector ``v``.

    Runs ``n_iter`` steps, or (``tol`` given) until the relative change of the estimate
    ``sigma = ||op(v)||`` is below ``tol`` (at most ``max_iter`` steps).
    Returns ``(sigma, u, v, steps)`` with ``u = op(v) / sigma``; ``sigma <= ||op||_2`` always.
    """
    if n_iter is None and tol is None:
        raise ValueError("power_iteration needs n_iter or tol")
    if n_iter is not None and n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    steps = n_iter if n_iter is not None else max_iter
    v = _normalize(v)
    u = _normalize(op(v))
    sigma_prev = None
    done = 0
    for done in range(1, steps + 1):
        v = _normalize(op_t(u))
        w = op(v)
        sigma = w.norm()
        u = _normalize(w)
        if tol is not None and sigma_prev is not None and abs(float(sigma - sigma_prev)) <= tol * float(sigma):
            break
        sigma_prev = sigma
    sigma = (u * op(v)).sum()
    return sigma, u, v, done


def spectral_norm(weight: torch.Tensor, n_iter: Optional[int] = None, tol: float = 1e-6) -> torch.Tensor:
    """Estimate ``||W||_2`` of a 2-D matrix by power iteration (a lower bound, converged to ``tol``)."""
    check_tensor(weight, "weight", ndim=2)
    v = torch.randn(weight.shape[1], dtype=weight.dtype, device=weight.device)
    sigma, *_ = power_iteration(lambda x: weight @ x, lambda y: weight.t() @ y, v, n_iter=n_iter,
                                tol=None if n_iter is not None else tol)
    return sigma


@torch.no_grad()
def operator_norm(op: LinearOp, op_t: LinearOp, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                  like: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """Largest singular value of a linear operator by ARPACK's Lanczos bidiagonalisation (float64).

    Power iteration converges slowly when the top singular values are close (common for
    convolution operators); this converges to ``tol`` regardless and certifies the layer.
    """
    from scipy.sparse.linalg import LinearOperator, svds

    def wrap(fn: LinearOp, shape: tuple[int, ...]):
        def apply(x):
            t = torch.as_tensor(x.reshape(shape), dtype=like.dtype, device=like.device)
            return fn(t).double().cpu().numpy().reshape(-1)
        return apply

    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if min(n_in, n_out) <= 2:  # ARPACK needs k < min(shape); tiny operators are dense-cheap
        eye = torch.eye(n_in, dtype=like.dtype, device=like.device).reshape((n_in,) + in_shape[1:])
        dense = torch.stack([op(e.unsqueeze(0)).reshape(-1) for e in eye], dim=1)
        return torch.linalg.matrix_norm(dense.double(), ord=2).to(like.dtype)
    lin = LinearOperator((n_out, n_in), matvec=wrap(op, in_shape), rmatvec=wrap(op_t, out_shape), dtype=float)
    sigma = svds(lin, k=1, tol=tol, return_singular_vectors=False)[0]
    return torch.tensor(float(sigma), dtype=like.dtype, device=like.device)


class _SpectralNormalized(nn.Module):
    """Shared machinery: coefficient, persistent u/v, train/eval iteration policy."""

    def __init__(self, coeff: float, n_iter: int, tol: float, max_iter: int) -> None:
        super().__init__()
        self.coeff = check_coefficient(coeff)
        if n_iter < 1 or max_iter < 1:
            raise ValueError(f"n_iter and max_iter must be >= 1, got {n_iter} and {max_iter}")
        self.n_iter, self.tol, self.max_iter = n_iter, tol, max_iter

    # subclasses define _op, _op_t (on u/v shaped tensors) and self.u, self.v buffers
    def _op(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _op_t(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @torch.no_grad()
    def refresh(self, n_iter: Optional[int] = None, tol: Optional[float] = None) -> int:
        """Advance the persistent power iteration (``acf.ops.spectral_norms``: the compiled extension
        when it is loaded, ``power_iteration`` otherwise); returns the number of steps taken."""
        from .ops import spectral_norms  # acf.ops imports this module

        if n_iter is None and tol is None:
            n_iter = self.n_iter
        _, steps = spectral_norms([self.weight.detach()], n_iter=n_iter, tol=tol, us=[self.u], vs=[self.v],
                                  max_iter=self.max_iter, return_steps=True)
        return int(steps[0])

    def sigma(self) -> torch.Tensor:
        """``u^T W v``: the current estimate of the operator norm, differentiable in W.

        ``u``, ``v`` are cloned so that a later refresh (in place) cannot invalidate this graph.
        """
        return (self.u.clone() * self._op(self.v.clone())).sum()

    def normalized_weight(self) -> torch.Tensor:
        """``W / max(1, sigma / c)``. Training: ``n_iter`` warm-started steps per call. Evaluation:
        iterate to ``tol`` once per weight version, so that repeated calls apply the same map."""
        if _frozen_depth == 0:
            if self.training:
                self.refresh(n_iter=self.n_iter)
                self._eval_version = None
            elif getattr(self, "_eval_version", None) != self.weight._version:
                self.refresh(tol=self.tol)
                self._eval_version = self.weight._version
        scale = torch.clamp(self.sigma() / self.coeff, min=1.0)
        return self.weight / scale

    @torch.no_grad()
    def lipschitz_bound(self) -> torch.Tensor:
        """Operator norm of the normalised weight, by Lanczos (robust to clustered top singular values)."""
        sigma = operator_norm(self._op, self._op_t, tuple(self.v.shape), tuple(self.u.shape), self.weight)
        return sigma / torch.clamp(self.sigma() / self.coeff, min=1.0)


class SpectralLinear(_SpectralNormalized):
    """Linear layer ``y = x W_hat^T + b`` with ``||W_hat||_2 <= coeff``."""

    def __init__(self, in_features: int, out_features: int, coeff: float = 0.97, bias: bool = True,
                 n_iter: int = 1, tol: float = 1e-5, max_iter: int = 200) -> None:
        super().__init__(coeff, n_iter, tol, max_iter)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("u", _normalize(torch.randn(out_features)))
        self.register_buffer("v", _normalize(torch.randn(in_features)))
        self.refresh(tol=1e-4)

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight @ x

    def _op_t(self, y: torch.Tensor) -> torch.Tensor:
        return self.weight.t() @ y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features (shape {tuple(x.shape)}); expected {self.in_features}")
        return F.linear(x, self.normalized_weight(), self.bias)


class SpectralConv2d(_SpectralNormalized):
    """Stride-1 'same' convolution whose operator norm at ``input_hw`` is at most ``coeff``.

    For 1x1 kernels the operator norm equals ``||W||_2`` of the ``(out, in)`` matrix; for kxk
    kernels power iteration runs on the convolution operator itself (conv2d / conv_transpose2d
    at the input's spatial size), which is tighter than any reshaped-matrix bound.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, input_hw: tuple[int, int],
                 coeff: float = 0.97, bias: bool = True, n_iter: int = 1, tol: float = 1e-5,
                 max_iter: int = 200) -> None:
        super().__init__(coeff, n_iter, tol, max_iter)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd for a 'same' convolution, got {kernel_size}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        h, w = self.input_hw if kernel_size > 1 else (1, 1)
        self.register_buffer("u", _normalize(torch.randn(1, out_channels, h, w)))
        self.register_buffer("v", _normalize(torch.randn(1, in_channels, h, w)))
        self.refresh(tol=1e-4)

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, padding=self.padding)

    def _op_t(self, y: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(y, self.weight, padding=self.padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_channels)
        if self.kernel_size > 1 and tuple(x.shape[2:]) != self.input_hw:
            raise ValueError(
                f"input has spatial size {tuple(x.shape[2:])}; this {self.kernel_size}x{self.kernel_size} "
                f"convolution was normalised for {self.input_hw}"
            )
        return F.conv2d(x, self.normalized_weight(), self.bias, padding=self.padding)
