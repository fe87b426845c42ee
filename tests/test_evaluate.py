"""acf evaluate / sample / reconstruct / interpolate on a tiny trained run."""
import json
import math

import pytest
import torch

import acf
from acf.cli import main
from acf.evaluate import evaluate_bits_per_dim, interpolations, load_run, run_test_set
from acf.train import TrainConfig, read_run_config, train

pytestmark = pytest.mark.usefixtures("one_thread")
HERE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = dict(data="digits", attention="l2", heads=2, steps=2, batch_size=16, eval_every=2, eval_size=16,
            n_exact_eval=2, warmup=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig(**TINY), out, progress=False)
    return out


def loaded(run):
    """The run's EMA model and its test set."""
    model = load_run(run)
    return model, run_test_set(model.train_config)


def test_commands_write_their_files(run, capsys):
    assert main(["evaluate", str(run), "--n", "32", "--n-exact", "3", "--probes", "2"]) == 0
    result = json.loads((run / "evaluation.json").read_text())
    assert 0 < result["test_bpd"] < 16 and result["standard_error"] > 0 and result["n_exact"] == 3
    (run / "class_samples.png").unlink()  # written by acf train (the default task is class-conditional): again here
    for cmd in (["sample", str(run), "--n", "4"], ["reconstruct", str(run), "--n", "4"],
                ["interpolate", str(run), "--pairs", "2", "--steps", "3"]):
        assert main(cmd) == 0
    for name in ("samples.png", "class_samples.png", "reconstructions.png", "interpolations.png"):
        assert (run / name).stat().st_size > 0
    err = float(capsys.readouterr().out.split("max |f^-1(f(x)) - x| = ")[1].split()[0])
    assert err <= 1e-4


def test_interpolation_endpoints_are_the_test_images(run):
    model, test = loaded(run)
    torch.manual_seed(0)
    imgs = interpolations(model, test, pairs=2, steps=3).reshape(2, 3, *test.input_shape)
    # t = 0 and t = 1 decode the (dequantised) test images themselves: within a dequantisation bin.
    x = test.images[:4].float() / 255
    assert float((imgs[:, 0] - x[0::2]).abs().max()) < 1.5 / 255
    assert float((imgs[:, -1] - x[1::2]).abs().max()) < 1.5 / 255


def test_standard_error_shrinks_with_probes(run):
    model, test = loaded(run)
    mean1, se1 = evaluate_bits_per_dim(model, test, n=32, probes=1)
    mean4, se4 = evaluate_bits_per_dim(model, test, n=32, probes=4)
    assert abs(mean1 - mean4) < 4 * se1 and se4 <= se1 * 1.05


def test_missing_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        load_run(tmp_path)
    assert main(["sample", str(tmp_path)]) == 2


def test_perturb_writes_csv_and_plot(run):
    assert main(["perturb", str(run), "--sigma", "0", "0.05", "--n", "8"]) == 0
    rows = (run / "perturb.csv").read_text().strip().splitlines()
    assert rows[0] == "sigma,bits_per_dim,reconstruction_error,nonconverged_blocks,changed_pixels" and len(rows) == 3
    assert all(float(v) == float(v) for row in rows[1:] for v in row.split(","))  # no NaN
    assert (run / "perturb.png").stat().st_size > 0
    assert main(["perturb", str(run), "--sigma", "-0.1"]) == 2


def test_awgn_requantises_to_valid_images(run):
    """Noise is applied to the 8-bit images and re-quantised: sigma 0 changes nothing, and the
    bits/dim of the noisy images is a likelihood of valid 8-bit images (finite, reconstructable)."""
    from acf.evaluate import awgn_robustness

    model, test = loaded(run)
    rows = awgn_robustness(model, test, [0.0, 0.2], n=4)
    assert rows[0]["changed_pixels"] == 0.0 and rows[1]["changed_pixels"] > 0.3
    assert all(math.isfinite(r["bits_per_dim"]) and r["reconstruction_error"] < 1e-3 for r in rows)
    assert rows[0]["nonconverged_blocks"] == 0


@pytest.mark.parametrize("args,match", [
    (["evaluate", "--probes", "0"], "probes must be >= 1"),
    (["evaluate", "--n", "0"], "number of test images n must be >= 1"),
    (["evaluate", "--n-exact", "-1"], "n_exact_eval must be >= 0"),
    (["sample", "--n", "0"], "number of samples n must be >= 1"),
    (["sample", "--temperature", "-1"], "temperature must be in"),
    (["reconstruct", "--n", "0"], "number of images n must be >= 1"),
    (["interpolate", "--steps", "1"], "steps must be >= 2"),
    (["interpolate", "--pairs", "100000"], "pairs=100000 needs 200000 test images"),
    (["perturb", "--n", "0"], "number of test images n must be >= 1"),
])
def test_bad_command_settings_are_one_line_errors(run, capsys, args, match):
    assert main([args[0], str(run), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err and "Traceback" not in err, err


# ---- acf.load_run, model.sample of a run trained by the command line -----------------------------

def test_load_run_returns_the_ema_model_with_its_settings(cli_run):
    model = acf.load_run(cli_run)
    assert isinstance(model, acf.ACFModel) and not model.training
    assert model.train_config == read_run_config(cli_run)
    assert next(model.parameters()).device.type == HERE
    ckpt = torch.load(cli_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    cpu = acf.load_run(str(cli_run), device="cpu")
    assert all(torch.equal(v, ckpt["ema"][k]) for k, v in cpu.state_dict().items())


def test_sample_with_log_prob(cli_run):
    model = acf.load_run(cli_run, device="cpu").train()  # the log-density is taken in eval mode all the same
    torch.manual_seed(0)
    x, log_prob = model.sample(5, temperature=0.7, return_log_prob=True)
    assert model.training and x.shape == (5, 1, 8, 8) and log_prob.shape == (5,)
    assert bool(torch.isfinite(log_prob).all()) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    torch.manual_seed(0)
    assert torch.equal(model.sample(5, temperature=0.7), x)  # the same images without the log-density
