"""Certified vs empirical Lipschitz constants of the residual branches and attention layers.

Run: ``python bench/lipschitz_report.py`` (CPU, about a minute). Prints a markdown table: the
certified bound of each branch g, and the largest ratio ||g(x) - g(y)|| / ||x - y|| found by
gradient ascent over pairs, for saturated branches (weights at their coefficient, gamma = 3).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import ascent_ratio, random_pair_ratio, saturate  # noqa: E402

from acf.layers.attention import L2MultiheadAttention, LipNormAttention  # noqa: E402
from acf.layers.branches import BRANCHES  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    shape = (4, 6, 6)
    print("| branch | attention | certified bound | max ratio (random) | max ratio (ascent) |")
    print("|---|---|---|---|---|")
    for arch in sorted(BRANCHES):
        for attention in (None, "l2", "lipnorm"):
            kw = {"growth": 4, "depth": 2} if arch == "idensenet" else {"hidden": 16}
            g = saturate(BRANCHES[arch](shape[0], shape[1:], attention=attention, heads=2, **kw)).double().eval()
            bound = g.lipschitz_bound()
            with torch.no_grad():
                rand = random_pair_ratio(g, shape, n_pairs=256)
            asc = ascent_ratio(g, shape, steps=60, n_pairs=16)
            print(f"| {arch} | {attention} | {bound:.4f} | {rand:.4f} | {asc:.4f} |")
    print()
    print("| attention F / L alone (D=8, 2 heads) | N | certified | max ratio (ascent) |")
    print("|---|---|---|---|")
    for cls in (L2MultiheadAttention, LipNormAttention):
        for hw in ((4, 4), (8, 8)):
            layer = cls(8, 2).double()
            def fn(x, layer=layer):
                return layer.attend(x.flatten(2)).reshape(x.shape)
            asc = max(ascent_ratio(fn, (8, *hw), steps=60, n_pairs=8, scale=s) for s in (0.3, 1.0, 3.0))
            print(f"| {cls.__name__} | {hw[0] * hw[1]} | 1 | {asc:.4f} |")


if __name__ == "__main__":
    main()
