"""The "l2-tight" attention layer: its certificate under adversarial search, its contract, its backends.

The certificate ``Lip(F) <= L`` of ``L2TightAttention`` (``F / L`` has Lipschitz constant <= 1) is
attacked by gradient ascent on the largest singular value of the layer's Jacobian (float64, power
iteration on J^T J) from Gaussian, clustered, large-norm and "hub" starts, over token counts (odd, up
to 196), head layouts, logit ranges and weight scales. Nothing may exceed it; the tightness (largest
found / certified) is printed (``pytest -s``) and the default's is held above a floor.
"""
import math

import pytest
import torch

import acf
from acf.layers.attention import L2TightAttention, ball_projection, make_attention
from acf.layers.attention_bounds import l2_tight_constant
from helpers import adversarial_starts, jacobian_norm_ascent

# (layout, channels, heads, delta_max, N, weight scale, ascent steps)
SETTINGS = [
    ("grouped", 8, 1, 1.0, 16, 1.0, 20),
    ("grouped", 8, 1, 0.5, 49, 1.0, 15),
    ("grouped", 8, 2, 1.0, 63, 10.0, 15),
    ("grouped", 4, 1, 2.0, 49, 0.1, 20),
    ("grouped", 6, 3, 2.0, 25, 3.0, 20),
    ("grouped", 8, 2, 0.5, 196, 1.0, 6),
    ("multihead", 8, 2, 1.0, 35, 1.0, 15),
    ("multihead", 4, 4, 0.5, 17, 0.3, 20),
]


def layer_for(layout, channels, heads, delta, scale, seed=0):
    torch.manual_seed(seed)
    layer = L2TightAttention(channels, heads, delta_max=delta, layout=layout, backend="reference").double()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name != "gamma":
                p.mul_(scale)
    return layer


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(map(str, s[:6])))
def test_adversarial_search_never_exceeds_the_certificate(setting):
    layout, channels, heads, delta, n, scale, steps = setting
    layer = layer_for(layout, channels, heads, delta, scale)
    starts = adversarial_starts(channels, n, layer.radius, torch.Generator().manual_seed(1))
    found = jacobian_norm_ascent(lambda x: layer.attend(x), torch.cat(list(starts.values())), steps=steps, iters=8)
    tightness = float(found.max())  # attend() returns F / L: its certified Lipschitz constant is 1
    print(f"\nl2-tight {layout} D={channels} H={heads} Delta={delta} N={n} scale={scale}: tightness "
          f"{tightness:.3f} ({', '.join(f'{k} {float(v):.3f}' for k, v in zip(starts, found))})")
    assert tightness <= 1.0 + 1e-9
    if (layout, delta) == ("grouped", 0.5):  # the default's tightness, measured 0.49-0.51
        assert tightness >= 0.45


def test_a_hand_built_worst_case_is_within_the_certificate():
    """Tokens so small that P is uniform: F is the mean of ``M^T x`` over tokens, whose Jacobian has norm
    ``||M||`` exactly; the certificate must lie above it (and f(Delta, N) says by how much)."""
    layer = layer_for("grouped", 4, 1, 1.0, 1.0)
    n = 9
    x = 1e-6 * torch.randn(1, 4, n, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda t: layer.attend(t), x).reshape(4 * n, 4 * n)
    got = float(torch.linalg.matrix_norm(jac, ord=2))
    assert got == pytest.approx(1.0 / l2_tight_constant(1.0, n), rel=1e-4)


def test_constant_values_and_limits():
    assert l2_tight_constant(1.0, 1) == 1.0
    for delta in (0.5, 1.0, 2.0):
        values = [l2_tight_constant(delta, n) for n in (2, 16, 196, 4096)]
        assert values == sorted(values) and values[-1] - values[-2] < 0.15  # levels off in N
    assert l2_tight_constant(0.5, 196) == pytest.approx(2.03, abs=0.01)
    assert l2_tight_constant(2.0, 196) == pytest.approx(5.91, abs=0.01)
    with pytest.raises(ValueError, match="Delta > 0"):
        l2_tight_constant(0.0, 5)


def test_ball_projection():
    xt = torch.tensor([[[3.0, 0.1, 0.0]], [[4.0, 0.0, 0.0]]]).reshape(1, 2, 3)  # tokens (3,4), (0.1,0), (0,0)
    got = ball_projection(xt, 1.0)
    torch.testing.assert_close(got[0, :, 0], torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(got[0, :, 1:], xt[0, :, 1:])  # inside the ball: unchanged (and 0 stays 0)


@pytest.mark.parametrize("layout", ["grouped", "multihead"])
def test_layer_contract(layout):
    layer = make_attention("l2-tight", 8, 2, layout=layout, delta_max=0.7).double()
    x = torch.randn(3, 8, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x)  # gamma = 0: the identity
    with torch.no_grad():
        layer.gamma.fill_(-1.5)
    f = layer.attend(x.flatten(2)).reshape(x.shape)
    torch.testing.assert_close(layer(x), (x - 1.5 * f) / 2.5)
    assert layer.lipschitz_bound() == 1.0 and layer.certified
    torch.testing.assert_close(layer.bound(35), l2_tight_constant(0.7, 35) * layer.value_norm())


@pytest.mark.parametrize("layout", ["grouped", "multihead"])
@pytest.mark.parametrize("shape", [(2, 8, 3, 5), (1, 12, 7, 7)])
def test_fused_cpu_kernels_equal_the_reference(layout, shape):
    """Forward, VJP and the double VJP the Neumann gradient needs, float64, fresh random inputs."""
    if not acf.ops.l2_attention.cpu_kernels_available():
        pytest.skip("acf._C not built")
    torch.manual_seed(0)
    layer = make_attention("l2-tight", shape[1], 4 if shape[1] == 12 else 2, layout=layout).double()
    with torch.no_grad():
        layer.gamma.fill_(0.8)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    outs = []
    for backend in ("reference", "extension"):
        layer.backend = backend
        y = layer(x)
        (g,) = torch.autograd.grad((y * y.detach().sin()).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
        outs.append((y, g, gg))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck_through_the_projection_and_temperature():
    torch.manual_seed(0)
    layer = make_attention("l2-tight", 4, 2, radius=0.5).double()  # small ball: some tokens are projected
    with torch.no_grad():
        layer.gamma.fill_(2.0)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    assert torch.autograd.gradgradcheck(layer, (x,))
    params = [p for n, p in layer.named_parameters() if n != "gamma"]
    assert torch.autograd.gradcheck(lambda *ps: torch.func.functional_call(
        layer, dict(zip([n for n, _ in layer.named_parameters() if n != "gamma"], ps)), (x.detach(),)), params)


@pytest.mark.parametrize("form,weight", [("residual", 5.0), ("quadrature", 0.9), ("gated", 0.99)])
def test_in_a_model_the_bounds_hold_and_it_inverts(form, weight):
    """Each form with its attention path switched well on (``gamma_init``: eq. 13's gamma, eta2, the gate)."""
    model = acf.build_model("resflow", "l2-tight", input_shape=(1, 8, 8), n_scales=1, blocks_per_scale=2, hidden=8,
                            heads=2, delta_max=2.0, attention_form=form, gamma_init=weight).double()
    model.eval()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        z, _ = model(x)
        assert float((model.inverse(z, tol=1e-12, max_iter=2000) - x).abs().max()) < 1e-9
    assert all(b < 1 for b in model.lipschitz_bounds())


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="delta_max"):
        make_attention("l2-tight", 8, 2, delta_max=0)
    with pytest.raises(ValueError, match="radius"):
        make_attention("l2-tight", 8, 2, radius=-1.0)
    with pytest.raises(ValueError, match="layout"):
        make_attention("l2-tight", 8, 2, layout="mixed")
    with pytest.raises(ValueError, match="heads=3 must divide channels=8"):
        make_attention("l2-tight", 8, 3)
    with pytest.raises(ValueError, match="head_layout"):
        acf.build_model("resflow", "l2-tight", head_layout="mixed")
    assert math.isfinite(l2_tight_constant(20.0, 1000))
