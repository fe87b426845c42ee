"""What sampling at a temperature below 1 does to a run's digits: test digits decoded from scaled latents.

Run: ``python bench/latent_scaling.py OUT.png [LABEL=]RUN ...`` (CPU, seconds per run; ``LABEL`` names the
run in the figure, else its folder's name). A sample at
temperature ``T`` is ``f^{-1}(c + T eps)``, ``eps ~ N(0, I)``, around the prior's centre ``c`` (the
origin, or a mixture prior's component mean), so how a model treats ``f^{-1}(c + s (f(x) - c))`` for real
digits ``x`` and ``s < 1`` is how its samples change with the temperature: a model whose latent space
keeps a digit's identity along the ray from the centre draws nameable digits at ``T = 0.7``; one whose
origin decodes to a thin "1" thins every digit towards it. For each run the first ``--n`` test images
(dequantised with a fixed seed) are encoded, their latents scaled by each of ``--scales`` about the
centre (the origin, or with a mixture prior the mean of each latent's most likely component; ``0``: the
centre itself), decoded, and drawn one block per scale into ``OUT.png`` (one figure, runs stacked);
printed per run, as a markdown row: the share of pixels above 0.5 ("ink") in the decoded images at each
scale (the data's own is the scale 1 column), and with a mixture prior how many components the latents
are nearest (one: the mixture has collapsed, and the other means hold mass no data uses).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import acf
from acf.data import load_dataset, to_float
from acf.figures import save_grids
from acf.layers.flow import uniform_dequantize
from sample_confidence import ink, labelled_run  # bench/ is the script's directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the figure (PNG)")
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]RUN")
    parser.add_argument("--n", type=int, default=16, help="test images")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.85, 0.7, 0.5, 0.0])
    args = parser.parse_args()
    print("| run | " + " | ".join(f"ink at {s:g} z" for s in args.scales) + " |")
    print("|---|" + "---|" * len(args.scales))
    blocks = []
    for arg in args.runs:
        label, run = labelled_run(arg)
        model = acf.load_run(run, device="cpu")
        images = to_float(load_dataset(model.train_config.data, None, "test").images[:args.n])
        with torch.no_grad():
            z, _ = model(uniform_dequantize(images, torch.Generator().manual_seed(0)))
            nearest = None if model.prior_means is None else torch.cdist(z, model.prior_means).argmin(1)
            centre = torch.zeros_like(z) if nearest is None else model.prior_means[nearest]
            decoded = [model.inverse(centre + s * (z - centre)) for s in args.scales]
        print(f"| {label} | " + " | ".join(f"{float(ink(x).mean()):.3f}" for x in decoded) + " |")
        if nearest is not None:  # a mixture learnt without labels can collapse onto one component
            used = torch.bincount(nearest, minlength=len(model.prior_means))
            print(f"  {label}: the {args.n} latents are nearest {int((used > 0).sum())} of the "
                  f"{len(model.prior_means)} components, the most used one holding {float(used.max()) / args.n:.0%}")
        blocks += [(f"{label}\nz x {s:g}" if i == 0 else f"z x {s:g}", x, -(-args.n // 8))
                   for i, (s, x) in enumerate(zip(args.scales, decoded))]
    save_grids(blocks, args.out, f"the first {args.n} test images, latents scaled and decoded")
    print(args.out)


if __name__ == "__main__":
    main()
