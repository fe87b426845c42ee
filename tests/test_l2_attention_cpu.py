"""``acf._C``'s CPU L2 attention kernels (backend "extension") against the float64 reference.

Same tolerance rule as the Triton kernels (``tests/attention_rule.py``): output, VJP and double VJP
within 2x the error of the same-precision PyTorch reference. Skipped when the extension is not
built (the library then falls back to the reference, see ``test_fallback_without_extension``).
"""
from __future__ import annotations

import copy

import pytest
import torch

from acf.ops import l2_attention as F
from acf.ops.l2_attention import l2_attention, l2_attention_reference
from attention_rule import compare_all, first_and_second, rand_inputs

needs_ext = pytest.mark.skipif(not F.cpu_kernels_available(), reason="acf._C (CPU kernels) not built")


def cpu_fn(q, v, scale):
    return l2_attention(q, v, scale, backend="extension")


def assert_equals_reference(q, v, g, u, w, scale):
    """float64: output, VJP and double VJP equal the reference's to rounding."""
    got = first_and_second(cpu_fn, q, v, g, u, w, scale)
    want = first_and_second(l2_attention_reference, q, v, g, u, w, scale)
    for key in got:
        torch.testing.assert_close(got[key], want[key], atol=1e-12, rtol=1e-10, msg=key)


SHAPES = [  # (B, H, N, d, e): odd and non-power-of-two N, several head dims, e != d
    (1, 1, 1, 4, 4),
    (2, 2, 17, 4, 4),
    (1, 3, 100, 32, 20),
    (2, 1, 255, 16, 16),
    (1, 2, 64, 64, 8),
    (3, 4, 49, 8, 8),
    (1, 1, 37, 128, 128),
    (2, 2, 196, 1, 3),
]


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_fp64_reference(shape):
    compare_all(*shape, torch.float32, cpu_fn)


@needs_ext
def test_saturated_softmax():
    """Large |q|: rows of P are nearly one-hot, where dS_kk is pure cancellation (difference form)."""
    compare_all(1, 2, 70, 16, 16, torch.float32, cpu_fn, spread=3.0)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 1, 1, 2, 2), (2, 3, 9, 3, 2), (1, 2, 33, 5, 7)], ids=str)
def test_fp64_equals_reference(shape):
    assert_equals_reference(*rand_inputs(*shape, torch.float64), 0.7)


@needs_ext
def test_gradcheck_and_gradgradcheck():
    q = torch.randn(2, 2, 11, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 11, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cpu_fn(a, b, 0.6), (q, v))
    assert torch.autograd.gradgradcheck(lambda a, b: cpu_fn(a, b, 0.6), (q, v))


@needs_ext
def test_non_contiguous_inputs_and_third_order_refused():
    q = torch.randn(2, 9, 3, 4, dtype=torch.float64).transpose(1, 2).requires_grad_()  # (B, H, N, d) view
    v = torch.randn(2, 3, 9, 4, dtype=torch.float64).requires_grad_()
    torch.testing.assert_close(cpu_fn(q, v, 0.5), l2_attention_reference(q, v, 0.5))
    dq, _ = torch.autograd.grad(cpu_fn(q, v, 0.5).sum(), (q, v), create_graph=True)
    (ddq,) = torch.autograd.grad(dq.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        torch.autograd.grad(ddq.sum(), q)


@needs_ext
def test_auto_uses_cpu_kernels_in_training():
    """A ResFlow block with L2 attention trains with the Neumann estimator on the CPU kernels
    (auto), and its parameter gradients equal the reference backend's for the same draw."""
    from acf.layers.attention import set_attention_backend
    from acf.layers.block import ContractiveBlock
    from acf.layers.branches import resflow_branch
    from acf.layers.logdet import LogdetEstimator

    torch.manual_seed(0)
    g = resflow_branch(4, (5, 5), hidden=8, attention="l2", heads=2).double()
    for m in g.modules():
        if hasattr(m, "gamma"):
            torch.nn.init.constant_(m.gamma, 0.7)
    start = ContractiveBlock(g, LogdetEstimator(method="roulette", n_exact=2, grad="neumann")).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    grads = {}
    for backend in ("auto", "reference"):
        block = set_attention_backend(copy.deepcopy(start), backend)  # same power-iteration state
        torch.manual_seed(1)
        y, logdet = block(x)
        (y.square().sum() - logdet.sum()).backward()
        grads[backend] = [p.grad.clone() for p in block.parameters() if p.grad is not None]
    heads = torch.empty(3, 2, 25, 4, dtype=torch.float64)  # the layer's (B, H, N, d)
    assert F._auto_backend(heads, heads) == "extension"
    for a, b in zip(grads["auto"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@needs_ext
def test_bad_input():
    q = torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match="'extension' needs CPU float32/float64"):
        l2_attention(q.half(), q.half(), backend="extension")
    x = q.reshape(1, 5, 4)
    with pytest.raises(RuntimeError, match=r"must be \(batch\*heads, N, dim\)"):
        torch.ops.acf.l2_attention_fwd(x, x[:, :4], 0.5)
    with pytest.raises(RuntimeError, match="has dtype"):
        torch.ops.acf.l2_attention_fwd(x, x.double(), 0.5)
    o, lse = torch.ops.acf.l2_attention_fwd(x, x, 0.5)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.acf.l2_attention_bwd(x, x, o, lse[:, :4], x, 0.5)
    with pytest.raises(RuntimeError, match="g must match v"):
        torch.ops.acf.l2_attention_bwd(x, x, o, lse, x[..., :3], 0.5)
    with pytest.raises(RuntimeError, match="u must match q"):
        torch.ops.acf.l2_attention_bwd2(x, x, o, lse, x, x[..., :3], x, 0.5)


@needs_ext
def test_nan_propagates():
    """A NaN query poisons its softmax column, hence every row: NaN out, as in the reference."""
    q, v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    q[0, 1, 3, 2] = float("nan")
    out, ref = cpu_fn(q, v, 0.5), l2_attention_reference(q, v, 0.5)
    assert torch.equal(out.isnan(), ref.isnan()) and out[0, 1].isnan().all() and not out[0, 0].isnan().any()


@needs_ext
def test_forward_saves_no_n_by_n_matrix():
    """The forward keeps (q, v, O, lse): O(B H N (d + e)) memory; the backward recomputes P."""
    b, h, n, d = 2, 3, 200, 8
    q, v = torch.randn(b, h, n, d, requires_grad=True), torch.randn(b, h, n, d, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        cpu_fn(q, v, 0.3)
    assert sum(saved) == b * h * n * (3 * d + 1)


LAYOUTS = {  # (B, H, N, d) views of the same values with different strides
    "row-major": lambda t: t.contiguous(),
    "column-major": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),  # what the layer passes
    "heads-inner": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
    "strided": lambda t: torch.stack([t, t], dim=-2).flatten(-3, -2)[..., ::2, :],
}


@needs_ext
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_any_strides(layout):
    """The kernels read and write heads of any strides (outputs take the layout of their input)."""
    q, v, g, u, w = (LAYOUTS[layout](t) for t in rand_inputs(2, 3, 13, 5, 6, torch.float64))
    assert_equals_reference(q, v, g, u, w, 0.4)
    if layout == "column-major":  # the layer's layout is read and written in place, without copies
        assert cpu_fn(q, v, 0.4).stride() == v.stride()


@needs_ext
def test_auto_rule_by_head_dim_and_n():
    """auto takes the fused kernels where they were measured faster than the reference."""
    rule = {(196, 8): "extension", (196, 16): "extension", (196, 32): "extension", (1024, 32): "extension", (196, 64): "reference",
            (1024, 64): "reference", (49, 128): "reference"}
    for (n, d), want in rule.items():
        q = torch.empty(1, 1, n, d)
        assert F._auto_backend(q, q) == want, (n, d)
    assert F._auto_backend(torch.empty(1, 1, 196, 8), torch.empty(1, 1, 196, 64)) == "reference"  # e counts


def test_fallback_without_extension(monkeypatch):
    """Without the extension, auto picks the reference and backend="extension" says why it cannot run."""
    monkeypatch.setattr(F, "cpu_kernels_available", lambda: False)
    monkeypatch.setattr(F._ext, "available", lambda: False)
    q = torch.randn(1, 2, 7, 4)
    assert F._auto_backend(q, q) == "reference"
    torch.testing.assert_close(l2_attention(q, q), l2_attention_reference(q, q, 0.5))
    with pytest.raises(ValueError, match="extension loaded: False"):
        l2_attention(q, q, backend="extension")
