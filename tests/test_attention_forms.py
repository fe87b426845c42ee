"""How attention joins the flow: the residual, quadrature and gated forms, their certificates under
adversarial search on whole branches, the knock-out, positional embeddings, paired initialisation, the
pull diagnostic, placement by stage, and the uncertified coupling reference."""
import math

import pytest
import torch

import acf
from acf.experiments.measurements import attention_pull, attention_shares, attention_weights
from acf.layers.attention import attention_ablated, attention_layers, make_attention, set_attention_backend
from acf.layers.branches import Gate, attention_branch, resflow_branch
from acf.layers.coupling import AffineCoupling
from acf.layers.logdet import LogdetEstimator, exact_logdet
from acf.layers.spectral_norm import SpectralConv2d
from helpers import adversarial_starts, jacobian_norm_ascent, saturate

KINDS = ["l2", "l2-tight", "lipnorm"]


def _set_weight(layer, w):
    with torch.no_grad():
        if layer.form == "residual":
            layer.gamma.fill_(w)
        else:
            layer.theta.fill_(math.asin(w))


@pytest.mark.parametrize("kind", KINDS)
def test_each_form_computes_its_formula(kind):
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    xt = x.flatten(2)
    res, quad, norm = (make_attention(kind, 8, 2, form=f).double() for f in ("residual", "quadrature", "normalized"))
    for layer in (res, quad, norm):
        layer.load_state_dict({**res.state_dict(), **{k: v for k, v in layer.state_dict().items()
                                                      if k in ("gamma", "theta")}}, strict=False)
    a = res.attend(xt)  # A~ = F / L, the same weights in every form
    torch.testing.assert_close(res(x), x)  # gamma starts at 0: the identity
    _set_weight(res, -0.4)
    torch.testing.assert_close(res(x).flatten(2), (xt - 0.4 * a) / 1.4)
    assert quad.out_channels == 16 and float(quad.attention_weight().detach()) == pytest.approx(0.2)
    _set_weight(quad, 0.3)
    torch.testing.assert_close(quad(x).flatten(2), torch.cat([math.sqrt(1 - 0.09) * xt, 0.3 * a], dim=1))
    torch.testing.assert_close(norm(x).flatten(2), a)
    assert all(layer.lipschitz_bound() == 1.0 for layer in (res, quad, norm))


def test_weights_out_of_range_are_refused():
    with pytest.raises(ValueError, match="quadrature"):
        make_attention("l2-tight", 8, 2, form="quadrature", gamma_init=1.0)
    with pytest.raises(ValueError, match="gated"):
        Gate(0.0)
    with pytest.raises(ValueError, match="attention form"):
        make_attention("l2", 8, 2, form="sideways")
    with pytest.raises(ValueError, match="gamma_init"):
        acf.build_model("resflow", "l2", attention_form="gated", gamma_init=1.0)
    with pytest.raises(ValueError, match="attention_scales entry 2"):
        acf.build_model("resflow", "l2", attention_scales=[2])


@pytest.mark.parametrize("kind", ["l2", "l2-tight"])
def test_adversarial_search_on_the_quadrature_map(kind):
    """``X -> [eta1 X ; eta2 A~(X)]`` is 1-Lipschitz: gradient ascent on its Jacobian's norm (float64) from
    Gaussian, clustered, large and hub starts finds ``sqrt(eta1^2 + eta2^2 t^2)`` with ``t`` the attention's
    own tightness, never more than 1."""
    torch.manual_seed(0)
    layer = make_attention(kind, 4, 1, form="quadrature", gamma_init=0.8, backend="reference").double()
    starts = adversarial_starts(4, 9, getattr(layer, "radius", 2.0), torch.Generator().manual_seed(1))
    x0 = torch.cat(list(starts.values())).reshape(-1, 4, 3, 3)
    found = float(jacobian_norm_ascent(layer, x0, steps=12, iters=6).max())
    print(f"\nquadrature {kind}: found {found:.4f} (the identity part alone: 0.6)")
    assert 0.6 - 1e-9 <= found <= 1.0 + 1e-9


def _aligned(g, bias):
    """1x1 convolutions made to align (the last the adjoint of the first, the middle an identity on the
    input part) and saturated at their coefficient, with biases ``bias`` (large: LipSwish near-linear;
    0: the attention's tokens near its ball): the branch's Jacobian can then come close to its bound."""
    convs = [m for m in g.modules() if isinstance(m, SpectralConv2d)]
    with torch.no_grad():
        first, last = convs[0], convs[-1]
        last.weight.copy_(first.weight.transpose(0, 1))
        if len(convs) == 3:
            middle = convs[1].weight
            middle.zero_()
            middle[:, : middle.shape[0], 0, 0] = torch.eye(middle.shape[0], dtype=middle.dtype)
            middle[:, middle.shape[0]:] += 0.3 * torch.randn_like(middle[:, middle.shape[0]:])
        for conv in convs:
            conv.weight.mul_(20.0)
            conv.bias.fill_(bias)
            conv.refresh(tol=1e-9)
    return g


@pytest.mark.parametrize("form", ["quadrature", "gated"])
def test_adversarial_search_on_whole_branches_stays_within_the_certificate(form):
    """Gradient ascent on the Jacobian's norm of a whole branch with l2-tight attention (float64, aligned
    saturated weights so that the search can get close): never above the branch's certified bound (< 1)."""
    torch.manual_seed(0)
    if form == "quadrature":
        g = resflow_branch(3, (3, 3), hidden=4, attention="l2-tight", heads=1, coeff=0.95, kernels=(1, 1, 1),
                           attention_options={"form": "quadrature", "gamma_init": 0.5})
    else:
        g = attention_branch(3, (3, 3), "l2-tight", hidden=4, heads=1, coeff=0.95, gamma_init=0.95)
    bias = 5.0 if form == "quadrature" else 0.0
    g = _aligned(set_attention_backend(g.double(), "reference"), bias)  # reference: forward-mode AD for the search
    bound = g.lipschitz_bound()
    starts = adversarial_starts(3, 9, 10.0 if form == "quadrature" else 1.0, torch.Generator().manual_seed(1))
    x0 = torch.cat(list(starts.values())).reshape(-1, 3, 3, 3) + bias
    found = float(jacobian_norm_ascent(g, x0, steps=12, iters=6).max())
    print(f"\n{form} branch: certified {bound:.4f}, found {found:.4f}")
    assert bound < 1.0 and found <= bound * (1 + 1e-9)
    assert found >= {"quadrature": 0.3, "gated": 0.1}[form] * bound  # the search is not toothless (measured 0.57, 0.13)


def test_positional_embedding_keeps_the_layer_within_its_certificate():
    torch.manual_seed(0)
    layer = make_attention("l2-tight", 4, 1, form="normalized", tokens=9, delta_max=2.0, backend="reference").double()
    with torch.no_grad():
        layer.positions.mul_(20.0)  # far from the tokens' scale
    starts = adversarial_starts(4, 9, layer.radius, torch.Generator().manual_seed(2))
    x0 = torch.cat(list(starts.values())).reshape(-1, 4, 3, 3)
    found = jacobian_norm_ascent(layer, x0, steps=10, iters=6)
    assert float(found.max()) <= 1.0 + 1e-9
    with pytest.raises(TypeError, match="tokens"):
        make_attention("l2", 4, 1, tokens=2.5)


@pytest.mark.parametrize("form", ["residual", "quadrature", "gated"])
def test_knockout_zeroes_the_attention_path_only(form):
    torch.manual_seed(0)
    model = acf.build_model("resflow", "l2-tight", 2, (1, 8, 8), n_scales=2, blocks_per_scale=1, hidden=8,
                            squeeze_first=False, attention_form=form, gamma_init=0.4).double().eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    layers = attention_layers(model)
    assert layers and all(not layer.ablated for layer in layers)
    with attention_ablated(model):
        assert all(layer.ablated for layer in layers)
        for layer in layers:
            xin = torch.randn(2, layer.channels, 4, 4, dtype=torch.float64)
            out = layer(xin)
            if form == "residual":
                torch.testing.assert_close(out, xin / 1.4)
            elif form == "quadrature":
                torch.testing.assert_close(out, torch.cat([math.sqrt(1 - 0.16) * xin, torch.zeros_like(xin)], 1))
            else:
                assert not out.any()
        with torch.no_grad():
            z, logdet = model(x)
            assert torch.isfinite(logdet).all()
            torch.testing.assert_close(model.inverse(z), x, atol=1e-6, rtol=0)
    assert all(not layer.ablated for layer in layers)


def test_a_knocked_out_gated_block_is_the_identity_with_log_det_zero():
    g = attention_branch(2, (3, 3), "l2-tight", hidden=4, heads=1).double()
    block = acf.ContractiveBlock(g, LogdetEstimator(method="exact"))
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    with attention_ablated(block), torch.no_grad():
        y, logdet = block(x)
        _, roulette = acf.ContractiveBlock(g, "roulette").eval()(x)
    assert not logdet.any() and not roulette.any()
    torch.testing.assert_close(y, x + g[2].bias.view(1, -1, 1, 1) * g[3].lipschitz_bound())


@pytest.mark.parametrize("form", ["residual", "quadrature", "gated"])
@pytest.mark.parametrize("kind", KINDS)
def test_models_of_every_form_invert_and_stay_certified(form, kind):
    torch.manual_seed(0)
    model = acf.build_model("resflow", kind, 2, (1, 8, 8), n_scales=2, blocks_per_scale=1, hidden=8,
                            attention_form=form, gamma_init=0.5 if form != "residual" else 0.8)
    x = torch.rand(4, 1, 8, 8) * 0.9 + 0.05
    model.train()
    model(x)
    model.eval()
    with torch.no_grad():
        z, _ = model(x)
        assert float((model.inverse(z) - x).abs().max()) <= 1e-4
    assert max(model.lipschitz_bounds()) < 1.0


def test_placement_by_stage_kernel_size_and_positions():
    def count(model, kind):
        return sum(isinstance(m, kind) for m in model.modules())

    def att_tokens(model):
        return sorted(layer.positions.shape[1] for layer in attention_layers(model))

    base = dict(n_scales=2, blocks_per_scale=2, hidden=8, squeeze_first=False)
    every = acf.build_model("resflow", "l2", 2, (1, 8, 8), positional=True, **base)
    first = acf.build_model("resflow", "l2", 2, (1, 8, 8), positional=True, attention_scales=[0], **base)
    last = acf.build_model("resflow", "l2", 2, (1, 8, 8), positional=True, attention_scales=[1], **base)
    assert att_tokens(every) == [16, 16, 64, 64] and att_tokens(first) == [64, 64] and att_tokens(last) == [16, 16]
    gated = acf.build_model("resflow", "l2", 2, (1, 8, 8), attention_form="gated", attention_scales=[1], **base)
    assert count(gated, acf.ContractiveBlock) == 6 and count(gated, Gate) == 2
    plain = acf.build_model("resflow", None, 2, (1, 8, 8), kernel_size=1, **base)
    assert {m.weight.shape[-1] for m in plain.modules() if isinstance(m, SpectralConv2d)} == {1}
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        acf.build_model("resflow", None, kernel_size=2)


@pytest.mark.parametrize("form", ["residual", "gated"])
def test_attention_does_not_change_the_initialisation_of_the_other_layers(form):
    torch.manual_seed(0)
    plain = acf.build_model("resflow", None, 2, (1, 8, 8), n_scales=2, blocks_per_scale=1, hidden=8)
    torch.manual_seed(0)
    attentive = acf.build_model("resflow", "l2-tight", 2, (1, 8, 8), n_scales=2, blocks_per_scale=1, hidden=8,
                                attention_form=form)
    extra = {id(p) for layer in attention_layers(attentive) for p in layer.parameters()}
    extra |= {id(p) for m in attentive.modules() if isinstance(m, acf.ContractiveBlock)
              and any(isinstance(t, Gate) for t in m.g.modules()) for p in m.parameters()}
    shared = [p for p in attentive.parameters() if id(p) not in extra]
    assert len(shared) == len(list(plain.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), shared))


def test_pull_is_the_derivative_of_the_loss_along_each_part():
    """attention_pull's dL/da and dL/db against central finite differences of the loss (float64, exact log-det)."""
    torch.manual_seed(0)
    model = acf.build_model("resflow", "l2-tight", 2, (1, 4, 4), n_scales=1, blocks_per_scale=2, hidden=8,
                            squeeze_first=False, estimator=LogdetEstimator(method="exact"), attention_form="residual",
                            gamma_init=0.3).double()
    images = torch.rand(8, 1, 4, 4, dtype=torch.float64)
    model(images)  # ActNorm initialisation
    torch.manual_seed(5)
    pulls = attention_pull(model, images, batches=1, batch_size=8)
    layer = attention_layers(model)[1]

    def loss(a, b):
        layer.pull = (torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64))
        try:
            torch.manual_seed(5)  # the same dequantisation as attention_pull's
            x = acf.uniform_dequantize(images)
            z, logdet = model(x)
            return float(acf.bits_per_dim(acf.standard_normal_logprob(z) + logdet, model.dims).mean())
        finally:
            layer.pull = None

    eps = 1e-5
    da = (loss(eps, 0.0) - loss(-eps, 0.0)) / (2 * eps)
    db = (loss(0.0, eps) - loss(0.0, -eps)) / (2 * eps)
    assert pulls[1]["s"] == pytest.approx(-da, rel=1e-5, abs=1e-9)
    assert pulls[1]["dL_db"] == pytest.approx(db, rel=1e-5, abs=1e-9)
    assert pulls[1]["r"] == pytest.approx(abs(db) / abs(da), rel=1e-5)


def test_weights_and_shares_of_every_form():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8)
    for form, weight in (("residual", 0.5), ("quadrature", 0.3), ("gated", 0.7)):
        model = acf.build_model("resflow", "l2-tight", 2, (1, 8, 8), n_scales=1, blocks_per_scale=2, hidden=8,
                                squeeze_first=False, attention_form=form, gamma_init=weight)
        model(x)
        assert attention_weights(model) == pytest.approx([weight, weight], rel=1e-6)
        shares = attention_shares(model.eval(), x)
        assert len(shares) == 2 and all(s > 0 for s in shares)
        with attention_ablated(model):
            assert attention_shares(model, x) == [0.0, 0.0]


@pytest.mark.parametrize("attention_heads", [0, 2])
def test_coupling_layer_is_exactly_invertible_with_its_exact_log_det(attention_heads):
    torch.manual_seed(0)
    layer = AffineCoupling(2, (4, 4), parity=1, hidden=8, attention_heads=attention_heads).double()
    with torch.no_grad():  # away from the zero start, so that the test means something
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    y, logdet = layer(x)
    torch.testing.assert_close(layer.inverse(y), x)
    _, brute = exact_logdet(lambda t: layer(t)[0] - t, x.clone().requires_grad_(True))
    torch.testing.assert_close(logdet, brute)
    with pytest.raises(ValueError, match="coupling"):
        acf.build_model("coupling", "l2")
