"""The base of the errors ACF raises on purpose, for whoever called it to read and act on.

Each error is defined where it is raised and also derives from the built-in class a caller would
catch without knowing ACF (so ``except RuntimeError`` or ``except ValueError`` keep working):

=========================================  ===========================  ==============================
error                                      raised by                    also a
=========================================  ===========================  ==============================
``acf._checks.NonFiniteError``             input checks (NaN, inf)      ``ValueError``
``acf.data.MissingDataError``              data loaders                 ``FileNotFoundError``
``acf.data.MalformedDataError``            data loaders                 ``ValueError``
``acf.ops.fixed_point.ConvergenceError``   inverses (``on_fail``)       ``RuntimeError``
``acf.layers.block.CertificateError``      certified bounds             ``RuntimeError``
``acf.runfolder.RunFolderError``           run folders, checkpoints     ``RuntimeError``
``acf.train.NonFiniteLossError``           training                     ``RuntimeError``
=========================================  ===========================  ==============================

The command line (``acf.cli``) reports these, and the ``ValueError``/``TypeError`` of validation and
the ``OSError`` of I/O, in one line with exit code 2; any other exception is a bug and keeps its
traceback.
"""
from __future__ import annotations


class ACFError(Exception):
    """An error of ACF's own: a setting, a file or a state a user can change (see the module docstring)."""
