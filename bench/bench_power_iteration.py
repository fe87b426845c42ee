"""pytest-benchmark microbenchmark of power_iteration (``spectral_norms``): the extension ``acf._C``
against the per-layer Python loop.

    python -m pytest bench/bench_power_iteration.py --benchmark-only -s   # table + ratio summary
    python bench/bench_power_iteration.py                                 # ratio summary only
    ACF_BENCH_FULL=1 ...                                                  # paper size: 16 blocks per scale

Refreshing every spectral norm (one power-iteration step per layer, as after each optimizer step) of
a CIFAR-10 Residual Flow (3x32x32 -> 12x16x16 and 48x8x8, hidden 512, 3x3/1x1/3x3):
``acf.layers.spectral_norm.refresh_spectral_norms`` (one batched call) vs the per-layer Python loop.
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as W  # noqa: E402

from acf import _ext  # noqa: E402

BLOCKS = 16 if os.environ.get("ACF_BENCH_FULL") else 4
HIDDEN = 512
RESULTS: dict = {}  # summary_table(RESULTS) is printed after the module (bench/conftest.py)


@pytest.fixture(scope="module")
def resflow():
    return W.resflow_stack(BLOCKS, HIDDEN, W.DEV)


def summary_table(res: dict) -> str:
    lines = [f"power_iteration benchmark summary ({W.DEV})"]
    if "refresh_python" in res and "refresh_extension" in res:
        p, e = res["refresh_python"], res["refresh_extension"]
        lines.append(f"  refresh spectral norms ({res.get('n_layers', '?')} layers): python {p * 1e3:8.2f} ms | "
                     f"extension {e * 1e3:8.2f} ms | speed-up {p / e:5.2f}x")
    return "\n".join(lines)


@pytest.mark.skipif(not _ext.available(), reason="acf._C not built")
@pytest.mark.parametrize("impl", ["python", "extension"])
def test_refresh_spectral_norms(benchmark, resflow, impl):
    benchmark.group = "refresh spectral norms (ResFlow CIFAR-10)"
    fn = W.python_refresh if impl == "python" else W.extension_refresh

    def run():
        fn(resflow)
        W.sync()

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable (one plain call, nothing timed)
        RESULTS[f"refresh_{impl}"] = benchmark.stats.stats.min
        RESULTS["n_layers"] = sum(1 for m in resflow.modules() if hasattr(m, "u"))


def main() -> None:
    if not _ext.available():
        raise SystemExit(f"acf._C is not built: nothing to compare ({_ext.error()})")
    model = W.resflow_stack(BLOCKS, HIDDEN, W.DEV)
    res: dict = {"n_layers": sum(1 for m in model.modules() if hasattr(m, "u"))}
    for impl, fn in (("python", W.python_refresh), ("extension", W.extension_refresh)):
        fn(model)
        res[f"refresh_{impl}"] = W.wall(lambda: fn(model), repeat=5, sync=W.sync)
    print(summary_table(res))


if __name__ == "__main__":
    main()
