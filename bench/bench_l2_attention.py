"""Benchmarks of L2 attention: pytest-benchmark microbenchmarks (forward, VJP, forward + VJP, and the
log-det power series, 8 VJPs, through one real ACF block, ``bench/logdet_block.py``) and, as a
script, the CPU crossover: where the fused CPU kernels beat the reference.

    python -m pytest bench/bench_l2_attention.py --benchmark-only            # CPU: small shapes
    ACF_BENCH_FULL=1 python -m pytest bench/bench_l2_attention.py --benchmark-only   # GPU: full sizes
    python bench/bench_l2_attention.py --crossover [--out bench/results/DATE-cpu-attention-crossover.md]

On CUDA the full sizes run (batch 64, heads 16, N 256/1024/4096, d 32; batch 64, heads 4, N 1024,
d 16; fp32 and bf16) when ACF_BENCH_FULL=1; bench/gpu_check.py times the same set with CUDA events
and also reports TFLOP/s and peak memory. The triton backend runs on CUDA only, the extension
backend (acf._C) on CPU only.

The crossover (the measurements behind ``backend="auto"`` on CPU): for each (batch, heads, N, head
dim), both backends run side by side: the forward, one VJP and one double VJP (the VJP with
``create_graph=True`` differentiated once more), best of a few runs each. A training step's mix is
one forward, about six VJPs (the log-det power series, the Neumann VJP and the backward of the
forward) and one double VJP per attention layer; the table reports that weighted time and which
backend ``auto`` picks (``acf.ops.l2_attention._auto_backend``).
"""
from __future__ import annotations

import argparse
import os
import sys

import pytest
import torch

from acf.ops.l2_attention import _auto_backend, cpu_kernels_available, l2_attention, triton_available

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import wall  # noqa: E402

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


# --------------------------------------------------------------------------------------------------
# The CPU crossover (a script: python bench/bench_l2_attention.py --crossover)
# --------------------------------------------------------------------------------------------------

GRID = [(32, 4, 49, 8), (32, 4, 49, 16), (32, 4, 49, 32), (32, 4, 49, 64), (32, 4, 49, 128),
        (16, 4, 196, 8), (16, 4, 196, 16), (16, 4, 196, 24), (16, 4, 196, 32), (16, 4, 196, 64),
        (8, 4, 196, 96), (8, 4, 196, 128), (4, 4, 512, 32), (4, 4, 512, 64), (4, 4, 512, 128), (8, 4, 784, 16),
        (4, 4, 1024, 32), (4, 4, 1024, 64), (2, 4, 1024, 128)]
VJPS_PER_STEP = 6


def best_ms(fn) -> float:
    fn()  # warm-up
    return wall(fn, repeat=5) * 1e3


def measure(backend: str, q: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> dict[str, float]:
    """Forward, VJP and double-VJP times (ms) and the training-step mix of them."""
    fwd = best_ms(lambda: l2_attention(q, v, backend=backend))
    o = l2_attention(q, v, backend=backend)
    vjp = best_ms(lambda: torch.autograd.grad(o, (q, v), g, retain_graph=True))

    def double_vjp():
        dq, dv = torch.autograd.grad(o, (q, v), g, create_graph=True, retain_graph=True)
        torch.autograd.grad((dq * q).sum() + (dv * v).sum(), (q, v), retain_graph=True)

    vjp2 = best_ms(double_vjp)
    return {"fwd": fwd, "vjp": vjp, "vjp2": vjp2, "mix": fwd + VJPS_PER_STEP * vjp + vjp2}


def crossover_table() -> str:
    lines = ["| batch | heads | N | d | cpu fwd / vjp / vjp2 (ms) | reference fwd / vjp / vjp2 (ms) "
             "| training mix: reference / cpu | auto |", "|---|---|---|---|---|---|---|---|"]
    for b, h, n, d in GRID:
        q = (torch.randn(b, h, n, d) * 0.5).requires_grad_()
        v = torch.randn(b, h, n, d).requires_grad_()
        g = torch.randn(b, h, n, d)
        cpu, ref = measure("extension", q, v, g), measure("reference", q, v, g)
        parts = lambda m: f"{m['fwd']:.1f} / {m['vjp']:.1f} / {m['vjp2']:.1f}"  # noqa: E731
        lines.append(f"| {b} | {h} | {n} | {d} | {parts(cpu)} | {parts(ref)} | {ref['mix'] / cpu['mix']:.2f}x "
                     f"| {_auto_backend(q, v)} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def crossover(out: str | None = None) -> None:
    """Print the crossover table (and write it, as markdown, to ``out``)."""
    from acf.experiments import machine_info

    if not cpu_kernels_available():
        raise SystemExit("acf._C's CPU attention kernels are not built: nothing to compare")
    m = machine_info()
    where = f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}"
    print(where)
    text = crossover_table()
    if out:
        with open(out, "w") as f:
            f.write(f"# L2 attention on CPU: fused kernels against the reference ({m['date'][:10]})\n\n"
                    f"`python bench/bench_l2_attention.py --crossover`: {where}. A training-step mix is forward + "
                    f"{VJPS_PER_STEP} VJPs + one double VJP; above 1x the fused kernels are faster (`cpu`: the "
                    f"extension's register-tiled kernels up to head dim 16, its blocked ones above).\n\n{text}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="L2 attention benchmarks outside pytest: the CPU crossover.")
    parser.add_argument("--crossover", action="store_true",
                        help="time the fused CPU kernels against the reference over a grid of shapes")
    parser.add_argument("--out", help="with --crossover: also write the table (markdown) to this file")
    args = parser.parse_args()
    if not args.crossover:
        parser.error("nothing to run: pass --crossover (the microbenchmarks run under pytest: "
                     "python -m pytest bench/bench_l2_attention.py --benchmark-only)")
    crossover(args.out)


if __name__ == "__main__":
    main()
