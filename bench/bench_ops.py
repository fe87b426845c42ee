"""pytest-benchmark microbenchmarks of acf.ops (issue 5): extension vs pure-PyTorch reference.

    python -m pytest bench/bench_ops.py --benchmark-only -s      # table + ratio summary
    python bench/bench_ops.py                                      # ratio summary only
    ACF_BENCH_FULL=1 ...                                           # paper size: 16 blocks per scale

1. Refreshing every spectral norm (one power-iteration step per layer, as after each optimizer
   step) of a CIFAR-10 Residual Flow (3x32x32 -> 12x16x16 and 48x8x8, hidden 512, 3x3/1x1/3x3):
   ``acf.layers.spectral_norm.refresh_spectral_norms`` (one batched call) vs the per-layer Python loop.
2. Inverting contractive block stacks at tol 1e-6: Anderson (memory 5) vs Banach, g evaluations
   and wall time: (a) real Residual-Flow blocks with every layer at its coefficient 0.90-0.98;
   (b) dense blocks whose Jacobians use their Lipschitz budget 0.90-0.98 (the regime of a trained
   block, see ops_workloads.dense_contractive_blocks).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ops_workloads as W  # noqa: E402

from acf import _ext  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
FULL = bool(os.environ.get("ACF_BENCH_FULL"))
BLOCKS = 16 if FULL else 4
HIDDEN = 512
RESULTS: dict = {}


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def resflow():
    return W.resflow_stack(BLOCKS, HIDDEN, DEV)


@pytest.fixture(scope="module")
def conv_blocks():
    return W.trained_like_blocks(device=DEV)


@pytest.fixture(scope="module")
def dense_blocks():
    return W.dense_contractive_blocks(device=DEV)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if RESULTS:
        print("\n" + summary_table(RESULTS))


def summary_table(res: dict) -> str:
    lines = ["acf.ops benchmark summary (" + DEV + ")"]
    if "refresh_python" in res and "refresh_extension" in res:
        p, e = res["refresh_python"], res["refresh_extension"]
        lines.append(f"  refresh spectral norms ({res.get('n_layers', '?')} layers): python {p * 1e3:8.2f} ms | "
                     f"extension {e * 1e3:8.2f} ms | speed-up {p / e:5.2f}x")
    for wl in ("resflow", "dense"):
        kb, ka = f"{wl}_banach", f"{wl}_anderson"
        if kb in res and ka in res:
            (tb, eb), (ta, ea) = res[kb], res[ka]
            lines.append(f"  invert {wl:7s} stack tol 1e-6: banach {eb:5d} g-evals {tb * 1e3:8.1f} ms | anderson "
                         f"{ea:5d} g-evals {ta * 1e3:8.1f} ms | evals ratio {ea / eb:5.2f}, time ratio {ta / tb:5.2f}")
    return "\n".join(lines)


@pytest.mark.skipif(not _ext.available(), reason="acf._C not built")
@pytest.mark.parametrize("impl", ["python", "extension"])
def test_refresh_spectral_norms(benchmark, resflow, impl):
    benchmark.group = "refresh spectral norms (ResFlow CIFAR-10)"
    fn = W.python_refresh if impl == "python" else W.extension_refresh

    def run():
        fn(resflow)
        _sync()

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    RESULTS[f"refresh_{impl}"] = benchmark.stats.stats.min
    RESULTS["n_layers"] = sum(1 for m in resflow.modules() if hasattr(m, "u"))


@pytest.mark.parametrize("workload", ["resflow", "dense"])
@pytest.mark.parametrize("method", ["banach", "anderson"])
def test_invert_stack(benchmark, conv_blocks, dense_blocks, workload, method):
    benchmark.group = f"invert {workload} stack, tol 1e-6"
    blocks, y, x = conv_blocks if workload == "resflow" else dense_blocks
    out = {}

    def run():
        out["x"], out["evals"], out["res"] = W.invert_stack(blocks, y, method)
        _sync()

    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info["g_evals"] = out["evals"]
    RESULTS[f"{workload}_{method}"] = (benchmark.stats.stats.min, out["evals"])
    assert float((out["x"] - x).abs().max()) < 1e-3


def main() -> None:
    res: dict = {}
    model = W.resflow_stack(BLOCKS, HIDDEN, DEV)
    res["n_layers"] = sum(1 for m in model.modules() if hasattr(m, "u"))
    if _ext.available():
        for impl, fn in (("python", W.python_refresh), ("extension", W.extension_refresh)):
            fn(model)
            res[f"refresh_{impl}"] = W.wall(lambda: fn(model), repeat=5, sync=_sync)
    for wl, (blocks, y, _) in (("resflow", W.trained_like_blocks(device=DEV)),
                               ("dense", W.dense_contractive_blocks(device=DEV))):
        for method in ("banach", "anderson"):
            evals = W.invert_stack(blocks, y, method)[1]
            res[f"{wl}_{method}"] = (W.wall(lambda: W.invert_stack(blocks, y, method), repeat=3, sync=_sync), evals)
    print(summary_table(res))


if __name__ == "__main__":
    main()
