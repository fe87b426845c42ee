"""The contractive block x + g(x): inversion, certified vs empirical Lipschitz, the dot-product failure."""

import math

import pytest
import torch

from acf.layers.block import ContractiveBlock
from acf.layers.branches import BRANCHES
from acf.ops.fixed_point import ConvergenceError
from acf.layers.logdet import LogdetEstimator
from helpers import ascent_ratio, positive_branch, random_pair_ratio, saturate

SHAPE = (4, 4, 4)


def make_branch(arch, attention, heads=2, coeff=0.97):
    kw = {"growth": 4, "depth": 2} if arch == "idensenet" else {"hidden": 8}
    return BRANCHES[arch](SHAPE[0], SHAPE[1:], attention=attention, heads=heads, coeff=coeff, **kw)


@pytest.mark.parametrize("arch", sorted(BRANCHES))
@pytest.mark.parametrize("attention", [None, "l2", "lipnorm"])
def test_block_inverts_and_is_certified(arch, attention):
    torch.manual_seed(sum(map(ord, f"{arch}{attention}")))
    g = saturate(make_branch(arch, attention))
    block = ContractiveBlock(g, LogdetEstimator(method="series", n_terms=2)).eval()
    bound = block.lipschitz_bound()
    assert 0.5 < bound < 1.0  # saturated: close to coeff^3, still a contraction

    x = torch.randn(6, *SHAPE) * 2.0
    with torch.no_grad():
        y, _ = block(x)
        x_rec, info = block.inverse(y, return_info=True)
    assert bool(info.converged.all())
    assert float((x_rec - x).abs().max()) <= 1e-4

    g64 = g.double()
    with torch.no_grad():
        for scale in (0.3, 3.0):
            assert random_pair_ratio(g64, SHAPE, n_pairs=32, scale=scale) <= bound
    assert ascent_ratio(g64, SHAPE, steps=12, n_pairs=4) <= bound


def test_gamma_cannot_break_the_contraction():
    """Eq. 13 alone gives Lip <= 1 + |gamma|; with the normalisation the bound stays < 1 for any gamma."""
    g = saturate(make_branch("resflow", "l2"))
    for gamma in (0.0, 1.0, 50.0, -1e4):
        for m in g.modules():
            if hasattr(m, "gamma"):
                m.gamma.data.fill_(gamma)
        assert g.lipschitz_bound() < 1.0
        assert ascent_ratio(g.double(), SHAPE, steps=8, n_pairs=4) <= g.lipschitz_bound()
        g.float()


def test_dot_product_attention_breaks_the_block():
    """Plain dot-product attention: construction refuses without allow_uncertified; with it, the branch's
    empirical Lipschitz ratio exceeds 1 at large input scale, so x + g(x) is no longer a contraction
    and the fixed-point inverse does not converge."""
    torch.manual_seed(0)
    g = make_branch("iresnet", "dot", heads=1)
    with pytest.raises(ValueError, match="DotProductAttention, which has no Lipschitz certificate"):
        ContractiveBlock(g)
    with pytest.warns(RuntimeWarning, match="not certified"):
        block = ContractiveBlock(g, allow_uncertified=True).eval()
    with torch.no_grad():
        for m in g.modules():
            if hasattr(m, "gamma"):
                m.gamma.fill_(1e3)  # attention dominates its layer
            if hasattr(m, "w_qkv"):
                m.w_qkv.mul_(4.0)
    ratios = [ascent_ratio(g.double(), SHAPE, steps=25, n_pairs=6, scale=s) for s in (0.1, 30.0)]
    g.float()
    assert ratios[1] > 1.0 > ratios[0]
    x = torch.randn(6, *SHAPE) * 30
    with torch.no_grad():
        y = x + g(x)
    with pytest.raises(ConvergenceError, match="did not converge"):
        block.inverse(y, max_iter=200, on_fail="raise")


def test_nonconvergence_is_reported():
    g = saturate(make_branch("resflow", None))
    block = ContractiveBlock(g).eval()
    y = torch.randn(3, *SHAPE) * 5
    with pytest.warns(RuntimeWarning, match=r"did not converge for \d of 3 samples after 2 iterations \(max residual"):
        x, info = block.inverse(y, max_iter=2, return_info=True)
    assert info.g_evals == 2 and info["iterations"] == 2 and not bool(info.converged.all())
    # The reported residual is the true residual of the returned x.
    with torch.no_grad():
        true_res = (x + g(x) - y).abs().flatten(1).amax(1)
    torch.testing.assert_close(info.residual, true_res)
    with pytest.raises(ConvergenceError):
        block.inverse(y, max_iter=2, on_fail="raise")


def test_block_bad_input():
    block = ContractiveBlock(make_branch("iresnet", None))
    with pytest.raises(ValueError, match="non-finite"):
        block(torch.full((1, *SHAPE), float("nan")))
    with pytest.raises(ValueError, match="has 3 channels"):
        block(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="4 dimensions"):
        block(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="coeff=1.0 is not in"):
        make_branch("resflow", "l2", coeff=1.0)
    with pytest.raises(ValueError, match="heads=3 must divide"):
        make_branch("resflow", "l2", heads=3)


def test_inverse_of_a_branch_near_its_bound():
    """A branch whose Jacobian is close to its certified bound (~0.86): Banach needs tens of steps, and
    the per-sample true-residual rule still reaches 1e-4 in float32."""
    torch.manual_seed(7)
    block = ContractiveBlock(positive_branch().float()).eval()
    x = torch.randn(32, 2, 4, 4)
    with torch.no_grad():
        y, _ = block(x)
        x_rec, info = block.inverse(y, return_info=True)
    assert info.iterations > 15 and bool(info.converged.all())
    assert float((x_rec - x).abs().max()) <= 1e-4


def test_construction_needs_a_reported_bound():
    with pytest.raises(TypeError, match="does not report a Lipschitz bound"):
        ContractiveBlock(torch.nn.Identity())


class TinyBranch(torch.nn.Module):
    """``g(x) = 0.5 tanh(x W^T + b)`` on flat samples, ``||W|| = 0.9``: ``Lip(g) <= 0.45``."""

    def __init__(self, dim=5):
        super().__init__()
        w = torch.randn(dim, dim, dtype=torch.float64)
        self.weight = torch.nn.Parameter(0.9 * w / torch.linalg.matrix_norm(w, ord=2))
        self.bias = torch.nn.Parameter(torch.randn(dim, dtype=torch.float64))

    def forward(self, x):
        return 0.5 * torch.tanh(x @ self.weight.t() + self.bias)

    def lipschitz_bound(self):
        return 0.5 * float(torch.linalg.matrix_norm(self.weight.detach(), ord=2))


class Inverse(torch.nn.Module):
    """``block.inverse`` as a module's forward (for ``torch.func.functional_call``)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, y):
        return self.block.inverse(y)


def test_inverse_is_differentiable_gradcheck():
    """The inverse differentiates by the implicit function theorem (an adjoint fixed-point solve in its
    backward): gradcheck in float64 against finite differences, for y and for g's parameters."""
    torch.manual_seed(3)
    inverse = Inverse(ContractiveBlock(TinyBranch(), tol=1e-13, max_iter=2000))
    names = [n for n, _ in inverse.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in inverse.parameters()]
    y = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, *ps: torch.func.functional_call(inverse, dict(zip(names, ps)), (y,)),
                                    (y, *params))
    x = inverse(y)
    assert x.requires_grad and x.grad_fn is not None  # before: a constant to autograd (no gradient at all)
    with torch.no_grad():
        assert not inverse(y).requires_grad  # and nothing is recorded without autograd
    with pytest.raises(RuntimeError, match="differentiable once"):  # a second derivative would be wrong: refused
        torch.autograd.grad(x.sum(), y, create_graph=True)


def test_inverse_gradient_equals_the_unrolled_iteration():
    """A real branch (spectral-normalised convolutions, L2 attention, float64): the adjoint gradient of
    the inverse equals autograd through 300 unrolled Banach steps, for y and every parameter."""
    torch.manual_seed(5)
    g = saturate(make_branch("resflow", "l2-tight")).double()
    block = ContractiveBlock(g).eval()
    y = torch.randn(2, *SHAPE, dtype=torch.float64)
    w = torch.randn_like(y)
    params = list(g.parameters())

    def unrolled(y):
        x = y
        for _ in range(300):
            x = y - g(x)
        return x

    yr, yi = y.clone().requires_grad_(True), y.clone().requires_grad_(True)
    ref = torch.autograd.grad((unrolled(yr) * w).sum(), [yr, *params], allow_unused=True)
    got = torch.autograd.grad((block.inverse(yi, tol=1e-14, max_iter=2000) * w).sum(), [yi, *params],
                              allow_unused=True)
    assert sum(r is not None for r in ref) == len(params) + 1
    for r, a in zip(ref, got):
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-12)


def test_inverse_backward_reports_nonconvergence():
    """The backward's adjoint solve has the call's cap and on_fail, and says so when it stops short."""
    block = ContractiveBlock(saturate(make_branch("resflow", None))).eval()
    y = (torch.randn(2, *SHAPE) * 3).requires_grad_(True)
    with pytest.warns(RuntimeWarning) as caught:
        block.inverse(y, max_iter=2).sum().backward()
    messages = [str(w.message) for w in caught]
    assert any(m.startswith("fixed-point inverse did not converge for 2 of 2") for m in messages), messages
    assert any(m.startswith("adjoint solve of the fixed-point inverse (backward) did not converge for 2 of 2")
               for m in messages), messages
    y.grad = None
    block.inverse(y, max_iter=500, on_fail="raise").sum().backward()  # converges with enough steps
    assert bool(torch.isfinite(y.grad).all())


def test_inverse_refuses_another_dtype():
    block = ContractiveBlock(make_branch("resflow", None))
    with pytest.raises(TypeError, match=r"y has dtype torch.float64 but the model's parameters are torch.float32; "
                                        r"convert the input \(y.to\(torch.float32\)\)"):
        block.inverse(torch.randn(1, *SHAPE, dtype=torch.float64))


def test_truncated_series_reads_the_first_terms_and_restores_the_estimator():
    """A linear branch g(x) = -c x (a 1x1 convolution -I at coefficient c = 0.97): log det(I + J) = D log(1 - c)
    exactly, and with Rademacher probes (v^T v = D) the first n terms of eq. 6 read -D sum_{k<=n} c^k / k
    exactly. 20 terms fall 0.43 nats per dimension short (0.97^k decays slowly), 400 reach the value; the block gets its
    roulette estimator back after the ``with``."""
    from acf.layers.block import truncated_series
    from acf.layers.spectral_norm import SpectralConv2d
    c, dims = 0.97, 4 * 3 * 3
    conv = SpectralConv2d(4, 4, 1, (3, 3), coeff=c, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(-torch.eye(4, dtype=torch.float64)[:, :, None, None])
    est = LogdetEstimator(method="roulette", probe="rademacher")
    block = ContractiveBlock(conv, est).double().eval()
    x = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        block(x)  # the normalisation's scale: c up to its rounding margin
        c = float(-conv(x)[0, 0, 0, 0] / x[0, 0, 0, 0])
    assert abs(c - 0.97) < 1e-5
    for n in (1, 20, 400):
        with truncated_series(block, n), torch.no_grad():
            _, logdet = block(x)
        want = -dims * sum(c**k / k for k in range(1, n + 1))
        torch.testing.assert_close(logdet, torch.full_like(logdet, want), rtol=1e-9, atol=1e-9)
    assert abs(want - dims * math.log(1 - c)) < 1e-3 * dims  # 400 terms: converged
    assert -dims * sum(c**k / k for k in range(1, 21)) - dims * math.log(1 - c) > 0.4 * dims  # 20: 0.43 nats/dim short
    assert block.estimator is est
