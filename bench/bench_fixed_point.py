"""pytest-benchmark microbenchmark of fixed_point (``fixed_point_solve``): Anderson (memory 5) against
Banach, g evaluations and wall time of inverting contractive block stacks at tol 1e-6.

    python -m pytest bench/bench_fixed_point.py --benchmark-only -s   # table + ratio summary
    python bench/bench_fixed_point.py                                 # ratio summary only

Workloads: (a) real Residual-Flow blocks with every layer at its coefficient 0.90-0.98; (b) dense
blocks whose Jacobians use their Lipschitz budget 0.90-0.98 (the regime of a trained block, see
``workloads.dense_contractive_blocks``).
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as W  # noqa: E402

RESULTS: dict = {}  # summary_table(RESULTS) is printed after the module (bench/conftest.py)
WORKLOADS = {"resflow": W.trained_like_blocks, "dense": W.dense_contractive_blocks}


@pytest.fixture(scope="module")
def stacks():
    return {name: make(device=W.DEV) for name, make in WORKLOADS.items()}


def summary_table(res: dict) -> str:
    lines = [f"fixed_point benchmark summary ({W.DEV})"]
    for wl in WORKLOADS:
        kb, ka = f"{wl}_banach", f"{wl}_anderson"
        if kb in res and ka in res:
            (tb, eb), (ta, ea) = res[kb], res[ka]
            lines.append(f"  invert {wl:7s} stack tol 1e-6: banach {eb:5d} g-evals {tb * 1e3:8.1f} ms | anderson "
                         f"{ea:5d} g-evals {ta * 1e3:8.1f} ms | evals ratio {ea / eb:5.2f}, time ratio {ta / tb:5.2f}")
    return "\n".join(lines)


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("method", ["banach", "anderson"])
def test_invert_stack(benchmark, stacks, workload, method):
    benchmark.group = f"invert {workload} stack, tol 1e-6"
    blocks, y, x = stacks[workload]
    out = {}

    def run():
        out["x"], out["evals"], out["res"] = W.invert_stack(blocks, y, method)
        W.sync()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["g_evals"] = out["evals"]
    if benchmark.stats is not None:  # None under --benchmark-disable (one plain call, nothing timed)
        RESULTS[f"{workload}_{method}"] = (benchmark.stats.stats.min, out["evals"])
    assert float((out["x"] - x).abs().max()) < 1e-3


def main() -> None:
    res: dict = {}
    for wl, make in WORKLOADS.items():
        blocks, y, _ = make(device=W.DEV)
        for method in ("banach", "anderson"):
            evals = W.invert_stack(blocks, y, method)[1]
            res[f"{wl}_{method}"] = (W.wall(lambda: W.invert_stack(blocks, y, method), repeat=3, sync=W.sync), evals)
    print(summary_table(res))


if __name__ == "__main__":
    main()
