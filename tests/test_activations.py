"""Activations: 1-Lipschitz for every beta, CLipSwish doubles channels."""
import pytest
import torch

from acf.layers.activations import CLipSwish, ELU, LipSwish, make_activation


def max_derivative(fn, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return float(g.abs().max())


X = torch.linspace(-30, 30, 60001, dtype=torch.float64)


@pytest.mark.parametrize("beta", [-3.0, 0.0, 0.5, 2.0, 20.0])
def test_lipswish_is_1_lipschitz(beta):
    d = max_derivative(LipSwish(beta).double(), X)
    assert d < 1.0
    if beta >= 0:
        assert d > 0.99  # the 1.1 divisor is tight, not arbitrary


@pytest.mark.parametrize("beta", [0.0, 0.5, 5.0])
def test_clipswish_jacobian_norm_below_one(beta):
    act = CLipSwish(beta, dim=1).double()
    x = X.reshape(1, -1, 1).requires_grad_(True)
    # Each input element feeds two outputs: the Jacobian column norm is sqrt(d1^2 + d2^2).
    out = act(x)
    n = x.shape[1]
    (g1,) = torch.autograd.grad(out[:, :n].sum(), x, retain_graph=True)
    (g2,) = torch.autograd.grad(out[:, n:].sum(), x)
    col = torch.sqrt(g1**2 + g2**2)
    assert float(col.max()) < 1.0 and float(col.max()) > 0.99
    assert out.shape == (1, 2 * n, 1)


def test_elu_and_registry():
    assert max_derivative(ELU(), X) <= 1.0
    assert isinstance(make_activation("lipswish"), LipSwish)
    with pytest.raises(ValueError, match="unknown activation 'relu6'"):
        make_activation("relu6")
