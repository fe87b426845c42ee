"""The gated attention branch at the rank of its input (``AttentionBranch``, ``attend_lifted``): when the
block has fewer channels than a head has dimensions (full resolution: 1 channel at 784 tokens), L2
attention runs on ``c``-dimensional queries; the same function as the branch applied layer by layer, to
float64 rounding, with its first and second derivatives (the log-det gradient differentiates a VJP)."""
import pytest
import torch
from torch import nn

from acf.layers.attention import attention_ablated
from acf.layers.branches import AttentionBranch, attention_branch
from acf.layers.lifted import attends_lifted, gram_factor
from acf.layers.logdet import LogdetEstimator, logdet_estimate

# (block channels c, hidden D, heads H, image height, width): head dim D / H > c, odd token counts
LIFTED = [(1, 16, 1, 5, 5), (1, 12, 3, 3, 7), (2, 12, 2, 7, 3), (3, 32, 4, 4, 5), (5, 24, 2, 3, 3)]
BACKENDS = ["reference", pytest.param("extension", marks=pytest.mark.needs_ext)]


def _branch(c, hidden, heads, hw, backend="reference", kind="l2", move=True):
    """A float64 gated branch, every weight (biases too) moved off its initial value if ``move``."""
    g = attention_branch(c, hw, kind, hidden=hidden, heads=heads).double()
    g[1].backend = backend
    with torch.no_grad():
        for p in g.parameters():
            p.add_(0.3 * torch.randn_like(p) if move else 0.0)
    return g


def _layer_by_layer(g, x):
    return nn.Sequential.forward(g, x)


def _assert_layer_by_layer(g, x, ct):
    """``_derivatives`` of ``g`` equal those of ``g`` applied layer by layer (float64 rounding), all finite;
    returns them."""
    got = _derivatives(g, g, x, ct, second=True)
    want = _derivatives(lambda t: _layer_by_layer(g, t), g, x, ct, second=True)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    return got


def _derivatives(f, g, x, ct, second):
    """``f(x)``, its VJP for ``ct`` in ``x`` and every parameter, and (``second``) the derivative of
    ``<VJP_x, ct2>`` in the same: what the Neumann log-det gradient computes."""
    y = f(x)
    wrt = [x, *g.parameters()]
    first = torch.autograd.grad(y, wrt, ct, create_graph=second)
    if not second:
        return [y, *first]
    return [y, *first, *torch.autograd.grad((first[0] * torch.ones_like(x).cumsum(-1)).sum(), wrt,
                                            allow_unused=True, materialize_grads=True)]


@pytest.mark.parametrize("kind", ["l2", "l2-tight"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c,hidden,heads,h,w", LIFTED)
def test_lifted_branch_is_the_branch(c, hidden, heads, h, w, backend, kind):
    torch.manual_seed(c * 100 + hidden + h * w)
    g = _branch(c, hidden, heads, (h, w), backend, kind)
    assert isinstance(g, AttentionBranch) and attends_lifted(g[1], c)
    x = (2.0 * torch.randn(3, c, h, w, dtype=torch.float64)).requires_grad_()  # tokens in and out of L2-tight's ball
    ct = torch.randn(3, c, h, w, dtype=torch.float64)
    got = _assert_layer_by_layer(g, x, ct)
    assert got[0].abs().max() > 1e-3  # the attention moves the output


@pytest.mark.parametrize("kind,names", [("l2", ("1.w_q", "1.w_v", "1.w_o", "0.bias")),
                                        ("l2-tight", ("1.w_q", "1.w_m", "0.bias"))])
def test_lifted_branch_gradcheck(kind, names):
    """(Not 0.weight: the value of its normalisation is a held bound, its gradient that of an estimate.)"""
    torch.manual_seed(0)
    g = _branch(2, 12, 2, (3, 3), kind=kind)
    params = dict(g.named_parameters())

    def f(x, *weights):
        return torch.func.functional_call(g, dict(zip(names, weights)), (x,))

    inputs = (torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True),
              *(params[n].detach().clone().requires_grad_() for n in names))
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_lifted_path_runs_head_dim_c(monkeypatch):
    """The attention passes see c-dimensional heads on the lifted path, d-dimensional ones otherwise."""
    import acf.layers.attention as attention
    import acf.layers.lifted as lifted

    seen = []
    real = attention.l2_attention
    for module in (attention, lifted):
        monkeypatch.setattr(module, "l2_attention", lambda q, v, **kw: seen.append(q.shape[-1]) or real(q, v, **kw))
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    _branch(2, 16, 2, (3, 3))(x)   # d = 8 > c = 2: lifted
    _branch(8, 16, 2, (3, 3))(torch.randn(2, 8, 3, 3, dtype=torch.float64))  # d = 8 = c: layer by layer
    assert seen == [2, 8]


def test_lifted_path_steps_aside_for_knockout_positions_and_pull():
    torch.manual_seed(1)
    g = _branch(1, 8, 2, (3, 3))
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    with attention_ablated(g):
        assert not attends_lifted(g[1], 1)
        torch.testing.assert_close(g(x), _layer_by_layer(g, x))
    g[1].pull = (torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64))
    assert not attends_lifted(g[1], 1)
    g[1].pull = None
    assert attends_lifted(g[1], 1)
    positional = attention_branch(1, (3, 3), "l2", hidden=8, heads=2, attention_options={"tokens": 9})
    assert not attends_lifted(positional[1], 1)
    assert not attends_lifted(attention_branch(1, (3, 3), "lipnorm", hidden=8, heads=2)[1], 1)
    assert not attends_lifted(attention_branch(3, (3, 3), "l2-tight", hidden=8, heads=2)[1], 3)  # c + 1 = d
    multihead = attention_branch(1, (3, 3), "l2-tight", hidden=8, heads=2, attention_options={"layout": "multihead"})
    assert not attends_lifted(multihead[1], 1)


def test_gram_factor():
    """``||m u|| = ||T u||``; a last column in the span of the others (the bias at 0) has finite gradients."""
    torch.manual_seed(4)
    for m in (torch.randn(3, 7, 3, dtype=torch.float64), torch.cat([torch.randn(7, 2, dtype=torch.float64),
                                                                    torch.zeros(7, 1, dtype=torch.float64)], 1)):
        m.requires_grad_()
        u = torch.randn(5, m.shape[-1], 1, dtype=torch.float64)
        t = gram_factor(m)
        torch.testing.assert_close((t.unsqueeze(-3) @ u).norm(dim=-2), (m.unsqueeze(-3) @ u).norm(dim=-2))
        assert torch.equal(t.tril(-1), torch.zeros_like(t))
        (grad,) = torch.autograd.grad((t.unsqueeze(-3) @ u).square().sum(), m)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("c", [1, 3])
def test_lifted_l2_tight_at_initialisation(c):
    """At initialisation the lift's bias is 0: the lifted L2-tight branch, its VJP and the derivative of
    that VJP in every parameter (what the log-det gradient uses) are finite and equal the branch's."""
    torch.manual_seed(5)
    g = _branch(c, 16, 2, (3, 5), kind="l2-tight", move=False)
    assert torch.equal(g[0].bias, torch.zeros_like(g[0].bias))
    x = torch.randn(2, c, 3, 5, dtype=torch.float64, requires_grad=True)
    ct = torch.randn_like(x)
    _assert_layer_by_layer(g, x, ct)


@pytest.mark.parametrize("grad", ["neumann", "memory_efficient"])
def test_lifted_block_logdet_and_its_gradient(grad):
    """The roulette log-det and its Neumann gradient through a lifted branch equal those through the same
    branch layer by layer (same draws)."""
    torch.manual_seed(2)
    g = _branch(1, 16, 4, (5, 5))
    est = LogdetEstimator(grad=grad)
    x = torch.randn(4, 1, 5, 5, dtype=torch.float64, requires_grad=True)
    results = []
    for forward in (g.forward, lambda t: _layer_by_layer(g, t)):
        g.forward = forward
        torch.manual_seed(3)
        gx, logdet = logdet_estimate(g, x, est)
        results.append([gx, logdet, *torch.autograd.grad(gx.sum() + logdet.sum(), [x, *g.parameters()])])
        del g.forward
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["l2", "l2-tight"])
@pytest.mark.parametrize("c,zeroed", [(2, [1]), (1, [0])])
def test_rank_deficient_lift_runs_at_width(kind, c, zeroed):
    """A lift with a zeroed input channel (QR's derivative would divide by 0) runs layer by layer:
    finite gradients, equal to the branch's."""
    torch.manual_seed(6)
    g = _branch(c, 16, 2, (3, 3), kind=kind)
    with torch.no_grad():
        g[0].weight[:, zeroed] = 0.0
    x = torch.randn(2, c, 3, 3, dtype=torch.float64, requires_grad=True)
    ct = torch.randn_like(x)
    _assert_layer_by_layer(g, x, ct)
