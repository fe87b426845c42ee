"""pytest-benchmark microbenchmarks of L2 attention (issue 4): forward, VJP, forward + VJP, and the
log-det power series (8 VJPs) through one real ACF block (``bench/logdet_block.py``).

    python -m pytest bench/bench_attention.py --benchmark-only            # CPU: small shapes
    ACF_BENCH_FULL=1 python -m pytest bench/bench_attention.py --benchmark-only   # GPU: issue sizes

On CUDA the issue's sizes run (batch 64, heads 16, N 256/1024/4096, d 32; batch 64, heads 4,
N 1024, d 16; fp32 and bf16) when ACF_BENCH_FULL=1; bench/gpu_check.py times the same set with
CUDA events and also reports TFLOP/s and peak memory. The triton backend runs on CUDA only, the
cpu backend (acf._C) on CPU only.
"""
from __future__ import annotations

import os

import pytest
import torch

from acf.ops.l2_attention import cpu_kernels_available, l2_attention, triton_available

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
if CUDA and os.environ.get("ACF_BENCH_FULL"):
    CONFIGS = [(64, 16, 256, 32), (64, 16, 1024, 32), (64, 16, 4096, 32), (64, 4, 1024, 16)]
    DTYPES = [torch.float32, torch.bfloat16]
else:
    CONFIGS = [(4, 4, 256, 32), (4, 4, 1024, 16)]
    DTYPES = [torch.float32]
BACKENDS = (["reference", "sdpa"] + (["triton"] if CUDA and triton_available() else [])
            + (["extension"] if not CUDA and cpu_kernels_available() else []))


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _inputs(cfg, dtype):
    b, h, n, d = cfg
    if not CUDA and b * h * n * n * 4 * 4 > 2**31:
        pytest.skip("reference P too large for this CPU")
    q = (torch.randn(b, h, n, d, device=DEV) * 0.5).to(dtype).requires_grad_()
    v = torch.randn(b, h, n, d, device=DEV).to(dtype).requires_grad_()
    return q, v


params = pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "b{}h{}n{}d{}".format(*c))
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=str)
backends = pytest.mark.parametrize("backend", BACKENDS)


@params
@dtypes
@backends
def test_attention_fwd(benchmark, cfg, dtype, backend):
    q, v = _inputs(cfg, dtype)

    def run():
        with torch.no_grad():
            l2_attention(q, v, backend=backend)
        _sync()

    benchmark(run)


@params
@dtypes
@backends
def test_attention_vjp(benchmark, cfg, dtype, backend):
    q, v = _inputs(cfg, dtype)
    g = torch.randn(v.shape, device=DEV, dtype=dtype)
    o = l2_attention(q, v, backend=backend)

    def run():
        torch.autograd.grad(o, (q, v), g, retain_graph=True)
        _sync()

    benchmark(run)


@params
@dtypes
@backends
def test_attention_fwd_vjp(benchmark, cfg, dtype, backend):
    q, v = _inputs(cfg, dtype)
    g = torch.randn(v.shape, device=DEV, dtype=dtype)

    def run():
        torch.autograd.grad(l2_attention(q, v, backend=backend), (q, v), g)
        _sync()

    benchmark(run)


LOGDET_CONFIGS = [(64, 4, 1024, 16), (64, 4, 4096, 16)] if (CUDA and os.environ.get("ACF_BENCH_FULL")) \
    else [(4, 4, 256, 16)]


@pytest.mark.parametrize("cfg", LOGDET_CONFIGS, ids=lambda c: "b{}h{}n{}d{}".format(*c))
@dtypes
@backends
def test_logdet_series(benchmark, cfg, dtype, backend):
    """One real ACF block (bench/logdet_block.py) with the 8-term log-det series, no graph kept;
    the attention backend is forced with ``acf.layers.attention.set_attention_backend``."""
    import contextlib

    import logdet_block as LB

    b, h, n, d = cfg
    hw = LB.side(n)
    block = LB.make_block(16, hw, h, d, torch.float32, DEV, backend)
    x = torch.randn(b, 16, *hw, device=DEV)
    run = LB.series_call(block, x)
    amp = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(DEV, dtype=dtype)

    def step():
        with amp:
            run()
        _sync()

    benchmark(step)
