"""``heads`` (paper Table 2): Residual Flow + L2 and L2-tight attention with 1, 4 and 16 heads."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional, Union

import matplotlib.pyplot as plt

from .convergence import CONVERGENCE_VARIANTS
from .measurements import attention_columns
from .runs import DEFAULT_OUT, Context, Experiment, PathLike, Scale, Variant, finish, start, summary_row, train_config
from .tables import ATTENTION_HEADER, ATTENTION_NOTE, attention_cells, group, markdown_table, mean_std

NAME = "heads"

# Reference numbers printed in the paper (full-scale models, full data sets): context, not our results.
PAPER_TABLE2 = {1: (0.99, 3.45), 4: (0.90, 3.35), 16: (0.94, 3.34)}  # heads: (MNIST, CIFAR10) bits/dim


def run(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
        progress: bool = True) -> Path:
    """Paper Table 2 at our scale: Residual Flow + L2 attention with 1, 4 and 16 heads (the 4-head runs
    are the convergence runs). The paper finds 4 heads best on MNIST (0.90 vs 0.99 for one head)."""
    ctx = start(NAME, out, scale, seeds, progress)
    rows = []
    for att in ("l2", "l2-tight"):
        for h in ctx.scale.heads:
            v = Variant("resflow", att, h)
            for seed in range(ctx.scale.seeds):
                owner = "convergence" if v in CONVERGENCE_VARIANTS else "heads"
                rec = ctx.run(owner, train_config(ctx.scale, v, seed))
                rows.append(summary_row(rec, ctx.root, {"attention": att, "heads": h,
                                                        **attention_columns(rec, ctx.scale)}))
    return finish(ctx, rows, markdown, plot)


def markdown(ctx: Context, rows: list[dict]) -> str:
    body = []
    for (att, h), runs in group(rows, "attention", "heads").items():
        paper = [f"{x:.2f}" for x in PAPER_TABLE2[h]] if h in PAPER_TABLE2 and att == "l2" else ["-", "-"]
        body.append([att, h, len(runs), sum(r["status"] != "ok" for r in runs), mean_std(r["test_bpd"] for r in runs),
                     *attention_cells(runs), mean_std(r["train_bpd"] for r in runs),
                     mean_std((r["train_seconds"] for r in runs), ".0f"), *paper])
    header = ["attention", "heads", "seeds", "failed", "final test bpd", *ATTENTION_HEADER, "final train bpd",
              "train seconds / run", "paper MNIST", "paper CIFAR10"]
    return (ctx.header("Number of attention heads (paper Table 2)",
                       "Claim: multi-head L2 attention beats a single head (best: 4 heads on MNIST).")
            + markdown_table(header, body)
            + "\n\nResidual Flow + L2 attention (Kim et al.'s bound) or L2-tight attention (grouped heads: "
              "each head attends over its own channels; one head is one map over all of them). "
            + ATTENTION_NOTE + " The paper's columns are full-scale results for L2 attention.")


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    hs = sorted({r["heads"] for r in rows})
    for i, (att,) in enumerate(group(rows, "attention")):
        vals = [[r["test_bpd"] for r in rows if r["heads"] == h and r["attention"] == att
                 and r["test_bpd"] is not None] for h in hs]
        means = [statistics.fmean(v) if v else float("nan") for v in vals]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        ax.errorbar(hs, means, yerr=stds, marker="o", capsize=4, label=f"{att}: mean ± std", color=f"C{i}")
        for h, v in zip(hs, vals):
            ax.scatter([h] * len(v), v, color=f"C{i}", s=12, zorder=3, alpha=0.5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(hs, [str(h) for h in hs])
    ax.set_xlabel("heads")
    ax.set_ylabel("final test bits/dim")
    ax.set_title("ResFlow + attention: heads")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


EXPERIMENT = Experiment(NAME, run, markdown)
