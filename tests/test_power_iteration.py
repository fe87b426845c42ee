"""power_iteration (``spectral_norms``, acf.ops.power_iteration): the extension ``acf._C`` against
the pure-PyTorch reference and dense matrix norms; the layers' refresh; CUDA-marked tests."""
import pytest
import torch

from acf import _ext
from acf.layers.branches import resflow_branch
from acf.layers.spectral_norm import SpectralConv2d, SpectralLinear, refresh_spectral_norms
from acf.ops.power_iteration import power_iteration, spectral_norms

EXT = _ext.available()
BACKENDS = ["extension", "reference"] if EXT else ["reference"]

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


@pytest.mark.needs_ext
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


@pytest.mark.needs_ext
@pytest.mark.parametrize("strategy", ["per_operator", "batched"])
@pytest.mark.parametrize("mode", [{"n_iter": 3}, {"tol": 1e-4}])
def test_conv_extension_equals_reference_power_iteration(mode, strategy):
    """Same steps as acf.ops.power_iteration.power_iteration on a layer's own _op/_op_t."""
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
