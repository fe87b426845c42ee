"""ACF: Attentive Contractive Flows.

Contractive residual flows (i-ResNet, Residual Flow, invertible DenseNet) whose residual
branches may carry Lipschitz-constrained self-attention (L2 multi-head attention with tied keys,
or LipschitzNorm dot-product attention), with certified Lipschitz bounds.
"""
import os as _os
import sys as _sys

from ._version import __version__


def _launched_as_cli() -> bool:
    """True when this process is the ``acf`` command: the console script, or ``python [options] -m acf``
    (``python -m acf.cli`` too); then an interrupt while the package imports is the command's."""
    if _os.path.basename(_sys.argv[0]) in ("acf", "acf.exe", "acf-script.py"):
        return True
    argv = list(getattr(_sys, "orig_argv", []))[1:]
    while argv:  # the interpreter's own options, up to the module or script
        option = argv.pop(0)
        if option == "-m" or option.startswith("-m"):
            module = option[2:] or (argv[0] if argv else "")
            return module in ("acf", "acf.cli")
        if option in ("-X", "-W", "--check-hash-based-pycs"):
            argv = argv[1:]
        elif not option.startswith("-") or option == "-c" or option == "-":
            return False
    return False


try:  # Ctrl-C in the first seconds (importing torch and the rest) is the command's, if this is the command
    from .data import DATASETS, load_dataset
    from .errors import ACFError
    from .layers.activations import CLipSwish, ELU, LipSwish
    from .layers.attention import (DotProductAttention, L2MultiheadAttention, L2TightAttention, LipNormAttention,
                                   make_attention)
    from .layers.attention_bounds import l2_mha_lipschitz_bound, l2_tight_constant, lipnorm_lipschitz_bound
    from .layers.block import CertificateError, ContractiveBlock, LipschitzChain, certified_bounds
    from .layers.branches import idensenet_branch, iresnet_branch, resflow_branch
    from .layers.flow import (ActNorm, LogitTransform, SequentialFlow, Squeeze, bits_per_dim,
                              gaussian_component_logprob, gaussian_mixture_logprob, standard_normal_logprob,
                              uniform_dequantize)
    from .layers.logdet import LogdetEstimator, exact_logdet, logdet_estimate
    from .layers.spectral_norm import SpectralConv2d, SpectralLinear, norm_bounds, refresh_spectral_norms, spectral_norm
    from .models import ACFModel, ModelConfig, build_model
    from .ops.fixed_point import ConvergenceError, FixedPointInfo, fixed_point_solve
    from .ops.l2_attention import l2_attention
    from .ops.power_iteration import power_iteration, spectral_norms

    if _launched_as_cli():
        from . import cli as _cli  # noqa: F401  (its imports too, under this guard)
except KeyboardInterrupt:
    if not _launched_as_cli():
        raise
    print("acf: interrupted (while starting)", file=_sys.stderr)
    raise SystemExit(130) from None



def __getattr__(name: str) -> object:
    """``acf.load_run`` (``acf.evaluate.load_run``), imported on first use: it brings in the application
    (training, figures: matplotlib), which ``import acf`` alone does not need."""
    if name == "load_run":
        from .evaluate import load_run

        return load_run
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ACFError", "ACFModel", "CertificateError", "DATASETS", "ModelConfig", "build_model", "load_dataset",
    "ActNorm", "CLipSwish", "ContractiveBlock", "ConvergenceError", "DotProductAttention", "ELU",
    "FixedPointInfo", "L2MultiheadAttention", "L2TightAttention", "LipNormAttention", "LipSwish", "LipschitzChain",
    "LogdetEstimator", "LogitTransform", "SequentialFlow", "SpectralConv2d", "SpectralLinear", "Squeeze",
    "bits_per_dim", "certified_bounds", "exact_logdet", "fixed_point_solve", "gaussian_component_logprob",
    "gaussian_mixture_logprob",
    "idensenet_branch", "iresnet_branch",
    "l2_attention", "load_run", "l2_mha_lipschitz_bound", "l2_tight_constant", "lipnorm_lipschitz_bound", "logdet_estimate",
    "make_attention", "norm_bounds", "power_iteration", "refresh_spectral_norms", "resflow_branch", "spectral_norm",
    "spectral_norms", "standard_normal_logprob",
    "uniform_dequantize",
]
