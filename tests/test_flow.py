"""Flow plumbing: ActNorm, squeeze, logit transform, dequantisation, SequentialFlow, bits/dim."""
import math

import pytest
import torch

from acf.layers.block import ContractiveBlock
from acf.layers.branches import resflow_branch
from acf.layers.flow import (ActNorm, LogitTransform, SequentialFlow, Squeeze, bits_per_dim, standard_normal_logprob,
                      uniform_dequantize)
from acf.layers.logdet import LogdetEstimator
from helpers import jacobian, saturate


def exact_logdet_of(layer, x):
    """log |det J| of a flow layer at a single sample, from its full Jacobian (float64)."""
    jac = jacobian(lambda t: layer(t)[0], x)
    return torch.linalg.slogdet(jac)[1]


def test_actnorm_data_dependent_init_and_inverse():
    layer = ActNorm(3).double()
    x = torch.randn(16, 3, 4, 5, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]).view(1, 3, 1, 1) + 2.0
    y, ld = layer(x)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64),
                               atol=1e-4, rtol=0)  # ActNorm's eps = 1e-6 in log(std + eps)
    torch.testing.assert_close(layer.inverse(y), x)
    torch.testing.assert_close(ld[0], exact_logdet_of(layer, x[:1]))
    # Initialised once: a second batch does not re-initialise.
    before = layer.bias.clone()
    layer(torch.randn(4, 3, 4, 5, dtype=torch.float64))
    assert torch.equal(layer.bias, before)


def test_squeeze_roundtrip_and_layout():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    y, ld = Squeeze()(x)
    assert y.shape == (2, 12, 2, 3) and float(ld.abs().max()) == 0
    assert torch.equal(Squeeze().inverse(y), x)
    assert torch.equal(y[0, :4, 0, 0], x[0, 0, :2, :2].reshape(-1))  # channel c holds its own 2x2 patch
    with pytest.raises(ValueError, match="divisible"):
        Squeeze()(torch.randn(1, 1, 3, 4))


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.05])
def test_logit_transform_logdet_and_inverse(alpha):
    layer = LogitTransform(alpha)
    x = torch.rand(1, 2, 3, 3, dtype=torch.float64) * 0.98 + 0.01
    y, ld = layer(x)
    torch.testing.assert_close(ld[0], exact_logdet_of(layer, x))
    torch.testing.assert_close(layer.inverse(y), x)
    with pytest.raises(ValueError, match="alpha"):
        LogitTransform(0.5)


def test_dequantization_and_bits_per_dim():
    x = torch.randint(0, 256, (1000, 3)).float() / 255
    xd = uniform_dequantize(x)
    assert float(xd.min()) >= 0 and float(xd.max()) < 1
    assert torch.equal(torch.floor(xd * 256), x * 255)  # each value stays in its own bin
    # The uniform density on [0, 1)^D has log p = 0: exactly 8 bits per dimension.
    assert bits_per_dim(torch.zeros(2), dims=10).tolist() == pytest.approx([8.0, 8.0])
    z = torch.zeros(1, 4)
    assert float(standard_normal_logprob(z)) == pytest.approx(-2 * math.log(2 * math.pi))


def small_flow():
    torch.manual_seed(5)
    layers = [LogitTransform(0.05), ActNorm(1), Squeeze()]
    for _ in range(2):
        g = saturate(resflow_branch(4, (2, 2), hidden=8, attention="l2", heads=2))
        layers += [ContractiveBlock(g, LogdetEstimator(method="exact")), ActNorm(4)]
    return SequentialFlow(layers).double()


def test_sequential_flow_change_of_variables():
    """With exact block log-dets, the flow's log-det equals log |det| of its full Jacobian."""
    flow = small_flow()
    x = torch.rand(8, 1, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    flow(x)  # ActNorm init
    flow.eval()
    z, ld = flow(x[:1])
    jac = jacobian(lambda t: flow(t)[0], x[:1])
    torch.testing.assert_close(ld[0], torch.linalg.slogdet(jac)[1], rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(flow.log_prob(x[:1]), standard_normal_logprob(z) + ld)
    with torch.no_grad():
        assert float((flow.inverse(z, tol=1e-13) - x[:1]).abs().max()) < 1e-10
    assert all(b < 1 for b in flow.lipschitz_bounds()) and len(flow.lipschitz_bounds()) == 2


def test_sequential_flow_trains():
    """A few Adam steps on the roulette estimator with the Neumann gradient lower the NLL."""
    flow = small_flow().float()
    for m in flow.modules():
        if isinstance(m, ContractiveBlock):
            m.estimator = LogdetEstimator(method="roulette")
    torch.manual_seed(0)
    x = torch.rand(32, 1, 4, 4) * 0.5 + 0.25
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    flow.train()
    losses = []
    for _ in range(15):
        loss = -flow.log_prob(uniform_dequantize(x)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert all(b < 1 for b in flow.lipschitz_bounds())


def test_flow_rejects_nan():
    flow = small_flow()
    with pytest.raises(ValueError, match="x contains non-finite values"):
        flow(torch.full((1, 1, 4, 4), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="z contains non-finite"):
        flow.inverse(torch.full((1, 4, 2, 2), float("inf"), dtype=torch.float64))
