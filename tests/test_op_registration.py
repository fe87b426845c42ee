"""Every compiled op is a real PyTorch op: ``torch.library.opcheck`` (schema, fake kernel, autograd
registration, AOT dispatch with dynamic shapes), ``torch.compile(fullgraph=True)`` of the fused
attention forward and backward against the reference, ``torch.func`` (``jacrev``, ``vmap``) against
the reference, and the graph breaks of compiled layers and of a compiled training step, counted.
"""
from __future__ import annotations

import collections
import os

import pytest
import torch
from torch.library import opcheck

import acf
from acf import _ext
from acf.layers.attention import L2MultiheadAttention, L2TightAttention, LipNormAttention
from acf.ops.l2_attention import cpu_kernels_available, l2_attention, l2_attention_reference

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is first imported

needs_cpu_kernels = pytest.mark.skipif(not cpu_kernels_available(), reason="acf._C's attention kernels not built")
# (B*H, N, d, e): odd N, e != d, one head of one token
HEADS = [(1, 1, 3, 3), (4, 11, 4, 5), (6, 37, 8, 8), (2, 64, 16, 3)]


def _heads(bh, n, d, e, requires_grad=False):
    q = torch.randn(bh, n, d, dtype=torch.float64, requires_grad=requires_grad)
    v = torch.randn(bh, n, e, dtype=torch.float64, requires_grad=requires_grad)
    return q, v


def _opcheck(op, args):
    result = opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


@needs_cpu_kernels
@pytest.mark.parametrize("shape", HEADS, ids=lambda s: "x".join(map(str, s)))
def test_opcheck_l2_attention_cpu_ops(shape):
    q, v = _heads(*shape, requires_grad=True)
    _opcheck(torch.ops.acf.l2_attention_fwd.default, (q, v, 0.3))
    o, lse = torch.ops.acf.l2_attention_fwd(q.detach(), v.detach(), 0.3)
    g = torch.randn_like(o, requires_grad=True)
    _opcheck(torch.ops.acf.l2_attention_bwd.default, (q, v, o, lse, g, 0.3))
    u, w = torch.randn_like(q), torch.randn_like(v)
    _opcheck(torch.ops.acf.l2_attention_bwd2.default, (q.detach(), v.detach(), o, lse, g.detach(), u, w, 0.3))
    # column-major heads (what the attention layers pass)
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2)
    _opcheck(torch.ops.acf.l2_attention_fwd.default, (qt, v.detach(), 0.3))


@pytest.mark.needs_ext
@pytest.mark.parametrize("sizes", [((5, 4), (3, 2, 3, 3), (6, 6)), ((7, 7), (4, 4, 5, 5), (9, 5)), ((1, 9), (2, 3, 1, 1), (1, 1))])
def test_opcheck_power_iteration(sizes):
    dense, kernel, hw = sizes
    ws = [torch.randn(*dense), torch.randn(*kernel)]
    us = [torch.randn(dense[0]), torch.randn(1, kernel[0], *hw)]
    vs = [torch.randn(dense[1]), torch.randn(1, kernel[1], *hw)]
    for n_iter, tol in ((3, 0.0), (0, 1e-4)):
        _opcheck(torch.ops.acf.power_iteration.default, (ws, us, vs, n_iter, tol, 50, 1, 0))


@pytest.mark.needs_ext
@pytest.mark.parametrize("b,d", [(1, 1), (4, 7), (9, 33)])
def test_opcheck_fixed_point_steps(b, d):
    x, gx, y = torch.randn(b, d), 0.1 * torch.randn(b, d), torch.randn(b, d)
    state = (torch.full((b,), 1e-6), torch.zeros(b, dtype=torch.bool), torch.zeros(b), torch.zeros(1, dtype=torch.int32))
    _opcheck(torch.ops.acf.banach_step.default, (x, gx, y, *state, True))
    m = 3
    xh, fh = torch.zeros(b, m, d), torch.zeros(b, m, d)
    gram = torch.zeros(b, m, m, dtype=torch.float64)
    _opcheck(torch.ops.acf.anderson_step.default, (x, gx, y, *state, xh, fh, gram, 0, 1, 1e-10, 1.0, True))


@pytest.mark.gpu
def test_opcheck_l2_attention_triton_ops():
    """On a GPU only: opcheck runs the ops under dispatch modes, where ``wrap_triton`` launches through
    a higher-order op that Triton's CPU interpreter cannot run (eager calls run there: see
    tests/test_l2_attention.py)."""
    pytest.importorskip("triton")
    from acf.ops.l2_attention import _triton_kernels

    _triton_kernels()  # defines the ops
    dev = "cuda"
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64, device=dev, requires_grad=True)
    v = torch.randn(1, 2, 9, 5, dtype=torch.float64, device=dev, requires_grad=True)
    _opcheck(torch.ops.acf.l2_attention_triton_fwd.default, (q, v, 0.3, "ieee"))
    o, lse = torch.ops.acf.l2_attention_triton_fwd(q.detach(), v.detach(), 0.3, "ieee")
    g = torch.randn_like(o, requires_grad=True)
    _opcheck(torch.ops.acf.l2_attention_triton_bwd.default, (q, v, o, lse, g, 0.3, "ieee"))
    _opcheck(torch.ops.acf.l2_attention_triton_bwd2.default,
             (q.detach(), v.detach(), o, lse, g.detach(), torch.randn_like(q), torch.randn_like(v), 0.3, "ieee"))


@needs_cpu_kernels
@pytest.mark.parametrize("n,d,e", [(7, 4, 4), (33, 8, 5)])
def test_compile_fullgraph_forward_and_backward_equal_the_reference(n, d, e):
    q = torch.randn(2, 3, n, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, n, e, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(lambda q, v: l2_attention(q, v, 0.4, backend="extension"), fullgraph=True)
    o = compiled(q, v)
    ref = l2_attention_reference(q, v, 0.4)
    torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-12)
    g = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, v), g)
    want = torch.autograd.grad(ref, (q, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_cpu_kernels
def test_torch_func_jacrev_vmap_and_second_order_equal_the_reference():
    from torch.func import grad, jacrev, vmap

    q = torch.randn(1, 2, 9, 3, dtype=torch.float64)
    v = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    fused = lambda q, v: l2_attention(q, v, 0.5, backend="extension")  # noqa: E731
    ref = lambda q, v: l2_attention_reference(q, v, 0.5)  # noqa: E731
    for argnums in (0, 1):
        torch.testing.assert_close(jacrev(fused, argnums=argnums)(q, v), jacrev(ref, argnums=argnums)(q, v),
                                   rtol=1e-9, atol=1e-12)
    qs = torch.randn(5, 1, 2, 9, 3, dtype=torch.float64)
    torch.testing.assert_close(vmap(fused, in_dims=(0, None))(qs, v), vmap(ref, in_dims=(0, None))(qs, v),
                               rtol=1e-10, atol=1e-12)
    # the second order the Neumann log-det gradient needs, through torch.func
    f2 = lambda fn: grad(lambda q: grad(lambda q: fn(q, v).pow(2).sum())(q).pow(2).sum())  # noqa: E731
    torch.testing.assert_close(f2(fused)(q), f2(ref)(q), rtol=1e-8, atol=1e-10)


def _breaks(fn, *args) -> tuple[int, collections.Counter]:
    e = torch._dynamo.explain(fn)(*args)
    reasons = collections.Counter(str(b.reason).splitlines()[0][:90] for b in e.break_reasons)
    return e.graph_break_count, reasons


@pytest.mark.parametrize("cls", [L2MultiheadAttention, L2TightAttention, LipNormAttention])
def test_attention_layers_compile_without_graph_breaks(cls):
    layer = cls(8, 2)
    with torch.no_grad():
        layer.gamma.fill_(0.7)
    x = torch.randn(2, 8, 5, 5)
    torch._dynamo.reset()
    count, reasons = _breaks(layer, x)
    assert count == 0, reasons
    torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x), rtol=1e-5, atol=1e-6)


def test_compiled_model_evaluates_and_a_compiled_training_step_runs(capsys):
    """Inference compiles with Inductor and matches eager. Training differentiates twice through g
    (the log-det's gradient), which AOTAutograd does not support yet, so a training step compiles with
    Dynamo's graph capture alone (backend "eager"); the graph breaks are counted and printed: the
    log-det estimator calls autograd inside the forward and draws its random truncation on the host."""
    torch.manual_seed(0)
    model = acf.build_model("resflow", "l2-tight", input_shape=(1, 4, 4), n_scales=1, blocks_per_scale=2, hidden=8,
                            heads=2, gamma_init=0.5, estimator=acf.LogdetEstimator(method="roulette"))
    x = torch.rand(4, 1, 4, 4)
    with torch.no_grad():
        model(x)  # ActNorm's data-dependent initialisation
    model.eval()
    for block in model.modules():  # a deterministic log-det (the roulette's draws differ under Inductor)
        if isinstance(block, acf.ContractiveBlock):
            block.estimator = acf.LogdetEstimator(method="exact")
    with torch.no_grad():
        want = model.log_prob(x)
        got = torch.compile(model.log_prob)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for block in model.modules():
        if isinstance(block, acf.ContractiveBlock):
            block.estimator = acf.LogdetEstimator(method="roulette")

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    step = torch.compile(model, backend="eager")
    for _ in range(2):
        z, logdet = step(x)
        loss = -(acf.standard_normal_logprob(z) + logdet).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    count, reasons = _breaks(model, x)
    with capsys.disabled():
        print(f"\ncompiled training step (ResFlow + L2-tight, 2 blocks): {count} graph breaks: {dict(reasons)}")
    assert count <= 20
