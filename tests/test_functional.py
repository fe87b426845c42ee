"""l2_attention reference against an independent float64 computation; gradients; bad input."""
import math

import pytest
import torch

from acf.ops.l2_attention import l2_attention

SHAPES = [(1, 1, 1, 4), (2, 3, 17, 8), (1, 2, 100, 16), (2, 1, 33, 5)]


def independent_l2_attention(q, v, scale):
    """Materialise P from pairwise squared distances (torch.cdist) in float64."""
    q, v = q.double(), v.double()
    dist2 = torch.cdist(q, q) ** 2
    p = torch.softmax(-scale * dist2, dim=-1)
    return p @ v


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_matches_independent_reference(shape, dtype, tol):
    q = torch.randn(shape, dtype=dtype)
    v = torch.randn(shape[:-1] + (shape[-1] + 3,), dtype=dtype)  # value dim may differ
    out = l2_attention(q, v)
    ref = independent_l2_attention(q, v, 1.0 / math.sqrt(shape[-1]))
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_explicit_scale_and_large_logits():
    q = torch.randn(1, 2, 9, 4, dtype=torch.float64) * 30  # logits in the thousands: softmax must stay stable
    v = torch.randn(1, 2, 9, 4, dtype=torch.float64)
    out = l2_attention(q, v, scale=0.7)
    torch.testing.assert_close(out, independent_l2_attention(q, v, 0.7))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(1, 2, 5, 3), (2, 1, 7, 2)])
def test_gradcheck_and_gradgradcheck(shape):
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
def test_bad_input(q, v, err, match):
    with pytest.raises(err, match=match):
        l2_attention(q, v)


def test_unknown_backend():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="l2_attention: backend must be one of .* got .nope."):
        l2_attention(q, q, backend="nope")


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 40), d=st.integers(1, 9),
       e=st.integers(1, 9), scale=st.floats(0.01, 3.0), seed=st.integers(0, 2**31 - 1))
def test_property_random_shapes(b, h, n, d, e, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=gen, dtype=torch.float64) * 2
    v = torch.randn(b, h, n, e, generator=gen, dtype=torch.float64)
    out = l2_attention(q, v, scale=scale)
    torch.testing.assert_close(out, independent_l2_attention(q, v, scale), atol=1e-12, rtol=1e-10)
    # Each output row is a convex combination of value rows.
    assert bool((out <= v.amax(dim=2, keepdim=True) + 1e-12).all())
    assert bool((out >= v.amin(dim=2, keepdim=True) - 1e-12).all())
