"""Attention layers: layout, certified bounds vs empirical Jacobians, LipNorm per forward, dot-product failure."""
import math

import pytest
import torch

from acf.layers.attention import DotProductAttention, L2MultiheadAttention, LipNormAttention, make_attention
from acf.layers.attention_bounds import l2_attention_constant
from helpers import ascent_ratio, jacobian, random_pair_ratio


def attention_fn(layer):
    """``F(X) / L`` as a map on NCHW images (the normalised attention before eq. 13's sum)."""
    def fn(x):
        return layer.attend(x.flatten(2)).reshape(x.shape)
    return fn


def test_constant_matches_known_values():
    # The N-dependent factor of the L2 bound is about 15, 41 and 106 at N = 64, 256, 1024 with d = 32.
    assert [round(l2_attention_constant(n, 32)) for n in (64, 256, 1024)] == [14, 41, 106]
    assert l2_attention_constant(1, 4) == pytest.approx(0.5)  # N = 1: W0(0) = 0


def test_l2_matches_per_position_float64_reference():
    """Independent computation from the paper's definitions (eq. 9-11), position by position."""
    layer = L2MultiheadAttention(6, heads=3).double()
    with torch.no_grad():
        layer.gamma.fill_(0.7)
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    out = layer(x)
    d, n = 2, 15
    for b in range(2):
        X = x[b].reshape(6, n).t()  # (N, D): row i = channels at position i
        heads = []
        for h in range(3):
            wq, wv = layer.w_q[:, h * d:(h + 1) * d], layer.w_v[:, h * d:(h + 1) * d]
            q = X @ wq
            logits = torch.stack([-((q[i] - q) ** 2).sum(1) / math.sqrt(d) for i in range(n)])
            a = wq @ wq.t() / math.sqrt(d)
            heads.append(torch.softmax(logits, dim=1) @ X @ a @ wv)
        f = torch.cat(heads, dim=1) @ layer.w_o / layer.bound(n)
        ref = (X + 0.7 * f) / 1.7
        torch.testing.assert_close(out[b].reshape(6, n).t(), ref)


@pytest.mark.parametrize("cls", [L2MultiheadAttention, LipNormAttention])
@pytest.mark.parametrize("channels,heads,hw", [(4, 1, (3, 3)), (8, 2, (2, 5)), (6, 3, (1, 7))])
def test_certified_bound_holds(cls, channels, heads, hw):
    """Empirical Lipschitz ratios of F / L (random pairs, gradient ascent, Jacobian norms at several
    input scales) never exceed 1; the layer output never exceeds its bound (1)."""
    torch.manual_seed(channels * 10 + heads)
    layer = cls(channels, heads).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(3.0)  # weights with norms > 1: the ||W^Q||^2 term matters
        layer.gamma.fill_(2.0)
    fn = attention_fn(layer)
    shape = (channels, *hw)
    for scale in (0.1, 1.0, 10.0):
        assert random_pair_ratio(fn, shape, scale=scale) <= 1.0
        assert ascent_ratio(fn, shape, scale=scale, steps=15) <= 1.0
        x = torch.randn(1, *shape, dtype=torch.float64) * scale
        assert float(torch.linalg.matrix_norm(jacobian(fn, x), ord=2)) <= 1.0
        assert float(torch.linalg.matrix_norm(jacobian(layer, x), ord=2)) <= layer.lipschitz_bound() + 1e-12


def test_l2_bound_needs_squared_query_norm():
    """Eq. 12 as printed (one power of ||W^Q||) is violated once ||W^Q|| > 1; our bound is not."""
    torch.manual_seed(1)
    layer = L2MultiheadAttention(4, heads=1).double()
    with torch.no_grad():
        layer.w_q.copy_(torch.eye(4, dtype=torch.float64) * 4.0)
        layer.w_v.copy_(torch.eye(4, dtype=torch.float64))
        layer.w_o.copy_(torch.eye(4, dtype=torch.float64))
    x = torch.zeros(1, 4, 1, 1, dtype=torch.float64)  # N = 1: F(X) = X A W^V exactly
    raw = jacobian(lambda z: attention_fn(layer)(z) * layer.bound(1), x)
    lip = float(torch.linalg.matrix_norm(raw, ord=2))
    printed = l2_attention_constant(1, 4) * 4.0 * 1.0 * 1.0
    assert lip > printed * 3.9  # eq. 12 as printed fails by the factor ||W^Q|| = 4
    assert lip <= float(layer.bound(1).detach()) * (1 + 1e-12)


def test_lipnorm_normaliser_is_recomputed_every_forward():
    """The normaliser depends on the input: scaling X changes the attention pattern only through it,
    and a second forward after a weight update uses the new weights (no stale constant)."""
    layer = LipNormAttention(4, heads=2).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    fn = attention_fn(layer)
    y1 = fn(x)
    # Q K^T / max(uv, uw, vw) is invariant to scaling X, so F(cX) = c F(X) exactly.
    torch.testing.assert_close(fn(3.0 * x), 3.0 * y1)
    with torch.no_grad():
        layer.w_qkv[:, :4].mul_(3.0)  # queries only: scores and normaliser change
    assert not torch.allclose(fn(x), y1)
    loss = fn(x).square().sum()
    loss.backward()  # two forwards and a backward with fresh normalisers: no crash (the published code's bug)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


def test_dot_product_attention_is_not_lipschitz():
    """The ablation: the Jacobian norm of plain dot-product attention grows with the input scale and
    exceeds 1, so no certificate exists (the reason the paper needs L2 or LipNorm attention)."""
    torch.manual_seed(0)
    layer = DotProductAttention(4, heads=1).double()
    with torch.no_grad():
        layer.gamma.fill_(1.0)
    norms = []
    for scale in (0.5, 2.0, 8.0):
        ratios = [ascent_ratio(layer, (4, 2, 2), scale=scale, steps=15) for _ in range(2)]
        norms.append(max(ratios))
    assert norms[-1] > 1.0
    assert norms[-1] > 2 * norms[0]
    assert math.isinf(layer.lipschitz_bound())


def test_gamma_zero_is_identity_and_gradient_reaches_gamma():
    layer = L2MultiheadAttention(4, heads=2)
    x = torch.randn(2, 4, 3, 3)
    out = layer(x)
    torch.testing.assert_close(out, x)
    out.square().sum().backward()
    assert layer.gamma.grad is not None and float(layer.gamma.grad.abs()) > 0


def test_bad_input_named():
    with pytest.raises(ValueError, match="heads=3 must divide channels=8"):
        L2MultiheadAttention(8, heads=3)
    with pytest.raises(ValueError, match="unknown attention 'softmax'"):
        make_attention("softmax", 8)
    layer = LipNormAttention(8, heads=2)
    with pytest.raises(ValueError, match="has 4 channels"):
        layer(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="4 dimensions"):
        layer(torch.randn(8, 9))
    for kind in ("l2", "l2-tight", "lipnorm", "dot"):
        with pytest.raises(ValueError, match="channels must be >= 1, got 0"):
            make_attention(kind, 0, heads=1)
    with pytest.raises(ValueError, match=r"gamma_init must be in \[-1000000.0, 1000000.0\], got 1e\+308"):
        make_attention("l2", 4, heads=1, gamma_init=1e308)  # it overflowed float32 (a RuntimeError) before
    with pytest.raises(ValueError, match="gamma_init must be finite"):
        make_attention("l2", 4, heads=1, gamma_init=float("nan"))


# Weights whose zero makes F identically 0 (a zero Q of "l2-tight" does not: its logits are then all 0,
# and F is the mean of the values).
ZEROABLE = [("l2", "w_q"), ("l2", "w_v"), ("l2", "w_o"), ("l2-tight", "w_m"), ("l2-tight-multihead", "w_v"),
            ("l2-tight-multihead", "w_o"), ("lipnorm", "w_qkv"), ("lipnorm", "w_o")]


@pytest.mark.parametrize("kind,weight", ZEROABLE)
def test_a_zero_weight_gives_the_identity_part_not_nan(kind, weight):
    """A zero weight makes F identically 0 and its bound L = 0: the layer outputs exactly its identity
    part X / (1 + |gamma|) (F / L was 0 / 0 = NaN), its gradients are finite, and its bound is honest."""
    options = {"layout": "multihead"} if kind == "l2-tight-multihead" else {}
    layer = make_attention(kind.replace("-multihead", ""), 4, heads=2, gamma_init=1.5, **options).double()
    with torch.no_grad():
        getattr(layer, weight).zero_()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, x / 2.5, rtol=0, atol=1e-15)
    out.square().sum().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in layer.parameters() if p.grad is not None)
    assert layer.lipschitz_bound() == 1.0


@pytest.mark.parametrize("kind", ["l2", "l2-tight", "lipnorm"])
def test_a_non_finite_gamma_is_refused_by_the_forward_and_the_bound(kind):
    """gamma = NaN made the layer output NaN while its block still reported a certified bound < 1."""
    from acf.layers.block import CertificateError, ContractiveBlock, certified_bounds
    from acf.layers.branches import resflow_branch

    block = ContractiveBlock(resflow_branch(4, (3, 3), hidden=8, attention=kind, heads=2))
    layer = next(m for m in block.modules() if hasattr(m, "gamma"))
    assert certified_bounds(torch.nn.Sequential(block))["0"] < 1
    with torch.no_grad():
        layer.gamma.fill_(float("nan"))
    name = type(layer).__name__
    with pytest.raises(ValueError, match=rf"{name}.gamma is not finite \(1 NaN, 0 inf\)"):
        layer(torch.randn(1, layer.channels, 3, 3))
    with pytest.raises(ValueError, match=rf"{name}.gamma is not finite"):
        layer.lipschitz_bound()
    with pytest.raises(CertificateError, match=rf"residual block '0' has no certified Lip\(g\): {name}.gamma is not"):
        certified_bounds(torch.nn.Sequential(block))
    with torch.no_grad():
        layer.gamma.fill_(0.5)  # a finite value again (a new version of the parameter): accepted
    assert bool(torch.isfinite(layer(torch.randn(1, layer.channels, 3, 3))).all()) and layer.lipschitz_bound() == 1.0


@pytest.mark.parametrize("cls", [L2MultiheadAttention, LipNormAttention])
def test_layer_gradcheck_and_gradgradcheck(cls):
    """Second order through the whole layer (bound included): what the Neumann gradient needs."""
    layer = cls(4, heads=2).double()
    with torch.no_grad():
        layer.gamma.fill_(0.5)
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    names, params = zip(*[(n, p.detach().clone().requires_grad_(True)) for n, p in layer.named_parameters()])

    def fn(inp, *ps):
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))
