"""Whole ACF models: a short builder assembles the flow from the blocks (paper section 3-4).

Layout (Residual Flows, Chen et al. 2019): logit transform, then ``n_scales`` stages, each a squeeze
(the first one only with ``squeeze_first``) followed by ``blocks_per_scale`` x (ActNorm, ``x + g(x)``);
with ``factor_out`` half of the channels leave as latents after every stage but the last (when
their number is even); optionally ``fc_blocks`` fully connected
contractive blocks on the flattened result (1x1 convolutions on a ``(D, 1, 1)`` view). The latent
``z`` is flat, ``(batch, C*H*W)``, with a standard normal prior.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional

import torch
from torch import nn

from ._checks import (check_choice, check_coefficient, check_gamma_init, check_image, check_int, check_real,
                      check_same_dtype)
from .layers.block import ContractiveBlock
from .layers.coupling import AffineCoupling
from .layers.attention import (ATTENTIONS, DEFAULT_DELTA_MAX, DEFAULT_LAYOUT, DEFAULT_RADIUS, DELTA_LIMIT, HEAD_LAYOUTS,
                               LAYER_FORMS)
from .layers.branches import BRANCHES, GATED_WEIGHT, attention_branch, resflow_branch
from .layers.flow import (ActNorm, LogitTransform, SequentialFlow, Squeeze, bits_per_dim, gaussian_component_logprob,
                          gaussian_mixture_logprob, standard_normal_logprob)
from .layers.logdet import LogdetEstimator
from .layers.spectral_norm import refresh_spectral_norms

# Architectures: a contractive residual flow per branch of ``BRANCHES``, and "coupling", the
# uncertified reference (affine coupling layers, ``acf.layers.coupling``; attention "dot" only).
ARCHS = (*BRANCHES, "coupling")
ATTENTION_CHOICES = (None, *ATTENTIONS)  # None: no attention
# How attention joins the flow (docs/design.md, section 3), and the initial weight of its path
# (``gamma_init=None``): inside each branch, as eq. 13 normalised ("residual", the paper's) or as a
# quadrature channel concatenation ("quadrature"); or as gated attention blocks of their own after
# each residual block of a stage ("gated": in the attention protocol of docs/RESULTS.md the only
# certified form whose attention the trained flow uses).
ATTENTION_FORMS = {"residual": LAYER_FORMS["residual"], "quadrature": LAYER_FORMS["quadrature"], "gated": GATED_WEIGHT}


@dataclass(frozen=True, kw_only=True)
class AttentionSettings:
    """How attention joins the flow: the settings a model (``ModelConfig``) and a training run
    (``TrainConfig``: ``acf train --attention-form`` ...) share, declared and checked here once."""

    attention_form: str = "gated"  # one of ATTENTION_FORMS (gated: the one the flow uses, docs/RESULTS.md)
    attention_scales: Optional[tuple[int, ...]] = None  # the stages (0 = first) with attention; None: all
    gamma_init: Optional[float] = None  # initial weight of the attention path; None: the form's default
    delta_max: float = DEFAULT_DELTA_MAX  # "l2-tight" attention: logit range, ball radius, head layout
    ball_radius: float = DEFAULT_RADIUS
    head_layout: str = DEFAULT_LAYOUT

    def check_attention_settings(self) -> None:
        """Check every attention setting's type and range (errors name the setting); a list of stages
        (from JSON) becomes a tuple."""
        check_choice(self.attention_form, "attention_form", tuple(ATTENTION_FORMS))
        scales = self.attention_scales
        if scales is not None:
            if not isinstance(scales, (tuple, list)) or not scales:
                raise ValueError(f"attention_scales must be a non-empty list of stage indices or None, got {scales!r}")
            for i in scales:
                check_int(i, "attention_scales entry", minimum=0)
            object.__setattr__(self, "attention_scales", tuple(scales))
        if self.gamma_init is not None and self.attention_form == "residual":
            check_gamma_init(self.gamma_init)
        elif self.gamma_init is not None:  # eta2 of the quadrature form in [0, 1), the gate in (0, 1)
            check_real(self.gamma_init, f"gamma_init (form {self.attention_form!r})", 0.0, 1.0,
                       low_open=self.attention_form == "gated", high_open=True)
        check_real(self.delta_max, "delta_max", low=0.0, high=DELTA_LIMIT, low_open=True)
        check_real(self.ball_radius, "ball_radius", low=0.0, low_open=True)
        check_choice(self.head_layout, "head_layout", HEAD_LAYOUTS)

    def attention_settings(self) -> dict:
        """The attention settings by name (``ATTENTION_SETTINGS``)."""
        return {name: getattr(self, name) for name in ATTENTION_SETTINGS}


ATTENTION_SETTINGS = tuple(f.name for f in fields(AttentionSettings))


@dataclass(frozen=True)
class ModelConfig(AttentionSettings):
    """Everything that defines an ACF model; presets are named instances, overrides replace fields. The
    attention settings (``AttentionSettings``) are keyword-only."""

    arch: str = "resflow"
    attention: Optional[str] = None
    heads: int = 4
    input_shape: tuple[int, int, int] = (1, 28, 28)
    n_scales: int = 2
    squeeze_first: bool = True       # squeeze before the first stage too (else only between stages)
    blocks_per_scale: int = 2
    hidden: int = 32                 # iresnet / resflow hidden channels
    growth: int = 16                 # idensenet
    depth: int = 3                   # idensenet
    coeff: float = 0.97
    factor_out: bool = False
    fc_blocks: int = 0
    fc_hidden: int = 64
    logit_alpha: float = 1e-6
    n_classes: Optional[int] = None  # hybrid model: a linear classifier on z
    estimator: LogdetEstimator = field(default_factory=LogdetEstimator)
    positional: bool = False         # attention: a learnt positional embedding added to its tokens
    kernel_size: int = 3             # iresnet / resflow: the branch's outer kernels (k-1-k); 1: no spatial mixing
    preactivation: bool = True       # resflow branches and FC blocks: LipSwish on the branch's input too (Chen et al.)
    prior_components: int = 0        # 0: z ~ N(0, I); K: an equal mixture of K unit Gaussians with learnt means

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.arch == "coupling" and self.attention not in (None, "dot"):
            raise ValueError(f"the coupling flow's conditioners take attention 'dot' (exact inverse, no certificate "
                             f"needed) or none, got {self.attention!r}")
        if self.attention not in ATTENTION_CHOICES:
            raise ValueError(f"unknown attention {self.attention!r}; choose one of {ATTENTION_CHOICES}")
        shape = self.input_shape
        if not isinstance(shape, (tuple, list)) or len(shape) != 3:
            raise ValueError(f"input_shape must be (channels, height, width), got {shape!r}")
        for name, value in zip(("channels", "height", "width"), shape):
            check_int(value, f"input_shape {name}", minimum=1)
        object.__setattr__(self, "input_shape", tuple(shape))  # a list (from JSON) compares unequal to shapes
        for name in ("heads", "n_scales", "blocks_per_scale", "hidden", "growth", "depth", "fc_hidden", "kernel_size"):
            check_int(getattr(self, name), name, minimum=1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the convolutions keep the image size), got {self.kernel_size}")
        self.check_attention_settings()
        if self.attention_scales is not None:
            for i in self.attention_scales:
                if i >= self.n_scales:
                    raise ValueError(f"attention_scales entry {i} is not a stage: the model has n_scales={self.n_scales} "
                                     f"(stages 0..{self.n_scales - 1})")
            object.__setattr__(self, "attention_scales", tuple(sorted(set(self.attention_scales))))
        check_int(self.fc_blocks, "fc_blocks", minimum=0)
        check_int(self.prior_components, "prior_components", minimum=0)
        if self.n_classes is not None:
            check_int(self.n_classes, "n_classes", minimum=2)
        for name in ("squeeze_first", "factor_out", "positional", "preactivation"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        check_coefficient(check_real(self.coeff, "coeff"))
        check_real(self.logit_alpha, "logit_alpha", low=0.0, high=0.5, high_open=True)
        if not isinstance(self.estimator, LogdetEstimator):
            raise TypeError(f"estimator must be a LogdetEstimator, got {type(self.estimator).__name__}")

    def to_dict(self) -> dict:
        return asdict(self)


# ``cpu`` (below) plus two fully connected blocks, which mix the whole image (bench/results/2026-11-30-default-run.md:
# 1.51 instead of 1.57 bits/dim in the same time), with coefficient 0.99 (2026-12-04-default-run-coefficient.md:
# 0.008-0.01 bits/dim below 0.97).
_CPU_FC = dict(n_scales=2, blocks_per_scale=2, hidden=32, growth=16, depth=2, fc_blocks=2, fc_hidden=128, coeff=0.99)

_CPU_DEEP = dict(_CPU_FC, blocks_per_scale=3, hidden=24, fc_blocks=3, preactivation=False)

PRESETS: dict[str, dict] = {
    # Small enough for a 2-core laptop, valid for every data set's shape (the experiments' model).
    "cpu": dict(n_scales=2, blocks_per_scale=2, hidden=32, growth=16, depth=2, fc_blocks=0),
    "cpu-fc": _CPU_FC,
    # The default of 2026-12-05 (first): deeper (3 blocks per stage and 3 fully connected blocks, 24 hidden
    # channels), with Residual Flow branches that start with their first convolution instead of LipSwish
    # (``preactivation=False``), so that they see the sign of their input (after the logit transform, MNIST's
    # background is negative): connected strokes instead of dots in the samples, and 0.05 bits/dim lower in the
    # same ten minutes (bench/results/2026-12-05-default-run-preactivation.md).
    "cpu-deep-nopreact": _CPU_DEEP,
    # The same flow with a prior of 10 unit Gaussians around learnt means (``prior_components``). Learnt without
    # labels the mixture collapses: nearly every training latent sits nearest one component, near the origin, and
    # the other means stay about where they started, holding 9/10 of the prior's mass at a cost of only
    # log(10) / (784 log 2) bits/dim. Its bolder samples at temperature 0.7 are drawn around those unused means;
    # around the used one they are as thin as N(0, I)'s (bench/results/2026-12-05-default-run-mixture.md).
    "cpu-deep-mixture": dict(_CPU_DEEP, prior_components=10),
    # The same depth for ``--arch idensenet`` (coefficient 0.97, FC blocks without their first activation; train with
    # ``--lr 5e-3 --n-exact 6 --steps 3300``): its latent keeps a digit when scaled down (bolder samples at temperature
    # 0.7), but a reader names no more of them, at 0.014 bits/dim more in the same minutes
    # (bench/results/2026-12-05-default-run-temperature.md).
    "cpu-dense": dict(_CPU_FC, blocks_per_scale=3, fc_blocks=3, coeff=0.97, preactivation=False),
    # Paper scale, after Residual Flows' settings (3 scales, 16 blocks, 512 hidden, FC blocks).
    "mnist": dict(n_scales=3, squeeze_first=False, blocks_per_scale=16, hidden=512, coeff=0.98, factor_out=True, fc_blocks=4,
                  fc_hidden=128, logit_alpha=1e-6),
    "cifar10": dict(n_scales=3, squeeze_first=False, blocks_per_scale=16, hidden=512, coeff=0.98, factor_out=True, fc_blocks=4,
                    fc_hidden=128, logit_alpha=0.05),
    "imagenet32": dict(n_scales=3, squeeze_first=False, blocks_per_scale=32, hidden=512, coeff=0.98, factor_out=True, fc_blocks=4,
                       fc_hidden=128, logit_alpha=0.05),
}


def model_config(arch: str = "resflow", attention: Optional[str] = None, heads: int = 4,
                 input_shape: tuple[int, int, int] = (1, 28, 28), preset: Optional[str] = None,
                 **overrides) -> ModelConfig:
    """Resolve a preset plus overrides into a checked ``ModelConfig``."""
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    names = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"unknown model settings {unknown}; known: {sorted(names)}")
    values = {**PRESETS.get(preset or "cpu", {}), **overrides}
    cfg = ModelConfig(arch=arch, attention=attention, heads=heads, input_shape=input_shape, **values)
    c, h, w = cfg.input_shape
    k = 2 ** n_squeezes(cfg)
    if h % k or w % k:
        raise ValueError(f"input_shape {cfg.input_shape}: H and W must be divisible by {k} "
                         f"({n_squeezes(cfg)} squeezes: n_scales={cfg.n_scales}, squeeze_first={cfg.squeeze_first})")
    return cfg


def n_squeezes(cfg: ModelConfig) -> int:
    return cfg.n_scales - (0 if cfg.squeeze_first else 1)


def attention_options(cfg: ModelConfig, hw: tuple[int, int]) -> dict:
    """The options of the configured attention layer on an ``hw`` image beyond its kind, channels and
    heads (for ``make_attention``; the gated form passes them to ``attention_branch``, which fixes the form)."""
    options: dict = {"gamma_init": cfg.gamma_init, "tokens": hw[0] * hw[1] if cfg.positional else 0}
    if cfg.attention_form != "gated":
        options["form"] = cfg.attention_form
    if cfg.attention == "l2-tight":
        options.update(delta_max=cfg.delta_max, radius=cfg.ball_radius, layout=cfg.head_layout)
    return options


def attends(cfg: ModelConfig, stage: int) -> bool:
    """Whether stage ``stage`` (0 = first) carries attention."""
    return cfg.attention is not None and (cfg.attention_scales is None or stage in cfg.attention_scales)


def _branch(cfg: ModelConfig, channels: int, hw: tuple[int, int], stage: int) -> nn.Module:
    kw = ({"growth": cfg.growth, "depth": cfg.depth} if cfg.arch == "idensenet" else
          {"hidden": cfg.hidden, "kernels": (cfg.kernel_size, 1, cfg.kernel_size)})
    if cfg.arch == "resflow":
        kw["preactivation"] = cfg.preactivation
    inside = attends(cfg, stage) and cfg.attention_form != "gated"
    return BRANCHES[cfg.arch](channels, hw, coeff=cfg.coeff, attention=cfg.attention if inside else None,
                              heads=cfg.heads, attention_options=attention_options(cfg, hw), **kw)


def _gated_block(cfg: ModelConfig, channels: int, hw: tuple[int, int]) -> ContractiveBlock:
    """A gated attention block (``attention_branch``, ``cfg.hidden`` channels for the attention), drawn
    without advancing the global random stream (the other blocks start as in the model without it)."""
    options = attention_options(cfg, hw)
    with torch.random.fork_rng(devices=[]):
        g = attention_branch(channels, hw, cfg.attention, hidden=cfg.hidden, heads=cfg.heads, coeff=cfg.coeff,
                             gamma_init=options.pop("gamma_init"), attention_options=options)
    return _block(cfg, g)


def _coupling(cfg: ModelConfig, channels: int, hw: tuple[int, int], stage: int, index: int) -> AffineCoupling:
    """A checkerboard coupling layer (alternating parity), attention in its conditioner where the stage has it."""
    return AffineCoupling(channels, hw, parity=index % 2, hidden=cfg.hidden,
                          attention_heads=cfg.heads if attends(cfg, stage) else 0)


def _block(cfg: ModelConfig, g: nn.Module) -> ContractiveBlock:
    return ContractiveBlock(g, cfg.estimator, allow_uncertified=cfg.attention == "dot")


class ACFModel(nn.Module):
    """A multi-scale contractive flow: ``forward(x) -> (z, logdet)`` with flat ``z``, ``inverse(z)``.

    Inputs are non-empty ``(B, C, H, W)`` batches in ``[0, 1]`` of the parameters' dtype: a float32
    model refuses float64 input (convert one of them: ``x.float()`` or ``model.double()``)."""

    train_config: Optional[object] = None  # a loaded run's training settings (``acf.load_run`` sets them)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, h, w = cfg.input_shape
        self.pre = LogitTransform(cfg.logit_alpha)
        self.stages = nn.ModuleList()
        # per stage: the shape of the latent that leaves after it (factor-out), or None
        self.factored: list[Optional[tuple[int, int, int]]] = []
        for scale in range(cfg.n_scales):
            layers: list[nn.Module] = []
            if scale > 0 or cfg.squeeze_first:
                c, h, w = c * 4, h // 2, w // 2
                layers.append(Squeeze())
            for i in range(cfg.blocks_per_scale):
                layers += [ActNorm(c), _coupling(cfg, c, (h, w), scale, i) if cfg.arch == "coupling" else
                           _block(cfg, _branch(cfg, c, (h, w), scale))]
                if cfg.attention_form == "gated" and attends(cfg, scale):
                    layers.append(_gated_block(cfg, c, (h, w)))
            self.stages.append(SequentialFlow(layers))
            leaves = cfg.factor_out and scale < cfg.n_scales - 1 and c % 2 == 0
            self.factored.append((c // 2, h, w) if leaves else None)
            c //= 2 if leaves else 1
        self.final_shape = (c, h, w)
        dim = c * h * w
        fc: list[nn.Module] = []
        for _ in range(cfg.fc_blocks):
            g = resflow_branch(dim, (1, 1), hidden=cfg.fc_hidden, coeff=cfg.coeff, kernels=(1, 1, 1),
                               preactivation=cfg.preactivation)
            fc += [ActNorm(dim), ContractiveBlock(g, cfg.estimator)]
        self.fc = SequentialFlow(fc)
        self.head = nn.Linear(math.prod(cfg.input_shape), cfg.n_classes) if cfg.n_classes else None
        k = cfg.prior_components  # drawn last: every other parameter starts as in the model without it
        self.prior_means = nn.Parameter(0.3 * torch.randn(k, self.dims)) if k else None

    @property
    def dims(self) -> int:
        return math.prod(self.cfg.input_shape)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` in ``[0, 1]`` (dequantised), ``(B, C, H, W)`` -> flat ``z`` and ``log |det J|`` per sample."""
        check_image(x, self.cfg.input_shape[0])
        if tuple(x.shape[1:]) != self.cfg.input_shape:
            raise ValueError(f"input has shape {tuple(x.shape[1:])}; this model was built for {self.cfg.input_shape}")
        refresh_spectral_norms(self, stale_only=True)  # every layer whose weight changed, one batched call
        x, logdet = self.pre(x)
        zs = []
        for i, stage in enumerate(self.stages):
            x, ld = stage(x)
            logdet = logdet + ld
            if self.factored[i] is not None:
                z_i, x = x.chunk(2, dim=1)
                zs.append(z_i.flatten(1))
        b = x.shape[0]
        x, ld = self.fc(x.reshape(b, -1, 1, 1))
        zs.append(x.flatten(1))
        return torch.cat(zs, dim=1), logdet + ld

    def inverse(self, z: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """Flat ``z`` -> ``x`` in ``[0, 1]``; ``kwargs`` (``tol``, ``max_iter``, ``on_fail``, ``method``)
        reach the residual blocks."""
        if z.dim() != 2 or z.shape[1] != self.dims:
            raise ValueError(f"z must have shape (batch, {self.dims}), got {tuple(z.shape)}")
        check_same_dtype(z, next(self.parameters()), "z")  # the forward's message, for the inverse
        left = [s for s in self.factored if s is not None]
        *parts, last = z.split([math.prod(s) for s in left] + [math.prod(self.final_shape)], dim=1)
        b = z.shape[0]
        x = self.fc.inverse(last.reshape(b, -1, 1, 1), **kwargs).reshape(b, *self.final_shape)
        for i in reversed(range(len(self.stages))):
            if self.factored[i] is not None:
                x = torch.cat([parts.pop().reshape(b, *self.factored[i]), x], dim=1)
            x = self.stages[i].inverse(x, **kwargs)
        return self.pre.inverse(x)

    def log_prob(self, x: torch.Tensor, component: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``log p(x)`` per sample for ``x`` in ``[0, 1]``; with ``component``, ``log p(x, k)`` (``prior_log_prob``)."""
        z, logdet = self(x)
        return self.prior_log_prob(z, component) + logdet

    def prior_log_prob(self, z: torch.Tensor, component: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``log p_Z(z)`` per sample: ``N(0, I)``, or the mixture of ``prior_components`` unit Gaussians; with
        ``component`` (``(B,)`` indices; a class-conditional model's labels) the joint ``log p_Z(z, k)``."""
        if self.prior_means is None and component is None:
            return standard_normal_logprob(z)
        return gaussian_mixture_logprob(z, self._prior_components(), component)

    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Bits per dimension of dequantised 8-bit data ``x``: ``-(log p(x) - D log 256) / (D log 2)``."""
        return bits_per_dim(self.log_prob(x), self.dims)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, return_log_prob: bool = False,
               component: Optional[int | torch.Tensor] = None,
               **inverse_kwargs: object) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``n`` (>= 1) images ``x`` in ``[0, 1]``: ``f^-1(z)`` for ``z ~ N(0, temperature^2 I)``, or with a
        mixture prior ``z = mu_k + temperature * eps`` for a uniform component ``k`` (``temperature >= 0``;
        below 1 trades diversity for cleaner images), clamped to ``[0, 1]``; ``component`` (an index, or ``n``
        of them) picks the components instead (a class-conditional model's classes)
        (the inverse can land a hair outside the data's range). ``inverse_kwargs`` (``tol``,
        ``max_iter``, ``on_fail``, ``method``) reach the residual blocks' inversion.

        With ``return_log_prob=True`` returns ``(x, log_prob)`` (as normflows does): ``log_prob`` is
        the model's ``log p(x)`` per image, in nats, of the returned (clamped) images, by a forward
        pass with the evaluation estimator (eval mode for that pass). It is the density of the model
        itself, whatever the temperature, and with a stochastic log-det estimator (Russian roulette,
        Hutchinson probes) an unbiased estimate of it, not the exact value; where clamping moved a
        pixel it is the density at the clamped image, not at the unclamped inverse."""
        check_int(n, "number of samples n", minimum=1)
        check_real(temperature, "temperature", low=0.0)
        p = next(self.parameters())
        z = torch.randn(n, self.dims, device=p.device, dtype=p.dtype) * temperature
        if self.prior_means is not None or component is not None:
            means = self._prior_components()
            k = (torch.randint(len(means), (n,), device=p.device) if component is None
                 else self._components(component, n))
            z = z + means[k]
        x = self.inverse(z, **inverse_kwargs).clamp(0.0, 1.0)
        if not return_log_prob:
            return x
        was_training = self.training
        try:
            return x, self.eval().log_prob(x)
        finally:
            self.train(was_training)

    def _prior_components(self) -> torch.Tensor:
        """The means of the prior's components; for ``N(0, I)`` an error (a component was asked of it)."""
        if self.prior_means is None:
            raise ValueError("component given, but this model's prior N(0, I) has no components "
                             "(build it with prior_components=K)")
        return self.prior_means

    def _components(self, component: int | torch.Tensor, n: int) -> torch.Tensor:
        """``component`` (an index or ``n`` of them) as ``(n,)`` int64 indices of the prior's components, checked."""
        k = torch.as_tensor(component, device=self.prior_means.device)
        if k.dtype not in (torch.int32, torch.int64) or k.dim() > 1 or (k.dim() == 1 and len(k) != n):
            raise ValueError(f"component must be an integer or {n} integers, got {component!r}")
        if not 0 <= int(k.min()) <= int(k.max()) < len(self.prior_means):
            raise ValueError(f"component must lie in [0, {len(self.prior_means)}), got {component!r}")
        return k.long().expand(n)

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """Class logits from the latent ``z``: the hybrid model's linear head, or for a mixture prior each
        component's ``log N(z; mu_k, I)`` (their softmax is the posterior; in a class-conditional model,
        trained with ``task="conditional"``, component ``k`` is class ``k``)."""
        if self.head is not None:
            return self.head(z)
        if self.prior_means is not None:
            return gaussian_component_logprob(z, self.prior_means)
        raise ValueError("this model has neither a classification head (n_classes=...) nor prior components "
                         "(prior_components=K)")

    def lipschitz_bounds(self) -> list[float]:
        """Certified Lipschitz bound of every residual branch, in order (all < 1)."""
        return [m.lipschitz_bound() for m in self.modules() if isinstance(m, ContractiveBlock)]


def build_model(arch: str = "resflow", attention: Optional[str] = None, heads: int = 4,
                input_shape: tuple[int, int, int] = (1, 28, 28), preset: Optional[str] = None,
                **overrides) -> ACFModel:
    """Build an ACF model: ``arch`` in iresnet / resflow / idensenet, ``attention`` in ``ATTENTION_CHOICES``
    (``"dot"`` is an uncertified ablation), a ``preset`` (a name in ``PRESETS``; default "cpu") plus overrides."""
    return ACFModel(model_config(arch, attention, heads, input_shape, preset, **overrides))
