"""The ``fixed_point`` op: the inverse of a contractive residual block (paper eq. 4-5).

Solve ``x + g(x) = y`` per sample with ``x_{k+1} = y - g(x_k)``, ``x_0 = y`` (Banach), or with
Anderson mixing of the last iterates. With ``Lip(g) = L < 1`` the Banach error contracts by ``L``
per step and ``||x_k - x*|| <= ||x_k + g(x_k) - y|| / (1 - L)``. The stopping rule is that true
residual, per sample (not a squared step size, which stops far too early near ``L = 1``); what does
not converge is reported, never silently returned.

``fixed_point_solve`` is the public function: its update, per-sample residual and convergence mask
are one fused step (``torch.ops.acf.banach_step`` / ``anderson_step`` of ``acf._C``:
``csrc/fixed_point.cpp``, ``csrc/fixed_point_cuda.cu``), and the host learns about convergence
without a synchronisation per iteration (CUDA: event-polled pinned copies).
``fixed_point_solve_reference`` is the plain Banach loop it is tested against.
"""
from __future__ import annotations

import collections
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from .. import _ext
from .._checks import check_finite, check_tensor
from ..errors import ACFError
from .backends import check_backend, use_extension


class ConvergenceError(ACFError, RuntimeError):
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
def fixed_point_solve_reference(
    g: Callable[[torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    tol: float = 1e-6,
    max_iter: int = 500,
    on_fail: str = "warn",
    what: str = "fixed-point inverse",
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
    report_nonconvergence(info, on_fail, what)
    return x, info


class _ConvergencePoller:
    """Tells the host when every sample has converged, without a synchronisation per iteration.

    Each step adds the number of still-unconverged samples to ``counter[it - 1]`` on the device.
    CPU: read at once (no device). CUDA: the count is copied to pinned host memory asynchronously
    and an event recorded; the host reads only counts whose event has completed, and waits on the
    oldest only when more than ``max_lag`` iterations are in flight (it then stalls for work queued
    ``max_lag`` steps ago, never for the step just launched).
    """

    def __init__(self, counter: torch.Tensor, max_lag: int) -> None:
        self.counter = counter
        self.cuda = counter.device.type == "cuda"
        self.max_lag = max(1, max_lag)
        if self.cuda:
            self.host = torch.empty(counter.shape, dtype=counter.dtype, pin_memory=True)
            self.pending: collections.deque = collections.deque()

    def push(self, it: int) -> bool:
        """After step ``it``: True once some completed step had no unconverged sample."""
        if not self.cuda:
            return int(self.counter[it - 1]) == 0
        self.host[it - 1:it].copy_(self.counter[it - 1:it], non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.pending.append((it, ev))
        while self.pending:
            k, ev = self.pending[0]
            if not ev.query():
                if len(self.pending) <= self.max_lag:
                    break
                ev.synchronize()
            self.pending.popleft()
            if int(self.host[k - 1]) == 0:
                return True
        return False


def _mark_converged(f, thr, converged, residual, counter):
    """Residual ``max |f|`` per open sample, convergence mask and open-sample count; returns the samples
    still open (the bookkeeping both pure-PyTorch steps share with the fused kernels)."""
    r = f.abs().amax(1)
    active = ~converged
    newly = active & (r <= thr)
    residual.copy_(torch.where(active, r, residual))
    still = active & ~newly
    converged |= newly
    counter.add_(still.sum().to(counter.dtype))
    return still


def _banach_step_torch(x, gx, y, thr, converged, residual, counter, update):
    still = _mark_converged(y - gx - x, thr, converged, residual, counter)
    if update:
        x.copy_(torch.where(still.unsqueeze(1), y - gx, x))


def _anderson_step_torch(x, gx, y, thr, converged, residual, counter, xh, fh, gram, slot, filled, reg, beta,
                         update):
    f = y - gx - x
    still = _mark_converged(f, thr, converged, residual, counter)
    if not update:
        return
    s1 = still.unsqueeze(1)
    xh[:, slot] = torch.where(s1, x, xh[:, slot])
    fh[:, slot] = torch.where(s1, f, fh[:, slot])
    dots = torch.einsum("bd,bjd->bj", fh[:, slot].double(), fh[:, :filled].double())
    gram[:, slot, :filled] = torch.where(s1, dots, gram[:, slot, :filled])
    gram[:, :filled, slot] = gram[:, slot, :filled].clone()
    G = gram[:, :filled, :filled]
    lam = reg * torch.diagonal(G, dim1=1, dim2=2).amax(1)
    lam = torch.where(lam > 0, lam, torch.full_like(lam, reg))
    A = G + lam[:, None, None] * torch.eye(filled, dtype=G.dtype, device=G.device)
    L, info = torch.linalg.cholesky_ex(A)
    z = torch.cholesky_solve(torch.ones(A.shape[0], filled, 1, dtype=A.dtype, device=A.device), L).squeeze(2)
    total = z.sum(1, keepdim=True)
    alpha = z / total
    ok = (info == 0) & torch.isfinite(total.squeeze(1)) & (total.squeeze(1) != 0)
    e = torch.zeros_like(alpha)
    e[:, slot] = 1.0
    alpha = torch.where(ok.unsqueeze(1), alpha, e)
    hist = xh[:, :filled].double() + beta * fh[:, :filled].double()          # (B, filled, D)
    base = hist[:, slot]
    x_new = base + torch.einsum("bj,bjd->bd", alpha, hist - base.unsqueeze(1))
    x.copy_(torch.where(s1, x_new.to(x.dtype), x))


@torch.no_grad()
def fixed_point_solve(
    g: Callable[[torch.Tensor], torch.Tensor],
    y: torch.Tensor,
    tol: float = 1e-6,
    max_iter: int = 500,
    method: str = "banach",
    memory: int = 5,
    on_fail: str = "warn",
    *,
    beta: float = 1.0,
    reg: float = 1e-10,
    backend: str = "auto",
    max_lag: int = 4,
    what: str = "fixed-point inverse",
) -> tuple[torch.Tensor, FixedPointInfo]:
    """Solve ``x + g(x) = y`` per sample (``x_0 = y``), not differentiable.

    Args:
        g: the contractive residual branch; must return a tensor of ``y``'s shape, dtype and device.
        y: ``(B, ...)`` right-hand side (a non-contiguous ``y`` is copied; ``x`` is a new tensor).
        tol: per-sample tolerance on the true residual ``max |x + g(x) - y|``, relative to
            ``max(1, max |y|)`` and never below ``8 eps`` (the rule of ``fixed_point_solve_reference``).
        max_iter: cap on the evaluations of ``g`` (>= 1).
        method: ``"banach"`` (``x <- y - g(x)``) or ``"anderson"`` (type-II Anderson mixing of the
            last ``memory`` iterates, a small least-squares problem per sample, ``memory`` in 1..16).
        on_fail: ``"warn"``, ``"raise"`` (``ConvergenceError``) or ``"ignore"``.
        beta: Anderson damping (1 = undamped); reg: Tikhonov regularisation of its Gram matrix,
            relative to its largest diagonal entry.
        backend: ``"auto"``, ``"extension"`` or ``"reference"`` (``"reference"`` with
            ``method="banach"`` is ``fixed_point_solve_reference``; with Anderson, the
            pure-PyTorch version of the same step).
        max_lag: CUDA: how many iterations the host may run ahead of its convergence information.
        what: what the solve is, in the report of samples that did not converge.

    Returns:
        ``(x, info)``: samples stop moving as soon as they converge; ``info.iterations`` is the
        first iteration after which all had converged (or ``max_iter``), ``info.g_evals`` the
        evaluations of ``g`` actually made (on CUDA up to ``max_lag`` more, on frozen samples),
        ``info.residual`` / ``info.converged`` per sample, for the returned ``x``.
    """
    check_tensor(y, "y")
    if y.dim() < 1 or y.shape[0] == 0:
        raise ValueError(f"y must be a non-empty batch, got shape {tuple(y.shape)}")
    check_finite(y, "y")
    if isinstance(max_iter, bool) or int(max_iter) != max_iter or max_iter < 1:
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    max_iter = int(max_iter)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol!r}")
    if method not in ("banach", "anderson"):
        raise ValueError(f"method must be 'banach' or 'anderson', got {method!r}")
    if on_fail not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_fail must be 'warn', 'raise' or 'ignore', got {on_fail!r}")
    max_m = _ext.max_anderson_memory() if _ext.available() else 16
    if method == "anderson" and not (isinstance(memory, int) and 1 <= memory <= max_m):
        raise ValueError(f"memory must be an integer in [1, {max_m}], got {memory!r}")
    check_backend(backend, "fixed_point_solve", ("auto", "extension", "reference"))
    if backend == "reference" and method == "banach":
        return fixed_point_solve_reference(g, y, tol=tol, max_iter=max_iter, on_fail=on_fail, what=what)
    use_ext = use_extension(backend, y.device, y.dtype, True, "fixed_point_solve")

    shape, B = y.shape, y.shape[0]
    y2 = y.detach().reshape(B, -1).contiguous()
    D = y2.shape[1]
    x2 = y2.clone()
    thr = _threshold(y, tol).to(y.dtype).contiguous()
    converged = torch.zeros(B, dtype=torch.bool, device=y.device)
    residual = torch.full((B,), math.inf, dtype=y.dtype, device=y.device)
    counter = torch.zeros(max_iter, dtype=torch.int32, device=y.device)
    if method == "anderson":
        xh = torch.zeros(B, memory, D, dtype=y.dtype, device=y.device)
        fh = torch.zeros_like(xh)
        gram = torch.zeros(B, memory, memory, dtype=torch.float64, device=y.device)
    poller = _ConvergencePoller(counter, max_lag)

    evals = 0
    for it in range(1, max_iter + 1):
        gx = g(x2.view(shape))
        evals += 1
        if not isinstance(gx, torch.Tensor):
            raise TypeError(f"g must return a torch.Tensor, got {type(gx).__name__}")
        if gx.shape != shape:
            raise ValueError(f"g changed the shape: {tuple(shape)} -> {tuple(gx.shape)}")
        if gx.dtype != y.dtype:
            raise TypeError(f"g changed the dtype: {y.dtype} -> {gx.dtype}")
        if gx.device != y.device:
            raise ValueError(f"g moved the data from {y.device} to {gx.device} (mixed devices)")
        gx2 = gx.detach().reshape(B, D).contiguous()
        update = it < max_iter
        cnt = counter[it - 1:it]
        if method == "banach":
            if use_ext:
                torch.ops.acf.banach_step(x2, gx2, y2, thr, converged, residual, cnt, update)
            else:
                _banach_step_torch(x2, gx2, y2, thr, converged, residual, cnt, update)
        else:
            slot, filled = (it - 1) % memory, min(it, memory)
            step = torch.ops.acf.anderson_step if use_ext else _anderson_step_torch
            step(x2, gx2, y2, thr, converged, residual, cnt, xh, fh, gram, slot, filled, float(reg), float(beta),
                 update)
        if poller.push(it):
            break

    counts = counter[:evals].cpu()
    zero = (counts == 0).nonzero()
    iterations = int(zero[0]) + 1 if len(zero) else evals
    info = FixedPointInfo(iterations=iterations, g_evals=evals, residual=residual, converged=converged)
    report_nonconvergence(info, on_fail, what)
    return x2.view(shape), info


def _register_fake() -> None:
    """The fused steps only update their arguments in place: their fake kernels do nothing."""
    @torch.library.register_fake("acf::banach_step")
    def _banach(x, gx, y, thr, converged, residual, counter, update):
        return None

    @torch.library.register_fake("acf::anderson_step")
    def _anderson(x, gx, y, thr, converged, residual, counter, xh, fh, gram, slot, filled, reg, beta, update):
        return None


if _ext.available():
    _register_fake()
