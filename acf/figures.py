"""PNG figures of a run: samples, reconstructions and the convergence curve (matplotlib, no display)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .data import to_float  # noqa: E402
from .layers.flow import uniform_dequantize  # noqa: E402
from .runfolder import atomic_write  # noqa: E402

if TYPE_CHECKING:
    from .train import Trainer


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


def save_grid(images: torch.Tensor, path: Path, nrow: int, title: str) -> None:
    grid = image_grid(images.detach().float().cpu(), nrow).numpy()
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + 0.4))
    ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
    ax.set_title(title)
    ax.axis("off")
    save_figure(fig, path)


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


@torch.no_grad()
def write_figures(trainer: "Trainer", n: int = 16) -> None:
    """``samples.png``, ``reconstructions.png`` (top: test images, bottom: f^-1(f(x))), ``convergence.png``."""
    run, cfg = trainer.run_dir, trainer.cfg
    model = trainer.ema if trainer.ema is not None else trainer.model
    model.eval()
    name = f"{cfg.arch} + {cfg.attention or 'no'} attention on {cfg.data}, step {trainer.step}"
    save_grid(model.sample(n, temperature=0.8, on_fail="warn"), run / "samples.png", 4, f"samples (T=0.8): {name}")
    images, _ = trainer.test_set[slice(0, 8)]
    x = uniform_dequantize(to_float(images).to(trainer.device))
    z, _ = model(x)
    x_rec = model.inverse(z)
    err = float((x_rec - x).abs().max())
    save_grid(torch.cat([x, x_rec]), run / "reconstructions.png", 2, f"reconstructions (max error {err:.1e})")
    if trainer.history:
        save_convergence(trainer.history, run / "convergence.png", name)
