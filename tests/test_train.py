"""Training loop: run folder, exact resume, non-finite loss, config mismatch, hybrid task, CLI."""
import json
import math
import os
import random
import re
from pathlib import Path

import pytest
import torch

from acf import runfolder
from acf.cli import main
from acf.data import to_float
from acf.train import (SETTINGS_ADDED_LATER, NonFiniteLossError, TrainConfig, Trainer, model_config_of, read_run_config,
                       train)
from acf.train.trainer import SERIES_CHECK_FACTOR, SERIES_TOLERANCE

from helpers import assert_same_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
# A constant learning rate after the warm-up: a run stopped at step 2 and extended to 4 then follows
# the schedule of the uninterrupted run (a decaying one depends on the run's length).
TINY = dict(data="digits", attention="l2", heads=2, steps=4, batch_size=16, eval_every=2, eval_size=16,
            n_exact_eval=2, warmup=2, lr_schedule="constant")


def test_run_folder_and_metrics(tmp_path):
    trainer = train(TrainConfig(**TINY), tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.csv", "metrics.json", "checkpoint.pt", "samples.png",
                 "reconstructions.png", "convergence.png"):
        assert (run / name).stat().st_size > 0, name
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert rows[0] == "step,train_bpd,test_bpd,test_acc,seconds,lipschitz_max" and len(rows) == 3
    assert all(0 < h["lipschitz_max"] < 1 and 0 < h["test_bpd"] < 16 for h in trainer.history)
    assert json.loads((run / "config.json").read_text())["model"]["input_shape"] == [1, 8, 8]
    assert not [p for p in os.listdir(run) if p.endswith(runfolder.TEMP_SUFFIX)]  # atomic writes leave none
    assert abs(trainer.series_shortfall()) < SERIES_TOLERANCE  # a tiny model's series converges within 2 x 10 terms


def test_a_series_the_evaluation_cuts_short_is_reported(tmp_path, capsys, monkeypatch):
    """When the evaluation's exact log-det terms read below many times as many at the end of a run, the
    run warns and names the command that evaluates with more terms."""
    seen = []
    real = Trainer.series_shortfall

    def shortfall(self):
        seen.append(real(self))  # the real check runs (its value is near 0 here) ...
        return 0.25              # ... and a drifted model's value is reported
    monkeypatch.setattr(Trainer, "series_shortfall", shortfall)
    run = tmp_path / "run"
    train(TrainConfig(**TINY), run, progress=False)
    out = " ".join(capsys.readouterr().out.split())
    more = SERIES_CHECK_FACTOR * TINY["n_exact_eval"]
    assert f"read 0.250 bits/dim below {more} terms" in out
    assert f"acf evaluate {run} --n-exact {more}" in out
    assert len(seen) == 1 and abs(seen[0]) < SERIES_TOLERANCE


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, one_thread):
    """The checkpoint of an uninterrupted TINY run."""
    run = tmp_path_factory.mktemp("full") / "run"
    train(TrainConfig(**TINY), run, progress=False)
    return run / "checkpoint.pt"


def test_resume_matches_uninterrupted_run(tmp_path, uninterrupted):
    half = TrainConfig(**{**TINY, "steps": 2})
    train(half, tmp_path / "split", progress=False)
    resumed = train(TrainConfig(**TINY), tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 4 and [h["step"] for h in resumed.history] == [2, 4]  # no duplicated or lost rows
    assert_same_checkpoint(tmp_path / "split" / "checkpoint.pt", uninterrupted)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (no ``except Exception`` handler sees it)."""


# The atomic writes of a TINY run: 1 config.json; at steps 2 and 4: checkpoint.pt, metrics.csv,
# metrics.json (2-4, 5-7); then the figures. A kill before the rename of write n leaves the old file
# and a partial temporary one; a kill after it, the new file and none of the later ones.
KILL_POINTS = [(2, "before"), (2, "after"), (3, "before"), (4, "before"), (6, "after")]  # in and between
KILL_POINTS += random.Random(0).sample([(n, w) for n in range(1, 8) for w in ("before", "after")
                                        if (n, w) not in KILL_POINTS], 2)           # and two drawn at random


@pytest.mark.parametrize("write,when", KILL_POINTS)
def test_run_killed_during_a_write_resumes_bit_identically(tmp_path, monkeypatch, uninterrupted, write, when):
    """A run killed in the middle of (or between) its checkpoint and metrics writes, then resumed (or
    started again, when it had no checkpoint yet), ends bit for bit where an uninterrupted run ends
    (model, EMA, optimizer, generators), and its metrics files list exactly the checkpoint's steps."""
    run, calls, real_replace = tmp_path / "run", [], os.replace

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == write and when == "before":
            Path(src).write_bytes(b"partial")
            raise Killed
        real_replace(src, dst)
        if len(calls) == write:
            raise Killed

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        train(TrainConfig(**TINY), run, progress=False)
    monkeypatch.undo()
    (run / f".checkpoint.pt.left-by-a-kill{runfolder.TEMP_SUFFIX}").write_bytes(b"partial")
    stored = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else []
    if (run / "checkpoint.pt").exists():
        steps = [h["step"] for h in torch.load(run / "checkpoint.pt", weights_only=True)["history"]]
        assert [h["step"] for h in stored] in (steps, steps[:-1])  # never ahead of the checkpoint
    train(TrainConfig(**TINY), run, resume=(run / "checkpoint.pt").exists(), progress=False)
    assert_same_checkpoint(run / "checkpoint.pt", uninterrupted)
    assert [h["step"] for h in json.loads((run / "metrics.json").read_text())] == [2, 4]
    assert not [p for p in os.listdir(run) if p.endswith(runfolder.TEMP_SUFFIX)]


def test_non_finite_loss_keeps_last_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    cfg = TrainConfig(**TINY)
    train(TrainConfig(**{**TINY, "steps": 2}), run, progress=False)
    before = (run / "checkpoint.pt").read_bytes()
    original = Trainer.objective

    def poisoned(self, model, x, y):
        loss, bpd, z = original(self, model, x, y)
        return loss * float("nan"), bpd, z

    monkeypatch.setattr(Trainer, "objective", poisoned)
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(cfg, run, resume=True, progress=False)
    assert (run / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize("every,where", [(3, "at step 2: the model produced non-finite values"),
                                         (1, "by step 1: the evaluated (EMA) model produced non-finite values")])
def test_diverging_training_is_blamed_on_the_learning_rate(tmp_path, capsys, every, where):
    """``--lr 1e6``: the first Adam step throws ActNorm's log-scales to +-1e6, the next forward (training,
    or the evaluation of the EMA weights) overflows. The error blamed the input ('x contains non-finite
    values'); now it names the step and the likely cause."""
    from helpers import one_line_error

    out = tmp_path / "run"
    args = ["train", "--data", "digits", "--heads", "2", "--batch-size", "16", "--eval-size", "16",
            "--n-exact-eval", "2", "--warmup", "1", "--steps", "6", "--eval-every", str(every), "--out", str(out)]
    assert main([*args, "--lr", "1e6"]) == 2
    one_line_error(capsys, f"acf train: error: training diverged {where}", "the learning rate (lr=1e+06) is the "
                   f"likely cause: lower it (--lr). The last good checkpoint in {out} (if any) is unchanged")
    assert not (out / "checkpoint.pt").exists()  # no step was good enough to be checkpointed


def test_non_finite_parameters_after_a_step_are_named(tmp_path, monkeypatch):
    cfg = TrainConfig(**TINY)
    trainer = Trainer(cfg, tmp_path)
    trainer.train_step()
    step = trainer.opt.step
    name = next(n for n, _ in trainer.model.named_parameters() if n.startswith("fc.") and ".g." in n)  # an FC branch's

    def poisoned_step(*args, **kwargs):
        step(*args, **kwargs)
        with torch.no_grad():
            dict(trainer.model.named_parameters())[name].view(-1)[0] = float("nan")

    monkeypatch.setattr(trainer.opt, "step", poisoned_step)
    with pytest.raises(NonFiniteLossError, match=r"training diverged at step 2: parameter " + re.escape(repr(name)) +
                                                  r" is not finite after the optimizer step \(1 NaN, 0 inf\); the learning "
                                                  r"rate \(lr=" + f"{cfg.lr}" + r"\) is the likely cause"):
        trainer.train_step()


def test_resume_refuses_another_configuration(tmp_path):
    train(TrainConfig(**{**TINY, "steps": 2}), tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="another configuration.*'lr'"):
        train(TrainConfig(**{**TINY, "lr": 0.5}), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(TrainConfig(**TINY), tmp_path / "run", progress=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        train(TrainConfig(**TINY), tmp_path / "empty", resume=True, progress=False)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "decay"])
def test_learning_rate_schedule(tmp_path, schedule):
    """Linear warm-up over 3 steps, then constant, (1 + cos(pi t)) / 2 with t the fraction of the
    7 remaining steps done, or constant with a linear fall over the last round(0.25 * 10) = 2 steps:
    the rate each optimizer step used."""
    cfg = TrainConfig(**{**TINY, "steps": 10, "warmup": 3, "lr": 0.01, "eval_every": 10, "lr_schedule": schedule})
    trainer = Trainer(cfg, tmp_path)
    used = []
    for _ in range(cfg.steps):
        used.append(trainer.opt.param_groups[0]["lr"])
        trainer.train_step()
    after = {"constant": [1.0] * 7, "decay": [1.0] * 6 + [0.5],
             "cosine": [0.5 * (1 + math.cos(math.pi * t / 7)) for t in range(7)]}[schedule]
    assert used == pytest.approx([0.01 * f for f in [1 / 3, 2 / 3, 1.0] + after], rel=1e-12)


@pytest.mark.parametrize("limit", [None, 1e-3])
def test_gradient_clipping(tmp_path, limit):
    """``max_grad_norm``: the optimizer sees the gradient with its global norm cut to the limit (the
    unclipped gradients of this tiny model are far above 1e-3), and unclipped without one."""
    trainer = Trainer(TrainConfig(**{**TINY, "max_grad_norm": limit}), tmp_path)
    seen: list[float] = []
    trainer.opt.register_step_pre_hook(lambda *_: seen.append(float(torch.nn.utils.get_total_norm(
        [p.grad for p in trainer.model.parameters() if p.grad is not None]))))
    for _ in range(3):
        trainer.train_step()
    if limit is None:
        assert min(seen) > 1e-2
    else:
        assert seen == pytest.approx([limit] * 3, rel=1e-4)


def test_evaluating_does_not_change_the_training(tmp_path, uninterrupted):
    """Evaluations draw from their own generator: the TINY run evaluated at every step ends with the
    weights of the one evaluated every second step, and two evaluations of one model agree."""
    trainer = train(TrainConfig(**{**TINY, "eval_every": 1}), tmp_path / "run", progress=False)
    reference = torch.load(uninterrupted, weights_only=True)["model"]
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, reference[name]), name
    assert trainer.evaluate(16) == trainer.evaluate(16)


def test_run_older_than_a_setting_resumes_with_its_old_value(tmp_path, one_thread):
    """A run folder written before ``lr_schedule`` (and the attention settings) existed stores none of
    them: it reads back with the values it ran with (eq. 13's residual form among them, not today's
    default), resumes, and ends like an uninterrupted run with those values."""
    old = {**TINY, **SETTINGS_ADDED_LATER}
    train(TrainConfig(**old), tmp_path / "full", progress=False)
    run = tmp_path / "old"
    train(TrainConfig(**{**old, "steps": 2}), run, progress=False)
    doc = json.loads((run / "config.json").read_text())
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    for name in SETTINGS_ADDED_LATER:
        del doc["train"][name], ckpt["config"][name]
    (run / "config.json").write_text(json.dumps(doc))
    torch.save(ckpt, run / "checkpoint.pt")
    assert read_run_config(run) == TrainConfig(**{**old, "steps": 2})
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 0
    assert_same_checkpoint(run / "checkpoint.pt", tmp_path / "full" / "checkpoint.pt")


def test_hybrid_task_reports_accuracy(tmp_path):
    trainer = train(TrainConfig(**{**TINY, "task": "hybrid", "arch": "iresnet"}), tmp_path / "run", progress=False)
    acc = trainer.history[-1]["test_acc"]
    assert acc is not None and 0.0 <= acc <= 1.0


def test_conditional_task_trains_the_joint_and_reports_the_marginal(tmp_path):
    """The default task, "conditional": one prior component per class; training lowers the joint
    ``-log p(x, y)``, evaluation reports the marginal ``p(x)`` (above the joint by ``-log p(y | x)``, the posterior
    of ``classify``) and the accuracy of the latent's most likely class; class_samples.png holds a row per class."""
    cfg = TrainConfig(**{**TINY, "attention": None})
    assert cfg.task == "conditional" and model_config_of(cfg).prior_components == 10
    assert model_config_of(TrainConfig(**{**TINY, "task": "density"})).prior_components == 0
    trainer = train(cfg, tmp_path / "run", progress=False)
    assert 0.0 <= trainer.history[-1]["test_acc"] <= 1.0
    assert (tmp_path / "run" / "class_samples.png").stat().st_size > 0
    images, labels = trainer.test_set[slice(0, 16)]
    x = to_float(images)
    model, readings = trainer.evaluated_model(), []
    for training in (True, False):
        torch.manual_seed(3)  # the same dequantisation noise and log-det draws for both readings
        readings.append(trainer.objective(model, x, labels, training=training))
    (_, joint, z), (_, marginal, _) = readings
    gap = (joint - marginal) * 64 * math.log(2.0)  # nats
    with torch.no_grad():
        posterior = torch.log_softmax(model.classify(z), dim=1).gather(1, labels[:, None])[:, 0]
    torch.testing.assert_close(gap, -posterior, rtol=1e-4, atol=1e-3)
    assert bool((gap >= -1e-3).all())


def test_bad_training_configuration():
    with pytest.raises(ValueError, match="task must be"):
        TrainConfig(task="regression")
    with pytest.raises(ValueError, match="unknown data set 'svhn'"):
        TrainConfig(data="svhn")
    with pytest.raises(ValueError, match="no labels"):
        TrainConfig(data="celeba64", task="hybrid")
    with pytest.raises(ValueError, match=r"'celeba64' has no labels: it cannot train task 'conditional' \(train "
                                         r"its density: task 'density', --task density\)"):
        TrainConfig(data="celeba64")
    with pytest.raises(ValueError, match="one component per class of 'digits' \\(10\\); model setting "
                                         "prior_components=4 contradicts it"):
        TrainConfig(data="digits", model={"prior_components": 4})
    assert TrainConfig(data="celeba64", task="density").task == "density"


@pytest.mark.parametrize("field,value,match", [
    ("ema_decay", 5.0, r"ema_decay must be in \[0.0, 1.0\), got 5.0"),
    ("warmup", -3, "warmup must be >= 0, got -3"),
    ("lr", 0.0, r"lr must be in \(0.0, inf\)"),
    ("heads", "4", "heads must be an integer, got '4'"),
    ("steps", 2.0, "steps must be an integer, got 2.0"),
    ("n_exact", True, "n_exact must be an integer, got True"),
    ("lam", float("inf"), "lam must be finite"),
    ("arch", "glow", "arch must be one of"),
    ("attention", "none", "attention must be one of None"),
    ("grad", "adjoint", "grad must be one of"),
    ("lr_schedule", "linear", "lr_schedule must be one of"),
    ("max_grad_norm", 0.0, r"max_grad_norm must be in \(0.0, inf\)"),
    ("max_grad_norm", "1", "max_grad_norm must be a number"),
    ("eval_size", 0, "eval_size must be >= 1"),
    ("data_root", 3, "data_root must be a string or null"),
    ("device", "gpu", "device 'gpu' is not a torch device"),
])
def test_every_training_setting_is_checked(field, value, match):
    with pytest.raises((TypeError, ValueError), match=match):
        TrainConfig(**{field: value})


def test_cli_train_and_resume(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--data", "digits", "--heads", "2", "--steps", "2", "--batch-size", "16", "--eval-every", "2",
            "--eval-size", "16", "--n-exact-eval", "2", "--out", str(out)]
    assert main(args) == 0
    assert main(["train", "--resume", str(out), "--steps", "4"]) == 0
    text = capsys.readouterr().out
    assert f"outputs in {out}" in text and "test bits/dim" in text
    assert json.loads((out / "metrics.json").read_text())[-1]["step"] == 4
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2  # clear error, exit code 2


def test_two_process_data_parallel_run(tmp_path):
    """torchrun with 2 CPU processes (gloo): the run completes, rank 0 writes the run folder, and the
    ranks end with identical parameters and spectral-norm buffers (checked inside the run)."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "acf",
           "train", "--data", "digits", "--heads", "2", "--steps", "4", "--batch-size", "16", "--eval-every", "2",
           "--eval-size", "16", "--n-exact-eval", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert [h["step"] for h in json.loads((out / "metrics.json").read_text())] == [2, 4]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2


# ---- the batches ------------------------------------------------------------------------------------

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
