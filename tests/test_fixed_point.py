"""fixed_point_solve (acf.ops.fixed_point): Banach and Anderson, the extension ``acf._C`` against the
pure-PyTorch step and the reference solve (``fixed_point_solve_reference``), non-convergence,
bad input, CUDA-marked tests."""
import pytest
import torch

from acf import _ext
from acf.layers.block import ContractiveBlock
from acf.layers.branches import resflow_branch
from acf.ops.fixed_point import ConvergenceError, FixedPointInfo, fixed_point_solve
from acf.ops.fixed_point import fixed_point_solve_reference as reference_solve

EXT = _ext.available()
BACKENDS = ["extension", "reference"] if EXT else ["reference"]


def _linear_contraction(d, lip, dtype=torch.float64, spread=True):
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    ev = torch.linspace(-lip, lip, d, dtype=torch.float64) if spread else torch.full((d,), lip, dtype=torch.float64)
    a = (q * ev) @ q.t()
    return a.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["banach", "anderson"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fixed_point_random_contractions(backend, method, dtype):
    for shape, lip in [((5, 31), 0.9), ((3, 2, 4, 5), 0.97), ((1, 7), 0.5)]:
        d = 1
        for s in shape[1:]:
            d *= s
        a = _linear_contraction(d, lip, dtype)
        b = torch.randn(d, dtype=dtype) * 0.1

        def g(x):
            return torch.tanh(x.reshape(x.shape[0], -1) @ a.t() + b).reshape(x.shape)

        y = torch.randn(*shape, dtype=dtype) * 2
        tol = 1e-9 if dtype == torch.float64 else 1e-6
        x_ref, info_ref = reference_solve(g, y, tol=tol, max_iter=3000)
        x, info = fixed_point_solve(g, y, tol=tol, max_iter=3000, method=method, backend=backend)
        assert isinstance(info, FixedPointInfo) and info["g_evals"] == info.g_evals >= info.iterations
        assert bool(info.converged.all()) and info.residual.shape == (shape[0],)
        # both within ||r|| / (1 - L) of the true solution
        scale = y.flatten(1).abs().amax(1).clamp_min(1).max()
        bound = 2 * max(tol, 8 * torch.finfo(dtype).eps) * scale / (1 - lip) * d ** 0.5
        assert float((x - x_ref).abs().max()) <= bound
        # returned residuals are the true residuals of the returned x
        r = (x + g(x) - y).flatten(1).abs().amax(1)
        torch.testing.assert_close(info.residual, r, rtol=1e-5, atol=1e-12 if dtype == torch.float64 else 1e-6)
        if method == "banach":
            assert info.iterations == info_ref.iterations
            torch.testing.assert_close(x, x_ref, rtol=0, atol=0)


@pytest.mark.needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_anderson_extension_equals_torch_step(dtype):
    a = _linear_contraction(40, 0.95, dtype)
    y = torch.randn(6, 40, dtype=dtype)
    res = {}
    for backend in ("extension", "reference"):
        res[backend] = fixed_point_solve(lambda x: x @ a.t(), y, tol=1e-7, max_iter=400, method="anderson",
                                             memory=6, backend=backend)
    (x1, i1), (x2, i2) = res["extension"], res["reference"]
    assert abs(i1.iterations - i2.iterations) <= (0 if dtype == torch.float64 else 2)
    torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-9)


def test_anderson_needs_fewer_g_evals():
    a = _linear_contraction(200, 0.97)
    y = torch.randn(8, 200, dtype=torch.float64)
    _, ib = fixed_point_solve(lambda x: x @ a.t(), y, tol=1e-8, max_iter=3000, method="banach")
    _, ia = fixed_point_solve(lambda x: x @ a.t(), y, tol=1e-8, max_iter=3000, method="anderson", memory=10)
    assert ia.g_evals * 2 <= ib.g_evals


@pytest.mark.parametrize("method", ["banach", "anderson"])
def test_inverse_of_real_block(method):
    g = resflow_branch(3, (6, 6), hidden=24, coeff=0.97)
    block = ContractiveBlock(g).eval()
    with torch.no_grad():
        for p in g.parameters():  # trained-like: push every layer to its coefficient
            p.mul_(3.0)
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        y, _ = block(x)
        x_ref, _ = reference_solve(block.g, y, tol=1e-6, max_iter=1000)
        x_ops, info = fixed_point_solve(block.g, y, tol=1e-6, max_iter=1000, method=method)
    assert bool(info.converged.all())
    assert float((x_ops - x).abs().max()) <= 1e-4
    assert float((x_ops - x_ref).abs().max()) <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["banach", "anderson"])
def test_nonconvergence_is_reported(backend, method):
    a = _linear_contraction(20, 0.99)
    y = torch.randn(4, 20, dtype=torch.float64)
    y[2] = 0  # x = 0 solves this one at once
    with pytest.warns(RuntimeWarning, match="did not converge for 3 of 4"):
        x, info = fixed_point_solve(lambda x: x @ a.t(), y, max_iter=3, method=method, backend=backend)
    assert info.iterations == 3 and info.g_evals == 3
    assert info.converged.tolist() == [False, False, True, False]
    r = (x + x @ a.t() - y).abs().amax(1)
    torch.testing.assert_close(info.residual, r)
    with pytest.raises(ConvergenceError):
        fixed_point_solve(lambda x: x @ a.t(), y, max_iter=3, method=method, backend=backend, on_fail="raise")

    def g_nan(x):
        out = x * 0.5
        out[1] = float("nan")
        return out

    with pytest.warns(RuntimeWarning, match="samples \\[1\\]"):
        _, info = fixed_point_solve(g_nan, y, max_iter=50, method=method, backend=backend)
    assert info.converged.tolist() == [True, False, True, True]


def test_fixed_point_bad_input():
    y = torch.randn(3, 4)
    with pytest.raises(ValueError, match="max_iter"):
        fixed_point_solve(lambda x: 0.5 * x, y, max_iter=0)
    with pytest.raises(ValueError, match="g changed the shape"):
        fixed_point_solve(lambda x: x[:, :2], y)
    with pytest.raises(TypeError, match="g changed the dtype"):
        fixed_point_solve(lambda x: x.double(), y)
    with pytest.raises(ValueError, match="mixed devices"):
        fixed_point_solve(lambda x: torch.empty(x.shape, device="meta"), y)
    with pytest.raises(ValueError, match="method"):
        fixed_point_solve(lambda x: 0.5 * x, y, method="newton")
    with pytest.raises(ValueError, match="memory"):
        fixed_point_solve(lambda x: 0.5 * x, y, method="anderson", memory=0)
    with pytest.raises(ValueError, match="non-finite"):
        fixed_point_solve(lambda x: 0.5 * x, torch.full((2, 3), float("nan")))
    # a non-contiguous y is fine (copied); x is a fresh contiguous tensor
    yt = torch.randn(4, 3).t()
    x, info = fixed_point_solve(lambda x: 0.5 * x, yt)
    torch.testing.assert_close(x, yt / 1.5, rtol=1e-5, atol=1e-5)
    # half precision: the extension refuses when forced, auto falls back to the torch step
    yh = torch.randn(2, 3, dtype=torch.bfloat16)
    x, info = fixed_point_solve(lambda x: 0.5 * x, yh, tol=1e-2)
    assert bool(info.converged.all())
    if EXT:
        with pytest.raises(RuntimeError, match="bfloat16"):
            fixed_point_solve(lambda x: 0.5 * x, yh, backend="extension")


@pytest.mark.needs_ext
def test_extension_step_errors():
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    thr, res = torch.full((3,), 1e-6), torch.zeros(3)
    conv, cnt = torch.zeros(3, dtype=torch.bool), torch.zeros(1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="g\\(x\\) is not contiguous"):
        torch.ops.acf.banach_step(x, torch.randn(4, 3).t(), y, thr, conv, res, cnt, True)
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        torch.ops.acf.banach_step(x, y.double(), y, thr, conv, res, cnt, True)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.acf.banach_step(x, torch.randn(3, 5), y, thr, conv, res, cnt, True)
    xh = torch.zeros(3, 2, 4)
    with pytest.raises(RuntimeError, match="gram must be"):
        torch.ops.acf.anderson_step(x, y, y, thr, conv, res, cnt, xh, xh.clone(), torch.zeros(3, 2, 2), 0, 1,
                                    1e-10, 1.0, True)


# --------------------------------------------------------------------------- the reference solve

def test_reference_linear_contraction_matches_solve():
    """g(x) = A x with ||A|| = 0.95: the solution is (I + A)^{-1} y; per-sample convergence freezes samples."""
    torch.manual_seed(3)
    a = torch.randn(10, 10, dtype=torch.float64)
    a *= 0.95 / torch.linalg.matrix_norm(a, ord=2)
    y = torch.randn(5, 10, dtype=torch.float64)
    y[0] = 0  # converges at once
    x, info = reference_solve(lambda t: t @ a.t(), y, tol=1e-12, max_iter=2000)
    exact = torch.linalg.solve(torch.eye(10, dtype=torch.float64) + a, y.t()).t()
    assert bool(info.converged.all())
    assert float((x - exact).abs().max()) < 1e-10
    assert info.iterations < 2000


def test_reference_bad_input():
    g = lambda t: 0.5 * t  # noqa: E731
    with pytest.raises(ValueError, match="max_iter must be >= 1"):
        reference_solve(g, torch.randn(2, 3), max_iter=0)
    with pytest.raises(ValueError, match="non-finite"):
        reference_solve(g, torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="g changed the shape"):
        reference_solve(lambda t: t[:, :1], torch.randn(2, 3))
    with pytest.raises(ValueError, match="on_fail"):
        reference_solve(g, torch.randn(2, 3), on_fail="shout")


# --------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("method", ["banach", "anderson"])
def test_gpu_fixed_point(method):
    assert _ext.cuda_available(), "acf._C was built without CUDA kernels on a CUDA machine"
    a = _linear_contraction(300, 0.97, torch.float32).cuda()
    y = torch.randn(16, 300, device="cuda")
    x, info = fixed_point_solve(lambda x: torch.tanh(x @ a.t()), y, tol=1e-6, max_iter=2000, method=method,
                                    backend="extension")
    x_ref, _ = reference_solve(lambda x: torch.tanh(x @ a.t()), y, tol=1e-6, max_iter=2000)
    assert bool(info.converged.all())
    assert float((x - x_ref).abs().max()) <= 1e-4
    xc, ic = fixed_point_solve(lambda x: torch.tanh(x @ a.cpu().t()), y.cpu(), tol=1e-6, max_iter=2000,
                                   method=method)
    assert abs(ic.iterations - info.iterations) <= 2
    torch.testing.assert_close(x.cpu(), xc, rtol=1e-4, atol=1e-4)
