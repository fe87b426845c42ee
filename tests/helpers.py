"""Shared test utilities: float64 Jacobians, empirical Lipschitz ratios, saturated branches, checkpoints, CLI errors."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from acf.layers.branches import iresnet_branch
from acf.layers.spectral_norm import SpectralConv2d


def jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """Full Jacobian of ``fn`` at a single sample ``x`` (shape (1, ...)) as a (D_out, D_in) matrix."""
    jac = torch.autograd.functional.jacobian(fn, x)
    return jac.reshape(fn(x).numel(), x.numel())


def random_pair_ratio(fn, shape, n_pairs: int = 64, scale: float = 1.0, dtype=torch.float64) -> float:
    """Largest ``||f(x) - f(y)|| / ||x - y||`` over random pairs (batched, per sample)."""
    x = torch.randn(n_pairs, *shape, dtype=dtype) * scale
    y = x + torch.randn_like(x) * scale * torch.rand(n_pairs, *([1] * len(shape)), dtype=dtype)
    with torch.no_grad():
        num = (fn(x) - fn(y)).flatten(1).norm(dim=1)
    return float((num / (x - y).flatten(1).norm(dim=1)).max())


def ascent_ratio(fn, shape, steps: int = 30, n_pairs: int = 8, lr: float = 0.05, scale: float = 1.0,
                 dtype=torch.float64) -> float:
    """Largest ratio found by gradient ascent on ``log ||f(x) - f(y)|| - log ||x - y||`` over pairs."""
    x = (torch.randn(n_pairs, *shape, dtype=dtype) * scale).requires_grad_(True)
    y = (x.detach() + 0.1 * scale * torch.randn_like(x)).requires_grad_(True)
    opt = torch.optim.Adam([x, y], lr=lr * scale)
    best = 0.0
    for _ in range(steps):
        ratio = (fn(x) - fn(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
        best = max(best, float(ratio.detach().max()))
        opt.zero_grad()
        (-torch.log(ratio).sum()).backward()
        opt.step()
    return best


def saturate(module: torch.nn.Module, gain: float = 20.0) -> torch.nn.Module:
    """Scale every spectrally normalised weight up so that its normalised norm equals its coefficient,
    and give attention layers a non-zero gamma: the branch then sits close to its certified bound."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, SpectralConv2d):
                m.weight.mul_(gain)
                m.refresh(tol=1e-6)
            if hasattr(m, "gamma"):
                m.gamma.fill_(3.0)
    return module


def positive_branch():
    """A saturated i-ResNet branch with L2 attention whose last convolution is the adjoint of the first
    and whose ELUs sit in their linear region (large biases), so that J_g is close to symmetric positive
    semi-definite with norm near its bound: log det is sizeable and the higher-order terms of the
    series matter (a random branch has tr(J^k) near 0 by symmetry, which tests nothing)."""
    g = saturate(iresnet_branch(2, (4, 4), hidden=8, attention="l2", heads=2, coeff=0.95), gain=20.0).double()
    convs = [m for m in g.modules() if hasattr(m, "refresh")]
    with torch.no_grad():
        convs[2].weight.copy_(convs[0].weight.transpose(0, 1).flip(2, 3))
        convs[1].weight.copy_(torch.eye(8, dtype=torch.float64).reshape(8, 8, 1, 1))
        for conv in convs:
            conv.bias.fill_(5.0)
            conv.refresh(tol=1e-8)
        for m in g.modules():
            if hasattr(m, "gamma"):
                m.gamma.fill_(0.3)
    return g.eval()


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Two runs' checkpoints hold bit-identical state: model, EMA, optimizer, schedule, random
    generators, step and history (wall-clock ``seconds`` aside, and the certified bounds
    ``lipschitz_max`` / ``lipschitz_blocks`` to 1e-4: ARPACK starts its Lanczos iteration from a vector
    of its own generator)."""
    def same(x, y, where: str, approx: bool = False) -> None:
        assert type(x) is type(y), where
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), where
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), where
            for k in x:
                if k != "seconds":
                    same(x[k], y[k], f"{where}.{k}", approx or k in ("lipschitz_max", "lipschitz_blocks"))
        elif isinstance(x, (list, tuple)):
            assert len(x) == len(y), where
            for i, (u, v) in enumerate(zip(x, y)):
                same(u, v, f"{where}[{i}]", approx)
        elif approx:
            assert abs(x - y) <= 1e-4 * abs(y), where
        else:
            assert x == y, where

    same(torch.load(a, weights_only=True), torch.load(b, weights_only=True), "checkpoint")


def adversarial_starts(channels: int, n: int, radius: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Starting points ``X^T`` (``(1, D, N)``, float64) for a search on a layer whose tokens live in a
    ball of radius ``radius``: Gaussian at two scales, three tight clusters, tokens far outside the
    ball ("large"), and a "hub" (one token at the ball's edge, the rest near the origin)."""
    def g(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    unit = radius / channels ** 0.5
    centers = g(1, channels, 3) * unit
    hub = 0.01 * unit * g(1, channels, n)
    hub[0, 0, 0] = radius
    return {"gaussian": g(1, channels, n) * unit, "gaussian-small": 0.3 * unit * g(1, channels, n),
            "clustered": centers[..., torch.randint(0, 3, (n,), generator=gen)] + 0.05 * unit * g(1, channels, n),
            "large": 10 * unit * g(1, channels, n), "hub": hub}


def jacobian_norm_ascent(fn, x0: torch.Tensor, steps: int = 30, iters: int = 10, lr: float = 0.05,
                         seed: int = 0) -> torch.Tensor:
    """Largest ``||J_fn(x)||_2`` found by gradient ascent from each start of the batch ``x0`` (samples
    independent, float64): power iteration on ``J^T J`` (``jvp``, then ``vjp``) for the top right
    singular vector ``v``, then an Adam step on ``x`` along the gradient of ``||J(x) v||``. Returns the
    best value per start (a lower bound of the Lipschitz constant)."""
    from torch.func import grad, jvp, vjp

    def per_sample(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(1).norm(dim=1)

    def power(x: torch.Tensor, v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        for _ in range(k):
            _, jv = jvp(fn, (x,), (v,))
            (w,) = vjp(fn, x)[1](jv)
            v = w / per_sample(w).clamp_min(1e-300).view(-1, *[1] * (x.dim() - 1))
        _, jv = jvp(fn, (x,), (v,))
        return per_sample(jv), v

    gen = torch.Generator().manual_seed(seed)
    x = x0.detach().clone()
    v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    v = v / per_sample(v).view(-1, *[1] * (x.dim() - 1))
    best, v = power(x, v, 3 * iters)
    step = lr * per_sample(x0).mean() / x0[0].numel() ** 0.5
    opt = torch.optim.Adam([x.requires_grad_(True)], lr=float(step))
    for _ in range(steps):
        sigma, v = power(x.detach(), v, iters)
        best = torch.maximum(best, sigma)
        v_fixed = v.detach()
        g = grad(lambda t: jvp(fn, (t,), (v_fixed,))[1].flatten(1).norm(dim=1).sum())(x.detach())
        opt.zero_grad()
        x.grad = -g
        opt.step()
    sigma, _ = power(x.detach(), v, 3 * iters)
    return torch.maximum(best, sigma).detach()


def one_line_error(capsys, *words) -> str:
    """The CLI's stderr (progress bars aside): one line ``acf <command>: ...`` holding ``words``, no traceback."""
    err = capsys.readouterr().err
    lines = [ln for ln in re.split(r"[\r\n]", err) if ln.strip() and not ln.startswith("train:")]
    assert len(lines) == 1 and lines[0].startswith("acf ") and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]
