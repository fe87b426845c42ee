"""Measurements of trained models: the attention's share of a layer's output, a block's input, the Jacobian
norm of a branch, the log-det estimator against the exact log-det, a block's inversion."""
from __future__ import annotations

import math
import statistics
import warnings
from typing import Callable, Optional

import torch

from ..runfolder import CHECKPOINT
from ..data import ImageDataset, to_float
from ..evaluate import load_run, run_test_set
from ..layers.attention import ATTENTIONS, attention_ablated, attention_layers
from ..layers.block import ContractiveBlock
from ..layers.branches import Gate
from ..layers.flow import bits_per_dim, standard_normal_logprob, uniform_dequantize
from ..layers.logdet import LogdetEstimator, exact_logdet, logdet_estimate
from ..models import ACFModel
from .runs import RunRecord, Scale

ATTENTION_TYPES = tuple(ATTENTIONS.values())  # the attention layer of every kind


def load_trained(rec: RunRecord) -> tuple[ACFModel, ImageDataset]:
    """The run's EMA model and test set (without the construction warning of uncertified branches)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="residual branch is not certified")
        model = load_run(rec.path, "cpu")  # where the experiments train
    return model, run_test_set(model.train_config)


def first_attention_block(model: ACFModel) -> ContractiveBlock:
    """The first residual block whose branch carries attention."""
    for m in model.modules():
        if isinstance(m, ContractiveBlock) and any(isinstance(a, ATTENTION_TYPES) for a in m.g.modules()):
            return m
    raise ValueError("the model has no attention layer")


def _gated(block: ContractiveBlock) -> Optional[Gate]:
    """The gate of a gated attention block (``attention_branch``), or None."""
    return next((m for m in block.g.modules() if isinstance(m, Gate)), None)


def attention_weights(model: torch.nn.Module) -> list[float]:
    """The learnt weight of every attention path: gamma (residual form), eta2 (quadrature), the gate
    ``sigmoid(theta)`` of a gated attention block."""
    gates = [g for b in model.modules() if isinstance(b, ContractiveBlock) for g in [_gated(b)] if g is not None]
    layers = [l for l in attention_layers(model) if l.form != "normalized"]
    return [float(l.attention_weight().detach()) for l in layers] + [g.lipschitz_bound() for g in gates]


@torch.no_grad()
def attention_shares(model: ACFModel, x: torch.Tensor) -> list[float]:
    """For each attention path, on the inputs it actually receives when ``model`` runs on ``x``: the
    attention part's norm over the identity part's (0: the path does nothing). Residual form: ``||gamma
    A~|| / ||X||``; quadrature: ``||eta2 A~|| / ||eta1 X||``; a gated attention block: ``||g(x) - g_0(x)|| /
    ||x||`` with ``g_0`` its branch with the attention knocked out (a constant: its output bias)."""
    shares: list[float] = []

    def layer_share(layer: torch.nn.Module, inputs: tuple) -> None:
        xt = inputs[0].flatten(2)
        w = float(layer.attention_weight().detach())
        ident = 1.0 if layer.form == "residual" else math.sqrt(max(1.0 - w * w, 0.0))
        shares.append(abs(w) * float(layer.attention(xt).detach().norm()) / max(ident * float(xt.norm()), 1e-30))

    def block_share(block: torch.nn.Module, inputs: tuple) -> None:
        with attention_ablated(block.g):  # what g is without its attention: its output convolution's bias
            rest = block.g(inputs[0])
        shares.append(float((block.g(inputs[0]) - rest).detach().norm() / inputs[0].norm().clamp_min(1e-30)))

    handles = [m.register_forward_pre_hook(layer_share) for m in attention_layers(model) if m.form != "normalized"]
    handles += [b.register_forward_pre_hook(block_share) for b in model.modules()
                if isinstance(b, ContractiveBlock) and _gated(b) is not None]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return shares


def attention_pull(model: ACFModel, images: torch.Tensor, batches: int = 4, batch_size: int = 64) -> list[dict]:
    """How the training loss pulls on each in-branch attention path (residual and quadrature forms): with
    the layer's ``pull = (a, b)`` at zero, ``dL/da`` is the loss's derivative along the identity part of
    the layer's output and ``dL/db`` along the attention part, the log-det's dependence included (the
    model's training estimator, averaged over ``batches`` batches of ``images``, 8-bit in ``[0, 1]``).
    Returns per layer ``s = -dL/da`` (> 0: the branch wants more gain) and ``r = |dL/db| / |dL/da|``. For
    the residual form, gamma = 0 is a local minimum (a dead zone) whenever ``r <= 1`` with ``s > 0``."""
    layers = [l for l in attention_layers(model) if l.form in ("residual", "quadrature")]
    if not layers:
        return []
    p = next(model.parameters())
    sums = [[0.0, 0.0] for _ in layers]
    was_training = model.training
    model.train()
    try:
        for i in range(batches):
            x = images[(i * batch_size) % len(images):][:batch_size].to(p)
            leaves = [(torch.zeros((), dtype=p.dtype, requires_grad=True),
                       torch.zeros((), dtype=p.dtype, requires_grad=True)) for _ in layers]
            for layer, pair in zip(layers, leaves):
                layer.pull = pair
            z, logdet = model(uniform_dequantize(x))
            loss = bits_per_dim(standard_normal_logprob(z) + logdet, model.dims).mean()
            grads = torch.autograd.grad(loss, [t for pair in leaves for t in pair])
            for j in range(len(layers)):
                sums[j][0] += float(grads[2 * j]) / batches
                sums[j][1] += float(grads[2 * j + 1]) / batches
    finally:
        for layer in layers:
            layer.pull = None
        model.train(was_training)
    return [{"s": -da, "dL_db": db, "r": abs(db) / abs(da) if da else None} for da, db in sums]


def attention_columns(rec: RunRecord, scale: Scale) -> dict:
    """Mean and largest attention share (``attention_shares``) of a finished run on test images."""
    if rec.cfg.attention is None or not (rec.path / CHECKPOINT).exists():
        return {}
    model, test = load_trained(rec)
    torch.manual_seed(0)
    shares = attention_shares(model, uniform_dequantize(batch_of_test_images(test, scale.share_images)))
    return {"attention_share": statistics.fmean(shares), "attention_share_max": max(shares)}


class _Captured(Exception):
    """Stops a forward pass once a hook has what it needs."""


@torch.no_grad()
def block_input(model: ACFModel, block: ContractiveBlock, x: torch.Tensor) -> torch.Tensor:
    """What ``block`` receives when the model maps the images ``x`` (a forward hook)."""
    seen: list[torch.Tensor] = []

    def grab(module: torch.nn.Module, inputs: tuple) -> None:
        seen.append(inputs[0].detach().clone())
        raise _Captured  # the rest of the forward is not needed

    handle = block.register_forward_pre_hook(grab)
    try:
        model(x)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not seen:
        raise ValueError("the block was not reached by the model's forward pass")
    return seen[0]


def jacobian_norm(g: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, iters: int = 20,
                  seed: int = 0) -> torch.Tensor:
    """Per-sample ``||J_g(x)||_2`` by power iteration on ``J^T J`` (J v by the double-VJP trick);
    a lower bound on ``Lip(g)``, and on the contraction the inverse and the log-det series need."""
    gen = torch.Generator().manual_seed(seed)
    view = (-1,) + (1,) * (x.dim() - 1)

    def unit(t: torch.Tensor) -> torch.Tensor:
        return t / t.flatten(1).norm(dim=1).clamp_min(1e-30).view(view)

    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        gx = g(x)
        u = torch.zeros_like(gx, requires_grad=True)
        (jt_u,) = torch.autograd.grad(gx, x, u, create_graph=True)  # J^T u, linear in u
        v = unit(torch.randn(x.shape, generator=gen).to(x))
        for _ in range(max(iters, 1)):
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            (jtjv,) = torch.autograd.grad(gx, x, jv, retain_graph=True)
            v = unit(jtjv)
        (jv,) = torch.autograd.grad(jt_u, u, v)
    return jv.flatten(1).norm(dim=1).detach()


def logdet_error(g: torch.nn.Module, x: torch.Tensor, est: LogdetEstimator, draws: int) -> dict:
    """The estimator (``draws`` independent draws per sample) against the exact log-det of the full
    Jacobian: max absolute error of the mean, the same in standard errors, non-finite draws, and
    whether ``det(I + J_g) <= 0`` (then no log-det exists: the block is not invertible there)."""
    try:
        _, exact = exact_logdet(g, x.detach().requires_grad_(True))
    except ValueError as exc:
        if "det(I + J_g) <= 0" not in str(exc):
            raise
        return {"logdet_exact": float("nan"), "det_nonpositive": 1, "logdet_abs_error": float("nan"),
                "logdet_error_se": float("nan"), "logdet_nonfinite_draws": float("nan")}
    with torch.no_grad():
        est_draws = torch.stack([logdet_estimate(g, x, est, training=False)[1] for _ in range(draws)])
    ok = torch.isfinite(est_draws)
    mean = torch.where(ok, est_draws, 0.0).sum(0) / ok.sum(0).clamp_min(1)
    se = est_draws.std(0) / math.sqrt(draws) if draws > 1 else torch.full_like(mean, float("nan"))
    err = (mean - exact.detach()).abs()
    return {"logdet_exact": float(exact.mean()), "det_nonpositive": 0, "logdet_abs_error": float(err.max()),
            "logdet_error_se": float((err / se).max()), "logdet_nonfinite_draws": float((~ok).float().mean())}


@torch.no_grad()
def block_inversion(block: ContractiveBlock, x: torch.Tensor) -> dict:
    """Map ``x`` through the block and solve back (Banach, the block's tolerance and cap); the error is
    relative, ``max |x_rec - x| / max(1, max |x|)`` per sample, like the solver's stopping rule."""
    y = x + block.g(x)
    if not bool(torch.isfinite(y).all()):
        return {"block_inversion_error": float("inf"), "block_converged_fraction": 0.0,
                "block_iterations": float("nan")}
    x_rec, info = block.inverse(y, on_fail="ignore", return_info=True)
    size = x.flatten(1).abs().amax(1).clamp_min(1.0)  # the solver's tolerance is relative to this scale
    return {"block_inversion_error": float(((x_rec - x).flatten(1).abs().amax(1) / size).max()),
            "block_converged_fraction": float(info.converged.float().mean()), "block_iterations": info.iterations}


def batch_of_test_images(test: ImageDataset, n: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    images, _ = test[slice(0, min(n, len(test)))]
    return uniform_dequantize(to_float(images))
