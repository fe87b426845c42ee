"""How often a digit classifier is sure of a run's samples: a reader's count of nameable samples, made repeatable.

Run: ``python bench/sample_confidence.py RUN [RUN ...]`` (CPU, about a minute for the classifier, then
seconds per run). A small CNN is trained on the run's data set's training split (MNIST-5k: 4,000 images,
8 epochs, random shifts of up to 2 pixels; it prints its test accuracy, about 0.97), then for each run
``--n`` samples at ``--temperature`` from ``torch.manual_seed(--seed)`` (the same latents for every run of
the same image size) are classified. Printed per run, as a markdown row: the test bits/dim of its last
evaluation, the mean top-class probability, and the share of samples the classifier gives a class with
probability above 0.9 and above 0.99. A classifier is also sure of some shapes no reader would name, so
this ranks runs; it does not replace looking at ``samples.png``.
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


def last_test_bpd(run: Path) -> str:
    rows = [r for r in csv.DictReader((run / "metrics.csv").read_text().splitlines()) if r.get("test_bpd")]
    return f"{float(rows[-1]['test_bpd']):.4f}" if rows else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--seed", type=int, default=123)
    args = parser.parse_args()
    models = [acf.load_run(run, device="cpu") for run in args.runs]
    data = {m.train_config.data for m in models}
    if len(data) != 1:
        raise SystemExit(f"the runs were trained on different data sets ({sorted(data)}); score them separately")
    net = train_classifier(data.pop())
    print(f"| run | test bits/dim | mean top probability | top > 0.9 | top > 0.99 |  ({args.n} samples, T = "
          f"{args.temperature:g}, seed {args.seed})")
    print("|---|---|---|---|---|")
    for run, model in zip(args.runs, models):
        torch.manual_seed(args.seed)
        with torch.no_grad():
            top = F.softmax(net(model.sample(args.n, temperature=args.temperature)), dim=1).amax(1)
        print(f"| {run.name} | {last_test_bpd(run)} | {float(top.mean()):.3f} | {float((top > 0.9).float().mean()):.3f} "
              f"| {float((top > 0.99).float().mean()):.3f} |")


if __name__ == "__main__":
    main()
