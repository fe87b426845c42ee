"""Spectral normalisation: power iteration against exact norms, coefficients, train/eval policy."""
import pytest
import torch

from acf.spectral_norm import SpectralConv2d, SpectralLinear, frozen_power_iteration, spectral_norm
from helpers import jacobian


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (16, 16), (33, 65), (100, 10)])
def test_spectral_norm_matches_svd(shape):
    w = torch.randn(shape, dtype=torch.float64)
    exact = torch.linalg.matrix_norm(w, ord=2)
    torch.testing.assert_close(spectral_norm(w), exact, rtol=1e-4, atol=0)


@pytest.mark.parametrize("cin,cout,k,hw", [(3, 5, 3, (5, 7)), (2, 2, 1, (4, 4)), (4, 3, 5, (5, 3)), (1, 6, 3, (3, 3))])
def test_conv_operator_norm_matches_dense_jacobian(cin, cout, k, hw):
    """The normalised convolution's operator norm at the input size is its coefficient (saturated),
    and the certified bound equals the SVD of the dense operator matrix."""
    conv = SpectralConv2d(cin, cout, k, hw, coeff=0.9).double()
    with torch.no_grad():
        conv.weight.mul_(50.0)  # far above the coefficient: normalisation is active
    conv.train()
    conv.refresh(tol=1e-8)
    w_hat = conv.normalized_weight().detach()
    op = torch.nn.Conv2d(cin, cout, k, padding=k // 2, bias=False).double()
    op.weight.data.copy_(w_hat)
    exact = torch.linalg.matrix_norm(jacobian(op, torch.zeros(1, cin, *hw, dtype=torch.float64)), ord=2)
    assert abs(float(exact) - 0.9) < 2e-3  # power iteration (500 steps) may sit slightly below sigma_max
    assert abs(float(conv.lipschitz_bound()) - float(exact)) < 1e-7  # the certificate is exact (Lanczos)


def test_linear_below_coefficient_is_left_alone():
    lin = SpectralLinear(8, 8, coeff=0.95).double()
    with torch.no_grad():
        lin.weight.mul_(1e-3)
    x = torch.randn(4, 8, dtype=torch.float64)
    torch.testing.assert_close(lin(x), x @ lin.weight.t() + lin.bias)


def test_linear_normalised_and_differentiable():
    lin = SpectralLinear(12, 20, coeff=0.8).double()
    with torch.no_grad():
        lin.weight.mul_(10.0)
    lin.eval()
    w_hat = lin.normalized_weight()
    assert abs(float(torch.linalg.matrix_norm(w_hat.detach(), ord=2)) - 0.8) < 1e-4
    w_hat.sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_training_uses_fixed_iterations_eval_uses_tolerance():
    lin = SpectralLinear(30, 30, coeff=0.9, n_iter=1)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(30, 30))
        lin.u.copy_(torch.nn.functional.normalize(torch.randn(30), dim=0))
        lin.v.copy_(torch.nn.functional.normalize(torch.randn(30), dim=0))
    assert lin.refresh() == 1  # training default: n_iter steps
    assert lin.refresh(tol=1e-6) > 1  # tolerance mode iterates until the estimate settles
    exact = torch.linalg.matrix_norm(lin.weight.detach(), ord=2)
    torch.testing.assert_close(lin.sigma().detach(), exact, rtol=1e-3, atol=0)


def test_frozen_power_iteration_keeps_vectors():
    conv = SpectralConv2d(2, 3, 3, (4, 4))
    u0 = conv.u.clone()
    conv.train()
    with frozen_power_iteration():
        conv(torch.randn(2, 2, 4, 4))
    assert torch.equal(conv.u, u0)
    conv(torch.randn(2, 2, 4, 4))
    assert not torch.equal(conv.u, u0)


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
