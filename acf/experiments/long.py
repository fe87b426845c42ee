"""``long``: each architecture without and with L2-tight attention for the scale's ``long_steps``, so
that the comparison is not made after one epoch (the table and figure of ``convergence``)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Optional, Union

from . import convergence
from .runs import DEFAULT_OUT, Context, Experiment, PathLike, Scale, Variant, finish, get_scale, start, train_config
from .tables import ATTENTION_NOTE

NAME = "long"


def run(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
        progress: bool = True) -> Path:
    """Each architecture without and with L2-tight attention for the scale's ``long_steps`` (13 epochs
    of MNIST-5k at the reduced scale), so that the comparison is not made after one epoch."""
    s = get_scale(scale, seeds)
    ctx = start(NAME, out, replace(s, steps=s.long_steps, eval_every=s.long_eval_every), seeds, progress)
    rows = []
    for arch in ("iresnet", "resflow", "idensenet"):
        for att in (None, "l2-tight"):
            for seed in range(ctx.scale.seeds):
                v = Variant(arch, att)
                rows += convergence.curve_rows(ctx, v, ctx.run("long", train_config(ctx.scale, v, seed)))
    return finish(ctx, rows, markdown, convergence.plot)


def markdown(ctx: Context, rows: list[dict]) -> str:
    return (ctx.header("Longer runs: with and without L2-tight attention",
                       "Question: does attention that can act (L2-tight) change bits/dim once training is "
                       "past its first epoch?")
            + convergence.curves_table(rows, paper=False)
            + "\n\nΔ < 0: attention lowers bits/dim (mean of the per-seed differences ± its standard error). "
            + ATTENTION_NOTE)


EXPERIMENT = Experiment(NAME, run, markdown)
