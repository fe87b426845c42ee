"""acf.ops (compiled extension acf._C) against the pure-PyTorch references."""
import os
import sys
import warnings

import pytest
import torch

import acf
from acf import _ext
from acf.ops.backends import backend_info, format_backend_info
from acf.ops.fixed_point import fixed_point_solve
from acf.ops.power_iteration import spectral_norms
from acf.layers.block import ContractiveBlock
from acf.layers.branches import resflow_branch
from acf.ops.fixed_point import ConvergenceError, FixedPointInfo
from acf.ops.fixed_point import fixed_point_solve_reference as reference_solve
from acf.ops.power_iteration import power_iteration
from acf.layers.spectral_norm import SpectralConv2d, SpectralLinear, refresh_spectral_norms

EXT = _ext.available()
needs_ext = pytest.mark.skipif(not EXT, reason="acf._C not built")
BACKENDS = ["extension", "reference"] if EXT else ["reference"]


def test_extension_built():
    """CI installs with the extension: a silent fallback there would hide a broken build."""
    if os.environ.get("ACF_NO_EXTENSION") == "1" or os.environ.get("ACF_DISABLE_EXTENSION") == "1":
        pytest.skip("extension switched off on purpose")
    assert EXT, f"acf._C did not load: {_ext.error()}"


def test_loader_warns_once(monkeypatch):
    monkeypatch.delenv("ACF_DISABLE_EXTENSION", raising=False)
    monkeypatch.setattr(_ext, "_tried", False)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setitem(sys.modules, "acf._C", None)  # makes `from . import _C` fail
    with pytest.warns(RuntimeWarning, match="acf._C is not available") as rec:
        assert _ext.load() is None
        assert _ext.load() is None
        assert not _ext.available()
    assert len(rec) == 1


# --------------------------------------------------------------------------- spectral norms

SHAPES = [(1, 1), (1, 7), (7, 1), (3, 5), (17, 13), (64, 64), (100, 37), (33, 130)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spectral_norms_match_matrix_norm(backend, dtype):
    ws = [torch.randn(*s, dtype=dtype) * (0.1 + i) for i, s in enumerate(SHAPES) for _ in range(2)]
    tol = 1e-10 if dtype == torch.float64 else 1e-7
    sig = spectral_norms(ws, tol=tol, max_iter=5000, backend=backend)
    ref = torch.stack([torch.linalg.matrix_norm(w.double(), 2) for w in ws]).to(dtype)
    assert sig.shape == (len(ws),) and sig.dtype == dtype
    torch.testing.assert_close(sig, ref, rtol=1e-4, atol=0)


@needs_ext
@pytest.mark.parametrize("strategy", ["per_operator", "batched"])
@pytest.mark.parametrize("mode", [{"n_iter": 0}, {"n_iter": 7}, {"tol": 1e-5}, {"tol": 1e-9}])
def test_spectral_norms_extension_equals_reference(mode, strategy):
    ws = [torch.randn(*s, dtype=torch.float64) for s in SHAPES + [(17, 13), (17, 13)]]
    us = [torch.randn(w.shape[0], dtype=torch.float64) for w in ws]
    vs = [torch.randn(w.shape[1], dtype=torch.float64) for w in ws]
    out = {}
    for backend in ("extension", "reference"):
        u2, v2 = [u.clone() for u in us], [v.clone() for v in vs]
        kw = {"strategy": strategy} if backend == "extension" else {}
        s, steps = spectral_norms(ws, us=u2, vs=v2, return_steps=True, max_iter=3000, backend=backend, **mode, **kw)
        out[backend] = (s, steps, u2, v2)
    (s1, st1, u1, v1), (s2, st2, u2, v2) = out["extension"], out["reference"]
    assert torch.equal(st1, st2)
    torch.testing.assert_close(s1, s2, rtol=1e-12, atol=1e-12)
    for a, b in zip(u1 + v1, u2 + v2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_operator_norms(backend):
    """kxk kernels: the norm of the 'same' convolution operator at the input size (a dense check)."""
    cases = [(3, 4, 3, (5, 6)), (3, 4, 3, (5, 6)), (2, 5, 5, (4, 4)), (6, 2, 3, (7, 3)), (4, 4, 1, (1, 1))]
    ws, us, vs, dense = [], [], [], []
    for cout, cin, k, (h, w) in cases:
        wt = torch.randn(cout, cin, k, k, dtype=torch.float64)
        ws.append(wt)
        us.append(torch.randn(1, cout, h, w, dtype=torch.float64))
        vs.append(torch.randn(1, cin, h, w, dtype=torch.float64))
        eye = torch.eye(cin * h * w, dtype=torch.float64).reshape(-1, cin, h, w)
        mat = torch.nn.functional.conv2d(eye, wt, padding=k // 2).reshape(cin * h * w, -1).t()
        dense.append(torch.linalg.matrix_norm(mat, 2))
    sig = spectral_norms(ws, tol=1e-12, max_iter=20000, us=us, vs=vs, backend=backend)
    torch.testing.assert_close(sig, torch.stack(dense), rtol=1e-4, atol=0)


@needs_ext
@pytest.mark.parametrize("strategy", ["per_operator", "batched"])
@pytest.mark.parametrize("mode", [{"n_iter": 3}, {"tol": 1e-4}])
def test_conv_extension_equals_reference_power_iteration(mode, strategy):
    """Same steps as acf.layers.spectral_norm.power_iteration on a layer's own _op/_op_t."""
    layers = [SpectralConv2d(3, 8, 3, (6, 5)), SpectralConv2d(3, 8, 3, (6, 5)), SpectralConv2d(8, 3, 3, (6, 5)),
              SpectralConv2d(8, 8, 1, (6, 5))]
    for layer in layers:
        layer.double()
    ref = []
    for layer in layers:
        s, u, v, k = power_iteration(layer._op, layer._op_t, layer.v.clone(), max_iter=500, **mode)
        ref.append((s, u, v, k))
    us, vs = [layer.u.clone() for layer in layers], [layer.v.clone() for layer in layers]
    sig, steps = spectral_norms([layer.weight for layer in layers], us=us, vs=vs, max_iter=500,
                                    return_steps=True, backend="extension", strategy=strategy, **mode)
    for i, (s, u, v, k) in enumerate(ref):
        assert int(steps[i]) == k
        torch.testing.assert_close(sig[i], s, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(us[i], u.view_as(us[i]), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(vs[i], v.view_as(vs[i]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refresh_spectral_norms_equals_layer_refresh(backend):
    model = torch.nn.Sequential(resflow_branch(4, (6, 6), hidden=16), resflow_branch(4, (6, 6), hidden=16),
                                SpectralLinear(10, 7))
    twin = torch.nn.Sequential(resflow_branch(4, (6, 6), hidden=16), resflow_branch(4, (6, 6), hidden=16),
                               SpectralLinear(10, 7))
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
        for p in twin.parameters():
            p.mul_(1.5)
    sig = refresh_spectral_norms(model, n_iter=4, backend=backend)
    layers = [m for m in twin.modules() if hasattr(m, "refresh") and hasattr(m, "u")]
    for m in layers:
        m.refresh(n_iter=4)
    assert sig.shape == (len(layers),)
    for a, b in zip(model.buffers(), twin.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sig.float(), torch.stack([m.sigma() for m in layers]).detach(), rtol=1e-4, atol=1e-5)


def test_spectral_norms_bad_input():
    w = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"weights\[1\] is not contiguous"):
        spectral_norms([w, torch.randn(5, 4).t()])
    with pytest.raises(TypeError, match=r"weights\[1\] has dtype torch.float64"):
        spectral_norms([w, w.double()])
    with pytest.raises(ValueError, match="mixed devices"):
        spectral_norms([w, torch.empty(4, 5, device="meta")])
    with pytest.raises(ValueError, match=r"us\[0\] is not contiguous"):
        spectral_norms([w], us=[torch.randn(8)[::2]], vs=[torch.randn(5)])
    with pytest.raises(TypeError, match=r"vs\[0\] has dtype"):
        spectral_norms([w], us=[torch.randn(4)], vs=[torch.randn(5, dtype=torch.float64)])
    with pytest.raises(ValueError, match="input_hws"):
        spectral_norms([torch.randn(3, 3, 3, 3)])
    with pytest.raises(ValueError, match="not both"):
        spectral_norms([w], n_iter=2, tol=1e-3)
    with pytest.raises(ValueError, match="n_iter"):
        spectral_norms([w], n_iter=-1)
    with pytest.raises(ValueError, match="backend"):
        spectral_norms([w], backend="fast")
    if EXT:
        with pytest.raises(RuntimeError, match="float16"):
            spectral_norms([w.half()], backend="extension")
        with pytest.raises(RuntimeError, match=r"weights\[1\] is not contiguous"):
            torch.ops.acf.power_iteration([w, torch.randn(5, 4).t()], [torch.randn(4)] * 2, [torch.randn(5)] * 2,
                                          1, 0.0, 10, 1, 2)


# --------------------------------------------------------------------------- fixed point

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


@needs_ext
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


@needs_ext
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


def test_backend_info():
    info = backend_info()
    for key in ("acf", "torch", "python", "device", "extension", "triton", "backends"):
        assert key in info
    assert info["extension"]["loaded"] == EXT
    text = format_backend_info(info)
    assert "extension" in text and info["torch"] in text
    if not torch.cuda.is_available():  # what auto runs on CPU: acf._C's kernels when they are built
        assert info["backends"]["l2_attention"].startswith("extension" if EXT else "reference")


# --------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
def test_gpu_spectral_norms_match_cpu():
    ws = [torch.randn(*s, dtype=torch.float64) for s in SHAPES]
    us = [torch.randn(w.shape[0], dtype=torch.float64) for w in ws]
    vs = [torch.randn(w.shape[1], dtype=torch.float64) for w in ws]
    cpu = spectral_norms(ws, n_iter=20, us=[u.clone() for u in us], vs=[v.clone() for v in vs])
    gpu = spectral_norms([w.cuda() for w in ws], n_iter=20, us=[u.cuda() for u in us],
                             vs=[v.cuda() for v in vs])
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-9, atol=1e-12)
    ref = torch.stack([torch.linalg.matrix_norm(w, 2) for w in ws])
    torch.testing.assert_close(spectral_norms([w.cuda() for w in ws], tol=1e-10, max_iter=5000).cpu(), ref,
                               rtol=1e-4, atol=0)


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
