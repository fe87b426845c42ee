"""``awgn`` (the perturbation analysis of the abstract and section 4): bits/dim and reconstruction
error of every convergence run against additive Gaussian noise."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import matplotlib.pyplot as plt
from tqdm import tqdm

from ..runfolder import CHECKPOINT
from ..evaluate import awgn_robustness
from .convergence import convergence_runs
from .measurements import load_trained
from .runs import DEFAULT_OUT, Context, Experiment, PathLike, Scale, finish, run_path, start, variant_columns
from .tables import group, markdown_table, mean_std, plot_series

NAME = "awgn"


def run(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
        progress: bool = True) -> Path:
    """The paper's perturbation analysis: test images plus Gaussian noise of growing sigma; bits/dim
    and reconstruction error ``max |f^-1(f(x)) - x|`` of every convergence run. Claim: ACF models
    (especially the normalised dot-product, i.e. LipNorm, variant) are more resilient to the noise."""
    ctx = start(NAME, out, scale, seeds, progress)
    rows = []
    for v, rec in tqdm(convergence_runs(ctx), desc="awgn", disable=not progress):
        if not (rec.path / CHECKPOINT).exists():
            continue
        model, test = load_trained(rec)
        for r in awgn_robustness(model, test, ctx.scale.awgn_sigmas, ctx.scale.awgn_images, seed=0):
            rows.append({**variant_columns(v), "seed": rec.cfg.seed, **r, "images": ctx.scale.awgn_images,
                         "status": rec.status, "run": run_path(rec, ctx.root)})
    return finish(ctx, rows, markdown, plot)


def markdown(ctx: Context, rows: list[dict]) -> str:
    clean = {(r["variant"], r["seed"]): r["bits_per_dim"] for r in rows if r["sigma"] == 0}
    body = []
    for (variant, sigma), runs in group(rows, "variant", "sigma").items():
        deltas = [r["bits_per_dim"] - clean[(variant, r["seed"])] for r in runs if (variant, r["seed"]) in clean]
        body.append([variant, sigma, mean_std(r["bits_per_dim"] for r in runs), mean_std(deltas, "+.4f"),
                     mean_std((r["reconstruction_error"] for r in runs), ".2e")])
    header = ["variant", "sigma", "bits/dim", "Δ bits/dim vs sigma 0", "max reconstruction error"]
    return (ctx.header("Robustness to additive white Gaussian noise (paper section 4)",
                       "Claim: ACF models show better and more consistent resilience to additive noise.")
            + markdown_table(header, body)
            + f"\n\n{ctx.scale.awgn_images} test images per run; noise N(0, sigma^2) on the [0, 1] scale is added "
              "to the 8-bit images, which are re-quantised to 8 bits (clipped to 0..255) and dequantised, so "
              "bits/dim stays a likelihood of valid images. Smaller Δ = more resilient; the reconstruction "
              "error is the fixed-point inverse's max |f^-1(f(x)) - x| (tolerance 1e-6).")


def plot(rows: list[dict], path: Path) -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for (variant,), vrows in group(rows, "variant").items():
        sig = sorted({r["sigma"] for r in vrows})
        for ax, key in ((a, "bits_per_dim"), (b, "reconstruction_error")):
            series = [[next((r[key] for r in g if r["sigma"] == s), float("nan")) for s in sig]
                      for g in group(vrows, "seed").values()]
            plot_series(ax, sig, series, variant, marker="o")
    b.set_yscale("log")
    for ax, label in ((a, "bits/dim"), (b, "max |f^-1(f(x)) - x|")):
        ax.set_xlabel("noise sigma")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    a.legend(fontsize=7)
    fig.suptitle("additive white Gaussian noise (mean over seeds, band = min..max)")
    fig.savefig(path, dpi=110, bbox_inches="tight")


EXPERIMENT = Experiment(NAME, run, markdown)
