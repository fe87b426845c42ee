"""Where the fused CPU kernels beat the reference: the measurements behind ``backend="auto"`` on CPU.

    python bench/cpu_attention_crossover.py [--out bench/results/DATE-cpu-attention-crossover.md]

For each (batch, heads, N, head dim), both backends run side by side: the forward, one VJP and one
double VJP (the VJP with ``create_graph=True`` differentiated once more), best of a few runs each.
A training step's mix is one forward, about six VJPs (the log-det power series, the Neumann VJP and
the backward of the forward) and one double VJP per attention layer; the table reports that
weighted time and which backend ``auto`` picks (``acf.ops.l2_attention._auto_backend``).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from acf.experiments import machine_info
from acf.ops.l2_attention import _auto_backend, cpu_kernels_available, l2_attention

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ops_workloads import wall  # noqa: E402

GRID = [(16, 4, 196, 8), (16, 4, 196, 16), (16, 4, 196, 32), (16, 4, 196, 64), (8, 4, 196, 128),
        (4, 4, 512, 32), (4, 4, 512, 64), (8, 4, 784, 16), (4, 4, 1024, 32), (4, 4, 1024, 64)]
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


def table() -> str:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args()
    if not cpu_kernels_available():
        raise SystemExit("acf._C's CPU attention kernels are not built: nothing to compare")
    m = machine_info()
    where = f"{m['cpu']}, {m['torch_threads']} threads, torch {m['torch']}"
    print(where)
    text = table()
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"# L2 attention on CPU: fused kernels against the reference ({m['date'][:10]})\n\n"
                    f"`python bench/cpu_attention_crossover.py`: {where}. A training-step mix is forward + "
                    f"{VJPS_PER_STEP} VJPs + one double VJP; above 1x the fused kernels are faster.\n\n{text}\n")


if __name__ == "__main__":
    main()
