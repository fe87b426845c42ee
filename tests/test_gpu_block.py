"""ACF blocks on CUDA with the fused attention path (``pytest -m gpu``; skipped without a GPU).

The L2 attention inside the branch runs on Triton (``backend="auto"`` picks it on CUDA); the
results must match the same block with the reference attention, and the block must train with the
Neumann estimator (a double backward through the fused kernels) and invert to 1e-4.
"""
import copy

import pytest
import torch

from acf.layers.attention import set_attention_backend
from acf.layers.block import ContractiveBlock
from acf.layers.branches import resflow_branch
from acf.layers.logdet import LogdetEstimator

pytestmark = pytest.mark.gpu


def make_block(estimator, channels=16, hw=(16, 16), heads=4):
    torch.manual_seed(0)
    g = resflow_branch(channels, hw, hidden=32, attention="l2", heads=heads)
    for m in g.modules():
        if hasattr(m, "gamma"):
            m.gamma.data.fill_(2.0)
    return ContractiveBlock(g, estimator).cuda()


@pytest.mark.parametrize("grad", ["neumann", "memory_efficient", "backprop"])
def test_fused_block_matches_reference_block(grad):
    est = LogdetEstimator(method="roulette", grad=grad)
    fused = set_attention_backend(make_block(est), "triton")
    ref = set_attention_backend(copy.deepcopy(fused), "reference")
    x = torch.randn(8, 16, 16, 16, device="cuda", dtype=torch.float32)
    out = []
    for block in (fused, ref):
        torch.manual_seed(1)  # same roulette draw and probes
        xi = x.clone().requires_grad_(True)
        y, ld = block(xi)
        loss = ld.mean() + y.square().mean()
        grads = torch.autograd.grad(loss, [xi, *block.parameters()], allow_unused=True)
        out.append((y.detach(), ld.detach(), grads))
    (y1, ld1, g1), (y2, ld2, g2) = out
    torch.testing.assert_close(y1, y2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ld1, ld2, rtol=1e-3, atol=1e-4)
    for a, b in zip(g1, g2):
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5)


def test_fused_block_trains_and_inverts():
    block = set_attention_backend(make_block(LogdetEstimator(method="roulette")), "triton")
    opt = torch.optim.Adam(block.parameters(), lr=1e-3)
    x = torch.randn(16, 16, 16, 16, device="cuda")
    for _ in range(5):
        y, ld = block(x)
        loss = 0.5 * y.square().flatten(1).sum(1).mean() - ld.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert block.lipschitz_bound() < 1.0
    block.eval()
    with torch.no_grad():
        y, _ = block(x)
        x_rec = block.inverse(y)
    assert float((x_rec - x).abs().max()) <= 1e-4
