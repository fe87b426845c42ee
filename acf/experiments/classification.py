"""``classification`` (paper Table 3): hybrid i-ResNet without attention, with L2 and with L2-tight
attention: test accuracy of a linear head on ``z``."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Optional, Union

import matplotlib.pyplot as plt
import torch

from ..runfolder import CHECKPOINT
from ..data import ImageDataset, to_float
from ..layers.block import ContractiveBlock
from ..layers.flow import uniform_dequantize
from ..layers.logdet import LogdetEstimator
from ..models import ACFModel
from .measurements import load_trained
from .runs import DEFAULT_OUT, Context, Experiment, PathLike, Scale, Variant, finish, start, summary_row, train_config
from .tables import group, markdown_table, mean_se, mean_std

NAME = "classification"

# Reference numbers printed in the paper (full-scale models, CIFAR10): context, not our results.
PAPER_TABLE3_CIFAR10 = {"Residual Flow": 91.78, "iDenseNet": 92.40, "ACF (iResNet + L2 SA)": 93.75}


@torch.no_grad()
def accuracy(model: ACFModel, test: ImageDataset, n: int, batch_size: int = 128) -> float:
    """Test accuracy of a hybrid model's linear head on ``z`` over the first ``n`` test images.

    ``z`` does not depend on the log-det estimator, so the cheapest one (one series term) is used."""
    blocks = [m for m in model.modules() if isinstance(m, ContractiveBlock)]
    saved = [b.estimator for b in blocks]
    for b in blocks:
        b.estimator = LogdetEstimator(method="series", n_terms=1)
    try:
        n, correct = min(n, len(test)), 0
        for start in range(0, n, batch_size):
            images, labels = test[slice(start, min(start + batch_size, n))]
            z, _ = model(uniform_dequantize(to_float(images)))
            correct += int((model.classify(z).argmax(1) == labels).sum())
    finally:
        for b, est in zip(blocks, saved):
            b.estimator = est
    return correct / n


def run(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
        progress: bool = True) -> Path:
    """Paper Table 3 at our scale: hybrid i-ResNet (bits/dim + cross-entropy of a linear head on z)
    with and without L2 attention; test accuracy on the labelled embedded data sets."""
    ctx = start(NAME, out, scale, seeds, progress)
    rows = []
    for data in ctx.scale.classification_data:
        for att in (None, "l2", "l2-tight"):
            for seed in range(ctx.scale.seeds):
                rec = ctx.run("classification", train_config(ctx.scale, Variant("iresnet", att), seed, "hybrid", data))
                acc, n = None, None
                if (rec.path / CHECKPOINT).exists():
                    model, test = load_trained(rec)
                    torch.manual_seed(seed)
                    n = min(ctx.scale.classification_images, len(test))
                    acc = accuracy(model, test, n)
                row = summary_row(rec, ctx.root, {"data": data, "attention": att or "none"})
                rows.append({**row, "accuracy": acc, "accuracy_images": n})
    return finish(ctx, rows, markdown, plot)


def markdown(ctx: Context, rows: list[dict]) -> str:
    body = []
    for (data, att), runs in group(rows, "data", "attention").items():
        base = {r["seed"]: r["accuracy"] for r in rows if r["data"] == data and r["attention"] == "none"}
        paired = [100 * (r["accuracy"] - base[r["seed"]]) for r in runs
                  if att != "none" and None not in (r["accuracy"], base.get(r["seed"]))]
        body.append([data, Variant("iresnet", None if att == "none" else att).label, len(runs),
                     mean_std((100 * r["accuracy"] for r in runs if r["accuracy"] is not None), ".2f"),
                     "" if att == "none" else mean_se(paired, "+.2f"), mean_std(r["test_bpd"] for r in runs),
                     "" if att == "none" else mean_std((r["gamma_max_abs"] for r in runs), ".1e"),
                     mean_std((r["train_seconds"] for r in runs), ".0f")])
    paper = ", ".join(f"{k} {v:.2f}%" for k, v in PAPER_TABLE3_CIFAR10.items())
    return (ctx.header("Hybrid classification (paper Table 3)",
                       "Claim: ACF (i-ResNet + L2 attention) classifies better than contractive flows without "
                       "attention.", ", ".join(ctx.scale.classification_data))
            + markdown_table(["data", "model", "seeds", "test accuracy (%)",
                              "Δ accuracy vs no attention (paired, ± SE)", "final test bpd",
                              "attention max |gamma|", "train seconds / run"], body)
            + f"\n\nAccuracy of the EMA weights on the first {ctx.scale.classification_images} test images "
              f"(at most the whole test set). Paper, CIFAR10 at full scale: {paper}.")


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = group(rows, "data", "attention")
    for i, ((data, att), runs) in enumerate(groups.items()):
        vals = [100 * r["accuracy"] for r in runs if r["accuracy"] is not None]
        ax.bar(i, statistics.fmean(vals) if vals else 0, yerr=statistics.stdev(vals) if len(vals) > 1 else 0,
               capsize=4, color={"none": "C0", "l2": "C1"}.get(att, "C2"))
        ax.scatter([i] * len(vals), vals, color="k", s=10, zorder=3)
    ax.set_xticks(range(len(groups)), [f"{d}\n{a}" for d, a in groups])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("hybrid i-ResNet: without attention, L2, L2-tight")
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=110, bbox_inches="tight")


EXPERIMENT = Experiment(NAME, run, markdown)
