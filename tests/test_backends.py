"""The extension loader (``acf._C``, one warning when it is missing) and ``backend_info``."""
import os
import sys

import pytest
import torch

from acf import _ext
from acf.ops.info import backend_info, format_backend_info

EXT = _ext.available()


def test_extension_built():
    """CI installs with the extension: a silent fallback there would hide a broken build."""
    if os.environ.get("ACF_NO_EXTENSION") == "1" or os.environ.get("ACF_DISABLE_EXTENSION") == "1":
        pytest.skip("extension switched off on purpose")
    assert EXT, f"acf._C did not load: {_ext.error()}"


def test_loader_warns_once(monkeypatch):
    monkeypatch.delenv("ACF_DISABLE_EXTENSION", raising=False)
    monkeypatch.setattr(_ext, "_tried", False)
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setitem(sys.modules, "acf._C", None)  # makes `from . import _C` fail
    with pytest.warns(RuntimeWarning, match="acf._C is not available") as rec:
        assert _ext.load() is None
        assert _ext.load() is None
        assert not _ext.available()
    assert len(rec) == 1


def test_backend_info():
    info = backend_info()
    for key in ("acf", "torch", "python", "device", "extension", "triton", "backends"):
        assert key in info
    assert info["extension"]["loaded"] == EXT
    text = format_backend_info(info)
    assert "extension" in text and info["torch"] in text
    if not torch.cuda.is_available():  # what auto runs on CPU: acf._C's kernels when they are built
        assert info["backends"]["l2_attention"].startswith("extension" if EXT else "reference")
