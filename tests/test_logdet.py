"""Log-det estimators against the brute-force Jacobian on a 2 x 4 x 4 input (D = 32).

Statistical checks use a fixed seed and 3 standard errors; each one also shows that it would
catch a biased estimator, so that it cannot pass vacuously.
"""
import math
from unittest import mock

import pytest
import scipy.stats
import torch

from acf.layers.logdet import LogdetEstimator, exact_logdet, logdet_estimate, survival, term_weights
from helpers import positive_branch

SHAPE = (2, 4, 4)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(7)
    g = positive_branch()
    x = torch.randn(1, *SHAPE, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    _, exact = exact_logdet(g, xg, create_graph=False)
    return g, x, float(exact)


def test_exact_logdet_of_linear_map():
    a = torch.randn(6, 6, dtype=torch.float64) * 0.1
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    _, ld = exact_logdet(lambda t: t @ a.t(), x)
    torch.testing.assert_close(ld, torch.logdet(torch.eye(6, dtype=torch.float64) + a).expand(3))


def test_exact_value_is_sizeable(setup):
    _, _, exact = setup
    assert abs(exact) > 1.0  # a saturated branch: the estimators have something to get right


def _draws(g, x, est, calls, batch, training=True):
    """Per-call means of the estimator on ``batch`` replicas of ``x`` (one roulette draw per call)."""
    xs = x.expand(batch, *x.shape[1:])
    with torch.no_grad():
        return torch.stack([logdet_estimate(g, xs, est, training=training)[1].mean() for _ in range(calls)])


def _within(draws, target, k=3.0):
    se = float(draws.std()) / math.sqrt(len(draws))
    return abs(float(draws.mean()) - target) <= k * se, se


def test_truncated_series_with_many_terms_matches_exact(setup):
    g, x, exact = setup
    # Deterministic part: the series itself (traces from the exact Jacobian) converges to log det.
    xg = x.clone().requires_grad_(True)
    flat = g(xg).reshape(-1)
    jac = torch.stack([torch.autograd.grad(flat[i], xg, retain_graph=True)[0].reshape(-1) for i in range(32)])
    series = sum((-1) ** (k + 1) / k * torch.trace(torch.linalg.matrix_power(jac, k)) for k in range(1, 61))
    assert abs(float(series) - exact) < 1e-6
    # Hutchinson estimate of the 30-term series (truncation error 0.857^31 / 31 < 2e-4): within 3 standard errors of the exact value.
    draws = _draws(g, x, LogdetEstimator(method="series", n_terms=30), calls=8, batch=100)
    ok, se = _within(draws, exact)
    assert ok and se < 0.05 * abs(exact)
    # ... while a 1-term series (biased) is rejected by the same test.
    biased = _draws(g, x, LogdetEstimator(method="series", n_terms=1), calls=8, batch=100)
    assert not _within(biased, exact)[0]


@pytest.mark.parametrize("dist,probe,n_exact", [("poisson", "gaussian", 1), ("geometric", "rademacher", 1),
                                                ("poisson", "gaussian", 0)])
def test_russian_roulette_is_unbiased(setup, dist, probe, n_exact):
    """Unbiased, also with no exact term (then a draw of N = 0 terms, 1 in e^2 here, estimates 0)."""
    g, x, exact = setup
    est = LogdetEstimator(method="roulette", dist=dist, probe=probe, n_exact=n_exact, p=0.5, lam=2.0)
    draws = _draws(g, x, est, calls=400, batch=8)
    ok, se = _within(draws, exact)
    assert ok, (float(draws.mean()), exact, se)
    assert se < 0.1 * abs(exact)


def test_evaluation_uses_more_exact_terms():
    est = LogdetEstimator(method="roulette", n_exact=2, n_exact_eval=20)
    train = [len(term_weights(est, training=True)) for _ in range(50)]
    evaluation = [len(term_weights(est, training=False)) for _ in range(50)]
    assert min(train) >= 2 and max(train) > 2  # n_exact terms always, more by the roulette draw
    assert min(evaluation) >= 20 and max(evaluation) > 20
    assert len(term_weights(LogdetEstimator(method="series", n_terms=5))) == 5


@pytest.mark.parametrize("m", [0, 1, 3, 7])
def test_survival_functions(m):
    assert survival("poisson", m, lam=2.0) == pytest.approx(scipy.stats.poisson.sf(m - 1, 2.0), rel=1e-12)
    assert survival("geometric", m, p=0.3) == pytest.approx(0.7**m)


@pytest.mark.parametrize("lam,m", [(2.0, 25), (2.0, 40), (800.0, 200), (800.0, 900), (1000.0, 2000), (1e-3, 3),
                                   (0.5, 60)])
def test_survival_is_accurate_at_any_rate(lam, m):
    """``P(N >= m)`` against 100-digit arithmetic where ``1 - cdf`` cancels to 0 (lam 2, m >= 25: the old
    sum gave 1e-300, a weight of 1e300) or ``lam^i / i!`` overflows (lam 800, m >= 200: OverflowError)."""
    mpmath = pytest.importorskip("mpmath")
    with mpmath.workdps(100):
        truth = float(mpmath.gammainc(m, 0, lam, regularized=True))  # P(N >= m) = P(Gamma(m) <= lam)
    assert survival("poisson", m, lam=lam) == pytest.approx(truth, rel=1e-10)
    assert survival("geometric", m, p=1e-3) == pytest.approx(math.exp(m * math.log1p(-1e-3)), rel=1e-12)


def test_roulette_weights_are_finite_for_large_rates():
    torch.manual_seed(0)
    weights = term_weights(LogdetEstimator(lam=800.0, n_exact=2))  # lam^i / i! overflowed before
    assert 700 < len(weights) < 900 and all(math.isfinite(w) for w in weights)
    # The weights are (-1)^(k+1) / k / P(N >= k - n_exact): near 1 / k for k well below lam.
    assert weights[:3] == pytest.approx([1.0, -0.5, 1 / 3]) and abs(weights[-1]) > 1 / len(weights)


def test_roulette_draws_are_capped_at_max_terms():
    """A draw adds at most ``max_terms`` terms (geometric(0.2) exceeds 5 with probability 0.8^6 = 0.26):
    the cap binds, and only there."""
    est = LogdetEstimator(dist="geometric", p=0.2, n_exact=2, max_terms=5)
    torch.manual_seed(0)
    lengths = [len(term_weights(est)) for _ in range(300)]
    assert max(lengths) == 2 + 5 and lengths.count(7) > 50 and min(lengths) == 2
    uncapped = LogdetEstimator(dist="geometric", p=0.2, n_exact=2, max_terms=1000)
    torch.manual_seed(0)
    assert max(len(term_weights(uncapped)) for _ in range(300)) > 7


def test_capped_roulette_is_unbiased_for_the_series_up_to_the_cap(setup):
    """The documented bias of the cap: with ``K = n_exact + max_terms`` the estimator's mean is the
    series truncated after K terms (here K = 1: the trace of the exact Jacobian), not the log-det."""
    g, x, exact = setup
    xg = x.clone().requires_grad_(True)
    flat = g(xg).reshape(-1)
    jac = torch.stack([torch.autograd.grad(flat[i], xg, retain_graph=True)[0].reshape(-1) for i in range(32)])
    series1 = float(torch.trace(jac))
    est = LogdetEstimator(method="roulette", dist="geometric", p=0.5, n_exact=0, max_terms=1)
    draws = _draws(g, x, est, calls=400, batch=8)
    assert _within(draws, series1)[0] and not _within(draws, exact)[0], (float(draws.mean()), series1, exact)


@pytest.mark.parametrize("grad", ["neumann", "backprop", "memory_efficient"])
def test_a_draw_of_no_terms_estimates_zero(setup, grad):
    """``n_exact=0`` and a draw of N = 0 (lam = 1e-9: always): log-det 0, no IndexError, and the block
    output and its gradient are still there."""
    g, x, _ = setup
    est = LogdetEstimator(method="roulette", n_exact=0, n_exact_eval=0, lam=1e-9, grad=grad)
    xs = x.expand(2, *SHAPE).clone().requires_grad_(True)
    gx, ld = logdet_estimate(g, xs, est)
    assert torch.equal(ld, torch.zeros(2, dtype=torch.float64))
    (gx.sum() + ld.sum()).backward()
    assert xs.grad is not None and bool(torch.isfinite(xs.grad).all())
    with torch.no_grad():
        _, ld_eval = logdet_estimate(g, x, est, training=False)
    assert torch.equal(ld_eval, torch.zeros(1, dtype=torch.float64))


def _grad_draws(g, x, est, calls, batch):
    params = [p for p in g.parameters() if p.requires_grad]
    out = []
    for _ in range(calls):
        xs = x.expand(batch, *SHAPE).clone().requires_grad_(True)
        _, ld = logdet_estimate(g, xs, est)
        grads = torch.autograd.grad(ld.sum() / batch, [xs, *params], allow_unused=True)
        grads = [torch.zeros_like(p) if gr is None else gr for gr, p in zip(grads, [xs, *params])]
        grads[0] = grads[0].sum(0)
        out.append(torch.cat([gr.reshape(-1) for gr in grads]))
    return torch.stack(out)


def _exact_grad(g, x):
    params = [p for p in g.parameters() if p.requires_grad]
    xg = x.clone().requires_grad_(True)
    _, ld = exact_logdet(g, xg, create_graph=True)
    grads = torch.autograd.grad(ld.sum(), [xg, *params], allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if gr is None else gr).reshape(-1) for gr, p in zip(grads, [xg, *params])])


def _grad_within(draws, exact):
    """||mean - exact|| <= 3 sqrt(sum SE^2): under no bias E||mean - exact||^2 = sum SE^2."""
    se2 = (draws.var(0) / draws.shape[0]).sum()
    return float((draws.mean(0) - exact).norm()) <= 3.0 * float(se2.sqrt())


@pytest.mark.parametrize("grad", ["neumann", "backprop"])
def test_gradient_matches_exact_logdet_gradient(setup, grad):
    g, x, _ = setup
    exact = _exact_grad(g, x)
    est = LogdetEstimator(method="roulette", grad=grad, n_exact=2, lam=2.0)
    draws = _grad_draws(g, x, est, calls=60, batch=16)
    assert _grad_within(draws, exact)
    # Power check: a truncated 1-term gradient is rejected by the same criterion.
    biased = _grad_draws(g, x, LogdetEstimator(method="series", n_terms=1, grad="neumann"), calls=60, batch=16)
    assert not _grad_within(biased, exact)


def test_memory_efficient_equals_neumann(setup):
    """Backprop-in-forward gives the same values and gradients as the Neumann estimator (same draws),
    including the gradient of the block output through g."""
    g, x, _ = setup
    params = [p for p in g.parameters() if p.requires_grad]
    results = []
    for grad in ("neumann", "memory_efficient"):
        torch.manual_seed(11)
        xs = (x.expand(4, *SHAPE) + 0.1 * torch.randn(4, *SHAPE, dtype=torch.float64)).requires_grad_(True)
        gx, ld = logdet_estimate(g, xs, LogdetEstimator(method="roulette", grad=grad))
        loss = ld.mean() + (gx**2).mean()
        results.append([ld.detach(), *torch.autograd.grad(loss, [xs, *params], allow_unused=True)])
    for a, b in zip(*results):
        if a is None or b is None:
            assert a is None or b is None or float(a.abs().max()) == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("grad", ["neumann", "memory_efficient"])
@pytest.mark.parametrize("n_terms", [1, 2, 5])
def test_neumann_value_is_the_series_in_k_vjps(setup, grad, n_terms):
    """With a gradient, a draw of K terms costs K VJPs (K - 1 for the Neumann vector, one for the
    surrogate, whose value gives the last term) and its value is the series' (float64, same probe)."""
    g, x, _ = setup
    xs = (x.expand(3, *SHAPE) + 0.1 * torch.randn(3, *SHAPE, dtype=torch.float64)).requires_grad_(True)
    est = LogdetEstimator(method="series", n_terms=n_terms, grad=grad)
    calls = []
    real_grad = torch.autograd.grad
    with mock.patch("torch.autograd.grad", lambda *a, **k: calls.append(1) or real_grad(*a, **k)):
        torch.manual_seed(3)
        _, ld = logdet_estimate(g, xs, est)
    assert len(calls) == n_terms + (grad == "memory_efficient")  # backprop-in-forward: one more, the gradient
    torch.manual_seed(3)
    with torch.no_grad():
        _, series = logdet_estimate(g, xs, est)  # every term a VJP of its own
    torch.testing.assert_close(ld.detach(), series, rtol=1e-10, atol=1e-10)
    assert float(series.abs().min()) > 0.1  # the terms are sizeable: a missing one would show


def test_memory_efficient_needs_uniform_upstream_gradient(setup):
    g, x, _ = setup
    xs = x.expand(3, *SHAPE).clone().requires_grad_(True)
    _, ld = logdet_estimate(g, xs, LogdetEstimator(method="roulette", grad="memory_efficient"))
    with pytest.raises(RuntimeError, match="same upstream gradient"):
        (ld * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()


def test_no_graph_in_evaluation(setup):
    g, x, _ = setup
    with torch.no_grad():
        gx, ld = logdet_estimate(g, x, LogdetEstimator(method="roulette"), training=False)
    assert not gx.requires_grad and not ld.requires_grad


@pytest.mark.parametrize("kwargs,match", [
    ({"method": "taylor"}, "method must be one of"),
    ({"dist": "binomial"}, "dist must be"),
    ({"probe": "sphere"}, "probe must be"),
    ({"grad": "adjoint"}, "grad must be one of"),
    ({"n_terms": 0}, "n_terms must be >= 1"),
    ({"n_probes": 0}, "n_probes must be >= 1"),
    ({"p": 1.0}, r"p must be in \(0.0, 1.0\)"),
    ({"lam": float("inf")}, "lam must be finite"),
    ({"lam": 0.0}, r"lam must be in \(0.0, inf\)"),
    ({"n_exact": -1}, "n_exact must be >= 0"),
    ({"n_exact": 2.5}, "n_exact must be an integer, got 2.5"),
    ({"n_exact_eval": True}, "n_exact_eval must be an integer, got True"),
    ({"max_exact_dim": "big"}, "max_exact_dim must be an integer"),
    ({"max_terms": 0}, "max_terms must be >= 1"),
    ({"max_terms": 10**6}, r"max_terms must be in \[1, 100000\]"),
    ({"lam": 5000.0}, r"lam=5000 draws 5000 terms on average, more than max_terms=1000 .* lam must be in \(0, 1000\]"),
    ({"lam": 50.0, "max_terms": 10}, r"lam=50 draws .* lam must be in \(0, 10\] \(or raise max_terms\)"),
    ({"dist": "geometric", "p": 1e-9}, r"p=1e-09 draws \(1 - p\) / p = 1e\+09 terms on average, more than "
                                       r"max_terms=1000 .* p must be in \[0.000999, 1\)"),
])
def test_bad_config(kwargs, match):
    """Every setting is checked at construction (not later, as an IndexError or TypeError in use)."""
    with pytest.raises((TypeError, ValueError), match=f"LogdetEstimator: {match}"):
        LogdetEstimator(**kwargs)


def test_exact_refuses_large_inputs():
    with pytest.raises(ValueError, match="meant for small inputs"):
        exact_logdet(lambda t: t, torch.randn(1, 5000, requires_grad=True), max_dim=4096)


def test_exact_logdet_of_a_non_finite_jacobian_is_nan_per_sample():
    """A sample whose Jacobian holds NaN gets a NaN log-det (LAPACK is never handed NaN: its LU can
    hang on it); the other samples keep theirs."""
    def g(t):
        return 0.3 * torch.tanh(t) * torch.sigmoid(t.sum(1, keepdim=True))

    x = torch.tensor([[0.1, 0.2, 0.3], [float("nan"), 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    _, logdet = exact_logdet(g, x)
    _, alone = exact_logdet(g, x[:1].detach().requires_grad_(True))
    assert math.isnan(float(logdet[1]))
    torch.testing.assert_close(logdet[0], alone[0])
