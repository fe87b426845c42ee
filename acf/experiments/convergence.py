"""``convergence`` (paper Table 1, Fig. 3): i-ResNet, Residual Flow and invertible DenseNet, each
without and with L2 (and L2-tight) attention, and Residual Flow with LipNorm attention, same steps,
several seeds. Its runs are reused by ``heads``, ``awgn``, ``dot``, ``tight`` and ``interpolation``."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import matplotlib.pyplot as plt

from .measurements import attention_columns
from .runs import (DEFAULT_OUT, Context, Experiment, PathLike, RunRecord, Scale, Variant, finish, run_columns, start,
                   train_config, variant_columns)
from .tables import ATTENTION_HEADER, ATTENTION_NOTE, attention_cells, final_rows, group, markdown_table, mean_se, \
    mean_std, plot_series

NAME = "convergence"


CONVERGENCE_VARIANTS = tuple(Variant(arch, att) for arch, atts in (
    ("iresnet", (None, "l2", "l2-tight")), ("resflow", (None, "l2", "l2-tight", "lipnorm")),
    ("idensenet", (None, "l2", "l2-tight"))) for att in atts)

# Reference numbers printed in the paper (full-scale models, full data sets): context, not our results.
PAPER_TABLE1_MNIST = {("iresnet", None): 1.05, ("iresnet", "l2"): 0.87, ("resflow", None): 0.97,
                      ("resflow", "l2"): 0.90, ("resflow", "lipnorm"): 1.14}


def convergence_runs(ctx: Context) -> list[tuple[Variant, RunRecord]]:
    """Every convergence variant x seed (owned by ``convergence``; other experiments reuse them)."""
    return [(v, ctx.run("convergence", train_config(ctx.scale, v, seed)))
            for v in CONVERGENCE_VARIANTS for seed in range(ctx.scale.seeds)]


def run(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
        progress: bool = True) -> Path:
    """Paper Table 1 and Fig. 3 at our scale: does attention lower bits/dim and speed up convergence?
    Seven variants (three flows without / with L2 attention, Residual Flow with LipNorm) trained for
    the same steps on the same data order per seed; test bits/dim curves and final values."""
    ctx = start(NAME, out, scale, seeds, progress)
    rows = []
    for v, rec in convergence_runs(ctx):
        rows += curve_rows(ctx, v, rec)
    return finish(ctx, rows, markdown, plot)


def curve_rows(ctx: Context, v: Variant, rec: RunRecord) -> list[dict]:
    """One row per evaluation of a run (its test bits/dim curve), with the run's attention share."""
    ident = {**variant_columns(v), "seed": rec.cfg.seed, **attention_columns(rec, ctx.scale)}
    return [{**ident, "step": h.get("step"), "train_bpd": h.get("train_bpd"), "test_bpd": h.get("test_bpd"),
             "train_seconds": h.get("seconds"), "lipschitz_max": h.get("lipschitz_max"), **run_columns(rec, ctx.root)}
            for h in rec.history or [{}]]


def _paired_delta(finals: list[dict], row: dict) -> list[float]:
    """Final test bits/dim minus that of the same architecture without attention, per seed."""
    base = {r["seed"]: r["test_bpd"] for r in finals if r["arch"] == row["arch"] and r["attention"] == "none"}
    return [r["test_bpd"] - base[r["seed"]] for r in finals
            if r["variant"] == row["variant"] and r["seed"] in base and None not in (r["test_bpd"], base[r["seed"]])]


def curves_table(rows: list[dict], paper: bool) -> str:
    """Per variant: bits/dim at the first evaluation and at the end, the paired difference to the same
    architecture without attention, the attention's weight and share, time (and the paper's number)."""
    finals = final_rows(rows, "variant", "seed")
    first_step = min(r["step"] for r in rows if r["step"] is not None)
    body = []
    for (variant,), runs in group(finals, "variant").items():
        r0 = runs[0]
        firsts = [r["test_bpd"] for r in rows if r["variant"] == variant and r["step"] == first_step]
        delta = "" if r0["attention"] == "none" else mean_se(_paired_delta(finals, r0))
        number = PAPER_TABLE1_MNIST.get((r0["arch"], None if r0["attention"] == "none" else r0["attention"]))
        body.append([variant, len(runs), sum(r["status"] != "ok" for r in runs), mean_std(firsts),
                     mean_std(r["test_bpd"] for r in runs), delta, *attention_cells(runs),
                     mean_std(r["train_bpd"] for r in runs), mean_std((r["train_seconds"] for r in runs), ".0f")]
                    + (["-" if number is None else f"{number:.2f}"] if paper else []))
    header = ["variant", "seeds", "failed", f"test bpd @ step {first_step}", "final test bpd",
              "Δ vs no attention (paired by seed, ± SE)", *ATTENTION_HEADER, "final train bpd",
              "train seconds / run"] + (["paper MNIST (Table 1)"] if paper else [])
    return markdown_table(header, body)


def markdown(ctx: Context, rows: list[dict]) -> str:
    return (ctx.header("Convergence with and without attention (paper Table 1, Fig. 3)",
                       "Claim: attention improves bits/dim of every contractive flow and converges faster.")
            + curves_table(rows, paper=True)
            + "\n\nΔ < 0: attention lowers bits/dim (mean of the per-seed differences ± its standard error). "
            + ATTENTION_NOTE + " Spread elsewhere: sample std over seeds. The paper's numbers are for "
              "full-size models trained to convergence on full MNIST; ours are small CPU models after a few "
              "hundred steps on MNIST-5k, so only the comparison within a row group is meaningful.")


def plot(rows: list[dict], path: Path) -> None:
    archs = list(group(rows, "arch"))
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 4), squeeze=False)
    for ax, (arch,) in zip(axes[0], archs):
        for (variant,), vrows in group([r for r in rows if r["arch"] == arch], "variant").items():
            runs = [g for g in group(vrows, "seed").values() if g[0]["step"] is not None]
            if not runs:
                continue
            steps = sorted({r["step"] for g in runs for r in g})
            series = [[next((r["test_bpd"] for r in g if r["step"] == s), float("nan")) for s in steps] for g in runs]
            plot_series(ax, steps, series, variant, marker="o")
        ax.set_title(arch)
        ax.set_xlabel("step")
        ax.set_ylabel("test bits/dim (EMA)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("convergence: mean over seeds, band = min..max")
    fig.savefig(path, dpi=110, bbox_inches="tight")


EXPERIMENT = Experiment(NAME, run, markdown)
