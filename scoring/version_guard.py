"""The one check in front of code that relies on a library's private internals.

Two places rely on what a library does not promise to keep: ``scoring.serving_guards`` (private
functions of MLflow's pyfunc and scoring server) and ``scoring.runtimes.torch_rtmdet`` (a copy of
a private method of mmdet's RTMDet-Ins head). Each was written for, and is tested on, the version
pinned in mlflow_model/requirements.txt. On any other version the private parts may have moved or
changed meaning, so each asks ``written_for`` first, and on another version takes its public
fallback after a warning that says what is lost; it never crashes the model's load.
"""
from __future__ import annotations

import warnings


class UntestedVersionWarning(UserWarning):
    """A library is at another version than the one our private-internals code was written for."""


def written_for(package: str, installed: str, expected: str, otherwise: str) -> bool:
    """Whether ``package`` is installed at ``expected`` (the version the calling code was written
    for and is tested on). If not, warn once per call site, saying ``otherwise``: what the caller
    does instead and what the user loses by it."""
    if installed == expected:
        return True
    warnings.warn(
        f"{package} {installed} is installed; mmdet-mlflow's use of {package}'s private internals "
        f"was written for {package} {expected} only, so here {otherwise} "
        f"(install {package}=={expected} to keep it)",
        UntestedVersionWarning, stacklevel=3)
    return False
