"""pytest-benchmark of one training step with and without L2 attention.

    python -m pytest bench/bench_train_step.py --benchmark-only -s   # table + ratio summary
    python bench/bench_train_step.py [--rounds 9 --repeats 3 --out bench/results/DATE-cpu-train-step.md]
    python bench/bench_train_step.py --legacy-sn   # also the uncertified one-step spectral normalisation

The workload is a training step of the ``cpu`` preset's Residual Flow on MNIST-5k, batch 64,
Russian-roulette log-det with the Neumann gradient (so each step runs the attention forward, about
six VJPs and one double VJP per attention layer). Variants, side by side in one run:
``none`` (no attention), ``l2-cpu`` (L2 attention on ``acf._C``'s CPU kernels: what ``auto`` picks),
``l2-tight-cpu`` (L2-tight attention on the same kernels) and ``l2-reference`` (L2 attention on the
materialising PyTorch reference). Every timed step
re-seeds the global generator, so all variants draw the same number of log-det terms.

``--legacy-sn`` adds ``none+legacy-sn`` and ``l2-cpu+legacy-sn``: the same steps under the spectral
normalisation this project used before it certified every forward (Residual Flows' convention: one
warm-started power-iteration step per training forward, scale from ``u^T W v``, a lower bound), so
that the cost of the certificate is measured side by side.

``--widths`` adds wider models, in the same interleaved rounds: the CPU preset's Residual Flow (2
scales x 2 blocks) with 4 fully connected blocks and ``hidden`` 64, 128 and 256 channels, 4 heads
(head dims 16, 32, 64), batch 32, the memory-efficient log-det gradient; variants ``h<hidden>:none``,
``h<hidden>:l2-cpu`` and ``h<hidden>:l2-tight-cpu`` (``auto``'s kernels), each compared with the
``none`` step of its own width (``--out-widths`` writes that table).

``--full-resolution`` adds the paper's layout, in the same rounds: as ``--widths`` but without the
first squeeze, so the two blocks of the first stage attend over all 784 pixels of an MNIST image (196
in the second stage); variants ``f<hidden>:none``, ``f<hidden>:l2-cpu`` and ``f<hidden>:l2-tight-cpu``
(attention joined in the default form) and ``f<hidden>:l2-cpu+residual`` (the paper's eq. 13), each
compared with ``f<hidden>:none`` (``--out-full`` writes that table).
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from unittest import mock

import pytest
import torch

from acf.layers.attention import set_attention_backend
from acf.ops.l2_attention import cpu_kernels_available
from acf.ops.power_iteration import spectral_norms
from acf.layers.spectral_norm import _SpectralNormalized
from acf.train import TrainConfig, Trainer

VARIANTS = {"none": (None, None), "l2-cpu": ("l2", "extension"), "l2-tight-cpu": ("l2-tight", "extension"),
            "l2-reference": ("l2", "reference")}
WIDTHS = (64, 128, 256)
WIDTH_VARIANTS = ("none", "l2-cpu", "l2-tight-cpu")
FULL_VARIANTS = ("none", "l2-cpu", "l2-cpu+residual", "l2-tight-cpu")
# Training settings, pinned (not acf train's defaults, which may move): the CPU preset as measured since
# 2026-11-28, and the wider models of --widths.
PRESET_RUN = dict(preset="cpu", batch_size=64, max_grad_norm=None)
WIDTH_RUN = dict(preset="cpu", batch_size=32, grad="memory_efficient", max_grad_norm=None)
FULL_MODEL = dict(squeeze_first=False, fc_blocks=4, fc_hidden=128)  # with WIDTH_RUN: --full-resolution
RESULTS: dict[str, float] = {}


def _legacy_sigma(layer: _SpectralNormalized) -> torch.Tensor:
    if layer.training:
        spectral_norms([layer.weight.detach()], n_iter=1, us=[layer.u], vs=[layer.v])
    return (layer.u.clone() * layer._op(layer.v.clone())).sum()


@contextlib.contextmanager
def legacy_spectral_norm():
    """One power-iteration step per training forward and ``sigma = u^T W v`` (no certified bound)."""
    with mock.patch.object(_SpectralNormalized, "sigma", _legacy_sigma), \
            mock.patch("acf.layers.block.refresh_spectral_norms"), mock.patch("acf.models.refresh_spectral_norms"):
        yield


def make_trainer(variant: str) -> Trainer:
    """The trainer of a variant: ``name`` (CPU preset), ``name+legacy-sn``, ``h<hidden>:name`` (wider),
    ``f<hidden>:name`` (wider, full resolution) or ``f<hidden>:name+residual`` (attention as eq. 13)."""
    width, _, name = variant.rpartition(":")
    name, *modifiers = name.split("+")
    attention, backend = VARIANTS[name]
    settings, model = PRESET_RUN, {}
    if width:
        settings, model = WIDTH_RUN, dict(hidden=int(width[1:]), fc_blocks=4)
        if width.startswith("f"):
            model.update(FULL_MODEL)
    form = {"attention_form": "residual"} if "residual" in modifiers else {}
    cfg = TrainConfig(attention=attention, steps=1000, model=model, **settings, **form)
    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="acf-bench-"))
    if backend is not None:
        set_attention_backend(trainer.model, backend)
    return trainer


def baseline(variant: str) -> str:
    """The variant without attention that ``variant`` is compared with (same width)."""
    width, _, _ = variant.rpartition(":")
    return f"{width}:none" if width else "none"


def timed_step(trainer: Trainer, seed: int, legacy: bool = False) -> float:
    torch.manual_seed(seed)
    with legacy_spectral_norm() if legacy else contextlib.nullcontext():
        start = time.perf_counter()
        trainer.train_step()
        return time.perf_counter() - start


def summary_table(res: dict[str, float]) -> str:
    lines = ["training step (CPU preset, batch 64; h<hidden>: wider, batch 32; f<hidden>: wider, full resolution), "
             "best of the rounds:"]
    for name, sec in res.items():
        base = res.get(baseline(name))
        ratio = f"  {sec / base:5.2f}x the step without attention" if base else ""
        lines.append(f"  {name:21s} {sec * 1e3:8.1f} ms{ratio}")
    for name, sec in res.items():
        if name + "+legacy-sn" in res:
            lines.append(f"  certified spectral norms, {name}: {sec / res[name + '+legacy-sn']:.3f}x the legacy step")
    return "\n".join(lines)


@pytest.fixture(scope="module", autouse=True)
def _summary():
    yield
    if RESULTS:
        print("\n" + summary_table(RESULTS))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_train_step(benchmark, variant):
    if variant.endswith("-cpu") and not cpu_kernels_available():
        pytest.skip("acf._C (CPU attention kernels) not built")
    benchmark.group = "training step, CPU preset"
    trainer = make_trainer(variant)
    trainer.train_step()  # warm-up
    seeds = iter(range(10_000))
    benchmark.pedantic(lambda: timed_step(trainer, next(seeds)), rounds=5, warmup_rounds=1)
    RESULTS[variant] = benchmark.stats.stats.min


def main(rounds: int = 5, repeats: int = 1, legacy_sn: bool = False, widths: bool = False,
         full: bool = False) -> list[dict[str, float]]:
    """Interleave the variants round by round (fairer on a shared machine), ``repeats`` times;
    print each summary and return the best-of-rounds seconds per variant of each repeat."""
    def runnable(v: str) -> bool:  # the "-cpu" variants need acf._C's kernels
        return "-cpu" not in v or cpu_kernels_available()

    names = [v for v in VARIANTS if runnable(v)]
    if legacy_sn:
        names += [v + "+legacy-sn" for v in names if v != "l2-reference"]
    if widths:
        names += [f"h{h}:{v}" for h in WIDTHS for v in WIDTH_VARIANTS if runnable(v)]
    if full:
        names += [f"f{h}:{v}" for h in WIDTHS for v in FULL_VARIANTS if runnable(v)]
    trainers = {v: make_trainer(v) for v in names}
    for v, trainer in trainers.items():
        timed_step(trainer, 0, v.endswith("+legacy-sn"))  # warm-up
    out = []
    for _ in range(repeats):
        times: dict[str, list[float]] = {v: [] for v in names}
        for r in range(rounds):
            for v in names:
                times[v].append(timed_step(trainers[v], r, v.endswith("+legacy-sn")))
        out.append({v: min(ts) for v, ts in times.items()})
        print(summary_table(out[-1]))
    return out


def write_markdown(path: str, results: list[dict[str, float]], rounds: int) -> None:
    """The repeats as a markdown table, with the machine and versions."""
    from acf.experiments import machine_info

    m = machine_info()
    names = [v for v in results[0] if ":" not in v]  # the CPU preset (write_widths_markdown: the rest)
    lines = [f"# Training step, CPU preset ({m['date'][:10]})", "",
             f"`python bench/bench_train_step.py --rounds {rounds} --repeats {len(results)}`: {m['cpu']}, "
             f"{m['torch_threads']} threads, torch {m['torch']}. Best of {rounds} interleaved "
             "rounds per repeat; the ratio is to the step without attention in the same repeat.", "",
             "| repeat | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, res in enumerate(results, 1):
        cells = [f"{res[v] * 1e3:.1f} ms ({res[v] / res['none']:.2f}x)" for v in names]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_widths_markdown(path: str, results: list[dict[str, float]], rounds: int, full: bool = False) -> None:
    """The CPU preset and the wider models (``full``: at full resolution), one row per width and repeat:
    each step and its ratio to the step without attention of the same width and repeat."""
    from acf.experiments import machine_info

    m = machine_info()
    prefix, variants = ("f", FULL_VARIANTS) if full else ("h", WIDTH_VARIANTS)
    kinds = [v for v in variants if f"{prefix}{WIDTHS[0]}:{v}" in results[0]]
    layout = ("full resolution (no first squeeze: 784 tokens in the first stage, 196 in the second), "
              if full else "")
    flag = "--full-resolution" if full else "--widths"
    lines = [f"# Training step at several widths, {layout}attention against none ({m['date'][:10]})", "",
             f"`python bench/bench_train_step.py {flag} --rounds {rounds} --repeats {len(results)}`: {m['cpu']}, "
             f"{m['torch_threads']} threads, torch {m['torch']}. Best of {rounds} interleaved rounds per repeat; "
             "every variant of every width runs in the same rounds." + (
                 " `l2-cpu`, `l2-tight-cpu`: attention joined as gated blocks (the default form); "
                 "`l2-cpu+residual`: inside every branch (the paper's eq. 13)." if full else ""), "",
             "| model | repeat | " + " | ".join(kinds) + " |", "|---" * (len(kinds) + 2) + "|"]
    models = [] if full else [("CPU preset: hidden 32, head dim 8, no FC blocks, batch 64, Neumann gradient", "")]
    models += [(f"hidden {h}, head dim {h // 4}, 4 FC blocks of {FULL_MODEL['fc_hidden'] if full else 64}, "
                "batch 32, memory-efficient gradient", f"{prefix}{h}:") for h in WIDTHS]
    for label, prefix in models:
        for i, res in enumerate(results, 1):
            base = res[prefix + "none"]
            cells = [f"{res[prefix + v] * 1e3:.0f} ms ({res[prefix + v] / base:.2f}x)" for v in kinds]
            lines.append(f"| {label} | {i} | " + " | ".join(cells) + " |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="also write the repeats as a markdown table to this file")
    parser.add_argument("--legacy-sn", action="store_true",
                        help="also time the uncertified one-step spectral normalisation (the cost of the certificate)")
    parser.add_argument("--widths", action="store_true",
                        help=f"also time wider models (hidden {', '.join(map(str, WIDTHS))}, 4 heads, 4 FC blocks, "
                             "batch 32)")
    parser.add_argument("--out-widths", help="with --widths: write the per-width table (markdown) to this file")
    parser.add_argument("--full-resolution", action="store_true",
                        help="also time the wider models without the first squeeze (784 tokens in the first stage)")
    parser.add_argument("--out-full", help="with --full-resolution: write its per-width table (markdown) to this file")
    args = parser.parse_args()
    found = main(args.rounds, args.repeats, args.legacy_sn, args.widths, args.full_resolution)
    if args.out:
        write_markdown(args.out, found, args.rounds)
    if args.out_widths:
        write_widths_markdown(args.out_widths, found, args.rounds)
    if args.out_full:
        write_widths_markdown(args.out_full, found, args.rounds, full=True)
