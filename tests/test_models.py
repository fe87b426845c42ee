"""build_model: every arch x attention variant builds, inverts, is certified, samples; bad names fail."""
import math

import pytest
import torch
from torch import distributions as D

from acf.layers.block import ContractiveBlock as acf_block
from acf.layers.logdet import LogdetEstimator
from acf.models import ATTENTION_FORMS, PRESETS, build_model, model_config

ARCHS = ["iresnet", "resflow", "idensenet"]


def tiny(arch, attention, **kw):
    torch.manual_seed(0)
    kw = {"hidden": 8, "growth": 4, "depth": 2, "blocks_per_scale": 1, **kw}
    return build_model(arch, attention, heads=2, input_shape=(1, 8, 8), preset="cpu", **kw)


# The attention path switched well on, per form: eq. 13's gamma, the quadrature eta2, the gate's weight.
ATTENTION_ON = {"residual": 2.0, "quadrature": 0.9, "gated": 0.99}
VARIANTS = [(None, None)] + [(att, form) for att in ("l2", "lipnorm") for form in ATTENTION_FORMS]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attention,form", VARIANTS)
def test_variant_builds_inverts_and_samples(arch, attention, form):
    on = {"attention_form": form, "gamma_init": ATTENTION_ON[form]} if form else {}
    model = tiny(arch, attention, factor_out=True, fc_blocks=1, **on)
    x = torch.rand(6, 1, 8, 8) * 0.9 + 0.05
    model.train()
    model(x)  # ActNorm initialisation
    model.eval()
    with torch.no_grad():
        z, logdet = model(x)
        x_rec = model.inverse(z)
        samples = model.sample(3, temperature=0.7)
    assert z.shape == (6, 64) and logdet.shape == (6,)
    assert float((x_rec - x).abs().max()) <= 1e-4
    bounds = model.lipschitz_bounds()
    gated_blocks = 2 if form == "gated" else 0  # one attention block after the residual block of each stage
    assert len(bounds) == 3 + gated_blocks and all(b < 1 for b in bounds)
    assert samples.shape == (3, 1, 8, 8) and bool(torch.isfinite(samples).all())


def reference_prior_log_prob(z, means=None):
    """``log p_Z(z)`` per sample by torch.distributions: ``N(0, I)``, or the equal mixture of unit Gaussians."""
    if means is None:
        return D.Independent(D.Normal(torch.zeros_like(z), 1.0), 1).log_prob(z)
    components = D.Independent(D.Normal(means, torch.ones_like(means)), 1)
    return D.MixtureSameFamily(D.Categorical(logits=torch.zeros(len(means), dtype=z.dtype)), components).log_prob(z)


def exact_log_prob(model, x):
    """``log p_Z(z) + log |det df/dx|`` of one image ``x`` (a batch of 1), from the model's full Jacobian."""
    dims = x[0].numel()
    jac = torch.autograd.functional.jacobian(lambda t: model(t)[0], x).reshape(dims, dims)
    z = model(x)[0]
    means = None if model.prior_means is None else model.prior_means.detach()
    return reference_prior_log_prob(z, means)[0] + torch.linalg.slogdet(jac)[1]


def test_log_prob_matches_exact_change_of_variables():
    """With exact block log-dets, log p(x) equals log N(z) + log |det| of the model's full Jacobian."""
    model = tiny("resflow", "l2", factor_out=True, estimator=LogdetEstimator(method="exact")).double()
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    model(x)
    model.eval()
    xs = x[:1]
    expected = exact_log_prob(model, xs)
    torch.testing.assert_close(model.log_prob(xs)[0], expected)
    bpd = model.bits_per_dim(xs)[0]
    torch.testing.assert_close(bpd, -(expected - 64 * math.log(256)) / (64 * math.log(2)))


@pytest.mark.parametrize("squeeze_first", [False, True])
def test_factor_out_after_an_unsqueezed_stage(squeeze_first):
    """The paper presets' layout: the first stage runs on the 1-channel image (no factor-out there,
    its channels are odd), later stages factor out half; z, inverse and log p stay exact."""
    model = tiny("resflow", None, n_scales=3, squeeze_first=squeeze_first, factor_out=True,
                 estimator=LogdetEstimator(method="exact")).double()
    assert model.factored == ([None, (2, 4, 4), None] if not squeeze_first else [(2, 4, 4), (4, 2, 2), None])
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    model(x)
    model.eval()
    with torch.no_grad():
        z, _ = model(x)
        assert z.shape == (3, 64)
        assert float((model.inverse(z, tol=1e-12) - x).abs().max()) <= 1e-8
    torch.testing.assert_close(model.log_prob(x[:1])[0], exact_log_prob(model, x[:1]))


def test_hybrid_head_and_presets():
    model = tiny("iresnet", "l2", n_classes=10)
    z, _ = model(torch.rand(2, 1, 8, 8))
    assert model.classify(z).shape == (2, 10)
    with pytest.raises(ValueError, match="neither a classification head"):
        tiny("iresnet", None).classify(z)
    for name in PRESETS:  # every preset resolves for every data set shape it may meet
        for shape in [(1, 28, 28), (3, 32, 32), (3, 64, 64), (1, 8, 8)]:
            assert model_config("resflow", "l2", 4, shape, preset=name).input_shape == shape


def test_preactivation_off_lets_the_branches_see_the_sign_of_their_input():
    """Residual Flow branches (and FC blocks) start with LipSwish unless ``preactivation=False``: with it, two
    inputs far below 0 meet the first convolution as about 0 alike, without it they do not; either way the
    model inverts and its log-density is the exact change of variables."""
    from acf.layers.spectral_norm import SpectralConv2d

    for pre in (True, False):
        model = tiny("resflow", None, fc_blocks=1, preactivation=pre, estimator=LogdetEstimator(method="exact")).double()
        branches = [m.g for m in model.modules() if isinstance(m, acf_block)]
        assert len(branches) == 3 and all(isinstance(g[0], SpectralConv2d) != pre for g in branches)
        g = branches[0]
        low, lower = (torch.full((1, 4, 4, 4), v, dtype=torch.float64) for v in (-40.0, -80.0))
        with torch.no_grad():
            gap = float((g(low) - g(lower)).abs().max())
        assert (gap < 1e-9) if pre else (gap > 1e-3)
        x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05
        model(x)
        model.eval()
        with torch.no_grad():
            assert float((model.inverse(model(x)[0], tol=1e-12) - x).abs().max()) <= 1e-8
        torch.testing.assert_close(model.log_prob(x[:1])[0], exact_log_prob(model, x[:1]))


@pytest.mark.parametrize("kwargs,match", [
    ({"arch": "glow"}, "unknown arch 'glow'"),
    ({"attention": "softmax"}, "unknown attention 'softmax'"),
    ({"preset": "huge"}, "unknown preset 'huge'"),
    ({"blocks": 3}, r"unknown model settings \['blocks'\]"),
    ({"input_shape": (1, 6, 6)}, "must be divisible by 4"),
    ({"coeff": 1.0}, "coeff=1.0 is not in"),
    ({"hidden": 0}, "hidden must be >= 1, got 0"),
    ({"heads": "4"}, "heads must be an integer, got '4'"),
    ({"blocks_per_scale": 1.5}, "blocks_per_scale must be an integer"),
    ({"fc_blocks": -1}, "fc_blocks must be >= 0"),
    ({"n_classes": 1}, "n_classes must be >= 2"),
    ({"logit_alpha": 0.5}, r"logit_alpha must be in \[0.0, 0.5\)"),
    ({"input_shape": (1, 8)}, "input_shape must be \\(channels, height, width\\)"),
    ({"input_shape": (0, 8, 8)}, "input_shape channels must be >= 1"),
    ({"factor_out": "yes"}, "factor_out must be True or False"),
    ({"preactivation": 0}, "preactivation must be True or False"),
    ({"estimator": "roulette"}, "estimator must be a LogdetEstimator"),
])
def test_bad_configuration(kwargs, match):
    """Every model setting is checked when the configuration is made, with a message naming it."""
    args = {"arch": "resflow", "attention": "l2", "heads": 2, "input_shape": (1, 8, 8), "preset": "cpu", **kwargs}
    with pytest.raises((TypeError, ValueError), match=match):
        build_model(**args)


def test_bad_inputs_are_named():
    model = tiny("resflow", None).eval()
    with pytest.raises(ValueError, match=r"x has values outside \[0, 1\] \(min 2, max 2\)"):
        model.log_prob(torch.full((2, 1, 8, 8), 2.0))
    with pytest.raises(ValueError, match=r"input is an empty batch \(shape \(0, 1, 8, 8\)\)"):
        model.log_prob(torch.rand(0, 1, 8, 8))
    with pytest.raises(TypeError, match="input has dtype torch.float64 but the model's parameters are torch.float32"):
        model.log_prob(torch.rand(2, 1, 8, 8, dtype=torch.float64))
    for n, temperature, match in ((0, 1.0, "n must be >= 1, got 0"), (2.5, 1.0, "n must be an integer"),
                                  (2, -1.0, "temperature must be in"), (2, float("nan"), "temperature must be finite")):
        with pytest.raises((TypeError, ValueError), match=match):
            model.sample(n, temperature)


def test_float64_model_takes_float64_input():
    model = tiny("resflow", "l2").double().eval()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    logp = model.log_prob(x)
    assert logp.dtype == torch.float64 and torch.isfinite(logp).all()
    assert model.sample(2).dtype == torch.float64


def test_bad_input_shape():
    model = tiny("resflow", None)
    with pytest.raises(ValueError, match="built for \\(1, 8, 8\\)"):
        model(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="z must have shape"):
        model.inverse(torch.randn(1, 10))


@pytest.mark.parametrize("form", list(ATTENTION_FORMS))
def test_inverse_gradient_matches_finite_differences(form):
    """``model.inverse(z)`` with ``z.requires_grad`` is differentiable (implicit function theorem in every
    block): float64, l2-tight attention switched on, FC blocks; the directional derivative of a loss on
    the inverse agrees with central finite differences (measured: relative error 3e-9)."""
    torch.manual_seed(0)
    model = build_model("resflow", "l2-tight", input_shape=(1, 8, 8), n_scales=1, blocks_per_scale=2, hidden=8,
                        heads=2, fc_blocks=1, fc_hidden=16, attention_form=form, gamma_init=ATTENTION_ON[form]).double()
    model.train()
    model(torch.rand(4, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05)  # ActNorm initialisation
    model.eval()
    with torch.no_grad():
        z0, _ = model(torch.rand(3, 1, 8, 8, dtype=torch.float64) * 0.8 + 0.1)
    w = torch.randn(3, 1, 8, 8, dtype=torch.float64)

    def loss(z):
        return (model.inverse(z, tol=1e-13, max_iter=2000) * w).sum()

    z = z0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(z), z)
    for _ in range(3):
        d = torch.randn_like(z0)
        d /= d.norm()
        with torch.no_grad():
            fd = float(loss(z0 + 1e-5 * d) - loss(z0 - 1e-5 * d)) / 2e-5
        assert abs(float((grad * d).sum()) - fd) <= 1e-6 * abs(fd)


def test_inverse_refuses_another_dtype_like_the_forward():
    model = tiny("resflow", None).eval()
    with pytest.raises(TypeError, match=r"z has dtype torch.float64 but the model's parameters are torch.float32; "
                                        r"convert the input \(z.to\(torch.float32\)\) or the model"):
        model.inverse(torch.randn(2, 64, dtype=torch.float64))


@pytest.mark.parametrize("k,dims", [(1, 7), (3, 16), (10, 33)])
def test_gaussian_mixture_logprob_matches_torch_distributions(k, dims):
    """The mixture prior's log-density equals torch.distributions' on fresh float64 draws (far from and
    near the means); with one component at 0 it is the standard normal's; gradients pass gradcheck."""
    from acf.layers.flow import gaussian_mixture_logprob, standard_normal_logprob

    means = torch.randn(k, dims, dtype=torch.float64) * 3
    z = torch.cat([torch.randn(5, dims, dtype=torch.float64) * 4, means[:2] + 0.1])
    torch.testing.assert_close(gaussian_mixture_logprob(z, means), reference_prior_log_prob(z, means),
                               rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(gaussian_mixture_logprob(z, torch.zeros(1, dims, dtype=torch.float64)),
                               standard_normal_logprob(z), rtol=1e-12, atol=1e-10)
    assert torch.autograd.gradcheck(gaussian_mixture_logprob, (z[:3].clone().requires_grad_(),
                                                              means.clone().requires_grad_()))
    with pytest.raises(ValueError, match=r"means must have shape \(K, %d\)" % dims):
        gaussian_mixture_logprob(z, means[:, 1:])


@pytest.mark.parametrize("k,dims", [(2, 5), (10, 33)])
def test_joint_and_component_logprob_match_torch_distributions(k, dims):
    """With ``component`` the prior gives the joint ``log N(z; mu_k, I) - log K`` (torch.distributions' on fresh
    float64 draws); ``gaussian_component_logprob`` gives every component's, whose logsumexp minus ``log K`` is the
    mixture and whose softmax is the posterior; the joint passes gradcheck; bad components are named."""
    from acf.layers.flow import gaussian_component_logprob, gaussian_mixture_logprob

    means = torch.randn(k, dims, dtype=torch.float64) * 3
    z = torch.cat([torch.randn(5, dims, dtype=torch.float64) * 4, means[:2] + 0.1])
    component = torch.randint(k, (len(z),))
    expected = D.Independent(D.Normal(means[component], 1.0), 1).log_prob(z) - math.log(k)
    torch.testing.assert_close(gaussian_mixture_logprob(z, means, component), expected, rtol=1e-12, atol=1e-10)
    each = gaussian_component_logprob(z, means)
    assert each.shape == (len(z), k)
    torch.testing.assert_close(each.gather(1, component[:, None])[:, 0] - math.log(k), expected, rtol=1e-12,
                               atol=1e-9)
    torch.testing.assert_close(torch.logsumexp(each, 1) - math.log(k), reference_prior_log_prob(z, means),
                               rtol=1e-12, atol=1e-9)
    assert bool((gaussian_mixture_logprob(z, means, component) <= gaussian_mixture_logprob(z, means) + 1e-9).all())
    assert torch.autograd.gradcheck(lambda a, m: gaussian_mixture_logprob(a, m, component[:3]),
                                    (z[:3].clone().requires_grad_(), means.clone().requires_grad_()))
    with pytest.raises(ValueError, match=r"component indices must lie in \[0, %d\)" % k):
        gaussian_mixture_logprob(z, means, torch.full((len(z),), k))
    with pytest.raises(ValueError, match="component must be an int64 tensor of shape"):
        gaussian_mixture_logprob(z, means, component[:2])


def test_class_conditional_sampling_and_classify():
    """``sample(component=k)`` draws around mean ``k`` (at temperature 0: the decoded mean), one index or one
    per sample; ``classify`` of a mixture model gives each component's log-density; errors name the problem."""
    model = tiny("resflow", None, prior_components=3).double().eval()
    with torch.no_grad():
        decoded = model.inverse(model.prior_means, tol=1e-12).clamp(0, 1)
        one = model.sample(2, temperature=0.0, component=1, tol=1e-12)
        each = model.sample(3, temperature=0.0, component=torch.tensor([2, 0, 2]), tol=1e-12)
    torch.testing.assert_close(one, decoded[[1, 1]], rtol=0, atol=1e-8)
    torch.testing.assert_close(each, decoded[[2, 0, 2]], rtol=0, atol=1e-8)
    z = model.prior_means.detach() + 0.01 * torch.randn(3, 64, dtype=torch.float64)
    assert model.classify(z).argmax(1).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"component must lie in \[0, 3\)"):
        model.sample(2, component=3)
    with pytest.raises(ValueError, match="component must be an integer or 2 integers"):
        model.sample(2, component=torch.tensor([0, 1, 2]))
    plain = tiny("resflow", None)
    with pytest.raises(ValueError, match="no components"):
        plain.sample(1, component=0)
    with pytest.raises(ValueError, match="no components"):
        plain.prior_log_prob(torch.zeros(1, 64), torch.zeros(1, dtype=torch.int64))


def test_gaussian_mixture_logprob_float32_at_mnist_size():
    """In float32 at MNIST's size (50 components, D = 784, latents of norm ~28, some next to a mean)
    the log-density (about -1200 nats) stays within 2e-3 nats of the float64 reference."""
    from acf.layers.flow import gaussian_mixture_logprob

    means = torch.randn(50, 784, dtype=torch.float64) * 0.5
    z = torch.cat([torch.randn(30, 784, dtype=torch.float64), means[:2] + 1e-3])
    got = gaussian_mixture_logprob(z.float(), means.float()).double()
    torch.testing.assert_close(got, reference_prior_log_prob(z, means), rtol=0, atol=2e-3)


def test_mixture_prior_model_log_prob_and_samples():
    """A model with ``prior_components=K`` has K learnt means; its log-density is the exact change of
    variables under the mixture, the means train, and at temperature 0 every sample is a decoded mean."""
    model = tiny("resflow", None, prior_components=3, estimator=LogdetEstimator(method="exact")).double()
    assert tuple(model.prior_means.shape) == (3, 64)
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64) * 0.9 + 0.05
    model(x)
    model.eval()
    torch.testing.assert_close(model.log_prob(x[:1])[0], exact_log_prob(model, x[:1]))
    model.log_prob(x).sum().backward()
    assert model.prior_means.grad is not None and float(model.prior_means.grad.abs().max()) > 0
    with torch.no_grad():
        decoded = model.inverse(model.prior_means, tol=1e-12)
        samples = model.sample(6, temperature=0.0, tol=1e-12)
    gaps = (samples.flatten(1).unsqueeze(1) - decoded.clamp(0, 1).flatten(1).unsqueeze(0)).abs().amax(-1)
    assert float(gaps.amin(1).max()) <= 1e-8
    assert tiny("resflow", None).prior_means is None
    with pytest.raises(ValueError, match="prior_components"):
        tiny("resflow", None, prior_components=-1)
