"""Spectral normalisation: certified upper bounds, exact checks, refresh policy, bad input."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from acf.layers.spectral_norm import (SpectralConv2d, SpectralLinear, norm_bounds, operator_norm, refresh_spectral_norms,
                               spectral_norm)
from helpers import jacobian


def conv_norm(w: torch.Tensor, hw) -> float:
    """Exact operator norm of the zero-padded 'same' convolution at ``hw`` (Lanczos, float64)."""
    w = w.double()
    p = w.shape[-1] // 2
    return float(operator_norm(lambda x: F.conv2d(x, w, padding=p), lambda y: F.conv_transpose2d(y, w, padding=p),
                               (1, w.shape[1], *hw), (1, w.shape[0], *hw), w))


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (16, 16), (33, 65), (100, 10)])
def test_spectral_norm_matches_svd(shape):
    w = torch.randn(shape, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(w, ord=2)
    torch.testing.assert_close(spectral_norm(w), exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (7, 3), (16, 16), (33, 65), (130, 20)])
def test_norm_bounds_of_matrices_are_exact(shape):
    ws = torch.randn(3, *shape, dtype=torch.float64) * torch.tensor([0.1, 1.0, 30.0]).view(3, 1, 1)
    exact = torch.linalg.matrix_norm(ws, ord=2)
    got = norm_bounds(ws)
    assert bool((got >= exact).all())  # never below, within the stated rounding margin above
    torch.testing.assert_close(got, exact, rtol=2e-6, atol=0)
    torch.testing.assert_close(norm_bounds(ws.float().unsqueeze(-1).unsqueeze(-1)), exact, rtol=2e-6, atol=0)


@pytest.mark.parametrize("cout,cin,k,hw", [(3, 5, 3, (5, 7)), (8, 2, 3, (4, 4)), (4, 3, 5, (5, 3)), (1, 6, 3, (3, 3)),
                                          (6, 6, 5, (5, 9))])
def test_torus_bound_equals_the_circulant_norm(cout, cin, k, hw):
    """The conv bound is the norm of the circular convolution on the (H+k-1) x (W+k-1) torus: a dense
    float64 circulant (circular padding of the embedded input) gives the same number."""
    w = torch.randn(cout, cin, k, k, dtype=torch.float64)
    th, tw = hw[0] + k - 1, hw[1] + k - 1
    p = k // 2

    def circ(x):
        return F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), w)

    dense = jacobian(circ, torch.zeros(1, cin, th, tw, dtype=torch.float64))
    torch.testing.assert_close(norm_bounds(w[None], hw)[0], torch.linalg.matrix_norm(dense, ord=2), rtol=2e-6, atol=0)


@settings(max_examples=30, deadline=None)
@given(cout=st.integers(1, 9), cin=st.integers(1, 9), k=st.sampled_from([1, 3, 5]), h=st.integers(1, 11),
       w=st.integers(1, 11), scale=st.floats(1e-3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_conv_bound_is_never_below_the_exact_norm(cout, cin, k, h, w, scale, seed):
    """Property: for any kernel and input size the certified bound is >= the operator norm (Lanczos);
    on inputs of at least twice the kernel size it is also within 30% of it (measured: at most 9% for
    3x3 and 13% for 5x5 kernels; 1x1 is exact; on smaller inputs up to about 40%)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(cout, cin, k, k, generator=gen, dtype=torch.float64) * scale
    bound = float(norm_bounds(weight[None], (h, w))[0])
    exact = conv_norm(weight, (h, w))
    assert bound >= exact * (1 - 1e-9)
    if k == 1:
        assert bound <= exact * (1 + 2e-6)  # exact, plus the rounding margin
    elif min(h, w) >= 2 * k:
        assert bound <= exact * 1.3


@pytest.mark.parametrize("cin,cout,k,hw", [(3, 5, 3, (5, 7)), (2, 2, 1, (4, 4)), (4, 3, 5, (5, 3)), (1, 6, 3, (3, 3))])
def test_normalised_conv_is_certified_and_close_to_its_coefficient(cin, cout, k, hw):
    """The applied weight's operator norm (dense Jacobian) is <= the coefficient, within the torus
    bound's looseness of it, and ``lipschitz_bound()`` (Lanczos) equals it."""
    conv = SpectralConv2d(cin, cout, k, hw, coeff=0.9).double()
    with torch.no_grad():
        conv.weight.mul_(50.0)  # far above the coefficient: normalisation is active
    w_hat = conv.normalized_weight().detach()
    op = torch.nn.Conv2d(cin, cout, k, padding=k // 2, bias=False).double()
    op.weight.data.copy_(w_hat)
    exact = float(torch.linalg.matrix_norm(jacobian(op, torch.zeros(1, cin, *hw, dtype=torch.float64)), ord=2))
    assert exact <= 0.9 * (1 + 1e-9)
    assert exact >= 0.9 * (1 - 2e-6) / (1.0 if k == 1 else 1.6)  # torus looseness on these tiny inputs
    assert abs(float(conv.lipschitz_bound()) - exact) < 1e-7


def test_linear_below_coefficient_is_left_alone():
    lin = SpectralLinear(8, 8, coeff=0.95).double()
    with torch.no_grad():
        lin.weight.mul_(1e-3)
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(lin(x), x @ lin.weight.t() + lin.bias)


def test_linear_normalised_exactly_and_differentiable():
    """Dense layers use the exact norm; the gradient is that of ``u^T W v`` (i-ResNet's), which equals
    the gradient of ``||W||_2`` once the power iteration has converged."""
    lin = SpectralLinear(12, 20, coeff=0.8).double()
    with torch.no_grad():
        lin.weight.mul_(10.0)
    lin.refresh(tol=1e-12)
    w_hat = lin.normalized_weight()
    torch.testing.assert_close(torch.linalg.matrix_norm(w_hat.detach(), ord=2), torch.tensor(0.8, dtype=torch.float64),
                               rtol=2e-6, atol=0)
    g = torch.randn_like(w_hat)
    (w_hat * g).sum().backward()
    w = lin.weight.detach().clone().requires_grad_(True)
    ((w / (torch.linalg.matrix_norm(w, ord=2) / 0.8)) * g).sum().backward()
    torch.testing.assert_close(lin.weight.grad, w.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("cin,cout,batch", [(784, 128, 5), (7, 33, 1), (64, 64, 3)])
def test_dense_1x1_convolution_matches_conv2d(cin, cout, batch):
    """A 1x1 convolution on 1x1 inputs (the FC blocks) runs as one GEMM: values and first and second
    derivatives (the log-det's double backward) equal conv2d's, float64."""
    torch.manual_seed(cin + cout)
    conv = SpectralConv2d(cin, cout, 1, (1, 1), coeff=0.9).double()
    x = torch.randn(batch, cin, 1, 1, dtype=torch.float64, requires_grad=True)
    w_hat = conv.normalized_weight()
    ref = F.conv2d(x, w_hat, conv.bias)
    y = conv(x)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert y.shape == (batch, cout, 1, 1)
    v = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, v, create_graph=True)
    (gx_ref,) = torch.autograd.grad(ref, x, v, create_graph=True)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    u = torch.randn_like(gx)
    params = [conv.weight, conv.bias]
    second = torch.autograd.grad((gx * u).sum(), params, allow_unused=True)
    second_ref = torch.autograd.grad((gx_ref * u).sum(), params, allow_unused=True)
    for a, b in zip(second, second_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_refresh_iterates_to_the_tolerance():
    lin = SpectralLinear(30, 30, coeff=0.9)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(30, 30))
        lin.u.copy_(torch.nn.functional.normalize(torch.randn(30), dim=0))
        lin.v.copy_(torch.nn.functional.normalize(torch.randn(30), dim=0))
    assert lin.refresh(n_iter=1) == 1  # explicit step count
    assert lin.refresh(tol=1e-7) > 1   # tolerance mode iterates until the estimate settles
    exact = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
    torch.testing.assert_close(lin.u @ lin.weight.detach() @ lin.v, exact, rtol=1e-4, atol=0)


def test_same_map_until_the_weight_changes():
    """Forwards refresh only after the weight changed (in place, as an optimizer does, or moved):
    between changes every call applies exactly the same map (the log-det series and the inverse rely
    on it), and after a change the certificate follows the new weight at once."""
    conv = SpectralConv2d(2, 3, 3, (4, 4), coeff=0.9).train()
    x = torch.randn(2, 2, 4, 4)
    u0, y0 = conv.u.clone(), conv(x)
    assert torch.equal(conv(x), y0) and torch.equal(conv.u, u0) and not conv.stale
    with torch.no_grad():
        conv.weight.mul_(40.0)  # in place: bumps the version counter
    assert conv.stale
    conv(x)
    assert not conv.stale and not torch.equal(conv.u, u0)
    assert conv_norm(conv.normalized_weight().detach(), (4, 4)) <= 0.9 * (1 + 1e-6)
    twin = conv.double()  # new storage
    assert twin.stale


def test_refresh_spectral_norms_refreshes_only_stale_layers():
    convs = torch.nn.Sequential(SpectralConv2d(2, 4, 3, (5, 5)), SpectralConv2d(4, 2, 3, (5, 5)), SpectralLinear(3, 3))
    _, steps = refresh_spectral_norms(convs, stale_only=True, return_steps=True)
    assert steps.tolist() == [0, 0, 0]
    with torch.no_grad():
        convs[1].weight.mul_(3.0)
    bounds, steps = refresh_spectral_norms(convs, stale_only=True, return_steps=True)
    assert steps[0] == 0 and steps[1] >= 1 and steps[2] == 0
    torch.testing.assert_close(bounds[1], norm_bounds(convs[1].weight[None], (5, 5))[0])


@pytest.mark.parametrize("coeff", [1.0, 1.5, 0.0, -0.3])
def test_coefficient_must_be_below_one(coeff):
    with pytest.raises(ValueError, match="coeff=.* is not in \\(0, 1\\)"):
        SpectralConv2d(2, 2, 3, (4, 4), coeff=coeff)
    with pytest.raises(ValueError, match="not in \\(0, 1\\)"):
        SpectralLinear(2, 2, coeff=coeff)


def test_bad_inputs_named():
    conv = SpectralConv2d(3, 4, 3, (5, 5))
    with pytest.raises(ValueError, match="must have 4 dimensions"):
        conv(torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match="has 2 channels"):
        conv(torch.randn(1, 2, 5, 5))
    with pytest.raises(ValueError, match="normalised for \\(5, 5\\)"):
        conv(torch.randn(1, 3, 6, 6))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        SpectralConv2d(3, 4, 2, (5, 5))
    with pytest.raises(ValueError, match="features"):
        SpectralLinear(4, 2)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="tol must be"):
        SpectralLinear(4, 2, tol=0.0)
    with pytest.raises(ValueError, match="max_iter must be"):
        SpectralConv2d(3, 4, 3, (5, 5), max_iter=0)
    with pytest.raises(ValueError, match="need input_hw"):
        norm_bounds(torch.randn(1, 2, 2, 3, 3))
