"""The log-det power-series workload of the benchmarks: one real ACF block with L2 attention.

``ContractiveBlock(resflow_branch(C, (h, w), hidden=heads*d, attention="l2", heads=heads),
LogdetEstimator(method="series", n_terms=8))``: ``g`` = LipSwish, 3x3 conv C -> heads*d,
LipSwish, L2 multi-head attention (heads x d, N = h*w positions), 1x1 conv, LipSwish, 3x3 conv
back to C. One timed call is the block's evaluation forward, ``y, logdet = block(x)`` under
``torch.no_grad()``: ``g(x)`` once with a graph, then 8 vector-Jacobian products (Hutchinson,
one Gaussian probe), no second order. The attention backend is forced on the block with
``acf.layers.attention.set_attention_backend`` (the library's one switch for it), so "sdpa" (first
order only) can run too. The attention's gamma is set to 0.5: at its initial 0 the branch
would still run every kernel, but a zero-weighted attention is not a realistic workload.

With ``heads*d`` hidden channels and few image channels C, attention dominates: at N = 1024,
(heads, d) = (4, 16) it is about 90% of the block's FLOPs, and more at N = 4096.
"""
from __future__ import annotations

import math

import torch

N_TERMS = 8


def make_block(channels: int, hw: tuple[int, int], heads: int, d: int, dtype: torch.dtype,
               device: str, backend: str):
    from acf.layers.attention import L2MultiheadAttention, set_attention_backend
    from acf.layers.block import ContractiveBlock
    from acf.layers.branches import resflow_branch
    from acf.layers.logdet import LogdetEstimator

    torch.manual_seed(0)
    g = resflow_branch(channels, hw, hidden=heads * d, attention="l2", heads=heads)
    for m in g.modules():
        if isinstance(m, L2MultiheadAttention) and hasattr(m, "gamma"):
            with torch.no_grad():
                m.gamma.fill_(0.5)
    block = ContractiveBlock(g, LogdetEstimator(method="series", n_terms=N_TERMS))
    set_attention_backend(block, backend)
    block = block.to(device=device, dtype=dtype).eval()
    return block


def series_call(block, x: torch.Tensor):
    """One timed unit: the block's forward with the 8-term log-det series, no graph kept."""

    def run():
        with torch.no_grad():
            return block(x)

    return run


def flops(batch: int, channels: int, hw: tuple[int, int], heads: int, d: int, n_terms: int = N_TERMS) -> float:
    """Useful FLOPs of one series call: g forward + n_terms VJPs (a VJP ~ 2x a forward).

    Attention forward 4 N^2 D per sample (D = heads*d: q q^T and P v); the projections
    (q, value map, output: 3 (N D^2 + ...)) and the convolutions (3x3 C->D, 1x1 D->D, 3x3 D->C)."""
    n = hw[0] * hw[1]
    dim = heads * d
    attn = 4.0 * n * n * dim
    proj = 2.0 * n * dim * dim * 3 + 2.0 * n * heads * d * d
    conv = 2.0 * n * (9 * channels * dim + dim * dim + 9 * dim * channels)
    fwd = batch * (attn + proj + conv)
    return fwd * (1 + 2 * n_terms)


def attention_share(channels: int, hw: tuple[int, int], heads: int, d: int) -> float:
    n = hw[0] * hw[1]
    dim = heads * d
    attn = 4.0 * n * n * dim
    total = flops(1, channels, hw, heads, d, 0)
    return attn / total


def side(n: int) -> tuple[int, int]:
    s = int(math.isqrt(n))
    if s * s != n:
        raise ValueError(f"N = {n} is not a square image")
    return (s, s)
