"""The ``power_iteration`` op: spectral norms of many operators at once, by power iteration.

``spectral_norms`` estimates ``||W||_2`` of dense matrices and of kxk 'same' convolution operators
(at an input size), all in one call, warm-started from persistent ``u``/``v`` vectors updated in
place. Its reference is ``power_iteration`` (one operator, pure PyTorch); the fast path is
``torch.ops.acf.power_iteration`` of ``acf._C`` (``csrc/power_iteration.cpp``: per operator on CPU,
stacked by shape on CUDA, convergence checked on the device). ``backend``: ``"auto"`` (the
extension when it is loaded and supports the device and dtype, float32/float64), ``"extension"``
or ``"reference"`` (see ``acf.ops.backends``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .. import _ext
from .._checks import check_tensor
from .backends import check_backend, use_extension

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

    check_backend(backend, "spectral_norms", ("auto", "extension", "reference"))
    if use_extension(backend, w0.device, w0.dtype, False, "spectral_norms"):
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


def _register_fake() -> None:
    """Shapes of ``torch.ops.acf.power_iteration`` for torch.compile (it updates ``us``/``vs`` in place)."""
    @torch.library.register_fake("acf::power_iteration")
    def _(weights, us, vs, n_iter, tol, max_iter, check_every, strategy=0):
        return weights[0].new_empty(len(weights)), weights[0].new_empty(len(weights), dtype=torch.long)


if _ext.available():
    _register_fake()
