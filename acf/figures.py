"""PNG figures of a run: samples, reconstructions, the convergence curve and the certified Lipschitz
bounds over training (matplotlib, no display)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ._checks import check_int  # noqa: E402
from .runfolder import CLASS_SAMPLE_TEMPERATURE, atomic_write  # noqa: E402

if TYPE_CHECKING:
    from .models import ACFModel

MAX_BLOCK_LINES = 8  # lipschitz.png: one line per residual block up to this many, else max / median / min


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """``(N, C, H, W)`` in ``[0, 1]`` -> one ``(H', W', C)`` grid with a 1-pixel border."""
    n, c, h, w = images.shape
    ncol = -(-n // nrow)
    grid = torch.ones(c, nrow * (h + 1) + 1, ncol * (w + 1) + 1)
    for k in range(n):
        r, q = divmod(k, ncol)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = images[k]
    return grid.permute(1, 2, 0).clamp(0, 1)


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Write ``fig`` to the PNG ``path`` atomically and close it."""
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)


def save_grids(blocks: Sequence[tuple[str, torch.Tensor, int]], path: Path, title: str) -> None:
    """One image grid per ``(label, images, nrow)`` block, stacked top to bottom, each labelled on its
    left (an empty label: none)."""
    grids = [image_grid(images.detach().float().cpu(), nrow).numpy() for _, images, nrow in blocks]
    heights = [6 * g.shape[0] / g.shape[1] for g in grids]
    fig, axes = plt.subplots(len(grids), 1, figsize=(6, sum(heights) + 0.4), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, grid, (label, _, _) in zip(axes[:, 0], grids, blocks):
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label)
        for spine in ax.spines.values():
            spine.set_visible(False)
    axes[0, 0].set_title(title)
    save_figure(fig, path)


def save_grid(images: torch.Tensor, path: Path, nrow: int, title: str) -> None:
    save_grids([("", images, nrow)], path, title)


@torch.no_grad()
def save_samples(model: "ACFModel", path: Path, n: int, temperatures: Sequence[float], title: str,
                 **inverse_kwargs: object) -> None:
    """``n`` samples at each temperature (``model.sample``): one labelled row block per temperature,
    up to 8 images a row (more for large ``n``: the block stays about square)."""
    check_int(n, "number of samples n", minimum=1)
    if not temperatures:
        raise ValueError("no sampling temperature given")
    ncol = min(n, max(8, math.ceil(math.sqrt(n))))
    blocks = [(f"T = {t:g}", model.sample(n, temperature=t, **inverse_kwargs), -(-n // ncol)) for t in temperatures]
    save_grids(blocks, path, title)


@torch.no_grad()
def save_class_samples(model: "ACFModel", path: Path, n: int, temperature: float, title: str,
                       **inverse_kwargs: object) -> None:
    """``n`` samples of each component of a mixture prior (``model.sample(component=k)``), one labelled row per
    component: a class-conditional model's samples by class."""
    if model.prior_means is None:
        raise ValueError("this model's prior N(0, I) has no components (classes) to draw from")
    blocks = [(str(k), model.sample(n, temperature=temperature, component=k, **inverse_kwargs), 1)
              for k in range(len(model.prior_means))]
    save_grids(blocks, path, title)


def save_run_samples(model: "ACFModel", run: Path, n: int, temperatures: Sequence[float], about: str, by_class: bool,
                     **inverse_kwargs: object) -> list[Path]:
    """A run folder's samples (``acf train``, ``acf sample``): ``samples.png``, ``n`` at each temperature, and with
    ``by_class`` (a class-conditional run) ``class_samples.png``, ``n // 2`` of each class at
    ``CLASS_SAMPLE_TEMPERATURE``; ``about`` ends the titles. Returns the paths written."""
    paths = [Path(run) / "samples.png"]
    save_samples(model, paths[0], n, temperatures, f"samples{about}", **inverse_kwargs)
    if by_class:
        paths.append(Path(run) / "class_samples.png")
        save_class_samples(model, paths[1], max(1, n // 2), CLASS_SAMPLE_TEMPERATURE,
                           f"samples by class (T = {CLASS_SAMPLE_TEMPERATURE:g}){about}", **inverse_kwargs)
    return paths


def save_convergence(history: list[dict], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_bpd"] for h in history], label="train (mean since last point)")
    ax.plot(steps, [h["test_bpd"] for h in history], marker="o", label="test (EMA weights)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def save_lipschitz(history: list[dict], path: Path, title: str) -> None:
    """The certified ``Lip(g)`` of the residual blocks at each evaluation against the step: one line per
    block (``lipschitz_blocks``; max / median / min over blocks when there are many), the maximum
    (``lipschitz_max``) for rows written before per-block bounds were recorded, and the line at 1."""
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [h for h in history if h.get("lipschitz_blocks")]
    steps = [h["step"] for h in rows]
    names = list(rows[-1]["lipschitz_blocks"]) if rows else []
    if len(names) <= MAX_BLOCK_LINES:
        for name in names:
            ax.plot(steps, [h["lipschitz_blocks"].get(name, math.nan) for h in rows], marker=".", label=name)
    else:
        per_row = [list(h["lipschitz_blocks"].values()) for h in rows]
        for label, stat in (("max", max), ("median", statistics.median), ("min", min)):
            ax.plot(steps, [stat(v) for v in per_row], marker=".", label=f"{label} over {len(names)} blocks")
    if len(rows) < len(history):
        ax.plot([h["step"] for h in history], [h["lipschitz_max"] for h in history], "k.:", label="max over blocks")
    ax.axhline(1.0, color="tab:red", linestyle="--", linewidth=1, label="1: invertibility lost")
    ax.set_xlabel("step")
    ax.set_ylabel("certified Lip(g)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)
