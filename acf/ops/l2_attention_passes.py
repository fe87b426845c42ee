"""The fused backends of the ``l2_attention`` op as differentiable PyTorch ops: three passes each.

A fused backend provides three ops with one signature pattern (``extra``: backend arguments)::

    fwd(q, v, scale, *extra) -> (O, lse)                          lse: log-sum-exp per row
    bwd(q, v, O, lse, G, scale, *extra) -> (dq, dv)               the VJP for G = dL/dO
    bwd2(q, v, O, lse, G, U, W, scale, *extra) -> (gq, gv, gG)    the VJP of bwd for the
                                                                  cotangents (U, W) of (dq, dv)

The autograd of fwd calls bwd, the autograd of bwd calls bwd2 (whose outputs already carry the
dependence of O and lse on q and v): the first and second derivatives are exact, a third raises.
``acf._C`` defines acf::l2_attention_fwd/bwd/bwd2 (CPU, on (B*H, N, d) heads of any strides); the
Triton kernels define acf::l2_attention_triton_fwd/bwd/bwd2 (``torch.library.triton_op``, on
(B, H, N, d), extra argument: the fp32 precision). ``acf.ops.l2_attention`` registers their fake
kernels (shapes only, for torch.compile) and, with ``register_autograd`` and ``register_vmap`` here,
their autograd and vmap rules (for torch.func), and calls them through ``fused_l2_attention``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _passes(prefix: str) -> tuple:
    """The three ops ``acf::<prefix>_fwd``, ``_bwd`` and ``_bwd2``."""
    return tuple(getattr(torch.ops.acf, f"{prefix}_{name}") for name in ("fwd", "bwd", "bwd2"))


def _vjp_of_fwd(prefix: str, args: tuple, q: Tensor, v: Tensor, o: Tensor, lse: Tensor, g: Tensor):
    """``(dq, dv)``: the VJP of ``fwd`` for ``G``, itself differentiable (``_BackwardPass``)."""
    return _BackwardPass.apply(q, v, o.detach(), lse.detach(), g.to(v.dtype), prefix, args)


def _vjp_of_bwd(prefix: str, args: tuple, q: Tensor, v: Tensor, o: Tensor, lse: Tensor, g: Tensor,
                u: Optional[Tensor], w: Optional[Tensor]):
    """``(gq, gv, gG)``: the VJP of ``bwd`` for the cotangents ``(U, W)`` of ``(dq, dv)`` (``_DoubleBackwardPass``)."""
    u = torch.zeros_like(q) if u is None else u.to(q.dtype)
    w = torch.zeros_like(v) if w is None else w.to(v.dtype)
    return _DoubleBackwardPass.apply(q, v, o, lse, g, u, w, prefix, args)


_THIRD_ORDER = ("l2_attention: the fused backends differentiate twice, not three times (the double backward "
                "cannot be differentiated again); use backend='reference' for higher orders")


class _ForwardPass(torch.autograd.Function):
    """``fwd`` with the VJP ``_vjp_of_fwd``; ``setup_context`` and a generated vmap rule (the ops have
    vmap rules) make it work under torch.func (``grad``, ``vjp``, ``jacrev``, ``vmap``) and compile."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, v, prefix, args):
        return _passes(prefix)[0](q, v, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, v, ctx.prefix, ctx.args = inputs
        ctx.save_for_backward(q, v, *output)
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g, _g_lse):
        return (*_vjp_of_fwd(ctx.prefix, ctx.args, *ctx.saved_tensors, g), None, None)


class _BackwardPass(torch.autograd.Function):
    """``bwd``, differentiable once more through ``bwd2`` (whose outputs carry the dependence of O and
    lse on q and v, so O and lse get no gradient here)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, v, o, lse, g, prefix, args):
        return _passes(prefix)[1](q, v, o, lse, g, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, v, o, lse, g, ctx.prefix, ctx.args = inputs
        ctx.save_for_backward(q, v, o, lse, g)

    @staticmethod
    def backward(ctx, u, w):
        gq, gv, gg = _vjp_of_bwd(ctx.prefix, ctx.args, *ctx.saved_tensors, u, w)
        return gq, gv, None, None, gg, None, None


class _DoubleBackwardPass(torch.autograd.Function):
    """``bwd2``; differentiating it raises (third order)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, v, o, lse, g, u, w, prefix, args):
        return _passes(prefix)[2](q, v, o, lse, g, u, w, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(_THIRD_ORDER)


def fused_l2_attention(q: Tensor, v: Tensor, prefix: str, *args) -> Tensor:
    """``O`` through the fused passes ``acf::<prefix>_*`` (extra arguments ``args``), differentiable twice."""
    return _ForwardPass.apply(q, v, prefix, args)[0]


def register_autograd(prefix: str) -> None:
    """The same autograd on the ops themselves (for code that calls ``torch.ops.acf.*`` directly):
    ``fwd`` through ``bwd``, ``bwd`` through ``bwd2``; differentiating ``bwd2`` raises."""
    def setup_fwd(ctx, inputs, output):
        q, v, *args = inputs
        ctx.save_for_backward(q, v, *output)
        ctx.args = tuple(args)

    def backward_fwd(ctx, g, _g_lse):
        return (*_vjp_of_fwd(prefix, ctx.args, *ctx.saved_tensors, g), *(None,) * len(ctx.args))

    def setup_bwd(ctx, inputs, output):
        q, v, o, lse, g, *args = inputs
        ctx.save_for_backward(q, v, o, lse, g)
        ctx.args = tuple(args)

    def backward_bwd(ctx, u, w):
        gq, gv, gg = _vjp_of_bwd(prefix, ctx.args, *ctx.saved_tensors, u, w)
        return (gq, gv, None, None, gg, *(None,) * len(ctx.args))

    def backward_bwd2(ctx, *grads):
        raise RuntimeError(_THIRD_ORDER)

    torch.library.register_autograd(f"acf::{prefix}_fwd", backward_fwd, setup_context=setup_fwd)
    torch.library.register_autograd(f"acf::{prefix}_bwd", backward_bwd, setup_context=setup_bwd)
    torch.library.register_autograd(f"acf::{prefix}_bwd2", backward_bwd2)


def register_vmap(prefix: str) -> None:
    """vmap of each pass: the mapped dimension joins the leading (batch) dimension of every tensor."""
    def rule_for(op):
        def rule(info, in_dims, *args):
            size = info.batch_size
            flat = []
            for arg, dim in zip(args, in_dims):
                if isinstance(arg, torch.Tensor):
                    arg = arg.movedim(dim, 0) if dim is not None else arg.expand(size, *arg.shape)
                    arg = arg.reshape(size * arg.shape[1], *arg.shape[2:])
                flat.append(arg)
            outs = op(*flat)
            return tuple(o.reshape(size, -1, *o.shape[1:]) for o in outs), (0,) * len(outs)
        return rule

    for name in ("fwd", "bwd", "bwd2"):
        torch.library.register_vmap(f"acf::{prefix}_{name}", rule_for(getattr(torch.ops.acf, f"{prefix}_{name}")))
