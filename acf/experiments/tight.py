"""``tight``: the logit range ``Delta`` of L2-tight attention, swept in Residual Flow against Residual
Flow without attention, and attention that starts switched on (gamma = 1)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional, Union

import matplotlib.pyplot as plt

from ..layers.attention_bounds import l2_tight_constant
from ..train import TrainConfig
from .measurements import attention_columns
from .runs import DEFAULT_OUT, Context, Experiment, PathLike, Scale, Variant, finish, start, summary_row, train_config
from .tables import ATTENTION_HEADER, ATTENTION_NOTE, attention_cells, group, markdown_table, mean_se, mean_std

NAME = "tight"


def run(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
        progress: bool = True) -> Path:
    """The logit range ``Delta`` of L2-tight attention, swept once: Residual Flow + L2-tight at each
    ``Delta`` of the scale against Residual Flow without attention, same seeds (the default ``Delta``'s
    runs are the convergence runs). A larger ``Delta`` allows sharper attention but costs certificate
    (``L`` grows with ``f(Delta, N)``)."""
    ctx = start(NAME, out, scale, seeds, progress)
    default = TrainConfig().delta_max
    rows = []
    for seed in range(ctx.scale.seeds):
        rec = ctx.run("convergence", train_config(ctx.scale, Variant("resflow", None), seed))
        rows.append(summary_row(rec, ctx.root, {"attention": "none", "delta_max": None}))
    sweep = [(delta, None) for delta in ctx.scale.deltas] + [(default, 1.0)]  # and gamma starting at 1
    for delta, gamma_init in sweep:
        for seed in range(ctx.scale.seeds):
            owner = "convergence" if (delta, gamma_init) == (default, None) else "tight"
            v = Variant("resflow", "l2-tight", delta_max=delta, gamma_init=gamma_init)
            rec = ctx.run(owner, train_config(ctx.scale, v, seed))
            rows.append(summary_row(rec, ctx.root, {"attention": "l2-tight", "delta_max": delta,
                                                    "gamma_init": gamma_init or 0.0,
                                                    "f_196": l2_tight_constant(delta, 196),
                                                    **attention_columns(rec, ctx.scale)}))
    return finish(ctx, rows, markdown, plot)


def markdown(ctx: Context, rows: list[dict]) -> str:
    base = {r["seed"]: r["test_bpd"] for r in rows if r["attention"] == "none"}
    body = []
    for (delta, gamma_init), runs in group([r for r in rows if r["attention"] != "none"], "delta_max",
                                           "gamma_init").items():
        paired = [r["test_bpd"] - base[r["seed"]] for r in runs if None not in (r["test_bpd"], base.get(r["seed"]))]
        body.append([f"{delta:g}", f"{gamma_init:g}", f"{runs[0]['f_196']:.2f}", len(runs),
                     mean_std(r["test_bpd"] for r in runs), mean_se(paired), *attention_cells(runs),
                     mean_std((r["train_seconds"] for r in runs), ".0f")])
    return (ctx.header("The logit range of L2-tight attention",
                       "Question: does a wider logit range (sharper attention, a looser certificate) help, and "
                       "what does attention that starts switched on (gamma = 1) do?")
            + markdown_table(["Δ_max", "initial gamma", "f(Δ, 196)", "seeds", "final test bpd",
                              "Δ bpd vs no attention (paired, ± SE)", *ATTENTION_HEADER, "train seconds / run"], body)
            + f"\n\nResidual Flow + L2-tight attention (4 grouped heads); no attention: "
              f"{mean_std(base.values())}. f(Δ, N): the certificate's factor, L = f ||M||, at the first "
              f"scale's N = 196. " + ATTENTION_NOTE)


def plot(rows: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    runs = [r for r in rows if r["attention"] != "none" and not r["gamma_init"]]
    deltas = sorted({r["delta_max"] for r in runs})
    for ax, key, label in ((axes[0], "test_bpd", "final test bits/dim"), (axes[1], "attention_share", "attention share")):
        vals = [[r[key] for r in runs if r["delta_max"] == d and r.get(key) is not None] for d in deltas]
        ax.errorbar(deltas, [statistics.fmean(v) if v else float("nan") for v in vals],
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals], marker="o", capsize=4,
                    label="ResFlow + L2-tight")
        if key == "test_bpd":
            none = [r["test_bpd"] for r in rows if r["attention"] == "none" and r["test_bpd"] is not None]
            if none:
                ax.axhline(statistics.fmean(none), color="gray", linestyle="--", label="no attention")
        ax.set_xlabel("Δ_max")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("L2-tight attention: logit range")
    fig.savefig(path, dpi=110, bbox_inches="tight")


EXPERIMENT = Experiment(NAME, run, markdown)
