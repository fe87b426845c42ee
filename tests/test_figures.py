"""The figures of a run (acf.figures): samples at several temperatures, the certified Lipschitz bound of
every block over training (also for runs written before per-block bounds were recorded, and for many
blocks)."""
import json
import shutil

import matplotlib.image
import pytest
import torch

import acf
from acf.cli import main
from acf.layers.block import certified_bounds
from acf.figures import save_lipschitz
from acf.train import METRIC_FIELDS

pytestmark = pytest.mark.usefixtures("one_thread")


def png_shape(path):
    return matplotlib.image.imread(path).shape[:2]


def test_samples_at_several_temperatures(cli_run, tmp_path):
    trained = png_shape(cli_run / "samples.png")  # by acf train: 16 samples at each of 4 temperatures
    copy = tmp_path / "run"
    shutil.copytree(cli_run, copy)
    assert main(["sample", str(copy), "--n", "16"]) == 0
    four = png_shape(copy / "samples.png")
    assert main(["sample", str(copy), "--n", "16", "--temperature", "1.0"]) == 0
    one = png_shape(copy / "samples.png")
    assert four[0] > 3 * one[0]  # a row block per temperature (widths differ by the cropped margins)
    assert abs(trained[0] - four[0]) <= 0.05 * four[0]


def test_lipschitz_bounds_per_block(cli_run):
    assert (cli_run / "lipschitz.png").stat().st_size > 0
    assert (cli_run / "metrics.csv").read_text().splitlines()[0] == ",".join(METRIC_FIELDS)
    last = json.loads((cli_run / "metrics.json").read_text())[-1]
    blocks = last["lipschitz_blocks"]
    model = acf.load_run(cli_run, device="cpu")  # every residual block: convolutional, gated attention, FC
    assert set(blocks) == set(certified_bounds(model)) and max(blocks.values()) == last["lipschitz_max"] < 1


def test_run_without_per_block_bounds_resumes(cli_run, tmp_path):
    """A checkpoint written before per-block bounds were recorded loads, resumes, and gets its figure."""
    old = tmp_path / "old"
    shutil.copytree(cli_run, old)
    ckpt = torch.load(old / "checkpoint.pt", weights_only=True)
    for row in ckpt["history"]:
        del row["lipschitz_blocks"]
    torch.save(ckpt, old / "checkpoint.pt")
    (old / "lipschitz.png").unlink()
    assert main(["train", "--resume", str(old), "--steps", "4"]) == 0
    history = json.loads((old / "metrics.json").read_text())
    assert ["lipschitz_blocks" in h for h in history] == [False, True]
    assert (old / "lipschitz.png").stat().st_size > 0


def test_lipschitz_figure_of_many_blocks(tmp_path):
    history = [{"step": s, "lipschitz_max": 0.9, "lipschitz_blocks": {f"b{i}": 0.5 + i / 40 for i in range(17)}}
               for s in (10, 20)]
    save_lipschitz(history, tmp_path / "lipschitz.png", "17 blocks: max / median / min")
    assert (tmp_path / "lipschitz.png").stat().st_size > 0
