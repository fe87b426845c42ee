"""Fused (Triton), SDPA and reference L2 attention against a float64 reference.

Without CUDA the Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here
before Triton is imported), fp32/fp64 only and N <= 256: the interpreter is slow and mishandles
bf16 dots. Tests marked ``gpu`` compile the same kernels and add bf16/fp16, TF32 and large N.

Tolerance rule (issue 4): see ``tests/attention_rule.py``.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from acf.ops import l2_attention as F  # noqa: E402
from acf.layers.attention import L2MultiheadAttention, set_attention_backend  # noqa: E402
from acf.ops.l2_attention import l2_attention, l2_attention_reference, l2_attention_triton  # noqa: E402
import acf.kernels.l2_attention as K  # noqa: E402
import attention_rule as R  # noqa: E402
from attention_rule import check_rule, first_and_second  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    DEV == "cpu" and not K.interpreting(),
    reason="no CUDA and TRITON_INTERPRET was set to 0 before this module was imported",
)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def rand_inputs(*args, device=DEV, **kwargs):
    return R.rand_inputs(*args, device=device, **kwargs)


def compare_all(*args, **kwargs):
    return R.compare_all(*args, device=DEV, **kwargs)


def triton_fn(precision="ieee"):
    return lambda q, v, s: l2_attention_triton(q, v, s, precision=precision)


# ----------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU, compiled on CUDA)
# ----------------------------------------------------------------------------------------------

SHAPES = [  # (B, H, N, d, e): odd N, several head dims, e != d, B*H <= 4
    (1, 1, 1, 16, 16),
    (2, 2, 17, 4, 4),
    (1, 3, 100, 32, 20),
    (2, 1, 255, 16, 16),
    (1, 2, 64, 64, 8),
    (1, 1, 37, 128, 128),
]


@needs_kernels
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_fp64_reference(shape):
    compare_all(*shape, torch.float32, triton_fn("ieee"))


@needs_kernels
def test_triton_multi_tile_small_blocks(monkeypatch):
    """Tiles of 16 so that N = 50 crosses four tiles with a ragged last one (interpreter)."""
    monkeypatch.setattr(K, "INTERPRET_BLOCK", 16)
    compare_all(1, 2, 50, 8, 12, torch.float32, triton_fn("ieee"))


@needs_kernels
def test_triton_large_logits():
    """Spread-out queries (|q|^2 ~ 100): the online softmax must rescale without overflow."""
    compare_all(1, 2, 70, 16, 16, torch.float32, triton_fn("ieee"), spread=3.0)


@needs_kernels
@pytest.mark.parametrize("n,fast", [(4, False), (19, True)])
def test_triton_gradcheck_fp64(monkeypatch, n, fast):
    """fp64 gradcheck and gradgradcheck of the fused path (the interpreter computes fp64 dots
    exactly in fp64). Full Jacobians for a tiny case; for N = 19 over two 16-wide tiles, the
    fast mode (random projections of the Jacobian): the interpreter makes full mode take minutes."""
    monkeypatch.setattr(K, "INTERPRET_BLOCK", 16)
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(1, 2, n, 3, dtype=torch.float64, generator=gen).to(DEV).requires_grad_()
    v = torch.randn(1, 2, n, 2, dtype=torch.float64, generator=gen).to(DEV).requires_grad_()
    fn = lambda q, v: l2_attention_triton(q, v, 0.7)
    opts = dict(eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)
    assert torch.autograd.gradcheck(fn, (q, v), **opts)
    assert torch.autograd.gradgradcheck(fn, (q, v), **opts)


@needs_kernels
def test_triton_strided_inputs_and_expanded_grad():
    """(B, N, H, d) memory viewed as (B, H, N, d); the grad of .sum() has zero strides."""
    B, H, N, D = 2, 2, 33, 8
    q = torch.randn(B, N, H, D, dtype=torch.float64, device=DEV).transpose(1, 2).requires_grad_()
    v = torch.randn(B, N, H, 6, dtype=torch.float64, device=DEV).transpose(1, 2).requires_grad_()
    assert not q.is_contiguous()
    o = l2_attention_triton(q, v, 0.25)  # exact in fp32 (the kernel applies scale in fp32)
    dq, dv = torch.autograd.grad(o.sum(), (q, v))
    q64, v64 = q.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    o64 = l2_attention_reference(q64, v64, 0.25)
    rq, rv = torch.autograd.grad(o64.sum(), (q64, v64))
    for a, b in ((o, o64), (dq, rq), (dv, rv)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def layer_layout_check(device: str) -> None:
    """The attention layer hands the kernels column-major heads (transposed views of (d, N) blocks):
    output, input gradient and a second derivative match the reference backend."""
    torch.manual_seed(0)
    layer = L2MultiheadAttention(8, heads=2).double().to(device)
    with torch.no_grad():
        layer.gamma.fill_(0.5)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, device=device, requires_grad=True)
    got = {}
    for backend in ("triton", "reference"):
        set_attention_backend(layer, backend)
        y = layer(x)
        (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
        (hx,) = torch.autograd.grad(gx.pow(2).sum(), x)
        got[backend] = (y, gx, hx)
    for a, b in zip(got["triton"], got["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@needs_kernels
def test_layer_column_major_heads_on_triton():
    layer_layout_check(DEV)


@needs_kernels
def test_triton_third_order_raises():
    q = torch.randn(1, 1, 9, 4, dtype=torch.float64, device=DEV, requires_grad=True)
    v = torch.randn(1, 1, 9, 4, dtype=torch.float64, device=DEV, requires_grad=True)
    (dq,) = torch.autograd.grad(l2_attention_triton(q, v).sum(), q, create_graph=True)
    (hq,) = torch.autograd.grad(dq.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        torch.autograd.grad(hq.sum(), q)


@needs_kernels
def test_tolerance_rule_can_fail():
    """The rule rejects a subtly wrong kernel: the right math with the scale off by 1%."""
    q, v, *_ = rand_inputs(1, 2, 40, 8, 8, torch.float32)
    ex = l2_attention_reference(q.double(), v.double(), 0.35)
    ref = l2_attention_reference(q, v, 0.35)
    wrong = l2_attention_triton(q, v, 0.35 * 1.01, precision="ieee")
    with pytest.raises(AssertionError):
        check_rule("wrong", wrong, ref, ex)
    check_rule("right", l2_attention_triton(q, v, 0.35, precision="ieee"), ref, ex)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@needs_kernels
def test_triton_bad_inputs(monkeypatch):
    q = torch.randn(1, 2, 5, 4, device=DEV)
    v = torch.randn(1, 2, 5, 4, device=DEV)
    with pytest.raises(ValueError, match="q must be"):
        l2_attention_triton(q[0], v)
    with pytest.raises(TypeError, match="dtype"):
        l2_attention_triton(q.int(), v)
    with pytest.raises(TypeError, match="share a dtype"):
        l2_attention_triton(q, v.double())
    with pytest.raises(ValueError, match="agree"):
        l2_attention_triton(q, v[:, :, :3])
    with pytest.raises(ValueError, match="head dims up to 128"):
        l2_attention_triton(torch.randn(1, 1, 5, 129, device=DEV), torch.randn(1, 1, 5, 4, device=DEV))
    with pytest.raises(ValueError, match="precision"):
        l2_attention_triton(q, v, precision="fast")
    if DEV == "cpu":
        monkeypatch.setattr(K, "interpreting", lambda: False)
        with pytest.raises(ValueError, match="needs CUDA"):
            l2_attention_triton(q, v)


def test_functional_bad_inputs():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="l2_attention: backend must be one of .* got 'cuda' \\(the backends are"):
        l2_attention(q, q, backend="cuda")
    with pytest.raises(ValueError, match="4 dimensions"):
        l2_attention(q[0], q[0])
    with pytest.raises(TypeError, match="share a dtype"):
        l2_attention(q, q.double())


# ----------------------------------------------------------------------------------------------
# SDPA backend and dispatch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 1, 1, 4, 4), (2, 2, 17, 5, 3), (1, 2, 100, 32, 16)])
def test_sdpa_matches_reference(shape):
    B, H, N, D, E = shape
    q, v, g, _, _ = rand_inputs(B, H, N, D, E, torch.float64, device="cpu")
    q.requires_grad_()
    v.requires_grad_()
    o = l2_attention(q, v, backend="sdpa")
    dq, dv = torch.autograd.grad(o, (q, v), g)
    o64 = l2_attention(q, v, backend="reference")
    rq, rv = torch.autograd.grad(o64, (q, v), g)
    for a, b in ((o, o64), (dq, rq), (dv, rv)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    # fp32 obeys the same rule as the kernel
    q32, v32 = q.detach().float(), v.detach().float()
    check_rule("sdpa fp32", l2_attention(q32, v32, backend="sdpa"), l2_attention_reference(q32, v32, D ** -0.5), o64)


def test_sdpa_gradcheck_and_no_double_backward():
    q = torch.randn(1, 2, 7, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 7, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, v: l2_attention(q, v, backend="sdpa"), (q, v))
    o = l2_attention(q, v, backend="sdpa")
    with pytest.raises(RuntimeError, match="first-order only"):
        torch.autograd.grad(o.sum(), q, create_graph=True)


def test_auto_dispatch(monkeypatch):
    q = torch.randn(1, 1, 6, 4)
    assert F._auto_backend(q, q) == ("extension" if F.cpu_kernels_available() else "reference")
    assert F._auto_backend(q.half(), q.half()) == "reference"  # no half-precision CPU kernels
    monkeypatch.setattr(F, "cpu_kernels_available", lambda: False)
    assert F._auto_backend(q, q) == "reference"
    called = []
    monkeypatch.setitem(F._BACKENDS, "reference", lambda q, v, s: called.append(s) or v)
    l2_attention(q, q, backend="auto")
    assert called == [pytest.approx(0.5)]


def test_auto_rule_on_cuda_like(monkeypatch):
    """The CUDA branch of the rule without a GPU: fake is_cuda through a stand-in object."""

    class Fake:
        is_cuda = True
        device = torch.device("cuda")
        dtype = torch.float32

        def __init__(self, d):
            self.shape = (1, 1, 4, d)

    monkeypatch.setattr(F, "triton_available", lambda: True)
    assert F._auto_backend(Fake(64), Fake(64)) == "triton"
    assert F._auto_backend(Fake(64), Fake(256)) == "reference"
    monkeypatch.setattr(F, "triton_available", lambda: False)
    assert F._auto_backend(Fake(64), Fake(64)) == "reference"


@needs_kernels
def test_functional_triton_backend():
    q, v, *_ = rand_inputs(1, 2, 23, 8, 8, torch.float64)
    torch.testing.assert_close(l2_attention(q, v, backend="triton"), l2_attention_reference(q, v, 8 ** -0.5))


# ----------------------------------------------------------------------------------------------
# GPU: compiled kernels, half precision, TF32, large N
# ----------------------------------------------------------------------------------------------

GPU_SHAPES = SHAPES + [(2, 2, 1000, 32, 32), (1, 2, 513, 16, 16), (1, 1, 300, 128, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_matches_fp64_reference(shape, dtype):
    compare_all(*shape, dtype, triton_fn("ieee"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_large_n(dtype):
    compare_all(1, 2, 4096, 32, 32, dtype, triton_fn("ieee"))


@pytest.mark.gpu
def test_gpu_tf32(monkeypatch):
    """TF32 kernel against the TF32 PyTorch reference (both with TF32 matmuls)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    compare_all(2, 2, 1000, 32, 32, torch.float32, triton_fn("tf32"))


@pytest.mark.gpu
def test_gpu_layer_column_major_heads():
    layer_layout_check("cuda")


@pytest.mark.gpu
def test_gpu_gradcheck_fp64():
    q = torch.randn(1, 2, 70, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    v = torch.randn(1, 2, 70, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    fn = lambda q, v: l2_attention_triton(q, v, 0.6)
    assert torch.autograd.gradcheck(fn, (q, v), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(fn, (q, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_auto_is_triton_and_sdpa_matches():
    q, v, *_ = rand_inputs(2, 2, 257, 32, 32, torch.float32, device="cuda")
    assert F._auto_backend(q, v) == "triton"
    ex = l2_attention_reference(q.double(), v.double(), 32 ** -0.5)
    check_rule("sdpa cuda fp32", l2_attention(q, v, backend="sdpa"), l2_attention_reference(q, v, 32 ** -0.5), ex, factor=4.0)
