"""The settings of a training run: ``TrainConfig`` (every field checked, errors naming it), the model it
describes, and its record in a run's ``config.json`` (written by ``acf.train.trainer``, read back here:
``read_run_config``, ``read_config_file`` for ``acf train --config``). Runs written before a setting
existed read back with the value they ran with (``SETTINGS_ADDED_LATER``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from .. import runfolder
from ..runfolder import CHECKPOINT, CONFIG, SAMPLE_TEMPERATURES  # noqa: F401 (re-exported)
from .._checks import check_choice, check_int, check_optional_str, check_real, parse_device
from ..data import DATASETS, DEFAULT_DATASET
from ..layers.logdet import DEFAULT_MAX_TERMS, GRADS, LogdetEstimator
from ..models import (ARCHS, ATTENTION_CHOICES, ATTENTION_SETTINGS, PRESETS, ACFModel, AttentionSettings, ModelConfig,
                      model_config)

# What a run trains (``acf train --task``), each with the line its help gives. "conditional" uses the labels: its
# prior is one unit Gaussian per class around a learnt mean (``prior_components`` = the classes), training
# maximises the joint ``log p(x, y)`` and every evaluation reports the bits/dim of the marginal
# ``p(x) = (1/K) sum_y p(x | y)`` (a density of images alone, as "density"'s) and the accuracy of the
# latent's most likely class (bench/results/2026-12-05-default-run-conditional.md).
TASKS = {"density": "bits/dim of p(x), no labels",
         "conditional": "one learnt Gaussian per class in the prior, trained on log p(x, y); bits/dim of p(x)",
         "hybrid": "bits/dim + cross-entropy of a linear classifier on z"}
TASKS_WITH_LABELS = ("conditional", "hybrid")
LR_SCHEDULES = ("constant", "cosine", "decay")
DECAY_FRACTION = 0.25  # "decay": the learning rate falls linearly to 0 over this last fraction of the steps
CONFIG_SECTIONS = ("train", "model", "world_size", "warning")  # of config.json; "train" is read back, the rest a record


@dataclass(frozen=True)
class TrainConfig(AttentionSettings):
    """Settings of one training run (``acf train --help`` lists them). The defaults are ``acf train``'s
    default run, chosen by measured sweeps for a 2-core CPU and a budget of about 10 minutes
    (``bench/results/2026-11-30-default-run.md``, ``2026-12-0[45]-default-run*.md``); the experiments fix
    their own settings. The attention settings (how attention joins the flow) are the
    model's, ``AttentionSettings`` (keyword-only)."""

    data: str = DEFAULT_DATASET
    data_root: Optional[str] = None
    arch: str = "resflow"
    attention: Optional[str] = None  # one of ATTENTION_CHOICES (None: no attention); see docs/RESULTS.md
    heads: int = 4
    preset: str = "cpu-deep-nopreact"
    task: str = "conditional"        # one of TASKS
    steps: int = 4500
    batch_size: int = 32
    lr: float = 1e-2
    warmup: int = 100
    lr_schedule: str = "decay"        # after the warm-up: one of LR_SCHEDULES (acf.train.trainer.lr_factor)
    ema_decay: float = 0.99
    max_grad_norm: Optional[float] = 2.0  # clip the gradient's global norm to this before each step (None: never)
    seed: int = 0
    device: str = "cpu"              # or "auto": CUDA when available (what `acf train` uses unless told)
    eval_every: int = 1000
    eval_size: Optional[int] = 1000  # the first test images per evaluation (all of MNIST-5k's; None: every one)
    n_exact: int = 2                 # roulette: exact terms in training
    n_exact_eval: int = 20           # ... and in evaluation
    lam: float = 2.0                 # Poisson rate of the roulette
    grad: str = "neumann"            # log-det gradient: neumann, memory_efficient, backprop
    logit_alpha: float = 1e-6
    model: dict = field(default_factory=dict)  # other settings of the model (ModelConfig fields) over the preset's

    def __post_init__(self) -> None:
        """Check every field's type and range; errors name the field."""
        if not isinstance(self.data, str) or self.data not in DATASETS:
            raise ValueError(f"unknown data set {self.data!r}; choose one of {', '.join(DATASETS)}")
        check_optional_str(self.data_root, "data_root")
        check_choice(self.task, "task", tuple(TASKS))
        check_choice(self.arch, "arch", ARCHS)
        check_choice(self.attention, "attention", ATTENTION_CHOICES)
        check_choice(self.preset, "preset", tuple(PRESETS))
        check_choice(self.grad, "grad", GRADS)
        check_choice(self.lr_schedule, "lr_schedule", LR_SCHEDULES)
        for name in ("heads", "steps", "batch_size", "eval_every"):
            check_int(getattr(self, name), name, minimum=1)
        if self.eval_size is not None:
            check_int(self.eval_size, "eval_size", minimum=1)
        for name in ("warmup", "seed", "n_exact", "n_exact_eval"):
            check_int(getattr(self, name), name, minimum=0)
        check_real(self.lr, "lr", low=0.0, low_open=True)
        check_real(self.ema_decay, "ema_decay", low=0.0, high=1.0, high_open=True)
        if self.max_grad_norm is not None:
            check_real(self.max_grad_norm, "max_grad_norm", low=0.0, low_open=True)
        check_real(self.lam, "lam", low=0.0, high=DEFAULT_MAX_TERMS, low_open=True)  # mean draw <= the roulette's cap
        check_real(self.logit_alpha, "logit_alpha", low=0.0, high=0.5, high_open=True)
        self.check_attention_settings()
        if not isinstance(self.model, dict):
            raise TypeError(f"model must be an object of model settings, got {self.model!r}")
        unknown = sorted(set(self.model) - {f.name for f in fields(ModelConfig)})
        if unknown:
            raise ValueError(f"model: unknown model setting(s) {unknown}; known: {sorted(f.name for f in fields(ModelConfig))}")
        taken = sorted(set(self.model) & set(MODEL_SETTINGS_OF_TRAINING))
        if taken:
            raise ValueError(f"model settings {taken} are training settings of their own: set them directly")
        if not isinstance(self.device, str):
            raise TypeError(f"device must be a string, got {self.device!r}")
        parse_device(self.device)  # "auto", and whether this machine has the device, are resolved where the run starts
        if self.task in TASKS_WITH_LABELS and DATASETS[self.data].n_classes == 0:
            raise ValueError(f"data set {self.data!r} has no labels: it cannot train task {self.task!r} "
                             f"(train its density: task 'density', --task density)")
        if self.task == "conditional" and self.model.get("prior_components", DATASETS[self.data].n_classes) != \
                DATASETS[self.data].n_classes:
            raise ValueError(f"task 'conditional' gives the prior one component per class of {self.data!r} "
                             f"({DATASETS[self.data].n_classes}); model setting prior_components="
                             f"{self.model['prior_components']} contradicts it (leave it out)")
        model_config_of(self)  # every model setting checked now, each error naming its field


# The model settings (ModelConfig fields) a TrainConfig sets itself; ``TrainConfig.model`` holds the others.
MODEL_SETTINGS_OF_TRAINING = ("arch", "attention", "heads", "input_shape", "n_classes", "estimator", "logit_alpha",
                              *ATTENTION_SETTINGS)


def model_config_of(cfg: TrainConfig) -> ModelConfig:
    """The checked model configuration a training config describes (its preset, ``cfg.model`` over it,
    then the model settings of the training config itself)."""
    info = DATASETS[cfg.data]
    est = LogdetEstimator(method="roulette", n_exact=cfg.n_exact, n_exact_eval=cfg.n_exact_eval, lam=cfg.lam,
                          grad=cfg.grad)
    model = {**cfg.model, "prior_components": info.n_classes} if cfg.task == "conditional" else cfg.model
    return model_config(cfg.arch, cfg.attention, cfg.heads, info.input_shape, preset=cfg.preset, **model,
                        n_classes=info.n_classes if cfg.task == "hybrid" else None, estimator=est,
                        logit_alpha=cfg.logit_alpha, **cfg.attention_settings())


def build_for(cfg: TrainConfig) -> ACFModel:
    """The model a training config describes."""
    return ACFModel(model_config_of(cfg))


# Settings that runs written before they existed do not store, and the values that reproduce those runs.
SETTINGS_ADDED_LATER = {"gamma_init": None, "delta_max": 0.5, "ball_radius": 1.0, "head_layout": "grouped",
                        "lr_schedule": "constant", "max_grad_norm": None, "attention_form": "residual",
                        "attention_scales": None, "model": {}}

# Settings a run may change when it continues: it may be extended, and moved to another device (on
# the same device it continues bit for bit).
CONTINUATION_SETTINGS = ("steps", "device")


def config_diff(stored: dict, cfg: TrainConfig) -> dict:
    """``{field: (stored, requested)}`` for the settings of ``cfg`` that differ from ``stored`` (a run's
    ``asdict(TrainConfig)``), ``CONTINUATION_SETTINGS`` excepted."""
    stored = {**SETTINGS_ADDED_LATER, **stored}  # a run older than a setting ran with its old value
    return {k: (stored.get(k), v) for k, v in asdict(cfg).items()
            if k not in CONTINUATION_SETTINGS and stored.get(k) != v}


def config_from_dict(values: object, source: str = "config", complete: bool = True) -> TrainConfig:
    """A ``TrainConfig`` from a dict of every setting (e.g. a run's config.json; with ``complete=False``
    missing settings take their defaults): unknown or missing settings, wrong types and values out of
    range raise an error naming the setting and ``source``."""
    if not isinstance(values, dict):
        raise TypeError(f"{source}: the training settings must be a JSON object, got {type(values).__name__}")
    names = [f.name for f in fields(TrainConfig)]
    unknown = sorted(set(values) - set(names))
    missing = [n for n in names if complete and n not in values and n not in SETTINGS_ADDED_LATER]
    if unknown or missing:
        raise ValueError(f"{source}: " + "; ".join(
            [f"unknown training setting(s) {unknown}"] * bool(unknown) + [f"missing setting(s) {missing}"] * bool(missing)))
    if complete:
        values = {**SETTINGS_ADDED_LATER, **values}
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{source}: {exc}") from None


def read_run_config(run: Path) -> TrainConfig:
    """The training configuration in ``run/config.json``, validated (errors name the file and field)."""
    path = Path(run) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {run} is not a run folder written by `acf train`")
    doc = runfolder.read_json(path)
    if not isinstance(doc, dict) or "train" not in doc:
        raise ValueError(f"{path}: no \"train\" section (the run's training settings)")
    return _train_section(doc, path)


def _train_section(doc: dict, path: Path) -> TrainConfig:
    """The validated "train" section of a run's config.json ``doc``, read from ``path``."""
    unknown = sorted(set(doc) - set(CONFIG_SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown section(s) {unknown}; a run's config.json holds {list(CONFIG_SECTIONS)}")
    return config_from_dict(doc["train"], f"{path} (train)")


def read_config_file(path: Path, defaults: Optional[dict] = None) -> TrainConfig:
    """Training settings from the JSON file ``path`` (``acf train --config``): a run's ``config.json``
    (its "train" section, complete, as ``read_run_config`` reads it) or a JSON object of ``TrainConfig``
    fields, where a missing field takes its value from ``defaults``, else ``TrainConfig``'s default.
    Errors name the file and the field."""
    path = Path(path)
    doc = runfolder.read_json(path)
    if isinstance(doc, dict) and "train" in doc:
        return _train_section(doc, path)
    return config_from_dict({**(defaults or {}), **doc} if isinstance(doc, dict) else doc, str(path), complete=False)

