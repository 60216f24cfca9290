"""The exception hierarchy of fxcompress.

Every error the library raises on purpose derives from :class:`FxCompressError`, so a
caller can catch them all in one place. Errors caused by the caller's input also derive
from :class:`ValueError`, so generic code that expects a ``ValueError`` keeps working.
Messages say what was wrong and what to do about it.
"""

from __future__ import annotations


class FxCompressError(Exception):
    """Base class of every error raised by fxcompress."""


class ConfigError(FxCompressError, ValueError):
    """An option or configuration value is invalid (unknown rule, out-of-range option, ...)."""


class DataError(FxCompressError, ValueError):
    """Input data is unusable: NaN/Inf activations, too few samples, wrong shapes, ..."""


class DatasetError(FxCompressError, FileNotFoundError):
    """A dataset file is missing or unreadable; the message names the path."""


class CaptureError(FxCompressError):
    """A model could not be captured as a graph; the message names the construct and a fix."""


class TrainingError(FxCompressError):
    """Fine-tuning diverged (a NaN or infinite loss); the message names the step."""


class ExportError(FxCompressError):
    """An ONNX export failed or does not compute what the PyTorch module does."""


class SurgeryError(FxCompressError):
    """The narrowed widths do not fit the user's own class: its code fixes a width itself."""
