"""How often a digit classifier is sure of a run's samples: a reader's count of nameable samples, made repeatable.

Run: ``python bench/sample_confidence.py [LABEL=]RUN ... [--figure OUT.png]`` (CPU, about a minute for the
classifier, then seconds per run; ``LABEL`` names the run in the table and figure, else its folder's name).
A small CNN is trained on the run's data set's training split (MNIST-5k: 4,000 images, 8 epochs, random
shifts of up to 2 pixels; it prints its test accuracy, about 0.97), then for each run ``--n`` samples at
``--temperature`` from ``torch.manual_seed(--seed)`` (the same latents for every run of the same image size
and prior) are classified. Printed per run, as a markdown row: the test bits/dim of its last evaluation;
"thin", the share of samples with less ink (pixels above 0.5) than the training images' 5th percentile;
the mean top-class probability, and the share of samples the classifier gives a class with probability
above 0.9 and above 0.99; how many classes the sure ones fall in and the largest class's share of them (a
prior that collapses onto a few digits shows here); and how far the samples are from the training set:
the median distance (pixels in [0, 1], L2) from a sample to its nearest training image over the same
median for the test images (about 1: as new as unseen data; far below 1: copies of training images); and for
a class-conditional run (``acf train``'s default task) the share of samples the classifier puts in the class
they were drawn from (classes in turn, 0, 1, ..., 9, 0, ...).
``--figure`` draws each run's first 32 samples, one block per run. A classifier is also sure of some
shapes no reader would name, so this ranks runs; it does not replace looking at ``samples.png``.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import acf
from acf.data import DATASETS, load_dataset, to_float
from acf.figures import save_grids


def classifier(channels: int, hw: tuple[int, int], classes: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64 * (hw[0] // 4) * (hw[1] // 4), 128), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(128, classes))


def images_and_labels(data: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = load_dataset(data, None, split)
    return to_float(dataset.images), dataset.labels


def train_classifier(data: str, epochs: int = 8, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    x, y = images_and_labels(data, "train")
    xt, yt = images_and_labels(data, "test")
    classes = DATASETS[data].n_classes
    if classes == 0:
        raise SystemExit(f"{data} has no labels: no classifier to train")
    net = classifier(x.shape[1], tuple(x.shape[2:]), classes)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(64):
            shift = tuple(int(s) for s in torch.randint(-2, 3, (2,)))
            loss = F.cross_entropy(net(torch.roll(x[idx], shift, dims=(2, 3))), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        print(f"classifier: test accuracy {float((net(xt).argmax(1) == yt).float().mean()):.3f}")
    return net


def labelled_run(arg: str) -> tuple[str, Path]:
    """``LABEL=RUN`` or ``RUN`` -> ``(label, run folder)``; the label defaults to the folder's name."""
    label, _, path = arg.rpartition("=")
    return label or Path(path).name, Path(path)


def ink(x: torch.Tensor) -> torch.Tensor:
    """Per image, the share of pixels above 0.5."""
    return (x > 0.5).float().flatten(1).mean(1)


def nearest_distance(x: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """Per image of ``x``, the L2 distance to its nearest image of ``train`` (both flattened)."""
    return torch.cdist(x.flatten(1).double(), train.flatten(1).double()).amin(1)


def last_test_bpd(run: Path) -> str:
    rows = [r for r in csv.DictReader((run / "metrics.csv").read_text().splitlines()) if r.get("test_bpd")]
    return f"{float(rows[-1]['test_bpd']):.4f}" if rows else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="[LABEL=]RUN")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--figure", type=Path, help="also draw each run's first 32 samples into this PNG")
    args = parser.parse_args()
    labelled = [labelled_run(arg) for arg in args.runs]
    models = [acf.load_run(run, device="cpu") for _, run in labelled]
    data = {m.train_config.data for m in models}
    if len(data) != 1:
        raise SystemExit(f"the runs were trained on different data sets ({sorted(data)}); score them separately")
    data = data.pop()
    net = train_classifier(data)
    train, test = images_and_labels(data, "train")[0], images_and_labels(data, "test")[0]
    thin = float(ink(train).quantile(0.05))
    novelty = float(nearest_distance(test, train).median())
    print(f"({args.n} samples, T = {args.temperature:g}, seed {args.seed}; thin: ink below the training images' 5th "
          f"percentile, {thin:.3f}; the test images' median distance to the nearest training image: {novelty:.2f})")
    print("| run | test bits/dim | thin | mean top probability | top > 0.9 | top > 0.99 | classes (> 0.9) | "
          "largest class | nearest training image / test's | in the class drawn |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    blocks = []
    for (label, run), model in zip(labelled, models):
        drawn = torch.arange(args.n) % len(model.prior_means) if model.train_config.task == "conditional" else None
        torch.manual_seed(args.seed)
        with torch.no_grad():
            x = model.sample(args.n, temperature=args.temperature, component=drawn)
            prob = F.softmax(net(x), dim=1)
        top, label_of = prob.max(1)
        counts = torch.bincount(label_of[top > 0.9], minlength=prob.shape[1])
        largest = f"{float(counts.max() / counts.sum()):.2f}" if counts.sum() else "-"
        ratio = float(nearest_distance(x, train).median()) / novelty
        bpd = last_test_bpd(run)
        print(f"| {label} | {bpd} | {float((ink(x) < thin).float().mean()):.3f} | {float(top.mean()):.3f} "
              f"| {float((top > 0.9).float().mean()):.3f} | {float((top > 0.99).float().mean()):.3f} "
              f"| {int((counts > 0).sum())} | {largest} | {ratio:.2f} "
              f"| {'-' if drawn is None else f'{float((label_of == drawn).float().mean()):.3f}'} |")
        blocks.append((f"{label} ({bpd})", x[:32], 4))
    if args.figure is not None:
        save_grids(blocks, args.figure, f"temperature {args.temperature:g}, torch.manual_seed({args.seed}) for every run")
        print(args.figure)


if __name__ == "__main__":
    main()
