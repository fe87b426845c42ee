"""Spectral normalisation with a certificate at every forward (Miyato et al. 2018; Behrmann et al. 2019).

A normalised layer applies ``W_hat = W / max(1, sigma_bar / c)`` with ``c < 1`` its coefficient.
The contraction of a residual branch needs ``||W_hat|| <= c`` for the map each forward applies, so
``sigma_bar`` must be an *upper* bound of the operator norm of ``W`` (at the layer's input size for
kxk convolutions). Power iteration alone gives a lower bound, and one warm-started step per forward
lags an optimizer: Adam at lr 1e-3 took the applied norms 10-26% above ``c`` within 16 steps.

So, whenever the weight has changed (its version counter or its storage: every optimizer step,
``load_state_dict``, ``.to()``), the next forward first *refreshes* the layer:

1. its persistent power iteration (``u``, ``v``) runs warm-started to a relative tolerance; for all
   layers of a model this is one batched call of ``acf._C`` (``refresh_spectral_norms``, called by
   ``ContractiveBlock`` and ``ACFModel`` before they run their branches);
2. ``sigma_bar >= ||W||`` is computed in float64 (``norm_bounds``):

   * dense and 1x1 layers: the exact norm, ``sqrt(lambda_max)`` of the Gram matrix on the smaller
     side;
   * kxk convolutions on an ``H x W`` input: the norm of the circular convolution on the
     ``(H + k - 1) x (W + k - 1)`` torus, ``max_f ||K_hat(f)||`` over its 2-D DFT frequencies. The
     zero-padded 'same' convolution is that circulant restricted to the embedded image (the ``k - 1``
     rows and columns of zeros absorb the wrap-around), hence a compression of it, and its norm is no
     larger (Sedghi, Gupta & Long 2019). Measured looseness: 1.00 for 1x1, a few per cent for 3x3 on
     7x7-14x14 inputs, shrinking as the input grows.

The applied ``sigma`` has the *value* ``sigma_bar`` and the *gradient* of ``u^T W v`` (``u``, ``v``
held constant): the i-ResNet / Residual Flows gradient path, which is the gradient of ``||W||`` once
the power iteration has converged. Between weight changes nothing is recomputed, so repeated calls
(the log-det series, every step of an inverse) apply exactly the same map.
"""
from __future__ import annotations

import collections
import contextlib
import math
from typing import Iterable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_coefficient, check_image, check_tensor
from ..ops.power_iteration import LinearOp, _normalize, power_iteration, spectral_norms

# Relative margin added to every bound: covers the float64 rounding of the FFT, the Gram product and
# the eigensolver (a few units of 1e-16), and the rounding of the bound to float32 (6e-8) when a model
# is cast with ``.float()`` (which casts this buffer too).
_ROUNDING_MARGIN = 1e-6


def spectral_norm(weight: torch.Tensor, n_iter: Optional[int] = None, tol: float = 1e-6) -> torch.Tensor:
    """Estimate ``||W||_2`` of a 2-D matrix by power iteration (a lower bound, converged to ``tol``)."""
    check_tensor(weight, "weight", ndim=2)
    v = torch.randn(weight.shape[1], dtype=weight.dtype, device=weight.device)
    sigma, *_ = power_iteration(lambda x: weight @ x, lambda y: weight.t() @ y, v, n_iter=n_iter,
                                tol=None if n_iter is not None else tol)
    return sigma


def _largest_singular_value(re: torch.Tensor, im: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``||K||_2`` of ``K = re + i im`` (batched ``(..., m, n)``), from the largest eigenvalue of the
    Hermitian Gram matrix on the smaller side (real arithmetic for the products)."""
    if re.shape[-1] > re.shape[-2]:  # K^H K is n x n; K K^H is m x m: take the smaller
        re, im = re.mT, (None if im is None else -im.mT)
    gram = re.mT @ re
    if im is not None:
        gram = torch.complex(gram + im.mT @ im, re.mT @ im - im.mT @ re)
    if gram.shape[-1] == 1:
        top = gram[..., 0, 0].real
    else:
        with _one_cpu_thread(gram):
            top = torch.linalg.eigvalsh(gram)[..., -1]
    return top.clamp_min(0.0).sqrt()


@contextlib.contextmanager
def _one_cpu_thread(t: torch.Tensor) -> Iterator[None]:
    """Run CPU LAPACK on one thread: a batch of small eigensolves gains nothing from threads, and with
    another process on the cores the threaded path was measured 200x slower (3 s for 4 x 128 x 128)."""
    n = torch.get_num_threads()
    if t.device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _reachable_taps(w: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
    """The central ``min(k, 2H - 1) x min(k, 2W - 1)`` taps of centred kernels ``(..., k, k)``: a tap
    offset by ``H`` or more rows (or ``W`` columns) only ever meets zero padding, so the cropped kernel
    is the same operator on an ``H x W`` input, on a smaller (tighter) torus."""
    k, c = w.shape[-1], w.shape[-1] // 2
    rh, rw = min(c, input_hw[0] - 1), min(c, input_hw[1] - 1)
    return w[..., c - rh:c + rh + 1, c - rw:c + rw + 1]


@torch.no_grad()
def norm_bounds(weights: torch.Tensor, input_hw: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Certified upper bounds of the operator norms of a stack of layers, in float64.

    Args:
        weights: ``(G, m, n)`` matrices, or ``(G, Cout, Cin, k, k)`` odd square kernels of stride-1
            'same' convolutions (1x1 kernels are matrices).
        input_hw: the convolutions' input size ``(H, W)`` (needed for ``k > 1``).

    Returns:
        ``(G,)`` float64: the exact norm of each matrix; for a kxk kernel the norm of its circular
        convolution on the ``(H + k - 1) x (W + k - 1)`` torus, which bounds the zero-padded operator
        (see the module docstring; on inputs smaller than the kernel, the taps that never meet the
        input are dropped first). A relative margin of 1e-6 covers rounding (to float32 at worst).
    """
    w = weights.detach().double()
    if w.dim() == 5 and w.shape[-1] == 1:
        w = w.flatten(2)
    if w.dim() == 3:
        top = _largest_singular_value(w)
    elif w.dim() == 5:
        if input_hw is None:
            raise ValueError(f"norm_bounds: {w.shape[-1]}x{w.shape[-1]} kernels need input_hw")
        w = _reachable_taps(w, input_hw)
        kh, kw = w.shape[-2:]
        spectrum = torch.fft.rfft2(w, s=(input_hw[0] + kh - 1, input_hw[1] + kw - 1))  # (G, Co, Ci, H', W'/2+1)
        spectrum = spectrum.movedim((-2, -1), (1, 2))  # (G, H', W'/2+1, Co, Ci): one matrix per frequency
        # a real kernel has K_hat(-f) = conj(K_hat(f)): the half spectrum holds every singular value
        top = _largest_singular_value(spectrum.real, spectrum.imag).flatten(1).amax(1)
    else:
        raise ValueError(f"norm_bounds: expected (G, m, n) or (G, Cout, Cin, k, k), got {tuple(w.shape)}")
    return top * (1.0 + _ROUNDING_MARGIN)


class _SpectralNormalized(nn.Module):
    """Shared machinery: coefficient, persistent ``u``/``v``, the certified bound and when to refresh it.

    Subclasses define ``weight``, the ``u``/``v`` buffers, ``_ops_of(w)`` (the operator of a weight
    ``w`` and its adjoint, on ``v``- and ``u``-shaped tensors) and ``input_hw`` (``None`` for dense
    layers).
    """

    input_hw: Optional[tuple[int, int]] = None

    def __init__(self, coeff: float, tol: float, max_iter: int) -> None:
        super().__init__()
        self.coeff = check_coefficient(coeff)
        if not (isinstance(tol, (int, float)) and 0.0 < tol < 1.0):
            raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        self.tol, self.max_iter = float(tol), max_iter
        # The certified bound of ||W|| (float64, updated in place: a compiled graph reads it as an
        # input), for the weight version _refreshed_for (see _weight_key).
        self.register_buffer("sigma_bar", torch.zeros((), dtype=torch.float64), persistent=False)
        self._refreshed_for: Optional[tuple] = None
        self._checked: Optional[tuple] = None           # (weight version, lipschitz_bound())

    def _ops_of(self, w: torch.Tensor) -> tuple[LinearOp, LinearOp]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _op(self, x: torch.Tensor) -> torch.Tensor:
        return self._ops_of(self.weight)[0](x)

    def _op_t(self, y: torch.Tensor) -> torch.Tensor:
        return self._ops_of(self.weight)[1](y)

    def _weight_key(self) -> tuple:
        """Changes whenever the weight may have: in-place updates bump ``_version``; ``.to()`` and
        ``.double()`` move the storage."""
        w = self.weight
        return (w._version, w.data_ptr(), w.dtype, w.device)

    @property
    def stale(self) -> bool:
        """True when the weight changed since the last refresh (the next forward refreshes first)."""
        return self._refreshed_for != self._weight_key()

    def refresh(self, n_iter: Optional[int] = None, tol: Optional[float] = None) -> int:
        """Advance the power iteration (``n_iter`` steps, or to ``tol``; default: the layer's ``tol``)
        and recompute the certified bound; returns the number of power-iteration steps taken."""
        _, steps = refresh_spectral_norms([self], n_iter=n_iter, tol=tol, return_steps=True)
        return int(steps[0])

    def sigma(self) -> torch.Tensor:
        """The applied norm: value ``sigma_bar`` (a certified upper bound of ``||W||``), gradient of
        ``u^T W v`` with ``u``, ``v`` constant. Refreshes first if the weight changed."""
        if not torch.compiler.is_compiling() and self.stale:  # compiled: the enclosing block refreshes
            self.refresh()
        sigma_bar = self.sigma_bar.to(self.weight.dtype)
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return sigma_bar
        estimate = (self.u.clone() * self._op(self.v.clone())).sum()  # clones: a later refresh is in place
        return estimate + (sigma_bar - estimate).detach()

    def normalized_weight(self) -> torch.Tensor:
        """``W / max(1, sigma_bar / c)``: its operator norm is at most ``c`` (up to the rounding of
        the division in the weight's dtype), whatever happened to ``W`` since the last call."""
        return self.weight / torch.clamp(self.sigma() / self.coeff, min=1.0)

    @torch.no_grad()
    def lipschitz_bound(self) -> torch.Tensor:
        """Operator norm of the normalised weight at the input size, by Lanczos (float64, to 1e-10):
        the exact check of the certificate, independent of ``sigma_bar`` (kept until the weight changes)."""
        key = self._weight_key()
        if self._checked is None or self._checked[0] != key:
            w_hat = self.normalized_weight().double()
            op, op_t = self._ops_of(w_hat)
            self._checked = (key, operator_norm(op, op_t, tuple(self.v.shape), tuple(self.u.shape), w_hat))
        return self._checked[1]


@torch.compiler.disable  # runs eagerly, between the compiled graphs (it reads version counters)
@torch.no_grad()
def refresh_spectral_norms(
    model: Union[nn.Module, Iterable[_SpectralNormalized]],
    n_iter: Optional[int] = None,
    tol: Optional[float] = None,
    backend: str = "auto",
    stale_only: bool = False,
    return_steps: bool = False,
):
    """Refresh every spectrally normalised layer of ``model`` (a module, or a list of layers).

    One batched power-iteration call (``acf.ops.power_iteration.spectral_norms``: ``acf._C`` when it is loaded) per
    group of layers with the same settings, device and dtype, warm-started from and updating the
    layers' ``u``/``v`` in place: ``n_iter`` steps, or to ``tol``, or (neither) to each layer's own
    ``tol``; then the certified bounds, one ``norm_bounds`` call per weight shape. With
    ``stale_only``, only layers whose weight changed since their last refresh (what a forward does).

    Returns:
        The certified bounds ``sigma_bar`` (float64), in ``model.modules()`` order, or
        ``(bounds, steps)``; layers skipped as fresh report their bound and 0 steps.
    """
    layers = list(model.modules() if isinstance(model, nn.Module) else model)
    layers = [m for m in layers if isinstance(m, _SpectralNormalized)]
    todo = [m for m in layers if m.stale or not stale_only]
    steps = dict(zip(map(id, todo), _advance_power_iterations(todo, n_iter, tol, backend)))
    _recompute_bounds(todo)
    bounds = torch.stack([m.sigma_bar.cpu() for m in layers]) if layers else torch.empty(0, dtype=torch.float64)
    steps = torch.tensor([steps.get(id(m), 0) for m in layers], dtype=torch.long)
    return (bounds, steps) if return_steps else bounds


def _advance_power_iterations(layers: list[_SpectralNormalized], n_iter: Optional[int], tol: Optional[float],
                             backend: str) -> list[int]:
    """One ``spectral_norms`` call per group of layers with the same settings, device and dtype
    (usually one for a whole model); returns the steps taken per layer."""
    groups: dict = collections.defaultdict(list)
    for i, m in enumerate(layers):
        k_iter, k_tol = (None, m.tol) if n_iter is None and tol is None else (n_iter, tol)
        groups[(k_iter, k_tol, m.max_iter, m.weight.device, m.weight.dtype)].append(i)
    steps = [0] * len(layers)
    for (k_iter, k_tol, k_max, _, _), idxs in groups.items():
        _, st = spectral_norms([layers[i].weight for i in idxs], n_iter=k_iter, tol=k_tol,
                               us=[layers[i].u for i in idxs], vs=[layers[i].v for i in idxs],
                               max_iter=k_max, backend=backend, return_steps=True)
        for i, k in zip(idxs, st.tolist()):
            steps[i] = k
    return steps


def _recompute_bounds(layers: list[_SpectralNormalized]) -> None:
    """``norm_bounds`` once per weight shape and input size; marks the layers fresh."""
    groups: dict = collections.defaultdict(list)
    for m in layers:
        hw = m.input_hw if m.weight.dim() == 4 and m.weight.shape[-1] > 1 else None
        groups[(tuple(m.weight.shape), hw, m.weight.device)].append(m)
    for (_, hw, _), members in groups.items():
        bounds = norm_bounds(torch.stack([m.weight.detach() for m in members]), hw)
        for m, bound in zip(members, bounds):
            m.sigma_bar.copy_(bound)
            m._refreshed_for = m._weight_key()


@torch.no_grad()
def operator_norm(op: LinearOp, op_t: LinearOp, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                  like: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """Largest singular value of a linear operator by ARPACK's Lanczos bidiagonalisation (float64).

    Power iteration converges slowly when the top singular values are close (common for
    convolution operators); this converges to ``tol`` regardless and checks the certificate.
    """
    from scipy.sparse.linalg import ArpackError, LinearOperator, svds

    def wrap(fn: LinearOp, shape: tuple[int, ...]):
        def apply(x):
            t = torch.as_tensor(x.reshape(shape), dtype=like.dtype, device=like.device)
            return fn(t).double().cpu().numpy().reshape(-1)
        return apply

    def dense_norm() -> torch.Tensor:
        eye = torch.eye(n_in, dtype=like.dtype, device=like.device).reshape((n_in,) + in_shape[1:])
        dense = torch.stack([op(e.unsqueeze(0)).reshape(-1) for e in eye], dim=1)
        return torch.linalg.matrix_norm(dense.double(), ord=2).to(like.dtype)

    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if min(n_in, n_out) <= 2:  # ARPACK needs k < min(shape); tiny operators are dense-cheap
        return dense_norm()
    lin = LinearOperator((n_out, n_in), matvec=wrap(op, in_shape), rmatvec=wrap(op_t, out_shape), dtype=float)
    try:
        sigma = svds(lin, k=1, tol=tol, return_singular_vectors=False)[0]
    except ArpackError:  # e.g. all singular values equal (a multiple of an isometry): no shift applies
        return dense_norm()
    return torch.tensor(float(sigma), dtype=like.dtype, device=like.device)


class SpectralLinear(_SpectralNormalized):
    """Linear layer ``y = x W_hat^T + b`` with ``||W_hat||_2 <= coeff`` (exact norm: see module docstring).

    ``tol``: relative tolerance of the warm-started power iteration that gives the gradient path
    (at most ``max_iter`` steps per refresh).
    """

    def __init__(self, in_features: int, out_features: int, coeff: float = 0.97, bias: bool = True,
                 tol: float = 1e-3, max_iter: int = 100) -> None:
        super().__init__(coeff, tol, max_iter)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.register_buffer("u", _normalize(torch.randn(out_features)))
        self.register_buffer("v", _normalize(torch.randn(in_features)))
        self.refresh(tol=1e-4)

    def _ops_of(self, w: torch.Tensor) -> tuple[LinearOp, LinearOp]:
        return (lambda x: w @ x), (lambda y: w.t() @ y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features (shape {tuple(x.shape)}); expected {self.in_features}")
        return F.linear(x, self.normalized_weight(), self.bias)


class SpectralConv2d(_SpectralNormalized):
    """Stride-1 'same' convolution whose operator norm at ``input_hw`` is at most ``coeff``.

    The applied scale is the exact norm for 1x1 kernels and the torus bound for kxk kernels (see
    the module docstring); the power iteration (gradient path) runs on the zero-padded operator
    itself, conv2d / conv_transpose2d at the input's spatial size.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, input_hw: tuple[int, int],
                 coeff: float = 0.97, bias: bool = True, tol: float = 1e-3, max_iter: int = 100) -> None:
        super().__init__(coeff, tol, max_iter)
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

    def _ops_of(self, w: torch.Tensor) -> tuple[LinearOp, LinearOp]:
        return (lambda x: F.conv2d(x, w, padding=self.padding)), \
            (lambda y: F.conv_transpose2d(y, w, padding=self.padding))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x, self.in_channels)
        if self.kernel_size > 1 and tuple(x.shape[2:]) != self.input_hw:
            raise ValueError(
                f"input has spatial size {tuple(x.shape[2:])}; this {self.kernel_size}x{self.kernel_size} "
                f"convolution was normalised for {self.input_hw}"
            )
        w = self.normalized_weight()
        if self.kernel_size == 1 and x.shape[2] == x.shape[3] == 1:  # a dense layer (FC blocks): one GEMM
            return F.linear(x.flatten(1), w.flatten(1), self.bias)[:, :, None, None]
        return F.conv2d(x, w, self.bias, padding=self.padding)
