"""The first ten minutes: --device auto, --help with defaults, acf train --config, acf.load_run,
model.sample(return_log_prob=True), samples at several temperatures, the Lipschitz figure, the
DataLoader's batches, and a corrupt checkpoint that leaves its run folder as it was."""
import json
import shutil

import matplotlib.image
import pytest
import torch

import acf
from acf._checks import resolve_device
from acf.cli import TRAIN_DEFAULTS, build_parser, main
from acf.figures import save_lipschitz
from acf.runfolder import LOCK_NAME
from acf.train import METRIC_FIELDS, TrainConfig, Trainer, read_config_file, read_run_config

from helpers import one_line_error

pytestmark = pytest.mark.usefixtures("one_thread")
TINY_ARGS = ["--data", "digits", "--attention", "l2", "--heads", "2", "--batch-size", "16", "--eval-every", "2",
             "--eval-size", "16", "--n-exact-eval", "2", "--warmup", "2"]
HERE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """A tiny run trained by the CLI with its default device."""
    out = tmp_path_factory.mktemp("conveniences") / "run"
    assert main(["train", *TINY_ARGS, "--steps", "2", "--out", str(out)]) == 0
    return out


def png_shape(path):
    return matplotlib.image.imread(path).shape[:2]


def snapshot(folder):
    """Every file of a run folder (its lock file aside) and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != LOCK_NAME}


# ---- --device auto, --help -------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["demo"], ["evaluate", "R"], ["sample", "R"], ["reconstruct", "R"],
                                  ["interpolate", "R"], ["perturb", "R"]])
def test_device_defaults_to_auto(argv):
    assert build_parser().parse_args(argv).device == "auto"
    assert resolve_device("auto") == torch.device(HERE)


def test_train_runs_on_the_auto_device(run, tmp_path, capsys):
    assert TRAIN_DEFAULTS["device"] == "auto" and read_run_config(run).device == "auto"
    shutil.copytree(run, tmp_path / "run")
    assert main(["train", "--resume", str(tmp_path / "run"), "--steps", "2"]) == 0  # no step left: prints the plan
    assert f"2 steps on {HERE} -> resuming" in capsys.readouterr().out


@pytest.mark.parametrize("command,shown", [
    ("train", ["--steps STEPS", "(default: 3000)", "(default: auto)", "(default: mnist5k)", "(default: 0.005)", "(default: cpu-fc)"]),
    ("sample", ["samples per temperature (default: 16)", "(default: [0.5, 0.7, 0.85, 1.0])", "(default: auto)"]),
    ("evaluate", ["exact log-det terms (default: 20)", "test images (default: all)"]),
    ("perturb", ["test images (default: 64)"]),
    ("demo", ["attention heads (default: 4)", "(default: auto)"]),
])
def test_help_shows_defaults(capsys, command, shown):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(s in text for s in shown) and "(default: None)" not in text, text


# ---- acf train --config ----------------------------------------------------------------------------

def test_config_file_round_trip(run, tmp_path, capsys):
    new = tmp_path / "new"
    assert main(["train", "--config", str(run / "config.json"), "--out", str(new), "--steps", "3"]) == 0
    assert f"settings from {run / 'config.json'}" in capsys.readouterr().out
    stored = json.loads((run / "config.json").read_text())
    again = json.loads((new / "config.json").read_text())
    assert again["train"] == {**stored["train"], "steps": 3} and again["model"] == stored["model"]


def test_config_file_of_training_settings(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"data": "digits", "lr": 0.002}))
    assert read_config_file(path, TRAIN_DEFAULTS) == TrainConfig(data="digits", lr=0.002, device="auto")


@pytest.mark.parametrize("doc,words", [
    ({"lr": 0.002, "colour": "red"}, ["unknown training setting(s) ['colour']"]),
    ({"heads": "4"}, ["heads must be an integer, got '4'"]),
    ([1, 2], ["must be a JSON object"]),
    ({"train": {"lr": 0.002}}, ["(train)", "missing setting(s)"]),  # a run's config.json is complete
])
def test_config_file_errors_name_the_file_and_the_field(tmp_path, capsys, doc, words):
    path, out = tmp_path / "settings.json", tmp_path / "run"
    path.write_text(json.dumps(doc))
    assert main(["train", "--config", str(path), "--out", str(out)]) == 2
    one_line_error(capsys, str(path), *words)
    assert not out.exists()


def test_config_and_resume_exclude_each_other(run, capsys):
    assert main(["train", "--config", str(run / "config.json"), "--resume", str(run)]) == 2
    one_line_error(capsys, "--config and --resume exclude each other")


# ---- acf.load_run, model.sample ----------------------------------------------------------------------

def test_load_run_returns_the_ema_model_with_its_settings(run):
    model = acf.load_run(run)
    assert isinstance(model, acf.ACFModel) and not model.training
    assert model.train_config == read_run_config(run)
    assert next(model.parameters()).device.type == HERE
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    cpu = acf.load_run(str(run), device="cpu")
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in cpu.state_dict().items())


def test_sample_with_log_prob(run):
    model = acf.load_run(run, device="cpu").train()  # the log-density is taken in eval mode all the same
    torch.manual_seed(0)
    x, log_prob = model.sample(5, temperature=0.7, return_log_prob=True)
    assert model.training and x.shape == (5, 1, 8, 8) and log_prob.shape == (5,)
    assert bool(torch.isfinite(log_prob).all()) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    torch.manual_seed(0)
    assert torch.equal(model.sample(5, temperature=0.7), x)  # the same images without the log-density


# ---- figures -------------------------------------------------------------------------------------

def test_samples_at_several_temperatures(run, tmp_path):
    trained = png_shape(run / "samples.png")  # by acf train: 16 samples at each of 4 temperatures
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["sample", str(copy), "--n", "16"]) == 0
    four = png_shape(copy / "samples.png")
    assert main(["sample", str(copy), "--n", "16", "--temperature", "1.0"]) == 0
    one = png_shape(copy / "samples.png")
    assert four[0] > 3 * one[0]  # a row block per temperature (widths differ by the cropped margins)
    assert abs(trained[0] - four[0]) <= 0.05 * four[0]


def test_lipschitz_bounds_per_block(run):
    assert (run / "lipschitz.png").stat().st_size > 0
    assert (run / "metrics.csv").read_text().splitlines()[0] == ",".join(METRIC_FIELDS)
    last = json.loads((run / "metrics.json").read_text())[-1]
    blocks = last["lipschitz_blocks"]
    assert len(blocks) == 6 and max(blocks.values()) == last["lipschitz_max"] < 1  # 2 x 2 convolutional, 2 FC


def test_run_without_per_block_bounds_resumes(run, tmp_path):
    """A checkpoint written before per-block bounds were recorded loads, resumes, and gets its figure."""
    old = tmp_path / "old"
    shutil.copytree(run, old)
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


# ---- one way to load data ----------------------------------------------------------------------------

def test_loader_batches_do_not_depend_on_workers_or_where_the_run_starts(tmp_path):
    cfg = TrainConfig(data="digits", batch_size=512, seed=3)  # 2 batches an epoch
    start = Trainer(cfg, tmp_path)
    batches = [start.next_batch() for _ in range(5)]
    assert not any(torch.equal(batches[0][0], b[0]) for b in batches[1:])
    resumed = Trainer(cfg, tmp_path, workers=2)
    resumed.step = 3  # as load() leaves it
    for expected in batches[3:]:
        got = resumed.next_batch()
        resumed.step += 1
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ---- a corrupt checkpoint ----------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["evaluate"], ["sample"], ["reconstruct"], ["interpolate"], ["perturb"],
                                     ["train", "--steps", "4", "--resume"]])
def test_corrupt_checkpoint_is_one_line_and_changes_nothing(run, tmp_path, capsys, command):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:2000])
    before = snapshot(copy)
    assert main([*command, str(copy)]) == 2
    one_line_error(capsys, f"acf {command[0]}: error: {ckpt}: not a readable checkpoint")
    assert snapshot(copy) == before
