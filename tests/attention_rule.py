"""The tolerance rule for fused L2 attention kernels (Triton, CPU) and SDPA, used by tests/test_l2_attention.py.

For every compared quantity x (output, VJP, double VJP), ``max|x_kernel - x_64| <= 2 max|x_ref -
x_64| + floor`` where x_64 is the reference on float64 inputs and x_ref the same-precision PyTorch
reference. ``floor = 4 eps(dtype) max|x_64|``: a few roundings of the largest entry. It only
matters where the reference happens to be exact (N = 1: P = 1, the output is v and dq = 0 in
exact arithmetic; a kernel that stores O rounded and recomputes delta = G.O from it may miss exact
zero by an ulp-sized amount).
"""
from __future__ import annotations

import torch

from acf.ops.l2_attention import l2_attention_reference


def plain_reference(q: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The same-precision PyTorch computation: every op in the inputs' dtype (matmuls may use TF32
    if PyTorch is told to). For fp32/fp64 it is ``l2_attention_reference``; for bf16/fp16 the
    reference upcasts internally, which would be an unfair yardstick for a half-precision kernel."""
    if q.dtype in (torch.float32, torch.float64):
        return l2_attention_reference(q, v, scale)
    sq = (q * q).sum(-1)
    p = torch.softmax(scale * (2.0 * q @ q.transpose(-1, -2) - sq.unsqueeze(-2)), dim=-1)
    return p @ v


def first_and_second(fn, q, v, g, u, w, scale):
    """Output, VJP (dq, dv) and double VJP (d/d(q, v, G) of <u, dq> + <w, dv>)."""
    q = q.detach().clone().requires_grad_()
    v = v.detach().clone().requires_grad_()
    g = g.detach().clone().requires_grad_()
    o = fn(q, v, scale)
    dq, dv = torch.autograd.grad(o, (q, v), g, create_graph=True)
    phi = (dq * u).sum() + (dv * w).sum()
    hq, hv, hg = torch.autograd.grad(phi, (q, v, g))
    return {"out": o, "dq": dq, "dv": dv, "ddq": hq, "ddv": hv, "ddg": hg}


def check_rule(name: str, x: torch.Tensor, ref: torch.Tensor, x64: torch.Tensor, factor: float = 2.0,
               scale: float | None = None):
    x64 = x64.double()
    err = (x.double() - x64).abs().max().item()
    err_ref = (ref.double() - x64).abs().max().item()
    eps = torch.finfo(x.dtype).eps
    floor = 4 * eps * (x64.abs().max().item() if scale is None else scale)
    bound = factor * err_ref + floor
    assert err <= bound, f"{name}: kernel error {err:.3e} > {factor} x reference error {err_ref:.3e} + floor {floor:.1e}"


def rand_inputs(B, H, N, D, E, dtype, device="cpu", spread=1.0):
    gen = torch.Generator().manual_seed(1000 * N + 10 * D + E)
    mk = lambda *s: (spread * torch.randn(*s, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
    return mk(B, H, N, D), mk(B, H, N, E), mk(B, H, N, E), mk(B, H, N, D), mk(B, H, N, E)


def compare_all(B, H, N, D, E, dtype, fn, factor=2.0, spread=1.0, device="cpu"):
    q, v, g, u, w = rand_inputs(B, H, N, D, E, dtype, device, spread=spread)
    scale = D ** -0.5
    ker = first_and_second(fn, q, v, g, u, w, scale)
    ref = first_and_second(plain_reference, q, v, g, u, w, scale)
    ex = first_and_second(l2_attention_reference, *(t.double() for t in (q, v, g, u, w)), scale)
    size = max(t.abs().max().item() for t in ex.values())
    failed = []  # every quantity is checked, and a failure reports them all (kernel vs reference error)
    for key in ker:
        try:
            check_rule(f"{key} (B,H,N,d,e)={(B, H, N, D, E)} {dtype}", ker[key], ref[key], ex[key], factor, size)
        except AssertionError as e:
            failed.append(str(e))
    if failed:
        errors = {k: ((ker[k].double() - ex[k]).abs().max().item(), (ref[k].double() - ex[k]).abs().max().item())
                  for k in ker}
        raise AssertionError("; ".join(failed) + "\nevery quantity (kernel error, reference error): " +
                             ", ".join(f"{k} {a:.2e} / {b:.2e}" for k, (a, b) in errors.items()))
