"""Errors kshare raises on bad input: one class per kind, one line each, so the CLI can
print the message and exit 2 without a traceback.

Messages name the caller's parameters, not command-line flags: `param("trust_code", True)`
gives `` `trust_code=True` ``, which reads right from Python and which the CLI rewrites to its
flag (`--trust-code`).
"""

from __future__ import annotations

_MISSING = object()


def param(name: str, value: object = _MISSING) -> str:
    """How a message names one of the caller's parameters (optionally with a value)."""
    return f"`{name}`" if value is _MISSING else f"`{name}={value}`"


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most `limit` characters: what a one-line
    error quotes of a library's failure."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


class KShareError(Exception):
    """Base class of every error caused by the user's input (not by a bug in kshare)."""


class ModelNotFoundError(KShareError):
    """A model name that no registry (kshare, torchvision, timm, a module or a file) knows."""


class ModelBuildError(KShareError):
    """The model's factory exists but raised while building it."""


class WeightsError(KShareError):
    """A `--weights` file that is missing, unreadable or does not fit the model."""


class PolicyError(KShareError):
    """A sharing policy string or option that cannot be understood or applied."""


class OptionError(KShareError):
    """A command-line option whose value is not one of the choices it takes."""


class InputSizeError(KShareError):
    """An example input size that is malformed or that the model cannot run on."""


class InspectError(KShareError):
    """The model could be neither traced nor run on the example input."""


class PlanError(KShareError):
    """A sharing plan that is malformed or does not fit the model it is applied to."""


class CheckpointError(KShareError):
    """A checkpoint that is missing, unsafe, truncated, foreign, or does not fit the model."""


class ExportError(KShareError):
    """An export that cannot be written or that would not keep shared tensors shared."""


class DataError(KShareError):
    """A dataset that is unknown, missing, malformed, or does not fit the model."""


class TrainingError(KShareError):
    """Training that cannot start or continue (bad options, diverged loss, nothing to resume)."""


class StudyError(KShareError):
    """A study file or study settings kshare cannot use."""


class SearchError(KShareError):
    """A fidelity target or search settings kshare cannot use."""
