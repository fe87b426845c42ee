"""L2 attention (``acf.ops.l2_attention``): every backend against float64 references.

- reference: against an independent float64 computation (``torch.cdist``); gradients; bad input.
- extension: ``acf._C``'s CPU kernels. Skipped when the extension is not built (the library then
  falls back to the reference, see ``test_fallback_without_extension``).
- triton: the fused kernels (``kernels/l2_attention.py``). Without CUDA they run in Triton's CPU
  interpreter (``TRITON_INTERPRET=1``, set in conftest.py before Triton is imported), fp32/fp64 only and
  N <= 256: the interpreter is slow and mishandles bf16 dots. Skipped when Triton is not installed.
- sdpa and the ``auto`` dispatch.
- gpu (marked ``gpu``): the compiled Triton kernels with bf16/fp16, TF32 and large N.

The fused kernels (extension, Triton) and SDPA obey the tolerance rule of ``tests/attention_rule.py``:
output, VJP and double VJP within 2x the error of the same-precision PyTorch reference.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports Triton

from acf.layers.attention import L2MultiheadAttention, set_attention_backend  # noqa: E402
from acf.ops import l2_attention as F  # noqa: E402
from acf.ops.l2_attention import l2_attention, l2_attention_reference, l2_attention_triton  # noqa: E402
from attention_rule import check_rule, compare_all, first_and_second, rand_inputs  # noqa: E402

try:
    import acf.kernels.l2_attention as K  # imports Triton
except ImportError:  # no Triton: its tests skip, the others run
    K = None

DEV = "cuda" if torch.cuda.is_available() else "cpu"
if K is None:
    NO_KERNELS = "Triton is not installed"
elif DEV == "cpu" and not K.interpreting():
    NO_KERNELS = "no CUDA and TRITON_INTERPRET was set to 0 before this module was imported"
else:
    NO_KERNELS = ""
needs_kernels = pytest.mark.skipif(bool(NO_KERNELS), reason=NO_KERNELS)
# (B, H, N, d, e) of the fused kernels' tests: odd and non-power-of-two N, several head dims, e != d
KERNEL_SHAPES = [(2, 2, 17, 4, 4), (1, 3, 100, 32, 20), (2, 1, 255, 16, 16), (1, 2, 64, 64, 8), (1, 1, 37, 128, 128)]


# ----------------------------------------------------------------------------------------------
# Reference: an independent float64 computation, gradients, bad input
# ----------------------------------------------------------------------------------------------


REFERENCE_SHAPES = [(1, 1, 1, 4), (2, 3, 17, 8), (1, 2, 100, 16), (2, 1, 33, 5)]


def independent_l2_attention(q, v, scale):
    """Materialise P from pairwise squared distances (torch.cdist) in float64."""
    q, v = q.double(), v.double()
    dist2 = torch.cdist(q, q) ** 2
    p = torch.softmax(-scale * dist2, dim=-1)
    return p @ v


@pytest.mark.parametrize("shape", REFERENCE_SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_reference_matches_independent_fp64(shape, dtype, tol):
    q = torch.randn(shape, dtype=dtype)
    v = torch.randn(shape[:-1] + (shape[-1] + 3,), dtype=dtype)  # value dim may differ
    out = l2_attention(q, v)
    ref = independent_l2_attention(q, v, 1.0 / math.sqrt(shape[-1]))
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_reference_explicit_scale_and_large_logits():
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64) * 30  # logits in the thousands: softmax must stay stable
    v = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    out = l2_attention(q, v, scale=0.7)
    torch.testing.assert_close(out, independent_l2_attention(q, v, 0.7))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 2, 5, 3), (2, 1, 7, 2)])
def test_reference_gradcheck_and_gradgradcheck(shape):
    q = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    v = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: l2_attention(a, b), (q, v))
    assert torch.autograd.gradgradcheck(lambda a, b: l2_attention(a, b), (q, v))


@pytest.mark.parametrize(
    "q,v,err,match",
    [
        (torch.randn(2, 5, 4), torch.randn(2, 5, 4), ValueError, "q must have 4 dimensions"),
        (torch.randn(1, 1, 5, 4), torch.randn(1, 1, 6, 4), ValueError, "agree in"),
        (torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4).double(), TypeError, "share a dtype"),
        (torch.randint(0, 3, (1, 1, 5, 4)), torch.randn(1, 1, 5, 4), TypeError, "q has dtype"),
    ],
)
def test_reference_bad_input(q, v, err, match):
    with pytest.raises(err, match=match):
        l2_attention(q, v)


ALL_BACKENDS = ["auto", "reference", "extension", "sdpa", "triton"]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("scale,err,match", [
    (float("nan"), ValueError, "scale must be finite, got nan"),
    (float("inf"), ValueError, "scale must be finite, got inf"),
    (0.0, ValueError, r"scale must be in \(0.0, inf\), got 0.0"),
    (-0.5, ValueError, r"scale must be in \(0.0, inf\), got -0.5"),
    ("1", TypeError, r"scale must be a number, got '1' \(str\)"),
])
def test_bad_scale_is_refused_before_any_backend_runs(backend, scale, err, match):
    """NaN, infinite or non-positive scales gave NaN or a silently wrong attention (a negative scale
    attends to the farthest keys); every backend now refuses them alike, naming ``scale``."""
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(err, match=f"l2_attention: {match} \\(the logit scale"):
        l2_attention(q, q, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 3, 0, 4, 5), (0, 2, 6, 4, 4), (1, 0, 6, 4, 4), (1, 2, 6, 4, 0)])
def test_empty_inputs_give_the_empty_result(backend, shape):
    """No tokens (N = 0), or no batch, heads or value channels: the empty ``(B, H, N, e)`` result with
    zero-size gradients, from every backend (the reference and the extension crashed in a reshape)."""
    b, h, n, d, e = shape
    q = torch.randn(b, h, n, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, h, n, e, dtype=torch.float64, requires_grad=True)
    out = l2_attention(q, v, backend=backend)
    assert out.shape == (b, h, n, e) and out.dtype == torch.float64
    out.sum().backward()
    assert q.grad.shape == q.shape and v.grad.shape == v.shape


def test_head_dim_zero_is_refused():
    q, v = torch.randn(1, 1, 3, 0), torch.randn(1, 1, 3, 2)
    for backend in ALL_BACKENDS:
        with pytest.raises(ValueError, match=r"q has head dim d = 0 \(shape \(1, 1, 3, 0\)\); queries need at least"):
            l2_attention(q, v, backend=backend)


def test_unknown_backend():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="l2_attention: backend must be one of .* got .nope."):
        l2_attention(q, q, backend="nope")


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 40), d=st.integers(1, 9),
       e=st.integers(1, 9), scale=st.floats(0.01, 3.0), seed=st.integers(0, 2**31 - 1))
def test_reference_property_random_shapes(b, h, n, d, e, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(b, h, n, e, generator=gen, dtype=torch.float64)
    out = l2_attention(q, v, scale=scale)
    torch.testing.assert_close(out, independent_l2_attention(q, v, scale), atol=1e-12, rtol=1e-10)
    # Each output row is a convex combination of value rows.
    assert bool((out <= v.amax(dim=2, keepdim=True) + 1e-12).all())
    assert bool((out >= v.amin(dim=2, keepdim=True) - 1e-12).all())


# ----------------------------------------------------------------------------------------------
# Extension: acf._C's CPU kernels
# ----------------------------------------------------------------------------------------------


def cpu_fn(q, v, scale):
    return l2_attention(q, v, scale, backend="extension")


def assert_equals_reference(q, v, g, u, w, scale):
    """float64: output, VJP and double VJP equal the reference's to rounding."""
    got = first_and_second(cpu_fn, q, v, g, u, w, scale)
    want = first_and_second(l2_attention_reference, q, v, g, u, w, scale)
    for key in got:
        torch.testing.assert_close(got[key], want[key], atol=1e-12, rtol=1e-10, msg=key)


EXTENSION_SHAPES = [(1, 1, 1, 4, 4)] + KERNEL_SHAPES + [(3, 4, 49, 8, 8), (2, 2, 196, 1, 3)]  # B*H up to 12


@pytest.mark.needs_ext
@pytest.mark.parametrize("shape", EXTENSION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_extension_matches_fp64_reference(shape):
    compare_all(*shape, torch.float32, cpu_fn)


@pytest.mark.needs_ext
def test_extension_saturated_softmax():
    """Large |q|: rows of P are nearly one-hot, where dS_kk is pure cancellation (difference form)."""
    compare_all(1, 2, 70, 16, 16, torch.float32, cpu_fn, spread=3.0)


@pytest.mark.needs_ext
@pytest.mark.parametrize("shape", [(1, 1, 1, 2, 2), (2, 3, 9, 3, 2), (1, 2, 33, 5, 7)], ids=str)
def test_extension_fp64_equals_reference(shape):
    assert_equals_reference(*rand_inputs(*shape, torch.float64), 0.7)


@pytest.mark.needs_ext
def test_extension_gradcheck_and_gradgradcheck():
    q = torch.randn(2, 2, 11, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 11, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cpu_fn(a, b, 0.6), (q, v))
    assert torch.autograd.gradgradcheck(lambda a, b: cpu_fn(a, b, 0.6), (q, v))


@pytest.mark.needs_ext
def test_extension_non_contiguous_inputs_and_third_order_refused():
    q = torch.randn(2, 9, 3, 4, dtype=torch.float64).transpose(1, 2).requires_grad_()  # (B, H, N, d) view
    v = torch.randn(2, 3, 9, 4, dtype=torch.float64).requires_grad_()
    torch.testing.assert_close(cpu_fn(q, v, 0.5), l2_attention_reference(q, v, 0.5))
    dq, _ = torch.autograd.grad(cpu_fn(q, v, 0.5).sum(), (q, v), create_graph=True)
    (ddq,) = torch.autograd.grad(dq.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|differentiate"):
        torch.autograd.grad(ddq.sum(), q)


@pytest.mark.needs_ext
def test_auto_uses_cpu_kernels_in_training():
    """A ResFlow block with L2 attention trains with the Neumann estimator on the CPU kernels
    (auto), and its parameter gradients equal the reference backend's for the same draw."""
    from acf.layers.attention import set_attention_backend
    from acf.layers.block import ContractiveBlock
    from acf.layers.branches import resflow_branch
    from acf.layers.logdet import LogdetEstimator

    torch.manual_seed(0)
    g = resflow_branch(4, (5, 5), hidden=8, attention="l2", heads=2).double()
    for m in g.modules():
        if hasattr(m, "gamma"):
            torch.nn.init.constant_(m.gamma, 0.7)
    start = ContractiveBlock(g, LogdetEstimator(method="roulette", n_exact=2, grad="neumann")).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    grads = {}
    for backend in ("auto", "reference"):
        block = set_attention_backend(copy.deepcopy(start), backend)  # same power-iteration state
        torch.manual_seed(1)
        y, logdet = block(x)
        (y.square().sum() - logdet.sum()).backward()
        grads[backend] = [p.grad.clone() for p in block.parameters() if p.grad is not None]
    heads = torch.empty(3, 2, 25, 4, dtype=torch.float64)  # the layer's (B, H, N, d)
    assert F._auto_backend(heads, heads) == "extension"
    for a, b in zip(grads["auto"], grads["reference"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.needs_ext
def test_extension_bad_input():
    q = torch.randn(1, 1, 5, 4)
    with pytest.raises(ValueError, match="'extension' needs CPU float32/float64"):
        l2_attention(q.half(), q.half(), backend="extension")
    x = q.reshape(1, 5, 4)
    with pytest.raises(RuntimeError, match=r"must be \(batch\*heads, N, dim\)"):
        torch.ops.acf.l2_attention_fwd(x, x[:, :4], 0.5)
    with pytest.raises(RuntimeError, match="has dtype"):
        torch.ops.acf.l2_attention_fwd(x, x.double(), 0.5)
    o, lse = torch.ops.acf.l2_attention_fwd(x, x, 0.5)
    with pytest.raises(RuntimeError, match="lse must be"):
        torch.ops.acf.l2_attention_bwd(x, x, o, lse[:, :4], x, 0.5)
    with pytest.raises(RuntimeError, match="g must match v"):
        torch.ops.acf.l2_attention_bwd(x, x, o, lse, x[..., :3], 0.5)
    with pytest.raises(RuntimeError, match="u must match q"):
        torch.ops.acf.l2_attention_bwd2(x, x, o, lse, x, x[..., :3], x, 0.5)


@pytest.mark.needs_ext
def test_extension_nan_propagates(cpu_kernel):
    """A NaN query poisons its softmax column, hence every row: NaN out, as in the reference."""
    q, v = torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 4)
    q[0, 1, 3, 2] = float("nan")
    out, ref = cpu_fn(q, v, 0.5), l2_attention_reference(q, v, 0.5)
    assert torch.equal(out.isnan(), ref.isnan()) and out[0, 1].isnan().all() and not out[0, 0].isnan().any()


@pytest.mark.needs_ext
def test_extension_forward_saves_no_n_by_n_matrix(cpu_kernel):
    """The forward keeps (q, v, O, lse): O(B H N (d + e)) memory; the backward recomputes P."""
    b, h, n, d = 2, 3, 200, 8
    q, v = torch.randn(b, h, n, d, requires_grad=True), torch.randn(b, h, n, d, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        cpu_fn(q, v, 0.3)
    assert sum(saved) == b * h * n * (3 * d + 1)


LAYOUTS = {  # (B, H, N, d) views of the same values with different strides
    "row-major": lambda t: t.contiguous(),
    "column-major": lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2),  # what the layer passes
    "heads-inner": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2),
    "strided": lambda t: torch.stack([t, t], dim=-2).flatten(-3, -2)[..., ::2, :],
}


@pytest.mark.needs_ext
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_extension_any_strides(layout, cpu_kernel):
    """The kernels read and write heads of any strides (outputs take the layout of their input)."""
    q, v, g, u, w = (LAYOUTS[layout](t) for t in rand_inputs(2, 3, 13, 5, 6, torch.float64))
    assert_equals_reference(q, v, g, u, w, 0.4)
    if layout == "column-major":  # the layer's layout is read and written in place, without copies
        assert cpu_fn(q, v, 0.4).stride() == v.stride()


@pytest.mark.needs_ext
def test_auto_rule_by_head_dim_and_n():
    """auto takes the fused kernels on CPU at every head dim and N (measured faster than the reference)."""
    for n, d, e in [(49, 8, 8), (196, 16, 16), (196, 64, 64), (1024, 64, 64), (49, 128, 128), (196, 8, 64)]:
        assert F._auto_backend(torch.empty(1, 1, n, d), torch.empty(1, 1, n, e)) == "extension", (n, d, e)
    assert F._auto_backend(torch.empty(1, 1, 9, 8).half(), torch.empty(1, 1, 9, 8).half()) == "reference"


# The extension's two kernels (csrc/l2_attention_cpu.cpp): register tiles up to head dim 16, blocked
# BLAS products above; ACF_L2_CPU_KERNEL forces one, so that each is tested at every head dim.
CPU_KERNELS = ["tiled", "blocked"]
# (B, H, N, d, e): every head dim from 8 to 128 at least once, non-powers of two, odd N; the last
# ones run the blocked kernel in blocks of rows (N^2 above its block size) and in groups of heads.
HEAD_DIM_SHAPES = [(2, 2, 49, 8, 8), (1, 2, 33, 12, 7), (1, 3, 49, 16, 16), (2, 1, 17, 17, 24),
                   (1, 2, 101, 24, 24), (1, 1, 49, 32, 32), (1, 2, 37, 40, 33), (1, 1, 65, 48, 48),
                   (1, 2, 49, 64, 64), (1, 1, 29, 80, 80), (1, 1, 51, 96, 100), (1, 2, 45, 128, 128),
                   (1, 1, 403, 24, 40), (8, 4, 49, 20, 20)]


@pytest.fixture(params=CPU_KERNELS)
def cpu_kernel(request, monkeypatch):
    monkeypatch.setenv("ACF_L2_CPU_KERNEL", request.param)
    return request.param


@pytest.mark.needs_ext
@pytest.mark.parametrize("shape", HEAD_DIM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_extension_every_head_dim_matches_fp64_reference(shape, cpu_kernel):
    """float32: output, VJP and double VJP within the tolerance rule of tests/attention_rule.py."""
    compare_all(*shape, torch.float32, cpu_fn)


@pytest.mark.needs_ext
@pytest.mark.parametrize("n", [784, 1024, 785])
def test_extension_small_head_dims_at_full_resolution(n):
    """Head dims 1-5 at full-resolution token counts, on the kernel ``auto`` runs there (register-tiled):
    what a gated block runs at the rank of its input (``acf.layers.lifted``: c or c + 1 dimensions for c
    image channels), within the tolerance rule at factor 4, not 2: the kernel sums the N-long reductions
    of the double VJP in float32 in row order, PyTorch's reference in MKL's blocked order, and on an
    AVX-512 Xeon the reference is the more accurate one by up to 2.7x (dq, ddq at N = 784-1024; 20 eps of
    the largest entry at most), where on the AMD EPYC machines it was within 2x."""
    for d, e in [(1, 1), (2, 2), (3, 3), (5, 5), (2, 1), (4, 3)]:
        compare_all(1, 2, n, d, e, torch.float32, cpu_fn, factor=4.0)


@pytest.mark.needs_ext
def test_extension_each_head_dim_8_to_128(cpu_kernel):
    """Every head dim from 8 to 128 (values of another width), odd N, within the tolerance rule."""
    for d in range(8, 129):
        compare_all(1, 1, 13, d, d + 3 if d % 2 else d, torch.float32, cpu_fn)


@pytest.mark.needs_ext
@pytest.mark.parametrize("shape", [(1, 1, 1, 2, 2), (2, 3, 9, 3, 2), (1, 2, 33, 40, 7), (1, 1, 370, 9, 5),
                                   (6, 5, 7, 33, 17)], ids=str)
def test_extension_kernels_fp64_equal_reference(shape, cpu_kernel):
    """float64: both kernels equal the reference to rounding (1e-12), blocks of rows and groups of heads included."""
    assert_equals_reference(*rand_inputs(*shape, torch.float64), 0.7)


@pytest.mark.needs_ext
def test_extension_kernels_gradcheck_and_gradgradcheck(cpu_kernel):
    q = torch.randn(2, 2, 11, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 11, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cpu_fn(a, b, 0.6), (q, v))
    assert torch.autograd.gradgradcheck(lambda a, b: cpu_fn(a, b, 0.6), (q, v))


@pytest.mark.needs_ext
def test_extension_kernel_choice_names_a_bad_value(monkeypatch):
    monkeypatch.setenv("ACF_L2_CPU_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="ACF_L2_CPU_KERNEL=fast: expected auto, tiled or blocked"):
        cpu_fn(torch.randn(1, 1, 5, 4), torch.randn(1, 1, 5, 4), 0.5)


def test_fallback_without_extension(monkeypatch):
    """Without the extension, auto picks the reference and backend="extension" says why it cannot run."""
    monkeypatch.setattr(F, "cpu_kernels_available", lambda: False)
    monkeypatch.setattr(F._ext, "available", lambda: False)
    q = torch.randn(1, 2, 7, 4)
    assert F._auto_backend(q, q) == "reference"
    torch.testing.assert_close(l2_attention(q, q), l2_attention_reference(q, q, 0.5))
    with pytest.raises(ValueError, match="extension loaded: False"):
        l2_attention(q, q, backend="extension")


# ----------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU, compiled on CUDA)
# ----------------------------------------------------------------------------------------------


def rand_inputs_dev(*args, **kwargs):
    return rand_inputs(*args, device=DEV, **kwargs)


def compare_all_dev(*args, **kwargs):
    return compare_all(*args, device=DEV, **kwargs)


def triton_fn(precision="ieee"):
    return lambda q, v, s: l2_attention_triton(q, v, s, precision=precision)


TRITON_SHAPES = [(1, 1, 1, 16, 16)] + KERNEL_SHAPES  # B*H <= 4: the interpreter is slow


@needs_kernels
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_fp64_reference(shape):
    compare_all_dev(*shape, torch.float32, triton_fn("ieee"))


@needs_kernels
def test_triton_multi_tile_small_blocks(monkeypatch):
    """Tiles of 16 so that N = 50 crosses four tiles with a ragged last one (interpreter)."""
    monkeypatch.setattr(K, "INTERPRET_BLOCK", 16)
    compare_all_dev(1, 2, 50, 8, 12, torch.float32, triton_fn("ieee"))


@needs_kernels
def test_triton_large_logits():
    """Spread-out queries (|q|^2 ~ 100): the online softmax must rescale without overflow."""
    compare_all_dev(1, 2, 70, 16, 16, torch.float32, triton_fn("ieee"), spread=3.0)


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
    q, v, *_ = rand_inputs_dev(1, 2, 40, 8, 8, torch.float32)
    ex = l2_attention_reference(q.double(), v.double(), 0.35)
    ref = l2_attention_reference(q, v, 0.35)
    wrong = l2_attention_triton(q, v, 0.35 * 1.01, precision="ieee")
    with pytest.raises(AssertionError):
        check_rule("wrong", wrong, ref, ex)
    check_rule("right", l2_attention_triton(q, v, 0.35, precision="ieee"), ref, ex)


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
def test_dispatch_to_triton_backend():
    q, v, *_ = rand_inputs_dev(1, 2, 23, 8, 8, torch.float64)
    torch.testing.assert_close(l2_attention(q, v, backend="triton"), l2_attention_reference(q, v, 8 ** -0.5))


def test_bad_inputs_name_the_problem():
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="l2_attention: backend must be one of .* got 'cuda' \\(the backends are"):
        l2_attention(q, q, backend="cuda")
    with pytest.raises(ValueError, match="4 dimensions"):
        l2_attention(q[0], q[0])
    with pytest.raises(TypeError, match="share a dtype"):
        l2_attention(q, q.double())


# ----------------------------------------------------------------------------------------------
# GPU: compiled kernels, half precision, TF32, large N
# ----------------------------------------------------------------------------------------------

GPU_SHAPES = TRITON_SHAPES + [(2, 2, 1000, 32, 32), (1, 2, 513, 16, 16), (1, 1, 300, 128, 64)]


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_matches_fp64_reference(shape, dtype):
    compare_all_dev(*shape, dtype, triton_fn("ieee"))


@pytest.mark.gpu
@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_large_n(dtype):
    compare_all_dev(1, 2, 4096, 32, 32, dtype, triton_fn("ieee"))


@pytest.mark.gpu
@needs_kernels
def test_gpu_tf32(monkeypatch):
    """TF32 kernel against the TF32 PyTorch reference (both with TF32 matmuls)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    compare_all_dev(2, 2, 1000, 32, 32, torch.float32, triton_fn("tf32"))


@pytest.mark.gpu
@needs_kernels
def test_gpu_layer_column_major_heads():
    layer_layout_check("cuda")


@pytest.mark.gpu
@needs_kernels
def test_gpu_gradcheck_fp64():
    q = torch.randn(1, 2, 70, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    v = torch.randn(1, 2, 70, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    fn = lambda q, v: l2_attention_triton(q, v, 0.6)
    assert torch.autograd.gradcheck(fn, (q, v), eps=1e-6, atol=1e-7, rtol=1e-5)
    assert torch.autograd.gradgradcheck(fn, (q, v), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.gpu
@needs_kernels
def test_gpu_auto_is_triton_and_sdpa_matches():
    q, v, *_ = rand_inputs(2, 2, 257, 32, 32, torch.float32, device="cuda")
    assert F._auto_backend(q, v) == "triton"
    ex = l2_attention_reference(q.double(), v.double(), 32 ** -0.5)
    check_rule("sdpa cuda fp32", l2_attention(q, v, backend="sdpa"), l2_attention_reference(q, v, 32 ** -0.5), ex, factor=4.0)
