"""Workloads of the op benchmarks, shared by bench/bench_power_iteration.py, bench/bench_fixed_point.py,
bench/gpu_ops.py and bench/bench_l2_attention.py (``wall``).

* ``resflow_stack``: the spectrally normalised layers of a CIFAR-10 Residual Flow: 3x32x32 images,
  squeezed to 12x16x16 and 48x8x8, ``blocks`` Residual-Flow branches per scale, 3x3 / 1x1 / 3x3
  convolutions with ``hidden`` channels (the paper's preset is 16 blocks per scale, hidden 512).
* ``trained_like_blocks``: contractive blocks whose layers sit at their coefficients 0.90-0.98
  (weights scaled up, then normalised), as after training, and a batch to invert.
* ``dense_contractive_blocks``: dense blocks whose Jacobians use their Lipschitz budget 0.90-0.98.
* ``wall``: best-of-``repeat`` wall time; ``DEV`` and ``sync``: the device the benchmarks run on.
"""
from __future__ import annotations

import time

import torch

from acf.ops.fixed_point import fixed_point_solve
from acf.layers.block import ContractiveBlock
from acf.layers.branches import resflow_branch
from acf.layers.spectral_norm import refresh_spectral_norms

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def sync() -> None:
    """Wait for the device (CUDA kernels run asynchronously)."""
    if CUDA:
        torch.cuda.synchronize()


def resflow_stack(blocks: int = 4, hidden: int = 512, device: str = "cpu") -> torch.nn.Module:
    layers = []
    for c, hw in ((12, (16, 16)), (48, (8, 8))):
        for _ in range(blocks):
            layers.append(resflow_branch(c, hw, hidden=hidden, coeff=0.98))
    return torch.nn.Sequential(*layers).to(device)


def python_refresh(model: torch.nn.Module, n_iter: int = 1) -> None:
    """The per-layer Python loop: ``layer.refresh(n_iter)`` on every spectrally normalised layer."""
    for m in model.modules():
        if hasattr(m, "refresh") and hasattr(m, "u"):
            m.refresh(n_iter=n_iter)


def extension_refresh(model: torch.nn.Module, n_iter: int = 1) -> None:
    refresh_spectral_norms(model, n_iter=n_iter, backend="extension")


def trained_like_blocks(n_blocks: int = 4, channels: int = 12, hw=(16, 16), hidden: int = 128, batch: int = 16,
                        device: str = "cpu", seed: int = 0):
    """Blocks with coefficients spread over 0.90-0.98, every layer at its coefficient; returns (blocks, y)."""
    torch.manual_seed(seed)
    coeffs = torch.linspace(0.90, 0.98, n_blocks).tolist()
    blocks = []
    for c in coeffs:
        g = resflow_branch(channels, hw, hidden=hidden, coeff=c)
        with torch.no_grad():
            for p in g.parameters():
                p.mul_(4.0)
        g = g.to(device)
        refresh_spectral_norms(g, tol=1e-4)
        blocks.append(ContractiveBlock(g).eval())
    x = torch.randn(batch, channels, *hw, device=device)
    with torch.no_grad():
        y = x
        for b in blocks:
            y, _ = b(y)
    return blocks, y, x


@torch.no_grad()
def invert_stack(blocks, y, method: str, tol: float = 1e-6, memory: int = 5, backend: str = "auto"):
    """Invert the stack block by block; returns (x, total g evaluations, max residual)."""
    evals, worst = 0, 0.0
    for b in reversed(blocks):
        if method == "reference":
            from acf.ops.fixed_point import fixed_point_solve_reference
            y, info = fixed_point_solve_reference(b.g, y, tol=tol, max_iter=2000)
        else:
            y, info = fixed_point_solve(b.g, y, tol=tol, max_iter=2000, method=method, memory=memory,
                                            backend=backend)
        evals += info.g_evals
        worst = max(worst, float(info.residual.max()))
    return y, evals, worst


def wall(fn, repeat: int = 3, sync=lambda: None) -> float:
    """Best-of-``repeat`` wall time of ``fn()`` in seconds."""
    best = float("inf")
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


class _Tanh(torch.nn.Module):
    """tanh, 1-Lipschitz."""

    def forward(self, x):
        return torch.tanh(x)

    def lipschitz_bound(self) -> float:
        return 1.0


def dense_contractive_blocks(n_blocks: int = 4, features: int = 768, batch: int = 16, device: str = "cpu",
                             seed: int = 0):
    """Blocks ``x + W2 tanh(W1 x)`` (SpectralLinear, coefficient sqrt(L) each, L = 0.90..0.98) whose
    Jacobian uses its Lipschitz budget (spread spectra, inputs in tanh's linear range): the regime
    of a trained block, where Banach needs O(1 / (1 - L)) steps. Returns (blocks, y, x)."""
    from acf.layers.block import LipschitzChain
    from acf.layers.spectral_norm import SpectralLinear

    torch.manual_seed(seed)
    blocks = []
    for lip in torch.linspace(0.90, 0.98, n_blocks).tolist():
        layers = []
        q, _ = torch.linalg.qr(torch.randn(features, features, dtype=torch.float64))
        ev = torch.linspace(-1, 1, features, dtype=torch.float64)
        for _ in range(2):  # W2 W1 = Q diag(ev^2) Q^T: Jacobian eigenvalues spread over [0, L]
            lin = SpectralLinear(features, features, coeff=lip ** 0.5, bias=False)
            with torch.no_grad():
                lin.weight.copy_(((q * ev) @ q.t()).float())
            refresh_spectral_norms(lin, tol=1e-6)
            layers.append(lin)
        g = LipschitzChain(layers[0], _Tanh(), layers[1]).to(device)
        blocks.append(ContractiveBlock(g).eval())
    x = 0.3 * torch.randn(batch, features, device=device)
    with torch.no_grad():
        y = x
        for b in blocks:
            y, _ = b(y)
    return blocks, y, x
