"""Fast paths of the compiled extension ``acf._C``, each with its pure-PyTorch reference.

* ``spectral_norms``: batched power iteration over many weights at once (dense matrices and
  kxk convolution operators), warm-started from persistent ``u``/``v`` that are updated in place;
  its reference is ``power_iteration``. (``acf.spectral_norm.refresh_spectral_norms`` runs it for
  every spectrally normalised layer of a model in one call.)
* ``fixed_point_solve``: ``x + g(x) = y`` per sample by Banach or Anderson iteration; the update,
  the per-sample residual and the convergence mask are one fused kernel, and the host learns
  about convergence without a synchronisation per iteration (CUDA: event-polled pinned copies).
* ``backend_info``: versions and which backends are active (for ``acf info``).

``backend="auto"`` picks the extension when it is loaded and supports the device and dtype
(float32/float64), else the reference; ``"extension"`` forces it (error if impossible);
``"reference"`` forces the pure-PyTorch code.
"""
from __future__ import annotations

import collections
import math
import platform
from typing import Callable, Optional, Sequence

import torch

from . import _ext
from ._checks import check_finite, check_tensor
from .fixed_point import FixedPointInfo, _threshold, report_nonconvergence
from .fixed_point import fixed_point_solve as _reference_banach

__all__ = ["spectral_norms", "power_iteration", "fixed_point_solve", "backend_info", "format_backend_info"]

_EXT_DTYPES = (torch.float32, torch.float64)
_BACKENDS = ("auto", "extension", "reference")


def _check_backend(backend: str) -> None:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _ext_supports(device: torch.device, dtype: torch.dtype, needs_device_kernels: bool) -> tuple[bool, str]:
    if not _ext.available():
        return False, f"the extension acf._C is not loaded ({_ext.error()})"
    if dtype not in _EXT_DTYPES:
        return False, f"the extension supports float32 and float64, not {dtype}"
    if device.type == "cpu":
        return True, ""
    if device.type == "cuda":
        if needs_device_kernels and not _ext.cuda_available():
            return False, "acf._C was built without its CUDA kernels"
        return True, ""
    return False, f"the extension does not support device {device}"


def _use_extension(backend: str, device: torch.device, dtype: torch.dtype, needs_device_kernels: bool,
                   what: str) -> bool:
    _check_backend(backend)
    if backend == "reference":
        return False
    ok, why = _ext_supports(device, dtype, needs_device_kernels)
    if backend == "extension" and not ok:
        raise RuntimeError(f"{what}: backend='extension' requested but {why}")
    return ok


# ---------------------------------------------------------------------------------------------
# Spectral norms
# ---------------------------------------------------------------------------------------------

LinearOp = Callable[[torch.Tensor], torch.Tensor]


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
    ``sigma = ||op(v)||`` is below ``tol`` (at most ``max_iter`` steps; the first step is compared
    with the starting vector's ``||op(v)||``, so a warm start that is still good stops after one).
    Returns ``(sigma, u, v, steps)`` with ``u = op(v) / sigma``; ``sigma <= ||op||_2`` always.
    """
    if n_iter is None and tol is None:
        raise ValueError("power_iteration needs n_iter or tol")
    if n_iter is not None and n_iter < 0:
        raise ValueError(f"n_iter must be >= 0, got {n_iter}")
    steps = n_iter if n_iter is not None else max_iter
    v = _normalize(v)
    w = op(v)
    sigma_prev = w.norm()  # the warm start's estimate: the first step is compared with it
    u = _normalize(w)
    done = 0
    for done in range(1, steps + 1):
        v = _normalize(op_t(u))
        w = op(v)
        sigma = w.norm()
        u = _normalize(w)
        if tol is not None and abs(float(sigma - sigma_prev)) <= tol * float(sigma):
            break
        sigma_prev = sigma
    sigma = (u * op(v)).sum()
    return sigma, u, v, done


def _conv_ops(w: torch.Tensor):
    pad = w.shape[-1] // 2
    return (lambda x: torch.nn.functional.conv2d(x, w, padding=pad),
            lambda y: torch.nn.functional.conv_transpose2d(y, w, padding=pad))


@torch.no_grad()
def _check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """Same device and dtype as ``ref``, and contiguous (the kernels read raw memory)."""
    if t.device != ref.device:
        raise ValueError(f"spectral_norms: {name} is on {t.device} but {ref_name} is on {ref.device} (mixed devices)")
    if t.dtype != ref.dtype:
        raise TypeError(f"spectral_norms: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"spectral_norms: {name} is not contiguous (call .contiguous())")


def spectral_norms(
    weights: Sequence[torch.Tensor],
    n_iter: Optional[int] = None,
    tol: Optional[float] = None,
    *,
    us: Optional[Sequence[torch.Tensor]] = None,
    vs: Optional[Sequence[torch.Tensor]] = None,
    input_hws: Optional[Sequence[Optional[tuple[int, int]]]] = None,
    max_iter: int = 1000,
    check_every: Optional[int] = None,
    return_steps: bool = False,
    backend: str = "auto",
    strategy: str = "auto",
):
    """Spectral norm estimates of many operators at once, by power iteration.

    Args:
        weights: 2-D matrices ``(m, n)``, and/or 4-D odd square kernels ``(Cout, Cin, k, k)``:
            for those the norm is that of the stride-1 'same' convolution operator at the spatial
            size ``input_hws[i]`` (or the size of ``us[i]``); 1x1 kernels are matrices.
        n_iter: fixed number of steps; or ``tol``: per operator, iterate until the relative change
            of the estimate is ``<= tol`` (at most ``max_iter`` steps). Neither: ``tol=1e-6``.
        us, vs: persistent power-iteration vectors (warm start), updated IN PLACE: for a matrix
            ``u`` has ``m`` and ``v`` ``n`` elements (any shape); for a convolution ``u`` is
            ``(1, Cout, H, W)`` and ``v`` ``(1, Cin, H, W)``, the buffers of ``SpectralConv2d``.
            Omitted: fresh random vectors (from the global generator), not kept.
        check_every: tolerance mode: how often the host looks at the device-side convergence mask
            (default 1 on CPU, 8 on CUDA); operators that converged are frozen on the device, so
            the result does not depend on it.
        return_steps: also return the number of steps taken per operator.
        backend: ``"auto"``, ``"extension"`` or ``"reference"`` (a Python loop over
            ``power_iteration``, one operator after the other).
        strategy: extension only: ``"batched"`` (operators of one shape stacked: one bmm or one
            grouped convolution per step and shape; the default on CUDA), ``"per_operator"`` (the
            reference's steps in C++; the default on CPU, where launches cost nothing and stacking
            would copy every weight) or ``"auto"``.

    Returns:
        ``sigmas`` (1-D, one per weight, ``u^T W v``, a lower bound of the norm), or
        ``(sigmas, steps)``.
    """
    weights = list(weights)
    if not weights:
        raise ValueError("spectral_norms: weights is empty")
    if n_iter is not None and tol is not None:
        raise ValueError("spectral_norms: give n_iter (fixed steps) or tol (tolerance), not both")
    if n_iter is None and tol is None:
        tol = 1e-6
    if n_iter is not None and (isinstance(n_iter, bool) or int(n_iter) != n_iter or n_iter < 0):
        raise ValueError(f"spectral_norms: n_iter must be an integer >= 0, got {n_iter!r}")
    if tol is not None and not (tol > 0):
        raise ValueError(f"spectral_norms: tol must be > 0, got {tol!r}")
    if max_iter < 1:
        raise ValueError(f"spectral_norms: max_iter must be >= 1, got {max_iter}")
    strategies = {"auto": 0, "per_operator": 1, "batched": 2}
    if strategy not in strategies:
        raise ValueError(f"spectral_norms: strategy must be one of {sorted(strategies)}, got {strategy!r}")
    if (us is None) != (vs is None):
        raise ValueError("spectral_norms: give both us and vs, or neither")
    if input_hws is not None and len(input_hws) != len(weights):
        raise ValueError(f"spectral_norms: {len(weights)} weights but {len(input_hws)} input_hws")
    if us is not None and (len(us) != len(weights) or len(vs) != len(weights)):
        raise ValueError(f"spectral_norms: {len(weights)} weights but {len(us)} us and {len(vs)} vs")

    w0 = weights[0]
    for i, w in enumerate(weights):
        check_tensor(w, f"weights[{i}]")
        _check_like(w, f"weights[{i}]", w0, "weights[0]")
        if w.dim() == 4 and (w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0):
            raise ValueError(f"spectral_norms: weights[{i}] has shape {tuple(w.shape)}; convolution kernels "
                             f"must be odd and square")
        if w.dim() not in (2, 4):
            raise ValueError(f"spectral_norms: weights[{i}] must be 2-D or a 4-D conv kernel, got shape "
                             f"{tuple(w.shape)}")
    weights = [w.detach() for w in weights]

    # Shapes of u and v: given, or made here (random, not kept).
    if us is None:
        us, vs = [], []
        for i, w in enumerate(weights):
            if w.dim() == 4 and w.shape[-1] > 1:
                if input_hws is None or input_hws[i] is None:
                    raise ValueError(f"spectral_norms: weights[{i}] is a {w.shape[-1]}x{w.shape[-1]} kernel: "
                                     f"give input_hws[{i}] (the input's spatial size) or us/vs")
                h, wd = input_hws[i]
                us.append(torch.randn(1, w.shape[0], h, wd, dtype=w.dtype, device=w.device))
                vs.append(torch.randn(1, w.shape[1], h, wd, dtype=w.dtype, device=w.device))
            else:
                us.append(torch.randn(w.shape[0], dtype=w.dtype, device=w.device))
                vs.append(torch.randn(w.shape[1], dtype=w.dtype, device=w.device))
    us, vs = list(us), list(vs)
    for name, vecs in (("us", us), ("vs", vs)):
        for i, t in enumerate(vecs):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"spectral_norms: {name}[{i}] must be a torch.Tensor")
            _check_like(t, f"{name}[{i}]", w0, "the weights")

    # 1x1 kernels are matrices; kxk kernels need (1, C, H, W) vectors.
    ops_w = []
    for i, w in enumerate(weights):
        if w.dim() == 4 and w.shape[-1] == 1:
            w = w.view(w.shape[0], w.shape[1])
        if w.dim() == 2:
            if us[i].numel() != w.shape[0] or vs[i].numel() != w.shape[1]:
                raise ValueError(f"spectral_norms: weights[{i}] is {tuple(w.shape)} but us[{i}] has "
                                 f"{us[i].numel()} and vs[{i}] {vs[i].numel()} elements")
        else:
            u, v = us[i], vs[i]
            if (u.dim() != 4 or v.dim() != 4 or u.shape[0] != 1 or v.shape[0] != 1 or u.shape[1] != w.shape[0]
                    or v.shape[1] != w.shape[1] or u.shape[2:] != v.shape[2:]):
                raise ValueError(f"spectral_norms: conv weights[{i}] {tuple(w.shape)} needs us[{i}] of shape "
                                 f"(1, Cout, H, W) and vs[{i}] of shape (1, Cin, H, W); got {tuple(u.shape)} "
                                 f"and {tuple(v.shape)}")
            if input_hws is not None and input_hws[i] is not None and tuple(input_hws[i]) != tuple(u.shape[2:]):
                raise ValueError(f"spectral_norms: input_hws[{i}]={tuple(input_hws[i])} but us[{i}] has spatial "
                                 f"size {tuple(u.shape[2:])}")
        ops_w.append(w)

    if _use_extension(backend, w0.device, w0.dtype, False, "spectral_norms"):
        if check_every is None:
            check_every = 8 if w0.device.type == "cuda" else 1
        sigmas, steps = torch.ops.acf.power_iteration(
            ops_w, us, vs, int(n_iter) if n_iter is not None else 0, float(tol) if tol is not None else 0.0,
            int(max_iter), int(check_every), strategies[strategy])
    else:
        sig, st = [], []
        for w, u, v in zip(ops_w, us, vs):
            if w.dim() == 2:
                op, op_t = (lambda x, w=w: w @ x), (lambda y, w=w: w.t() @ y)
                s, u_new, v_new, k = power_iteration(op, op_t, v.reshape(-1), n_iter=n_iter, tol=tol,
                                                     max_iter=max_iter)
            else:
                op, op_t = _conv_ops(w)
                s, u_new, v_new, k = power_iteration(op, op_t, v, n_iter=n_iter, tol=tol, max_iter=max_iter)
            u.copy_(u_new.view_as(u))
            v.copy_(v_new.view_as(v))
            sig.append(s)
            st.append(k)
        sigmas = torch.stack(sig)
        steps = torch.tensor(st, dtype=torch.long, device=w0.device)
    return (sigmas, steps) if return_steps else sigmas


# ---------------------------------------------------------------------------------------------
# Fixed-point inversion
# ---------------------------------------------------------------------------------------------

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
) -> tuple[torch.Tensor, FixedPointInfo]:
    """Solve ``x + g(x) = y`` per sample (``x_0 = y``), not differentiable.

    Args:
        g: the contractive residual branch; must return a tensor of ``y``'s shape, dtype and device.
        y: ``(B, ...)`` right-hand side (a non-contiguous ``y`` is copied; ``x`` is a new tensor).
        tol: per-sample tolerance on the true residual ``max |x + g(x) - y|``, relative to
            ``max(1, max |y|)`` and never below ``8 eps`` (the rule of ``acf.fixed_point``).
        max_iter: cap on the evaluations of ``g`` (>= 1).
        method: ``"banach"`` (``x <- y - g(x)``) or ``"anderson"`` (type-II Anderson mixing of the
            last ``memory`` iterates, a small least-squares problem per sample, ``memory`` in 1..16).
        on_fail: ``"warn"``, ``"raise"`` (``ConvergenceError``) or ``"ignore"``.
        beta: Anderson damping (1 = undamped); reg: Tikhonov regularisation of its Gram matrix,
            relative to its largest diagonal entry.
        backend: ``"auto"``, ``"extension"`` or ``"reference"`` (``"reference"`` with
            ``method="banach"`` is ``acf.fixed_point.fixed_point_solve``; with Anderson, the
            pure-PyTorch version of the same step).
        max_lag: CUDA: how many iterations the host may run ahead of its convergence information.

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
    _check_backend(backend)
    if backend == "reference" and method == "banach":
        return _reference_banach(g, y, tol=tol, max_iter=max_iter, on_fail=on_fail)
    use_ext = _use_extension(backend, y.device, y.dtype, True, "fixed_point_solve")

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
    report_nonconvergence(info, on_fail)
    return x2.view(shape), info


# ---------------------------------------------------------------------------------------------
# Backend report (``acf info``)
# ---------------------------------------------------------------------------------------------

def backend_info() -> dict:
    """Versions, active backends and the device, as a plain dict (printed by ``acf info``)."""
    from . import __version__

    ext = _ext.load()
    info: dict = {
        "acf": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device": "cpu",
        "extension": {
            "loaded": ext is not None,
            "cpu": ext is not None,
            "cuda": bool(ext is not None and getattr(ext, "WITH_CUDA", 0)),
            "path": getattr(ext, "__file__", None),
            "error": _ext.error(),
        },
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device()
        info["device"] = f"cuda:{idx} ({torch.cuda.get_device_name(idx)})"
    try:
        from .functional import triton_available
        triton_ok = bool(triton_available())
    except Exception:  # no such helper, or triton broken
        triton_ok = False
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    info["triton"] = {"available": triton_ok, "version": triton_version}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from .functional import auto_backend_summary

    info["backends"] = {
        "spectral_norms": "extension" if _ext_supports(dev, torch.float32, False)[0] else "reference",
        "fixed_point_solve": "extension" if _ext_supports(dev, torch.float32, True)[0] else "reference",
        "l2_attention": auto_backend_summary(dev),
    }
    return info


def format_backend_info(info: Optional[dict] = None) -> str:
    """``backend_info()`` as the lines ``acf info`` prints."""
    info = backend_info() if info is None else info
    ext = info["extension"]
    ext_state = ("not loaded" + (f" ({ext['error']})" if ext["error"] else "")) if not ext["loaded"] else \
        "loaded: CPU" + (" + CUDA" if ext["cuda"] else " (no CUDA kernels)")
    lines = [
        f"acf          {info['acf']}",
        f"python       {info['python']}",
        f"torch        {info['torch']} (CUDA {info['torch_cuda'] or 'none'})",
        f"device       {info['device']}",
        f"extension    acf._C {ext_state}",
        f"triton       {'available ' + str(info['triton']['version']) if info['triton']['available'] else 'not available'}",
        "backends     " + ", ".join(f"{k}={v}" for k, v in info["backends"].items()),
    ]
    return "\n".join(lines)
