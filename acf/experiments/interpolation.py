"""``interpolation`` (paper Fig. 6): latent interpolation between test pairs, for every convergence
variant (seed 0). Its figure holds the decoded images, which the CSV does not: ``run`` draws it."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import matplotlib.pyplot as plt
import torch

from ..runfolder import CHECKPOINT
from ..data import to_float
from ..evaluate import count_nonconverged, interpolations
from ..figures import image_grid
from .convergence import convergence_runs
from .measurements import load_trained
from .runs import DEFAULT_OUT, Context, Experiment, PathLike, Scale, finish, run_path, start, variant_columns
from .tables import group, markdown_table, mean_std

NAME = "interpolation"


def run(out: PathLike = DEFAULT_OUT, scale: Union[str, Scale] = "reduced", seeds: Optional[int] = None,
        progress: bool = True) -> Path:
    """Paper Fig. 6 at our scale: decode ``z = (1 - t) z_a + t z_b`` between test pairs for every
    convergence variant (seed 0). Measured: endpoint error (decoding returns the test images),
    pixel path length over the straight-line distance, and inversions that did not converge."""
    ctx = start(NAME, out, scale, seeds, progress)
    s = ctx.scale
    rows, grids = [], {}
    for v, rec in convergence_runs(ctx):
        if rec.cfg.seed != 0 or not (rec.path / CHECKPOINT).exists():
            continue
        model, test = load_trained(rec)
        torch.manual_seed(0)
        imgs, bad = count_nonconverged(lambda: interpolations(model, test, s.interp_pairs, s.interp_steps))
        grids[v.label] = imgs
        ends = to_float(test[slice(0, 2 * s.interp_pairs)][0])
        rows += [{**variant_columns(v), "seed": 0, "pair": p, **m, "nonconverged_blocks": bad, "status": rec.status,
                  "run": run_path(rec, ctx.root)} for p, m in enumerate(path_metrics(imgs, ends, s.interp_steps))]
    return finish(ctx, rows, markdown, lambda rows, path: save_grids(grids, s, path))


def path_metrics(images: torch.Tensor, ends: torch.Tensor, steps: int) -> list[dict]:
    """Per interpolation path (``images``: pairs x steps decoded images, ``ends``: the 2 x pairs test
    images): the largest distance of its ends from the test images, its length in pixel space, the
    straight distance between its ends and their ratio (1: a straight line)."""
    paths = images.reshape(-1, steps, images[0].numel())
    ends = ends.reshape(-1, 2, images[0].numel())
    out = []
    for path, (a, b) in zip(paths, ends):
        length = float((path[1:] - path[:-1]).norm(dim=1).sum())
        direct = float((path[-1] - path[0]).norm())
        out.append({"endpoint_error": max(float((path[0] - a).abs().max()), float((path[-1] - b).abs().max())),
                    "path_length": length, "direct_distance": direct,
                    "path_ratio": length / direct if direct > 0 else float("nan")})
    return out


def save_grids(grids: dict[str, torch.Tensor], s: Scale, path: Path) -> None:
    fig, axes = plt.subplots(len(grids), 1, figsize=(s.interp_steps * 0.9, len(grids) * s.interp_pairs * 0.95 + 0.3),
                             squeeze=False)
    for ax, (label, imgs) in zip(axes[:, 0], grids.items()):
        grid = image_grid(imgs.detach().float().cpu(), s.interp_pairs).numpy()
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=1)
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def markdown(ctx: Context, rows: list[dict]) -> str:
    body = [[variant, len(runs), mean_std((r["endpoint_error"] for r in runs), ".2e"),
             mean_std(r["path_ratio"] for r in runs), mean_std(r["direct_distance"] for r in runs),
             runs[0]["nonconverged_blocks"]] for (variant,), runs in group(rows, "variant").items()]
    return (ctx.header("Latent interpolation between test pairs (paper Fig. 6)",
                       "Claim: ACF interpolates smoothly between unseen test images.")
            + markdown_table(["variant", "pairs", "endpoint error", "path length / straight distance",
                              "straight distance", "non-converged block inversions"], body)
            + f"\n\nSeed 0 of each convergence run; {ctx.scale.interp_steps} equally spaced points per pair "
              "(t = 0 ... 1). Path ratio 1 = the decoded path is a straight line in pixel space; larger = it "
              "detours through other images. Endpoint error: max |decoded - test image| (a dequantisation "
              "bin is 1/256 = 3.9e-03). The figure is `interpolation.png`.")


EXPERIMENT = Experiment(NAME, run, markdown)
